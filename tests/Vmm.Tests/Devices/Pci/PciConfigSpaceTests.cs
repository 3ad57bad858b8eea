using System.Buffers.Binary;
using Vmm.Devices.Pci;

namespace Vmm.Tests.Devices.Pci;

public class PciConfigSpaceTests
{
    private static PciConfigSpace NewSpace() =>
        new(vendorId: 0x1234, deviceId: 0x5678, classCode: 0x01, subClass: 0x08, progIf: 0x02, revision: 3,
            subsystemVendorId: 0xABCD, subsystemId: 0xEF01);

    private static uint Read32(PciConfigSpace c, int offset)
    {
        Span<byte> b = stackalloc byte[4];
        c.Read(offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private static void Write32(PciConfigSpace c, int offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        c.Write(offset, b);
    }

    [Fact]
    public void The_type_0_header_holds_the_identity_at_the_standard_offsets()
    {
        var c = NewSpace();
        Assert.Equal(0x5678_1234u, Read32(c, 0x00));
        Assert.Equal(0x0108_0203u, Read32(c, 0x08)); // class 01, subclass 08, prog-if 02, revision 3
        Assert.Equal(0xEF01_ABCDu, Read32(c, 0x2C));
        Assert.Equal(0u, Read32(c, 0x04));            // command and status start clear
        Assert.Equal(0, c.Get8(PciConfigSpace.HeaderType));
    }

    [Fact]
    public void Read_only_fields_ignore_writes_and_only_the_writable_bits_change()
    {
        var c = NewSpace();
        c.SetInterruptPin(1);
        var before = new byte[PciConfigSpace.Size];
        c.Read(0, before);
        for (int offset = 0; offset < PciConfigSpace.Size; offset += 4)
            Write32(c, offset, 0xFFFF_FFFF);
        var after = new byte[PciConfigSpace.Size];
        c.Read(0, after);

        // Only the command bits (I/O, memory, bus master, INTx disable) and the interrupt line took the ones.
        Assert.Equal(0x0407, c.CommandRegister);
        Assert.Equal(0xFF, after[PciConfigSpace.InterruptLine]);
        after[PciConfigSpace.Command] = before[PciConfigSpace.Command];
        after[PciConfigSpace.Command + 1] = before[PciConfigSpace.Command + 1];
        after[PciConfigSpace.InterruptLine] = before[PciConfigSpace.InterruptLine];
        Assert.Equal(before, after);
        Assert.Equal(1, c.Get8(PciConfigSpace.InterruptPin));
    }

    [Fact]
    public void Write_one_to_clear_bits_clear_only_where_ones_are_written()
    {
        var c = NewSpace();
        c.Set16(PciConfigSpace.Status, 0x8100);
        c.SetWriteOneToClear(PciConfigSpace.Status, 2, 0xF900);
        Span<byte> two = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(two, 0x0100);
        c.Write(PciConfigSpace.Status, two);
        Assert.Equal(0x8000, c.Get16(PciConfigSpace.Status));
        BinaryPrimitives.WriteUInt16LittleEndian(two, 0x0000);
        c.Write(PciConfigSpace.Status, two);
        Assert.Equal(0x8000, c.Get16(PciConfigSpace.Status));
    }

    [Fact]
    public void A_32_bit_BAR_answers_a_sizing_probe_with_its_size_mask()
    {
        var c = NewSpace();
        c.AddBar(0, 0x4000, PciBarKind.Memory32);
        c.SetBarAddress(0, 0xC000_4000);
        Assert.Equal(0xC000_4000u, Read32(c, PciConfigSpace.Bar0));
        Write32(c, PciConfigSpace.Bar0, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_C000u, Read32(c, PciConfigSpace.Bar0));
        Write32(c, PciConfigSpace.Bar0, 0xC000_4000);
        Assert.Equal(0xC000_4000UL, c.BarAddress(0));
    }

    [Fact]
    public void A_64_bit_prefetchable_BAR_answers_a_sizing_probe_in_both_halves()
    {
        var c = NewSpace();
        c.AddBar(2, 8 * Vmm.Memory.MemoryLayout.GiB, PciBarKind.Memory64, prefetchable: true);
        Assert.Equal(0b1100u, Read32(c, PciConfigSpace.Bar0 + 8)); // 64-bit, prefetchable, address 0
        Write32(c, PciConfigSpace.Bar0 + 8, 0xFFFF_FFFF);
        Write32(c, PciConfigSpace.Bar0 + 12, 0xFFFF_FFFF);
        Assert.Equal(0x0000_000Cu, Read32(c, PciConfigSpace.Bar0 + 8));
        Assert.Equal(0xFFFF_FFFEu, Read32(c, PciConfigSpace.Bar0 + 12));
        Write32(c, PciConfigSpace.Bar0 + 8, 0);
        Write32(c, PciConfigSpace.Bar0 + 12, 0x4);
        Assert.Equal(0x4_0000_0000UL, c.BarAddress(2));
        var bar = Assert.Single(c.Bars);
        Assert.Equal("BAR2 64-bit prefetchable memory, 0x200000000 bytes", bar.ToString());
    }

    [Fact]
    public void Unimplemented_BARs_read_zero_and_ignore_writes()
    {
        var c = NewSpace();
        c.AddBar(0, 0x1000, PciBarKind.Memory32);
        for (int i = 1; i < 6; i++)
        {
            Write32(c, PciConfigSpace.Bar0 + 4 * i, 0xFFFF_FFFF);
            Assert.Equal(0u, Read32(c, PciConfigSpace.Bar0 + 4 * i));
        }
        Write32(c, 0x30, 0xFFFF_FFFF); // expansion ROM: none
        Assert.Equal(0u, Read32(c, 0x30));
        Assert.Throws<PciConfigException>(() => c.BarAddress(1));
    }

    [Theory]
    [InlineData(-1, 0x1000UL, PciBarKind.Memory32, "index out of range")]
    [InlineData(6, 0x1000UL, PciBarKind.Memory32, "index out of range")]
    [InlineData(5, 0x1000UL, PciBarKind.Memory64, "index out of range")]
    [InlineData(0, 0x1800UL, PciBarKind.Memory32, "not a power of two")]
    [InlineData(0, 8UL, PciBarKind.Memory32, "at least 16 bytes")]
    [InlineData(0, 0x1_0000_0000UL, PciBarKind.Memory32, "do not fit a 32-bit BAR")]
    public void Bad_BAR_declarations_are_refused(int index, ulong size, PciBarKind kind, string why)
    {
        var c = NewSpace();
        var e = Assert.Throws<PciConfigException>(() => c.AddBar(index, size, kind));
        Assert.Contains(why, e.Message);
    }

    [Fact]
    public void A_64_bit_BAR_takes_two_registers()
    {
        var c = NewSpace();
        c.AddBar(0, 0x1000, PciBarKind.Memory64);
        Assert.Contains("already in use", Assert.Throws<PciConfigException>(() => c.AddBar(1, 0x1000, PciBarKind.Memory32)).Message);
        Assert.Contains("already in use", Assert.Throws<PciConfigException>(() => c.AddBar(0, 0x1000, PciBarKind.Memory32)).Message);
        c.AddBar(3, 0x1000, PciBarKind.Memory32);
        Assert.Contains("already in use", Assert.Throws<PciConfigException>(() => c.AddBar(2, 0x1000, PciBarKind.Memory64)).Message);
    }

    [Fact]
    public void SetBarAddress_refuses_misaligned_and_out_of_reach_addresses_without_changing_the_BAR()
    {
        var c = NewSpace();
        c.AddBar(0, 0x1000, PciBarKind.Memory32);
        c.SetBarAddress(0, 0xC000_0000);
        Assert.Contains("not aligned", Assert.Throws<PciConfigException>(() => c.SetBarAddress(0, 0xC000_0800)).Message);
        Assert.Contains("above 4 GiB", Assert.Throws<PciConfigException>(() => c.SetBarAddress(0, 0x1_D000_0000)).Message);
        Assert.Equal(0xC000_0000UL, c.BarAddress(0));
    }

    [Fact]
    public void Capabilities_form_a_list_from_the_capabilities_pointer()
    {
        var c = NewSpace();
        Assert.Equal(0, c.Get16(PciConfigSpace.Status) & PciConfigSpace.StatusCapabilities);
        int a = c.AddCapability(PciConfigSpace.CapabilityVendor, [1, 2, 3]);            // 5 bytes -> 8
        int b = c.AddCapability(PciConfigSpace.CapabilityPciExpress, new byte[58]);     // 60 bytes
        int d = c.AddCapability(PciConfigSpace.CapabilityMsix, new byte[10], [0, 0xC0]);
        Assert.Equal([0x40, 0x48, 0x84], new[] { a, b, d });
        Assert.NotEqual(0, c.Get16(PciConfigSpace.Status) & PciConfigSpace.StatusCapabilities);

        var walked = new List<(int Offset, byte Id)>();
        for (int at = c.Get8(PciConfigSpace.CapabilitiesPointer); at != 0; at = c.Get8(at + 1))
            walked.Add((at, c.Get8(at)));
        Assert.Equal([(0x40, (byte)0x09), (0x48, (byte)0x10), (0x84, (byte)0x11)], walked);
        Assert.Equal(3, c.Get8(a + 4));
        Assert.Equal(0x84, c.FindCapability(PciConfigSpace.CapabilityMsix));
        Assert.Equal(0, c.FindCapability(PciConfigSpace.CapabilityMsi));

        // Only the declared writable bits of a capability change; the ID and the next pointer never do.
        Write32(c, d, 0xFFFF_FFFF);
        Assert.Equal(0xC000_0011u, Read32(c, d));
    }

    [Fact]
    public void A_capability_that_does_not_fit_in_the_legacy_space_is_refused()
    {
        var c = NewSpace();
        c.AddCapability(PciConfigSpace.CapabilityVendor, new byte[180]); // 0x40..0xF8
        var e = Assert.Throws<PciConfigException>(() => c.AddCapability(PciConfigSpace.CapabilityVendor, new byte[8]));
        Assert.Contains("does not fit", e.Message);
    }

    [Fact]
    public void The_expansion_ROM_BAR_answers_sizing_decodes_only_when_enabled_and_keeps_its_enable_bit_when_placed()
    {
        var c = NewSpace();
        Assert.Equal(0u, Read32(c, 0x30));
        var rom = c.AddRomBar(0x10000);
        Assert.Equal((PciConfigSpace.RomBarIndex, 0x10000ul, PciBarKind.Memory32), (rom.Index, rom.Size, rom.Kind));
        Assert.Contains(rom, c.Bars);
        Write32(c, 0x30, 0xFFFF_FFFE);             // sizing probe, enable bit clear
        Assert.Equal(0xFFFF_0000u, Read32(c, 0x30));
        Assert.False(c.RomEnabled);
        Assert.False(c.BarEnabled(PciConfigSpace.RomBarIndex));
        Write32(c, 0x30, 0xC004_07FF);             // reserved bits 10:1 and the low address bits stay 0
        Assert.Equal(0xC004_0001u, Read32(c, 0x30));
        Assert.True(c.RomEnabled);
        c.SetBarAddress(PciConfigSpace.RomBarIndex, 0xD000_0000);
        Assert.Equal(0xD000_0001u, Read32(c, 0x30));
        Assert.Equal(0xD000_0000ul, c.BarAddress(PciConfigSpace.RomBarIndex));
        Assert.True(c.BarEnabled(0)); // ordinary BARs have no enable bit of their own
    }

    [Theory]
    [InlineData(0x400ul)]
    [InlineData(0x3000ul)]
    [InlineData(1ul << 32)]
    public void Bad_ROM_sizes_are_refused(ulong size)
    {
        var e = Assert.Throws<PciConfigException>(() => NewSpace().AddRomBar(size));
        Assert.Contains("expansion ROM", e.Message);
    }

    [Fact]
    public void A_capability_placed_at_a_fixed_offset_keeps_its_next_pointer_and_gets_its_write_mask()
    {
        var c = NewSpace();
        c.Set8(0x81, 0x90);
        c.PlaceCapability(0x80, 0x05, [0x80, 0x00, 0x11, 0x22], [0x01, 0x00, 0xFF, 0x00]);
        Assert.Equal(0x0080_9005u, Read32(c, 0x80));
        Write32(c, 0x82, 0xFFFF_FFFF);
        Assert.Equal(0x22FF_0081u, Read32(c, 0x82));
        Assert.Throws<PciConfigException>(() => c.PlaceCapability(0xFC, 0x05, new byte[8]));
    }

    [Theory]
    [InlineData(0x0C, 4, false)]
    [InlineData(0x10, 1, true)]
    [InlineData(0x0E, 4, true)]
    [InlineData(0x24, 4, true)]
    [InlineData(0x27, 1, true)]
    [InlineData(0x28, 4, false)]
    [InlineData(0x2C, 4, false)]
    [InlineData(0x30, 4, true)]
    [InlineData(0x33, 1, true)]
    [InlineData(0x34, 4, false)]
    public void TouchesBars_covers_exactly_the_six_BAR_registers_and_the_ROM_BAR(int offset, int length, bool touches) =>
        Assert.Equal(touches, PciConfigSpace.TouchesBars(offset, length));

    [Theory]
    [InlineData(0x00, 4, false)]
    [InlineData(0x02, 4, true)]
    [InlineData(0x04, 1, true)]
    [InlineData(0x05, 1, true)]
    [InlineData(0x06, 2, false)]
    public void TouchesCommand_covers_exactly_the_command_register(int offset, int length, bool touches) =>
        Assert.Equal(touches, PciConfigSpace.TouchesCommand(offset, length));
}
