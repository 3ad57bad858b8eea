using System.Buffers.Binary;
using System.Text;
using Vmm.Devices.Legacy;
using Vmm.Memory;

namespace Vmm.Boot.Acpi;

/// <summary>Builds the ACPI tables a PC guest needs (ACPI 6.x): RSDP (in the legacy BIOS search area), RSDT
/// and XSDT, FADT (PM timer, PM1a blocks, SCI on IRQ 9, reset register, century), FACS, a DSDT in AML (\_S5
/// and COM1 with its resources) and the MADT (a local APIC per vCPU, the IOAPIC, overrides IRQ0→GSI2 and
/// IRQ9 level/high). Every table carries a valid checksum.</summary>
public static class AcpiTables
{
    /// <summary>The RSDP goes where OSes scan for it (0xE0000-0xFFFFF, 16-byte aligned); the tables follow it
    /// in a range the memory map leaves out, so no OS allocates over them.</summary>
    public const ulong RsdpAddress = 0xE_0000;
    public const int RegionSize = 0x1_0000;

    /// <summary>MADT processor-local-APIC entries carry 8-bit APIC ids (0xFF is broadcast).</summary>
    public const int MaxCpus = 255;

    public const string OemId = "VMMCS ";
    public const string OemTableId = "VMM     ";

    public sealed record Result(ulong Rsdp, IReadOnlyDictionary<string, byte[]> Tables);

    public static Result Write(GuestMemory memory, int cpuCount)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(cpuCount, MaxCpus);
        var region = new byte[RegionSize];
        int at = 64; // after the 36-byte RSDP, aligned
        var tables = new Dictionary<string, byte[]>();
        ulong Place(byte[] table, int align = 16)
        {
            at = (at + align - 1) / align * align;
            table.CopyTo(region, at);
            ulong address = RsdpAddress + (ulong)at;
            at += table.Length;
            return address;
        }

        byte[] dsdt = Dsdt();
        ulong dsdtAt = Place(dsdt);
        byte[] facs = Facs();
        ulong facsAt = Place(facs, 64); // FACS must be 64-byte aligned
        byte[] fadt = Fadt(facsAt, dsdtAt);
        ulong fadtAt = Place(fadt);
        byte[] madt = Madt(cpuCount);
        ulong madtAt = Place(madt);
        byte[] rsdt = Rsdt([(uint)fadtAt, (uint)madtAt]);
        ulong rsdtAt = Place(rsdt);
        byte[] xsdt = Xsdt([fadtAt, madtAt]);
        ulong xsdtAt = Place(xsdt);
        byte[] rsdp = Rsdp((uint)rsdtAt, xsdtAt);
        rsdp.CopyTo(region, 0);
        memory.Write(new GuestAddress(RsdpAddress), region.AsSpan(0, at));

        tables["RSDP"] = rsdp; tables["RSDT"] = rsdt; tables["XSDT"] = xsdt; tables["FACP"] = fadt;
        tables["FACS"] = facs; tables["DSDT"] = dsdt; tables["APIC"] = madt;
        return new Result(RsdpAddress, tables);
    }

    /// <summary>The 8-bit sum of every byte of a table is zero.</summary>
    public static byte Checksum(ReadOnlySpan<byte> data)
    {
        byte sum = 0;
        foreach (byte b in data)
            sum += b;
        return sum;
    }

    private static byte[] Rsdp(uint rsdt, ulong xsdt)
    {
        var t = new byte[36];
        Encoding.ASCII.GetBytes("RSD PTR ").CopyTo(t, 0);
        Encoding.ASCII.GetBytes(OemId).CopyTo(t, 9);
        t[15] = 2; // revision: ACPI 2.0+ (XSDT)
        BinaryPrimitives.WriteUInt32LittleEndian(t.AsSpan(16), rsdt);
        BinaryPrimitives.WriteUInt32LittleEndian(t.AsSpan(20), 36);
        BinaryPrimitives.WriteUInt64LittleEndian(t.AsSpan(24), xsdt);
        t[8] = (byte)-Checksum(t.AsSpan(0, 20));   // ACPI 1.0 checksum: first 20 bytes
        t[32] = (byte)-Checksum(t);                 // extended checksum: all 36
        return t;
    }

    /// <summary>A table: the 36-byte system description header, then <paramref name="body"/>.</summary>
    private static byte[] Table(string signature, byte revision, ReadOnlySpan<byte> body)
    {
        var t = new byte[36 + body.Length];
        Encoding.ASCII.GetBytes(signature).CopyTo(t, 0);
        BinaryPrimitives.WriteUInt32LittleEndian(t.AsSpan(4), (uint)t.Length);
        t[8] = revision;
        Encoding.ASCII.GetBytes(OemId).CopyTo(t, 10);
        Encoding.ASCII.GetBytes(OemTableId).CopyTo(t, 16);
        BinaryPrimitives.WriteUInt32LittleEndian(t.AsSpan(24), 1);              // OEM revision
        Encoding.ASCII.GetBytes("VMM ").CopyTo(t, 28);                          // creator id
        BinaryPrimitives.WriteUInt32LittleEndian(t.AsSpan(32), 1);              // creator revision
        body.CopyTo(t.AsSpan(36));
        t[9] = (byte)-Checksum(t);
        return t;
    }

    private static byte[] Rsdt(uint[] entries)
    {
        var body = new byte[4 * entries.Length];
        for (int i = 0; i < entries.Length; i++)
            BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(4 * i), entries[i]);
        return Table("RSDT", 1, body);
    }

    private static byte[] Xsdt(ulong[] entries)
    {
        var body = new byte[8 * entries.Length];
        for (int i = 0; i < entries.Length; i++)
            BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(8 * i), entries[i]);
        return Table("XSDT", 1, body);
    }

    private static byte[] Facs()
    {
        var t = new byte[64];
        Encoding.ASCII.GetBytes("FACS").CopyTo(t, 0);
        BinaryPrimitives.WriteUInt32LittleEndian(t.AsSpan(4), 64);
        t[32] = 2; // version
        return t;
    }

    /// <summary>A Generic Address Structure for a system I/O register.</summary>
    private static void Gas(Span<byte> at, byte bitWidth, ulong address, byte accessSize)
    {
        at[0] = 1;          // system I/O space
        at[1] = bitWidth;
        at[2] = 0;          // bit offset
        at[3] = accessSize; // 1 byte, 2 word, 3 dword
        BinaryPrimitives.WriteUInt64LittleEndian(at[4..], address);
    }

    private static byte[] Fadt(ulong facs, ulong dsdt)
    {
        // FADT revision 6 is 276 bytes; offsets below are from the table start (ACPI 6.4, table 5.9).
        var t = new byte[276 - 36];
        Span<byte> b = t;
        void U32(int offset, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(t.AsSpan(offset - 36), v);
        void U16(int offset, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(t.AsSpan(offset - 36), v);
        void U64(int offset, ulong v) => BinaryPrimitives.WriteUInt64LittleEndian(t.AsSpan(offset - 36), v);
        // FIRMWARE_CTRL (offset 36) stays 0: the spec allows only one of it and X_FIRMWARE_CTRL to be set.
        U32(40, (uint)dsdt);
        t[45 - 36] = 0;                                  // preferred PM profile: unspecified
        U16(46, AcpiPorts.SciIrq);                       // SCI_INT
        U32(48, 0);                                      // SMI_CMD 0: ACPI is always enabled (hardware-reduced style enable)
        U32(56, AcpiPorts.Pm1aEvent);
        U32(64, AcpiPorts.Pm1aControl);
        U32(76, AcpiPorts.PmTimer);
        t[88 - 36] = 4;                                  // PM1_EVT_LEN
        t[89 - 36] = 2;                                  // PM1_CNT_LEN
        t[91 - 36] = 4;                                  // PM_TMR_LEN
        U16(96, 0x0FFF);                                 // P_LVL2_LAT: C2 not supported
        U16(98, 0x0FFF);                                 // P_LVL3_LAT: C3 not supported
        t[108 - 36] = AcpiPorts.CenturyIndex;            // CENTURY
        U16(109, 0x0002);                                // IAPC_BOOT_ARCH: 8042 present
        // Flags: WBINVD | PROC_C1 | SLP_BUTTON (no sleep button) | TMR_VAL_EXT | RESET_REG_SUP | PWR_BUTTON (none)
        U32(112, (1u << 0) | (1u << 2) | (1u << 4) | (1u << 5) | (1u << 8) | (1u << 10));
        Gas(b[(116 - 36)..], 8, AcpiPorts.Reset, 1);     // RESET_REG
        t[128 - 36] = AcpiPorts.ResetValue;              // RESET_VALUE
        U16(129, 0x0000);                                // ARM_BOOT_ARCH
        t[131 - 36] = 4;                                 // FADT minor version (6.4)
        U64(132, facs);                                  // X_FIRMWARE_CTRL
        U64(140, dsdt);                                  // X_DSDT
        Gas(b[(148 - 36)..], 32, AcpiPorts.Pm1aEvent, 2);   // X_PM1a_EVT_BLK
        Gas(b[(172 - 36)..], 16, AcpiPorts.Pm1aControl, 2); // X_PM1a_CNT_BLK
        Gas(b[(208 - 36)..], 32, AcpiPorts.PmTimer, 3);     // X_PM_TMR_BLK
        return Table("FACP", 6, t);
    }

    private static byte[] Madt(int cpus)
    {
        var body = new List<byte>();
        void U8(byte v) => body.Add(v);
        void U16(ushort v) { U8((byte)v); U8((byte)(v >> 8)); }
        void U32(uint v) { U16((ushort)v); U16((ushort)(v >> 16)); }
        U32((uint)MemoryLayout.LocalApicAddress);
        U32(1); // PCAT_COMPAT: the 8259s are present
        for (int i = 0; i < cpus; i++)
        {
            U8(0); U8(8); U8((byte)i); U8((byte)i); U32(1); // processor local APIC: enabled
        }
        U8(1); U8(12); U8((byte)cpus); U8(0); U32((uint)MemoryLayout.IoApicAddress); U32(0); // IOAPIC, GSI base 0
        U8(2); U8(10); U8(0); U8(0); U32(2); U16(0);                     // ISA IRQ0 → GSI 2, conforming
        U8(2); U8(10); U8(0); U8((byte)AcpiPorts.SciIrq); U32((uint)AcpiPorts.SciIrq); U16(0x000D); // IRQ9: active high, level
        return Table("APIC", 5, body.ToArray());
    }

    private static byte[] Dsdt() => Table("DSDT", 2, DsdtAml());

    /// <summary>The DSDT's AML: Name(\_S5, Package(){5, 0, 0, 0}) and Scope(\_SB){ Device(COM1){ _HID PNP0501,
    /// _UID 1, _STA 0xF, _CRS { IO(Decode16, 0x3F8, 0x3F8, 1, 8), IRQNoFlags(){4} } } }.</summary>
    public static byte[] DsdtAml()
    {
        var aml = new List<byte>();
        // Name(\_S5_, Package(4){5, 0, 0, 0})
        aml.AddRange([0x08, (byte)'\\', (byte)'_', (byte)'S', (byte)'5', (byte)'_']);
        aml.AddRange(Package(4, [0x0A, (byte)AcpiPorts.S5SleepType, 0x00, 0x00, 0x00]));

        var device = new List<byte>();
        device.AddRange(Name("COM1"));
        device.AddRange([0x08, .. Name("_HID"), 0x0C, .. BitConverter.GetBytes(EisaId("PNP0501"))]);
        device.AddRange([0x08, .. Name("_UID"), 0x01]);                       // One
        device.AddRange([0x08, .. Name("_STA"), 0x0A, 0x0F]);                 // present, enabled, shown, functioning
        byte[] resources =
        [
            0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08, // IO(Decode16, 0x3F8, 0x3F8, 1, 8)
            0x22, 0x10, 0x00,                               // IRQNoFlags(){4}
            0x79, 0x00,                                     // end tag
        ];
        device.AddRange([0x08, .. Name("_CRS"), .. Buffer(resources)]);
        var devOp = new List<byte> { 0x5B, 0x82 };          // DeviceOp
        devOp.AddRange(PkgLength(device.Count));
        devOp.AddRange(device);

        var scope = new List<byte> { (byte)'\\', (byte)'_', (byte)'S', (byte)'B', (byte)'_' };
        scope.AddRange(devOp);
        aml.Add(0x10);                                      // ScopeOp
        aml.AddRange(PkgLength(scope.Count));
        aml.AddRange(scope);
        return [.. aml];
    }

    private static byte[] Name(string name) => Encoding.ASCII.GetBytes(name);

    private static byte[] Package(byte count, byte[] elements) =>
        [0x12, .. PkgLength(1 + elements.Length), count, .. elements];

    private static byte[] Buffer(byte[] data) =>
        [0x11, .. PkgLength(2 + data.Length), 0x0A, (byte)data.Length, .. data];

    /// <summary>AML PkgLength for <paramref name="contentLength"/> bytes after it (the encoding counts itself).</summary>
    public static byte[] PkgLength(int contentLength)
    {
        if (contentLength + 1 <= 0x3F)
            return [(byte)(contentLength + 1)];
        int total = contentLength + 2;
        if (total <= 0xFFF)
            return [(byte)(0x40 | (total & 0x0F)), (byte)(total >> 4)];
        total = contentLength + 3;
        return [(byte)(0x80 | (total & 0x0F)), (byte)(total >> 4), (byte)(total >> 12)];
    }

    /// <summary>The compressed EISA id ACPI uses for _HID ("PNP0501" → 0x0105D041).</summary>
    public static uint EisaId(string id)
    {
        uint c(int i) => (uint)(id[i] - '@') & 0x1F;
        uint h(int i) => Convert.ToUInt32(id[i].ToString(), 16);
        uint v = (c(0) << 26) | (c(1) << 21) | (c(2) << 16) | (h(3) << 12) | (h(4) << 8) | (h(5) << 4) | h(6);
        return BinaryPrimitives.ReverseEndianness(v);
    }
}
