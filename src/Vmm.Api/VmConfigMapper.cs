using System.Globalization;
using System.Text.Json;
using Vmm.Boot;
using Vmm.Interop;
using Vmm.Machine;

namespace Vmm.Api;

/// <summary>A VmConfig vmm cannot run: each message names the field (JSON path) and says why, outermost first.</summary>
public sealed class VmConfigException(IReadOnlyList<string> problems)
    : Exception("invalid VmConfig: " + string.Join("; ", problems))
{
    public IReadOnlyList<string> Problems { get; } = problems;
}

/// <summary>Where the guest's console goes, resolved once per process from the config's serial and console sections
/// (vmm has one console sink: the UART and the virtio-console port share it).</summary>
public sealed record ConsoleStreams(Stream? Output, Stream? Input, bool InteractiveTerminal = false);

/// <summary>Checks a <see cref="VmConfig"/> against what vmm implements, fills in defaults and device ids
/// (<see cref="Normalize"/>), and turns it into the <see cref="MachineConfig"/> of one boot (<see cref="ToMachine"/>).
/// Fields of CH's schema that vmm does not implement are accepted at their default value only, so a client that
/// sends every default (Kata's generated client does) works, and one that asks for more is told what and why.</summary>
public static class VmConfigMapper
{
    public const string DefaultRngSource = "/dev/urandom";

    /// <summary>Validates <paramref name="c"/> and completes it in place: defaults for what vmm implements, CH-style
    /// ids (`_disk0`, `_net1`, ...: one counter over all devices) where none was given. Throws
    /// <see cref="VmConfigException"/> listing every problem.</summary>
    public static void Normalize(VmConfig c)
    {
        var p = new List<string>();
        if (c.Payload is null)
            p.Add("payload: required");
        else
        {
            Unsupported(p, "payload.firmware", c.Payload.Firmware, "vmm boots kernels directly (no firmware)");
            Unsupported(p, "payload.igvm", c.Payload.Igvm, "IGVM images are not supported");
            Unsupported(p, "payload.host_data", c.Payload.HostData, "confidential guests are not supported");
            if (string.IsNullOrEmpty(c.Payload.Kernel))
                p.Add("payload.kernel: required (a bzImage, PVH ELF, multiboot or ELF64 kernel)");
        }
        c.Cpus ??= new CpusConfig { BootVcpus = 1, MaxVcpus = 1 };
        if (c.Cpus.BootVcpus < 1)
            p.Add($"cpus.boot_vcpus: {c.Cpus.BootVcpus} is below the minimum 1");
        if (c.Cpus.MaxVcpus != c.Cpus.BootVcpus)
            p.Add($"cpus.max_vcpus: {c.Cpus.MaxVcpus} differs from boot_vcpus {c.Cpus.BootVcpus}: vCPU hotplug is not supported");
        Unsupported(p, "cpus.topology", c.Cpus.Topology, "the topology is one core per vCPU");
        NotTrue(p, "cpus.kvm_hyperv", c.Cpus.KvmHyperv, "Hyper-V enlightenments are not supported");
        Unsupported(p, "cpus.max_phys_bits", c.Cpus.MaxPhysBits, "vmm sizes the physical address width from the devices' BARs");
        Unsupported(p, "cpus.affinity", c.Cpus.Affinity, "vCPU affinity is not supported");
        Unsupported(p, "cpus.features", c.Cpus.Features, "CPU feature selection is not supported");
        Unsupported(p, "cpus.core_scheduling", c.Cpus.CoreScheduling, "core scheduling is not supported");

        c.Memory ??= new MemoryConfig { Size = (long)MachineConfig.DefaultMemory };
        var m = c.Memory;
        if (m.Size <= 0)
            p.Add($"memory.size: {m.Size} must be a positive number of bytes");
        NotNonZero(p, "memory.hotplug_size", m.HotplugSize, "memory hotplug is not supported");
        NotNonZero(p, "memory.hotplugged_size", m.HotpluggedSize, "memory hotplug is not supported");
        NotTrue(p, "memory.mergeable", m.Mergeable, "KSM merging is not supported");
        if (m.HotplugMethod is not null and not "Acpi")
            p.Add($"memory.hotplug_method: \"{m.HotplugMethod}\" is not supported (memory hotplug is not supported)");
        // Guest RAM is always a memfd mapped MAP_SHARED, so it is shared in CH's sense (a vhost-user backend can map it).
        m.Shared ??= true;
        NotTrue(p, "memory.hugepages", m.Hugepages, "hugepage-backed guest RAM is not supported yet");
        Unsupported(p, "memory.hugepage_size", m.HugepageSize, "hugepage-backed guest RAM is not supported yet");
        NotTrue(p, "memory.prefault", m.Prefault, "prefaulting is not supported (guest RAM is MAP_NORESERVE)");
        NotTrue(p, "memory.reserve", m.Reserve, "reserving guest RAM is not supported (guest RAM is MAP_NORESERVE)");
        Unsupported(p, "memory.zones", m.Zones, "memory zones are not supported");

        Unsupported(p, "rate_limit_groups", c.RateLimitGroups, "rate limiting is not supported");
        Unsupported(p, "balloon", c.Balloon, "virtio-balloon is not supported");
        Unsupported(p, "generic_vhost_user", c.GenericVhostUser, "vhost-user devices are not supported yet");
        Unsupported(p, "pmem", c.Pmem, "virtio-pmem is not supported");
        Unsupported(p, "vdpa", c.Vdpa, "vDPA is not supported");
        Unsupported(p, "numa", c.Numa, "NUMA topologies are not supported");
        NotTrue(p, "iommu", c.Iommu, "a virtual IOMMU is not supported");
        NotTrue(p, "watchdog", c.Watchdog, "the virtio watchdog is not supported");
        Unsupported(p, "rtc", c.Rtc, "the CMOS RTC always runs on host time");
        NotTrue(p, "pvpanic", c.Pvpanic, "pvpanic is not supported");
        Mmio64Weight(c, p);
        Unsupported(p, "tpm", c.Tpm, "a TPM is not supported");
        NotTrue(p, "landlock_enable", c.LandlockEnable, "Landlock is not supported yet");
        Unsupported(p, "landlock_rules", c.LandlockRules, "Landlock is not supported yet");
        Unsupported(p, "debug_console", c.DebugConsole is { ValueKind: JsonValueKind.Object } dc && dc.TryGetProperty("mode", out var mode)
            && mode.ValueKind == JsonValueKind.String && mode.GetString() == "Off" ? null : c.DebugConsole, "the debug console is not supported (mode Off only)");
        if (c.Platform is { } pl)
        {
            if (pl.NumPciSegments is not null and not 1)
                p.Add($"platform.num_pci_segments: {pl.NumPciSegments} is not supported (vmm has one PCI segment)");
            Unsupported(p, "platform.iommu_segments", pl.IommuSegments, "a virtual IOMMU is not supported");
            Unsupported(p, "platform.iommu_address_width_bits", pl.IommuAddressWidthBits, "a virtual IOMMU is not supported");
            foreach (var (name, value) in new[] { ("system_serial_number", pl.SystemSerialNumber), ("serial_number", pl.SerialNumber), ("system_uuid", pl.SystemUuid),
                         ("uuid", pl.Uuid), ("system_manufacturer", pl.SystemManufacturer), ("system_product_name", pl.SystemProductName),
                         ("system_version", pl.SystemVersion), ("system_family", pl.SystemFamily), ("system_sku_number", pl.SystemSkuNumber), ("chassis_asset_tag", pl.ChassisAssetTag) })
                Unsupported(p, "platform." + name, value, "vmm has no SMBIOS tables");
            Unsupported(p, "platform.oem_strings", pl.OemStrings, "vmm has no SMBIOS tables");
            NotTrue(p, "platform.tdx", pl.Tdx, "confidential guests are not supported");
            NotTrue(p, "platform.sev_snp", pl.SevSnp, "confidential guests are not supported");
        }

        int nextId = 0;
        var ids = new HashSet<string>();
        // A generated id skips the ids the config gives (CH's next_device_name skips those in use), so that a config
        // naming a disk "_disk0" is not refused because another disk would have been given that name.
        var named = new HashSet<string>(c.PluggableDeviceIds().OfType<string>());
        string Id(string? given, string prefix, string path)
        {
            string? id = given;
            while (id is null || given is null && named.Contains(id))
                id = $"{prefix}{nextId++}";
            if (!ids.Add(id))
                p.Add($"{path}.id: \"{id}\" is used by another device");
            return id;
        }
        for (int i = 0; i < (c.Disks?.Count ?? 0); i++)
        {
            var d = c.Disks![i];
            string at = $"disks[{i}]";
            CheckDisk(p, at, d);
            d.Id = Id(d.Id, "_disk", at);
        }
        for (int i = 0; i < (c.Net?.Count ?? 0); i++)
        {
            var n = c.Net![i];
            string at = $"net[{i}]";
            CheckNet(p, at, n);
            n.Id = Id(n.Id, "_net", at);
        }
        for (int i = 0; i < (c.Fs?.Count ?? 0); i++)
        {
            var f = c.Fs![i];
            string at = $"fs[{i}]";
            CheckFs(p, at, f);
            f.Id = Id(f.Id, "_fs", at);
        }
        if (c.Rng is { } rng)
        {
            if (rng.Src is not ("/dev/urandom" or "/dev/random"))
                p.Add($"rng.src: \"{rng.Src}\" is not supported (vmm feeds virtio-rng from getrandom(2), as /dev/urandom does)");
            NotTrue(p, "rng.iommu", rng.Iommu, "a virtual IOMMU is not supported");
            Only(p, "rng.pci_segment", rng.PciSegment, 0, "vmm has one PCI segment");
            Unsupported(p, "rng.pci_device_id", rng.PciDeviceId, "vmm assigns PCI slots in config order");
            rng.Id ??= MachineConfig.RngId;
        }
        if (c.Vsock is { } vsock)
        {
            CheckVsock(p, "vsock", vsock);
            vsock.Id = Id(vsock.Id, "_vsock", "vsock");
        }
        c.Serial ??= new ConsoleConfig { Mode = "Null" };
        c.Console ??= new ConsoleConfig { Mode = "Tty" };
        CheckConsole(p, "serial", c.Serial);
        CheckConsole(p, "console", c.Console);
        if (c.Console.Mode != "Off")
            c.Console.Id ??= MachineConfig.ConsoleId;
        if (c.Serial.Mode is not ("Off" or "Null") && c.Console.Mode is not ("Off" or "Null") && c.Serial.Mode != c.Console.Mode)
            p.Add($"console.mode: {c.Console.Mode} with serial.mode {c.Serial.Mode}: vmm sends the UART and the virtio console to one place; give both the same mode or turn one Off");
        if (c.Serial.Mode == "File" && c.Console.Mode == "File" && c.Serial.File != c.Console.File)
            p.Add("console.file: vmm sends the UART and the virtio console to one file; give both the same file or turn one Off");
        for (int i = 0; i < (c.Devices?.Count ?? 0); i++)
        {
            var d = c.Devices![i];
            string at = $"devices[{i}]";
            CheckDevice(p, at, d);
            d.Id = Id(d.Id, "_vfio", at);
        }
        for (int i = 0; i < (c.UserDevices?.Count ?? 0); i++)
        {
            var d = c.UserDevices![i];
            string at = $"user_devices[{i}]";
            CheckUserDevice(p, at, d);
            d.Id = Id(d.Id, "_vfio_user", at);
        }
        if (p.Count > 0)
            throw new VmConfigException(p);
    }

    /// <summary>Checks one disk (a vm.create entry or a vm.add-disk body) and fills in its defaults; problems go to
    /// <paramref name="p"/>, each naming <paramref name="at"/>.</summary>
    public static void CheckDisk(List<string> p, string at, DiskConfig d)
    {
        d.Readonly ??= false;
        d.Direct ??= false;
        if (d.VhostUser == true)
        {
            // The back-end (qemu-storage-daemon) owns the image: vmm only forwards the device.
            if (string.IsNullOrEmpty(d.VhostSocket))
                p.Add($"{at}.vhost_socket: required with vhost_user: true (the back-end's socket)");
            Unsupported(p, at + ".path", string.IsNullOrEmpty(d.Path) ? null : d.Path, "a vhost-user disk's image belongs to its back-end");
            NotTrue(p, at + ".readonly", d.Readonly, "the vhost-user back-end decides (e.g. qemu-storage-daemon's writable=off)");
            NotTrue(p, at + ".direct", d.Direct, "the vhost-user back-end opens the image");
            Unsupported(p, at + ".serial", d.Serial, "the vhost-user back-end answers GET_ID");
            if (d.NumQueues is < 1 or > 64)
                p.Add($"{at}.num_queues: {d.NumQueues} is not supported (1 to 64)");
            CheckQueueSize(p, at + ".queue_size", d.QueueSize);
            d.NumQueues ??= 1;
            d.QueueSize ??= 128;
        }
        else
        {
            if (string.IsNullOrEmpty(d.Path))
                p.Add($"{at}.path: required (or vhost_user: true with vhost_socket)");
            Only(p, at + ".num_queues", d.NumQueues, 1, "vmm serves one queue per disk (more with vhost_user)");
            Only(p, at + ".queue_size", d.QueueSize, 128, "vmm's queues hold up to 256 descriptors; set 128 (CH's default) or leave it out");
            Unsupported(p, at + ".vhost_socket", d.VhostSocket, "only with vhost_user: true");
        }
        NotTrue(p, at + ".iommu", d.Iommu, "a virtual IOMMU is not supported");
        Unsupported(p, at + ".rate_limiter_config", d.RateLimiterConfig, "rate limiting is not supported");
        Only(p, at + ".pci_segment", d.PciSegment, 0, "vmm has one PCI segment");
        Unsupported(p, at + ".pci_device_id", d.PciDeviceId, "vmm assigns PCI slots in config order");
        Unsupported(p, at + ".rate_limit_group", d.RateLimitGroup, "rate limiting is not supported");
        Unsupported(p, at + ".queue_affinity", d.QueueAffinity, "queue affinity is not supported");
        NotTrue(p, at + ".backing_files", d.BackingFiles, "vmm serves raw images only");
        if (d.Sparse == false)
            p.Add($"{at}.sparse: false is not supported (discard punches holes)");
        if (d.ImageType is not null and not "Raw")
            p.Add($"{at}.image_type: \"{d.ImageType}\" is not supported (vmm serves raw images only)");
        if (d.LockGranularity is not null and not "ByteRange") // CH's default; "Full" would be one lock over the whole file
            p.Add($"{at}.lock_granularity: \"{d.LockGranularity}\" is not supported (vmm locks images in QEMU's byte-range layout only)");
        if (d.Serial is { } serial && (serial.Length > 20 || serial.Any(ch => ch is < ' ' or > '~')))
            p.Add($"{at}.serial: \"{serial}\" must be at most 20 printable ASCII characters");
    }

    /// <summary>Checks one virtio-fs device (a vm.create entry or a vm.add-fs body) and fills in CH's defaults.</summary>
    public static void CheckFs(List<string> p, string at, FsConfig f)
    {
        int tagBytes = System.Text.Encoding.UTF8.GetByteCount(f.Tag ?? "");
        if (tagBytes is 0 or > 36)
            p.Add($"{at}.tag: \"{f.Tag}\" must be 1 to 36 bytes (the virtio-fs tag field)");
        if (string.IsNullOrEmpty(f.Socket))
            p.Add($"{at}.socket: required (virtiofsd's --socket-path)");
        if (f.NumQueues is < 1 or > 63)
            p.Add($"{at}.num_queues: {f.NumQueues} is not supported (1 to 63 request queues)");
        CheckQueueSize(p, at + ".queue_size", f.QueueSize);
        Only(p, at + ".pci_segment", f.PciSegment, 0, "vmm has one PCI segment");
        Unsupported(p, at + ".pci_device_id", f.PciDeviceId, "vmm assigns PCI slots in config order");
        f.NumQueues ??= 1;
        f.QueueSize ??= 1024;
    }

    /// <summary>Checks the vsock device (vm.create's vsock or a vm.add-vsock body).</summary>
    public static void CheckVsock(List<string> p, string at, VsockConfig vsock)
    {
        if (vsock.Cid < (long)Machine.VsockConfig.MinCid || vsock.Cid > (long)Machine.VsockConfig.MaxCid)
            p.Add($"{at}.cid: {vsock.Cid} is not a guest cid ({Machine.VsockConfig.MinCid} to {Machine.VsockConfig.MaxCid}; 0-2 are reserved)");
        if (string.IsNullOrEmpty(vsock.Socket))
            p.Add($"{at}.socket: required (the Unix socket host clients connect to)");
        else if (System.Text.Encoding.UTF8.GetByteCount(vsock.Socket) > Machine.VsockConfig.MaxSocketPath)
            p.Add($"{at}.socket: \"{vsock.Socket}\" is longer than {Machine.VsockConfig.MaxSocketPath} bytes (PATH_port must fit a Unix socket address)");
        NotTrue(p, at + ".iommu", vsock.Iommu, "a virtual IOMMU is not supported");
        Only(p, at + ".pci_segment", vsock.PciSegment, 0, "vmm has one PCI segment");
        Unsupported(p, at + ".pci_device_id", vsock.PciDeviceId, "vmm assigns PCI slots in config order");
    }

    /// <summary>Checks one interface (a vm.create entry or a vm.add-net body).</summary>
    public static void CheckNet(List<string> p, string at, NetConfig n)
    {
        if (string.IsNullOrEmpty(n.Tap))
            p.Add($"{at}.tap: required (vmm attaches to a named tap; passing tap fds is not supported yet)");
        else if (n.Tap.Length > 15 || n.Tap.Any(ch => ch is '/' or ' ' or ':' || char.IsControl(ch)))
            p.Add($"{at}.tap: \"{n.Tap}\" is not a valid interface name");
        if (n.Mac is not null && ParseMac(n.Mac) is null)
            p.Add($"{at}.mac: \"{n.Mac}\" is not a unicast MAC such as 52:54:00:12:34:56");
        Only(p, at + ".ip", n.Ip, "192.168.249.1", "vmm does not configure the host side of the tap");
        Only(p, at + ".mask", n.Mask, "255.255.255.0", "vmm does not configure the host side of the tap");
        Unsupported(p, at + ".host_mac", n.HostMac, "vmm does not configure the host side of the tap");
        Unsupported(p, at + ".mtu", n.Mtu, "vmm does not set the MTU");
        NotTrue(p, at + ".iommu", n.Iommu, "a virtual IOMMU is not supported");
        Only(p, at + ".num_queues", n.NumQueues, 2, "vmm serves one receive and one transmit queue");
        Only(p, at + ".queue_size", n.QueueSize, 256, "vmm's queues hold 256 descriptors");
        NotTrue(p, at + ".vhost_user", n.VhostUser, "vhost-user networking is not supported yet");
        Unsupported(p, at + ".vhost_socket", n.VhostSocket, "vhost-user networking is not supported yet");
        Only(p, at + ".vhost_mode", n.VhostMode, "Client", "vhost-user networking is not supported yet");
        Only(p, at + ".pci_segment", n.PciSegment, 0, "vmm has one PCI segment");
        Unsupported(p, at + ".pci_device_id", n.PciDeviceId, "vmm assigns PCI slots in config order");
        Unsupported(p, at + ".rate_limiter_config", n.RateLimiterConfig, "rate limiting is not supported");
        if (n.OffloadTso == false || n.OffloadUfo == false || n.OffloadCsum == false)
            p.Add($"{at}.offload_*: turning offloads off is not supported (vmm offers checksum offload and no TSO/UFO)");
    }

    /// <summary>Checks one VFIO device (a vm.create entry or a vm.add-device body).</summary>
    public static void CheckDevice(List<string> p, string at, DeviceConfig d)
    {
        if (string.IsNullOrEmpty(d.Path))
            p.Add($"{at}.path: required (a /sys/bus/pci/devices/DDDD:BB:DD.F or /sys/bus/mdev/devices/UUID directory)");
        NotTrue(p, at + ".iommu", d.Iommu, "a virtual IOMMU is not supported");
        Only(p, at + ".pci_segment", d.PciSegment, 0, "vmm has one PCI segment");
        Unsupported(p, at + ".pci_device_id", d.PciDeviceId, "vmm assigns PCI slots in config order");
        Unsupported(p, at + ".x_nv_gpudirect_clique", d.XNvGpudirectClique, "GPUDirect cliques are not supported");
        Unsupported(p, at + ".x_exclude_mmap_bars", d.XExcludeMmapBars, "vmm maps every mmappable BAR area");
    }

    /// <summary>Checks one vfio-user device (a vm.create entry or a vm.add-user-device body).</summary>
    public static void CheckUserDevice(List<string> p, string at, UserDeviceConfig d)
    {
        if (string.IsNullOrEmpty(d.Socket))
            p.Add($"{at}.socket: required");
        Only(p, at + ".pci_segment", d.PciSegment, 0, "vmm has one PCI segment");
        Unsupported(p, at + ".pci_device_id", d.PciDeviceId, "vmm assigns PCI slots in config order");
    }

    /// <summary>The machine's view of one disk of the config.</summary>
    public static Machine.DiskConfig ToMachine(DiskConfig d) => new(d.Path ?? "", d.Readonly == true, d.Direct == true, d.Serial, d.Id)
    {
        VhostSocket = d.VhostUser == true ? d.VhostSocket : null,
        NumQueues = d.NumQueues ?? 1,
        QueueSize = (ushort)(d.QueueSize ?? 128),
    };

    public static Machine.FsConfig ToMachine(FsConfig f) => new(f.Tag!, f.Socket!, f.NumQueues ?? 1, (ushort)(f.QueueSize ?? 1024), f.Id);

    public static Machine.VsockConfig ToMachine(VsockConfig v) => new((ulong)v.Cid, v.Socket!, v.Id);

    public static Machine.NetConfig ToMachine(NetConfig n) => new(n.Tap!, n.Mac is null ? null : ParseMac(n.Mac), n.Id);

    public static PassthroughConfig ToMachine(DeviceConfig d, bool p2p) => new(PassthroughKind.Vfio, d.Path!, p2p, d.Id);

    public static PassthroughConfig ToMachine(UserDeviceConfig d, bool p2p) => new(PassthroughKind.VfioUser, d.Socket!, p2p, d.Id);

    /// <summary>Peer-to-peer DMA between passed-through devices (platform.vfio_p2p_dma; CH's default: on).</summary>
    public static bool PeerToPeer(VmConfig c) => c.Platform?.VfioP2pDma ?? true;

    /// <summary>The one PCI segment's mmio64_aperture_weight (pci_segments), 1 when not given: vmm makes the 64-bit PCI
    /// window at least weight × 64 GiB, room kept for the 64-bit BARs of hot-added devices (CH shares the 64-bit
    /// space among segments by weight; with one segment vmm reads the weight as a multiple of the default size).</summary>
    public static int Mmio64Weight(VmConfig c, List<string>? p = null)
    {
        int weight = 1;
        for (int i = 0; i < (c.PciSegments?.Count ?? 0); i++)
        {
            var segment = c.PciSegments![i];
            string at = $"pci_segments[{i}]";
            if (segment is null)
            {
                p?.Add($"{at}: must be a PciSegmentConfig object");
                continue;
            }
            if (segment.PciSegment != 0)
                p?.Add($"{at}.pci_segment: {segment.PciSegment} is not supported (vmm has one PCI segment, 0)");
            if (segment.Mmio32ApertureWeight is int w32 && w32 != 1)
                p?.Add($"{at}.mmio32_aperture_weight: {w32} is not supported (the 32-bit window is fixed at 512 MiB)");
            if (segment.Mmio64ApertureWeight is int w64)
            {
                if (w64 is >= 1 and <= 1024)
                    weight = w64;
                else
                    p?.Add($"{at}.mmio64_aperture_weight: {w64} must be an integer from 1 to 1024 (× 64 GiB of 64-bit PCI window)");
            }
        }
        return weight;
    }

    /// <summary>The machine of one boot: reads the kernel and initrd now (a missing file is a config error naming the
    /// field). <paramref name="builtInKernel"/> replaces payload.kernel (the demo guest).</summary>
    public static MachineConfig ToMachine(VmConfig c, ConsoleStreams console, BootFile? builtInKernel = null)
    {
        var payload = c.Payload!;
        var kernel = builtInKernel ?? ReadPayload(payload.Kernel!, "payload.kernel");
        var initrd = payload.Initramfs is null ? null : ReadPayload(payload.Initramfs, "payload.initramfs");
        bool p2p = PeerToPeer(c);
        var devices = new List<PassthroughConfig>();
        foreach (var d in c.Devices ?? [])
            devices.Add(ToMachine(d, p2p));
        foreach (var d in c.UserDevices ?? [])
            devices.Add(ToMachine(d, p2p));
        return new MachineConfig
        {
            Kernel = kernel,
            Module = initrd,
            Arguments = payload.Cmdline ?? "",
            MemoryBytes = (ulong)c.Memory!.Size,
            Cpus = c.Cpus!.BootVcpus,
            SerialOutput = console.Output,
            SerialInput = console.Input,
            ConsoleEscape = console.InteractiveTerminal,
            Disks = (c.Disks ?? []).Select(ToMachine).ToList(),
            Fs = (c.Fs ?? []).Select(ToMachine).ToList(),
            Nets = (c.Net ?? []).Select(ToMachine).ToList(),
            Pci64MinimumSize = (ulong)Mmio64Weight(c) * Memory.MemoryLayout.Pci64DefaultSize,
            VirtioConsole = c.Console!.Mode != "Off",
            VirtioRng = c.Rng is not null,
            Vsock = c.Vsock is { } v ? ToMachine(v) : null,
            Devices = devices,
        };
    }

    private static BootFile ReadPayload(string path, string field)
    {
        try
        {
            return new BootFile(path, HostFile.ReadRegular(path, BootFile.MaxBytes));
        }
        catch (HostFileException e)
        {
            throw new ConfigException($"{field} {path}: {e.Message}");
        }
    }

    public static byte[]? ParseMac(string text)
    {
        string[] parts = text.Split(':');
        var mac = new byte[6];
        if (parts.Length != 6)
            return null;
        for (int i = 0; i < 6; i++)
        {
            if (parts[i].Length != 2 || !byte.TryParse(parts[i], NumberStyles.HexNumber, CultureInfo.InvariantCulture, out mac[i]))
                return null;
        }
        return (mac[0] & 1) == 0 ? mac : null;
    }

    private static void CheckConsole(List<string> p, string at, ConsoleConfig c)
    {
        switch (c.Mode)
        {
            case "Off" or "Null" or "Tty":
                Unsupported(p, at + ".file", c.File, $"only mode File takes a file");
                break;
            case "File":
                if (string.IsNullOrEmpty(c.File))
                    p.Add($"{at}.file: required with mode File");
                break;
            case "Pty" or "Socket":
                p.Add($"{at}.mode: {c.Mode} is not supported (Off, Null, Tty or File)");
                break;
            default:
                p.Add($"{at}.mode: \"{c.Mode}\" is not one of Off, Pty, Tty, File, Socket, Null");
                break;
        }
        Unsupported(p, at + ".socket", c.Socket, "socket consoles are not supported");
        NotTrue(p, at + ".iommu", c.Iommu, "a virtual IOMMU is not supported");
        Only(p, at + ".pci_segment", c.PciSegment, 0, "vmm has one PCI segment");
        Unsupported(p, at + ".pci_device_id", c.PciDeviceId, "vmm assigns PCI slots in config order");
    }

    /// <summary>A queue size a vhost-user device can be given: a power of two up to 32768 (virtio 1.2 §2.7).</summary>
    private static void CheckQueueSize(List<string> p, string path, int? size)
    {
        if (size is { } s && (s is < 1 or > 32768 || (s & (s - 1)) != 0))
            p.Add($"{path}: {s} is not supported (a power of two up to 32768)");
    }

    private static void Unsupported(List<string> p, string path, object? value, string why)
    {
        if (value is null)
            return;
        if (value is JsonElement { ValueKind: JsonValueKind.Null })
            return;
        if (value is JsonElement { ValueKind: JsonValueKind.Array } array && array.GetArrayLength() == 0)
            return; // an empty list asks for nothing
        p.Add($"{path}: not supported: {why}");
    }

    private static void NotTrue(List<string> p, string path, bool? value, string why)
    {
        if (value == true)
            p.Add($"{path}: true is not supported: {why}");
    }

    private static void NotNonZero(List<string> p, string path, long? value, string why)
    {
        if (value is not null and not 0)
            p.Add($"{path}: {value} is not supported: {why}");
    }

    private static void Only<T>(List<string> p, string path, T? value, T allowed, string why) where T : struct, IEquatable<T>
    {
        if (value is { } v && !v.Equals(allowed))
            p.Add($"{path}: {v} is not supported: {why}");
    }

    private static void Only(List<string> p, string path, string? value, string allowed, string why)
    {
        if (value is not null && value != allowed)
            p.Add($"{path}: \"{value}\" is not supported: {why}");
    }
}
