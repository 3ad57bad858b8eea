using System.Buffers.Binary;
using Vmm.Devices.Pci;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Pci;

public class MsixTableTests
{
    private const ushort Enable = 0x8000, FunctionMask = 0x4000;

    private readonly PciConfigSpace _config = new(0x1234, 0x5678, 0xFF, 0x00);
    private readonly RecordingMsiController _msi = new();
    private readonly MsixTable _table;
    private readonly int _cap;

    public MsixTableTests()
    {
        _table = new MsixTable(_config, 3, bar: 2, tableOffset: 0x1000, pbaOffset: 0x1800, _msi, "test");
        _cap = _config.FindCapability(PciConfigSpace.CapabilityMsix);
    }

    private void SetControl(ushort value)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, value);
        _config.Write(_cap + 2, b);
        _table.ControlWritten();
    }

    private void Write32(int vector, int field, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _table.WriteTable((ulong)(vector * 16 + field), b);
    }

    private void Write64(int vector, int field, ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(b, value);
        _table.WriteTable((ulong)(vector * 16 + field), b);
    }

    private uint Read32(int vector, int field)
    {
        Span<byte> b = stackalloc byte[4];
        _table.ReadTable((ulong)(vector * 16 + field), b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private ulong ReadPba(ulong offset, int width)
    {
        Span<byte> b = stackalloc byte[8];
        b.Clear();
        _table.ReadPba(offset, b[..width]);
        return BinaryPrimitives.ReadUInt64LittleEndian(b);
    }

    /// <summary>Address 0xFEE0_0000 | (vector &lt;&lt; 12), data 0x40 + vector, unmasked.</summary>
    private void Program(int vector, bool masked = false)
    {
        Write32(vector, 0, 0xFEE0_0000u | (uint)(vector << 12));
        Write32(vector, 4, 0);
        Write32(vector, 8, 0x40u + (uint)vector);
        Write32(vector, 12, masked ? 1u : 0u);
    }

    [Fact]
    public void The_capability_describes_the_table_and_PBA_and_only_enable_and_mask_are_writable()
    {
        Assert.Equal(2, _config.Get16(_cap + 2));                 // table size N-1
        Assert.Equal(0x1000u | 2, _config.Get32(_cap + 4));        // offset | BIR
        Assert.Equal(0x1800u | 2, _config.Get32(_cap + 8));
        Assert.Equal(3, _msi.Vectors.Count);
        SetControl(0xFFFF);
        Assert.Equal(Enable | FunctionMask | 2, _config.Get16(_cap + 2));
        Assert.True(_table.Enabled);
        Assert.Equal(48, _table.TableLength);
        Assert.Equal(8, _table.PbaLength);
        Assert.True(_table.TouchesCapability(_cap + 2, 2));
        Assert.False(_table.TouchesCapability(_cap + 12, 4));
    }

    [Fact]
    public void Every_vector_is_masked_at_reset()
    {
        for (int v = 0; v < 3; v++)
        {
            Assert.True(_table.IsVectorMasked(v));
            Assert.Equal(1u, Read32(v, 12));
            Assert.Equal(0u, Read32(v, 0));
            Assert.Equal(0u, Read32(v, 8));
        }
        Assert.False(_table.Enabled);
    }

    [Fact]
    public void A_masked_vector_records_a_pending_bit_and_sends_on_unmask()
    {
        SetControl(Enable);
        Program(1, masked: true);
        Assert.True(_table.Signal(1));
        Assert.Empty(_msi.Log);
        Assert.True(_table.IsPending(1));
        Assert.Equal(0b010UL, ReadPba(0, 8));

        Write32(1, 12, 0); // unmask
        Assert.Equal(["configure 1 0xfee01000 0x41", "trigger 1"], _msi.Log);
        Assert.False(_table.IsPending(1));
        Assert.Equal(0UL, ReadPba(0, 8));
    }

    [Fact]
    public void Signals_while_MSI_X_is_off_stay_pending_until_it_is_enabled()
    {
        Program(0);
        _table.Signal(0);
        Assert.Empty(_msi.Log);
        Assert.True(_table.IsPending(0));
        SetControl(Enable);
        Assert.Equal(["configure 0 0xfee00000 0x40", "trigger 0"], _msi.Log);
        Assert.False(_table.IsPending(0));
    }

    [Fact]
    public void The_function_mask_holds_every_vector_back_until_cleared()
    {
        SetControl(Enable | FunctionMask);
        Program(0);
        Program(2);
        _table.Signal(0);
        _table.Signal(2);
        Assert.Empty(_msi.Log);
        Assert.Equal(0b101UL, ReadPba(0, 8));
        Write32(0, 12, 0); // an unmasked vector under the function mask stays pending
        Assert.Empty(_msi.Log);

        SetControl(Enable);
        Assert.Equal(["configure 0 0xfee00000 0x40", "trigger 0", "configure 2 0xfee02000 0x42", "trigger 2"], _msi.Log);
        Assert.Equal(0UL, ReadPba(0, 8));
    }

    [Fact]
    public void Configure_comes_before_the_first_trigger_after_every_change_of_address_or_data()
    {
        SetControl(Enable);
        Program(1);
        _table.Signal(1);
        _table.Signal(1);
        Assert.Equal(["configure 1 0xfee01000 0x41", "trigger 1", "trigger 1"], _msi.Log);

        _msi.Log.Clear();
        Write32(1, 8, 0x77); // new data
        _table.Signal(1);
        Assert.Equal(["configure 1 0xfee01000 0x77", "trigger 1"], _msi.Log);

        _msi.Log.Clear();
        Write64(1, 0, 0xFEE0_5000); // new address, one 8-byte write
        _table.Signal(1);
        Assert.Equal(["configure 1 0xfee05000 0x77", "trigger 1"], _msi.Log);

        _msi.Log.Clear();
        Write64(1, 8, 0x0000_0000_0000_0088UL); // data and vector control together
        _table.Signal(1);
        Assert.Equal(["configure 1 0xfee05000 0x88", "trigger 1"], _msi.Log);

        _msi.Log.Clear();
        Write32(1, 12, 1); // mask and unmask: the message did not change
        Write32(1, 12, 0);
        _table.Signal(1);
        Assert.Equal(["trigger 1"], _msi.Log);
    }

    [Fact]
    public void Table_entries_read_back_as_written_in_4_and_8_byte_accesses()
    {
        Write64(2, 0, 0x0000_0001_FEE0_3000UL);
        Write32(2, 8, 0x1234_5678);
        Assert.Equal(0xFEE0_3000u, Read32(2, 0));
        Assert.Equal(1u, Read32(2, 4));
        Assert.Equal(0x1234_5678u, Read32(2, 8));
        Assert.Equal(1u, Read32(2, 12)); // still masked
        Span<byte> b = stackalloc byte[8];
        _table.ReadTable(2 * 16 + 8, b);
        Assert.Equal(0x0000_0001_1234_5678UL, BinaryPrimitives.ReadUInt64LittleEndian(b));
        _table.ReadTable(2 * 16, b);
        Assert.Equal(0x0000_0001_FEE0_3000UL, BinaryPrimitives.ReadUInt64LittleEndian(b));
    }

    [Theory]
    [InlineData(0UL, 2)]      // word access
    [InlineData(1UL, 1)]      // byte access
    [InlineData(2UL, 4)]      // misaligned dword
    [InlineData(4UL, 8)]      // misaligned qword
    [InlineData(48UL, 4)]     // past the table
    [InlineData(44UL, 8)]     // straddles the end
    public void Misaligned_odd_sized_and_out_of_range_table_accesses_read_all_ones_and_write_nothing(ulong offset, int width)
    {
        var before = new byte[48];
        for (int i = 0; i < 48; i += 4)
            _table.ReadTable((ulong)i, before.AsSpan(i, 4));
        Span<byte> data = stackalloc byte[width];
        _table.ReadTable(offset, data);
        Assert.All(data.ToArray(), b => Assert.Equal(0xFF, b));
        data.Clear();
        _table.WriteTable(offset, data);
        var after = new byte[48];
        for (int i = 0; i < 48; i += 4)
            _table.ReadTable((ulong)i, after.AsSpan(i, 4));
        Assert.Equal(before, after);
    }

    [Fact]
    public void The_PBA_holds_one_bit_per_vector_in_qwords()
    {
        var msi = new RecordingMsiController();
        var config = new PciConfigSpace(1, 2, 3, 4);
        var table = new MsixTable(config, 70, 0, 0, 0x800, msi, "big");
        Assert.Equal(16, table.PbaLength);
        table.Signal(0);
        table.Signal(65);
        table.Signal(69);
        Span<byte> b = stackalloc byte[8];
        table.ReadPba(0, b);
        Assert.Equal(1UL, BinaryPrimitives.ReadUInt64LittleEndian(b));
        table.ReadPba(8, b);
        Assert.Equal((1UL << 1) | (1UL << 5), BinaryPrimitives.ReadUInt64LittleEndian(b));
        table.ReadPba(8, b[..4]);
        Assert.Equal(0x22u, BinaryPrimitives.ReadUInt32LittleEndian(b));
        table.ReadPba(12, b[..4]);
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(b));
        table.ReadPba(16, b[..4]);
        Assert.Equal(0xFFFF_FFFFu, BinaryPrimitives.ReadUInt32LittleEndian(b));
        table.ReadPba(2, b[..4]);
        Assert.Equal(0xFFFF_FFFFu, BinaryPrimitives.ReadUInt32LittleEndian(b));
    }

    [Fact]
    public void Out_of_range_vectors_are_refused()
    {
        SetControl(Enable);
        Assert.False(_table.Signal(3));
        Assert.False(_table.Signal(0xFFFF));
        Assert.False(_table.Signal(-1));
        Assert.Empty(_msi.Log);
    }

    [Fact]
    public void Reset_masks_every_vector_forgets_pending_bits_and_turns_MSI_X_off()
    {
        SetControl(Enable);
        Program(0);
        _table.Signal(0);
        Program(1, masked: true);
        _table.Signal(1);
        _table.Reset();
        Assert.False(_table.Enabled);
        Assert.Equal(2, _config.Get16(_cap + 2));
        Assert.False(_table.IsPending(1));
        Assert.True(_table.IsVectorMasked(0));
        Assert.Equal(0u, Read32(0, 0));

        // After the reset the vector is configured afresh (with the cleared message) before its next trigger.
        _msi.Log.Clear();
        SetControl(Enable);
        Write32(0, 12, 0);
        _table.Signal(0);
        Assert.Equal(["configure 0 0x0 0x0", "trigger 0"], _msi.Log);
    }

    [Theory]
    [InlineData(0, 0u, 0x800u, "vectors")]
    [InlineData(2049, 0u, 0x800u, "vectors")]
    [InlineData(4, 4u, 0x800u, "8-byte aligned")]
    [InlineData(4, 0u, 0x804u, "8-byte aligned")]
    public void Bad_MSI_X_layouts_are_refused(int count, uint tableOffset, uint pbaOffset, string why)
    {
        var e = Assert.Throws<PciConfigException>(() =>
            new MsixTable(new PciConfigSpace(1, 2, 3, 4), count, 0, tableOffset, pbaOffset, new RecordingMsiController(), "x"));
        Assert.Contains(why, e.Message);
    }
}

/// <summary>Passthrough mode: a device signals the vectors' eventfds itself; the table drives routing and masking.</summary>
public class MsixTablePassthroughTests
{
    private const ushort Enable = 0x8000, FunctionMask = 0x4000;

    private readonly PciConfigSpace _config = new(0x10DE, 0x20B2, 0x03, 0x02);
    private readonly RecordingMsiController _msi = new();
    private readonly MsixTable _table;

    public MsixTablePassthroughTests() =>
        _table = new MsixTable(_config, 3, tableBar: 0, tableOffset: 0xB9_0000, pbaBar: 2, pbaOffset: 0x100, _msi, "gpu",
            passthrough: true, capabilityOffset: 0xB4);

    private void SetControl(ushort value)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, value);
        _config.Write(0xB6, b);
        _table.ControlWritten();
    }

    private void Write32(int vector, int field, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _table.WriteTable((ulong)(vector * 16 + field), b);
    }

    private byte Pba()
    {
        Span<byte> b = stackalloc byte[8];
        _table.ReadPba(0, b);
        return b[0];
    }

    [Fact]
    public void The_capability_sits_at_the_given_offset_with_separate_table_and_PBA_BARs_and_every_vector_starts_detached()
    {
        Assert.Equal(0x11, _config.Get8(0xB4));
        Assert.Equal(0u, _config.Get8(PciConfigSpace.CapabilitiesPointer)); // placed, not linked: the caller links
        Assert.Equal(0xB9_0000u | 0, _config.Get32(0xB8));
        Assert.Equal(0x100u | 2, _config.Get32(0xBC));
        Assert.Equal((0, 2), (_table.Bar, _table.PbaBar));
        Assert.Equal(["mask 0", "mask 1", "mask 2"], _msi.Log);
    }

    [Fact]
    public void Unmasking_routes_the_vector_before_attaching_it_and_every_mask_source_detaches_it()
    {
        SetControl(Enable);
        Write32(1, 0, 0xFEE0_1000);
        Write32(1, 8, 0x41);
        Assert.Equal(["mask 0", "mask 1", "mask 2"], _msi.Log);       // still masked: no routing yet
        Write32(1, 12, 0);
        Assert.Equal(["configure 1 0xfee01000 0x41", "unmask 1"], _msi.Log[3..]);
        SetControl(Enable | FunctionMask);
        Assert.Equal("mask 1", _msi.Log[^1]);
        SetControl(Enable);
        Assert.Equal("unmask 1", _msi.Log[^1]);                        // same message: no new route
        SetControl(0);
        Assert.Equal("mask 1", _msi.Log[^1]);
        Assert.Equal(0, _msi.Vectors.Sum(v => v.Triggers));             // vmm never sends for the device
    }

    [Fact]
    public void The_PBA_shows_signals_waiting_in_masked_vectors_and_reset_masks_everything()
    {
        SetControl(Enable);
        Write32(0, 12, 0);
        _msi.Vectors[0].EventFd.Signal();
        _msi.Vectors[2].EventFd.Signal();
        Assert.Equal(0b100, Pba());
        Assert.True(_table.IsPending(2));
        Assert.False(_table.IsPending(0));
        _table.Reset();
        Assert.True(_msi.Vectors[0].Masked);
        Assert.False(_table.Enabled);
        Assert.Equal(0b101, Pba());
    }
}
