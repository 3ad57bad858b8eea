using System.Buffers.Binary;
using System.Text;
using Vmm.Boot.Acpi;
using Vmm.Devices.Legacy;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Boot;

public class AcpiTablesTests : IDisposable
{
    private readonly GuestMemory _mem = GuestMemory.Create(64 * MemoryLayout.MiB);

    public void Dispose() => _mem.Dispose();

    [Fact]
    public void Every_table_has_a_valid_checksum_and_the_RSDP_both_of_its_own()
    {
        var r = AcpiTables.Write(_mem, 2);
        foreach (var (name, table) in r.Tables)
        {
            if (name == "RSDP")
            {
                Assert.Equal(0, AcpiTables.Checksum(table.AsSpan(0, 20)));
                Assert.Equal(0, AcpiTables.Checksum(table));
            }
            else if (name != "FACS") // the FACS has no checksum
            {
                Assert.True(AcpiTables.Checksum(table) == 0, $"{name} checksum");
                Assert.Equal((uint)table.Length, BinaryPrimitives.ReadUInt32LittleEndian(table.AsSpan(4)));
            }
        }
    }

    [Fact]
    public void The_RSDP_sits_in_the_BIOS_search_area_and_points_at_the_XSDT_which_lists_FADT_and_MADT()
    {
        var r = AcpiTables.Write(_mem, 1);
        Assert.InRange(r.Rsdp, 0xE0000UL, 0xFFFFFUL);
        Assert.Equal(0UL, r.Rsdp % 16);
        var rsdp = new byte[36];
        _mem.Read(new GuestAddress(r.Rsdp), rsdp);
        Assert.Equal("RSD PTR ", Encoding.ASCII.GetString(rsdp, 0, 8));
        ulong xsdt = BinaryPrimitives.ReadUInt64LittleEndian(rsdp.AsSpan(24));
        string Sig(ulong at) { var s = new byte[4]; _mem.Read(new GuestAddress(at), s); return Encoding.ASCII.GetString(s); }
        Assert.Equal("XSDT", Sig(xsdt));
        Assert.Equal("FACP", Sig(_mem.ReadObj<ulong>(new GuestAddress(xsdt + 36))));
        Assert.Equal("APIC", Sig(_mem.ReadObj<ulong>(new GuestAddress(xsdt + 44))));
        ulong fadt = _mem.ReadObj<ulong>(new GuestAddress(xsdt + 36));
        Assert.Equal("DSDT", Sig(_mem.ReadObj<ulong>(new GuestAddress(fadt + 140))));
        Assert.Equal("FACS", Sig(_mem.ReadObj<ulong>(new GuestAddress(fadt + 132))));
        Assert.Equal((ushort)9, _mem.ReadObj<ushort>(new GuestAddress(fadt + 46)));                // SCI_INT
        Assert.Equal((uint)AcpiPorts.PmTimer, _mem.ReadObj<uint>(new GuestAddress(fadt + 76)));   // PM_TMR_BLK
        Assert.Equal(AcpiPorts.CenturyIndex, _mem.ReadObj<byte>(new GuestAddress(fadt + 108)));
        uint flags = _mem.ReadObj<uint>(new GuestAddress(fadt + 112));
        Assert.Equal(0u, flags & (1u << 4));  // PWR_BUTTON clear: a fixed-feature power button (vm.power-button)
        Assert.Equal(1u << 5, flags & (1u << 5)); // SLP_BUTTON set: no sleep button
        Assert.Equal(0u, flags & (1u << 20)); // not HW_REDUCED_ACPI: PM1 event blocks exist
    }

    [Fact]
    public void The_MADT_has_a_local_APIC_per_vCPU_the_IOAPIC_and_both_overrides()
    {
        var madt = AcpiTables.Write(_mem, 3).Tables["APIC"];
        var entries = new List<(byte Type, byte[] Body)>();
        for (int at = 44; at < madt.Length; at += madt[at + 1])
            entries.Add((madt[at], madt.AsSpan(at, madt[at + 1]).ToArray()));
        var lapics = entries.Where(e => e.Type == 0).ToList();
        Assert.Equal([0, 1, 2], lapics.Select(e => (int)e.Body[3]));                 // APIC ids
        Assert.All(lapics, e => Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(e.Body.AsSpan(4))));
        var ioapic = Assert.Single(entries, e => e.Type == 1);
        Assert.Equal(0xFEC0_0000u, BinaryPrimitives.ReadUInt32LittleEndian(ioapic.Body.AsSpan(4)));
        var overrides = entries.Where(e => e.Type == 2).Select(e => (e.Body[3], BinaryPrimitives.ReadUInt32LittleEndian(e.Body.AsSpan(4)), BinaryPrimitives.ReadUInt16LittleEndian(e.Body.AsSpan(8)))).ToList();
        Assert.Equal([((byte)0, 2u, (ushort)0), ((byte)9, 9u, (ushort)0x0D)], overrides);
    }

    [Theory]
    [InlineData(0, new byte[] { 0x01 })]
    [InlineData(62, new byte[] { 0x3F })]
    [InlineData(63, new byte[] { 0x41, 0x04 })]     // 65 = 0x41: low nibble 1, next byte 4
    [InlineData(4000, new byte[] { 0x42, 0xFA })]       // 4002 = 0xFA2: the largest two-byte form
    [InlineData(5000, new byte[] { 0x8B, 0x38, 0x01 })] // 5003 = 0x138B
    [InlineData(1_100_000, new byte[] { 0xC4, 0x8E, 0x0C, 0x01 })] // 1100004 = 0x10C8E4
    public void AML_package_lengths_count_themselves(int content, byte[] encoded) => Assert.Equal(encoded, Aml.PkgLength(content));

    [Fact]
    public void EISA_ids_compress_as_ACPI_defines() => Assert.Equal(0x0105D041u, Aml.EisaId("PNP0501"));

    [Fact]
    public void AML_name_strings_take_root_and_dual_name_prefixes_and_pad_segments()
    {
        Assert.Equal("_HID"u8.ToArray(), Aml.NameString("_HID"));
        Assert.Equal("\\_SB_"u8.ToArray(), Aml.NameString("\\_SB"));
        Assert.Equal([(byte)'\\', 0x2E, .. "_SB_PCI0"u8], Aml.NameString("\\_SB.PCI0"));
    }

    [Fact]
    public void The_MCFG_describes_ECAM_of_segment_0_bus_0_and_the_RSDT_and_XSDT_list_it()
    {
        var r = AcpiTables.Write(_mem, 1);
        var mcfg = r.Tables["MCFG"];
        Assert.Equal("MCFG", Encoding.ASCII.GetString(mcfg, 0, 4));
        Assert.Equal(1, mcfg[8]);                                                   // revision
        Assert.Equal(60, mcfg.Length);                                              // header, 8 reserved, one allocation
        Assert.Equal((uint)mcfg.Length, BinaryPrimitives.ReadUInt32LittleEndian(mcfg.AsSpan(4)));
        Assert.Equal(0, AcpiTables.Checksum(mcfg));
        Assert.Equal(new byte[8], mcfg.AsSpan(36, 8).ToArray());
        Assert.Equal(0xE000_0000UL, BinaryPrimitives.ReadUInt64LittleEndian(mcfg.AsSpan(44)));   // base address
        Assert.Equal((ushort)0, BinaryPrimitives.ReadUInt16LittleEndian(mcfg.AsSpan(52)));      // segment group
        Assert.Equal(0, mcfg[54]);                                                  // start bus
        Assert.Equal(0, mcfg[55]);                                                  // end bus (one bus)
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(mcfg.AsSpan(56)));

        string Sig(ulong at) { var s = new byte[4]; _mem.Read(new GuestAddress(at), s); return Encoding.ASCII.GetString(s); }
        var rsdt = r.Tables["RSDT"];
        var xsdt = r.Tables["XSDT"];
        Assert.Equal(["FACP", "APIC", "MCFG"], Enumerable.Range(0, (rsdt.Length - 36) / 4).Select(i => Sig(BinaryPrimitives.ReadUInt32LittleEndian(rsdt.AsSpan(36 + 4 * i)))));
        Assert.Equal(["FACP", "APIC", "MCFG"], Enumerable.Range(0, (xsdt.Length - 36) / 8).Select(i => Sig(BinaryPrimitives.ReadUInt64LittleEndian(xsdt.AsSpan(36 + 8 * i)))));
    }

    [Theory]
    [InlineData(2UL, "0x0000000100000000", "0x00000010FFFFFFFF")]     // RAM ends below the hole: the window starts at 4 GiB
    [InlineData(6UL, "0x00000001C0000000", "0x00000011BFFFFFFF")]     // 3 GiB above 4 GiB: RAM ends at 7 GiB
    public void The_DSDT_describes_the_PCI_host_bridge_with_its_windows_and_the_ECAM_reservation(ulong ramGiB, string min64, string max64)
    {
        using var memory = GuestMemory.Create(ramGiB * MemoryLayout.GiB);
        string dsl = Disassemble("DSDT", AcpiTables.Write(memory, 1).Tables["DSDT"]);
        string pci0 = Squeeze(Body(dsl, "Device (PCI0)"));
        Assert.Contains("Name (_HID, EisaId (\"PNP0A08\")", pci0);
        Assert.Contains("Name (_CID, EisaId (\"PNP0A03\")", pci0);
        Assert.Contains("Name (_ADR, Zero)", pci0);
        Assert.Contains("Name (_UID, Zero)", pci0);
        Assert.Contains("Name (_SEG, Zero)", pci0);
        Assert.Contains("Name (_BBN, Zero)", pci0);
        string crs = Body(pci0, "Name (_CRS, ResourceTemplate ()");
        Assert.Contains("WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, 0x0000, 0x0000, 0x0001,", crs);
        Assert.Contains("IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08, )", crs);
        Assert.Contains("WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8,", crs);
        Assert.Contains("WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300,", crs);
        Assert.Contains("DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite, 0x00000000, 0xC0000000, 0xDFFFFFFF, 0x00000000, 0x20000000,", crs);
        Assert.Contains($"QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite, 0x0000000000000000, {min64}, {max64}, 0x0000000000000000, 0x0000001000000000,", crs);

        string mres = Squeeze(Body(dsl, "Device (MRES)"));
        Assert.Contains("Name (_HID, EisaId (\"PNP0C02\")", mres);
        Assert.Contains("Memory32Fixed (ReadWrite, 0xE0000000, 0x00100000, )", mres);
    }

    [Fact]
    public void The_PCI_routing_table_sends_every_slot_and_pin_to_its_swizzled_GSI()
    {
        string prt = Squeeze(Body(Disassemble("DSDT", AcpiTables.Write(_mem, 1).Tables["DSDT"]), "Name (_PRT, Package (0x80)"));
        var entries = System.Text.RegularExpressions.Regex.Matches(prt, @"Package \(0x04\) \{ (0x[0-9A-F]+), (\w+), Zero, (\w+) \}")
            .Select(m => (Address: Number(m.Groups[1].Value), Pin: Number(m.Groups[2].Value), Gsi: Number(m.Groups[3].Value)))
            .ToList();
        var expected = from slot in Enumerable.Range(0, 32)
                       from pin in Enumerable.Range(0, 4)
                       select (((ulong)slot << 16) | 0xFFFF, (ulong)pin, (ulong)MemoryLayout.PciIntxGsi(slot, pin));
        Assert.Equal(expected, entries);
        Assert.Contains("Package (0x04) { 0x0001FFFF, Zero, Zero, 0x11 }", prt);  // slot 1 INTA → GSI 17
        Assert.Contains("Package (0x04) { 0x0003FFFF, One, Zero, 0x10 }", prt);   // slot 3 INTB → GSI 16
    }

    [Fact]
    public void The_DSDT_has_a_hotplug_slot_per_root_bus_slot_the_register_block_and_a_GED_that_runs_PCNT()
    {
        string dsl = Disassemble("DSDT", AcpiTables.Write(_mem, 1).Tables["DSDT"]);
        string pci0 = Squeeze(Body(dsl, "Device (PCI0)"));
        Assert.Contains("OperationRegion (PCST, SystemMemory, 0xFEB00000, 0x10)", pci0);
        Assert.Contains("Field (PCST, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, B0EJ, 32, PSEG, 32 }", pci0);
        Assert.Contains("Method (PCEJ, 1, NotSerialized) { B0EJ = (One << Arg0) }", pci0);
        Assert.DoesNotContain("Device (S00)", pci0); // the host bridge's slot
        for (int slot = 1; slot < 32; slot++)
        {
            string name = $"S{slot:X2}";
            string device = Squeeze(Body(pci0, $"Device ({name})"));
            Assert.Contains($"Name (_ADR, 0x{slot << 16:X8})", device);
            Assert.Contains($"Name (_SUN, {(slot == 1 ? "One" : $"0x{slot:X2}")})", device);
            Assert.Contains($"Method (_EJ0, 1, NotSerialized) {{ PCEJ ({(slot == 1 ? "One" : $"0x{slot:X2}")}) }}", device);
        }
        string pcnt = Squeeze(Body(pci0, "Method (PCNT, 0, Serialized)"));
        Assert.Contains("Local0 = PCIU", pcnt);
        Assert.Contains("Local1 = PCID", pcnt);
        Assert.Contains("If ((Local0 & 0x20)) { Notify (S05, One) }", pcnt);       // slot 5 came up: device check
        Assert.Contains("If ((Local1 & 0x20)) { Notify (S05, 0x03) }", pcnt);      // slot 5 to remove: eject request
        Assert.Contains("If ((Local1 & 0x80000000)) { Notify (S1F, 0x03) }", pcnt);

        string ged = Squeeze(Body(dsl, "Device (GED)"));
        Assert.Contains("Name (_HID, \"ACPI0013\"", ged);
        Assert.Contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000014, }", ged);
        Assert.Contains("Method (_EVT, 1, Serialized) { \\_SB.PCI0.PCNT () }", ged);
        Assert.Contains("Memory32Fixed (ReadWrite, 0xFEB00000, 0x00000010, )", Squeeze(Body(dsl, "Device (MRES)")));
        Assert.Equal(20u, MemoryLayout.GedGsi);
        Assert.DoesNotContain(MemoryLayout.GedGsi, Enumerable.Range(0, 32).SelectMany(s => Enumerable.Range(0, 4).Select(p => MemoryLayout.PciIntxGsi(s, p))));
    }

    [Fact]
    public void The_disassembled_DSDT_compiles_again_with_iasl_without_errors()
    {
        string dsl = Disassemble("DSDT", AcpiTables.Write(_mem, 1).Tables["DSDT"]);
        string dir = Directory.CreateTempSubdirectory("vmm-acpi-").FullName;
        try
        {
            File.WriteAllText(Path.Combine(dir, "dsdt.dsl"), dsl);
            var r = Repo.Run("iasl", ["dsdt.dsl"], dir, TimeSpan.FromMinutes(1));
            Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
            Assert.Contains("0 Errors", r.Stdout + r.Stderr);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void AML_methods_statements_regions_and_fields_disassemble_as_written()
    {
        byte[] aml = Aml.Scope("\\_SB",
            Aml.OperationRegion("REGN", Aml.RegionSpace.SystemIo, 0x510, 0x0C),
            Aml.Field("REGN", Aml.FieldAccess.Byte, ("FLDA", 8), ("FLDB", 24), ("FLDC", 64)),
            Aml.Method("TEST", 2, serialized: false,
                Aml.Store(Aml.Arg(0), Aml.Local(3)),
                Aml.If(Aml.LAnd(Aml.LEqual(Aml.Local(3), Aml.Integer(5)), Aml.LEqual(Aml.Arg(1), Aml.Integer(0x1234))),
                    Aml.Store(Aml.And(Aml.Ref("FLDB"), Aml.Integer(0xFF)), Aml.Ref("FLDA")),
                    Aml.Store(Aml.ShiftLeft(Aml.Integer(1), Aml.Arg(1)), Aml.Ref("FLDC")),
                    Aml.Notify("DEV0", 0x80))),
            Aml.Device("DEV0", Aml.Name("_HID", Aml.String("ACPI0013")),
                Aml.Method("CALL", 0, serialized: true, Aml.Call("\\_SB.TEST", Aml.Integer(5), Aml.Integer(0x1234)))));
        string dsl = Squeeze(Disassemble("DSDT", AcpiTables.Table("DSDT", 2, aml)));
        Assert.Contains("OperationRegion (REGN, SystemIO, 0x0510, 0x0C)", dsl);
        Assert.Contains("Field (REGN, ByteAcc, NoLock, WriteAsZeros) { FLDA, 8, FLDB, 24, FLDC, 64 }", dsl);
        Assert.Contains("Method (TEST, 2, NotSerialized) { Local3 = Arg0 If (((Local3 == 0x05) && (Arg1 == 0x1234))) { FLDA = (FLDB & 0xFF) FLDC = (One << Arg1) Notify (DEV0, 0x80) } }", dsl);
        Assert.Contains("Name (_HID, \"ACPI0013\"", dsl);
        Assert.Contains("Method (CALL, 0, Serialized) { \\_SB.TEST (0x05, 0x1234) }", dsl);
    }

    private static ulong Number(string aml) => aml switch
    {
        "Zero" => 0,
        "One" => 1,
        _ => Convert.ToUInt64(aml, 16),
    };

    /// <summary>The text of the block opened by <paramref name="header"/>, up to its matching brace.</summary>
    private static string Body(string dsl, string header)
    {
        int at = dsl.IndexOf(header, StringComparison.Ordinal);
        Assert.True(at >= 0, $"no \"{header}\" in:\n{dsl}");
        int open = dsl.IndexOf('{', at), depth = 0;
        for (int i = open; i < dsl.Length; i++)
        {
            if (dsl[i] == '{')
                depth++;
            else if (dsl[i] == '}' && --depth == 0)
                return dsl[at..(i + 1)];
        }
        throw new Xunit.Sdk.XunitException($"unbalanced braces after \"{header}\"");
    }

    /// <summary>iasl's text with // and /* */ comments dropped and whitespace runs folded to one space, so multi-line macros
    /// such as WordIO (...) read as one line.</summary>
    private static string Squeeze(string dsl)
    {
        string noComments = System.Text.RegularExpressions.Regex.Replace(dsl, @"//[^\n]*|/\*.*?\*/", "");
        return System.Text.RegularExpressions.Regex.Replace(noComments, @"\s+", " ");
    }

    /// <summary>Runs <c>iasl -d</c> on <paramref name="table"/>, asserts it reports no errors, and returns the .dsl text.</summary>
    private static string Disassemble(string name, byte[] table)
    {
        string dir = Directory.CreateTempSubdirectory("vmm-acpi-").FullName;
        try
        {
            string file = Path.Combine(dir, name.ToLowerInvariant() + ".dat");
            File.WriteAllBytes(file, table);
            var r = Repo.Run("iasl", ["-d", file], dir, TimeSpan.FromMinutes(1));
            string output = r.Stdout + r.Stderr;
            Assert.True(r.ExitCode == 0, $"iasl -d {name} failed: {output}");
            Assert.DoesNotMatch(@"[1-9]\d* Errors?|Error\s+\d{4}", output);
            return File.ReadAllText(Path.ChangeExtension(file, ".dsl"));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void Every_table_disassembles_with_iasl_without_errors()
    {
        foreach (var (name, table) in AcpiTables.Write(_mem, 2).Tables.Where(t => t.Key != "RSDP"))
        {
            string dsl = Disassemble(name, table);
            if (name == "DSDT")
            {
                Assert.Contains("Name (\\_S5, Package (0x04)", dsl);
                Assert.Contains("Device (COM1)", dsl);
                Assert.Contains("EisaId (\"PNP0501\")", dsl);
                Assert.Contains("IO (Decode16,", dsl);
                Assert.Contains("IRQNoFlags ()", dsl);
                Assert.Contains("Device (PCI0)", dsl);
            }
            if (name == "FACP")
                Assert.Contains("PM Timer Block Address : 00000608", dsl);
            if (name == "MCFG")
                Assert.Matches(@"Base Address : 00000000E0000000\s+.*Segment Group Number : 0000\s+.*Start Bus Number : 00\s+.*End Bus Number : 00", dsl);
        }
    }
}

public class AcpiPmDeviceTests
{
    [Fact]
    public void S5_with_SLP_EN_powers_off_and_SCI_EN_reads_set()
    {
        var control = new RecordingVmControl();
        var pm = new AcpiPmDevice(control);
        var b = new byte[2];
        pm.Read(4, b);
        Assert.Equal(1, b[0] & 1); // SCI_EN: ACPI mode
        pm.Write(4, BitConverter.GetBytes((ushort)(3 << 10))); // SLP_TYP 3 without SLP_EN: nothing
        Assert.Empty(control.Events);
        pm.Write(4, BitConverter.GetBytes((ushort)((5 << 10) | (1 << 13))));
        Assert.Equal(["poweroff: ACPI S5 (PM1a_CNT SLP_EN)"], control.Events);
    }

    [Fact]
    public void The_power_button_sets_PWRBTN_STS_and_asserts_the_SCI_only_while_the_OS_enables_it()
    {
        var sci = new RecordingInterruptLine();
        var pm = new AcpiPmDevice(new RecordingVmControl(), sci);
        var b = new byte[2];
        pm.PressPowerButton();
        pm.Read(0, b);
        Assert.Equal(AcpiPorts.PowerButtonBit, BitConverter.ToUInt16(b) & AcpiPorts.PowerButtonBit);
        Assert.False(sci.Level);                                   // PWRBTN_EN still clear: no SCI yet
        pm.Write(2, BitConverter.GetBytes(AcpiPorts.PowerButtonBit)); // the OS enables the event
        Assert.True(sci.Level);
        pm.Write(0, BitConverter.GetBytes((ushort)0x0001));        // writing 1 to another bit clears nothing here
        Assert.True(sci.Level);
        pm.Write(0, BitConverter.GetBytes(AcpiPorts.PowerButtonBit)); // write-1-to-clear
        pm.Read(0, b);
        Assert.Equal(0, BitConverter.ToUInt16(b));
        Assert.False(sci.Level);
        pm.PressPowerButton();                                     // enabled now: the press raises the SCI at once
        Assert.True(sci.Level);
        Assert.Equal(2, sci.RisingEdges);
    }

    [Fact]
    public void The_reset_register_resets_on_its_value_only()
    {
        var control = new RecordingVmControl();
        var pm = new AcpiPmDevice(control);
        pm.Write(12, [0x01]);
        pm.Write(12, [AcpiPorts.ResetValue]);
        Assert.Equal(["reset: ACPI reset register"], control.Events);
    }

    [Fact]
    public void The_PM_timer_counts_at_3_579545_MHz()
    {
        var pm = new AcpiPmDevice(new RecordingVmControl());
        var b = new byte[4];
        pm.Read(8, b);
        uint t0 = BitConverter.ToUInt32(b);
        var sw = System.Diagnostics.Stopwatch.StartNew();
        Thread.Sleep(200);
        pm.Read(8, b);
        double elapsed = sw.Elapsed.TotalSeconds;
        uint ticks = BitConverter.ToUInt32(b) - t0;
        Assert.InRange(ticks / elapsed, 3_579_545 * 0.9, 3_579_545 * 1.1);
    }
}
