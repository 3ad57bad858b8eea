using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>An epoll(7) instance (owns its fd), for a device thread that serves a changing set of sockets: the epoll
/// fd itself is readable while any registered fd is ready, so it sits among a worker's poll fds. Each registration
/// carries a 64-bit tag that <see cref="Wait"/> hands back. No allocation per call.</summary>
public sealed unsafe class Epoll : IDisposable
{
    public const uint In = 0x001, Out = 0x004, Err = 0x008, Hup = 0x010, RdHup = 0x2000, EdgeTriggered = 1u << 31;

    private int _fd;

    public Epoll()
    {
        _fd = LibC.epoll_create1(LibC.EPOLL_CLOEXEC);
        if (_fd < 0)
            throw new SyscallException("epoll_create1", Errno.Last);
    }

    public int Fd => _fd;

    /// <summary>Registers <paramref name="fd"/> for <paramref name="events"/>; returns 0 or the negated errno.</summary>
    public int Add(int fd, uint events, ulong tag) => Control(LibC.EPOLL_CTL_ADD, fd, events, tag);

    public int Remove(int fd) => Control(LibC.EPOLL_CTL_DEL, fd, 0, 0);

    private int Control(int op, int fd, uint events, ulong tag)
    {
        var e = new epoll_event { events = unchecked((int)events) };
        e.data.u64 = tag;
        return LibC.epoll_ctl(_fd, op, fd, &e) < 0 ? -Errno.Last : 0;
    }

    /// <summary>Collects ready registrations into <paramref name="events"/> (tag, event mask) without waiting when
    /// <paramref name="timeoutMs"/> is 0; returns how many (0 on EINTR).</summary>
    public int Wait(Span<(ulong Tag, uint Events)> events, int timeoutMs = 0)
    {
        int max = Math.Min(events.Length, 64);
        epoll_event* raw = stackalloc epoll_event[max];
        int n = LibC.epoll_wait(_fd, raw, max, timeoutMs);
        for (int i = 0; i < n; i++)
            events[i] = (raw[i].data.u64, unchecked((uint)raw[i].events));
        return Math.Max(n, 0);
    }

    public void Dispose()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0)
            Sys.Close(fd);
    }
}

/// <summary>Non-blocking AF_UNIX stream calls on raw fds for device threads that multiplex many peers: nothing here
/// blocks, throws or allocates per call (results are byte counts or negated errnos, kernel style).</summary>
public static unsafe class NonBlockingSocket
{
    public const int ShutRead = 0, ShutWrite = 1, ShutBoth = 2;

    /// <summary>A listening socket at <paramref name="path"/> whose accepts never block (see
    /// <see cref="UnixSocket.Listen"/> for the bind-then-rename). The caller owns the returned socket.</summary>
    public static UnixSocket Listen(string path, int backlog)
    {
        var socket = UnixSocket.Listen(path, backlog);
        int flags = LibC.fcntl(socket.Fd, LibC.F_GETFL, 0);
        if (flags < 0 || LibC.fcntl(socket.Fd, LibC.F_SETFL, flags | LibC.O_NONBLOCK) < 0)
        {
            int errno = Errno.Last;
            socket.Dispose();
            throw new SyscallException("fcntl(O_NONBLOCK)", errno, path);
        }
        return socket;
    }

    /// <summary>accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC: the new fd, or the negated errno (-EAGAIN: none waiting).</summary>
    public static int Accept(int listenFd)
    {
        while (true)
        {
            int fd = LibC.accept4(listenFd, null, null, LibC.SOCK_NONBLOCK | LibC.SOCK_CLOEXEC);
            if (fd >= 0)
                return fd;
            int errno = Errno.Last;
            if (errno != Errno.EINTR)
                return -errno;
        }
    }

    /// <summary>Connects a new non-blocking AF_UNIX stream socket to <paramref name="path"/>: the fd, or the negated
    /// errno. AF_UNIX connects complete at once or fail (a full backlog gives -EAGAIN instead of blocking).</summary>
    public static int Connect(string path)
    {
        sockaddr_un address;
        try
        {
            address = UnixSocket.Address(path);
        }
        catch (ArgumentException)
        {
            return -Errno.EINVAL;
        }
        int fd = LibC.socket(LibC.AF_UNIX, LibC.SOCK_STREAM | LibC.SOCK_NONBLOCK | LibC.SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -Errno.Last;
        while (LibC.connect(fd, (sockaddr*)&address, (uint)sizeof(sockaddr_un)) < 0)
        {
            int errno = Errno.Last;
            if (errno == Errno.EINTR)
                continue;
            Sys.Close(fd);
            return -errno;
        }
        return fd;
    }

    /// <summary>recv with MSG_DONTWAIT: bytes read (0: end of stream) or the negated errno.</summary>
    public static long Receive(int fd, Span<byte> buffer)
    {
        fixed (byte* p = buffer)
        {
            while (true)
            {
                long n = LibC.recv(fd, p, (size_t)(ulong)buffer.Length, LibC.MSG_DONTWAIT);
                if (n >= 0)
                    return n;
                int errno = Errno.Last;
                if (errno != Errno.EINTR)
                    return -errno;
            }
        }
    }

    /// <summary>send with MSG_DONTWAIT | MSG_NOSIGNAL (a vanished peer gives -EPIPE, not SIGPIPE): bytes sent or
    /// the negated errno.</summary>
    public static long Send(int fd, ReadOnlySpan<byte> data)
    {
        fixed (byte* p = data)
        {
            while (true)
            {
                long n = LibC.send(fd, p, (size_t)(ulong)data.Length, LibC.MSG_DONTWAIT | LibC.MSG_NOSIGNAL);
                if (n >= 0)
                    return n;
                int errno = Errno.Last;
                if (errno != Errno.EINTR)
                    return -errno;
            }
        }
    }

    public static void Shutdown(int fd, int how) => LibC.shutdown(fd, how);
}
