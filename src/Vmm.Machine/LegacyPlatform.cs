using Vmm.Devices;
using Vmm.Devices.Legacy;
using Vmm.Kvm;
using Vmm.Memory;

namespace Vmm.Machine;

/// <summary>The PC platform every guest finds at fixed ports: COM1, the debug-exit port, the i8042 (for reset), the
/// POST-code port, the CMOS RTC and the ACPI PM block (timer, S5, reset register, power button on the SCI).</summary>
internal sealed class LegacyPlatform
{
    public LegacyPlatform(Bus io, VmFd vm, GuestMemory memory, IVmControl control, SerialConsole console)
    {
        Serial = new Serial16550(new KvmIrqLine(vm, 4), console);
        PostCode = new PostCodeSink();
        AcpiPm = new AcpiPmDevice(control, new KvmIrqLine(vm, AcpiPorts.SciIrq));
        io.Insert(Serial, 0x3F8, 8);
        io.Insert(new DebugExit(control), DebugExit.DefaultPort, DebugExit.Width);
        io.Insert(new I8042(control), I8042.DataPort, 5);
        io.Insert(PostCode, PostCodeSink.DefaultPort, 1);
        ulong below4G = memory.Regions.Where(r => r.Start.Value < MemoryLayout.MmioHoleStart).Aggregate(0UL, (sum, r) => sum + r.Size);
        io.Insert(new CmosRtc(below4G, memory.Size - below4G), CmosRtc.Port, 2);
        io.Insert(AcpiPm, AcpiPorts.BlockStart, AcpiPorts.BlockLength);
    }

    public Serial16550 Serial { get; }
    public PostCodeSink PostCode { get; }
    public AcpiPmDevice AcpiPm { get; }
}

/// <summary>An ISA interrupt pin of the in-kernel PIC/IOAPIC.</summary>
internal sealed class KvmIrqLine(VmFd vm, uint irq) : IInterruptLine
{
    public void SetLevel(bool asserted) => vm.SetIrqLine(irq, asserted);
}
