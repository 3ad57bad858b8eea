using Vmm.Interop;
using static Vmm.Interop.VfioConstants;

namespace Vmm.Devices.Vfio.Kernel;

/// <summary>An opened VFIO device cdev (/dev/vfio/devices/vfioN, Linux 6.6+) not yet bound to an iommufd. Between
/// <see cref="Open"/> and <see cref="Bind"/> the machine adds <see cref="Fd"/> to the KVM VFIO device
/// (KVM_DEV_VFIO_FILE_ADD): vendor drivers read the kvm pointer at bind time.</summary>
public sealed class VfioCdev : IDisposable
{
    private int _fd;

    private VfioCdev(int fd, string name, string path)
    {
        _fd = fd;
        Name = name;
        Path = path;
    }

    public int Fd => _fd;
    public string Name { get; }
    public string Path { get; }

    public static VfioCdev Open(string path, string deviceName)
    {
        int fd = FileIo.Open(path, Sys.O_RDWR | Sys.O_CLOEXEC);
        if (fd < 0)
            throw VfioErrors.OpenFailed(deviceName, path, -fd);
        return new VfioCdev(fd, deviceName, path);
    }

    /// <summary>VFIO_DEVICE_BIND_IOMMUFD, then VFIO_DEVICE_ATTACH_IOMMUFD_PT to <paramref name="iommufd"/>'s IOAS. The
    /// fd moves into the returned device (this object is then empty).</summary>
    public KernelVfioDevice Bind(Iommufd iommufd)
    {
        ObjectDisposedException.ThrowIf(_fd < 0, this);
        var bind = new vfio_device_bind_iommufd { argsz = 24, iommufd = iommufd.Fd };
        int r = FdCalls.Ioctl(_fd, VFIO_DEVICE_BIND_IOMMUFD, ref bind);
        if (r < 0)
            throw VfioErrors.Call(Name, $"VFIO_DEVICE_BIND_IOMMUFD ({Path})", -r,
                -r == Errno.EINVAL ? "is every other device of its IOMMU group bound to vfio-pci or to no driver?" : null);
        var attach = new vfio_device_attach_iommufd_pt { argsz = 16, pt_id = iommufd.IoasId };
        r = FdCalls.Ioctl(_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, ref attach);
        if (r < 0)
            throw VfioErrors.Call(Name, $"VFIO_DEVICE_ATTACH_IOMMUFD_PT (IOAS {iommufd.IoasId})", -r);
        var device = new KernelVfioDevice(Name, _fd, iommufd);
        _fd = -1;
        return device;
    }

    public void Dispose()
    {
        Sys.Close(_fd);
        _fd = -1;
    }
}
