using System.Runtime.InteropServices;
using Vmm.Cli;
using Vmm.Interop;
using Vmm.Interop.Seccomp;
using Vmm.Machine;
using static Vmm.Interop.KvmConstants;
using static Vmm.Interop.Seccomp.Bpf;

namespace Vmm.Tests.Seccomp;

/// <summary>The seccomp filters without KVM: each role's compiled BPF program, run through a classic-BPF interpreter,
/// agrees with its rule list and refuses what the issue names; and one filter installed for real on a dedicated
/// thread of this test process.</summary>
public class SeccompFilterTests
{
    private const uint Trap = SECCOMP_RET_TRAP;
    private static readonly ulong Self = (ulong)Environment.ProcessId;

    /// <summary>A classic BPF interpreter for the instructions seccomp allows (the subset the compiler emits).</summary>
    internal static uint Run(sock_filter[] program, uint arch, int nr, params ulong[] args)
    {
        var data = new byte[64];
        BitConverter.TryWriteBytes(data.AsSpan(0), nr);
        BitConverter.TryWriteBytes(data.AsSpan(4), arch);
        for (int i = 0; i < args.Length; i++)
            BitConverter.TryWriteBytes(data.AsSpan(16 + 8 * i), args[i]);
        uint a = 0;
        for (int pc = 0; pc < program.Length; pc++)
        {
            var f = program[pc];
            switch (f.code)
            {
                case BPF_LD | BPF_W | BPF_ABS:
                    Assert.True(f.k % 4 == 0 && f.k < 64, $"load at {f.k}");
                    a = BitConverter.ToUInt32(data, (int)f.k);
                    break;
                case BPF_ALU | BPF_AND | BPF_K: a &= f.k; break;
                case BPF_JMP | BPF_JA: pc += (int)f.k; break;
                case BPF_JMP | BPF_JEQ | BPF_K: pc += a == f.k ? f.jt : f.jf; break;
                case BPF_JMP | BPF_JGE | BPF_K: pc += a >= f.k ? f.jt : f.jf; break;
                case BPF_JMP | BPF_JGT | BPF_K: pc += a > f.k ? f.jt : f.jf; break;
                case BPF_JMP | BPF_JSET | BPF_K: pc += (a & f.k) != 0 ? f.jt : f.jf; break;
                case BPF_RET | BPF_K: return f.k;
                default: throw new InvalidOperationException($"opcode 0x{f.code:x} at {pc}");
            }
        }
        throw new InvalidOperationException("the program ran off its end");
    }

    private static uint Run(SeccompFilter f, int nr, params ulong[] args) => Run(f.Compile(Trap), AUDIT_ARCH_X86_64, nr, args);

    private static int N(string name) => Syscalls.Number(name);

    public static TheoryData<string, bool> Roles()
    {
        var d = new TheoryData<string, bool>();
        foreach (var role in Enum.GetNames<SeccompRole>())
        {
            d.Add(role, false);
            d.Add(role, true);
        }
        return d;
    }

    private static SeccompFilter Filter(string role, bool jit) =>
        SeccompFilters.All(jit).Single(f => f.Role == Enum.Parse<SeccompRole>(role));

    [Theory]
    [MemberData(nameof(Roles))]
    public void The_compiled_program_agrees_with_the_rule_list_for_every_call_number(string role, bool jit)
    {
        var f = Filter(role, jit);
        var program = f.Compile(Trap);
        Assert.True(program.Length <= MaxInstructions);
        var args = new ulong[6];
        for (int nr = 0; nr < Syscalls.Names.Length + 10; nr++)
            Assert.Equal(f.Evaluate(AUDIT_ARCH_X86_64, nr, args, Trap), Run(program, AUDIT_ARCH_X86_64, nr, args));
        // Every rule's argument alternatives, each value hit exactly and missed by one.
        foreach (var rule in f.Rules.Where(r => r.When is not null))
            foreach (var alt in rule.When!)
            {
                var hit = new ulong[6];
                foreach (var m in alt)
                    hit[m.Index] = m.Value;
                Assert.Equal(rule.Action, Run(program, AUDIT_ARCH_X86_64, rule.Number, hit));
                var miss = (ulong[])hit.Clone();
                miss[alt[0].Index] ^= 0x8000;
                Assert.Equal(f.Evaluate(AUDIT_ARCH_X86_64, rule.Number, miss, Trap), Run(program, AUDIT_ARCH_X86_64, rule.Number, miss));
            }
    }

    [Theory]
    [MemberData(nameof(Roles))]
    public void Every_filter_refuses_exec_ptrace_fork_x32_and_other_architectures_and_lets_the_SIGSYS_handler_work(string role, bool jit)
    {
        var f = Filter(role, jit);
        foreach (var name in new[] { "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "fork", "vfork",
                     "mount", "pivot_root", "chroot", "unshare", "setns", "kexec_load", "init_module", "finit_module", "bpf",
                     "perf_event_open", "keyctl", "setuid", "reboot" })
            Assert.True(Run(f, N(name)) == Trap, $"{role}: {name}");
        Assert.NotEqual(SECCOMP_RET_ALLOW, Run(f, N("clone"), 17 /* SIGCHLD alone: a fork */));
        Assert.Equal(SECCOMP_RET_ERRNO | Errno.ENOSYS, Run(f, N("clone3")));
        // x32 (the same arch value, numbers with bit 30) and i386 numbers are refused before any rule.
        Assert.Equal(Trap, Run(f, (int)X32_SYSCALL_BIT | N("write")));
        Assert.Equal(Trap, Run(f.Compile(Trap), 0x40000003 /* AUDIT_ARCH_I386 */, 4 /* i386 write */));
        // The handler's calls, and tgkill to this process only.
        foreach (var name in new[] { "write", "rt_sigaction", "rt_sigprocmask", "getpid", "gettid", "exit_group", "rt_sigreturn" })
            Assert.True(Run(f, N(name)) == SECCOMP_RET_ALLOW, $"{role}: {name}");
        Assert.Equal(SECCOMP_RET_ALLOW, Run(f, N("tgkill"), Self, 1234, 31));
        Assert.Equal(Trap, Run(f, N("tgkill"), Self + 1, 1234, 31));
        // Thread names yes; PR_SET_NO_NEW_PRIVS is set once before any filter, so no filter needs it.
        Assert.Equal(SECCOMP_RET_ALLOW, Run(f, N("prctl"), 15 /* PR_SET_NAME */));
        Assert.Equal(Trap, Run(f, N("prctl"), 38 /* PR_SET_NO_NEW_PRIVS */, 1));
        // Log mode: the same program with SECCOMP_RET_LOG where the trap was.
        Assert.Equal(SECCOMP_RET_LOG, Run(f.Compile(SECCOMP_RET_LOG), AUDIT_ARCH_X86_64, N("execve")));
    }

    [Fact]
    public void A_vCPU_may_issue_only_the_listed_ioctls_and_opens_no_socket()
    {
        var f = SeccompFilters.Vcpu(jit: false);
        Assert.Equal(N("ioctl"), f.Rules[0].Number); // KVM_RUN's rule first: the hot path
        foreach (ulong request in new ulong[] { KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_IRQ_LINE, KVM_SET_GSI_ROUTING, KVM_IOEVENTFD })
            Assert.Equal(SECCOMP_RET_ALLOW, Run(f, N("ioctl"), 20, request));
        // The kernel reads cmd as 32 bits: a sign-extended request is the same request.
        Assert.Equal(SECCOMP_RET_ALLOW, Run(f, N("ioctl"), 20, 0xFFFFFFFF00000000UL | KVM_GET_MSRS));
        foreach (ulong request in new ulong[] { KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_SET_CPUID2, KVM_SET_TSS_ADDR, KVM_CREATE_DEVICE, 0x5401 /* TCGETS */ })
            Assert.Equal(Trap, Run(f, N("ioctl"), 20, request));
        foreach (var name in new[] { "socket", "socketpair", "connect", "bind", "listen", "accept4", "open", "memfd_create", "execve" })
            Assert.Equal(Trap, Run(f, N(name), 1, 1, 0));
        Assert.Equal(SECCOMP_RET_ERRNO | Errno.EACCES, Run(f, N("openat"), unchecked((ulong)-100), 0, 0));
        Assert.Equal(SECCOMP_RET_ALLOW, Run(SeccompFilters.Vcpu(jit: true), N("openat"), unchecked((ulong)-100), 0, 0));
        Assert.Equal(SECCOMP_RET_ERRNO | Errno.EAGAIN, Run(f, N("clone"), 0x10000 /* CLONE_THREAD */));
    }

    [Fact]
    public void A_device_worker_opens_only_unix_sockets_and_the_main_filter_only_threads()
    {
        var device = SeccompFilters.DeviceWorker(jit: false);
        Assert.Equal(SECCOMP_RET_ALLOW, Run(device, N("socket"), 1 /* AF_UNIX */, 1, 0));
        Assert.Equal(Trap, Run(device, N("socket"), 2 /* AF_INET */, 1, 0));
        Assert.Equal(Trap, Run(device, N("ioctl"), 20, KVM_RUN));
        var main = SeccompFilters.Main(jit: false);
        Assert.Equal(SECCOMP_RET_ALLOW, Run(main, N("clone"), 0x3D0F00 /* glibc pthread_create's flags */));
        Assert.Equal(Trap, Run(main, N("clone"), 0x1200011 /* fork: CLONE_CHILD_SETTID|CLEARTID|SIGCHLD */));
        Assert.Equal(SECCOMP_RET_ALLOW, Run(main, N("seccomp"), 1 /* SECCOMP_SET_MODE_FILTER */));
        Assert.Equal(Trap, Run(main, N("seccomp"), 0 /* SECCOMP_SET_MODE_STRICT */));
    }

    [Fact]
    public void A_listed_call_twice_and_an_unknown_name_are_refused_when_the_list_is_built()
    {
        Assert.Throws<ArgumentException>(() => new SeccompFilter(SeccompRole.Api, [new("read", "a"), new("read", "b")]));
        Assert.Throws<ArgumentException>(() => new SyscallRule("no_such_call", "why"));
        Assert.Equal(41, Syscalls.Number("socket"));
        Assert.Equal("socket", Syscalls.Names[41]);
    }

    [Fact]
    public void The_vCPU_filter_installed_on_a_thread_of_this_process_lets_its_calls_through_and_refuses_the_rest()
    {
        // ERRNO(EPERM) instead of the trap, so the test process survives; the thread ends with its filter.
        var program = SeccompFilters.Vcpu(Vmm.Interop.Sys.RunsOnCoreClr).Compile(SECCOMP_RET_ERRNO | Errno.EPERM);
        int socketErrno = 0, createVmErrno = 0, runErrno = 0, pid = 0;
        Exception? failure = null;
        var t = new Thread(() =>
        {
            try
            {
                // vmm's InstallProcess sets no_new_privs for the process before any filter; this test process has
                // none, so the thread sets it itself (it stays with the thread, which ends with the test).
                Vmm.Interop.JailCalls.SetNoNewPrivileges();
                Vmm.Interop.Seccomp.Seccomp.Install(program, 0);
                pid = getpid();
                createVmErrno = ioctl(-1, KVM_CREATE_VM, 0) == -1 ? Marshal.GetLastSystemError() : 0;
                runErrno = ioctl(-1, KVM_RUN, 0) == -1 ? Marshal.GetLastSystemError() : 0;
                socketErrno = socket(1, 1, 0) == -1 ? Marshal.GetLastSystemError() : 0;
            }
            catch (Exception e)
            {
                failure = e;
            }
        });
        t.Start();
        t.Join();
        Assert.Null(failure);
        Assert.Equal(Environment.ProcessId, pid);
        Assert.Equal(Errno.EPERM, createVmErrno);   // not on the list: the filter answered
        Assert.Equal(Errno.EBADF, runErrno);        // KVM_RUN is: the kernel answered (fd -1)
        Assert.Equal(Errno.EPERM, socketErrno);
        // This thread (no filter) still may.
        int s = socket(1, 1, 0);
        Assert.True(s >= 0);
        close(s);
    }

    [Theory]
    [InlineData("on", SeccompMode.On)]
    [InlineData("true", SeccompMode.On)]
    [InlineData("log", SeccompMode.Log)]
    [InlineData("off", SeccompMode.Off)]
    [InlineData("false", SeccompMode.Off)]
    public void Seccomp_option_takes_on_log_off_and_cloud_hypervisors_true_false(string value, SeccompMode mode)
    {
        Assert.Equal(SeccompMode.On, Options.Parse(["demo"]).Seccomp);
        Assert.Equal(mode, Options.Parse(["demo", "--seccomp", value]).Seccomp);
        var e = Assert.Throws<UsageException>(() => Options.Parse(["demo", "--seccomp", "maybe"]));
        Assert.Contains("--seccomp must be on, log or off", e.Message);
    }

    [DllImport("libc", SetLastError = true)] private static extern int getpid();
    [DllImport("libc", SetLastError = true)] private static extern int ioctl(int fd, ulong request, long arg);
    [DllImport("libc", SetLastError = true)] private static extern int socket(int domain, int type, int protocol);
    [DllImport("libc")] private static extern int close(int fd);
}
