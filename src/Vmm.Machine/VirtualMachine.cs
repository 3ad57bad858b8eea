using System.Text;
using Vmm.Boot;
using Vmm.Boot.Acpi;
using Vmm.Devices;
using Vmm.Devices.Legacy;
using Vmm.Devices.Pci;
using Vmm.Devices.Virtio;
using Vmm.Devices.Vfio;
using Vmm.Devices.Vfio.Kernel;
using Vmm.Devices.Vfio.User;
using Vmm.Devices.Virtio.Net;
using Vmm.Kvm;
using Vmm.Memory;
using static Vmm.Interop.KvmConstants;

namespace Vmm.Machine;

/// <summary>Assembles one x86 VM from a <see cref="MachineConfig"/>: KVM VM with in-kernel irqchip and PIT,
/// guest RAM, the legacy devices on the I/O bus, the loaded kernel and one thread per vCPU; runs it to its
/// end and tears everything down.</summary>
public sealed class VirtualMachine : IVmControl, IDisposable
{
    /// <summary>Capabilities vmm cannot run without, with their uapi names for the error message.</summary>
    private static readonly (int Cap, string Name)[] s_requiredCaps =
    [
        (KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
        (KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"),
        (KVM_CAP_MP_STATE, "KVM_CAP_MP_STATE"),
        (KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
    ];

    private static readonly (int Cap, string Name)[] s_irqchipCaps =
    [
        (KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
        (KVM_CAP_PIT2, "KVM_CAP_PIT2"),
    ];

    private readonly MachineConfig _config;
    private readonly Log _log;
    private readonly KvmSystem? _kvm;
    private readonly VmFd _vm;
    private readonly GuestMemory _memory;
    private readonly SerialConsole _console;
    private Vcpu[] _vcpus = [];
    private readonly ManualResetEventSlim _stopped = new(false);
    private VmOutcome? _outcome;
    private volatile bool _stopping;
    private bool _disposed;

    public VirtualMachine(MachineConfig config, Log log)
    {
        config.Validate();
        _config = config;
        _log = log;
        // Memory and kernel first: a bad image is reported the same with or without KVM.
        _memory = GuestMemory.Create(config.MemoryBytes);
        try
        {
            Kernel = KernelLoader.Load(_memory, config.Kernel, config.Arguments, config.Module);
            _log.Info($"loaded {config.Kernel.Name} as {Kernel.Format}, entry 0x{Kernel.Cpu.Rip:x}; command line \"{Kernel.CommandLine}\"");
            foreach (var warning in Kernel.Warnings)
                _log.Warn(warning);
            _kvm = KvmSystem.Open(config.KvmPath);
            CheckCapabilities();
            _vm = _kvm!.CreateVm();
            SetUpArchitecture();
            uint slot = 0;
            foreach (var region in _memory.Regions)
                _vm.SetUserMemoryRegion(slot++, region.Start.Value, region.Size, region.HostAddress);
            _ramSlots = slot;

            IoBus = new Bus("I/O port");
            MmioBus = new Bus("MMIO");
            _console = new SerialConsole(config.SerialOutput);
            Serial = new Serial16550(new KvmIrqLine(_vm, 4), _console);
            PostCode = new PostCodeSink();
            IoBus.Insert(Serial, 0x3F8, 8);
            IoBus.Insert(new DebugExit(this), DebugExit.DefaultPort, DebugExit.Width);
            IoBus.Insert(new I8042(this), I8042.DataPort, 5);
            IoBus.Insert(PostCode, PostCodeSink.DefaultPort, 1);
            ulong below4G = 0;
            foreach (var region in _memory.Regions)
            {
                if (region.Start.Value < MemoryLayout.MmioHoleStart)
                    below4G += region.Size;
            }
            IoBus.Insert(new CmosRtc(below4G, _memory.Size - below4G), CmosRtc.Port, 2);
            IoBus.Insert(new AcpiPmDevice(this), AcpiPorts.BlockStart, AcpiPorts.BlockLength);
            var window64 = SetUpPci();
            // In the BIOS area the memory map leaves out, where every loader's guest finds it; the DSDT describes
            // the 64-bit window as grown for the devices' BARs.
            AcpiTables.Write(_memory, config.Cpus, window64);
            int physicalAddressBits = CheckPhysicalAddressWidth(window64.Start + window64.Size);

            KickSignal.EnsureInstalled();
            var dispatcher = new ExitDispatcher(IoBus, MmioBus);
            var cpuid = _kvm!.GetSupportedCpuid();
            var vcpus = new List<Vcpu>();
            try
            {
                for (int i = 0; i < config.Cpus; i++)
                {
                    vcpus.Add(new Vcpu(_vm.CreateVcpu(i), this, dispatcher, _memory));
                    vcpus[^1].ConfigureCpuid(cpuid, config.Cpus, physicalAddressBits);
                    vcpus[^1].SetInitialMsrs();
                }
            }
            finally
            {
                _vcpus = [.. vcpus]; // published whole: Finish() may run on other threads from now on
            }
            // The other vCPUs wait for INIT/SIPI: KVM starts APs uninitialized when the LAPIC is in the kernel.
            _vcpus[0].SetBootState(Kernel.Cpu);
            // Input last: a Ctrl-A x already waiting in the terminal may end the VM at once.
            if (config.SerialInput is not null)
                _console.AttachInput(config.SerialInput, (IConsoleInput?)_virtioConsole ?? Serial,
                    config.ConsoleEscape ? () => RequestPowerOff("Ctrl-A x on the console") : null);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    public Bus IoBus { get; } = null!;
    public PciRootBus Pci { get; private set; } = null!;
    private readonly List<VirtioPciFunction> _virtio = [];
    private readonly List<VfioPciFunction> _passthrough = [];
    private GuestRamDma? _dma;
    private KvmBarMapper? _barMapper;
    private KernelVfio? _kernelVfio;
    private KvmVfioDevice? _kvmVfio;
    private uint _ramSlots;
    private KvmMsiController? _msi;
    private VirtioConsole? _virtioConsole;
    public Bus MmioBus { get; } = null!;
    public Serial16550 Serial { get; } = null!;
    public PostCodeSink PostCode { get; } = null!;
    public LoadedKernel Kernel { get; } = null!;

    /// <summary>Per-vCPU counters, complete once <see cref="Run"/> returned.</summary>
    public IReadOnlyList<VcpuStats> VcpuStats => _vcpus.Select(v => v.Stats).ToList();

    internal bool Stopping => _stopping;

    private void CheckCapabilities()
    {
        var required = _config.InKernelIrqchip ? s_requiredCaps.Concat(s_irqchipCaps) : s_requiredCaps;
        var missing = required.Where(c => _kvm!.CheckExtension(c.Cap) <= 0).Select(c => $"{c.Name} ({c.Cap})").ToList();
        if (missing.Count > 0)
            throw new KvmUnavailableException($"this KVM lacks capabilities vmm relies on: {string.Join(", ", missing)}");
        int maxVcpus = _kvm!.CheckExtension(KVM_CAP_MAX_VCPUS);
        if (maxVcpus <= 0)
            maxVcpus = _kvm.CheckExtension(KVM_CAP_NR_VCPUS);
        if (maxVcpus <= 0)
            maxVcpus = 4; // the documented default when neither capability answers
        if (_config.Cpus > maxVcpus)
            throw new ConfigException($"--cpus {_config.Cpus} is more than this KVM allows ({maxVcpus})");
        if (_config.Cpus > AcpiTables.MaxCpus)
            throw new ConfigException($"--cpus {_config.Cpus}: vmm describes at most {AcpiTables.MaxCpus} vCPUs to the guest (8-bit APIC ids in the MADT)");
        int recommended = _kvm.CheckExtension(KVM_CAP_NR_VCPUS);
        if (recommended > 0 && _config.Cpus > recommended)
            _log.Warn($"--cpus {_config.Cpus} exceeds the {recommended} vCPUs KVM recommends on this host");
    }

    private void SetUpArchitecture()
    {
        // Intel without unrestricted guest needs these for real mode; elsewhere they are harmless no-ops.
        try
        {
            _vm.SetIdentityMapAddress(MemoryLayout.IdentityMapAddress);
            _vm.SetTssAddress(MemoryLayout.TssAddress);
        }
        catch (KvmException e)
        {
            _log.Debug($"ignored: {e.Message}");
        }
        if (_config.InKernelIrqchip)
        {
            _vm.CreateIrqChip();
            _vm.CreatePit2();
        }
    }

    /// <summary>The PCI root bus (always there: guests probe it), the virtio devices and the passed-through devices
    /// the config asks for. The 64-bit window grows to hold every 64-bit BAR (several GPUs with BARs of hundreds of
    /// GiB); it is returned for the DSDT and the CPUID address width.</summary>
    private (ulong Start, ulong Size) SetUpPci()
    {
        var functions = new List<PciFunction>();
        if (_config.HasPciDevices)
        {
            // MSI-X routes and irqfds need KVM_SET_GSI_ROUTING / KVM_IRQFD; notifications use KVM_IOEVENTFD.
            var missing = new[] { (KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING"), (KVM_CAP_IRQFD, "KVM_CAP_IRQFD"), (KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD") }
                .Where(c => _vm.CheckExtension(c.Item1) <= 0).Select(c => c.Item2).ToList();
            if (missing.Count > 0)
                throw new KvmUnavailableException($"PCI devices need {string.Join(", ", missing)}, which this KVM lacks");
            _msi = new KvmMsiController(_vm);
            var ioEvents = new KvmIoEventRegistrar(_vm);
            var created = CreateVirtioDevices();
            for (int i = 0; i < created.Count; i++)
            {
                try
                {
                    _virtio.Add(new VirtioPciFunction(created[i], _memory, _msi, ioEvents));
                }
                catch
                {
                    foreach (var d in created.Skip(i))
                        d.Dispose();
                    throw;
                }
            }
            functions.AddRange(_virtio);
            // Passed-through devices take the slots after the virtio devices (slot 0 is the host bridge).
            foreach (var device in _config.Devices)
                functions.Add(CreatePassthroughFunction(device, slot: functions.Count + 1));
        }
        var window = MemoryLayout.Pci64Window(_memory.Size,
            functions.SelectMany(f => f.Config.Bars).Where(b => b.Kind == PciBarKind.Memory64).Select(b => b.Size));
        Pci = new PciRootBus(window.Start, window.Size);
        IoBus.Insert(Pci.ConfigIo, PciRootBus.ConfigIoPort, PciRootBus.ConfigIoLength);
        MmioBus.Insert(Pci.Ecam, MemoryLayout.PciEcamBase, MemoryLayout.PciEcamSize);
        MmioBus.Insert(Pci.Mmio32Window, MemoryLayout.PciMmio32Start, MemoryLayout.PciMmio32Size);
        MmioBus.Insert(Pci.Mmio64Window, window.Start, window.Size);
        if (functions.Count == 0)
            return window;
        var intx = new SharedInterruptLine[4];
        for (int i = 0; i < intx.Length; i++)
            intx[i] = new SharedInterruptLine(new KvmIrqLine(_vm, MemoryLayout.PciIntxFirstGsi + (uint)i));
        for (int i = 0; i < functions.Count; i++)
        {
            var function = functions[i];
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
            string bars = string.Join(", ", function.Config.Bars.Select(b => $"BAR{b.Index} 0x{function.Config.BarAddress(b.Index):x} (0x{b.Size:x})"));
            _log.Info($"PCI 00:{slot:x2}.0: {function.Name}: {bars}");
        }
        if (window.Size != MemoryLayout.Pci64DefaultSize)
            _log.Info($"64-bit PCI window grown to 0x{window.Start:x}-0x{window.Start + window.Size - 1:x} for the devices' BARs");
        return window;
    }

    /// <summary>The guest-physical address width the machine needs (the 64-bit window's end); refuses a machine the
    /// host's KVM cannot map (CPUID 0x80000008 EAX[23:16], GuestPhysBits, where KVM reports it; 48 bits otherwise,
    /// the 4-level two-dimensional paging limit).</summary>
    private int CheckPhysicalAddressWidth(ulong end)
    {
        int needed = MemoryLayout.PhysicalAddressBits(end);
        var leaf = _kvm!.GetSupportedCpuid().FirstOrDefault(e => e.function == 0x8000_0008);
        int guestPhysBits = (int)(leaf.eax >> 16) & 0xFF;
        int limit = guestPhysBits != 0 ? guestPhysBits : 48;
        if (needed > limit)
            throw new ConfigException($"the devices' BARs need guest-physical addresses up to 0x{end - 1:x} ({needed} bits), " +
                $"but this host's KVM maps only {limit}-bit guest-physical addresses: pass fewer devices through");
        return needed;
    }

    /// <summary>Opens one <c>--device</c>, maps all guest RAM for its DMA and builds the PCI function the guest sees.
    /// Failures are configuration errors naming the option and saying what to do.</summary>
    private VfioPciFunction CreatePassthroughFunction(PassthroughConfig config, int slot)
    {
        var device = OpenPassthroughDevice(config);
        try
        {
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
            var function = new VfioPciFunction(device, _msi!, _barMapper, intx, message => _log.Info($"{device.Name}: {message}"));
            _passthrough.Add(function); // owns the device from here on
            return function;
        }
        catch (Exception e) when (e is not ConfigException)
        {
            device.Dispose();
            if (e is VfioException or PciConfigException)
                throw new ConfigException($"--device {config}: {e.Message}");
            throw;
        }
        catch
        {
            device.Dispose();
            throw;
        }
    }

    /// <summary>A host device through the kernel: the sysfs plan first (a wrong driver, a non-viable group or a
    /// missing IOMMU is explained before anything is opened), then the cdev on iommufd or the group/container, with
    /// its file added to KVM's VFIO device (KVM needs it for coherent DMA and, on the cdev path, before binding).</summary>
    private KernelVfioDevice OpenKernelVfio(string path)
    {
        var plan = new VfioHost().Plan(path);
        _kvmVfio ??= new KvmVfioDevice(_vm);
        _kernelVfio ??= new KernelVfio(fd => _kvmVfio.AddFile(fd));
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

    private IVfioDevice OpenPassthroughDevice(PassthroughConfig config)
    {
        try
        {
            return config.Kind switch
            {
                PassthroughKind.VfioUser => VfioUserClient.Connect(config.Path, new VfioUserClientOptions { DmaMemory = _memory }),
                _ => OpenKernelVfio(config.Path),
            };
        }
        catch (VfioException e)
        {
            throw new ConfigException($"--device {config}: {e.Message}");
        }
    }

    /// <summary>The virtio devices of the config, in slot order; a device that cannot be opened is a configuration
    /// error naming the option.</summary>
    private List<VirtioDevice> CreateVirtioDevices()
    {
        var devices = new List<VirtioDevice>();
        try
        {
            foreach (var disk in _config.Disks)
            {
                try
                {
                    devices.Add(new VirtioBlock(disk.Path, disk.ReadOnly, disk.Direct, disk.Serial));
                }
                catch (Exception e) when (e is DiskImageException or ArgumentException)
                {
                    throw new ConfigException($"--disk path={disk.Path}: {e.Message}");
                }
            }
            foreach (var net in _config.Nets)
            {
                try
                {
                    devices.Add(new VirtioNet(net.Tap, net.Mac));
                }
                catch (Exception e) when (e is TapException or ArgumentException)
                {
                    throw new ConfigException($"--net tap={net.Tap}: {e.Message}");
                }
            }
            if (_config.VirtioConsole)
            {
                _virtioConsole = new VirtioConsole(_console);
                devices.Add(_virtioConsole);
            }
            if (_config.VirtioRng)
                devices.Add(new VirtioRng());
        }
        catch
        {
            foreach (var d in devices)
                d.Dispose();
            throw;
        }
        return devices;
    }

    /// <summary>Starts every vCPU and blocks until the VM ends.</summary>
    public VmOutcome Run()
    {
        foreach (var v in _vcpus)
            v.Start();
        _stopped.Wait();
        foreach (var v in _vcpus)
            v.Kick();
        foreach (var v in _vcpus)
            v.Join();
        return _outcome!;
    }

    /// <summary>Records how the VM ended (the first report wins) and stops every vCPU.</summary>
    internal void Finish(VmOutcome outcome)
    {
        if (Interlocked.CompareExchange(ref _outcome, outcome, null) == null)
        {
            _stopping = true;
            foreach (var v in Volatile.Read(ref _vcpus))
                v.Kick();
            _stopped.Set();
        }
    }

    public void RequestDebugExit(uint value) =>
        Finish(new VmOutcome(VmExitKind.DebugExit, $"guest wrote 0x{value:x} to the debug-exit port", value));

    public void RequestReset(string source) =>
        Finish(new VmOutcome(VmExitKind.Reset, $"guest requested a reset ({source})"));

    public void RequestPowerOff(string source) =>
        Finish(new VmOutcome(VmExitKind.PowerOff, $"guest powered off ({source})"));

    /// <summary>Exit counts and costs per vCPU, and unclaimed accesses (for --stats and --log-level debug).</summary>
    public string DescribeStats()
    {
        var sb = new StringBuilder();
        foreach (var v in _vcpus)
        {
            var s = v.Stats;
            double perExit(long ns) => s.Exits == 0 ? 0 : (double)ns / s.Exits;
            sb.AppendLine($"vcpu{v.Id}: exits={s.Exits} pio={s.PioExits} mmio={s.MmioExits} interrupted={s.InterruptedRuns} " +
                $"exit_allocated_bytes={s.ExitAllocatedBytes} wall_ns_per_exit={perExit(s.WallNs):F0} user_ns_per_exit={perExit(s.UserCpuNs):F0} sys_ns_per_exit={perExit(s.SystemCpuNs):F0}");
        }
        foreach (var bus in new[] { IoBus, MmioBus })
        {
            if (bus.UnclaimedReads + bus.UnclaimedWrites == 0)
                continue;
            string list = string.Join(", ", bus.UnclaimedAccesses().Select(a => $"0x{a.Address:x}×{a.Count}"));
            sb.AppendLine($"{bus.Name} bus: {bus.UnclaimedReads} unclaimed reads, {bus.UnclaimedWrites} unclaimed writes: {list}");
        }
        return sb.ToString().TrimEnd();
    }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        _stopping = true;
        // Stop every thread before releasing anything a late Finish() or kick could still touch.
        _console?.StopInput();
        foreach (var v in _vcpus)
            v.Kick();
        foreach (var v in _vcpus)
            v.Join();
        foreach (var v in _vcpus)
            v.Dispose();
        // Device threads stop before the memory they serve goes away.
        foreach (var f in _virtio)
            f.Dispose();
        // Passed-through devices: DMA unmapped while the device connections are still open (a vfio-user unmap is a
        // message), then interrupts off, BAR slots gone and the devices closed.
        _barMapper?.StopPeerToPeer();
        _dma?.Dispose();
        foreach (var f in _passthrough)
            f.Dispose();
        _kernelVfio?.Dispose();
        _kvmVfio?.Dispose();
        _msi?.Dispose();
        _console?.Dispose();
        _memory?.Dispose();
        _vm?.Dispose();
        _kvm?.Dispose();
        _stopped.Dispose();
    }

    /// <summary>An ISA interrupt pin of the in-kernel PIC/IOAPIC.</summary>
    private sealed class KvmIrqLine(VmFd vm, uint irq) : IInterruptLine
    {
        public void SetLevel(bool asserted) => vm.SetIrqLine(irq, asserted);
    }
}
