using System.Text;
using Vmm.Boot;
using Vmm.Boot.Acpi;
using Vmm.Devices;
using Vmm.Devices.Legacy;
using Vmm.Devices.Pci;
using Vmm.Devices.Virtio;
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
            // In the BIOS area the memory map leaves out, where every loader's guest finds it.
            AcpiTables.Write(_memory, config.Cpus);
            _vm = _kvm!.CreateVm();
            SetUpArchitecture();
            uint slot = 0;
            foreach (var region in _memory.Regions)
                _vm.SetUserMemoryRegion(slot++, region.Start.Value, region.Size, region.HostAddress);

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
            SetUpPci();

            KickSignal.EnsureInstalled();
            var dispatcher = new ExitDispatcher(IoBus, MmioBus);
            var cpuid = _kvm!.GetSupportedCpuid();
            var vcpus = new List<Vcpu>();
            try
            {
                for (int i = 0; i < config.Cpus; i++)
                {
                    vcpus.Add(new Vcpu(_vm.CreateVcpu(i), this, dispatcher, _memory));
                    vcpus[^1].ConfigureCpuid(cpuid, config.Cpus);
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
                _console.AttachInput(config.SerialInput, Serial,
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
    private KvmMsiController? _msi;
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

    /// <summary>The PCI root bus (always there: guests probe it) and the virtio devices the config asks for.</summary>
    private void SetUpPci()
    {
        var (window64, window64Size) = MemoryLayout.Pci64Window(_memory.Size);
        Pci = new PciRootBus(window64, window64Size);
        IoBus.Insert(Pci.ConfigIo, PciRootBus.ConfigIoPort, PciRootBus.ConfigIoLength);
        MmioBus.Insert(Pci.Ecam, MemoryLayout.PciEcamBase, MemoryLayout.PciEcamSize);
        MmioBus.Insert(Pci.Mmio32Window, MemoryLayout.PciMmio32Start, MemoryLayout.PciMmio32Size);
        MmioBus.Insert(Pci.Mmio64Window, window64, window64Size);
        if (!_config.HasPciDevices)
            return;
        // MSI-X routes and irqfds need KVM_SET_GSI_ROUTING / KVM_IRQFD; notifications use KVM_IOEVENTFD.
        var missing = new[] { (KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING"), (KVM_CAP_IRQFD, "KVM_CAP_IRQFD"), (KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD") }
            .Where(c => _vm.CheckExtension(c.Item1) <= 0).Select(c => c.Item2).ToList();
        if (missing.Count > 0)
            throw new KvmUnavailableException($"virtio devices need {string.Join(", ", missing)}, which this KVM lacks");
        _msi = new KvmMsiController(_vm);
        var ioEvents = new KvmIoEventRegistrar(_vm);
        var intx = new SharedInterruptLine[4];
        for (int i = 0; i < intx.Length; i++)
            intx[i] = new SharedInterruptLine(new KvmIrqLine(_vm, MemoryLayout.PciIntxFirstGsi + (uint)i));
        var created = CreateVirtioDevices();
        for (int i = 0; i < created.Count; i++)
        {
            var device = created[i];
            VirtioPciFunction function;
            try
            {
                function = new VirtioPciFunction(device, _memory, _msi, ioEvents);
            }
            catch
            {
                foreach (var d in created.Skip(i))
                    d.Dispose();
                throw;
            }
            _virtio.Add(function);
            int slot = Pci.Add(function);
            function.ConnectIntx(intx[MemoryLayout.PciIntxGsi(slot, 0) - MemoryLayout.PciIntxFirstGsi].Connect());
            _log.Info($"PCI 00:{slot:x2}.0: {device.Name}, BAR0 at 0x{function.Config.BarAddress(0):x}");
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
