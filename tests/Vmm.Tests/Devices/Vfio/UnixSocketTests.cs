using Vmm.Interop;

namespace Vmm.Tests.Devices.Vfio;

public class UnixSocketTests
{
    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(8)]
    public void Descriptors_sent_with_a_message_arrive_once_and_work(int count)
    {
        var (a, b) = UnixSocket.Pair();
        using (a)
        using (b)
        {
            var events = Enumerable.Range(0, count).Select(_ => new EventFd()).ToArray();
            try
            {
                a.Send(new byte[100], [.. events.Select(e => e.Fd)]);
                var fds = new List<int>();
                var buffer = new byte[100];
                Assert.True(b.ReceiveExactly(buffer.AsSpan(0, 16), fds));
                Assert.True(b.ReceiveExactly(buffer.AsSpan(16), fds));
                Assert.Equal(count, fds.Count);
                // Each received fd is the same eventfd: a signal through it is seen on the original.
                for (int i = 0; i < count; i++)
                {
                    Assert.Equal(8, Uio.Write(fds[i], BitConverter.GetBytes(1UL + (ulong)i)));
                    Assert.True(events[i].TryRead(out ulong value));
                    Assert.Equal(1UL + (ulong)i, value);
                    Sys.Close(fds[i]);
                }
            }
            finally
            {
                foreach (var e in events)
                    e.Dispose();
            }
        }
    }

    [Fact]
    public void A_peer_that_closes_mid_message_is_an_error_and_between_messages_is_end_of_stream()
    {
        var (a, b) = UnixSocket.Pair();
        using (b)
        {
            a.Send(new byte[10]);
            a.Dispose();
            var fds = new List<int>();
            var e = Assert.Throws<SyscallException>(() => b.ReceiveExactly(new byte[16], fds));
            Assert.Equal(Errno.ECONNRESET, e.ErrorNumber);
            Assert.False(b.ReceiveExactly(new byte[16], fds));
        }
    }

    [Fact]
    public void A_receive_timeout_fails_with_EAGAIN()
    {
        var (a, b) = UnixSocket.Pair();
        using (a)
        using (b)
        {
            b.SetReceiveTimeout(TimeSpan.FromMilliseconds(100));
            var e = Assert.Throws<SyscallException>(() => b.ReceiveExactly(new byte[4], []));
            Assert.Equal(Errno.EAGAIN, e.ErrorNumber);
        }
    }
}
