using System.Text;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>&lt;linux/if_tun.h&gt; (and the &lt;linux/if.h&gt; bits TUNSETIFF needs), C names. Checked against the
/// installed header by tests/Vmm.Tests/Devices/Virtio/TapDeviceTests.cs.</summary>
public static class TunConstants
{
    public const uint TUNSETIFF = 0x400454CA;       // _IOW('T', 202, int)
    public const uint TUNSETPERSIST = 0x400454CB;   // _IOW('T', 203, int)
    public const uint TUNSETOFFLOAD = 0x400454D0;   // _IOW('T', 208, unsigned int)
    public const uint TUNGETIFF = 0x800454D2;       // _IOR('T', 210, unsigned int)
    public const uint TUNSETVNETHDRSZ = 0x400454D8; // _IOW('T', 216, int)

    public const short IFF_TUN = 0x0001, IFF_TAP = 0x0002, IFF_MULTI_QUEUE = 0x0100, IFF_NO_PI = 0x1000,
        IFF_VNET_HDR = 0x4000;

    public const uint TUN_F_CSUM = 0x01, TUN_F_TSO4 = 0x02, TUN_F_TSO6 = 0x04, TUN_F_TSO_ECN = 0x08, TUN_F_UFO = 0x10;
}

/// <summary>TUN/TAP ioctls with the <c>struct ifreq</c> they take (&lt;linux/if.h&gt;: a 16-byte name, then a
/// union whose first member for TUNSETIFF is <c>short ifr_flags</c>; 40 bytes on x86-64).</summary>
public static unsafe class Tun
{
    public const int IFNAMSIZ = 16;
    public const int IfreqSize = 40;
    private const int IfrFlagsOffset = IFNAMSIZ;

    /// <summary>TUNSETIFF: creates the interface <paramref name="name"/> (or attaches to an existing persistent
    /// one). Returns 0 or -1 (errno in <see cref="Errno.Last"/>); <paramref name="actualName"/> is the name the
    /// kernel used (it fills in "tap%d" patterns).</summary>
    public static int SetIff(int fd, string name, short flags, out string actualName)
    {
        Span<byte> ifr = stackalloc byte[IfreqSize];
        ifr.Clear();
        int n = Encoding.ASCII.GetBytes(name, ifr[..(IFNAMSIZ - 1)]);
        BitConverter.TryWriteBytes(ifr[IfrFlagsOffset..], flags);
        int rc;
        fixed (byte* p = ifr)
            rc = Sys.Ioctl(fd, TunConstants.TUNSETIFF, p);
        int len = ifr[..IFNAMSIZ].IndexOf((byte)0);
        actualName = rc == 0 ? Encoding.ASCII.GetString(ifr[..(len < 0 ? n : len)]) : name;
        return rc;
    }

    /// <summary>TUNSETVNETHDRSZ: the virtio-net header size the tap expects and produces (10 or 12).</summary>
    public static int SetVnetHeaderSize(int fd, int size) => Sys.Ioctl(fd, TunConstants.TUNSETVNETHDRSZ, &size);

    /// <summary>TUNSETOFFLOAD: which offloads (TUN_F_*) the reader accepts in packets it reads.</summary>
    public static int SetOffload(int fd, uint flags) => Sys.Ioctl(fd, TunConstants.TUNSETOFFLOAD, (nint)flags);

    /// <summary>TUNSETPERSIST: keep the interface when its last fd closes (1) or not (0).</summary>
    public static int SetPersist(int fd, bool persist) => Sys.Ioctl(fd, TunConstants.TUNSETPERSIST, persist ? 1 : 0);
}
