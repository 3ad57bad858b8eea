using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using Vmm.Interop;

namespace Vmm.Devices.Vfio.Kernel;

public enum VfioBus
{
    Pci,
    Mdev,
}

public enum VfioBackendKind
{
    /// <summary>/dev/vfio/devices/vfioN bound to /dev/iommu (Linux 6.6+ with CONFIG_VFIO_DEVICE_CDEV).</summary>
    IommufdCdev,

    /// <summary>/dev/vfio/N in the type1 container /dev/vfio/vfio.</summary>
    LegacyGroup,
}

/// <summary>How to open one host device, decided from sysfs and /dev alone (no ioctls). Node paths are the ones to
/// open (under the <see cref="VfioHost"/>'s roots).</summary>
/// <param name="DeviceName">"0000:01:00.0", or the mdev UUID: what VFIO_GROUP_GET_DEVICE_FD takes.</param>
/// <param name="Driver">The bound driver ("vfio-pci", a vfio-pci variant, or the mdev's driver).</param>
/// <param name="CdevNode">/dev/vfio/devices/vfioN when the device has one (used on the cdev path).</param>
public sealed record VfioHostPlan(string DeviceName, VfioBus Bus, string SysfsPath, string Driver, int IommuGroup,
    VfioBackendKind Backend, string GroupNode, string ContainerNode, string? CdevNode, string IommufdNode)
{
    /// <summary>For messages: "0000:01:00.0" or "mdev 83b8f4f2-…".</summary>
    public string Name => Bus == VfioBus.Pci ? DeviceName : "mdev " + DeviceName;
}

/// <summary>Resolves <c>--device vfio=PATH</c> (/sys/bus/pci/devices/DDDD:BB:DD.F, /sys/bus/mdev/devices/UUID, or
/// just the address or UUID) into a <see cref="VfioHostPlan"/>, reading only sysfs links and /dev entries, so every
/// way a host is not ready gives one message that says what to do. The roots are parameters so tests can build a
/// fake tree; messages always show the real /sys and /dev paths.</summary>
public sealed partial class VfioHost
{
    private readonly string _sysfsRoot;
    private readonly string _devRoot;
    private readonly bool _preferIommufd;
    private readonly Func<string, int> _accessReadWrite;

    /// <param name="accessReadWrite">access(path, R_OK|W_OK) → 0 or a negative errno; tests inject EACCES (root
    /// passes every access check).</param>
    public VfioHost(string sysfsRoot = "/sys", string devRoot = "/dev", bool preferIommufd = true,
        Func<string, int>? accessReadWrite = null)
    {
        _sysfsRoot = sysfsRoot.TrimEnd('/');
        _devRoot = devRoot.TrimEnd('/');
        _preferIommufd = preferIommufd;
        _accessReadWrite = accessReadWrite ?? (path => FdCalls.Access(path, FdCalls.R_OK | FdCalls.W_OK));
    }

    [GeneratedRegex("^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\\.[0-7]$")]
    private static partial Regex PciAddress();

    [GeneratedRegex("^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
    private static partial Regex Uuid();

    [GeneratedRegex("^vfio[0-9]+$")]
    private static partial Regex CdevName();

    /// <summary>The plan for <paramref name="path"/>, or a <see cref="VfioException"/> saying what to fix.</summary>
    public VfioHostPlan Plan(string path)
    {
        string canonical = Canonical(path);
        string sysPath = InSys(canonical);
        string name = System.IO.Path.GetFileName(canonical);
        if (!Directory.Exists(sysPath))
            throw Fail($"{canonical} does not exist: give a PCI device as /sys/bus/pci/devices/DDDD:BB:DD.F (lspci -D lists them) " +
                "or a mediated device as /sys/bus/mdev/devices/UUID");

        string? subsystem = LinkName(sysPath, "subsystem");
        VfioBus bus = subsystem switch
        {
            "pci" => VfioBus.Pci,
            "mdev" => VfioBus.Mdev,
            _ => throw Fail($"{canonical} is not a PCI or mdev device ({(subsystem is null ? "it has no subsystem link" : $"its subsystem is {subsystem}")}): " +
                "give /sys/bus/pci/devices/DDDD:BB:DD.F or /sys/bus/mdev/devices/UUID"),
        };
        if (bus == VfioBus.Pci && !PciAddress().IsMatch(name))
            throw Fail($"{canonical} is not a PCI function (expected a DDDD:BB:DD.F name, got {name})");
        string label = bus == VfioBus.Pci ? name : "mdev " + name;

        int group = IommuGroup(sysPath, label);
        string driver = Driver(sysPath, name, bus, label);
        if (bus == VfioBus.Pci)
            CheckGroupViable(group, name, label);
        return ChooseBackend(canonical, sysPath, name, bus, label, driver, group);
    }

    private string Canonical(string path)
    {
        path = path.Trim();
        if (path.Length > 1)
            path = path.TrimEnd('/');
        if (!path.Contains('/'))
        {
            if (PciAddress().IsMatch(path))
                return "/sys/bus/pci/devices/" + path.ToLowerInvariant();
            if (Uuid().IsMatch(path))
                return "/sys/bus/mdev/devices/" + path.ToLowerInvariant();
            throw Fail($"'{path}' is neither a sysfs path nor a PCI address (DDDD:BB:DD.F) or mdev UUID");
        }
        if (_sysfsRoot != "/sys" && path.StartsWith(_sysfsRoot + "/", StringComparison.Ordinal))
            return "/sys" + path[_sysfsRoot.Length..];
        return path;
    }

    private string InSys(string canonical) =>
        canonical.StartsWith("/sys/", StringComparison.Ordinal) ? _sysfsRoot + canonical[4..] : canonical;

    private string InDev(string canonical) => _devRoot + canonical[4..];

    /// <summary>The last component of the symlink <paramref name="dir"/>/<paramref name="link"/> (readlink), or null.</summary>
    private static string? LinkName(string dir, string link)
    {
        var info = new FileInfo(System.IO.Path.Combine(dir, link));
        return info.LinkTarget is { } target ? System.IO.Path.GetFileName(target.TrimEnd('/')) : null;
    }

    private int IommuGroup(string sysPath, string label)
    {
        string? groupLink = LinkName(sysPath, "iommu_group");
        if (groupLink is null)
        {
            string groups = InSys("/sys/kernel/iommu_groups");
            bool hostHasGroups = Directory.Exists(groups) && Directory.EnumerateFileSystemEntries(groups).Any();
            var m = new StringBuilder($"{label} has no IOMMU group, so VFIO cannot isolate its DMA. ");
            m.Append(hostHasGroups
                ? "The host has IOMMU groups, but none covers this device: check that the IOMMU is enabled for it (dmesg | grep -i -e DMAR -e AMD-Vi). "
                : "The IOMMU is off (/sys/kernel/iommu_groups is empty): ");
            m.Append("enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware setup and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD) on the kernel command line.");
            if (!Path.Exists(InDev("/dev/vfio/vfio")) && !Path.Exists(InDev("/dev/vfio/devices")))
                m.Append(" VFIO is not loaded either (/dev/vfio/vfio is missing): modprobe vfio-pci (the kernel needs CONFIG_VFIO_PCI).");
            throw Fail(m.ToString());
        }
        if (!int.TryParse(groupLink, NumberStyles.None, CultureInfo.InvariantCulture, out int group))
            throw Fail($"{label}: its iommu_group link points to '{groupLink}', not a group number");
        return group;
    }

    /// <summary>vfio-pci, or a vfio-pci variant driver (mlx5_vfio_pci, nvgrace_gpu_vfio_pci, ...), which speaks the same uapi.</summary>
    public static bool IsVfioPciDriver(string driver) =>
        driver == "vfio-pci" || driver.EndsWith("_vfio_pci", StringComparison.Ordinal) || driver.EndsWith("-vfio-pci", StringComparison.Ordinal);

    private string Driver(string sysPath, string name, VfioBus bus, string label)
    {
        string? driver = LinkName(sysPath, "driver");
        if (bus == VfioBus.Mdev)
        {
            // Each mdev parent's vendor driver registers the mdev's VFIO driver (nvidia-vgpu-vfio, vfio_ccw_mdev, ...);
            // before Linux 5.16 it was the generic vfio_mdev.
            return driver ?? throw Fail($"{label} has no driver bound: the parent device's vendor driver provides it " +
                "(load the vendor's VFIO module; kernels before 5.16: modprobe vfio_mdev), then recreate the mdev");
        }
        if (driver is not null && IsVfioPciDriver(driver))
            return driver;
        string bindCommands = BindCommands(name, unbindFirst: driver is not null);
        if (driver is null)
            throw Fail($"{name} is not bound to any driver; bind it to vfio-pci: {bindCommands}");
        throw Fail($"{name} is bound to {driver}, not vfio-pci; stop what uses it, then rebind it: {bindCommands}");
    }

    /// <summary>The shell commands that bind <paramref name="name"/> to vfio-pci (modprobe first when vfio-pci is not loaded).</summary>
    private string BindCommands(string name, bool unbindFirst)
    {
        var commands = new List<string>();
        if (!Directory.Exists(InSys("/sys/bus/pci/drivers/vfio-pci")))
            commands.Add("modprobe vfio-pci");
        if (unbindFirst)
            commands.Add($"echo {name} > /sys/bus/pci/devices/{name}/driver/unbind");
        commands.Add($"echo vfio-pci > /sys/bus/pci/devices/{name}/driver_override");
        commands.Add($"echo {name} > /sys/bus/pci/drivers_probe");
        return string.Join("; ", commands);
    }

    /// <summary>The kernel lets a group be used only when every device in it is bound to vfio-pci, pci-stub, a
    /// bridge's pcieport (these drivers manage DMA themselves) or to nothing.</summary>
    private void CheckGroupViable(int group, string name, string label)
    {
        string devices = InSys($"/sys/kernel/iommu_groups/{group}/devices");
        if (!Directory.Exists(devices))
            return; // the kernel's VFIO_GROUP_GET_STATUS still checks
        var offenders = new List<(string Device, string Driver)>();
        foreach (var entry in Directory.EnumerateFileSystemEntries(devices).Order(StringComparer.Ordinal))
        {
            string other = System.IO.Path.GetFileName(entry);
            if (other == name)
                continue;
            string? driver = LinkName(entry, "driver");
            if (driver is null || IsVfioPciDriver(driver) || driver is "pci-stub" or "pcieport")
                continue;
            offenders.Add((other, driver));
        }
        if (offenders.Count == 0)
            return;
        var m = new StringBuilder($"IOMMU group {group} of {label} is not viable: every device in it must be bound to vfio-pci (or pci-stub) or unbound, but ");
        m.Append(string.Join(", ", offenders.Select(o => $"{o.Device} is bound to {o.Driver}")));
        m.Append(". For each of them: ");
        m.Append(string.Join(" | ", offenders.Select(o => BindCommands(o.Device, unbindFirst: true))));
        m.Append($" (or just unbind it: echo DEV > /sys/bus/pci/devices/DEV/driver/unbind). The group's devices: ls /sys/kernel/iommu_groups/{group}/devices");
        throw Fail(m.ToString());
    }

    private VfioHostPlan ChooseBackend(string canonical, string sysPath, string name, VfioBus bus, string label, string driver, int group)
    {
        string? cdev = null;
        string vfioDev = System.IO.Path.Combine(sysPath, "vfio-dev");
        if (Directory.Exists(vfioDev))
            cdev = Directory.EnumerateFileSystemEntries(vfioDev).Select(System.IO.Path.GetFileName)
                .Where(n => n is not null && CdevName().IsMatch(n)).Order(StringComparer.Ordinal).FirstOrDefault();
        string? cdevNode = cdev is null ? null : InDev($"/dev/vfio/devices/{cdev}");
        string iommuNode = InDev("/dev/iommu");
        string groupNode = InDev($"/dev/vfio/{group}");
        string containerNode = InDev("/dev/vfio/vfio");

        bool cdevUsable = cdevNode is not null && Path.Exists(cdevNode) && Path.Exists(iommuNode);
        // The cdev path when preferred, or when it is the only one (a kernel without CONFIG_VFIO_CONTAINER).
        if (cdevUsable && (_preferIommufd || !Path.Exists(containerNode)))
        {
            CheckAccess(cdevNode!, $"/dev/vfio/devices/{cdev}", label);
            CheckAccess(iommuNode, "/dev/iommu", label);
            return new VfioHostPlan(name, bus, canonical, driver, group, VfioBackendKind.IommufdCdev, groupNode, containerNode, cdevNode, iommuNode);
        }

        if (!Path.Exists(containerNode))
        {
            var m = new StringBuilder($"{label}: VFIO's container /dev/vfio/vfio is missing. ");
            if (cdev is not null && !Path.Exists(iommuNode))
                m.Append($"The device has a VFIO cdev (/dev/vfio/devices/{cdev}) but /dev/iommu is missing: modprobe iommufd. ");
            m.Append("modprobe vfio-pci loads VFIO; a kernel built without CONFIG_VFIO_CONTAINER needs the iommufd cdev path " +
                "(CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV, Linux 6.6+).");
            throw Fail(m.ToString());
        }
        if (!Path.Exists(groupNode))
            throw Fail($"{label} is bound to {driver} but its group node /dev/vfio/{group} is missing: " +
                "check that devtmpfs/udev created it (ls -l /dev/vfio), or rebind the device");
        CheckAccess(containerNode, "/dev/vfio/vfio", label);
        CheckAccess(groupNode, $"/dev/vfio/{group}", label);
        return new VfioHostPlan(name, bus, canonical, driver, group, VfioBackendKind.LegacyGroup, groupNode, containerNode, cdevNode, iommuNode);
    }

    private void CheckAccess(string node, string shown, string label)
    {
        int r = _accessReadWrite(node);
        if (r == -Errno.EACCES || r == -Errno.EPERM)
            throw VfioErrors.OpenFailed(label, shown, -r);
    }

    private static VfioException Fail(string message) => new(message, Errno.EINVAL);

    // ---------------------------------------------------------------- RLIMIT_MEMLOCK

    private const int CapIpcLock = 14;

    /// <summary>Throws when vmm cannot pin <paramref name="needed"/> bytes (the guest RAM VFIO maps for DMA): the
    /// type1 container and iommufd both count pinned pages against RLIMIT_MEMLOCK unless the process has
    /// CAP_IPC_LOCK. Call before mapping guest RAM into a VFIO DMA space.</summary>
    public static void MemlockCheck(ulong needed)
    {
        if (FdCalls.GetRlimit(FdCalls.RLIMIT_MEMLOCK, out ulong soft, out _) < 0)
            return; // cannot tell; MAP_DMA's ENOMEM message still names the limit
        if (MemlockProblem(needed, soft, HasCapability(CapIpcLock)) is { } message)
            throw new VfioException(message, Errno.ENOMEM);
    }

    /// <summary>The message for <see cref="MemlockCheck(ulong)"/>, from given values (null when pinning fits).</summary>
    public static string? MemlockProblem(ulong needed, ulong memlockLimit, bool hasCapIpcLock)
    {
        if (hasCapIpcLock || memlockLimit == FdCalls.RLIM_INFINITY || memlockLimit >= needed)
            return null;
        ulong neededKiB = (needed + 1023) / 1024;
        return $"VFIO pins all guest RAM for device DMA: vmm needs to lock {Size(needed)} but RLIMIT_MEMLOCK is {Size(memlockLimit)}. " +
            $"Raise it: ulimit -l unlimited (or ulimit -l {neededKiB}, in KiB) in the shell that starts vmm; LimitMEMLOCK=infinity in a systemd unit; " +
            "a 'memlock' line in /etc/security/limits.conf; or run vmm with CAP_IPC_LOCK (as root, or setcap cap_ipc_lock+ep on the binary).";
    }

    private static string Size(ulong bytes) => bytes switch
    {
        >= 1UL << 30 when bytes % (1UL << 30) == 0 => $"{bytes >> 30} GiB ({bytes} bytes)",
        >= 1UL << 20 when bytes % (1UL << 20) == 0 => $"{bytes >> 20} MiB ({bytes} bytes)",
        >= 1UL << 10 when bytes % (1UL << 10) == 0 => $"{bytes >> 10} KiB ({bytes} bytes)",
        _ => $"{bytes} bytes",
    };

    /// <summary>Whether the effective capability set (CapEff in /proc/self/status) holds capability <paramref name="bit"/>.</summary>
    private static bool HasCapability(int bit)
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith("CapEff:", StringComparison.Ordinal)
                    && ulong.TryParse(line.AsSpan(7).Trim(), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out ulong caps))
                    return (caps & (1UL << bit)) != 0;
        }
        catch (IOException)
        {
        }
        return false;
    }
}
