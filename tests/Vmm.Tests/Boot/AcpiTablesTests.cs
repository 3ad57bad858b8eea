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
    public void AML_package_lengths_count_themselves(int content, byte[] encoded) => Assert.Equal(encoded, AcpiTables.PkgLength(content));

    [Fact]
    public void EISA_ids_compress_as_ACPI_defines() => Assert.Equal(0x0105D041u, AcpiTables.EisaId("PNP0501"));

    [Fact]
    public void Every_table_disassembles_with_iasl_without_errors()
    {
        var tables = AcpiTables.Write(_mem, 2).Tables;
        string dir = Directory.CreateTempSubdirectory("vmm-acpi-").FullName;
        try
        {
            foreach (var (name, table) in tables.Where(t => t.Key != "RSDP"))
            {
                string file = Path.Combine(dir, name.ToLowerInvariant() + ".dat");
                File.WriteAllBytes(file, table);
                var r = Repo.Run("iasl", ["-d", file], dir, TimeSpan.FromMinutes(1));
                string output = r.Stdout + r.Stderr;
                Assert.True(r.ExitCode == 0, $"iasl -d {name} failed: {output}");
                Assert.DoesNotMatch(@"[1-9]\d* Errors?|Error\s+\d{4}", output);
                string dsl = File.ReadAllText(Path.ChangeExtension(file, ".dsl"));
                if (name == "DSDT")
                {
                    Assert.Contains("Name (\\_S5, Package (0x04)", dsl);
                    Assert.Contains("Device (COM1)", dsl);
                    Assert.Contains("EisaId (\"PNP0501\")", dsl);
                    Assert.Contains("IO (Decode16,", dsl);
                    Assert.Contains("IRQNoFlags ()", dsl);
                }
                if (name == "FACP")
                    Assert.Contains("PM Timer Block Address : 00000608", dsl);
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
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
