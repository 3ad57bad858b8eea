namespace Vmm.Memory;

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
    /// <summary>PM1 status/enable bit of the fixed-feature power button (ACPI 6.4, 4.8.3.1: PWRBTN_STS/PWRBTN_EN).</summary>
    public const ushort PowerButtonBit = 1 << 8;
}
