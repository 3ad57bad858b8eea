using Vmm.Interop;
using Vmm.Interop.Seccomp;
using static Vmm.Interop.KvmConstants;
using static Vmm.Interop.TunConstants;
using static Vmm.Interop.VfioConstants;

namespace Vmm.Machine;

/// <summary>Every seccomp filter vmm installs, in one place (issue 12; Firecracker's docs/seccomp.md is the model).
///
/// <para>How they combine. The main thread installs <see cref="Main"/> on every thread of the process (TSYNC)
/// before the first VM thread starts: the superset — what setting up and tearing down VMs, the API (its HTTP server
/// runs on the .NET thread pool, which also boots and hot-plugs VMs) and the runtime need. Each role thread then adds
/// its own filter at its start, before it touches guest data; filters stack and the stricter answer wins, so a role
/// can only take calls away. Role threads never create threads: their filters answer clone with EAGAIN (the thread
/// pool copes, late: see <see cref="SeccompThreads.Post"/>), and
/// vmm starts its own role threads through <see cref="SeccompThreads"/>' spawner, a thread under the main filter,
/// so a device worker the guest activates from a vCPU thread does not inherit the vCPU filter. clone3 answers
/// ENOSYS everywhere: glibc then falls back to clone, whose flags a filter can read (CLONE_THREAD required: no
/// fork).</para>
///
/// <para>What no filter allows: execve/execveat, ptrace, process_vm_readv/writev, fork/vfork, mount, pivot_root,
/// chroot, unshare/setns, kexec, modules, bpf, perf_event_open, keyctl, setuid and friends, reboot.</para>
///
/// <para>JIT builds (<c>dotnet run</c>, the CLI tests) load assemblies and compile methods on any thread at first
/// use; <see cref="JitRuntime"/> adds the read-only file calls that needs. The NativeAOT vmm (the KVM tests, the
/// release build) gets the lists without it.</para></summary>
public static class SeccompFilters
{
    private const ulong CLONE_THREAD = 0x10000;
    private const int SECCOMP_SET_MODE_FILTER = 1, PR_SET_NAME = 15, PR_GET_NAME = 16, PR_SET_VMA = 0x53564d41;
    private const int AF_UNIX = 1;
    private const ulong FIONBIO = 0x5421, FIONREAD = 0x541B, TCGETS = 0x5401, TCSETS = 0x5402, TIOCGWINSZ = 0x5413;

    /// <summary>The filters, one per role; <paramref name="jit"/> for a JIT build (<c>dotnet run</c>, <see cref="Vmm.Interop.Sys.RunsOnCoreClr"/>), where
    /// the runtime loads assemblies and compiles on every thread, false for NativeAOT.</summary>
    public static IReadOnlyList<SeccompFilter> All(bool jit) =>
    [
        Main(jit), Vcpu(jit), DeviceWorker(jit), Api(jit), Console(jit),
    ];

    private static SyscallRule R(string name, string why) => new(name, why);

    private static SyscallRule Args(string name, string why, params ArgMatch[][] when) => new(name, why, when);

    private static ArgMatch[] Is(int index, ulong value) => [new ArgMatch(index, value)];

    /// <summary>ioctl with one of <paramref name="requests"/> (the low 32 bits: the kernel's <c>unsigned int cmd</c>).</summary>
    private static SyscallRule Ioctl(string why, params ulong[] requests) =>
        new("ioctl", why, requests.Select(r => new[] { new ArgMatch(1, r, Low32: true) }).ToArray());

    /// <summary>What the .NET runtime does on any thread it runs managed code on, and what the SIGSYS handler needs.
    /// Measured with strace -f and --seccomp log (audit type 1326) on the demo and the KVM scenarios.</summary>
    private static IEnumerable<SyscallRule> RuntimeBase(bool jit)
    {
        yield return R("futex", "Monitor, locks, GC suspension, thread-pool semaphores");
        yield return R("write", "eventfd signals, log lines on stderr, the SIGSYS report");
        yield return R("read", "eventfd and pipe reads");
        yield return R("mmap", "GC heap growth, thread stacks, JIT code");
        yield return R("munmap", "GC decommit");
        yield return R("mprotect", "GC, stack guard pages, the JIT's W^X code pages");
        yield return R("madvise", "GC decommit (MADV_DONTNEED)");
        yield return R("mremap", "native realloc");
        yield return R("brk", "malloc");
        yield return R("membarrier", "GC thread suspension (FlushProcessWriteBuffers)");
        yield return R("sched_yield", "spin-waits");
        yield return R("sched_getaffinity", "Environment.ProcessorCount, GC heap affinity");
        yield return R("rt_sigprocmask", "the runtime's signal masks; the SIGSYS handler");
        yield return R("rt_sigreturn", "returning from the vCPU kick signal and the runtime's activation signal");
        yield return R("rt_sigaction", "the runtime's signal setup; the SIGSYS handler");
        yield return R("sigaltstack", "the runtime's per-thread alternate signal stack");
        yield return R("gettid", "thread identity (vCPU kick, SIGSYS report)");
        yield return R("getpid", "tgkill's first argument");
        yield return Args("tgkill", "GC/debugger thread activation, vCPU kicks, the SIGSYS handler's own kill: only this process",
            Is(0, (ulong)Environment.ProcessId));
        yield return R("exit", "a thread ends");
        yield return R("exit_group", "the process ends (also the SIGSYS handler's fallback)");
        yield return R("restart_syscall", "a call interrupted by a signal resumes");
        yield return R("nanosleep", "Thread.Sleep");
        yield return R("clock_nanosleep", "Thread.Sleep (glibc)");
        yield return R("clock_gettime", "Stopwatch, when the vDSO falls back");
        yield return R("gettimeofday", "DateTime, when the vDSO falls back");
        yield return R("getrusage", "per-thread CPU time (--stats)");
        yield return R("getcpu", "the thread pool's per-core queues (sched_getcpu when rseq is off)");
        yield return Args("prctl", "thread names (PR_SET_NAME/PR_GET_NAME), naming anonymous mappings (PR_SET_VMA)",
            Is(0, PR_SET_NAME), Is(0, PR_GET_NAME), Is(0, PR_SET_VMA));
        yield return R("close", "closing fds (eventfds at device reset, sockets)");
        yield return R("getrandom", "HashCode seeds, virtio-rng");
        yield return R("poll", "waiting on fds");
        yield return R("ppoll", "waiting on fds (glibc's poll)");
    }

    /// <summary>A role's filter: its list, then in a JIT build the JIT's file calls the list does not have yet.</summary>
    private static SeccompFilter Make(SeccompRole role, bool jit, IEnumerable<SyscallRule> rules)
    {
        var list = rules.ToList();
        if (jit)
            list.AddRange(JitRuntime().Where(j => list.All(r => r.Number != j.Number)));
        return new SeccompFilter(role, list);
    }

    /// <summary>A JIT build opens assemblies and reads runtime files lazily, on whichever thread first uses a type.</summary>
    private static IEnumerable<SyscallRule> JitRuntime()
    {
        yield return R("openat", "JIT build: loading an assembly at first use");
        yield return R("newfstatat", "JIT build: probing assembly paths");
        yield return R("fstat", "JIT build: sizing an assembly file");
        yield return R("stat", "JIT build: probing assembly paths");
        yield return R("lstat", "JIT build: probing assembly paths");
        yield return R("statx", "JIT build: probing assembly paths");
        yield return R("readlink", "JIT build: resolving assembly paths");
        yield return R("pread64", "JIT build: reading assembly headers");
        yield return R("lseek", "JIT build: reading assembly files");
        yield return R("access", "JIT build: probing assembly paths");
        yield return R("fcntl", "JIT build: the runtime's file handles");
        yield return R("pipe2", "JIT build: runtime thread start");
        yield return R("sched_setaffinity", "JIT build: runtime thread start");
        yield return R("getdents64", "JIT build: probing directories");
    }

    /// <summary>Role threads open no files. The runtime sometimes does, lazily, on whichever thread first needs a
    /// value: glibc's get_nprocs (behind Environment.ProcessorCount, ArrayPool's per-core stacks) reads
    /// /sys/devices/system/cpu/online and falls back to sched_getaffinity when that fails (seen on a virtio-net
    /// worker in the nested VM). So openat answers EACCES instead of killing: the file stays closed, the runtime
    /// copes. (A JIT build allows openat to load assemblies.)</summary>
    private static IEnumerable<SyscallRule> NoFiles(bool jit)
    {
        if (!jit)
            yield return new SyscallRule("openat", "EACCES: role threads open no files; the runtime's lazy probes fall back",
                Action: Interop.Seccomp.Bpf.SECCOMP_RET_ERRNO | Errno.EACCES);
    }

    /// <summary>Role threads never create threads (see the class comment): EAGAIN, which the runtime handles.</summary>
    private static IEnumerable<SyscallRule> NoThreads()
    {
        yield return new SyscallRule("clone", "role threads create no threads; the thread pool takes EAGAIN in stride (SeccompThreads.Post says at what cost)",
            Action: Interop.Seccomp.Bpf.SECCOMP_RET_ERRNO | Errno.EAGAIN);
        yield return new SyscallRule("clone3", "ENOSYS: glibc falls back to clone, which is refused above",
            Action: Interop.Seccomp.Bpf.SECCOMP_RET_ERRNO | Errno.ENOSYS);
    }

    private static IEnumerable<SyscallRule> Threads()
    {
        yield return Args("clone", "new threads only (CLONE_THREAD): no fork", [new ArgMatch(0, CLONE_THREAD, CLONE_THREAD)]);
        yield return new SyscallRule("clone3", "ENOSYS: glibc falls back to clone, whose flags the filter can check",
            Action: Interop.Seccomp.Bpf.SECCOMP_RET_ERRNO | Errno.ENOSYS);
        yield return R("set_robust_list", "a new thread's start (glibc)");
        yield return R("rseq", "a new thread's start (glibc)");
    }

    /// <summary>The ioctls a vCPU thread issues: KVM_RUN and the register reads of a crash report on its own fd;
    /// on the VM fd what the guest's device programming causes (MSI-X routes, irqfds, ioeventfds and BAR slots move
    /// when the guest reprograms a BAR, interrupt lines, MSIs); the tap's offloads and VFIO's interrupts when a
    /// driver starts a device.</summary>
    public static readonly ulong[] VcpuIoctls =
    [
        KVM_RUN, KVM_GET_REGS, KVM_SET_REGS, KVM_GET_SREGS, KVM_SET_SREGS, KVM_GET_FPU, KVM_GET_MSRS,
        KVM_GET_MP_STATE, KVM_SET_MP_STATE, KVM_KVMCLOCK_CTRL,
        KVM_IRQ_LINE, KVM_SIGNAL_MSI, KVM_SET_GSI_ROUTING, KVM_IRQFD, KVM_IOEVENTFD, KVM_SET_USER_MEMORY_REGION,
        TUNSETOFFLOAD, TUNSETVNETHDRSZ,
        VFIO_DEVICE_SET_IRQS, VFIO_DEVICE_RESET,
    ];

    /// <summary>vCPU: KVM_RUN and the device emulation its exits reach. No new fds besides eventfds (a device
    /// the driver starts gets its notifiers), no sockets, no files.</summary>
    public static SeccompFilter Vcpu(bool jit) => Make(SeccompRole.Vcpu, jit,
    [
        Ioctl("KVM_RUN first (the hot path), then only the requests listed in VcpuIoctls", VcpuIoctls),
        .. RuntimeBase(jit),
        .. NoThreads(),
        .. NoFiles(jit),
        R("pread64", "VFIO config-space and BAR reads (region offsets of the device fd)"),
        R("pwrite64", "VFIO config-space and BAR writes"),
        R("sendmsg", "vfio-user and vhost-user requests on their connected sockets (no new sockets)"),
        R("recvmsg", "vfio-user and vhost-user replies"),
        R("eventfd2", "notifiers for a device the driver starts (ioeventfds, irqfds)"),
    ]);

    /// <summary>Device workers (virtio queues: blk, net, console, rng, vsock; the vhost-user relay): the data path.
    /// Sockets only AF_UNIX (vsock connects the guest to PATH_port), no ioctls but FIONREAD/FIONBIO.</summary>
    public static SeccompFilter DeviceWorker(bool jit) => Make(SeccompRole.DeviceWorker, jit,
    [
        R("ppoll", "the worker's wait on its kick eventfds and extra fds"),
        .. RuntimeBase(jit).Where(r => r.Name != "ppoll"),
        .. NoThreads(),
        .. NoFiles(jit),
        R("pread64", "virtio-blk reads"),
        R("pwrite64", "virtio-blk writes"),
        R("preadv", "virtio-blk scatter reads"),
        R("pwritev", "virtio-blk scatter writes"),
        R("readv", "virtio-net receive from the tap"),
        R("writev", "virtio-net transmit to the tap"),
        R("fdatasync", "virtio-blk flush"),
        R("fsync", "virtio-blk flush on a block device"),
        R("fallocate", "virtio-blk discard and write-zeroes"),
        R("lseek", "image size"),
        R("fstat", "image size"),
        R("epoll_wait", "vsock: its connections' readiness"),
        R("epoll_pwait", "vsock: its connections' readiness (glibc)"),
        R("epoll_ctl", "vsock: connections come and go"),
        Args("socket", "vsock: a guest connecting to host port P reaches PATH_P (AF_UNIX only)", Is(0, AF_UNIX)),
        R("connect", "vsock: PATH_P"),
        R("accept4", "vsock: host clients on PATH"),
        R("accept", "vsock: host clients on PATH"),
        R("sendto", "vsock/vhost-user sockets"),
        R("recvfrom", "vsock/vhost-user sockets"),
        R("sendmsg", "vsock/vhost-user sockets"),
        R("recvmsg", "vsock/vhost-user sockets"),
        R("shutdown", "vsock: a half-closed stream"),
        R("getsockopt", "vsock: SO_ERROR after a non-blocking connect"),
        R("setsockopt", "vsock: socket buffer sizes"),
        R("fcntl", "vsock: non-blocking sockets"),
        Ioctl("interrupts: a vector's route is set when it first fires (KVM_SET_GSI_ROUTING), masking swaps irqfds, "
            + "INTx is an IRQ line; FIONREAD/FIONBIO on sockets",
            KVM_SET_GSI_ROUTING, KVM_IRQFD, KVM_IRQ_LINE, KVM_SIGNAL_MSI, FIONREAD, FIONBIO),
        R("eventfd2", "notifiers"),
    ]);

    /// <summary>Console threads (serial-out copies guest output to stdout or a file, serial-in reads stdin): plain
    /// reads and writes and the terminal's settings.</summary>
    public static SeccompFilter Console(bool jit) => Make(SeccompRole.Console, jit,
    [
        .. RuntimeBase(jit),
        .. NoThreads(),
        .. NoFiles(jit),
        R("writev", "stdout writes"),
        R("pwrite64", "--serial file: FileStream writes a regular file at its offset"),
        R("flock", "--serial file: FileStream's advisory lock (FileShare)"),
        R("fsync", "--serial file: flushing the file"),
        R("fcntl", "the input stream's flags"),
        R("lseek", "the stream position of a file"),
        R("fstat", "the stream's type"),
        Ioctl("terminal settings and size (raw mode)", TCGETS, TCSETS, TIOCGWINSZ, FIONREAD),
    ]);

    /// <summary>The API's own thread: the event monitor's writer. (The HTTP server runs on the thread pool, under
    /// <see cref="Main"/>: its handlers create, boot and hot-plug VMs.)</summary>
    public static SeccompFilter Api(bool jit) => Make(SeccompRole.Api, jit,
    [
        .. RuntimeBase(jit),
        .. NoThreads(),
        .. NoFiles(jit),
        R("writev", "event lines"),
        R("pwrite64", "event file: FileStream writes a regular file at its offset"),
        R("flock", "event file: FileStream's advisory lock (FileShare) on its first write"),
        R("fsync", "event file"),
        R("fcntl", "the output's flags"),
        R("lseek", "the output position"),
        R("fstat", "the output's type"),
    ]);

    /// <summary>The process: everything vmm does to build, run, control and tear down VMs, and what the runtime and
    /// the API need. A denylist would be shorter; an allow list says what vmm does.</summary>
    public static SeccompFilter Main(bool jit) => Make(SeccompRole.Main, jit,
    [
        Args("seccomp", "a role thread adds its filter (SECCOMP_SET_MODE_FILTER only: filters only take calls away)",
            Is(0, SECCOMP_SET_MODE_FILTER)),
        R("ioctl", "any request: KVM, VFIO, iommufd, tap and terminal setup (the vCPU filter names the few a vCPU may issue)"),
        .. Threads(),
        R("openat", "kernel, initrd, disks, /dev/kvm, /dev/net/tun, VFIO nodes, sysfs, config files"),
        R("open", "libc on older paths"),
        R("newfstatat", "path checks (regular file? block device?)"),
        R("fstat", "file sizes and types"),
        R("stat", "path checks"),
        R("lstat", "path checks"),
        R("statx", "path checks"),
        R("statfs", "the runtime's cgroup probing"),
        R("fstatfs", "file system type checks"),
        R("readlink", "sysfs links (VFIO iommu_group), /proc/self/exe"),
        R("readlinkat", "sysfs links"),
        R("access", "path probing"),
        R("faccessat", "path probing"),
        R("faccessat2", "path probing"),
        R("getdents64", "sysfs and /proc/self/fd listings (VFIO, the image-lock holder)"),
        R("pread64", "image and sysfs reads"),
        R("pwrite64", "image and VFIO writes"),
        R("preadv", "image reads"),
        R("pwritev", "image writes"),
        R("readv", "reads"),
        R("writev", "writes"),
        R("lseek", "file positions"),
        R("fcntl", "flags, OFD image locks (F_OFD_SETLK)"),
        R("flock", "locks"),
        R("ftruncate", "memfd sizing"),
        R("fallocate", "image discard"),
        R("fsync", "flush"),
        R("fdatasync", "flush"),
        R("memfd_create", "guest RAM"),
        R("eventfd2", "ioeventfds, irqfds, worker wake-ups"),
        R("epoll_create1", "vsock, the runtime's socket engine"),
        R("epoll_ctl", "vsock, the runtime's socket engine"),
        R("epoll_wait", "the runtime's socket engine"),
        R("epoll_pwait", "the runtime's socket engine"),
        R("pipe2", "the runtime's wake-up pipes"),
        R("dup", "fds handed over (--api-socket fd=N)"),
        R("dup3", "fds handed over"),
        R("unlink", "the API socket, vsock sockets"),
        R("unlinkat", "the API socket"),
        R("rename", "files"),
        R("mknodat", "the runtime's debugger pipes"),
        R("mkdir", "directories"),
        R("chmod", "the API socket's mode"),
        R("fchmod", "the API socket's mode"),
        R("fchmodat", "the API socket's mode"),
        R("getcwd", "relative paths"),
        R("uname", "the runtime's environment"),
        R("sysinfo", "the runtime's memory limits"),
        R("prlimit64", "the runtime's limits, RLIMIT_MEMLOCK for VFIO"),
        R("getrlimit", "limits"),
        R("setrlimit", "RLIMIT_MEMLOCK for VFIO"),
        R("get_mempolicy", "the GC's NUMA probe"),
        R("sched_setaffinity", "runtime thread start"),
        R("sched_getparam", "runtime thread priorities"),
        R("sched_getscheduler", "runtime thread priorities"),
        R("sched_setscheduler", "runtime thread priorities"),
        R("sched_get_priority_max", "runtime thread priorities"),
        R("sched_get_priority_min", "runtime thread priorities"),
        R("getsid", "the terminal"),
        R("getpgrp", "the terminal"),
        R("getppid", "the runtime"),
        R("getuid", "the runtime"),
        R("geteuid", "the runtime"),
        R("getgid", "the runtime"),
        R("getegid", "the runtime"),
        R("setpgid", "the terminal"),
        R("kill", "signals to this process's group (terminal job control)"),
        R("rt_sigtimedwait", "signal handling"),
        R("rt_sigsuspend", "signal handling"),
        R("socket", "the API socket, vhost-user and vfio-user connections, vsock listeners, tap setup"),
        R("socketpair", "the runtime's process and socket plumbing"),
        R("connect", "vhost-user, vfio-user, vsock"),
        R("bind", "the API socket, vsock listener"),
        R("listen", "the API socket, vsock listener"),
        R("accept", "API connections"),
        R("accept4", "API connections"),
        R("getsockname", "sockets"),
        R("getpeername", "sockets"),
        R("getsockopt", "sockets (peer credentials, SO_ERROR)"),
        R("setsockopt", "sockets"),
        R("sendto", "sockets"),
        R("recvfrom", "sockets"),
        R("sendmsg", "sockets with fds (vhost-user, vfio-user)"),
        R("recvmsg", "sockets with fds"),
        R("shutdown", "sockets"),
        R("timerfd_create", "timers"),
        R("timerfd_settime", "timers"),
        R("wait4", "never a child; the runtime's SIGCHLD handling"),
        R("set_tid_address", "thread start"),
        R("arch_prctl", "thread start"),
        R("select", "waits"),
        R("pselect6", "waits"),
        R("epoll_create", "the runtime's socket engine"),
        .. RuntimeBase(jit),
    ]);
}
