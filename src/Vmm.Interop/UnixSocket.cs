using System.Text;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>An AF_UNIX SOCK_STREAM socket (owns its fd): listen/accept/connect, and whole-buffer send/receive
/// that carry file descriptors as SCM_RIGHTS ancillary data (vfio-user passes memfds and eventfds this way).
/// Every call retries EINTR and loops over short reads and writes; failures throw <see cref="SyscallException"/>
/// naming the call. Received descriptors are close-on-exec (MSG_CMSG_CLOEXEC) and belong to the caller.</summary>
public sealed unsafe class UnixSocket : IDisposable
{
    /// <summary>The most descriptors one receive accepts (SCM_RIGHTS beyond this are truncated by the kernel and
    /// reported as an error). The kernel's own limit is SCM_MAX_FD = 253.</summary>
    public const int MaxReceivedFds = 32;

    private int _fd;

    private UnixSocket(int fd) => _fd = fd;

    /// <summary>Takes ownership of an existing socket fd.</summary>
    public static UnixSocket FromFd(int fd) => new(fd);

    public int Fd => _fd;

    /// <summary>Creates <paramref name="path"/> (replacing a stale socket file) and listens on it. The socket is bound
    /// under a temporary name and renamed once it listens, so whoever waits for the file to appear can connect at
    /// once (between bind and listen a connect is refused).</summary>
    public static UnixSocket Listen(string path, int backlog = 1)
    {
        var socket = Create();
        string bound = Encoding.UTF8.GetByteCount(path) < 107 ? path + "~" : path;
        try
        {
            if (File.Exists(bound))
                File.Delete(bound);
            var address = Address(bound);
            if (LibC.bind(socket._fd, (sockaddr*)&address, (uint)sizeof(sockaddr_un)) < 0)
                throw new SyscallException("bind", Errno.Last, bound);
            if (LibC.listen(socket._fd, backlog) < 0)
                throw new SyscallException("listen", Errno.Last, bound);
            if (bound != path)
                File.Move(bound, path, overwrite: true);
            return socket;
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>Waits for one connection on a listening socket.</summary>
    public UnixSocket Accept()
    {
        while (true)
        {
            int fd = LibC.accept4(_fd, null, null, LibC.SOCK_CLOEXEC);
            if (fd >= 0)
                return new UnixSocket(fd);
            if (Errno.Last != Errno.EINTR)
                throw new SyscallException("accept4", Errno.Last);
        }
    }

    /// <summary>Connects to the socket at <paramref name="path"/>.</summary>
    public static UnixSocket Connect(string path)
    {
        var socket = Create();
        try
        {
            var address = Address(path);
            // A connect interrupted by a signal continues in the background; poll would tell when it is done,
            // but AF_UNIX connects complete immediately, so a retry that says EISCONN means success.
            while (LibC.connect(socket._fd, (sockaddr*)&address, (uint)sizeof(sockaddr_un)) < 0)
            {
                int errno = Errno.Last;
                if (errno == Errno.EINTR)
                    continue;
                if (errno == EISCONN)
                    break;
                throw new SyscallException("connect", errno, path);
            }
            return socket;
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>A connected pair (socketpair), for tests and in-process peers.</summary>
    public static (UnixSocket, UnixSocket) Pair()
    {
        int* fds = stackalloc int[2];
        if (LibC.socketpair(LibC.AF_UNIX, LibC.SOCK_STREAM | LibC.SOCK_CLOEXEC, 0, fds) < 0)
            throw new SyscallException("socketpair", Errno.Last);
        return (new UnixSocket(fds[0]), new UnixSocket(fds[1]));
    }

    /// <summary>SO_RCVTIMEO: a receive that waits longer fails with EAGAIN (see <see cref="ReceiveExactly"/>).
    /// <see cref="TimeSpan.Zero"/> or less waits forever.</summary>
    public void SetReceiveTimeout(TimeSpan timeout)
    {
        long us = timeout <= TimeSpan.Zero ? 0 : Math.Max(1, (long)(timeout.TotalMilliseconds * 1000));
        long* tv = stackalloc long[2];
        tv[0] = us / 1_000_000;
        tv[1] = us % 1_000_000;
        if (LibC.setsockopt(_fd, LibC.SOL_SOCKET, LibC.SO_RCVTIMEO, tv, 16) < 0)
            throw new SyscallException("setsockopt(SO_RCVTIMEO)", Errno.Last);
    }

    /// <summary>Sends all of <paramref name="data"/> (looping over short writes); <paramref name="fds"/> go with the
    /// first byte. MSG_NOSIGNAL: a peer that went away gives EPIPE, not SIGPIPE.</summary>
    public void Send(ReadOnlySpan<byte> data, ReadOnlySpan<int> fds = default) => Send(data, default, default, fds);

    /// <summary>Sends <paramref name="first"/>, <paramref name="second"/> and <paramref name="third"/> back to back, as
    /// if they were one buffer: one sendmsg with an iovec each (looping over short writes), so a message header and
    /// its payload go out without being copied together and without allocating. Empty parts are skipped;
    /// <paramref name="fds"/> go with the first byte. MSG_NOSIGNAL: a peer that went away gives EPIPE, not SIGPIPE.</summary>
    public void Send(ReadOnlySpan<byte> first, ReadOnlySpan<byte> second, ReadOnlySpan<byte> third, ReadOnlySpan<int> fds = default)
    {
        long total = (long)first.Length + second.Length + third.Length;
        if (total == 0)
            throw new ArgumentException("a stream socket cannot carry descriptors without data", nameof(first));
        if (fds.Length > 253)
            throw new ArgumentException("at most 253 descriptors per message (SCM_MAX_FD)", nameof(fds));
        int controlLength = fds.IsEmpty ? 0 : LibC.CMSG_SPACE(sizeof(int) * fds.Length);
        byte* control = stackalloc byte[controlLength];
        iovec* iov = stackalloc iovec[3];
        long sent = 0;
        fixed (byte* p0 = first, p1 = second, p2 = third)
        {
            while (sent < total)
            {
                int count = 0;
                long skip = sent;
                AddPart(iov, ref count, p0, first.Length, ref skip);
                AddPart(iov, ref count, p1, second.Length, ref skip);
                AddPart(iov, ref count, p2, third.Length, ref skip);
                var msg = new msghdr { msg_iov = iov, msg_iovlen = count };
                if (sent == 0 && controlLength > 0)
                {
                    new Span<byte>(control, controlLength).Clear();
                    msg.msg_control = control;
                    msg.msg_controllen = (socklen_t)(uint)controlLength;
                    cmsghdr* c = LibC.CMSG_FIRSTHDR(&msg);
                    c->cmsg_level = LibC.SOL_SOCKET;
                    c->cmsg_type = LibC.SCM_RIGHTS;
                    c->cmsg_len = (socklen_t)(uint)CmsgLen(sizeof(int) * fds.Length);
                    fds.CopyTo(new Span<int>(LibC.CMSG_DATA(c), fds.Length));
                }
                long n = LibC.sendmsg(_fd, &msg, LibC.MSG_NOSIGNAL);
                if (n < 0)
                {
                    if (Errno.Last == Errno.EINTR)
                        continue;
                    throw new SyscallException("sendmsg", Errno.Last);
                }
                sent += n;
            }
        }
    }

    /// <summary>Adds what is left of one part after <paramref name="skip"/> bytes already sent (nothing when the part
    /// was sent whole; then <paramref name="skip"/> shrinks by its length).</summary>
    private static void AddPart(iovec* iov, ref int count, byte* start, int length, ref long skip)
    {
        if (skip >= length)
        {
            skip -= length;
            return;
        }
        iov[count++] = new iovec { iov_base = start + skip, iov_len = (size_t)(ulong)(length - skip) };
        skip = 0;
    }

    /// <summary>Fills <paramref name="buffer"/> completely, collecting any descriptors that arrive into
    /// <paramref name="fds"/> (the caller owns and closes them). Returns false when the peer closed the connection
    /// before the first byte; a close after it throws (a truncated message). A receive timeout throws with EAGAIN.</summary>
    public bool ReceiveExactly(Span<byte> buffer, List<int> fds)
    {
        int controlLength = LibC.CMSG_SPACE(sizeof(int) * MaxReceivedFds);
        byte* control = stackalloc byte[controlLength];
        int received = 0;
        fixed (byte* p = buffer)
        {
            while (received < buffer.Length)
            {
                var iov = new iovec { iov_base = p + received, iov_len = (size_t)(ulong)(buffer.Length - received) };
                var msg = new msghdr { msg_iov = &iov, msg_iovlen = 1, msg_control = control, msg_controllen = (socklen_t)(uint)controlLength };
                long n = LibC.recvmsg(_fd, &msg, LibC.MSG_CMSG_CLOEXEC);
                if (n < 0)
                {
                    int errno = Errno.Last;
                    if (errno == Errno.EINTR)
                        continue;
                    throw new SyscallException("recvmsg", errno, errno == Errno.EAGAIN ? "receive timeout" : null);
                }
                CollectFds(&msg, fds);
                if ((msg.msg_flags & LibC.MSG_CTRUNC) != 0)
                    throw new SyscallException("recvmsg", Errno.EMSGSIZE, $"more than {MaxReceivedFds} file descriptors in one message");
                if (n == 0)
                {
                    if (received == 0)
                        return false;
                    throw new SyscallException("recvmsg", Errno.ECONNRESET, $"connection closed after {received} of {buffer.Length} bytes");
                }
                received += (int)n;
            }
        }
        return true;
    }

    /// <summary>Reads and drops <paramref name="count"/> bytes (an oversized message the receiver refuses), closing
    /// any descriptors that come with them. False when the peer closed the connection first.</summary>
    public bool Discard(long count)
    {
        var chunk = new byte[(int)Math.Min(count, 64 * 1024)];
        var fds = new List<int>();
        try
        {
            while (count > 0)
            {
                int n = (int)Math.Min(count, chunk.Length);
                if (!ReceiveExactly(chunk.AsSpan(0, n), fds))
                    return false;
                count -= n;
            }
            return true;
        }
        catch (SyscallException e) when (e.ErrorNumber == Errno.ECONNRESET)
        {
            return false;
        }
        finally
        {
            foreach (int fd in fds)
                Sys.Close(fd);
        }
    }

    private static void CollectFds(msghdr* msg, List<int> fds)
    {
        for (cmsghdr* c = LibC.CMSG_FIRSTHDR(msg); c != null; c = LibC.CMSG_NXTHDR(msg, c))
        {
            if (c->cmsg_level != LibC.SOL_SOCKET || c->cmsg_type != LibC.SCM_RIGHTS)
                continue;
            int count = ((int)(uint)c->cmsg_len - CmsgLen(0)) / sizeof(int);
            int* data = (int*)LibC.CMSG_DATA(c);
            for (int i = 0; i < count; i++)
                fds.Add(data[i]);
        }
    }

    /// <summary>shutdown(SHUT_RDWR): wakes a thread blocked in a receive on this socket (it sees end of stream).</summary>
    public void Shutdown()
    {
        if (_fd >= 0)
            LibC.shutdown(_fd, 2 /* SHUT_RDWR */);
    }

    public void Dispose()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        Sys.Close(fd);
    }

    private const int EISCONN = 106;

    /// <summary>CMSG_LEN: the aligned header plus the data, not padded. Tmds.LibC's CMSG_LEN pads the data too, which
    /// makes the kernel read one descriptor too many for an odd count (measured: 1 fd sent arrived as 2).</summary>
    private static int CmsgLen(int dataLength) => LibC.CMSG_ALIGN(sizeof(cmsghdr)) + dataLength;

    private static UnixSocket Create()
    {
        int fd = LibC.socket(LibC.AF_UNIX, LibC.SOCK_STREAM | LibC.SOCK_CLOEXEC, 0);
        if (fd < 0)
            throw new SyscallException("socket(AF_UNIX)", Errno.Last);
        return new UnixSocket(fd);
    }

    internal static sockaddr_un Address(string path)
    {
        var address = new sockaddr_un { sun_family = LibC.AF_UNIX };
        int length = Encoding.UTF8.GetByteCount(path);
        // sun_path is 108 bytes including the terminating NUL.
        if (length == 0 || length > 107)
            throw new ArgumentException($"a unix socket path must be 1 to 107 bytes long: '{path}'", nameof(path));
        byte* sunPath = (byte*)&address + 2;
        Encoding.UTF8.GetBytes(path, new Span<byte>(sunPath, 108));
        sunPath[length] = 0;
        return address;
    }
}
