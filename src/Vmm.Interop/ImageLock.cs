using System.Globalization;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>Disk-image locking in QEMU's byte layout (block/file-posix.c, raw_apply_lock_bytes and
/// raw_check_lock_bytes; docs/system/qemu-block-drivers "Image locking"), so vmm and QEMU (qemu-system, qemu-img,
/// qemu-storage-daemon, qemu-nbd) see each other's locks, and two vmm instances see each other the same way.
/// <para>Every lock is a shared (F_RDLCK) open-file-description lock (F_OFD_SETLK) on one byte. QEMU's block
/// permissions are bits: 0 consistent read, 1 write, 2 write unchanged, 3 resize. A holder locks byte 100 + bit for
/// each permission it holds and byte 200 + bit for each permission it refuses to share. A newcomer first takes its own
/// bytes, then tests (F_OFD_GETLK with F_WRLCK: does anyone else hold a lock here?) byte 200 + bit for each permission
/// it wants (someone refuses it) and byte 100 + bit for each permission it refuses (someone holds it). Taking before
/// testing makes two openers racing each other both fail rather than both succeed.</para>
/// <para>vmm, writable: holds consistent read and write (100, 101), refuses write and resize (201, 203) — exactly what
/// QEMU's virtio-blk with share-rw=off does, except that QEMU shares resize (it follows a resize, vmm reads the size
/// once). vmm, read-only: holds consistent read (100), refuses write and resize (201, 203) — QEMU's readonly=on drive.
/// So: a writer excludes every other writer and reader; readers share with readers; a reader excludes writers; and the
/// same holds between vmm and QEMU in both orders (tested against qemu-system-x86_64).</para>
/// <para>OFD locks belong to the open file, not the process: they go with the fd when it is closed or the process
/// dies (SIGKILL included), and two opens inside one process conflict as two processes do. /proc/locks and
/// F_OFD_GETLK show pid -1 for them, so the holder is found in /proc/PID/fdinfo.</para></summary>
public static unsafe class ImageLock
{
    /// <summary>QEMU's lock offsets (block/file-posix.c RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE).</summary>
    private const int PermBase = 100, SharedBase = 200;

    /// <summary>QEMU's block permission bits (include/block/block-common.h, BLK_PERM_*) that vmm holds or refuses; bit 2
    /// is "write unchanged", named only in <see cref="s_permNames"/>.</summary>
    private const int ConsistentRead = 0, Write = 1, Resize = 3;

    private static readonly string[] s_permNames = ["consistent read", "write", "write unchanged", "resize"];

    /// <summary>The bytes vmm locks: (permissions held, permissions refused to others), as bit masks.</summary>
    private static (int Held, int Refused) Permissions(bool writable) =>
        ((1 << ConsistentRead) | (writable ? 1 << Write : 0), (1 << Write) | (1 << Resize));

    /// <summary>Takes the locks for an image opened <paramref name="writable"/> or read-only on <paramref name="fd"/>;
    /// null when granted, else why not, naming the holder when it can be found ("is locked for writing by pid 4242
    /// (qemu-system-x86)"). On a refusal the locks taken here are dropped again.</summary>
    public static string? TryLock(int fd, bool writable)
    {
        var (held, refused) = Permissions(writable);
        for (int bit = 0; bit < s_permNames.Length; bit++)
        {
            if ((held >> bit & 1) != 0 && Take(PermBase + bit) is string notHeld)
                return notHeld;
            if ((refused >> bit & 1) != 0 && Take(SharedBase + bit) is string notRefused)
                return notRefused;
        }
        // What someone else holds that we refuse, then what someone else refuses that we hold (either order is QEMU's
        // rule; this one names a writer as a writer rather than as "refuses writers").
        for (int bit = 0; bit < s_permNames.Length; bit++)
        {
            if ((refused >> bit & 1) != 0 && Conflicts(fd, PermBase + bit))
            {
                Unlock(fd);
                return Refusal(fd, PermBase + bit, bit switch
                {
                    Write => "is locked for writing",
                    Resize => "is locked for resizing",
                    _ => $"is locked for \"{s_permNames[bit]}\"",
                }, writable);
            }
        }
        for (int bit = 0; bit < s_permNames.Length; bit++)
        {
            if ((held >> bit & 1) != 0 && Conflicts(fd, SharedBase + bit))
            {
                Unlock(fd);
                return Refusal(fd, SharedBase + bit, bit == Write ? "is locked against writers"
                    : $"is locked against \"{s_permNames[bit]}\"", writable);
            }
        }
        return null;

        // Takes the shared lock on one byte: null when granted, else (all locks dropped again) why not.
        string? Take(int offset)
        {
            var request = Range(LibC.F_RDLCK, offset, 1);
            int errno = Fcntl(fd, LibC.F_OFD_SETLK, ref request);
            if (errno == 0)
                return null;
            Unlock(fd);
            // Only an exclusive lock blocks a shared one: not QEMU's (all shared) but, say, a whole-file flock-style holder.
            return errno is Errno.EAGAIN or Errno.EACCES ? Refusal(fd, offset, $"is locked (byte {offset})", writable)
                : $"cannot be locked: {Errno.Describe(errno)}";
        }
    }

    private static string Refusal(int fd, int offset, string what, bool writable)
    {
        string holder = Holder(fd, offset) is { } h ? $" by pid {h.Pid} ({h.Command})" : " by another process";
        return $"{what}{holder}: another VM (or QEMU) uses this image" + (writable ? "; two VMs must not write one image" : "");
    }

    /// <summary>Whether an open file other than <paramref name="fd"/>'s holds a lock on byte <paramref name="offset"/>.</summary>
    private static bool Conflicts(int fd, int offset)
    {
        var probe = Range(LibC.F_WRLCK, offset, 1);
        return Fcntl(fd, LibC.F_OFD_GETLK, ref probe) == 0 && probe.l_type != LibC.F_UNLCK;
    }

    /// <summary>Drops every lock <see cref="TryLock"/> took on <paramref name="fd"/>. Closing the fd does the same only
    /// when it is the open file's last fd: a process forked meanwhile (by any thread) holds a copy until its exec
    /// closes it, and the image would stay locked that long.</summary>
    public static void Unlock(int fd)
    {
        var all = Range(LibC.F_UNLCK, PermBase, SharedBase + 100 - PermBase);
        Fcntl(fd, LibC.F_OFD_SETLK, ref all);
    }

    private static flock Range(int type, long start, long length) =>
        new() { l_type = (short)type, l_whence = (short)LibC.SEEK_SET, l_start = start, l_len = length, l_pid = 0 };

    /// <summary>fcntl with a struct flock, retried on EINTR; 0 or the errno.</summary>
    private static int Fcntl(int fd, int command, ref flock request)
    {
        int r;
        fixed (flock* p = &request)
        {
            do
                r = LibC.fcntl(fd, command, p);
            while (r < 0 && Errno.Last == Errno.EINTR);
        }
        return r < 0 ? Errno.Last : 0;
    }

    /// <summary>The process with a lock on byte <paramref name="offset"/> of <paramref name="fd"/>'s file through an
    /// open file other than <paramref name="fd"/>.</summary>
    private static (int Pid, string Command)? Holder(int fd, int offset)
    {
        statx st;
        byte empty = 0;
        if (LibC.statx(fd, &empty, 0x1000 /* AT_EMPTY_PATH */, LibC.STATX_INO, &st) < 0)
            return null;
        // fdinfo's lock line: "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:11658493 100 101" (device major:minor in hex,
        // then the first and last byte, or EOF).
        string key = $" {st.stx_dev_major:x2}:{st.stx_dev_minor:x2}:{st.stx_ino} ";
        try
        {
            foreach (string proc in Directory.EnumerateDirectories("/proc"))
            {
                if (!int.TryParse(Path.GetFileName(proc), NumberStyles.None, CultureInfo.InvariantCulture, out int pid))
                    continue;
                try
                {
                    foreach (string info in Directory.EnumerateFiles(Path.Combine(proc, "fdinfo")))
                    {
                        if (pid == Environment.ProcessId && Path.GetFileName(info) == fd.ToString(CultureInfo.InvariantCulture))
                            continue; // our own locks on the same bytes do not conflict with us
                        if (HoldsLock(info, key, offset))
                            return (pid, Command(proc));
                    }
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    // a process that ended meanwhile, or one we may not look into
                }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
        return null;
    }

    /// <summary>Whether one fd holds an OFD lock of the file <paramref name="key"/> covering byte <paramref name="offset"/>;
    /// an fd closed while we look (the holder's other threads open and close files) is skipped alone, not the rest of
    /// that process's fds.</summary>
    private static bool HoldsLock(string fdinfo, string key, int offset)
    {
        try
        {
            foreach (string line in File.ReadLines(fdinfo))
            {
                int at = line.IndexOf(key, StringComparison.Ordinal);
                if (!line.StartsWith("lock:", StringComparison.Ordinal) || !line.Contains("OFDLCK", StringComparison.Ordinal) || at < 0)
                    continue;
                string[] range = line[(at + key.Length)..].Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (range.Length >= 2 && long.TryParse(range[0], NumberStyles.None, CultureInfo.InvariantCulture, out long first)
                    && (range[1] == "EOF" || long.TryParse(range[1], NumberStyles.None, CultureInfo.InvariantCulture, out long last) && offset <= last)
                    && first <= offset)
                    return true;
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
        return false;
    }

    private static string Command(string proc)
    {
        try
        {
            return File.ReadAllText(Path.Combine(proc, "comm")).Trim();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return "?";
        }
    }
}
