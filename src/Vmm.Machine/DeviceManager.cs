using Vmm.Devices;
using Vmm.Devices.Legacy;
using Vmm.Devices.Pci;
using Vmm.Devices.VhostUser;
using Vmm.Devices.Vfio;
using Vmm.Devices.Vfio.Kernel;
using Vmm.Devices.Vfio.User;
using Vmm.Devices.Virtio;
using Vmm.Devices.Virtio.Net;
using Vmm.Devices.Virtio.Vsock;
using Vmm.Kvm;
using Vmm.Memory;
using static Vmm.Interop.KvmConstants;
using Vmm.Interop.Seccomp;

namespace Vmm.Machine;

/// <summary>One device on the PCI root bus, as vm.info reports it.</summary>
public sealed record PciDeviceInfo(string Id, string Kind, int Slot, string Name)
{
    /// <summary>Segment:bus:device.function, as Cloud Hypervisor writes it.</summary>
    public string Bdf => $"0000:00:{Slot:x2}.0";
}

/// <summary>What a device has done since boot (vm.counters): name → value, in Cloud Hypervisor's names.</summary>
public sealed record DeviceCounters(string Id, IReadOnlyList<KeyValuePair<string, ulong>> Values);

/// <summary>Everything on the PCI root bus: the bus itself (config ports, ECAM, BAR windows), the virtio functions and
/// the passed-through functions, with the singletons they share (the MSI controller, the KVM VFIO device, the kernel
/// VFIO containers, the guest-RAM DMA mappings, the BAR slot mapper), and the ACPI hotplug registers. Cold plug and
/// hotplug go through the same steps (<see cref="Plug"/>); every device's resources live in a stack of its own, so
/// hot removal releases exactly them, and teardown releases whatever is left in LIFO order with the machine's
/// <see cref="ResourceStack"/>.</summary>
internal sealed class DeviceManager
{
    /// <summary>How long vm.remove-device waits for the guest to eject the device.</summary>
    public static readonly TimeSpan DefaultEjectTimeout = TimeSpan.FromSeconds(10);

    private readonly VmFd _vm;
    private readonly GuestMemory _memory;
    private readonly Log _log;
    private readonly ResourceStack _resources;
    private readonly uint _ramSlots;
    // _lock guards _plugged and is held only briefly: a guest's eject (OnEject) takes it on a vCPU thread.
    // _changeLock serializes the slow part — creating a hot-added device (VFIO open, DMA maps, vhost-user handshake)
    // and releasing an ejected one — so a vCPU never waits behind either.
    private readonly Lock _lock = new();
    private readonly Lock _changeLock = new();
    private readonly List<Plugged> _plugged = [];
    // Singletons created by a hotplug, after the vCPU threads were pushed: released after the hot-plugged devices.
    private readonly ResourceStack _late;
    private KvmMsiController? _msi;
    private KvmIoEventRegistrar? _ioEvents;
    private KvmBarMapper? _barMapper;
    private GuestRamDma? _dma;
    private KernelVfio? _kernelVfio;
    private KvmVfioDevice? _kvmVfio;
    private SharedInterruptLine[] _intx = [];
    private PciHotplugController? _hotplug;
    private readonly Dictionary<IVfioDmaSpace, int> _dmaUsers = new(ReferenceEqualityComparer.Instance);
    private bool _coldPlugged, _irqchip, _capsChecked;

    /// <summary>A device on the bus with everything that is its alone.</summary>
    private sealed class Plugged(PciFunction function, PciDeviceInfo info, ResourceStack resources, bool hot)
    {
        public PciFunction Function => function;
        public PciDeviceInfo Info => info;
        public ResourceStack Resources => resources;
        public bool Hot => hot;
        public TaskCompletionSource? Ejected;
    }

    public DeviceManager(VmFd vm, GuestMemory memory, Log log, ResourceStack resources, uint ramSlots)
    {
        _vm = vm;
        _memory = memory;
        _log = log;
        _resources = resources;
        _ramSlots = ramSlots;
        _late = new ResourceStack(log);
    }

    public PciRootBus Pci { get; private set; } = null!;

    /// <summary>The 64-bit PCI window, grown to hold every 64-bit BAR (for the DSDT and the CPUID address width).</summary>
    public (ulong Start, ulong Size) Window64 { get; private set; }

    public VirtioConsole? VirtioConsole { get; private set; }

    /// <summary>Called (on a worker thread) after a device left the bus: the guest ejected it.</summary>
    public Action<PciDeviceInfo>? DeviceRemoved { get; set; }

    public IReadOnlyList<PciDeviceInfo> Devices
    {
        get
        {
            lock (_lock)
                return _plugged.Select(p => p.Info).OrderBy(i => i.Slot).ToList();
        }
    }

    private List<PciFunction> Functions
    {
        get
        {
            lock (_lock)
                return _plugged.Select(p => p.Function).ToList();
        }
    }

    /// <summary>Builds the root bus (always there: guests probe it) with the config's devices, in slot order: virtio
    /// devices first, then passed-through ones. Places the BARs, connects INTx, and maps the bus and the hotplug
    /// registers on the MMIO bus.</summary>
    public void ColdPlug(MachineConfig config, Bus io, Bus mmio, SerialConsole console)
    {
        _irqchip = config.InKernelIrqchip;
        // Teardown order (LIFO): the vCPUs stop (pushed later by the machine), then the DMA mappings go, the devices
        // close (cold ones, then hot-added ones), the MSI routes and the singletons a hotplug created.
        _resources.Push("hotplug singletons", _late.Dispose);
        if (_irqchip)
        {
            _msi = _resources.Push(new KvmMsiController(_vm), "MSI routes");
            _ioEvents = new KvmIoEventRegistrar(_vm);
        }
        _resources.Push("hot-plugged devices", ReleaseHotPlugged);
        if (config.HasPciDevices)
            CheckPciCapabilities();
        var planned = new List<(Func<ResourceStack, PciFunction> Create, IPciDeviceConfig? Config, string Id, string Kind)>();
        foreach (var disk in config.Disks)
            planned.Add((null!, disk, disk.Id ?? "", "disk"));
        foreach (var net in config.Nets)
            planned.Add((null!, net, net.Id ?? "", "net"));
        if (config.VirtioConsole)
            planned.Add((r => AddVirtio(VirtioConsole = new VirtioConsole(console), r), null, MachineConfig.ConsoleId, "console"));
        if (config.VirtioRng)
            planned.Add((r => AddVirtio(new VirtioRng(), r), null, MachineConfig.RngId, "rng"));
        foreach (var fs in config.Fs)
            planned.Add((null!, fs, fs.Id ?? "", "fs"));
        if (config.Vsock is { } vsock)
            planned.Add((null!, vsock, vsock.Id ?? "", "vsock"));
        foreach (var device in config.Devices)
            planned.Add((null!, device, device.Id ?? "", "vfio"));

        // The functions exist before the bus: the 64-bit window is sized for their BARs.
        var created = new List<(PciFunction Function, ResourceStack Resources, string Id, string Kind)>();
        int slot = 1;
        foreach (var (create, deviceConfig, id, kind) in planned)
        {
            var resources = new ResourceStack(_log);
            PciFunction function;
            try
            {
                function = deviceConfig is null ? create(resources) : Create(deviceConfig, resources, slot);
            }
            catch
            {
                resources.Dispose();
                throw;
            }
            // After what the device created on the machine's stack (the VFIO containers): released before those.
            _resources.Push(id.Length > 0 ? id : kind, resources.Dispose);
            created.Add((function, resources, id, kind));
            slot++;
        }
        // DMA (and peer-to-peer BAR) mappings go before any passed-through device closes: a vfio-user unmap is a
        // message to a server that must still be connected. Pushed after every device; the first release does it.
        _resources.Push("passthrough DMA mappings", ReleaseDma);

        Window64 = MemoryLayout.Pci64Window(_memory.Size,
            created.SelectMany(f => f.Function.Config.Bars).Where(b => b.Kind == PciBarKind.Memory64).Select(b => b.Size),
            config.Pci64MinimumSize);
        Pci = new PciRootBus(Window64.Start, Window64.Size);
        io.Insert(Pci.ConfigIo, PciRootBus.ConfigIoPort, PciRootBus.ConfigIoLength);
        mmio.Insert(Pci.Ecam, MemoryLayout.PciEcamBase, MemoryLayout.PciEcamSize);
        mmio.Insert(Pci.Mmio32Window, MemoryLayout.PciMmio32Start, MemoryLayout.PciMmio32Size);
        mmio.Insert(Pci.Mmio64Window, Window64.Start, Window64.Size);
        if (_irqchip)
        {
            _hotplug = new PciHotplugController(new KvmIrqLine(_vm, MemoryLayout.GedGsi), OnEject);
            mmio.Insert(_hotplug, MemoryLayout.PciHotplugAddress, MemoryLayout.PciHotplugSize);
            _intx = new SharedInterruptLine[4];
            for (int i = 0; i < _intx.Length; i++)
                _intx[i] = new SharedInterruptLine(new KvmIrqLine(_vm, MemoryLayout.PciIntxFirstGsi + (uint)i));
        }
        for (int i = 0; i < created.Count; i++)
        {
            var (function, resources, id, kind) = created[i];
            Place(function, resources, id, kind, i + 1, hot: false);
        }
        if (Window64.Size != config.Pci64MinimumSize)
            _log.Info($"64-bit PCI window grown to 0x{Window64.Start:x}-0x{Window64.Start + Window64.Size - 1:x} for the devices' BARs");
        _coldPlugged = true;
    }

    /// <summary>Hot-adds the device <paramref name="config"/> describes: creates it (as cold plug does), puts it in the
    /// first free slot with its BARs in free space of the windows fixed at boot, wires its interrupts and tells the
    /// guest (PCIU and the GED interrupt; Linux's acpiphp then scans the slot). Returns where it went.</summary>
    public PciDeviceInfo HotPlug(IPciDeviceConfig config)
    {
        if (!_coldPlugged || _hotplug is null)
            throw new ConfigException("PCI hotplug needs the in-kernel irqchip (the GED interrupt, MSI-X and INTx; drop --no-irqchip)");
        string id = config.Id ?? throw new ArgumentException("a hot-added device needs an id", nameof(config));
        // The same checks as cold plug's MachineConfig.Validate, before anything is created.
        if (MachineConfig.SocketProblem(config) is string problem)
            throw new ConfigException(problem);
        lock (_changeLock)
        {
            lock (_lock)
            {
                if (_plugged.Any(p => p.Info.Id == id))
                    throw new ConfigException($"device id \"{id}\" is in use");
            }
            CheckPciCapabilities();
            int slot = Pci.FirstFreeSlot();
            if (slot < 0)
                throw new ConfigException($"no free PCI slot for {config.DeviceType} {id}: all {PciRootBus.SlotCount - 1} are taken");
            var resources = new ResourceStack(_log);
            try
            {
                var function = Create(config, resources, slot);
                var info = Place(function, resources, id, config.DeviceType, slot, hot: true);
                _hotplug.SignalUp(info.Slot);
                _log.Info($"hot-added {config.DeviceType} {id} at {info.Bdf}");
                return info;
            }
            catch
            {
                resources.Dispose();
                throw;
            }
        }
    }

    /// <summary>Asks the guest to eject device <paramref name="id"/> (PCID and the GED interrupt; acpiphp unbinds its
    /// driver and runs _EJ0). The task completes once the guest ejected it and its resources are released.</summary>
    public Task RequestRemoval(string id)
    {
        if (_hotplug is null)
            throw new ConfigException("PCI hotplug needs the in-kernel irqchip (drop --no-irqchip)");
        lock (_lock)
        {
            var p = _plugged.FirstOrDefault(p => p.Info.Id == id) ?? throw new KeyNotFoundException($"no device with id \"{id}\"");
            p.Ejected ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _hotplug.SignalDown(p.Info.Slot);
            _log.Info($"asked the guest to eject {p.Info.Kind} {id} at {p.Info.Bdf}");
            return p.Ejected.Task;
        }
    }

    /// <summary>The guest wrote the slot's bit to B0EJ (on a vCPU thread): the function leaves the bus at once (its
    /// config space reads all-ones, its BARs decode nowhere), and its resources are released off the vCPU thread.</summary>
    private void OnEject(int slot)
    {
        Plugged? p;
        lock (_lock)
        {
            p = _plugged.FirstOrDefault(x => x.Info.Slot == slot);
            if (p is null)
                return; // nothing there (a guest may eject an empty slot)
            _plugged.Remove(p);
            Pci.Remove(slot);
        }
        _log.Info($"guest ejected {p.Info.Kind} {p.Info.Id} at {p.Info.Bdf}");
        // Task.Run from the spawner: a worker the pool starts from a vCPU thread is refused (SeccompThreads.Post).
        SeccompThreads.Post(() => Task.Run(() =>
        {
            lock (_changeLock)
                p.Resources.Dispose();
            p.Ejected?.TrySetResult();
            try
            {
                DeviceRemoved?.Invoke(p.Info);
            }
            catch (Exception e)
            {
                _log.Warn($"device-removed handler: {e.Message}");
            }
        }));
    }

    /// <summary>Teardown: the devices added since boot, newest first; a removal still waiting fails.</summary>
    private void ReleaseHotPlugged()
    {
        List<Plugged> hot;
        lock (_lock)
        {
            hot = _plugged.Where(p => p.Hot).Reverse().ToList();
            foreach (var p in _plugged)
                p.Ejected?.TrySetException(new InvalidOperationException("the VM stopped before the guest ejected the device"));
        }
        foreach (var p in hot)
            p.Resources.Dispose();
    }

    /// <summary>Puts <paramref name="function"/> on the bus and connects its INTx pin. A BAR that does not fit is a
    /// configuration error that says which window and how to make room.</summary>
    private PciDeviceInfo Place(PciFunction function, ResourceStack resources, string id, string kind, int slot, bool hot)
    {
        try
        {
            slot = Pci.Add(function, slot);
        }
        catch (PciConfigException e)
        {
            string hint = hot
                ? $"The PCI windows are fixed at boot: 32-bit 0x{MemoryLayout.PciMmio32Start:x}-0x{MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size - 1:x}, " +
                  $"64-bit 0x{Window64.Start:x}-0x{Window64.Start + Window64.Size - 1:x}; boot with room for hot-added 64-bit BARs " +
                  "(--pci-segment pci_segment=0,mmio64_aperture_weight=N or VmConfig pci_segments: a 64-bit window of N × 64 GiB) or remove a device first"
                : $"32-bit BARs and expansion ROMs must lie below 4 GiB, in the 32-bit PCI window " +
                  $"0x{MemoryLayout.PciMmio32Start:x}-0x{MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size - 1:x} that all devices share: " +
                  "pass fewer devices with large 32-bit BARs through";
            throw new ConfigException($"{e.Message}. {hint}");
        }
        if (function is VirtioPciFunction virtio && _intx.Length > 0)
        {
            var line = _intx[MemoryLayout.PciIntxGsi(slot, 0) - MemoryLayout.PciIntxFirstGsi].Connect();
            virtio.ConnectIntx(line);
            // After the function closes (LIFO): its level must not hold the shared line up.
            if (line is IDisposable d)
                resources.Push(d, "INTx");
        }
        var info = new PciDeviceInfo(id, kind, slot, function.Name);
        lock (_lock)
            _plugged.Add(new Plugged(function, info, resources, hot));
        string bars = string.Join(", ", function.Config.Bars.Select(b => $"BAR{b.Index} 0x{function.Config.BarAddress(b.Index):x} (0x{b.Size:x})"));
        _log.Info($"PCI 00:{slot:x2}.0: {function.Name}: {bars}");
        return info;
    }

    /// <summary>MSI-X routes and irqfds need KVM_SET_GSI_ROUTING / KVM_IRQFD; notifications use KVM_IOEVENTFD.</summary>
    private void CheckPciCapabilities()
    {
        if (_capsChecked)
            return;
        if (!_irqchip)
            throw new ConfigException("PCI devices need the in-kernel irqchip for their MSI-X and INTx interrupts (drop --no-irqchip)");
        var missing = new[] { (KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING"), (KVM_CAP_IRQFD, "KVM_CAP_IRQFD"), (KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD") }
            .Where(c => _vm.CheckExtension(c.Item1) <= 0).Select(c => c.Item2).ToList();
        if (missing.Count > 0)
            throw new KvmUnavailableException($"PCI devices need {string.Join(", ", missing)}, which this KVM lacks");
        _capsChecked = true;
    }

    /// <summary>The function for one device config; its resources go on <paramref name="resources"/>. One that cannot
    /// be opened is a configuration error naming the option. New kinds of devices get a case here.</summary>
    private PciFunction Create(IPciDeviceConfig config, ResourceStack resources, int slot) => config switch
    {
        DiskConfig { VhostSocket: string socket } disk => AddVirtio(ConnectVhostUser($"--disk vhost_user=on,socket={socket}",
            () => VhostUserDevice.CreateBlock(socket, disk.NumQueues, disk.QueueSize)), resources),
        DiskConfig disk => AddVirtio(OpenDisk(disk), resources),
        NetConfig net => AddVirtio(OpenNet(net), resources),
        FsConfig fs => AddVirtio(ConnectVhostUser($"--fs tag={fs.Tag},socket={fs.Socket}",
            () => VhostUserDevice.CreateFs(fs.Socket, fs.Tag, fs.NumQueues, fs.QueueSize)), resources),
        VsockConfig vsock => AddVirtio(OpenVsock(vsock), resources),
        PassthroughConfig device => AddPassthrough(device, slot, resources),
        _ => throw new ConfigException($"{config.DeviceType} devices cannot be plugged yet"),
    };

    private static VirtioBlock OpenDisk(DiskConfig disk)
    {
        try
        {
            return new VirtioBlock(disk.Path, disk.ReadOnly, disk.Direct, disk.Serial);
        }
        catch (Exception e) when (e is DiskImageException or ArgumentException)
        {
            throw new ConfigException($"--disk path={disk.Path}: {e.Message}");
        }
    }

    private static VirtioVsock OpenVsock(VsockConfig vsock)
    {
        try
        {
            return new VirtioVsock(vsock.Cid, vsock.Socket);
        }
        catch (Exception e) when (e is ArgumentException or Vmm.Interop.SyscallException or IOException or UnauthorizedAccessException)
        {
            throw new ConfigException($"--vsock socket={vsock.Socket}: {e.Message}");
        }
    }

    private static VirtioNet OpenNet(NetConfig net)
    {
        try
        {
            return new VirtioNet(net.Tap, net.Mac);
        }
        catch (Exception e) when (e is TapException or ArgumentException)
        {
            throw new ConfigException($"--net tap={net.Tap}: {e.Message}");
        }
    }

    /// <summary>Stops every virtio device from taking new requests; requests in flight complete first. Guest
    /// notifications wait in their eventfds and are served on <see cref="Resume"/>.</summary>
    public void Pause(TimeSpan timeout)
    {
        foreach (var function in Functions)
        {
            if (function is VirtioPciFunction virtio)
                virtio.Device.Pause(timeout);
        }
    }

    public void Resume()
    {
        foreach (var function in Functions)
        {
            if (function is VirtioPciFunction virtio)
                virtio.Device.Resume();
        }
    }

    /// <summary>Per-device counters for vm.counters (devices that count something).</summary>
    public IReadOnlyList<DeviceCounters> Counters()
    {
        var result = new List<DeviceCounters>();
        List<Plugged> plugged;
        lock (_lock)
            plugged = [.. _plugged];
        foreach (var p in plugged)
        {
            if (p.Function is VirtioPciFunction { Device: IDeviceCounters counting })
                result.Add(new DeviceCounters(p.Info.Id, counting.Counters()));
        }
        return result;
    }

    /// <summary>A virtio device as a PCI function with MSI-X vectors of its own (given back on removal).</summary>
    private VirtioPciFunction AddVirtio(VirtioDevice device, ResourceStack resources)
    {
        try
        {
            if (_msi is null)
                throw new ConfigException("PCI devices need the in-kernel irqchip for their MSI-X and INTx interrupts (drop --no-irqchip)");
            var vectors = new DeviceMsiVectors(_msi);
            resources.Push("MSI vectors", vectors.Release);
            return resources.Push(new VirtioPciFunction(device, _memory, vectors, _ioEvents), device.Name);
        }
        catch
        {
            device.Dispose();
            throw;
        }
    }

    /// <summary>Connects to a vhost-user back-end and runs the handshake; an absent socket, a back-end that refuses or
    /// breaks the protocol is one configuration error naming the option.</summary>
    private VhostUserDevice ConnectVhostUser(string option, Func<VhostUserDevice> connect)
    {
        try
        {
            var device = connect();
            _log.Info($"{device.Name}: back-end features 0x{device.BackendFeatures:x}, protocol features 0x{device.ProtocolFeatures:x}");
            return device;
        }
        catch (Exception e) when (e is VhostUserException or ArgumentException)
        {
            throw new ConfigException($"{option}: {e.Message}");
        }
    }

    /// <summary>Opens one passed-through device, maps all guest RAM for its DMA and builds the PCI function the guest
    /// sees. Every VFIO or PCI failure becomes one configuration error naming the option.</summary>
    private VfioPciFunction AddPassthrough(PassthroughConfig config, int slot, ResourceStack resources)
    {
        IVfioDevice? device = null;
        try
        {
            device = config.Kind switch
            {
                PassthroughKind.VfioUser => VfioUserClient.Connect(config.Path, new VfioUserClientOptions { DmaMemory = _memory }),
                _ => OpenKernelVfio(config.Path),
            };
            if (!device.IsPci)
                throw new ConfigException($"--device {config}: {device.Name} is not a PCI device (vmm passes through PCI devices only)");
            if (_barMapper is null)
            {
                int slots = _vm.CheckExtension(KVM_CAP_NR_MEMSLOTS);
                _barMapper = new KvmBarMapper(_vm, _log, _ramSlots, slots > 0 ? slots : 32);
            }
            _dma ??= new GuestRamDma(_memory, _log);
            try
            {
                _dma.MapAll(device.Dma, device.Name);
            }
            catch (VfioException e)
            {
                throw new ConfigException($"--device {config}: mapping guest RAM for the device's DMA failed: {e.Message}");
            }
            if (config.PeerToPeer)
                _barMapper.AddPeerToPeerSpace(device.Dma);
            Span<byte> pin = stackalloc byte[1];
            device.ReadRegion(VfioRegionIndex.Config, PciConfigSpace.InterruptPin, pin);
            var intx = pin[0] is >= 1 and <= 4 ? new KvmIntxIrqfdLine(_vm, MemoryLayout.PciIntxGsi(slot, pin[0] - 1)) : null;
            var opened = device;
            var space = device.Dma;
            var vectors = new DeviceMsiVectors(_msi!);
            resources.Push("MSI vectors", vectors.Release);
            _dmaUsers[space] = _dmaUsers.GetValueOrDefault(space) + 1;
            var function = new VfioPciFunction(device, vectors, _barMapper, intx, message => _log.Info($"{opened.Name}: {message}"));
            device = null; // the function owns it from here on
            resources.Push(function, function.Name);
            // Before the device closes (a vfio-user unmap is a message to a server that must still be connected): the
            // last device of a DMA space takes guest RAM and the peer-to-peer BARs out of it. At teardown the machine's
            // "passthrough DMA mappings" step has done that for every space already.
            resources.Push("DMA mappings", () => ReleaseDmaSpace(space));
            return function;
        }
        catch (Exception e) when (e is VfioException or PciConfigException)
        {
            throw new ConfigException($"--device {config}: {e.Message}");
        }
        finally
        {
            device?.Dispose();
        }
    }

    private void ReleaseDmaSpace(IVfioDmaSpace space)
    {
        int users = _dmaUsers.GetValueOrDefault(space) - 1;
        if (users > 0)
        {
            _dmaUsers[space] = users;
            return;
        }
        _dmaUsers.Remove(space);
        _barMapper?.RemovePeerToPeerSpace(space);
        _dma?.Unmap(space);
    }

    private void ReleaseDma()
    {
        _barMapper?.StopPeerToPeer();
        _dma?.Dispose();
    }

    /// <summary>A host device through the kernel: the sysfs plan first (a wrong driver, a non-viable group or a
    /// missing IOMMU is explained before anything is opened), then the cdev on iommufd or the group/container, with
    /// its file added to KVM's VFIO device (KVM needs it for coherent DMA and, on the cdev path, before binding).</summary>
    private KernelVfioDevice OpenKernelVfio(string path)
    {
        var plan = new VfioHost().Plan(path);
        // Pushed before the device's own stack at cold plug; after a hotplug, on the stack released after the devices.
        var stack = _coldPlugged ? _late : _resources;
        _kvmVfio ??= stack.Push(new KvmVfioDevice(_vm), "KVM VFIO device");
        _kernelVfio ??= stack.Push(new KernelVfio(fd => _kvmVfio.AddFile(fd)), "VFIO containers");
        var device = _kernelVfio.Open(plan);
        _log.Info($"{plan.Name}: VFIO {plan.Backend}, IOMMU group {plan.IommuGroup}, driver {plan.Driver}");
        // Every distinct container/IOAS pins all guest RAM once, against RLIMIT_MEMLOCK: refuse before pinning.
        try
        {
            VfioHost.MemlockCheck(_memory.Size * (ulong)_kernelVfio.DmaSpaces.Count);
        }
        catch
        {
            device.Dispose();
            throw;
        }
        return device;
    }
}
