using System.Buffers.Binary;
using System.Diagnostics;

namespace Vmm.Devices.Legacy;

/// <summary>Where the ACPI fixed-hardware registers live; shared by the tables and the device that answers.</summary>
public static class AcpiPorts
{
    /// <summary>PM1a event block: status (2 bytes) then enable (2 bytes).</summary>
    public const ushort Pm1aEvent = 0x600;
    /// <summary>PM1a control block (2 bytes): SCI_EN, SLP_TYP, SLP_EN.</summary>
    public const ushort Pm1aControl = 0x604;
    /// <summary>PM timer (4 bytes, 32-bit: FADT TMR_VAL_EXT).</summary>
    public const ushort PmTimer = 0x608;
    /// <summary>The FADT reset register (1 byte); writing <see cref="ResetValue"/> resets the machine.</summary>
    public const ushort Reset = 0x60C;
    public const byte ResetValue = 0x06;
    /// <summary>The whole block, for the I/O bus.</summary>
    public const ushort BlockStart = 0x600, BlockLength = 0x10;
    /// <summary>SLP_TYP the DSDT's \_S5 package announces.</summary>
    public const int S5SleepType = 5;
    public const int SciIrq = 9;
    /// <summary>CMOS index of the century byte, named in the FADT.</summary>
    public const byte CenturyIndex = 0x32;
}

/// <summary>The ACPI fixed hardware the FADT describes, at <see cref="AcpiPorts.BlockStart"/>: PM1a status and
/// enable (no events are ever raised), PM1a control (SCI_EN always set, as firmware leaves it; SLP_TYP 5 with
/// SLP_EN powers off), the 32-bit PM timer at 3.579545 MHz driven by the host's monotonic clock, and the
/// reset register.</summary>
public sealed class AcpiPmDevice(IVmControl control) : IBusDevice
{
    public const long TimerHz = 3_579_545;
    private const int Pm1Status = 0, Pm1Enable = 2, Pm1Control = 4, Timer = 8, ResetReg = 12;
    private const ushort SCI_EN = 1, SLP_EN = 1 << 13;

    private readonly Lock _lock = new();
    private readonly long _start = Stopwatch.GetTimestamp();
    private ushort _enable;
    private ushort _control = SCI_EN;

    /// <summary>The PM timer's current count (it wraps at 32 bits).</summary>
    public uint TimerValue => (uint)(Stopwatch.GetElapsedTime(_start).Ticks * TimerHz / TimeSpan.TicksPerSecond);

    public void Read(ulong offset, Span<byte> data)
    {
        Span<byte> regs = stackalloc byte[AcpiPorts.BlockLength];
        regs.Clear();
        lock (_lock)
        {
            BinaryPrimitives.WriteUInt16LittleEndian(regs[Pm1Enable..], _enable);
            BinaryPrimitives.WriteUInt16LittleEndian(regs[Pm1Control..], (ushort)(_control & ~SLP_EN));
        }
        BinaryPrimitives.WriteUInt32LittleEndian(regs[Timer..], TimerValue);
        for (int i = 0; i < data.Length; i++)
            data[i] = offset + (ulong)i < (ulong)regs.Length ? regs[(int)offset + i] : (byte)0xFF;
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        for (int i = 0; i < data.Length; i++)
            WriteByte((int)offset + i, data[i]);
    }

    private void WriteByte(int at, byte value)
    {
        string? powerOff = null, reset = null;
        lock (_lock)
        {
            switch (at)
            {
                case Pm1Enable: _enable = (ushort)((_enable & 0xFF00) | value); break;
                case Pm1Enable + 1: _enable = (ushort)((_enable & 0x00FF) | value << 8); break;
                case Pm1Control: _control = (ushort)((_control & 0xFF00) | value | SCI_EN); break;
                case Pm1Control + 1:
                    _control = (ushort)((_control & 0x00FF) | value << 8);
                    if ((_control & SLP_EN) != 0 && ((_control >> 10) & 7) == AcpiPorts.S5SleepType)
                        powerOff = "ACPI S5 (PM1a_CNT SLP_EN)";
                    break;
                case ResetReg:
                    if (value == AcpiPorts.ResetValue)
                        reset = "ACPI reset register";
                    break;
                default: break; // status bits are write-1-to-clear and never set; the timer is read-only
            }
        }
        if (powerOff is not null)
            control.RequestPowerOff(powerOff);
        if (reset is not null)
            control.RequestReset(reset);
    }
}
