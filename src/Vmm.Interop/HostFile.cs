using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>A host file that cannot be read as the caller asked: the message says why in words a user acts on ("is a
/// directory", "is a character device, not a regular file"), without the path (the caller puts the option and path
/// in front).</summary>
public sealed class HostFileException(string message) : IOException(message);

/// <summary>Reads whole host files the user names (kernel, initrd, config files) the careful way: only a regular file,
/// checked on the opened fd (so nothing can be swapped in between), opened non-blocking (a FIFO neither hangs the
/// open nor the read), never more than the caller's bound (so <c>/dev/zero</c> or a huge file is refused at once
/// instead of filling memory), and exactly the size <c>statx</c> reported.</summary>
public static unsafe class HostFile
{
    private const int AT_EMPTY_PATH = 0x1000, ENOTDIR = 20, ELOOP = 40;

    /// <summary>The contents of the regular file at <paramref name="path"/>, at most <paramref name="maxBytes"/>.</summary>
    public static byte[] ReadRegular(string path, long maxBytes)
    {
        int fd = Sys.Open(path, Sys.O_RDONLY | Sys.O_CLOEXEC | LibC.O_NONBLOCK);
        if (fd < 0)
            throw new HostFileException(PathFailure(Errno.Last, "no such file", "opened"));
        try
        {
            var (type, size) = Examine(fd);
            if (type != (uint)LibC.S_IFREG)
                throw new HostFileException(Describe(type, "a regular file"));
            if (size > (ulong)maxBytes)
                throw new HostFileException($"is {size} bytes; at most {maxBytes} are accepted here");
            var contents = new byte[size];
            int got = 0;
            while (got < contents.Length)
            {
                long n = FileIo.ReadAt(fd, contents.AsSpan(got), got);
                if (n < 0)
                    throw new HostFileException($"cannot be read: {Errno.Describe((int)-n)}");
                if (n == 0)
                    throw new HostFileException($"shrank from {size} to {got} bytes while it was read");
                got += (int)n;
            }
            return contents;
        }
        finally
        {
            LibC.close(fd);
        }
    }

    /// <summary>Opens <paramref name="path"/> for appended output (the serial console's file:PATH), created 0644 if
    /// missing: a regular file, a character device (/dev/null, a terminal) or a FIFO someone reads. Opened non-blocking,
    /// so a FIFO without a reader is refused at once instead of hanging the start, then set back to blocking writes.
    /// Throws <see cref="HostFileException"/> in the words of <see cref="ReadRegular"/>.</summary>
    public static Microsoft.Win32.SafeHandles.SafeFileHandle OpenForAppend(string path)
    {
        const int O_WRONLY = 1, O_CREAT = 0x40, O_APPEND = 0x400, EISDIR = 21;
        int fd = Sys.Open(path, O_WRONLY | O_CREAT | O_APPEND | Sys.O_CLOEXEC | LibC.O_NONBLOCK, 0b110_100_100);
        if (fd < 0)
        {
            int errno = Errno.Last;
            throw new HostFileException(errno switch
            {
                EISDIR => "is a directory",
                _ when errno == Errno.ENXIO => NoSuchDeviceOrAddress(path),
                _ => PathFailure(errno, "no such directory", "opened"), // O_CREAT: only a missing directory is ENOENT
            });
        }
        try
        {
            var (type, _) = Examine(fd);
            if (type != (uint)LibC.S_IFREG && type != (uint)LibC.S_IFCHR && type != (uint)LibC.S_IFIFO)
                throw new HostFileException(Describe(type, Appendable));
            if (ClearNonBlocking(fd) is string why)
                throw new HostFileException(why);
        }
        catch
        {
            LibC.close(fd);
            throw;
        }
        return new Microsoft.Win32.SafeHandles.SafeFileHandle(fd, ownsHandle: true);
    }

    private const string Appendable = "a regular file, character device or FIFO";

    /// <summary>Why open(O_WRONLY | O_NONBLOCK) gave ENXIO: the kernel answers so for a FIFO without a reader and for a
    /// Unix socket alike (and for a device file whose device is absent), so the path's type decides the words.</summary>
    private static string NoSuchDeviceOrAddress(string path)
    {
        uint type = TypeAt(path, out _);
        return type == (uint)LibC.S_IFIFO ? "is a FIFO nobody reads (start its reader first)"
            : type == (uint)LibC.S_IFSOCK ? Describe(type, Appendable)
            : $"cannot be opened: {Errno.Describe(Errno.ENXIO)}";
    }

    /// <summary>For a disk image opened with O_NONBLOCK (so a FIFO could not hang the open): null when
    /// <paramref name="fd"/> is a regular file or a block device — and O_NONBLOCK is cleared again — else why not ("is a
    /// character device, not a regular file or block device").</summary>
    public static string? NotAnImage(int fd)
    {
        var (type, _) = Examine(fd);
        if (type != (uint)LibC.S_IFREG && type != (uint)LibC.S_IFBLK)
            return Describe(type, "a regular file or block device");
        return ClearNonBlocking(fd);
    }

    /// <summary>What <see cref="NotASocket"/> says when nothing is at the path (the back-end is not started yet), so a
    /// caller can add how to start it.</summary>
    public const string NoSuchSocket = "no such socket";

    /// <summary>For a Unix socket vmm connects to (a vhost-user or vfio-user back-end): null when
    /// <paramref name="path"/> is a socket, else why not in the words of <see cref="ReadRegular"/> ("no such socket",
    /// "is a regular file, not a socket"). Only a stat: it cannot block, so a FIFO or a dead mount point cannot hang the
    /// start, and connect's misleading "Connection refused" for a regular file is never shown.</summary>
    public static string? NotASocket(string path)
    {
        uint type = TypeAt(path, out int errno);
        if (errno != 0)
            return PathFailure(errno, NoSuchSocket, "examined");
        return type == (uint)LibC.S_IFSOCK ? null
            : type == (uint)LibC.S_IFREG ? "is a regular file, not a socket"
            : Describe(type, "a socket");
    }

    /// <summary>For a Unix socket vmm creates (--api-socket, --vsock socket=): null when the directory it goes in
    /// exists, else why not ("directory /run/x does not exist"), so the refusal names the real problem instead of
    /// bind's ENOENT on a temporary name.</summary>
    public static string? NoDirectoryFor(string path)
    {
        string directory = Path.GetDirectoryName(Path.GetFullPath(path)) ?? "/";
        if (Directory.Exists(directory))
            return null;
        return File.Exists(directory) ? $"{directory} is not a directory" : $"directory {directory} does not exist";
    }

    /// <summary>Why a path could not be opened or examined, from the errno, in words a user acts on:
    /// <paramref name="missing"/> ("no such file") for ENOENT/ENOTDIR, else "permission denied", the symbolic-link loop
    /// or "cannot be <paramref name="verb"/>: " and the errno.</summary>
    private static string PathFailure(int errno, string missing, string verb) => errno switch
    {
        _ when errno == Errno.ENOENT || errno == ENOTDIR => missing,
        _ when errno == Errno.EACCES || errno == Errno.EPERM => "permission denied",
        ELOOP => "too many levels of symbolic links",
        _ => $"cannot be {verb}: {Errno.Describe(errno)}",
    };

    /// <summary>The file type (S_IFMT bits) of <paramref name="path"/>, following symbolic links as open does; 0 with
    /// <paramref name="errno"/> set when it cannot be examined. Only a stat: it cannot block on a FIFO or socket.</summary>
    private static uint TypeAt(string path, out int errno)
    {
        var bytes = CString.From(path);
        statx st;
        int r;
        fixed (byte* p = bytes)
        {
            do
                r = LibC.statx(LibC.AT_FDCWD, p, 0, LibC.STATX_TYPE, &st);
            while (r < 0 && Errno.Last == Errno.EINTR);
        }
        errno = r < 0 ? Errno.Last : 0;
        return r < 0 ? 0 : (uint)st.stx_mode & (uint)LibC.S_IFMT;
    }

    /// <summary>Clears the O_NONBLOCK a careful open set (so a FIFO could not hang it): null when done, else why
    /// not.</summary>
    private static string? ClearNonBlocking(int fd)
    {
        int flags = LibC.fcntl(fd, LibC.F_GETFL);
        if (flags < 0 || LibC.fcntl(fd, LibC.F_SETFL, flags & ~LibC.O_NONBLOCK) < 0)
            return $"cannot be set to blocking I/O: {Errno.Describe(Errno.Last)}";
        return null;
    }

    private static (uint Type, ulong Size) Examine(int fd)
    {
        statx st;
        byte empty = 0;
        int r;
        do
            r = LibC.statx(fd, &empty, AT_EMPTY_PATH, LibC.STATX_TYPE | LibC.STATX_SIZE, &st);
        while (r < 0 && Errno.Last == Errno.EINTR);
        if (r < 0)
            throw new HostFileException($"cannot be examined: {Errno.Describe(Errno.Last)}");
        return ((uint)st.stx_mode & (uint)LibC.S_IFMT, st.stx_size);
    }

    private static string Describe(uint type, string wanted) => type switch
    {
        _ when type == (uint)LibC.S_IFDIR => "is a directory",
        _ when type == (uint)LibC.S_IFCHR => $"is a character device, not {wanted}",
        _ when type == (uint)LibC.S_IFBLK => $"is a block device, not {wanted}",
        _ when type == (uint)LibC.S_IFIFO => $"is a FIFO, not {wanted}",
        _ when type == (uint)LibC.S_IFSOCK => $"is a socket, not {wanted}",
        _ => $"is not {wanted}",
    };
}
