using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>An eventfd(2): a 64-bit counter the kernel can signal (ioeventfd) or wait on (irqfd). Owns its fd.
/// <see cref="Signal"/> and <see cref="TryRead"/> allocate nothing and never throw: device threads call them per event.</summary>
public sealed unsafe class EventFd : IDisposable
{
    public const int EFD_NONBLOCK = 0x800, EFD_CLOEXEC = 0x80000;
    private const int ReadyMask = 0x001 | 0x008 | 0x010; // POLLIN | POLLERR | POLLHUP

    private int _fd;

    public EventFd(bool nonBlocking = true) =>
        _fd = Sys.EventFd(0, EFD_CLOEXEC | (nonBlocking ? EFD_NONBLOCK : 0));

    public int Fd => _fd;

    /// <summary>Adds one to the counter (wakes a waiter; for an irqfd, injects the interrupt).</summary>
    public bool Signal()
    {
        ulong one = 1;
        return LibC.write(_fd, &one, 8) == 8;
    }

    /// <summary>Reads and resets the counter; false when it was zero (non-blocking fd) or on error.</summary>
    public bool TryRead(out ulong value)
    {
        ulong v = 0;
        bool ok = LibC.read(_fd, &v, 8) == 8;
        value = v;
        return ok;
    }

    /// <summary>Waits until any of <paramref name="fds"/> is readable or <paramref name="timeoutMs"/> passed (-1: forever).
    /// Returns the number of ready fds (0 on timeout); <paramref name="ready"/>[i] says whether fds[i] is readable.
    /// EINTR counts as a timeout.</summary>
    public static int Poll(ReadOnlySpan<int> fds, Span<bool> ready, int timeoutMs)
    {
        const int MaxFds = 64;
        if (fds.Length > MaxFds)
            throw new ArgumentException($"at most {MaxFds} fds", nameof(fds));
        pollfd* p = stackalloc pollfd[fds.Length];
        for (int i = 0; i < fds.Length; i++)
            p[i] = new pollfd { fd = fds[i], events = LibC.POLLIN };
        int n = LibC.poll(p, (ulong_t)(ulong)fds.Length, timeoutMs);
        for (int i = 0; i < fds.Length; i++)
            ready[i] = n > 0 && (p[i].revents & ReadyMask) != 0;
        return n < 0 ? 0 : n;
    }

    public void Dispose()
    {
        if (_fd >= 0)
            Sys.Close(_fd);
        _fd = -1;
    }
}
