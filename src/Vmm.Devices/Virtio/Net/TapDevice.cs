using Vmm.Interop;

namespace Vmm.Devices.Virtio.Net;

/// <summary>Why a tap could not be opened or configured; the message says what to do about it.</summary>
public sealed class TapException(string message, int errno) : Exception(message)
{
    public int ErrorNumber { get; } = errno;
}

/// <summary>A host tap interface opened for a virtio-net device: <c>/dev/net/tun</c> with
/// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 12-byte virtio_net_hdr_v1 in front of every frame in both directions
/// (the layout a VERSION_1 driver uses, so frames pass through unchanged), a non-blocking fd. The interface is
/// created if absent (and goes away with the fd) or, if a persistent tap of that name exists, attached to.
/// Bringing it up and addressing it is the host administrator's business.</summary>
public sealed class TapDevice : IDisposable
{
    /// <summary>sizeof(struct virtio_net_hdr_v1): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
    /// num_buffers.</summary>
    public const int VnetHeaderSize = 12;

    private const int O_NONBLOCK = 0x800;
    private int _fd;

    /// <summary>Opens (creating if needed) tap <paramref name="name"/>; throws <see cref="TapException"/>.</summary>
    public TapDevice(string name)
    {
        ValidateName(name);
        _fd = Sys.Open("/dev/net/tun", Sys.O_RDWR | O_NONBLOCK | Sys.O_CLOEXEC);
        if (_fd < 0)
        {
            int e = Errno.Last;
            throw new TapException(e switch
            {
                Errno.ENOENT or Errno.ENODEV or Errno.ENXIO => "/dev/net/tun is missing: load the tun module (modprobe tun)",
                Errno.EACCES or Errno.EPERM => "cannot open /dev/net/tun: " + Errno.Describe(e),
                _ => "cannot open /dev/net/tun: " + Errno.Describe(e),
            }, e);
        }
        try
        {
            const short flags = TunConstants.IFF_TAP | TunConstants.IFF_NO_PI | TunConstants.IFF_VNET_HDR;
            if (Tun.SetIff(_fd, name, flags, out string actual) < 0)
            {
                int e = Errno.Last;
                throw new TapException($"tap '{name}': " + e switch
                {
                    Errno.EPERM => "TUNSETIFF needs CAP_NET_ADMIN or a tap owned by this user (ip tuntap add NAME mode tap user USER)",
                    Errno.EBUSY => "the interface is in use (another process has it open)",
                    Errno.EINVAL => "TUNSETIFF refused: an interface of that name exists and is not a single-queue tap (a tun, a multiqueue tap, or another kind of device)",
                    Errno.ENOMEM or Errno.ENOSPC => "out of memory creating the interface",
                    _ => "TUNSETIFF failed: " + Errno.Describe(e),
                }, e);
            }
            Name = actual;
            if (Tun.SetVnetHeaderSize(_fd, VnetHeaderSize) < 0)
                throw Fail("TUNSETVNETHDRSZ");
            SetOffload(checksum: false);
        }
        catch
        {
            Sys.Close(_fd);
            _fd = -1;
            throw;
        }
    }

    /// <summary>The interface name the kernel used.</summary>
    public string Name { get; } = "";

    /// <summary>The non-blocking fd (for poll, readv/writev).</summary>
    public int Fd => _fd;

    /// <summary>TUNSETOFFLOAD: with <paramref name="checksum"/>, frames read from the tap may carry
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM (partial checksums) — only right when the guest negotiated GUEST_CSUM; without it
    /// the host completes every checksum before the frame reaches us. No segmentation offloads are ever enabled
    /// (none are offered to the guest).</summary>
    public void SetOffload(bool checksum)
    {
        if (Tun.SetOffload(_fd, checksum ? TunConstants.TUN_F_CSUM : 0) < 0)
            throw Fail("TUNSETOFFLOAD");
    }

    private TapException Fail(string call)
    {
        int e = Errno.Last;
        return new TapException($"tap '{Name}': {call} failed: {Errno.Describe(e)}", e);
    }

    /// <summary>Interface names: 1–15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace, not "." or "..".</summary>
    public static void ValidateName(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        bool ok = name.Length is > 0 and < Tun.IFNAMSIZ && name != "." && name != ".."
                  && name.All(c => c > ' ' && c < 0x7F && c != '/' && c != ':');
        if (!ok)
            throw new ArgumentException($"'{name}' is not a valid interface name (1-{Tun.IFNAMSIZ - 1} printable ASCII characters, no '/', ':' or spaces)", nameof(name));
    }

    public void Dispose()
    {
        Sys.Close(_fd);
        _fd = -1;
    }
}
