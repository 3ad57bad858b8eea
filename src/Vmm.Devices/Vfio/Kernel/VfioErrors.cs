using Vmm.Interop;

namespace Vmm.Devices.Vfio.Kernel;

/// <summary>The messages of the kernel VFIO backends: "DEVICE: IOCTL failed: text (ENAME) — what to do".</summary>
public static class VfioErrors
{
    /// <summary>An ioctl (or other call) on a device, group, container or iommufd failed with
    /// <paramref name="errno"/> (positive).</summary>
    public static VfioException Call(string device, string call, int errno, string? hint = null) =>
        new($"{device}: {call} failed: {Errno.Describe(errno)}{(hint is null ? "" : " — " + hint)}", errno);

    /// <summary>open(<paramref name="node"/>) failed: EACCES/EPERM get the chown/udev hint, EBUSY says who holds it.</summary>
    public static VfioException OpenFailed(string device, string node, int errno)
    {
        string? hint = errno switch
        {
            Errno.EACCES or Errno.EPERM =>
                $"vmm needs read/write access to {node}: run it as root, or give the node to your user " +
                $"(chown $USER {node} — until the device is rebound or the host reboots — or a udev rule such as " +
                "SUBSYSTEM==\"vfio\", OWNER=\"youruser\" in /etc/udev/rules.d/, then udevadm trigger)",
            Errno.EBUSY => $"{node} is already open: another VMM (or another vmm) is using this device or its IOMMU group",
            Errno.ENOENT => $"{node} does not exist: is the vfio-pci (and, for the cdev, iommufd) module loaded?",
            _ => null,
        };
        return Call(device, $"open({node})", errno, hint);
    }
}
