using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.ExceptionServices;
using System.Text;
using Tmds.Linux;
using Vmm.Interop;

namespace Vmm.Tests.TestKit;

/// <summary>Private network namespaces for tap tests. unshare(CLONE_NEWNET) moves only the calling thread, so
/// <see cref="Run{T}"/> does it on a fresh dedicated thread: taps and sockets created there belong to the new
/// namespace (a tun fd and a socket keep the namespace they were opened in), and stay usable from any thread
/// afterwards. The namespace disappears with its last fd. Needs CAP_SYS_ADMIN (root).</summary>
public static class NetNamespace
{
    private const int CLONE_NEWNET = 0x40000000;

    public static T Run<T>(Func<T> body)
    {
        T? result = default;
        ExceptionDispatchInfo? error = null;
        var thread = new Thread(() =>
        {
            try
            {
                if (LibC.unshare(CLONE_NEWNET) != 0)
                    throw new SyscallException("unshare(CLONE_NEWNET)", LibC.errno, "tap tests need root");
                // No IPv6 autoconfiguration chatter on the test interfaces (sysctls resolve the opener's namespace).
                foreach (var f in new[] { "/proc/sys/net/ipv6/conf/all/disable_ipv6", "/proc/sys/net/ipv6/conf/default/disable_ipv6" })
                {
                    try { File.WriteAllText(f, "1"); } catch (IOException) { } catch (UnauthorizedAccessException) { }
                }
                result = body();
            }
            catch (Exception e)
            {
                error = ExceptionDispatchInfo.Capture(e);
            }
        }) { Name = "netns", IsBackground = true };
        thread.Start();
        thread.Join();
        error?.Throw();
        return result!;
    }
}

/// <summary>A raw AF_PACKET socket bound to one interface (which it brings up): sends frames into it and
/// receives every frame it sees. Create it inside the interface's namespace.</summary>
public sealed unsafe class PacketSocket : IDisposable
{
    private const int AF_PACKET = 17, SOCK_RAW = 3, SOCK_NONBLOCK = 0x800, SOCK_CLOEXEC = 0x80000;
    private const ushort ETH_P_ALL = 0x0003;
    private const uint SIOCGIFFLAGS = 0x8913, SIOCSIFFLAGS = 0x8914, SIOCSIFMTU = 0x8922, SIOCGIFINDEX = 0x8933;
    private const short IFF_UP = 1;

    private int _fd;

    public PacketSocket(string ifname, int? mtu = null)
    {
        _fd = LibC.socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, BinaryPrimitives.ReverseEndianness(ETH_P_ALL));
        if (_fd < 0)
            throw new SyscallException("socket(AF_PACKET)", LibC.errno);
        Span<byte> ifr = stackalloc byte[40];
        Name(ifr, ifname);
        Ioctl(SIOCGIFINDEX, ifr, "SIOCGIFINDEX");
        int index = BinaryPrimitives.ReadInt32LittleEndian(ifr[16..]);
        if (mtu is int m)
        {
            Name(ifr, ifname);
            BinaryPrimitives.WriteInt32LittleEndian(ifr[16..], m);
            Ioctl(SIOCSIFMTU, ifr, "SIOCSIFMTU");
        }
        Name(ifr, ifname);
        Ioctl(SIOCGIFFLAGS, ifr, "SIOCGIFFLAGS");
        short flags = BinaryPrimitives.ReadInt16LittleEndian(ifr[16..]);
        BinaryPrimitives.WriteInt16LittleEndian(ifr[16..], (short)(flags | IFF_UP));
        Ioctl(SIOCSIFFLAGS, ifr, "SIOCSIFFLAGS");

        Span<byte> sll = stackalloc byte[20]; // struct sockaddr_ll
        sll.Clear();
        BinaryPrimitives.WriteUInt16LittleEndian(sll, AF_PACKET);
        BinaryPrimitives.WriteUInt16BigEndian(sll[2..], ETH_P_ALL);
        BinaryPrimitives.WriteInt32LittleEndian(sll[4..], index);
        fixed (byte* p = sll)
        {
            if (LibC.bind(_fd, (sockaddr*)p, 20) != 0)
                throw new SyscallException("bind(AF_PACKET)", LibC.errno, ifname);
        }
    }

    private static void Name(Span<byte> ifr, string name)
    {
        ifr.Clear();
        Encoding.ASCII.GetBytes(name, ifr);
    }

    private void Ioctl(uint request, Span<byte> ifr, string what)
    {
        fixed (byte* p = ifr)
        {
            if (Sys.Ioctl(_fd, request, p) != 0)
                throw new SyscallException(what, LibC.errno);
        }
    }

    public void Send(ReadOnlySpan<byte> frame)
    {
        long n = Uio.Write(_fd, frame);
        if (n != frame.Length)
            throw new SyscallException("write(AF_PACKET)", (int)-n);
    }

    /// <summary>The first frame seen that <paramref name="match"/> accepts, or null after <paramref name="timeout"/>.</summary>
    public byte[]? Receive(Func<byte[], bool> match, TimeSpan? timeout = null)
    {
        var buffer = new byte[70000];
        var clock = Stopwatch.StartNew();
        Span<bool> ready = stackalloc bool[1];
        var limit = timeout ?? TimeSpan.FromSeconds(10);
        while (clock.Elapsed < limit)
        {
            EventFd.Poll([_fd], ready, 50);
            long n = Uio.Read(_fd, buffer);
            if (n > 0 && buffer.AsSpan(0, (int)n).ToArray() is var frame && match(frame))
                return frame;
        }
        return null;
    }

    public void Dispose()
    {
        Sys.Close(_fd);
        _fd = -1;
    }
}
