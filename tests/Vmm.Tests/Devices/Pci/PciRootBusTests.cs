using System.Buffers.Binary;
using Vmm.Devices.Pci;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Pci;

public class PciRootBusTests
{
    private const ulong GiB = MemoryLayout.GiB, MiB = MemoryLayout.MiB;
    private static readonly (ulong Start, ulong Size) s_window64 = MemoryLayout.Pci64Window(2 * GiB);

    private readonly PciRootBus _root = new(s_window64.Start, s_window64.Size);

    // ---- the guest's view: ports 0xCF8-0xCFF, ECAM, the BAR windows ----

    private static uint Address(int bus, int device, int function, int register, bool enable = true) =>
        (enable ? 0x8000_0000u : 0) | (uint)(bus << 16) | (uint)(device << 11) | (uint)(function << 8) | (uint)(register & 0xFC);

    private void SetAddress(uint address)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, address);
        _root.ConfigIo.Write(0, b);
    }

    /// <summary>A CONFIG_DATA access of <paramref name="width"/> bytes at port 0xCFC + (register &amp; 3).</summary>
    private uint Cf8Read(int device, int register, int width = 4, int bus = 0, int function = 0, bool enable = true)
    {
        SetAddress(Address(bus, device, function, register, enable));
        Span<byte> b = stackalloc byte[4];
        _root.ConfigIo.Read(4 + (ulong)(register & 3), b[..width]);
        return BinaryPrimitives.ReadUInt32LittleEndian(b) & (width == 4 ? 0xFFFF_FFFF : (1u << (8 * width)) - 1);
    }

    private void Cf8Write(int device, int register, uint value, int width = 4, bool enable = true)
    {
        SetAddress(Address(0, device, 0, register, enable));
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _root.ConfigIo.Write(4 + (ulong)(register & 3), b[..width]);
    }

    private static ulong EcamOffset(int bus, int device, int function, int register) =>
        ((ulong)(uint)bus << 20) | ((ulong)(uint)device << 15) | ((ulong)(uint)function << 12) | (uint)register;

    private uint EcamRead(int device, int register, int width = 4, int bus = 0, int function = 0)
    {
        Span<byte> b = stackalloc byte[4];
        _root.Ecam.Read(EcamOffset(bus, device, function, register), b[..width]);
        return BinaryPrimitives.ReadUInt32LittleEndian(b) & (width == 4 ? 0xFFFF_FFFF : (1u << (8 * width)) - 1);
    }

    private void EcamWrite(int device, int register, uint value, int width = 4)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _root.Ecam.Write(EcamOffset(0, device, 0, register), b[..width]);
    }

    /// <summary>A guest MMIO read at <paramref name="address"/>, through whichever window the MMIO bus would pick.</summary>
    private uint MmioRead(ulong address)
    {
        Span<byte> b = stackalloc byte[4];
        if (address < 4 * GiB)
            _root.Mmio32Window.Read(address - MemoryLayout.PciMmio32Start, b);
        else
            _root.Mmio64Window.Read(address - _root.Window64Start, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void MmioWrite(ulong address, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        if (address < 4 * GiB)
            _root.Mmio32Window.Write(address - MemoryLayout.PciMmio32Start, b);
        else
            _root.Mmio64Window.Write(address - _root.Window64Start, b);
    }

    private RecordingPciFunction AddFunction(Action<PciConfigSpace>? declare = null, int slot = -1)
    {
        var f = new RecordingPciFunction();
        (declare ?? (c => c.AddBar(0, 0x1000, PciBarKind.Memory32)))(f.Config);
        _root.Add(f, slot);
        return f;
    }

    // ---- configuration mechanism #1 ----

    [Fact]
    public void The_host_bridge_answers_at_00_00_0()
    {
        Assert.Equal(0x0008_1B36u, Cf8Read(0, 0x00));
        Assert.Equal(0x0600_0000u, Cf8Read(0, 0x08)); // class 06 (bridge), subclass 00 (host)
        Assert.IsType<PciHostBridge>(_root[0]);
    }

    [Fact]
    public void Word_and_byte_accesses_at_0xCFC_to_0xCFF_pick_the_bytes_of_the_dword()
    {
        int slot = _root.Add(new RecordingPciFunction());
        Assert.Equal(1, slot);
        Assert.Equal(0x5678_1234u, Cf8Read(slot, 0x00));
        Assert.Equal(0x1234u, Cf8Read(slot, 0x00, 2));
        Assert.Equal(0x5678u, Cf8Read(slot, 0x02, 2));
        Assert.Equal(0x34u, Cf8Read(slot, 0x00, 1));
        Assert.Equal(0x12u, Cf8Read(slot, 0x01, 1));
        Assert.Equal(0x78u, Cf8Read(slot, 0x02, 1));
        Assert.Equal(0x56u, Cf8Read(slot, 0x03, 1));
        Assert.Equal(0xEF01u, Cf8Read(slot, 0x2E, 2));
    }

    [Fact]
    public void Accesses_straddling_CONFIG_DATA_read_all_ones_and_write_nothing()
    {
        int slot = _root.Add(new RecordingPciFunction());
        Assert.Equal(0xFFFFu, Cf8Read(slot, 0x3F, 2)); // bytes 0xCFF-0xD00
        SetAddress(Address(0, slot, 0, 0x3C));
        Span<byte> b = stackalloc byte[4];
        _root.ConfigIo.Read(5, b);
        Assert.Equal(0xFFFF_FFFFu, BinaryPrimitives.ReadUInt32LittleEndian(b));
        _root.ConfigIo.Write(5, [1, 2, 3, 4]);
        Assert.Equal(0u, Cf8Read(slot, 0x3C, 1)); // the interrupt line (writable) did not change
    }

    [Fact]
    public void Without_the_enable_bit_CONFIG_DATA_reads_all_ones_and_ignores_writes()
    {
        int slot = _root.Add(new RecordingPciFunction());
        Assert.Equal(0xFFFF_FFFFu, Cf8Read(slot, 0x00, enable: false));
        Assert.Equal(0xFFu, Cf8Read(slot, 0x00, 1, enable: false));
        Cf8Write(slot, 0x3C, 0x0A, 1, enable: false);
        Assert.Equal(0u, Cf8Read(slot, 0x3C, 1));
        Cf8Write(slot, 0x3C, 0x0A, 1);
        Assert.Equal(0x0Au, Cf8Read(slot, 0x3C, 1));
    }

    [Fact]
    public void CONFIG_ADDRESS_reads_back_without_its_reserved_bits()
    {
        SetAddress(0xFFFF_FFFF);
        Span<byte> b = stackalloc byte[4];
        _root.ConfigIo.Read(0, b);
        Assert.Equal(0x80FF_FFFCu, BinaryPrimitives.ReadUInt32LittleEndian(b));
        _root.ConfigIo.Read(0, b[..2]); // only dword accesses reach CONFIG_ADDRESS
        Assert.Equal(0xFFFFu, BinaryPrimitives.ReadUInt16LittleEndian(b));
    }

    [Fact]
    public void Absent_slots_functions_and_buses_read_all_ones()
    {
        Assert.Equal(0xFFFF_FFFFu, Cf8Read(5, 0x00));
        Assert.Equal(0xFFFFu, Cf8Read(31, 0x00, 2));
        Assert.Equal(0xFFFF_FFFFu, Cf8Read(0, 0x00, function: 1));
        Assert.Equal(0xFFFF_FFFFu, Cf8Read(0, 0x00, bus: 1));
        Assert.Equal(0xFFFF_FFFFu, EcamRead(5, 0x00));
        Assert.Equal(0xFFFF_FFFFu, EcamRead(0, 0x00, function: 3));
    }

    // ---- ECAM ----

    [Fact]
    public void ECAM_reads_equal_CF8_reads_in_the_legacy_256_bytes()
    {
        var f = AddFunction(c =>
        {
            c.AddBar(0, 0x1000, PciBarKind.Memory32);
            c.AddBar(2, 8 * GiB, PciBarKind.Memory64, prefetchable: true);
            c.AddCapability(PciConfigSpace.CapabilityVendor, [4, 5, 6, 7, 8, 9]);
            c.SetInterruptPin(1);
        });
        foreach (int device in new[] { 0, f.Slot, 7 })
        {
            for (int reg = 0; reg < 256; reg += 4)
                Assert.Equal(Cf8Read(device, reg), EcamRead(device, reg));
            for (int reg = 0; reg < 256; reg += 2)
                Assert.Equal(Cf8Read(device, reg, 2), EcamRead(device, reg, 2));
            for (int reg = 0; reg < 64; reg++)
                Assert.Equal(Cf8Read(device, reg, 1), EcamRead(device, reg, 1));
        }
    }

    [Fact]
    public void ECAM_writes_are_seen_through_CF8_and_back()
    {
        var f = AddFunction();
        EcamWrite(f.Slot, 0x3C, 0x0B, 1);
        Assert.Equal(0x0Bu, Cf8Read(f.Slot, 0x3C, 1));
        Cf8Write(f.Slot, 0x04, 0x0002, 2);
        Assert.Equal(0x0002u, EcamRead(f.Slot, 0x04, 2));
    }

    [Fact]
    public void ECAM_reaches_the_extended_space_and_refuses_misaligned_accesses()
    {
        var f = AddFunction();
        f.Config.Set32(0x100, 0x0001_0023); // pretend extended capability header
        Assert.Equal(0x0001_0023u, EcamRead(f.Slot, 0x100));
        Assert.Equal(0xFFFF_FFFFu, EcamRead(f.Slot, 0x102));    // dword at a word boundary
        Assert.Equal(0xFFFFu, EcamRead(f.Slot, 0x101, 2));      // word at a byte boundary
        Assert.Equal(0x1234u, EcamRead(f.Slot, 0x00, 2));
        EcamWrite(f.Slot, 0x3D, 0x0A0B, 2);                     // misaligned: dropped
        Assert.Equal(0u, EcamRead(f.Slot, 0x3C, 1));
    }

    // ---- BARs: placement and sizing ----

    [Fact]
    public void BARs_are_placed_largest_first_naturally_aligned_64_bit_non_prefetchable_ones_below_4_GiB()
    {
        var a = AddFunction(c =>
        {
            c.AddBar(0, 0x1000, PciBarKind.Memory32);
            c.AddBar(1, MiB, PciBarKind.Memory64);
        });
        var b = AddFunction(c => c.AddBar(0, 0x4000, PciBarKind.Memory32));
        Assert.Equal(MemoryLayout.PciMmio32Start, a.Config.BarAddress(1));
        Assert.Equal(MemoryLayout.PciMmio32Start + MiB, a.Config.BarAddress(0));
        Assert.Equal(MemoryLayout.PciMmio32Start + MiB + 0x4000, b.Config.BarAddress(0)); // 0x...1000 aligned up to 16 KiB
    }

    [Fact]
    public void A_64_bit_prefetchable_8_GiB_BAR_goes_to_the_64_bit_window_naturally_aligned()
    {
        var f = AddFunction(c =>
        {
            c.AddBar(0, 0x1000, PciBarKind.Memory32);
            c.AddBar(2, 8 * GiB, PciBarKind.Memory64, prefetchable: true);
        });
        ulong address = f.Config.BarAddress(2);
        Assert.Equal(0UL, address % (8 * GiB));
        Assert.True(address >= _root.Window64Start && address + 8 * GiB <= _root.Window64Start + _root.Window64Size,
            $"0x{address:x} outside the 64-bit window");
        Assert.Equal(8 * GiB, address); // the window starts at 4 GiB: 8 GiB is the first aligned spot
        Assert.Equal(MemoryLayout.PciMmio32Start, f.Config.BarAddress(0));

        // Sizing through CF8: all-ones in both halves reads back the mask, flags intact; restoring works.
        Cf8Write(f.Slot, 0x18, 0xFFFF_FFFF);
        Cf8Write(f.Slot, 0x1C, 0xFFFF_FFFF);
        Assert.Equal(0x0000_000Cu, Cf8Read(f.Slot, 0x18));
        Assert.Equal(0xFFFF_FFFEu, Cf8Read(f.Slot, 0x1C));
        Cf8Write(f.Slot, 0x18, (uint)address);
        Cf8Write(f.Slot, 0x1C, (uint)(address >> 32));
        Assert.Equal(0x0000_000Cu, Cf8Read(f.Slot, 0x18));
        Assert.Equal(2u, Cf8Read(f.Slot, 0x1C));
    }

    [Fact]
    public void A_64_bit_non_prefetchable_BAR_that_does_not_fit_below_4_GiB_goes_to_the_64_bit_window()
    {
        var f = AddFunction(c =>
        {
            c.AddBar(0, 256 * MiB, PciBarKind.Memory32);
            c.AddBar(2, GiB, PciBarKind.Memory64); // larger than the whole 32-bit window
        });
        Assert.Equal(4 * GiB, f.Config.BarAddress(2));
        Assert.Equal(MemoryLayout.PciMmio32Start, f.Config.BarAddress(0));
    }

    [Fact]
    public void A_32_bit_BAR_is_sized_and_restored_through_CF8()
    {
        var f = AddFunction(c => c.AddBar(0, 0x8000, PciBarKind.Memory32, prefetchable: true));
        uint original = Cf8Read(f.Slot, 0x10);
        Assert.Equal((uint)MemoryLayout.PciMmio32Start | 0b1000, original);
        Cf8Write(f.Slot, 0x10, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_8008u, Cf8Read(f.Slot, 0x10));
        Cf8Write(f.Slot, 0x10, original);
        Assert.Equal(original, Cf8Read(f.Slot, 0x10));
    }

    [Fact]
    public void A_full_32_bit_window_is_a_clear_error()
    {
        AddFunction(c => c.AddBar(0, 256 * MiB, PciBarKind.Memory32));
        AddFunction(c => c.AddBar(0, 256 * MiB, PciBarKind.Memory32)); // exactly fills 512 MiB
        var f = new RecordingPciFunction("nic");
        f.Config.AddBar(0, 0x1000, PciBarKind.Memory32);
        var e = Assert.Throws<PciConfigException>(() => _root.Add(f));
        Assert.Equal("nic: BAR0 32-bit memory, 0x1000 bytes does not fit in the 32-bit PCI window 0xc0000000-0xdfffffff (it is full)", e.Message);
        Assert.Equal(-1, f.Slot);
        Assert.Null(_root[3]);
    }

    [Fact]
    public void A_BAR_larger_than_the_32_bit_window_is_a_clear_error()
    {
        var f = new RecordingPciFunction("gpu");
        f.Config.AddBar(0, GiB, PciBarKind.Memory32);
        var e = Assert.Throws<PciConfigException>(() => _root.Add(f));
        Assert.Contains("gpu: BAR0 32-bit memory, 0x40000000 bytes does not fit in the 32-bit PCI window", e.Message);
    }

    [Fact]
    public void A_full_64_bit_window_is_a_clear_error()
    {
        var root = new PciRootBus(4 * GiB, 16 * GiB); // [4 GiB, 20 GiB): one 8 GiB BAR at 8 GiB, then no room
        var a = new RecordingPciFunction("a");
        a.Config.AddBar(0, 8 * GiB, PciBarKind.Memory64, prefetchable: true);
        root.Add(a);
        Assert.Equal(8 * GiB, a.Config.BarAddress(0));
        var b = new RecordingPciFunction("b");
        b.Config.AddBar(0, 8 * GiB, PciBarKind.Memory64, prefetchable: true);
        var e = Assert.Throws<PciConfigException>(() => root.Add(b));
        Assert.Equal("b: BAR0 64-bit prefetchable memory, 0x200000000 bytes does not fit in the 64-bit PCI window 0x100000000-0x4ffffffff (0x200000000 bytes free, but no naturally aligned range of that size)", e.Message);
        // Once a is gone, its range serves b.
        Assert.Same(a, root.Remove(1));
        Assert.Equal(1, root.Add(b));
        Assert.Equal(8 * GiB, b.Config.BarAddress(0));
    }

    [Fact]
    public void A_removed_function_reads_all_ones_decodes_nowhere_and_frees_its_slot_and_BAR_space()
    {
        var root = new PciRootBus(4 * GiB, 16 * GiB);
        var a = new RecordingPciFunction("a");
        a.Config.AddBar(0, 0x4000, PciBarKind.Memory32);
        var b = new RecordingPciFunction("b");
        b.Config.AddBar(0, 0x4000, PciBarKind.Memory32);
        Assert.Equal(1, root.Add(a));
        Assert.Equal(2, root.Add(b));
        ulong at = a.Config.BarAddress(0);
        Span<byte> cmd = [0x02, 0x00]; // memory decode on
        root.ConfigWrite(0, 1, 0, PciConfigSpace.Command, cmd);
        Assert.Equal([(0, (ulong?)at)], a.Mapped);
        Assert.Same(a, root.Remove(1));
        Assert.Equal([(0, (ulong?)at), (0, (ulong?)null)], a.Mapped); // told its BAR decodes nowhere now
        Assert.Equal(-1, a.Slot);
        Assert.Null(root.Remove(1));
        Span<byte> id = stackalloc byte[4];
        root.ConfigRead(0, 1, 0, 0, id);
        Assert.Equal(0xFFFF_FFFFu, BinaryPrimitives.ReadUInt32LittleEndian(id));
        var c = new RecordingPciFunction("c");
        c.Config.AddBar(0, 0x4000, PciBarKind.Memory32);
        Assert.Equal(1, root.Add(c));
        Assert.Equal(at, c.Config.BarAddress(0)); // the first free range again
    }

    [Fact]
    public void Slots_are_handed_out_in_order_and_a_taken_or_missing_slot_is_an_error()
    {
        Assert.Contains("taken by host bridge", Assert.Throws<PciConfigException>(() => _root.Add(new RecordingPciFunction(), 0)).Message);
        Assert.Equal(5, _root.Add(new RecordingPciFunction(), 5));
        for (int expected = 1; expected < PciRootBus.SlotCount; expected++)
        {
            if (expected != 5)
                Assert.Equal(expected, _root.Add(new RecordingPciFunction()));
        }
        Assert.Contains("no free PCI slot for x", Assert.Throws<PciConfigException>(() => _root.Add(new RecordingPciFunction("x"))).Message);
        Assert.Equal(PciRootBus.SlotCount, _root.Functions.Count());
    }

    [Fact]
    public void INTA_is_routed_by_the_slot_swizzle()
    {
        var f = new RecordingPciFunction();
        f.Config.SetInterruptPin(1);
        _root.Add(f, 3);
        Assert.Equal(19u, Cf8Read(3, 0x3C, 1)); // GSI 16 + (3 + 0) % 4
        Assert.Equal(1u, Cf8Read(3, 0x3D, 1));
        var g = new RecordingPciFunction();
        _root.Add(g, 4);
        Assert.Equal(0u, Cf8Read(4, 0x3C, 2)); // no pin, no line
    }

    // ---- capabilities and read-only fields through the guest's eyes ----

    [Fact]
    public void The_capability_list_can_be_walked_through_CF8()
    {
        var f = AddFunction(c =>
        {
            c.AddCapability(PciConfigSpace.CapabilityVendor, [0, 1, 2, 3, 4, 5]);
            c.AddCapability(PciConfigSpace.CapabilityPciExpress, new byte[58]);
            c.AddCapability(PciConfigSpace.CapabilityMsix, new byte[10]);
        });
        Assert.NotEqual(0u, Cf8Read(f.Slot, 0x06, 2) & PciConfigSpace.StatusCapabilities);
        var ids = new List<uint>();
        for (uint at = Cf8Read(f.Slot, 0x34, 1) & 0xFC; at != 0; at = Cf8Read(f.Slot, (int)at + 1, 1) & 0xFC)
            ids.Add(Cf8Read(f.Slot, (int)at, 1));
        Assert.Equal([0x09u, 0x10u, 0x11u], ids);
    }

    [Fact]
    public void Read_only_header_fields_do_not_change_through_CF8()
    {
        var f = AddFunction(c => c.SetInterruptPin(1));
        var before = Enumerable.Range(0, 16).Select(i => Cf8Read(f.Slot, 4 * i)).ToArray();
        foreach (int reg in new[] { 0x00, 0x08, 0x0C, 0x2C, 0x30, 0x34, 0x38 })
            Cf8Write(f.Slot, reg, 0xFFFF_FFFF);
        Cf8Write(f.Slot, 0x02, 0xFFFF, 2);
        Cf8Write(f.Slot, 0x3D, 0xFF, 1); // interrupt pin
        Cf8Write(f.Slot, 0x06, 0xFFFF, 2); // status: nothing writable or write-1-to-clear here
        var after = Enumerable.Range(0, 16).Select(i => Cf8Read(f.Slot, 4 * i)).ToArray();
        Assert.Equal(before, after);
        Cf8Write(f.Slot, 0x04, 0xFFFF, 2);
        Assert.Equal(0x0407u, Cf8Read(f.Slot, 0x04, 2)); // I/O, memory, bus master, INTx disable
    }

    // ---- BAR decoding ----

    [Fact]
    public void BAR_accesses_decode_only_while_memory_decode_is_on()
    {
        var f = AddFunction();
        ulong bar = f.Config.BarAddress(0);
        Assert.Equal(0xFFFF_FFFFu, MmioRead(bar + 0x10));
        MmioWrite(bar + 0x10, 0x1234);
        Assert.Empty(f.Accesses);

        Cf8Write(f.Slot, 0x04, PciConfigSpace.CommandMemorySpace, 2);
        Assert.Equal(0x2020_2020u, MmioRead(bar + 0x20));
        MmioWrite(bar + 0x24, 0xAABBCCDD);
        Assert.Equal(["r4 bar0+0x20", "w4 bar0+0x24=DDCCBBAA"], f.Accesses);
        Assert.Equal(0xFFFF_FFFFu, MmioRead(bar + 0x1000)); // past the BAR

        Cf8Write(f.Slot, 0x04, 0, 2);
        f.Accesses.Clear();
        Assert.Equal(0xFFFF_FFFFu, MmioRead(bar + 0x20));
        MmioWrite(bar + 0x20, 1);
        Assert.Empty(f.Accesses);
    }

    [Fact]
    public void A_BAR_moved_by_the_guest_decodes_at_its_new_address_only()
    {
        var f = AddFunction();
        ulong old = f.Config.BarAddress(0);
        Cf8Write(f.Slot, 0x04, PciConfigSpace.CommandMemorySpace, 2);
        const ulong moved = 0xC800_0000;
        Cf8Write(f.Slot, 0x10, (uint)moved);
        Assert.Equal(0xFFFF_FFFFu, MmioRead(old + 8));
        Assert.Empty(f.Accesses);
        Assert.Equal(0x0808_0808u, MmioRead(moved + 8));
        Assert.Equal(["r4 bar0+0x8"], f.Accesses);
        Assert.Equal([(0, (ulong?)old), (0, (ulong?)moved)], f.Mapped);
    }

    [Fact]
    public void A_BAR_moved_outside_the_windows_decodes_nowhere()
    {
        var f = AddFunction();
        Cf8Write(f.Slot, 0x04, PciConfigSpace.CommandMemorySpace, 2);
        Cf8Write(f.Slot, 0x10, 0x8000_0000); // guest RAM, not a PCI window
        Assert.Equal((0, (ulong?)null), f.Mapped[^1]);
        Cf8Write(f.Slot, 0x10, 0xDFFF_F000); // the last page of the 32-bit window: fine
        Assert.Equal((0, (ulong?)0xDFFF_F000), f.Mapped[^1]);
        Assert.Equal(0x0404_0404u, MmioRead(0xDFFF_F004));
    }

    [Fact]
    public void BarMapped_follows_decode_sizing_and_moves_and_only_reports_changes()
    {
        var f = AddFunction();
        ulong bar = f.Config.BarAddress(0);
        Cf8Write(f.Slot, 0x3C, 5, 1);                                 // not a BAR or command write
        Cf8Write(f.Slot, 0x04, PciConfigSpace.CommandBusMaster, 2);   // no decode yet
        Assert.Empty(f.Mapped);
        Cf8Write(f.Slot, 0x04, PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandBusMaster, 2);
        Cf8Write(f.Slot, 0x04, PciConfigSpace.CommandMemorySpace, 2); // still decoding: no news
        Cf8Write(f.Slot, 0x10, 0xFFFF_FFFF);                          // sizing while decoding
        Cf8Write(f.Slot, 0x10, (uint)bar);                            // restored
        Cf8Write(f.Slot, 0x10, (uint)bar);                            // same again: no news
        Cf8Write(f.Slot, 0x04, 0, 2);
        Assert.Equal([(0, (ulong?)bar), (0, null), (0, (ulong?)bar), (0, null)], f.Mapped);
    }

    [Fact]
    public void An_expansion_ROM_is_placed_in_the_32_bit_window_and_decodes_only_with_its_enable_bit()
    {
        var f = AddFunction(c =>
        {
            c.AddBar(0, 0x1000, PciBarKind.Memory32);
            c.AddRomBar(0x8000);
        });
        ulong rom = f.Config.BarAddress(PciConfigSpace.RomBarIndex);
        Assert.InRange(rom, MemoryLayout.PciMmio32Start, MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size - 0x8000);
        Assert.Equal(0ul, rom % 0x8000);
        Cf8Write(f.Slot, 0x04, PciConfigSpace.CommandMemorySpace, 2);
        Assert.Equal([(0, (ulong?)f.Config.BarAddress(0))], f.Mapped);
        Assert.Equal(0xFFFF_FFFFu, MmioRead(rom + 0x10)); // decode on, ROM not enabled
        Cf8Write(f.Slot, 0x30, (uint)rom | 1);
        Assert.Equal((PciConfigSpace.RomBarIndex, (ulong?)rom), f.Mapped[^1]);
        Assert.Equal(0x1010_1010u, MmioRead(rom + 0x10));
        Assert.Equal("r4 bar6+0x10", f.Accesses[^1]);
        Cf8Write(f.Slot, 0x30, 0xFFFF_F800);              // sizing (enable clear): decodes nowhere
        Assert.Equal((PciConfigSpace.RomBarIndex, (ulong?)null), f.Mapped[^1]);
        Assert.Equal(0xFFFF_8000u, Cf8Read(f.Slot, 0x30));
    }

    [Fact]
    public void A_64_bit_BAR_decodes_through_the_64_bit_window()
    {
        var f = AddFunction(c => c.AddBar(0, 4 * GiB, PciBarKind.Memory64, prefetchable: true));
        ulong bar = f.Config.BarAddress(0);
        Cf8Write(f.Slot, 0x04, PciConfigSpace.CommandMemorySpace, 2);
        Assert.Equal(0x3030_3030u, MmioRead(bar + 0x30));
        Assert.Equal(["r4 bar0+0x30"], f.Accesses);
        Assert.Equal([(0, (ulong?)bar)], f.Mapped);

        // The guest moves it 4 GiB up by rewriting only the high dword.
        Cf8Write(f.Slot, 0x14, (uint)((bar + 4 * GiB) >> 32));
        Assert.Equal(0xFFFF_FFFFu, MmioRead(bar + 0x30));
        Assert.Equal(0x3030_3030u, MmioRead(bar + 4 * GiB + 0x30));
        Assert.Equal((0, (ulong?)(bar + 4 * GiB)), f.Mapped[^1]);
    }

    [Fact]
    public void Two_functions_decode_independently()
    {
        var a = AddFunction();
        var b = AddFunction();
        Cf8Write(a.Slot, 0x04, PciConfigSpace.CommandMemorySpace, 2);
        Cf8Write(b.Slot, 0x04, PciConfigSpace.CommandMemorySpace, 2);
        MmioRead(a.Config.BarAddress(0) + 4);
        MmioRead(b.Config.BarAddress(0) + 8);
        Assert.Equal(["r4 bar0+0x4"], a.Accesses);
        Assert.Equal(["r4 bar0+0x8"], b.Accesses);
        Assert.Single(b.Mapped); // a's command write did not notify b
    }

    // ---- INTx sharing ----

    [Fact]
    public void A_shared_interrupt_line_is_the_OR_of_its_sources()
    {
        var pin = new RecordingInterruptLine();
        var shared = new SharedInterruptLine(pin);
        var a = shared.Connect();
        var b = shared.Connect();

        a.SetLevel(true);
        Assert.True(pin.Level);
        b.SetLevel(true);
        a.SetLevel(true); // repeated: no new edge
        a.SetLevel(false);
        Assert.True(pin.Level); // b still asserts it
        b.SetLevel(false);
        Assert.False(pin.Level);
        b.SetLevel(false);
        Assert.False(pin.Level);
        Assert.Equal(1, pin.RisingEdges);
        b.SetLevel(true);
        Assert.Equal(2, pin.RisingEdges);
    }

    [Fact]
    public void A_shared_interrupt_line_takes_at_most_64_sources()
    {
        var shared = new SharedInterruptLine(new RecordingInterruptLine());
        var lines = Enumerable.Range(0, 64).Select(_ => shared.Connect()).ToArray();
        Assert.Throws<PciConfigException>(() => shared.Connect());
        lines[63].SetLevel(true); // the highest source bit works
    }

    [Fact]
    public void A_disconnected_source_deasserts_the_line_goes_quiet_and_frees_its_place()
    {
        var pin = new RecordingInterruptLine();
        var shared = new SharedInterruptLine(pin);
        var lines = Enumerable.Range(0, 64).Select(_ => shared.Connect()).ToArray();
        lines[5].SetLevel(true);
        ((IDisposable)lines[5]).Dispose(); // hot removal of a device holding the line up
        Assert.False(pin.Level);
        lines[5].SetLevel(true);            // a late signal from the removed device changes nothing
        Assert.False(pin.Level);
        var again = shared.Connect();       // its place serves the next device
        again.SetLevel(true);
        Assert.True(pin.Level);
        Assert.Throws<PciConfigException>(() => shared.Connect());
    }
}
