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
        {
            int errno = Errno.Last;
            throw new HostFileException(errno switch
            {
                _ when errno == Errno.ENOENT || errno == ENOTDIR => "no such file",
                _ when errno == Errno.EACCES || errno == Errno.EPERM => "permission denied",
                _ when errno == ELOOP => "too many levels of symbolic links",
                _ => $"cannot be opened: {Errno.Describe(errno)}",
            });
        }
        try
        {
            statx st;
            byte empty = 0;
            int r;
            do
                r = LibC.statx(fd, &empty, AT_EMPTY_PATH, LibC.STATX_TYPE | LibC.STATX_SIZE, &st);
            while (r < 0 && Errno.Last == Errno.EINTR);
            if (r < 0)
                throw new HostFileException($"cannot be examined: {Errno.Describe(Errno.Last)}");
            uint type = (uint)st.stx_mode & (uint)LibC.S_IFMT;
            if (type != (uint)LibC.S_IFREG)
            {
                throw new HostFileException(type switch
                {
                    _ when type == (uint)LibC.S_IFDIR => "is a directory",
                    _ when type == (uint)LibC.S_IFCHR => "is a character device, not a regular file",
                    _ when type == (uint)LibC.S_IFBLK => "is a block device, not a regular file",
                    _ when type == (uint)LibC.S_IFIFO => "is a FIFO, not a regular file",
                    _ when type == (uint)LibC.S_IFSOCK => "is a socket, not a regular file",
                    _ => "is not a regular file",
                });
            }
            ulong size = st.stx_size;
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
}
