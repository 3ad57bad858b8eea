using System.Globalization;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>Disk-image locking with QEMU's rule and QEMU's kind of lock, not (yet) its byte layout: an
/// open-file-description lock (F_OFD_SETLK) on the whole image — exclusive (write) for an image opened writable, shared
/// (read) for a read-only one — so two VMs never write the same image, and none reads an image another one writes.
/// QEMU locks single bytes (permissions at 100+n, refusals to share at 200+n): it refuses an image vmm holds, and vmm
/// refuses one QEMU holds writable, but a read-only vmm does not see a QEMU that started first and writes. OFD locks belong to the open file, not the process: they go with
/// the fd when it is closed (or the process dies), and two opens inside one process conflict as two processes do.</summary>
public static unsafe class ImageLock
{
    /// <summary>Takes the lock on <paramref name="fd"/>; null when it was granted, else why not, naming the holder when
    /// it can be found ("is locked for writing by pid 4242 (vmm)").</summary>
    public static string? TryLock(int fd, bool exclusive)
    {
        var request = new flock { l_type = (short)(exclusive ? LibC.F_WRLCK : LibC.F_RDLCK), l_whence = (short)LibC.SEEK_SET, l_start = 0, l_len = 0 };
        int r;
        do
            r = LibC.fcntl(fd, LibC.F_OFD_SETLK, &request);
        while (r < 0 && Errno.Last == Errno.EINTR);
        if (r == 0)
            return null;
        int errno = Errno.Last;
        if (errno != Errno.EAGAIN && errno != Errno.EACCES)
            return $"cannot be locked: {Errno.Describe(errno)}";
        // Who holds it: OFD locks show pid -1 in /proc/locks and F_OFD_GETLK, so look for the lock in the holders'
        // /proc/PID/fdinfo (readable for our own user's processes, all of them as root).
        var conflict = new flock { l_type = request.l_type, l_whence = (short)LibC.SEEK_SET };
        LibC.fcntl(fd, LibC.F_OFD_GETLK, &conflict);
        string mode = conflict.l_type == LibC.F_WRLCK ? "for writing" : "for reading";
        string holder = Holder(fd) is { } h ? $" by pid {h.Pid} ({h.Command})" : " by another process";
        return $"is locked {mode}{holder}: another VM (or QEMU) uses this image" +
            (exclusive ? "; two VMs must not write one image" : "");
    }

    private static (int Pid, string Command)? Holder(int fd)
    {
        statx st;
        byte empty = 0;
        if (LibC.statx(fd, &empty, 0x1000 /* AT_EMPTY_PATH */, LibC.STATX_INO, &st) < 0)
            return null;
        // fdinfo's lock line: "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:11658493 0 EOF" (device major:minor in hex).
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
                            continue; // our own fd lists the holder's lock too, as a blocked request it is not
                        if (HoldsLock(info, key))
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

    /// <summary>One fd's lock lines; an fd closed while we look (the holder's other threads open and close files)
    /// is skipped alone, not the rest of that process's fds.</summary>
    private static bool HoldsLock(string fdinfo, string key)
    {
        try
        {
            foreach (string line in File.ReadLines(fdinfo))
            {
                if (line.StartsWith("lock:", StringComparison.Ordinal) && line.Contains("OFDLCK", StringComparison.Ordinal)
                    && line.Contains(key, StringComparison.Ordinal))
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
