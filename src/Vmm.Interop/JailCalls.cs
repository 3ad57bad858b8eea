using System.Runtime.InteropServices;
using System.Text;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>The system calls of `vmm jail` (namespaces, mounts, device nodes, credentials, capabilities,
/// landlock, execve), C names and x86-64 numbers; Tmds.LibC's declarations where it has them (errno in
/// <see cref="Errno.Last"/>). Each wrapper throws <see cref="SyscallException"/> naming the call and its path, so the
/// jailer's one error line says what failed where.</summary>
public static unsafe partial class JailCalls
{
    // <linux/sched.h>
    public const int CLONE_NEWNS = 0x00020000, CLONE_NEWUTS = 0x04000000, CLONE_NEWIPC = 0x08000000,
        CLONE_NEWNET = 0x40000000, CLONE_NEWPID = 0x20000000;

    // <linux/mount.h>
    public const ulong MS_RDONLY = 1, MS_NOSUID = 2, MS_NODEV = 4, MS_NOEXEC = 8, MS_REMOUNT = 32, MS_BIND = 4096,
        MS_MOVE = 8192, MS_REC = 16384, MS_PRIVATE = 1 << 18;
    public const int MNT_DETACH = 2;

    // <linux/prctl.h>
    private const int PR_CAPBSET_DROP = 24, PR_SET_NO_NEW_PRIVS = 38, PR_CAP_AMBIENT = 47, PR_CAP_AMBIENT_CLEAR_ALL = 4;

    // <linux/capability.h>
    private const uint _LINUX_CAPABILITY_VERSION_3 = 0x20080522;

    // x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl)
    private const int SYS_pivot_root = 155, SYS_capset = 126, SYS_landlock_create_ruleset = 444,
        SYS_landlock_add_rule = 445, SYS_landlock_restrict_self = 446;

    private static void Check(int result, string call, string? detail = null)
    {
        if (result < 0)
            throw new SyscallException(call, Errno.Last, detail);
    }

    public static void Unshare(int flags) => Check(LibC.unshare(flags), "unshare");

    public static void SetNetNamespace(string path)
    {
        int fd = Sys.Open(path, Sys.O_RDONLY | Sys.O_CLOEXEC);
        if (fd < 0)
            throw new SyscallException("open", Errno.Last, path);
        try
        {
            Check(LibC.setns(fd, CLONE_NEWNET), "setns", $"{path} (is it a network namespace, e.g. /var/run/netns/NAME?)");
        }
        finally
        {
            Sys.Close(fd);
        }
    }

    public static void SetHostname(string name)
    {
        byte[] b = Encoding.ASCII.GetBytes(name);
        fixed (byte* p = b)
            Check(LibC.sethostname(p, b.Length), "sethostname", name);
    }

    public static void Mount(string? source, string target, string? fsType, ulong flags, string? data = null)
    {
        byte[]? s = source is null ? null : CString.From(source), f = fsType is null ? null : CString.From(fsType), d = data is null ? null : CString.From(data);
        byte[] t = CString.From(target);
        fixed (byte* ps = s, pt = t, pf = f, pd = d)
            Check(LibC.mount(ps, pt, pf, (ulong_t)flags, pd), "mount", source is null ? target : $"{source} on {target}");
    }

    public static void Umount(string target, int flags)
    {
        byte[] t = CString.From(target);
        fixed (byte* p = t)
            Check(LibC.umount2(p, flags), "umount2", target);
    }

    /// <summary>pivot_root(new_root, put_old); the result or a negative errno (EINVAL when the current root is the
    /// initramfs rootfs, which cannot be pivoted away from: the caller then moves the jail onto / and chroots).</summary>
    public static int PivotRoot(string newRoot, string putOld)
    {
        byte[] n = CString.From(newRoot), o = CString.From(putOld);
        fixed (byte* pn = n, po = o)
        {
            long r = (long)LibC.syscall(SYS_pivot_root, pn, po);
            return r < 0 ? -Errno.Last : 0;
        }
    }

    public static void Chroot(string path)
    {
        byte[] b = CString.From(path);
        fixed (byte* p = b)
            Check(LibC.chroot(p), "chroot", path);
    }

    public static void Chdir(string path)
    {
        byte[] b = CString.From(path);
        fixed (byte* p = b)
            Check(LibC.chdir(p), "chdir", path);
    }

    /// <summary>A character device node with the device number <paramref name="rdev"/> (a host node's st_rdev) and
    /// the mode bits <paramref name="mode"/>, owned by <paramref name="uid"/>:<paramref name="gid"/>.</summary>
    public static void MakeCharDevice(string path, uint mode, ulong rdev, uint uid, uint gid)
    {
        byte[] b = CString.From(path);
        fixed (byte* p = b)
        {
            Check(LibC.mknod(p, LibC.S_IFCHR | (mode_t)mode, rdev), "mknod", path);
            Check(LibC.chmod(p, (mode_t)mode), "chmod", path); // mknod applies the umask
            Check(LibC.chown(p, uid, gid), "chown", path);
        }
    }

    public static void Chown(string path, uint uid, uint gid)
    {
        byte[] b = CString.From(path);
        fixed (byte* p = b)
            Check(LibC.chown(p, uid, gid), "chown", path);
    }

    /// <summary>Owner, group, st_mode and st_rdev (the device number of a device node) of <paramref name="path"/>
    /// (following links), or null when it does not exist.</summary>
    public static (uint Uid, uint Gid, uint Mode, ulong Rdev)? Stat(string path)
    {
        stat st;
        byte[] b = CString.From(path);
        fixed (byte* p = b)
        {
            if (LibC.stat(p, &st) != 0)
                return null;
        }
        return (st.st_uid, st.st_gid, (uint)st.st_mode, st.st_rdev);
    }

    public static uint EffectiveUid => LibC.geteuid();

    /// <summary>Removes every capability from the bounding set (needs CAP_SETPCAP, so before the uid changes).</summary>
    public static void DropBoundingSet(int lastCap)
    {
        for (int cap = 0; cap <= lastCap; cap++)
            Check(prctl(PR_CAPBSET_DROP, (nuint)cap, 0, 0, 0), "prctl(PR_CAPBSET_DROP)", cap.ToString());
    }

    /// <summary>setgroups(0), setresgid, setresuid: glibc applies each to every thread of the process.</summary>
    public static void SetIdentity(uint uid, uint gid)
    {
        Check(LibC.setgroups(0, null), "setgroups");
        Check(LibC.setresgid(gid, gid, gid), "setresgid", gid.ToString());
        Check(LibC.setresuid(uid, uid, uid), "setresuid", uid.ToString());
    }

    /// <summary>Clears the calling thread's effective, permitted and inheritable sets (capset) and its ambient set.</summary>
    public static void ClearCapabilities()
    {
        uint* header = stackalloc uint[2];
        header[0] = _LINUX_CAPABILITY_VERSION_3;
        header[1] = 0; // this thread
        uint* data = stackalloc uint[6]; // two __user_cap_data_struct {effective, permitted, inheritable}
        for (int i = 0; i < 6; i++)
            data[i] = 0;
        if ((long)LibC.syscall(SYS_capset, header, data) < 0)
            throw new SyscallException("capset", Errno.Last);
        Check(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)");
    }

    public static void SetNoNewPrivileges() => Check(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)");

    /// <summary>Replaces this process with <paramref name="path"/>; returns only by throwing.</summary>
    public static void Execve(string path, IReadOnlyList<string> argv, IReadOnlyList<string> envp)
    {
        byte[] file = CString.From(path);
        var handles = new List<GCHandle>();
        try
        {
            byte** av = stackalloc byte*[argv.Count + 1];
            byte** ev = stackalloc byte*[envp.Count + 1];
            for (int i = 0; i < argv.Count; i++)
            {
                var h = GCHandle.Alloc(CString.From(argv[i]), GCHandleType.Pinned);
                handles.Add(h);
                av[i] = (byte*)h.AddrOfPinnedObject();
            }
            av[argv.Count] = null;
            for (int i = 0; i < envp.Count; i++)
            {
                var h = GCHandle.Alloc(CString.From(envp[i]), GCHandleType.Pinned);
                handles.Add(h);
                ev[i] = (byte*)h.AddrOfPinnedObject();
            }
            ev[envp.Count] = null;
            fixed (byte* f = file)
                LibC.execve(f, av, ev);
            throw new SyscallException("execve", Errno.Last, path);
        }
        finally
        {
            foreach (var h in handles)
                h.Free();
        }
    }

    public static void Kill(int pid, int signal) => LibC.kill(pid, signal);

    private const int SYS_close_range = 436;
    private const uint CLOSE_RANGE_CLOEXEC = 4;

    /// <summary>Marks every descriptor from 3 up close-on-exec except <paramref name="keep"/>: whatever the caller left
    /// open (a directory fd outside the jail would be a way out of it) does not reach the jailed program.</summary>
    public static void CloseOnExecAbove2(IReadOnlyCollection<int> keep)
    {
        uint first = 3;
        foreach (int fd in keep.Where(f => f >= 3).Order())
        {
            if (fd > first)
                CloseRange(first, (uint)fd - 1);
            first = (uint)fd + 1;
        }
        CloseRange(first, uint.MaxValue);

        static void CloseRange(uint first, uint last)
        {
            if ((long)LibC.syscall(SYS_close_range, first, last, CLOSE_RANGE_CLOEXEC) < 0)
                throw new SyscallException("close_range", Errno.Last, $"{first}-{last}");
        }
    }

    // landlock(7): <linux/landlock.h>
    public const ulong LANDLOCK_ACCESS_FS_EXECUTE = 1 << 0, LANDLOCK_ACCESS_FS_WRITE_FILE = 1 << 1,
        LANDLOCK_ACCESS_FS_READ_FILE = 1 << 2, LANDLOCK_ACCESS_FS_READ_DIR = 1 << 3, LANDLOCK_ACCESS_FS_REMOVE_DIR = 1 << 4,
        LANDLOCK_ACCESS_FS_REMOVE_FILE = 1 << 5, LANDLOCK_ACCESS_FS_MAKE_CHAR = 1 << 6, LANDLOCK_ACCESS_FS_MAKE_DIR = 1 << 7,
        LANDLOCK_ACCESS_FS_MAKE_REG = 1 << 8, LANDLOCK_ACCESS_FS_MAKE_SOCK = 1 << 9, LANDLOCK_ACCESS_FS_MAKE_FIFO = 1 << 10,
        LANDLOCK_ACCESS_FS_MAKE_BLOCK = 1 << 11, LANDLOCK_ACCESS_FS_MAKE_SYM = 1 << 12, LANDLOCK_ACCESS_FS_REFER = 1 << 13,
        LANDLOCK_ACCESS_FS_TRUNCATE = 1 << 14, LANDLOCK_ACCESS_FS_IOCTL_DEV = 1 << 15;
    private const uint LANDLOCK_CREATE_RULESET_VERSION = 1;
    private const int LANDLOCK_RULE_PATH_BENEATH = 1;

    /// <summary>Every filesystem right the kernel's landlock ABI version knows (v1: 13 rights, v2 REFER, v3 TRUNCATE,
    /// v5 IOCTL_DEV); all of them are handled, so whatever a rule does not grant is denied.</summary>
    public static ulong LandlockFsRights(int abi) =>
        (LANDLOCK_ACCESS_FS_MAKE_SYM << 1) - 1
        | (abi >= 2 ? LANDLOCK_ACCESS_FS_REFER : 0)
        | (abi >= 3 ? LANDLOCK_ACCESS_FS_TRUNCATE : 0)
        | (abi >= 5 ? LANDLOCK_ACCESS_FS_IOCTL_DEV : 0);

    /// <summary>The kernel's landlock ABI version, or a negative errno (ENOSYS: not built; EOPNOTSUPP: not enabled
    /// at boot, i.e. not in the lsm= list).</summary>
    public static int LandlockAbiVersion()
    {
        long r = (long)LibC.syscall(SYS_landlock_create_ruleset, null, 0, LANDLOCK_CREATE_RULESET_VERSION);
        return r < 0 ? -Errno.Last : (int)r;
    }

    /// <summary>A ruleset handling <paramref name="handled"/>; its fd.</summary>
    public static int LandlockCreateRuleset(ulong handled)
    {
        ulong attr = handled; // struct landlock_ruleset_attr { __u64 handled_access_fs; ... }: the first field suffices
        long r = (long)LibC.syscall(SYS_landlock_create_ruleset, &attr, sizeof(ulong), 0);
        if (r < 0)
            throw new SyscallException("landlock_create_ruleset", Errno.Last);
        return (int)r;
    }

    [StructLayout(LayoutKind.Sequential, Pack = 1)]
    private struct landlock_path_beneath_attr
    {
        public ulong allowed_access;
        public int parent_fd;
    }

    /// <summary>Allows <paramref name="access"/> on <paramref name="path"/> and beneath it.</summary>
    public static void LandlockAllow(int ruleset, string path, ulong access)
    {
        int fd = Sys.Open(path, LibC.O_PATH | Sys.O_CLOEXEC);
        if (fd < 0)
            throw new SyscallException("open", Errno.Last, path);
        try
        {
            var attr = new landlock_path_beneath_attr { allowed_access = access, parent_fd = fd };
            if ((long)LibC.syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &attr, 0) < 0)
                throw new SyscallException("landlock_add_rule", Errno.Last, path);
        }
        finally
        {
            Sys.Close(fd);
        }
    }

    public static void LandlockRestrictSelf(int ruleset)
    {
        if ((long)LibC.syscall(SYS_landlock_restrict_self, ruleset, 0) < 0)
            throw new SyscallException("landlock_restrict_self", Errno.Last);
    }

    // Not in Tmds.LibC 0.5.
    [LibraryImport("libc", SetLastError = true)]
    private static partial int prctl(int option, nuint arg2, nuint arg3, nuint arg4, nuint arg5);
}
