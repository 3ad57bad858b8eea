using Vmm.Interop;
using static Vmm.Interop.VfioConstants;

namespace Vmm.Devices.Vfio.Kernel;

/// <summary>A legacy VFIO group (/dev/vfio/N): checked viable on open, attached to a <see cref="VfioContainer"/>, then
/// asked for device fds by name. Its fd is what KVM_DEV_VFIO_FILE_ADD takes on this path.</summary>
public sealed class VfioGroup : IDisposable
{
    private int _fd;

    private VfioGroup(int fd, int number, string name)
    {
        _fd = fd;
        Number = number;
        Name = name;
    }

    public int Fd => _fd;
    public int Number { get; }

    /// <summary>"IOMMU group 12" for messages.</summary>
    public string Name { get; }

    /// <param name="notViableHint">What to do when the group is not viable (the planner lists the group's other
    /// devices and their drivers from sysfs).</param>
    public static VfioGroup Open(string path, int number, string? notViableHint = null)
    {
        string name = $"IOMMU group {number}";
        int fd = FileIo.Open(path, Sys.O_RDWR | Sys.O_CLOEXEC);
        if (fd < 0)
            throw VfioErrors.OpenFailed(name, path, -fd);
        try
        {
            var status = new vfio_group_status { argsz = 8 };
            int r = FdCalls.Ioctl(fd, VFIO_GROUP_GET_STATUS, ref status);
            if (r < 0)
                throw VfioErrors.Call(name, $"VFIO_GROUP_GET_STATUS ({path})", -r);
            if ((status.flags & VFIO_GROUP_FLAGS_VIABLE) == 0)
                throw new VfioException($"{name} is not viable: every device in it must be bound to vfio-pci (or pci-stub, or to no driver)" +
                    (notViableHint is null ? "" : ": " + notViableHint), Errno.EINVAL);
            return new VfioGroup(fd, number, name);
        }
        catch
        {
            Sys.Close(fd);
            throw;
        }
    }

    internal void SetContainer(int containerFd)
    {
        var containerFdValue = containerFd;
        int r = FdCalls.Ioctl(_fd, VFIO_GROUP_SET_CONTAINER, ref containerFdValue);
        if (r < 0)
            throw VfioErrors.Call(Name, "VFIO_GROUP_SET_CONTAINER", -r);
    }

    /// <summary>VFIO_GROUP_GET_DEVICE_FD by name ("0000:01:00.0" or an mdev UUID); the group must be in a container.</summary>
    public KernelVfioDevice OpenDevice(string deviceName, IVfioDmaSpace dma)
    {
        int fd = FdCalls.Ioctl(_fd, VFIO_GROUP_GET_DEVICE_FD, deviceName);
        if (fd < 0)
            throw VfioErrors.Call(deviceName, $"VFIO_GROUP_GET_DEVICE_FD ({Name})", -fd);
        try
        {
            return new KernelVfioDevice(deviceName, fd, dma);
        }
        catch
        {
            Sys.Close(fd);
            throw;
        }
    }

    public void Dispose()
    {
        Sys.Close(_fd);
        _fd = -1;
    }
}
