using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>poll(2) with explicit event masks, for waits that <see cref="EventFd.Poll"/> (readable only) cannot
/// express: e.g. watching a socket for the peer's hang-up (POLLRDHUP) without waking for data meant for another
/// thread's receive.</summary>
public static unsafe class PollSet
{
    public const short POLLIN = 0x001, POLLERR = 0x008, POLLHUP = 0x010, POLLNVAL = 0x020, POLLRDHUP = 0x2000;

    /// <summary>Waits until an fd reports one of its <paramref name="events"/> (POLLERR/POLLHUP/POLLNVAL always
    /// count) or <paramref name="timeoutMs"/> passed (-1: forever). Fills <paramref name="revents"/>; returns the
    /// number of fds with events, 0 on timeout or EINTR. Negative fds are skipped, as poll(2) does.</summary>
    public static int Wait(ReadOnlySpan<int> fds, ReadOnlySpan<short> events, Span<short> revents, int timeoutMs)
    {
        const int MaxFds = 64;
        if (fds.Length > MaxFds || events.Length != fds.Length || revents.Length != fds.Length)
            throw new ArgumentException($"at most {MaxFds} fds, one event mask and one result each", nameof(fds));
        pollfd* p = stackalloc pollfd[fds.Length];
        for (int i = 0; i < fds.Length; i++)
            p[i] = new pollfd { fd = fds[i], events = events[i] };
        int n = LibC.poll(p, (ulong_t)(ulong)fds.Length, timeoutMs);
        for (int i = 0; i < fds.Length; i++)
            revents[i] = n > 0 ? p[i].revents : (short)0;
        return n < 0 ? 0 : n;
    }
}
