using System.Text;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>A Unix socket's file: its type and identity (statx), and a bind done with libc rather than
/// System.Net.Sockets' Socket.Bind, because a .NET socket bound to a path deletes that path when disposed — even after
/// another server has replaced the file; the API server removes its file itself, and only while it is still its own.
/// Failures throw <see cref="SyscallException"/> naming the call and the path.</summary>
public static unsafe class SocketFile
{
    /// <summary>sun_path holds 108 bytes including the terminating NUL.</summary>
    public const int MaxPathBytes = 107;

    public enum Kind { Missing, Socket, Other }

    /// <summary>What is at <paramref name="path"/> (not following a symlink) and its (device, inode).</summary>
    public static Kind Stat(string path, out (ulong Device, ulong Inode) identity)
    {
        identity = default;
        byte[] name = CString.From(path);
        statx buffer;
        int r;
        fixed (byte* p = name)
        {
            do
                r = LibC.statx(LibC.AT_FDCWD, p, LibC.AT_SYMLINK_NOFOLLOW, LibC.STATX_TYPE | LibC.STATX_INO, &buffer);
            while (r < 0 && Errno.Last == Errno.EINTR);
        }
        if (r < 0)
        {
            int errno = Errno.Last;
            if (errno == Errno.ENOENT)
                return Kind.Missing;
            throw new SyscallException("statx", errno, path);
        }
        identity = (((ulong)buffer.stx_dev_major << 32) | buffer.stx_dev_minor, buffer.stx_ino);
        return (buffer.stx_mode & LibC.S_IFMT) == LibC.S_IFSOCK ? Kind.Socket : Kind.Other;
    }

    /// <summary>A new AF_UNIX stream socket (close-on-exec) bound to <paramref name="path"/>: its fd, which the caller
    /// owns. A path longer than sun_path holds is an <see cref="ArgumentException"/>.</summary>
    public static int Bind(string path)
    {
        var address = new sockaddr_un { sun_family = LibC.AF_UNIX };
        byte[] name = CString.From(path);
        if (name.Length - 1 > MaxPathBytes)
            throw new ArgumentException($"{path}: a unix socket path is at most {MaxPathBytes} bytes", nameof(path));
        name.CopyTo(new Span<byte>((byte*)&address + 2, 108));
        int fd = LibC.socket(LibC.AF_UNIX, LibC.SOCK_STREAM | LibC.SOCK_CLOEXEC, 0);
        if (fd < 0)
            throw new SyscallException("socket(AF_UNIX)", Errno.Last, path);
        if (LibC.bind(fd, (sockaddr*)&address, (uint)sizeof(sockaddr_un)) < 0)
        {
            int errno = Errno.Last;
            LibC.close(fd);
            throw new SyscallException("bind", errno, path);
        }
        return fd;
    }

    public static int ByteCount(string path) => Encoding.UTF8.GetByteCount(path);
}
