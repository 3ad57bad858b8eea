using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace Vmm.Interop.Seccomp;

/// <summary>Installs the role filters (seccomp(2), SECCOMP_SET_MODE_FILTER) and reports a forbidden call.
/// <see cref="Configure"/> once with the compiled filters (the lists are in Vmm.Machine's SeccompFilters);
/// <see cref="InstallProcess"/> on the main thread; then each role thread calls <see cref="Enter"/> at its
/// start, before it touches guest data. Filters stack: a role thread runs under the process filter and its own,
/// and the stricter answer wins — a role can only take calls away.
///
/// <para>A forbidden call in <c>on</c> mode returns SECCOMP_RET_TRAP: the kernel sends SIGSYS with the call's
/// number and address in siginfo. The handler (<see cref="OnSigsys"/>) writes one line to stderr naming the
/// thread (from a native table filled by <see cref="Enter"/>) and the call, then, its disposition reset to
/// SIG_DFL by SA_RESETHAND, sends SIGSYS to its own thread: the process dies by SIGSYS (a shell sees status
/// 128 + 31 = 159). It uses only raw system calls (write, gettid, getpid, tgkill, exit_group) on native memory
/// prepared here, never managed allocation; every filter allows those calls.</para>
///
/// <para>The known limit: the handler is managed code ([UnmanagedCallersOnly]), and entering it from a signal makes a
/// GC transition, which is not async-signal-safe in general (see Vmm.Machine's KickSignal, whose handler is native
/// for that reason). It is safe when the forbidden call comes from a P/Invoke (vmm's own calls, the usual case:
/// the thread is then in preemptive mode). It can fail when runtime code makes the forbidden call
/// while its thread is in cooperative mode (inside the runtime, not in a P/Invoke): entering managed code from there
/// is an invalid transition, which the runtime answers by failing fast. The process still dies — by that abort, or
/// by SIGSYS, which SA_RESETHAND has already made fatal — but possibly without the one-line report.</para></summary>
public static unsafe class Seccomp
{
    public const int SIGSYS = 31;
    private const int SECCOMP_SET_MODE_FILTER = 1;
    public const uint SECCOMP_FILTER_FLAG_TSYNC = 1;
    private const int SYS_write = 1, SYS_getpid = 39, SYS_gettid = 186, SYS_tgkill = 234, SYS_exit_group = 231,
        SYS_seccomp = 317;

    private const int TableEntries = 256, RoleBytes = 16, NameBytes = 32, EntryBytes = 4 + RoleBytes + NameBytes;
    private const int LineBytes = 512;

    private static readonly Lock s_lock = new();
    private static Dictionary<SeccompRole, sock_filter[]>? s_programs;
    private static SeccompMode s_mode;
    private static byte* s_table;   // TableEntries × { int tid; char role[16]; char name[32]; }
    private static int s_next;
    private static byte* s_line;    // the report is composed here
    private static byte* s_names;   // the syscall names, NUL-terminated, at s_nameOffsets[nr]
    private static int* s_nameOffsets;
    private static int s_nameCount;

    public static SeccompMode Mode => s_mode;

    /// <summary>Compiles the filters for <paramref name="mode"/> (nothing for Off) and prepares the handler's native
    /// memory. Does not install anything yet.</summary>
    public static void Configure(SeccompMode mode, IEnumerable<SeccompFilter> filters)
    {
        lock (s_lock)
        {
            s_mode = mode;
            if (mode == SeccompMode.Off)
            {
                s_programs = null;
                return;
            }
            uint action = DefaultAction(mode);
            s_programs = filters.ToDictionary(f => f.Role, f => f.Compile(action));
            PrepareHandlerMemory();
        }
    }

    /// <summary>What a call outside the list gets in <paramref name="mode"/>.</summary>
    public static uint DefaultAction(SeccompMode mode) => mode == SeccompMode.Log ? Bpf.SECCOMP_RET_LOG : Bpf.SECCOMP_RET_TRAP;

    /// <summary>The main thread: installs the SIGSYS handler and the process filter on every thread of the process
    /// (SECCOMP_FILTER_FLAG_TSYNC: the runtime's own threads — finalizer, signal thread — exist already and would
    /// otherwise run unfiltered). PR_SET_NO_NEW_PRIVS first, once: an unprivileged process may only install a filter
    /// with it set, and an execve could otherwise gain privileges past the filter. TSYNC sets it on every thread it
    /// filters and a new thread inherits it, so a role thread's <see cref="Enter"/> need not set it again.
    /// No-op when not configured or Off.</summary>
    public static void InstallProcess(string threadName)
    {
        var program = ProgramFor(SeccompRole.Main);
        if (program is null)
            return;
        InstallSigsysHandler();
        SeccompThreads.StartSpawner();
        Register(SeccompRole.Main, threadName);
        JailCalls.SetNoNewPrivileges();
        Install(program, SECCOMP_FILTER_FLAG_TSYNC);
    }

    /// <summary>The calling thread takes on <paramref name="role"/>'s filter (on top of the process filter it
    /// inherited) and is entered in the table the SIGSYS report reads. No-op when not configured or Off.</summary>
    public static void Enter(SeccompRole role)
    {
        var program = ProgramFor(role);
        if (program is null)
            return;
        Register(role, Thread.CurrentThread.Name ?? "thread");
        Install(program, 0);
        SeccompThreads.MarkRole();
    }

    private static sock_filter[]? ProgramFor(SeccompRole role)
    {
        lock (s_lock)
            return s_programs is null ? null : s_programs.TryGetValue(role, out var p) ? p : throw new InvalidOperationException($"no seccomp filter for role {role}");
    }

    /// <summary>seccomp(SECCOMP_SET_MODE_FILTER) on the calling thread (all threads with TSYNC). The thread must
    /// have no_new_privs set (<see cref="InstallProcess"/> sets it for the process) or hold CAP_SYS_ADMIN.</summary>
    public static void Install(sock_filter[] program, uint flags)
    {
        fixed (sock_filter* f = program)
        {
            var fprog = new sock_fprog { len = (ushort)program.Length, filter = f };
            long r = syscall_errno(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, (long)&fprog, 0, 0);
            if (r != 0)
                throw new SyscallException("seccomp(SECCOMP_SET_MODE_FILTER)", Marshal.GetLastSystemError(),
                    r > 0 ? $"thread {r} has a filter this one does not descend from (TSYNC)" : null);
        }
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct sock_fprog
    {
        public ushort len;
        public sock_filter* filter;
    }

    private static void InstallSigsysHandler()
    {
        // SA_RESETHAND: SIGSYS is back to its default (terminate + core) as the handler starts, so the handler's own
        // tgkill ends the process; SA_NODEFER: not blocked inside the handler, so that signal is delivered at once.
        Tmds.Linux.sigaction act = default;
        act.sa_sigaction = (delegate* unmanaged<int, byte*, void*, void>)&OnSigsys;
        act.sa_flags = Tmds.Linux.LibC.SA_SIGINFO | Tmds.Linux.LibC.SA_NODEFER | Tmds.Linux.LibC.SA_RESETHAND;
        Tmds.Linux.LibC.sigemptyset(&act.sa_mask);
        if (Tmds.Linux.LibC.sigaction(SIGSYS, &act, null) != 0)
            throw new SyscallException("sigaction(SIGSYS)", Errno.Last);
    }

    private static void PrepareHandlerMemory()
    {
        if (s_table is not null)
            return;
        s_table = (byte*)NativeMemory.AllocZeroed(TableEntries * EntryBytes);
        s_line = (byte*)NativeMemory.AllocZeroed(LineBytes);
        var names = Syscalls.Names;
        int total = names.Sum(n => (n?.Length ?? 0) + 1);
        s_names = (byte*)NativeMemory.AllocZeroed((nuint)total);
        s_nameOffsets = (int*)NativeMemory.AllocZeroed((nuint)(names.Length * sizeof(int)));
        int at = 0;
        for (int i = 0; i < names.Length; i++)
        {
            s_nameOffsets[i] = at;
            at += Encoding.ASCII.GetBytes(names[i] ?? "", new Span<byte>(s_names + at, total - at)) + 1;
        }
        s_nameCount = names.Length;
    }

    /// <summary>Enters the calling thread's tid, role and name (a reused tid overwrites its old entry).</summary>
    private static void Register(SeccompRole role, string name)
    {
        lock (s_lock)
        {
            int tid = Sys.GetTid();
            int slot = -1;
            for (int i = 0; i < TableEntries && slot < 0; i++)
                if (*(int*)(s_table + i * EntryBytes) == tid)
                    slot = i;
            if (slot < 0)
                slot = s_next++ % TableEntries;
            byte* e = s_table + slot * EntryBytes;
            Volatile.Write(ref *(int*)e, 0);
            WriteAscii(new Span<byte>(e + 4, RoleBytes), RoleName(role));
            WriteAscii(new Span<byte>(e + 4 + RoleBytes, NameBytes), name);
            Volatile.Write(ref *(int*)e, tid);
        }
    }

    public static string RoleName(SeccompRole role) => role switch
    {
        SeccompRole.Main => "main",
        SeccompRole.Vcpu => "vCPU",
        SeccompRole.DeviceWorker => "device worker",
        SeccompRole.Api => "API",
        SeccompRole.Console => "console",
        _ => role.ToString(),
    };

    private static void WriteAscii(Span<byte> into, string s)
    {
        into.Clear();
        for (int i = 0; i < s.Length && i < into.Length - 1; i++)
            into[i] = s[i] < 0x80 && s[i] >= 0x20 ? (byte)s[i] : (byte)'?';
    }

    // ---- the SIGSYS handler: raw system calls and native memory only ----

    /// <summary>siginfo_t for SIGSYS: si_signo, si_errno, si_code, then (at 16) _call_addr, _syscall, _arch.</summary>
    [UnmanagedCallersOnly]
    private static void OnSigsys(int signal, byte* info, void* context)
    {
        int nr = *(int*)(info + 24);
        uint arch = *(uint*)(info + 28);
        int tid = (int)syscall(SYS_gettid, 0, 0, 0, 0, 0);
        byte* line = s_line;
        int n = 0;
        n = Append(line, n, "vmm: seccomp: thread '"u8);
        byte* entry = null;
        for (int i = 0; i < TableEntries && s_table is not null; i++)
            if (*(int*)(s_table + i * EntryBytes) == tid)
                entry = s_table + i * EntryBytes;
        if (entry is not null)
        {
            n = AppendZ(line, n, entry + 4 + RoleBytes, NameBytes);
            n = Append(line, n, "' ("u8);
            n = AppendZ(line, n, entry + 4, RoleBytes);
            n = Append(line, n, " filter) "u8);
        }
        else
        {
            n = AppendNumber(line, n, tid);
            n = Append(line, n, "' (a filter it inherited) "u8);
        }
        n = Append(line, n, "made a forbidden system call: "u8);
        if (arch == Bpf.AUDIT_ARCH_X86_64 && nr >= 0 && nr < s_nameCount && s_names[s_nameOffsets[nr]] != 0)
        {
            n = AppendZ(line, n, s_names + s_nameOffsets[nr], 64);
            n = Append(line, n, " ("u8);
            n = AppendNumber(line, n, nr);
            n = Append(line, n, ")"u8);
        }
        else
        {
            n = Append(line, n, "number "u8);
            n = AppendNumber(line, n, nr);
            n = Append(line, n, arch == Bpf.AUDIT_ARCH_X86_64 ? " (x32 or unknown)"u8 : " (not an x86-64 call)"u8);
        }
        n = Append(line, n, "; the VM was stopped\n"u8);
        syscall(SYS_write, 2, (long)line, n, 0, 0);
        int pid = (int)syscall(SYS_getpid, 0, 0, 0, 0, 0);
        syscall(SYS_tgkill, pid, tid, SIGSYS, 0, 0); // SA_RESETHAND made this SIG_DFL: the process dies here
        syscall(SYS_exit_group, 128 + SIGSYS, 0, 0, 0, 0); // not reached
    }

    private static int Append(byte* line, int n, ReadOnlySpan<byte> text)
    {
        for (int i = 0; i < text.Length && n < LineBytes - 1; i++)
            line[n++] = text[i];
        return n;
    }

    private static int AppendZ(byte* line, int n, byte* text, int max)
    {
        for (int i = 0; i < max && text[i] != 0 && n < LineBytes - 1; i++)
            line[n++] = text[i];
        return n;
    }

    private static int AppendNumber(byte* line, int n, int value)
    {
        byte* digits = stackalloc byte[12];
        int d = 0;
        uint v = value < 0 ? (uint)-value : (uint)value;
        do
        {
            digits[d++] = (byte)('0' + v % 10);
            v /= 10;
        } while (v != 0);
        if (value < 0 && n < LineBytes - 1)
            line[n++] = (byte)'-';
        while (d > 0 && n < LineBytes - 1)
            line[n++] = digits[--d];
        return n;
    }

    // Only for the SIGSYS handler. No GC transition: its calls never block (a write of one short line to stderr at
    // worst) and the handler must not enter the runtime's transition code from a signal.
    [DllImport("libc", EntryPoint = "syscall")]
    [SuppressGCTransition]
    private static extern long syscall(long number, long a1, long a2, long a3, long a4, long a5);

    /// <summary>For seccomp(2) itself, whose errno the caller reports.</summary>
    [DllImport("libc", EntryPoint = "syscall", SetLastError = true)]
    private static extern long syscall_errno(long number, long a1, long a2, long a3, long a4, long a5);
}
