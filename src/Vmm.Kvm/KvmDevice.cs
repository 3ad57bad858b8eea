using Vmm.Interop;
using static Vmm.Interop.KvmConstants;

namespace Vmm.Kvm;

/// <summary>A device KVM emulates in the kernel (the fd KVM_CREATE_DEVICE returned), configured through attributes.</summary>
public sealed unsafe class KvmDeviceFd : IDisposable
{
    private int _fd;

    internal KvmDeviceFd(int fd, uint type)
    {
        _fd = fd;
        Type = type;
    }

    public int Fd => _fd;

    /// <summary>KVM_DEV_TYPE_*.</summary>
    public uint Type { get; }

    /// <summary>KVM_SET_DEVICE_ATTR with a pointer to <paramref name="value"/>.</summary>
    public void SetAttribute(uint group, ulong attribute, int value, string what)
    {
        int v = value;
        var a = new kvm_device_attr { group = group, attr = attribute, addr = (ulong)(nint)(&v) };
        KvmSystem.Check(Sys.Ioctl(_fd, KVM_SET_DEVICE_ATTR, &a), "KVM_SET_DEVICE_ATTR", what);
    }

    /// <summary>KVM_HAS_DEVICE_ATTR: whether the device knows this attribute.</summary>
    public bool HasAttribute(uint group, ulong attribute)
    {
        var a = new kvm_device_attr { group = group, attr = attribute };
        return Sys.Ioctl(_fd, KVM_HAS_DEVICE_ATTR, &a) == 0;
    }

    public void Dispose()
    {
        Sys.Close(_fd);
        _fd = -1;
    }
}

/// <summary>KVM's VFIO pseudo device (KVM_DEV_TYPE_VFIO): tells KVM which VFIO group or device-cdev fds the VM
/// uses. Legacy path: add each group fd. cdev path: add the device fd BEFORE VFIO_DEVICE_BIND_IOMMUFD (vendor
/// drivers look up the kvm pointer at open/bind). One per VM.</summary>
public sealed class KvmVfioDevice : IDisposable
{
    private readonly KvmDeviceFd _device;

    public KvmVfioDevice(VmFd vm) => _device = vm.CreateDevice(KVM_DEV_TYPE_VFIO);

    public int Fd => _device.Fd;

    /// <summary>KVM_DEV_VFIO_FILE_ADD (named KVM_DEV_VFIO_GROUP_ADD before Linux 6.6; a cdev fd needs 6.6+).</summary>
    public void AddFile(int fd) =>
        _device.SetAttribute(KVM_DEV_VFIO_GROUP, KVM_DEV_VFIO_GROUP_ADD, fd, $"KVM_DEV_VFIO_FILE_ADD fd {fd}");

    /// <summary>KVM_DEV_VFIO_FILE_DEL.</summary>
    public void RemoveFile(int fd) =>
        _device.SetAttribute(KVM_DEV_VFIO_GROUP, KVM_DEV_VFIO_GROUP_DEL, fd, $"KVM_DEV_VFIO_FILE_DEL fd {fd}");

    public void Dispose() => _device.Dispose();
}
