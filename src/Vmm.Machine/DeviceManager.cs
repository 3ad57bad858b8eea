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
/// VFIO containers, the guest-RAM DMA mappings, the BAR slot mapper). Cold plug goes through here, and hotplug will;
/// every resource it creates is pushed on the machine's <see cref="ResourceStack"/>, in the order that makes LIFO
/// release right.</summary>
internal sealed class DeviceManager
{
    private readonly VmFd _vm;
    private readonly GuestMemory _memory;
    private readonly Log _log;
    private readonly ResourceStack _resources;
    private readonly uint _ramSlots;
    private readonly List<(PciFunction Function, PciDeviceInfo Info)> _functions = [];
    private KvmMsiController? _msi;
    private KvmIoEventRegistrar? _ioEvents;
    private KvmBarMapper? _barMapper;
    private GuestRamDma? _dma;
    private KernelVfio? _kernelVfio;
    private KvmVfioDevice? _kvmVfio;

    public DeviceManager(VmFd vm, GuestMemory memory, Log log, ResourceStack resources, uint ramSlots)
    {
        _vm = vm;
        _memory = memory;
        _log = log;
        _resources = resources;
        _ramSlots = ramSlots;
    }

    public PciRootBus Pci { get; private set; } = null!;

    /// <summary>The 64-bit PCI window, grown to hold every 64-bit BAR (for the DSDT and the CPUID address width).</summary>
    public (ulong Start, ulong Size) Window64 { get; private set; }

    public VirtioConsole? VirtioConsole { get; private set; }

    public IReadOnlyList<PciDeviceInfo> Devices => _functions.Select(f => f.Info).ToList();

    /// <summary>Builds the root bus (always there: guests probe it) with the config's devices, in slot order: virtio
    /// devices first, then passed-through ones. Places the BARs, connects INTx, and maps the bus on the I/O and MMIO
    /// buses.</summary>
    public void ColdPlug(MachineConfig config, Bus io, Bus mmio, SerialConsole console)
    {
        var planned = new List<(PciFunction Function, string Id, string Kind)>();
        if (config.HasPciDevices)
        {
            // MSI-X routes and irqfds need KVM_SET_GSI_ROUTING / KVM_IRQFD; notifications use KVM_IOEVENTFD.
            var missing = new[] { (KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING"), (KVM_CAP_IRQFD, "KVM_CAP_IRQFD"), (KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD") }
                .Where(c => _vm.CheckExtension(c.Item1) <= 0).Select(c => c.Item2).ToList();
            if (missing.Count > 0)
                throw new KvmUnavailableException($"PCI devices need {string.Join(", ", missing)}, which this KVM lacks");
            _msi = _resources.Push(new KvmMsiController(_vm), "MSI routes");
            _ioEvents = new KvmIoEventRegistrar(_vm);
            foreach (var (device, id, kind) in CreateVirtioDevices(config, console))
                planned.Add((AddVirtio(device), id, kind));
            foreach (var device in config.Devices)
                planned.Add((AddPassthrough(device, slot: planned.Count + 1), device.Id ?? "", "vfio"));
        }
        Window64 = MemoryLayout.Pci64Window(_memory.Size,
            planned.SelectMany(f => f.Function.Config.Bars).Where(b => b.Kind == PciBarKind.Memory64).Select(b => b.Size));
        Pci = new PciRootBus(Window64.Start, Window64.Size);
        io.Insert(Pci.ConfigIo, PciRootBus.ConfigIoPort, PciRootBus.ConfigIoLength);
        mmio.Insert(Pci.Ecam, MemoryLayout.PciEcamBase, MemoryLayout.PciEcamSize);
        mmio.Insert(Pci.Mmio32Window, MemoryLayout.PciMmio32Start, MemoryLayout.PciMmio32Size);
        mmio.Insert(Pci.Mmio64Window, Window64.Start, Window64.Size);
        if (planned.Count == 0)
            return;
        var intx = new SharedInterruptLine[4];
        for (int i = 0; i < intx.Length; i++)
            intx[i] = new SharedInterruptLine(new KvmIrqLine(_vm, MemoryLayout.PciIntxFirstGsi + (uint)i));
        for (int i = 0; i < planned.Count; i++)
        {
            var (function, id, kind) = planned[i];
            int slot;
            try
            {
                slot = Pci.Add(function, i + 1);
            }
            catch (PciConfigException e)
            {
                throw new ConfigException($"{e.Message}. 32-bit BARs and expansion ROMs must lie below 4 GiB, in the 32-bit PCI window " +
                    $"0x{MemoryLayout.PciMmio32Start:x}-0x{MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size - 1:x} that all devices share: " +
                    "pass fewer devices with large 32-bit BARs through");
            }
            if (function is VirtioPciFunction virtio)
                virtio.ConnectIntx(intx[MemoryLayout.PciIntxGsi(slot, 0) - MemoryLayout.PciIntxFirstGsi].Connect());
            _functions.Add((function, new PciDeviceInfo(id, kind, slot, function.Name)));
            string bars = string.Join(", ", function.Config.Bars.Select(b => $"BAR{b.Index} 0x{function.Config.BarAddress(b.Index):x} (0x{b.Size:x})"));
            _log.Info($"PCI 00:{slot:x2}.0: {function.Name}: {bars}");
        }
        if (Window64.Size != MemoryLayout.Pci64DefaultSize)
            _log.Info($"64-bit PCI window grown to 0x{Window64.Start:x}-0x{Window64.Start + Window64.Size - 1:x} for the devices' BARs");
    }

    /// <summary>Stops every virtio device from taking new requests; requests in flight complete first. Guest
    /// notifications wait in their eventfds and are served on <see cref="Resume"/>.</summary>
    public void Pause(TimeSpan timeout)
    {
        foreach (var (function, _) in _functions)
        {
            if (function is VirtioPciFunction virtio)
                virtio.Device.Pause(timeout);
        }
    }

    public void Resume()
    {
        foreach (var (function, _) in _functions)
        {
            if (function is VirtioPciFunction virtio)
                virtio.Device.Resume();
        }
    }

    /// <summary>Per-device counters for vm.counters (devices that count something).</summary>
    public IReadOnlyList<DeviceCounters> Counters()
    {
        var result = new List<DeviceCounters>();
        foreach (var (function, info) in _functions)
        {
            if (function is VirtioPciFunction { Device: IDeviceCounters counting })
                result.Add(new DeviceCounters(info.Id, counting.Counters()));
        }
        return result;
    }

    private VirtioPciFunction AddVirtio(VirtioDevice device)
    {
        try
        {
            return _resources.Push(new VirtioPciFunction(device, _memory, _msi!, _ioEvents), device.Name);
        }
        catch
        {
            device.Dispose();
            throw;
        }
    }

    /// <summary>The virtio devices of the config with their ids, in slot order. Each is pushed on the resource stack
    /// until its PCI function owns it; one that cannot be opened is a configuration error naming the option.</summary>
    private List<(VirtioDevice Device, string Id, string Kind)> CreateVirtioDevices(MachineConfig config, SerialConsole console)
    {
        var devices = new List<(VirtioDevice, string, string)>();
        try
        {
            foreach (var disk in config.Disks)
            {
                if (disk.VhostSocket is string socket)
                {
                    devices.Add((ConnectVhostUser($"--disk vhost_user=on,socket={socket}",
                        () => VhostUserDevice.CreateBlock(socket, disk.NumQueues, disk.QueueSize)), disk.Id ?? "", "disk"));
                    continue;
                }
                try
                {
                    devices.Add((new VirtioBlock(disk.Path, disk.ReadOnly, disk.Direct, disk.Serial), disk.Id ?? "", "disk"));
                }
                catch (Exception e) when (e is DiskImageException or ArgumentException)
                {
                    throw new ConfigException($"--disk path={disk.Path}: {e.Message}");
                }
            }
            foreach (var net in config.Nets)
            {
                try
                {
                    devices.Add((new VirtioNet(net.Tap, net.Mac), net.Id ?? "", "net"));
                }
                catch (Exception e) when (e is TapException or ArgumentException)
                {
                    throw new ConfigException($"--net tap={net.Tap}: {e.Message}");
                }
            }
            if (config.VirtioConsole)
            {
                VirtioConsole = new VirtioConsole(console);
                devices.Add((VirtioConsole, MachineConfig.ConsoleId, "console"));
            }
            if (config.VirtioRng)
                devices.Add((new VirtioRng(), MachineConfig.RngId, "rng"));
            foreach (var fs in config.Fs)
            {
                devices.Add((ConnectVhostUser($"--fs tag={fs.Tag},socket={fs.Socket}",
                    () => VhostUserDevice.CreateFs(fs.Socket, fs.Tag, fs.NumQueues, fs.QueueSize)), fs.Id ?? "", "fs"));
            }
            if (config.Vsock is { } vsock)
            {
                try
                {
                    devices.Add((new VirtioVsock(vsock.Cid, vsock.Socket), vsock.Id ?? "", "vsock"));
                }
                catch (Exception e) when (e is ArgumentException or Vmm.Interop.SyscallException or IOException or UnauthorizedAccessException)
                {
                    throw new ConfigException($"--vsock socket={vsock.Socket}: {e.Message}");
                }
            }
        }
        catch
        {
            foreach (var (d, _, _) in devices)
                d.Dispose();
            throw;
        }
        return devices;
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
    private VfioPciFunction AddPassthrough(PassthroughConfig config, int slot)
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
            var function = new VfioPciFunction(device, _msi!, _barMapper, intx, message => _log.Info($"{opened.Name}: {message}"));
            device = null; // the function owns it from here on
            _resources.Push(function, function.Name);
            // DMA (and peer-to-peer BAR) mappings go before any passed-through device closes: a vfio-user unmap is a
            // message to a server that must still be connected. Pushed after every device; the first release does it.
            _resources.Push("passthrough DMA mappings", ReleaseDma);
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
        _kvmVfio ??= _resources.Push(new KvmVfioDevice(_vm), "KVM VFIO device");
        _kernelVfio ??= _resources.Push(new KernelVfio(fd => _kvmVfio.AddFile(fd)), "VFIO containers");
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
