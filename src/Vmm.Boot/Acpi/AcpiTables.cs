using System.Buffers.Binary;
using System.Text;
using Vmm.Memory;

namespace Vmm.Boot.Acpi;

/// <summary>Builds the ACPI tables a PC guest needs (ACPI 6.x): RSDP (in the legacy BIOS search area), RSDT
/// and XSDT, FADT (PM timer, PM1a blocks, SCI on IRQ 9, reset register, century), FACS, a DSDT in AML (\_S5,
/// COM1, the PCI host bridge PCI0 with its windows and interrupt routing, the ECAM reservation), the MADT (a local
/// APIC per vCPU, the IOAPIC, overrides IRQ0→GSI2 and IRQ9 level/high) and the MCFG (ECAM). Every table carries a
/// valid checksum.</summary>
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

    /// <summary>Writes the tables for <paramref name="cpuCount"/> vCPUs; the PCI host bridge's 64-bit window is
    /// <paramref name="pci64Window"/>, by default the one above the RAM of <paramref name="memory"/>
    /// (<see cref="MemoryLayout.Pci64Window(ulong, ulong)"/>).</summary>
    public static Result Write(GuestMemory memory, int cpuCount, (ulong Start, ulong Size)? pci64Window = null)
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

        byte[] dsdt = Dsdt(pci64Window ?? MemoryLayout.Pci64Window(memory.Size));
        ulong dsdtAt = Place(dsdt);
        byte[] facs = Facs();
        ulong facsAt = Place(facs, 64); // FACS must be 64-byte aligned
        byte[] fadt = Fadt(facsAt, dsdtAt);
        ulong fadtAt = Place(fadt);
        byte[] madt = Madt(cpuCount);
        ulong madtAt = Place(madt);
        byte[] mcfg = Mcfg();
        ulong mcfgAt = Place(mcfg);
        byte[] rsdt = Rsdt([(uint)fadtAt, (uint)madtAt, (uint)mcfgAt]);
        ulong rsdtAt = Place(rsdt);
        byte[] xsdt = Xsdt([fadtAt, madtAt, mcfgAt]);
        ulong xsdtAt = Place(xsdt);
        byte[] rsdp = Rsdp((uint)rsdtAt, xsdtAt);
        rsdp.CopyTo(region, 0);
        memory.Write(new GuestAddress(RsdpAddress), region.AsSpan(0, at));

        tables["RSDP"] = rsdp; tables["RSDT"] = rsdt; tables["XSDT"] = xsdt; tables["FACP"] = fadt;
        tables["FACS"] = facs; tables["DSDT"] = dsdt; tables["APIC"] = madt; tables["MCFG"] = mcfg;
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

    /// <summary>A table: the 36-byte system description header, then <paramref name="body"/> (public for tests that
    /// wrap AML of their own in a DSDT).</summary>
    public static byte[] Table(string signature, byte revision, ReadOnlySpan<byte> body)
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
        // Flags: WBINVD | PROC_C1 | SLP_BUTTON (no sleep button) | TMR_VAL_EXT | RESET_REG_SUP. PWR_BUTTON (bit 4) is
        // clear: the power button is a fixed-feature one (PM1 PWRBTN_STS/EN, raised on the SCI by vm.power-button).
        U32(112, (1u << 0) | (1u << 2) | (1u << 5) | (1u << 8) | (1u << 10));
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

    /// <summary>The MCFG (PCI Firmware Specification 3.2, 4.1.2): after 8 reserved bytes, one ECAM allocation —
    /// base address, PCI segment 0, start and end bus.</summary>
    private static byte[] Mcfg()
    {
        var body = new byte[8 + 16];
        Span<byte> allocation = body.AsSpan(8);
        BinaryPrimitives.WriteUInt64LittleEndian(allocation, MemoryLayout.PciEcamBase);
        BinaryPrimitives.WriteUInt16LittleEndian(allocation[8..], 0);        // PCI segment group
        allocation[10] = 0;                                                     // start bus
        allocation[11] = (byte)(MemoryLayout.PciEcamBusCount - 1);             // end bus
        return Table("MCFG", 1, body);
    }

    private static byte[] Dsdt((ulong Start, ulong Size) pci64Window) => Table("DSDT", 2, DsdtAml(pci64Window));

    /// <summary>The DSDT's AML: \_S5 (the PM1a_CNT sleep type for soft-off) and, in \_SB, COM1, the PCI host bridge
    /// PCI0 with its hotplug slots, the Generic Event Device that announces hotplug, and MRES, the motherboard resources
    /// that reserve the ECAM area and the hotplug registers.</summary>
    public static byte[] DsdtAml((ulong Start, ulong Size) pci64Window) =>
    [
        .. Aml.Name("\\_S5", Aml.Package(Aml.Integer(AcpiPorts.S5SleepType), Aml.Integer(0), Aml.Integer(0), Aml.Integer(0))),
        .. Aml.Scope("\\_SB", Com1(), Pci0(pci64Window), GenericEventDevice(), MotherboardResources()),
    ];

    /// <summary>The first and last hotpluggable slot: every slot of the root bus but the host bridge's.</summary>
    public const int FirstHotplugSlot = 1, LastHotplugSlot = 31;

    /// <summary>ACPI PCI hotplug on the root bus, the way Linux's acpiphp drives it (drivers/pci/hotplug/acpiphp_glue.c)
    /// and Cloud Hypervisor and QEMU describe it: the register block PCST (PCIU: slots that came up, PCID: slots to
    /// remove, both cleared by reading; B0EJ: writing a slot's bit ejects it; PSEG: the segment, always 0); one
    /// Device(Sxx) per slot with _ADR, _SUN and _EJ0 (acpiphp takes a device with _ADR and _EJ0 under the host bridge
    /// for a hotplug slot); PCNT, which the GED's _EVT runs: Notify(Sxx, 1) (device check: acpiphp rescans the slot and
    /// enables what it finds) for each slot that came up, Notify(Sxx, 3) (eject request: acpiphp removes the device's
    /// driver, then runs _EJ0) for each slot to remove.</summary>
    private static byte[][] HotplugTerms()
    {
        var terms = new List<byte[]>
        {
            Aml.OperationRegion("PCST", Aml.RegionSpace.SystemMemory, MemoryLayout.PciHotplugAddress, MemoryLayout.PciHotplugSize),
            Aml.Field("PCST", Aml.FieldAccess.DWord, ("PCIU", 32), ("PCID", 32), ("B0EJ", 32), ("PSEG", 32)),
            // PCEJ(slot): the eject register takes the slot's bit.
            Aml.Method("PCEJ", 1, serialized: false, Aml.Store(Aml.ShiftLeft(Aml.Integer(1), Aml.Arg(0)), Aml.Ref("B0EJ"))),
        };
        for (int slot = FirstHotplugSlot; slot <= LastHotplugSlot; slot++)
        {
            terms.Add(Aml.Device(SlotName(slot),
                Aml.Name("_ADR", Aml.Integer((ulong)slot << 16)),
                Aml.Name("_SUN", Aml.Integer((ulong)slot)),
                Aml.Method("_EJ0", 1, serialized: false, Aml.Call("PCEJ", Aml.Integer((ulong)slot)))));
        }
        // Both bitmaps are read once (reading clears them), into Local0 and Local1, then tested slot by slot.
        var pcnt = new List<byte[]> { Aml.Store(Aml.Ref("PCIU"), Aml.Local(0)), Aml.Store(Aml.Ref("PCID"), Aml.Local(1)) };
        for (int slot = FirstHotplugSlot; slot <= LastHotplugSlot; slot++)
        {
            pcnt.Add(Aml.If(Aml.And(Aml.Local(0), Aml.Integer(1UL << slot)), Aml.Notify(SlotName(slot), Aml.DeviceCheck)));
            pcnt.Add(Aml.If(Aml.And(Aml.Local(1), Aml.Integer(1UL << slot)), Aml.Notify(SlotName(slot), Aml.EjectRequest)));
        }
        // Serialized: two GED events must not interleave their reads and notifies.
        terms.Add(Aml.Method("PCNT", 0, serialized: true, [.. pcnt]));
        return [.. terms];
    }

    /// <summary>Slot 5 is S05 (QEMU's names: 'S' and the slot in two hex digits).</summary>
    public static string SlotName(int slot) => $"S{slot:X2}";

    /// <summary>The Generic Event Device (ACPI 6.4, 5.6.9; Linux drivers/acpi/evged.c): its _CRS names an edge-triggered
    /// GSI; on that interrupt the OS runs _EVT, which looks for hotplug work (the only event vmm raises there). Edge,
    /// as Cloud Hypervisor's GED: a pulse per event, and PCNT reads every pending slot at once, so events that arrive
    /// together are handled by one run.</summary>
    private static byte[] GenericEventDevice() => Aml.Device("GED_",
        Aml.Name("_HID", Aml.String("ACPI0013")),
        Aml.Name("_UID", Aml.Integer(0)),
        Aml.Name("_CRS", Aml.ResourceTemplate(AmlResource.Interrupt(MemoryLayout.GedGsi, edge: true))),
        Aml.Method("_EVT", 1, serialized: true, Aml.Call("\\_SB.PCI0.PCNT")));

    private static byte[] Com1() => Aml.Device("COM1",
        Aml.Name("_HID", Aml.EisaIdConst("PNP0501")),
        Aml.Name("_UID", Aml.Integer(1)),
        Aml.Name("_STA", Aml.Integer(0x0F)), // present, enabled, shown, functioning
        Aml.Name("_CRS", Aml.ResourceTemplate(AmlResource.Io(0x3F8, 0x3F8, 1, 8), AmlResource.IrqNoFlags(4))));

    /// <summary>The PCI Express host bridge of segment 0 (ACPI 6.4, 6.1 and 6.5; PCI Firmware Specification 4.1):
    /// _CRS gives the root bus range, claims the 0xCF8 configuration ports and lists the windows Linux may assign BARs
    /// in: all I/O ports but those, the 32-bit window and the 64-bit one above RAM. _PRT routes every slot's INTA-INTD
    /// straight to IOAPIC inputs (GSI form: source Zero, source index = GSI). _ADR 0 next to _HID follows QEMU's PCI0 (the
    /// spec discourages both; OSes identify the bridge by _HID). Without _OSC the OS takes over no native PCIe
    /// services (hotplug, AER, PME), which vmm does not have.</summary>
    private static byte[] Pci0((ulong Start, ulong Size) pci64Window)
    {
        const ulong lastBus = MemoryLayout.PciEcamBusCount - 1;
        byte[] resources = Aml.ResourceTemplate(
            AmlResource.WordBusNumber(0, (ushort)lastBus),
            AmlResource.Io(0x0CF8, 0x0CF8, 1, 8),
            AmlResource.WordIo(0x0000, 0x0CF7),
            AmlResource.WordIo(0x0D00, 0xFFFF),
            AmlResource.DWordMemory((uint)MemoryLayout.PciMmio32Start, (uint)(MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size - 1)),
            AmlResource.QWordMemory(pci64Window.Start, pci64Window.Start + pci64Window.Size - 1));
        var routes = new List<byte[]>();
        for (int slot = 0; slot < 32; slot++)
        {
            for (int pin = 0; pin < 4; pin++)
            {
                routes.Add(Aml.Package(
                    Aml.Integer(((ulong)slot << 16) | 0xFFFF), // _ADR form: device in the high word, any function
                    Aml.Integer((ulong)pin),                    // 0 = INTA .. 3 = INTD
                    Aml.Integer(0),                             // source: none, so the index is a GSI
                    Aml.Integer(MemoryLayout.PciIntxGsi(slot, pin))));
            }
        }
        return Aml.Device("PCI0",
        [
            Aml.Name("_HID", Aml.EisaIdConst("PNP0A08")),                // PCI Express root bridge
            Aml.Name("_CID", Aml.EisaIdConst("PNP0A03")),                // PCI root bridge
            Aml.Name("_ADR", Aml.Integer(0)),
            Aml.Name("_UID", Aml.Integer(0)),
            Aml.Name("_SEG", Aml.Integer(0)),
            Aml.Name("_BBN", Aml.Integer(0)),
            Aml.Name("_CRS", resources),
            Aml.Name("_PRT", Aml.Package([.. routes])),
            .. HotplugTerms(),
        ]);
    }

    /// <summary>Motherboard resources (PNP0C02) reserving the ECAM area: before it uses the MCFG, Linux looks for its
    /// range among these ("MMCONFIG at ... reserved as ACPI motherboard resource", arch/x86/pci/mmconfig-shared.c).</summary>
    private static byte[] MotherboardResources() => Aml.Device("MRES",
        Aml.Name("_HID", Aml.EisaIdConst("PNP0C02")),
        Aml.Name("_UID", Aml.Integer(0)),
        Aml.Name("_CRS", Aml.ResourceTemplate(
            AmlResource.Memory32Fixed((uint)MemoryLayout.PciEcamBase, (uint)MemoryLayout.PciEcamSize),
            AmlResource.Memory32Fixed((uint)MemoryLayout.PciHotplugAddress, (uint)MemoryLayout.PciHotplugSize))));
}
