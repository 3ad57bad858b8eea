using Vmm.Boot;

namespace Vmm.Machine;

/// <summary>Everything needed to assemble one VM. Validated by <see cref="Validate"/> before any KVM call.</summary>
public sealed record MachineConfig
{
    public const ulong DefaultMemory = 128 * 1024 * 1024;
    public const ulong MaxMemory = 4UL << 40;

    /// <summary>Device ids of the singletons, as Cloud Hypervisor names them.</summary>
    public const string ConsoleId = "__console", RngId = "__rng";

    public required BootFile Kernel { get; init; }
    public BootFile? Module { get; init; }
    public string Arguments { get; init; } = "";
    public ulong MemoryBytes { get; init; } = DefaultMemory;
    public int Cpus { get; init; } = 1;

    /// <summary>Where the COM1 output goes; null discards it.</summary>
    public Stream? SerialOutput { get; init; }

    /// <summary>What COM1 receives; null for nothing.</summary>
    public Stream? SerialInput { get; init; }

    /// <summary>The input is an interactive terminal: Ctrl-A x on it powers the VM off (QEMU's console escape).</summary>
    public bool ConsoleEscape { get; init; }

    /// <summary>The in-kernel PIC/IOAPIC/LAPIC and PIT. Without it interrupts cannot be delivered and HLT exits to vmm.</summary>
    public bool InKernelIrqchip { get; init; } = true;

    public string KvmPath { get; init; } = "/dev/kvm";

    /// <summary>virtio-blk disks, in PCI slot order.</summary>
    public IReadOnlyList<DiskConfig> Disks { get; init; } = [];

    /// <summary>virtio-net interfaces on tap devices.</summary>
    public IReadOnlyList<NetConfig> Nets { get; init; } = [];

    /// <summary>A virtio-console port on the console: its output joins the UART's, and the console input goes to
    /// it instead of the UART.</summary>
    public bool VirtioConsole { get; init; }

    /// <summary>A virtio-rng device fed from the host CSPRNG.</summary>
    public bool VirtioRng { get; init; }

    /// <summary>A virtio-vsock device with its host end on Unix sockets (Firecracker's hybrid vsock).</summary>
    public VsockConfig? Vsock { get; init; }

    /// <summary>Devices passed through with VFIO or vfio-user, in PCI slot order after the virtio devices.</summary>
    public IReadOnlyList<PassthroughConfig> Devices { get; init; } = [];

    /// <summary>virtio-fs devices served by vhost-user back-ends (virtiofsd), after the other virtio devices.</summary>
    public IReadOnlyList<FsConfig> Fs { get; init; } = [];

    /// <summary>The least size of the 64-bit PCI window (CH's pci_segments mmio64_aperture_weight × 64 GiB): room
    /// for the 64-bit BARs of devices hot-added later, since the window is fixed in the DSDT at boot.</summary>
    public ulong Pci64MinimumSize { get; init; } = Memory.MemoryLayout.Pci64DefaultSize;

    public bool HasPciDevices => Disks.Count > 0 || Nets.Count > 0 || VirtioConsole || VirtioRng || Devices.Count > 0 || Fs.Count > 0 || Vsock is not null;

    /// <summary>Why the Unix socket that <paramref name="device"/> connects to (a vhost-user or vfio-user back-end)
    /// cannot be used, as one line naming the option; null when it is a socket or the device connects to none. Cold
    /// plug (<see cref="Validate"/>) and hotplug (<c>DeviceManager.HotPlug</c>) both ask. Only a stat: a regular file,
    /// a directory or a FIFO gets a line saying so (connect would say "Connection refused"), and nothing here can
    /// block.</summary>
    public static string? SocketProblem(IPciDeviceConfig device)
    {
        var (option, socket, hint) = device switch
        {
            DiskConfig { VhostSocket: string s } => ($"--disk vhost_user=on,socket={s}", s,
                $"start the back-end first, e.g. qemu-storage-daemon --export type=vhost-user-blk,addr.path={s}"),
            FsConfig fs => ($"--fs tag={fs.Tag},socket={fs.Socket}", fs.Socket, $"start virtiofsd --socket-path={fs.Socket} first"),
            PassthroughConfig { Kind: PassthroughKind.VfioUser } user => ($"--device {user}", user.Path, "start the vfio-user server first"),
            _ => ("", null, ""),
        };
        if (socket is null || Vmm.Interop.HostFile.NotASocket(socket) is not string why)
            return null;
        return why == Vmm.Interop.HostFile.NoSuchSocket ? $"{option}: {why} ({hint})" : $"{option}: {why}";
    }

    public void Validate()
    {
        if (Cpus < 1)
            throw new ConfigException($"--cpus must be at least 1, not {Cpus}");
        if (MemoryBytes < 2 * 1024 * 1024)
            throw new ConfigException($"--memory must be at least 2 MiB, not {MemoryBytes} bytes");
        if (MemoryBytes % 4096 != 0)
            throw new ConfigException($"--memory must be a multiple of 4 KiB, not {MemoryBytes} bytes");
        // KVM caps one memory slot at 2^31 - 1 pages (just under 8 TiB); vmm uses one slot above 4 GiB.
        if (MemoryBytes > MaxMemory)
            throw new ConfigException($"--memory {MemoryBytes >> 30} GiB is beyond the {MaxMemory >> 40} TiB vmm supports");
        if (Cpus > 1 && !InKernelIrqchip)
            throw new ConfigException("--cpus above 1 needs the in-kernel irqchip: without it KVM starts every vCPU at the reset vector instead of waiting for INIT/SIPI (drop --no-irqchip)");
        if (HasPciDevices && !InKernelIrqchip)
            throw new ConfigException("PCI devices need the in-kernel irqchip for their MSI-X and INTx interrupts (drop --no-irqchip)");
        // Slot 0 is the host bridge.
        int devices = Disks.Count + Nets.Count + (VirtioConsole ? 1 : 0) + (VirtioRng ? 1 : 0) + Devices.Count + Fs.Count + (Vsock is null ? 0 : 1);
        if (devices > 31)
            throw new ConfigException($"{devices} PCI devices requested; the root bus has 31 free slots");
        if (Vsock is { } vsock)
        {
            if (vsock.Cid < VsockConfig.MinCid || vsock.Cid > VsockConfig.MaxCid)
                throw new ConfigException($"--vsock cid={vsock.Cid}: the guest cid must be {VsockConfig.MinCid} to {VsockConfig.MaxCid} (0-2 are reserved: hypervisor, local, host)");
            // Before any KVM call, so a wrong path (empty, too long for PATH_port, not a free socket path) is refused at
            // once (the device checks again when it binds).
            try
            {
                Vmm.Devices.Virtio.Vsock.VirtioVsock.CheckPathFree(vsock.Socket);
            }
            catch (ArgumentException e)
            {
                throw new ConfigException($"--vsock socket={vsock.Socket}: {e.Message}");
            }
        }
        foreach (var group in Nets.GroupBy(n => n.Tap).Where(g => g.Count() > 1))
            throw new ConfigException($"--net tap={group.Key} is given {group.Count()} times; each interface needs its own tap");
        foreach (var group in Devices.GroupBy(d => (d.Kind, d.Kind == PassthroughKind.Vfio ? Path.TrimEndingDirectorySeparator(Path.GetFullPath(d.Path)) : d.Path)).Where(g => g.Count() > 1))
            throw new ConfigException($"--device {group.First()} is given {group.Count()} times; a device can be passed through once");
        foreach (var group in Disks.Where(d => d.VhostSocket is null).GroupBy(d => Path.GetFullPath(d.Path)).Where(g => g.Count() > 1 && g.Any(d => !d.ReadOnly)))
            throw new ConfigException($"--disk path={group.First().Path} is attached {group.Count()} times and writable: that corrupts the image");
        // A vhost-user back-end serves one front-end: a second connection would wait forever or steal the first.
        foreach (var group in Disks.Select(d => d.VhostSocket).Concat(Fs.Select(f => f.Socket)).OfType<string>()
                     .GroupBy(s => Path.GetFullPath(s)).Where(g => g.Count() > 1))
            throw new ConfigException($"vhost-user socket {group.First()} is given {group.Count()} times; each back-end serves one device");
        foreach (var group in Fs.GroupBy(f => f.Tag).Where(g => g.Count() > 1))
            throw new ConfigException($"--fs tag={group.Key} is given {group.Count()} times; the guest mounts a file system by its tag");
        // Before any KVM call: the back-end must be listening already (vmm is the vhost-user client).
        foreach (var device in Disks.Concat<IPciDeviceConfig>(Fs).Concat(Devices))
        {
            if (SocketProblem(device) is string problem)
                throw new ConfigException(problem);
        }
    }
}

/// <summary>An invalid machine configuration; the message says which option and why.</summary>
public sealed class ConfigException(string message) : Exception(message);

/// <summary>A device on the PCI root bus that is plugged by its config, at boot or later (<c>DeviceManager.HotPlug</c>):
/// a disk, an interface, a passed-through device. A new kind (vsock, virtio-fs) implements this and gets a case in
/// <c>DeviceManager.Create</c>; cold plug, hotplug and removal then work for it unchanged.</summary>
public interface IPciDeviceConfig
{
    /// <summary>The device's id (vm.info, vm.remove-device); the API fills one in when none is given.</summary>
    string? Id { get; }

    /// <summary>What the logs call the kind of device ("disk", "net", "vfio").</summary>
    string DeviceType { get; }
}

/// <summary>One <c>--disk</c>: a raw image served by virtio-blk, or (with <see cref="VhostSocket"/>) a virtio-blk
/// device served by a vhost-user back-end such as qemu-storage-daemon (then <paramref name="Path"/> is empty).</summary>
public sealed record DiskConfig(string Path, bool ReadOnly = false, bool Direct = false, string? Serial = null, string? Id = null) : IPciDeviceConfig
{
    public string DeviceType => "disk";

    /// <summary>The vhost-user back-end's socket (CH's vhost_user + vhost_socket), or null for an image served by vmm.</summary>
    public string? VhostSocket { get; init; }

    /// <summary>Queues and their size; only vhost-user disks take other values than 1 and 128.</summary>
    public int NumQueues { get; init; } = 1;
    public ushort QueueSize { get; init; } = 128;
}

/// <summary>One <c>--fs</c>: a virtio-fs device the guest mounts by <paramref name="Tag"/>, served by the vhost-user
/// back-end (virtiofsd) at <paramref name="Socket"/> with <paramref name="NumQueues"/> request queues.</summary>
public sealed record FsConfig(string Tag, string Socket, int NumQueues = 1, ushort QueueSize = 1024, string? Id = null) : IPciDeviceConfig
{
    public string DeviceType => "fs";
}

/// <summary>One <c>--net</c>: a virtio-net interface on tap <paramref name="Tap"/>.</summary>
public sealed record NetConfig(string Tap, byte[]? Mac = null, string? Id = null) : IPciDeviceConfig
{
    public string DeviceType => "net";
}

/// <summary><c>--vsock</c>: guest cid <paramref name="Cid"/>; host clients connect to <paramref name="Socket"/>, guest
/// connects to port P reach <c>Socket_P</c>.</summary>
public sealed record VsockConfig(ulong Cid, string Socket, string? Id = null) : IPciDeviceConfig
{
    public string DeviceType => "vsock";
    public const ulong MinCid = 3, MaxCid = uint.MaxValue - 1; // VMADDR_CID_ANY (-1U) is not a cid either
    public const int MaxSocketPath = Vmm.Devices.Virtio.Vsock.VirtioVsock.MaxSocketPath;
}

public enum PassthroughKind
{
    /// <summary>A host device through the kernel's VFIO (group/container or the iommufd cdev).</summary>
    Vfio,
    /// <summary>A device served by a vfio-user server on a Unix socket.</summary>
    VfioUser,
}

/// <summary>One <c>--device</c>: a device passed through to the guest. <paramref name="Path"/> is a sysfs device
/// directory for <see cref="PassthroughKind.Vfio"/>, a socket for <see cref="PassthroughKind.VfioUser"/>.
/// <paramref name="PeerToPeer"/> maps the BARs of every passed-through device for this device's DMA.</summary>
public sealed record PassthroughConfig(PassthroughKind Kind, string Path, bool PeerToPeer = false, string? Id = null) : IPciDeviceConfig
{
    public string DeviceType => "vfio";

    public override string ToString() => $"{(Kind == PassthroughKind.Vfio ? "vfio" : "vfio-user")}={Path}";
}
