using System.Text;
using Vmm.Boot;
using Vmm.Boot.Acpi;
using Vmm.Devices;
using Vmm.Devices.Legacy;
using Vmm.Devices.Pci;
using Vmm.Kvm;
using Vmm.Memory;
using Vmm.Interop.Seccomp;
using static Vmm.Interop.KvmConstants;

namespace Vmm.Machine;

/// <summary>One x86 VM assembled from a <see cref="MachineConfig"/>: KVM VM with in-kernel irqchip and PIT, guest RAM,
/// the legacy platform, the PCI devices (<see cref="DeviceManager"/>), the loaded kernel, ACPI tables and one thread
/// per vCPU. It runs, pauses and resumes; it ends when the guest or the host ends it, and every resource it built is
/// released in reverse order (<see cref="ResourceStack"/>). The VM's life as the API sees it is
/// <see cref="VmLifecycle"/>'s.</summary>
public sealed class VirtualMachine : IVmControl, IVcpuHost, IDisposable
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
    private readonly ResourceStack _resources;
    private readonly KvmSystem _kvm = null!;
    private readonly VmFd _vm = null!;
    private readonly GuestMemory _memory = null!;
    private readonly SerialConsole _console = null!;
    private readonly LegacyPlatform _legacy = null!;
    private readonly DeviceManager _devices = null!;
    private Vcpu[] _vcpus = [];
    private readonly TaskCompletionSource<VmOutcome> _ended = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private volatile bool _stopping;
    private bool _started;

    public VirtualMachine(MachineConfig config, Log log)
    {
        config.Validate();
        _config = config;
        _log = log;
        _resources = new ResourceStack(log);
        try
        {
            // Memory and kernel first: a bad image is reported the same with or without KVM.
            _memory = _resources.Push(GuestMemory.Create(config.MemoryBytes), "guest memory");
            Kernel = KernelLoader.Load(_memory, config.Kernel, config.Arguments, config.Module);
            _log.Info($"loaded {config.Kernel.Name} as {Kernel.Format}, entry 0x{Kernel.Cpu.Rip:x}; command line \"{Kernel.CommandLine}\"");
            foreach (var warning in Kernel.Warnings)
                _log.Warn(warning);
            _kvm = _resources.Push(KvmSystem.Open(config.KvmPath), "/dev/kvm");
            CheckCapabilities();
            _vm = _resources.Push(_kvm.CreateVm(), "KVM VM");
            SetUpArchitecture();
            uint slot = 0;
            foreach (var region in _memory.Regions)
                _vm.SetUserMemoryRegion(slot++, region.Start.Value, region.Size, region.HostAddress);

            IoBus = new Bus("I/O port");
            MmioBus = new Bus("MMIO");
            _console = _resources.Push(new SerialConsole(config.SerialOutput), "console");
            _legacy = new LegacyPlatform(IoBus, _vm, _memory, this, _console);
            _devices = new DeviceManager(_vm, _memory, _log, _resources, ramSlots: slot);
            _devices.ColdPlug(config, IoBus, MmioBus, _console);
            _devices.DeviceRemoved = info => DeviceRemoved?.Invoke(info);
            // In the BIOS area the memory map leaves out, where every loader's guest finds it; the DSDT describes
            // the 64-bit window as grown for the devices' BARs.
            AcpiTables.Write(_memory, config.Cpus, _devices.Window64);
            int physicalAddressBits = CheckPhysicalAddressWidth(_devices.Window64.Start + _devices.Window64.Size);
            CreateVcpus(physicalAddressBits);
            // Input last: a Ctrl-A x already waiting in the terminal may end the VM at once.
            if (config.SerialInput is not null)
            {
                _console.AttachInput(config.SerialInput, (IConsoleInput?)_devices.VirtioConsole ?? Serial,
                    config.ConsoleEscape ? () => RequestPowerOff("Ctrl-A x on the console") : null);
                _resources.Push("console input", _console.StopInput);
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    public Bus IoBus { get; } = null!;
    public Bus MmioBus { get; } = null!;
    public PciRootBus Pci => _devices.Pci;
    public Serial16550 Serial => _legacy.Serial;
    public PostCodeSink PostCode => _legacy.PostCode;
    public LoadedKernel Kernel { get; } = null!;
    public MachineConfig Config => _config;

    /// <summary>The devices on the PCI root bus with their ids and addresses (vm.info's device tree).</summary>
    public IReadOnlyList<PciDeviceInfo> PciDevices => _devices.Devices;

    /// <summary>Hot-adds a device (vm.add-disk, vm.add-net, vm.add-device, vm.add-user-device): it goes in the first
    /// free slot and the guest is told through ACPI. Throws <see cref="ConfigException"/> for what cannot be added.</summary>
    public PciDeviceInfo AddDevice(IPciDeviceConfig config) => _devices.HotPlug(config);

    /// <summary>Asks the guest to eject device <paramref name="id"/> (vm.remove-device); the task completes once it did
    /// and the device's resources are released. <see cref="KeyNotFoundException"/> for an unknown id.</summary>
    public Task RequestDeviceRemoval(string id) => _devices.RequestRemoval(id);

    /// <summary>A device left the bus (the guest ejected it); raised on a worker thread.</summary>
    public event Action<PciDeviceInfo>? DeviceRemoved;

    /// <summary>Per-device counters (vm.counters).</summary>
    public IReadOnlyList<DeviceCounters> DeviceCounters() => _devices.Counters();

    /// <summary>Per-vCPU counters; complete once the VM ended, live (and approximate) while it runs.</summary>
    public IReadOnlyList<VcpuStats> VcpuStats => _vcpus.Select(v => v.Stats).ToList();

    /// <summary>Completes with how the VM ended (the first report wins).</summary>
    public Task<VmOutcome> Ended => _ended.Task;

    /// <summary>The first report, taken at once; <see cref="Ended"/> completes a moment later (Finish posts it, see
    /// <see cref="SeccompThreads.Post"/>), so the task cannot be what decides which report wins.</summary>
    private VmOutcome? _outcome;

    public bool Stopping => _stopping;

    private void CreateVcpus(int physicalAddressBits)
    {
        KickSignal.EnsureInstalled();
        var dispatcher = new ExitDispatcher(IoBus, MmioBus);
        var cpuid = _kvm.GetSupportedCpuid();
        var vcpus = new List<Vcpu>();
        try
        {
            for (int i = 0; i < _config.Cpus; i++)
            {
                var vcpu = _resources.Push(new Vcpu(_vm.CreateVcpu(i), this, dispatcher, _memory), $"vCPU {i}");
                vcpus.Add(vcpu);
                VcpuSetup.ConfigureCpuid(vcpu.Fd, cpuid, _config.Cpus, physicalAddressBits);
                VcpuSetup.SetInitialMsrs(vcpu.Fd);
            }
        }
        finally
        {
            _vcpus = [.. vcpus]; // published whole: Finish() may run on other threads from now on
            // Threads stop before anything they use is released.
            _resources.Push("vCPU threads", StopVcpus);
        }
        // The other vCPUs wait for INIT/SIPI: KVM starts APs uninitialized when the LAPIC is in the kernel.
        VcpuSetup.SetBootState(_vcpus[0].Fd, Kernel.Cpu);
    }

    private void CheckCapabilities()
    {
        var required = _config.InKernelIrqchip ? s_requiredCaps.Concat(s_irqchipCaps) : s_requiredCaps;
        var missing = required.Where(c => _kvm.CheckExtension(c.Cap) <= 0).Select(c => $"{c.Name} ({c.Cap})").ToList();
        if (missing.Count > 0)
            throw new KvmUnavailableException($"this KVM lacks capabilities vmm relies on: {string.Join(", ", missing)}");
        int maxVcpus = _kvm.CheckExtension(KVM_CAP_MAX_VCPUS);
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

    /// <summary>Intel without unrestricted guest needs the identity map and TSS for real mode; elsewhere they are
    /// harmless no-ops.</summary>
    private void SetUpArchitecture()
    {
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

    /// <summary>The guest-physical address width the machine needs (the 64-bit window's end); refuses a machine the
    /// host's KVM cannot map (CPUID 0x80000008 EAX[23:16], GuestPhysBits, where KVM reports it; 48 bits otherwise,
    /// the 4-level two-dimensional paging limit).</summary>
    private int CheckPhysicalAddressWidth(ulong end)
    {
        int needed = MemoryLayout.PhysicalAddressBits(end);
        var leaf = _kvm.GetSupportedCpuid().FirstOrDefault(e => e.function == 0x8000_0008);
        int guestPhysBits = (int)(leaf.eax >> 16) & 0xFF;
        int limit = guestPhysBits != 0 ? guestPhysBits : 48;
        if (needed > limit)
            throw new ConfigException($"the devices' BARs need guest-physical addresses up to 0x{end - 1:x} ({needed} bits), " +
                $"but this host's KVM maps only {limit}-bit guest-physical addresses: pass fewer devices through");
        return needed;
    }

    /// <summary>Starts every vCPU; <see cref="Ended"/> completes when the VM ends.</summary>
    public void Start()
    {
        if (_started)
            throw new InvalidOperationException("the VM was started already");
        _started = true;
        foreach (var v in _vcpus)
            v.Start();
    }

    /// <summary>Ends the VM from the host side (vm.shutdown, a signal): vCPUs leave the guest wherever it is.</summary>
    public void Stop(string why) => Finish(new VmOutcome(VmExitKind.Stopped, why));

    /// <summary>Records how the VM ended (the first report wins) and stops every vCPU.</summary>
    public void Finish(VmOutcome outcome)
    {
        if (Interlocked.CompareExchange(ref _outcome, outcome, null) is null)
        {
            // Completing the task queues its continuations on the thread pool, which may have to start a worker; from
            // a vCPU thread that start is refused and the continuations wait (SeccompThreads.Post says how long).
            SeccompThreads.Post(() => _ended.TrySetResult(outcome));
            _stopping = true;
            lock (_pauseLock)
                Monitor.PulseAll(_pauseLock); // parked vCPUs leave
            foreach (var v in Volatile.Read(ref _vcpus))
                v.Kick();
        }
    }

    private void StopVcpus()
    {
        _stopping = true;
        lock (_pauseLock)
            Monitor.PulseAll(_pauseLock);
        foreach (var v in _vcpus)
            v.Kick();
        foreach (var v in _vcpus)
            v.Join();
    }

    // ------------------------------------------------------------------ pause and resume

    private readonly object _pauseLock = new();
    private volatile bool _pauseRequested;
    private int _parked; // vCPUs in Park (guarded by _pauseLock)

    bool IVcpuHost.PauseRequested => _pauseRequested;

    /// <summary>Kicks every vCPU out of KVM_RUN and waits until all are parked (each tells its guest clock), then
    /// stops the virtio workers from taking new requests. Throws <see cref="TimeoutException"/> (and leaves the VM
    /// running) when that takes longer than <paramref name="timeout"/>.</summary>
    public void Pause(TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        lock (_pauseLock)
        {
            if (_pauseRequested)
                return;
            _pauseRequested = true;
        }
        foreach (var v in _vcpus)
            v.Kick();
        lock (_pauseLock)
        {
            while (_parked < _vcpus.Length)
            {
                if (_stopping)
                    break;
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero || !Monitor.Wait(_pauseLock, left))
                {
                    if (_parked == _vcpus.Length)
                        break;
                    int parked = _parked;
                    _pauseRequested = false;
                    Monitor.PulseAll(_pauseLock);
                    throw new TimeoutException($"{_vcpus.Length - parked} of {_vcpus.Length} vCPUs did not stop within {timeout.TotalSeconds:0.#} s");
                }
            }
        }
        try
        {
            _devices.Pause(deadline - DateTime.UtcNow > TimeSpan.Zero ? deadline - DateTime.UtcNow : TimeSpan.FromMilliseconds(1));
        }
        catch (TimeoutException)
        {
            Resume();
            throw;
        }
    }

    /// <summary>Lets the devices and every parked vCPU go on where they stopped.</summary>
    public void Resume()
    {
        _devices.Resume();
        lock (_pauseLock)
        {
            _pauseRequested = false;
            Monitor.PulseAll(_pauseLock);
        }
    }

    void IVcpuHost.Park(Vcpu vcpu)
    {
        vcpu.NotifyPaused();
        lock (_pauseLock)
        {
            _parked++;
            Monitor.PulseAll(_pauseLock);
            while (_pauseRequested && !_stopping)
                Monitor.Wait(_pauseLock);
            _parked--;
        }
    }

    /// <summary>Presses the ACPI power button (vm.power-button): an ACPI guest runs its orderly power-off.</summary>
    public void PressPowerButton() => _legacy.AcpiPm.PressPowerButton();

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

    /// <summary>Stops every thread, then releases everything in reverse order of creation.</summary>
    public void Dispose()
    {
        _stopping = true;
        _resources.Dispose();
    }
}
