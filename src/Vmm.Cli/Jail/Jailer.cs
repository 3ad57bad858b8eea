using System.Diagnostics;
using System.Runtime.InteropServices;
using Tmds.Linux;
using Vmm.Interop;

namespace Vmm.Cli.Jail;

/// <summary>A jail failure that is the host's or the system's, not the options': exit status 12, one line.</summary>
public sealed class JailException(string message) : Exception(message);

/// <summary>`vmm jail`: runs `vmm run` as Firecracker's jailer runs firecracker, in two processes.
///
/// The parent (this process, as root) checks the options and files, makes the jail directory, copies the executable
/// into it, sets the rlimits and the cgroup, then unshares a PID namespace on its main thread and starts itself again
/// as the child (the runtime forks and execs natively; a .NET process cannot fork safely from managed code, and an
/// unshared PID namespace applies to the children of the calling thread only). The child is PID 1 of the new PID
/// namespace: it joins the VM's cgroup, unshares mount, IPC, UTS (and network) namespaces — its own mount namespace,
/// since pivot_root moves every process of a namespace whose root is the old one — bind-mounts what the VM needs,
/// makes the device nodes and a /proc for its PID namespace, pivot_roots into the jail, drops to the given uid/gid
/// with no capabilities and no_new_privs, restricts itself with landlock, and execve's the jailed vmm with `run …`
/// (execve ends the runtime's other threads; the landlock domain and no_new_privs survive it). The parent waits,
/// forwards SIGTERM/SIGINT/SIGHUP, and exits with the child's status.</summary>
public static class Jailer
{
    /// <summary>The hidden first argument of the child (never typed by a user).</summary>
    public const string ChildCommand = "__jail-child";

    /// <summary>The test hook: the jailed `vmm run` tries to open each listed path and prints the result in one line.</summary>
    public const string ProbeVariable = "VMM_TEST_JAIL_PROBE";

    private static void Say(string message) => Console.Error.WriteLine("vmm: jail: " + message);

    /// <summary>`vmm jail …` (the arguments after "jail").</summary>
    public static int Run(string[] args) => ReportingErrors(() => Parent(JailOptions.Parse(args), args));

    /// <summary>Parent and child report their errors alike: a bad option is a usage error (status 2), a jail that
    /// cannot be built is one line naming the call and path (status 12).</summary>
    private static int ReportingErrors(Func<int> body)
    {
        try
        {
            return body();
        }
        catch (UsageException e)
        {
            Console.Error.WriteLine("vmm: error: " + e.Message);
            return ExitStatus.Usage;
        }
        catch (Exception e) when (e is JailException or SyscallException or IOException or UnauthorizedAccessException)
        {
            Console.Error.WriteLine("vmm: error: jail: " + e.Message);
            return ExitStatus.VmmError;
        }
    }

    private static int Parent(JailOptions o, string[] args)
    {
        if (!OperatingSystem.IsLinux())
            throw new PlatformNotSupportedException("vmm runs on Linux");
        if (Sys.RunsOnCoreClr)
            throw new UsageException("jail: needs the native vmm executable (dotnet publish src/Vmm.Cli -c Release): this vmm runs on the .NET runtime, which a jail does not hold");
        if (JailCalls.EffectiveUid != 0)
            throw new UsageException("jail: must be started as root (it mounts, makes device nodes and changes user)");
        string exec = Path.GetFullPath(o.ExecFile ?? Environment.ProcessPath!);
        if (!File.Exists(exec))
            throw new UsageException($"jail: --exec-file {exec}: no such file");
        if (o.NetNs is not null && !File.Exists(o.NetNs))
            throw new UsageException($"jail: --netns {o.NetNs}: no such file (a network namespace, e.g. /var/run/netns/NAME)");
        var plan = PlanFor(o, exec);
        CheckFiles(o, plan);

        Directory.CreateDirectory(o.RootDir);
        string jailedExec = o.RootDir + JailPlan.ExecPath;
        File.Copy(exec, jailedExec, overwrite: true); // a copy, as Firecracker's jailer makes: the jailed vmm cannot change the host's
        File.SetUnixFileMode(jailedExec, UnixFileMode.UserRead | UnixFileMode.UserExecute | UnixFileMode.GroupRead | UnixFileMode.GroupExecute | UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
        foreach (string path in plan.CreateIfMissing.Where(p => !File.Exists(p)))
        {
            using (File.Create(path)) { }
            File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            JailCalls.Chown(path, o.Uid, o.Gid);
        }

        SetResourceLimits(o, plan);
        string? cgroup = Cgroup.Create(o);

        // Signals are forwarded to the jailed vmm, which stops the VM in order; its status becomes ours. Registering
        // them first also starts the runtime's signal thread now, before the PID namespace is unshared.
        int childPid = 0;
        var signals = new List<PosixSignalRegistration>();
        foreach (var signal in new[] { PosixSignal.SIGTERM, PosixSignal.SIGINT, PosixSignal.SIGHUP })
        {
            signals.Add(PosixSignalRegistration.Create(signal, ctx =>
            {
                ctx.Cancel = true;
                if (Volatile.Read(ref childPid) is > 0 and int pid)
                    JailCalls.Kill(pid, SignalNumber(ctx.Signal));
            }));
        }
        var psi = new ProcessStartInfo(Environment.ProcessPath!) { UseShellExecute = false };
        psi.ArgumentList.Add(ChildCommand);
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        using var child = StartInNewPidNamespace(psi);
        Volatile.Write(ref childPid, child.Id);
        string pidFile = Path.Combine(o.RootDir, "vmm.pid");
        File.WriteAllText(pidFile, child.Id + "\n");
        child.WaitForExit();
        foreach (var s in signals)
            s.Dispose();
        File.Delete(pidFile);
        if (cgroup is not null)
        {
            try
            {
                Directory.Delete(cgroup); // empty now that its processes are gone
            }
            catch (IOException)
            {
            }
        }
        return child.ExitCode;
    }

    /// <summary>unshare(CLONE_NEWPID) makes the calling thread's later children start in a new PID namespace, and
    /// forbids that thread to create threads (clone with CLONE_THREAD fails with EINVAL): so a thread of its own
    /// unshares and starts the child (the runtime forks from the calling thread), and ends.</summary>
    private static Process StartInNewPidNamespace(ProcessStartInfo psi)
    {
        Process? child = null;
        Exception? error = null;
        var thread = new Thread(() =>
        {
            try
            {
                JailCalls.Unshare(JailCalls.CLONE_NEWPID);
                child = Process.Start(psi);
            }
            catch (Exception e)
            {
                error = e;
            }
        }, 256 * 1024) { Name = "jail-start" };
        thread.Start();
        thread.Join();
        if (error is not null)
            throw error is SyscallException or JailException ? error : new JailException($"starting the jail's first process: {error.Message}");
        return child ?? throw new JailException("the jail's first process did not start");
    }

    private static int SignalNumber(PosixSignal s) => s switch
    {
        PosixSignal.SIGHUP => 1,
        PosixSignal.SIGINT => 2,
        _ => 15,
    };

    /// <summary>The plan, with the libraries the executable needs: its ELF interpreter and the shared objects this
    /// process has mapped (the jailed vmm is this program: the same libc, libm and loader).</summary>
    public static JailPlan PlanFor(JailOptions o, string exec)
    {
        var libs = new SortedSet<string>(StringComparer.Ordinal);
        foreach (string line in File.ReadLines("/proc/self/maps"))
        {
            int slash = line.IndexOf('/');
            if (slash < 0)
                continue;
            string path = line[slash..];
            if (path.Contains(".so", StringComparison.Ordinal) && !path.EndsWith(" (deleted)", StringComparison.Ordinal) && File.Exists(path))
                libs.Add(path);
        }
        if (ElfInterpreter(exec) is { } interp)
            libs.Add(interp);
        return JailPlan.Build(o.VmArgs, Environment.CurrentDirectory, libs, Path.Exists);
    }

    /// <summary>PT_INTERP of an ELF64 executable (e.g. /lib64/ld-linux-x86-64.so.2), or null for a static one.</summary>
    public static string? ElfInterpreter(string path)
    {
        using var f = File.OpenRead(path);
        var header = new byte[64];
        if (f.Read(header) < 64 || header[0] != 0x7F || header[1] != 'E' || header[2] != 'L' || header[3] != 'F' || header[4] != 2)
            throw new UsageException($"jail: --exec-file {path}: not a 64-bit ELF executable");
        long phoff = BitConverter.ToInt64(header, 32);
        int phentsize = BitConverter.ToUInt16(header, 54), phnum = BitConverter.ToUInt16(header, 56);
        var ph = new byte[phentsize];
        for (int i = 0; i < phnum; i++)
        {
            f.Position = phoff + (long)i * phentsize;
            if (f.Read(ph) < phentsize || phentsize < 56)
                break;
            if (BitConverter.ToUInt32(ph, 0) != 3) // PT_INTERP
                continue;
            long offset = BitConverter.ToInt64(ph, 8), size = BitConverter.ToInt64(ph, 32);
            if (size is <= 1 or > 4096)
                return null;
            var name = new byte[size];
            f.Position = offset;
            f.ReadExactly(name);
            return System.Text.Encoding.UTF8.GetString(name, 0, (int)size - 1);
        }
        return null;
    }

    /// <summary>Each file the VM gets must exist and be usable by the jail user as the VM will use it: the binds
    /// bypass the directories above it, but not the file's own mode.</summary>
    private static void CheckFiles(JailOptions o, JailPlan plan)
    {
        foreach (var b in plan.Binds)
        {
            if (b.Option == "library" || b.Option.StartsWith("--device vfio", StringComparison.Ordinal))
                continue;
            if (plan.CreateIfMissing.Contains(b.HostPath) && !File.Exists(b.HostPath))
            {
                if (!Directory.Exists(Path.GetDirectoryName(b.HostPath)))
                    throw new UsageException($"jail: {b.Option} {b.HostPath}: its directory does not exist");
                continue;
            }
            var st = JailCalls.Stat(b.HostPath);
            uint type = (st?.Mode ?? 0) & (uint)LibC.S_IFMT;
            if (st is null || b.IsDirectory != (type == (uint)LibC.S_IFDIR))
                throw new UsageException($"jail: {b.Option} {b.HostPath}: {(st is null ? b.IsDirectory ? "no such directory" : "no such file" : b.IsDirectory ? "not a directory" : "is a directory")}");
            var (owner, group, mode, _) = st.Value;
            bool r = Allowed(o, owner, group, mode, 4), w = Allowed(o, owner, group, mode, 2), x = Allowed(o, owner, group, mode, 1);
            string? missing = b.IsDirectory
                ? (b.Rights.HasFlag(JailRights.MakeSocket) && !(w && x) ? "write and search (sockets are made there)" : null)
                : !r && b.Rights.HasFlag(JailRights.Read) && type != (uint)LibC.S_IFSOCK ? "read"
                : !w && b.Rights.HasFlag(JailRights.Write) ? "write" : null;
            if (missing is not null)
                throw new UsageException($"jail: {b.Option} {b.HostPath}: uid {o.Uid} gid {o.Gid} may not {missing} it (owner {owner}:{group}, mode {Convert.ToString(mode & 0xFFF, 8)}); chown or chmod it{(b.Rights.HasFlag(JailRights.Write) && b.Option == "--disk" ? ", or give readonly=on" : "")}");
        }
    }

    private static bool Allowed(JailOptions o, uint owner, uint group, uint mode, uint bit) =>
        owner == o.Uid ? (mode & (bit << 6)) != 0 : group == o.Gid ? (mode & (bit << 3)) != 0 : (mode & bit) != 0;

    private static void SetResourceLimits(JailOptions o, JailPlan plan)
    {
        ulong nofile = o.ResourceLimits.TryGetValue("no-file", out ulong n) ? n : JailOptions.DefaultNoFile;
        Set(FdCalls.RLIMIT_NOFILE, nofile, nofile, $"no-file={nofile}");
        if (o.ResourceLimits.TryGetValue("fsize", out ulong fsize))
            Set(FdCalls.RLIMIT_FSIZE, fsize, fsize, $"fsize={fsize}");
        // VFIO pins all guest RAM for the device's DMA and charges it to RLIMIT_MEMLOCK: raise it that far, no further.
        if (plan.MemlockBytes is ulong memlock)
        {
            int r = FdCalls.GetRlimit(FdCalls.RLIMIT_MEMLOCK, out ulong soft, out ulong hard);
            if (r < 0)
                throw new SyscallException("getrlimit", -r, "RLIMIT_MEMLOCK");
            if (soft < memlock)
                Set(FdCalls.RLIMIT_MEMLOCK, memlock, Math.Max(hard, memlock), $"memlock={memlock} (guest RAM, pinned for VFIO)");
        }

        static void Set(int resource, ulong soft, ulong hard, string name)
        {
            int r = FdCalls.SetRlimit(resource, soft, hard);
            if (r < 0)
                throw new SyscallException("setrlimit", -r, name);
        }
    }

    /// <summary>The child: PID 1 of the new PID namespace, still root; builds the jail, enters it, drops everything
    /// and execve's the jailed vmm. Returns only on failure.</summary>
    public static int Child(string[] args) => ReportingErrors(() =>
    {
        var o = JailOptions.Parse(args);
        var plan = PlanFor(o, Path.GetFullPath(o.ExecFile ?? Environment.ProcessPath!));
        Enter(o, plan);
        return ExitStatus.VmmError; // not reached: Enter execve's or throws
    });

    private static void Enter(JailOptions o, JailPlan plan)
    {
        // Into the VM's cgroup before anything else, so all it does from here on is accounted and limited.
        Cgroup.Join(o);
        if (o.NetNs is not null)
            JailCalls.SetNetNamespace(o.NetNs);
        JailCalls.Unshare(JailCalls.CLONE_NEWNS | JailCalls.CLONE_NEWIPC | JailCalls.CLONE_NEWUTS | (o.NewNetNs ? JailCalls.CLONE_NEWNET : 0));
        JailCalls.SetHostname(o.Id);
        // No mount event of the jail may reach the host's namespace, nor the host's reach the jail.
        JailCalls.Mount(null, "/", null, JailCalls.MS_REC | JailCalls.MS_PRIVATE);
        string root = o.RootDir;
        JailCalls.Mount(root, root, null, JailCalls.MS_BIND); // pivot_root needs the new root to be a mount point

        foreach (var b in plan.Binds)
        {
            string target = root + b.JailPath;
            Directory.CreateDirectory(Path.GetDirectoryName(target)!);
            if (b.IsDirectory)
                Directory.CreateDirectory(target);
            else if (!File.Exists(target))
                using (File.Create(target)) { }
            ulong flags = JailCalls.MS_NOSUID | JailCalls.MS_NODEV | (b.ReadOnly ? JailCalls.MS_RDONLY : 0)
                | (b.Rights.HasFlag(JailRights.Execute) ? 0 : JailCalls.MS_NOEXEC);
            JailCalls.Mount(b.HostPath, target, null, JailCalls.MS_BIND | (b.IsDirectory ? JailCalls.MS_REC : 0));
            JailCalls.Mount(null, target, null, JailCalls.MS_REMOUNT | JailCalls.MS_BIND | flags);
        }

        // /dev: a small tmpfs private to this mount namespace, holding only the nodes the VM needs.
        Directory.CreateDirectory(root + "/dev");
        JailCalls.Mount("tmpfs", root + "/dev", "tmpfs", JailCalls.MS_NOSUID | JailCalls.MS_NOEXEC, "mode=755,size=64k");
        foreach (var d in plan.Devices)
        {
            if (JailCalls.Stat(d.HostPath) is not { } st || (st.Mode & (uint)LibC.S_IFMT) != (uint)LibC.S_IFCHR)
                throw new JailException($"{d.HostPath} is missing or not a character device on the host");
            Directory.CreateDirectory(Path.GetDirectoryName(root + d.JailPath)!);
            JailCalls.MakeCharDevice(root + d.JailPath, d.Shared ? 0x1B6u : 0x180u, st.Rdev, d.Shared ? 0 : o.Uid, d.Shared ? 0 : o.Gid);
        }
        int lastCap = int.Parse(File.ReadAllText("/proc/sys/kernel/cap_last_cap").Trim());

        // A /proc of the new PID namespace: the jailed vmm sees itself as PID 1 and no host process.
        Directory.CreateDirectory(root + "/proc");
        JailCalls.Mount("proc", root + "/proc", "proc", JailCalls.MS_NOSUID | JailCalls.MS_NODEV | JailCalls.MS_NOEXEC);

        JailCalls.Chdir(root);
        int pivot = JailCalls.PivotRoot(".", ".");
        if (pivot == 0)
        {
            // pivot_root(".", "."): the old root now sits on top of the new one; detach it and every host mount with it.
            JailCalls.Umount(".", JailCalls.MNT_DETACH);
        }
        else if (pivot == -Errno.EINVAL && IsRootfs())
        {
            // The initramfs rootfs cannot be pivoted away from (pivot_root(2)); move the jail over / and chroot into
            // it, as switch_root and runc do there. With no capabilities left there is no way back out.
            Say("/ is the initramfs (rootfs), which pivot_root cannot leave: the jail is moved onto / and chrooted instead");
            JailCalls.Mount(root, "/", null, JailCalls.MS_MOVE);
            JailCalls.Chroot(".");
        }
        else
        {
            throw new SyscallException("pivot_root", -pivot, root);
        }
        JailCalls.Chdir("/");

        // Privileges, in the order that keeps each step possible: the bounding set needs CAP_SETPCAP, so it goes first.
        JailCalls.DropBoundingSet(lastCap);
        JailCalls.SetIdentity(o.Uid, o.Gid);
        JailCalls.ClearCapabilities();
        JailCalls.SetNoNewPrivileges();
        Landlock(plan);

        // As Firecracker's jailer closes every descriptor but stdin, stdout and stderr: those vmm is told to use
        // (--api-socket fd=N, --event-monitor fd=N) stay open, nothing else the caller left open crosses into the jail.
        JailCalls.CloseOnExecAbove2(plan.InheritedFds);
        var env = new List<string>();
        if (Environment.GetEnvironmentVariable(ProbeVariable) is { } probe)
            env.Add($"{ProbeVariable}={probe}");
        JailCalls.Execve(JailPlan.ExecPath, ["vmm", .. plan.RunArgs], env);
    }

    private static bool IsRootfs()
    {
        foreach (string line in File.ReadLines("/proc/self/mountinfo"))
        {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ... - FSTYPE SOURCE SUPER"
            var parts = line.Split(' ');
            int dash = Array.IndexOf(parts, "-");
            if (parts.Length > 4 && parts[4] == "/" && dash > 0 && dash + 1 < parts.Length)
                return parts[dash + 1] == "rootfs";
        }
        return false;
    }

    /// <summary>landlock(7): everything in the jail may be read; only the executable and its libraries executed;
    /// only the device nodes, the writable files and the socket directories written; nothing made anywhere but the
    /// sockets. Every right the kernel knows is handled, so the rest is denied even where file modes would allow it.</summary>
    private static void Landlock(JailPlan plan)
    {
        int abi = JailCalls.LandlockAbiVersion();
        if (abi < 0)
        {
            Say($"landlock is not available ({Errno.Name(-abi)}: {(-abi == Errno.ENOSYS ? "not built into this kernel" : "not enabled, see lsm= in /sys/kernel/security/lsm")}); the jail relies on its namespaces, pivot_root and the dropped privileges alone");
            return;
        }
        ulong handled = JailCalls.LandlockFsRights(abi);
        ulong truncate = handled & JailCalls.LANDLOCK_ACCESS_FS_TRUNCATE, ioctl = handled & JailCalls.LANDLOCK_ACCESS_FS_IOCTL_DEV;
        const ulong read = JailCalls.LANDLOCK_ACCESS_FS_READ_FILE, readDir = JailCalls.LANDLOCK_ACCESS_FS_READ_DIR,
            write = JailCalls.LANDLOCK_ACCESS_FS_WRITE_FILE, exec = JailCalls.LANDLOCK_ACCESS_FS_EXECUTE;
        int ruleset = JailCalls.LandlockCreateRuleset(handled);
        try
        {
            JailCalls.LandlockAllow(ruleset, "/", read | readDir);
            JailCalls.LandlockAllow(ruleset, JailPlan.ExecPath, read | exec);
            JailCalls.LandlockAllow(ruleset, "/dev", read | write | ioctl);
            foreach (var b in plan.Binds)
            {
                ulong access = 0;
                if (b.Rights.HasFlag(JailRights.Execute))
                    access |= read | exec;
                if (b.Rights.HasFlag(JailRights.Write) && !b.IsDirectory)
                    access |= read | write | truncate;
                if (b.Rights.HasFlag(JailRights.MakeSocket))
                    access |= read | readDir | JailCalls.LANDLOCK_ACCESS_FS_MAKE_SOCK | JailCalls.LANDLOCK_ACCESS_FS_REMOVE_FILE;
                if (access != 0)
                    JailCalls.LandlockAllow(ruleset, b.JailPath, access);
            }
            JailCalls.LandlockRestrictSelf(ruleset);
        }
        finally
        {
            Sys.Close(ruleset);
        }
    }
}
