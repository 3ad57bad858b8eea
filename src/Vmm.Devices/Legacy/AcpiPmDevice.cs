using System.Buffers.Binary;
using System.Diagnostics;
using Vmm.Memory;

namespace Vmm.Devices.Legacy;

/// <summary>The ACPI fixed hardware the FADT describes, at <see cref="AcpiPorts.BlockStart"/>: PM1a status and
/// enable (the one event is the fixed-feature power button: <see cref="PressPowerButton"/> sets PWRBTN_STS, and the
/// SCI is asserted while a status bit is set whose enable bit is set — level-triggered, as the MADT declares), PM1a control (SCI_EN always set, as firmware leaves it; SLP_TYP 5 with
/// SLP_EN powers off), the 32-bit PM timer at 3.579545 MHz driven by the host's monotonic clock, and the
/// reset register.</summary>
public sealed class AcpiPmDevice(IVmControl control, IInterruptLine? sci = null) : IBusDevice
{
    public const long TimerHz = 3_579_545;
    private const int Pm1Status = 0, Pm1Enable = 2, Pm1Control = 4, Timer = 8, ResetReg = 12;
    private const ushort SCI_EN = 1, SLP_EN = 1 << 13;

    private readonly Lock _lock = new();
    private readonly long _start = Stopwatch.GetTimestamp();
    private ushort _status;
    private ushort _enable;
    private ushort _control = SCI_EN;

    /// <summary>Presses the power button (vm.power-button): PWRBTN_STS goes up and, once the OS has enabled the event,
    /// the SCI tells it. An OS that never enables it (no ACPI) never sees the press, as on real hardware.</summary>
    public void PressPowerButton()
    {
        lock (_lock)
        {
            _status |= AcpiPorts.PowerButtonBit;
            UpdateSciLocked();
        }
    }

    /// <summary>PM1 status as the OS reads it.</summary>
    public ushort Status
    {
        get
        {
            lock (_lock)
                return _status;
        }
    }

    private void UpdateSciLocked() => sci?.SetLevel((_status & _enable) != 0);

    /// <summary>The PM timer's current count (it wraps at 32 bits).</summary>
    public uint TimerValue => (uint)(Stopwatch.GetElapsedTime(_start).Ticks * TimerHz / TimeSpan.TicksPerSecond);

    public void Read(ulong offset, Span<byte> data)
    {
        Span<byte> regs = stackalloc byte[AcpiPorts.BlockLength];
        regs.Clear();
        lock (_lock)
        {
            BinaryPrimitives.WriteUInt16LittleEndian(regs[Pm1Status..], _status);
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
                // Status bits are write-1-to-clear (ACPI 6.4, 4.8.3.1).
                case Pm1Status: _status &= (ushort)~value; UpdateSciLocked(); break;
                case Pm1Status + 1: _status &= (ushort)~(value << 8); UpdateSciLocked(); break;
                case Pm1Enable: _enable = (ushort)((_enable & 0xFF00) | value); UpdateSciLocked(); break;
                case Pm1Enable + 1: _enable = (ushort)((_enable & 0x00FF) | value << 8); UpdateSciLocked(); break;
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
                default: break; // the timer is read-only
            }
        }
        if (powerOff is not null)
            control.RequestPowerOff(powerOff);
        if (reset is not null)
            control.RequestReset(reset);
    }
}
