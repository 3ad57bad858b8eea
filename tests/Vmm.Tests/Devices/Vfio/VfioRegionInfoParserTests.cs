using System.Buffers.Binary;
using System.Runtime.InteropServices;
using Vmm.Devices.Vfio;
using Vmm.Devices.Vfio.Kernel;
using Vmm.Interop;

namespace Vmm.Tests.Devices.Vfio;

/// <summary>VFIO_DEVICE_GET_REGION_INFO answers built by hand: the fixed vfio_region_info (32 bytes), then
/// capabilities {id u16, version u16, next u32} chained by offsets from the buffer start.</summary>
public sealed class VfioRegionInfoParserTests
{
    private const string Dev = "0000:01:00.0";
    private const uint Read = 1, Write = 2, Mmap = 4, Caps = 8;

    /// <summary>Builds an answer; <paramref name="caps"/> are (offset, bytes) placed into a buffer of <paramref name="length"/>.</summary>
    private static byte[] Answer(uint flags, ulong size, ulong fdOffset, int length = 32, uint capOffset = 0,
        params (int At, byte[] Bytes)[] caps)
    {
        byte[] b = new byte[length];
        BinaryPrimitives.WriteUInt32LittleEndian(b, (uint)length); // argsz: what the kernel needed
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(4), flags);
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(8), 1); // index
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(12), capOffset);
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(16), size);
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(24), fdOffset);
        foreach (var (at, bytes) in caps)
            bytes.CopyTo(b, at);
        return b;
    }

    private static byte[] Cap(ushort id, uint next, int length = 8)
    {
        byte[] b = new byte[length];
        BinaryPrimitives.WriteUInt16LittleEndian(b, id);
        BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(2), 1);
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(4), next);
        return b;
    }

    private static byte[] Sparse(uint next, params (ulong Offset, ulong Size)[] areas) => Sparse(next, (uint)areas.Length, areas);

    private static byte[] Sparse(uint next, uint claimedCount, params (ulong Offset, ulong Size)[] areas)
    {
        byte[] b = Cap(1, next, 16 + 16 * areas.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(8), claimedCount);
        for (int i = 0; i < areas.Length; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(16 + 16 * i), areas[i].Offset);
            BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(24 + 16 * i), areas[i].Size);
        }
        return b;
    }

    [Fact]
    public void The_fixed_part_is_the_size_of_struct_vfio_region_info() =>
        Assert.Equal(VfioRegionInfoParser.FixedSize, Marshal.SizeOf<vfio_region_info>());

    [Fact]
    public void Sparse_mmap_with_two_areas_and_msix_mappable_are_parsed_and_sorted()
    {
        // BAR0 of 16 MiB whose MSI-X table page at 0x1000 is left out: areas [0,0x1000) and [0x2000,16M), listed out of order.
        byte[] buffer = Answer(Read | Write | Mmap | Caps, 0x100_0000, 0x4_0000_0000, length: 88, capOffset: 32,
            (32, Sparse(80, (0x2000, 0xFF_E000), (0, 0x1000))), (80, Cap(3, 0)));

        var parsed = VfioRegionInfoParser.Parse(buffer, 0, Dev);

        Assert.Equal([new VfioMmapArea(0, 0x1000), new VfioMmapArea(0x2000, 0xFF_E000)], parsed.Info.MmapAreas);
        Assert.True(parsed.Info.MsixMappable);
        Assert.Equal(0x100_0000ul, parsed.Info.Size);
        Assert.Equal(0x4_0000_0000ul, parsed.FdOffset);
        Assert.True(parsed.Info.Readable && parsed.Info.Writable);
    }

    [Fact]
    public void An_unknown_capability_in_the_chain_is_skipped()
    {
        byte[] buffer = Answer(Read | Mmap | Caps, 0x4000, 0, length: 80, capOffset: 32,
            (32, Cap(0x77, 48, 16)), (48, Sparse(0, (0x1000, 0x1000))));

        var parsed = VfioRegionInfoParser.Parse(buffer, 0, Dev);

        Assert.Equal([new VfioMmapArea(0x1000, 0x1000)], parsed.Info.MmapAreas);
        Assert.False(parsed.Info.MsixMappable);
    }

    [Fact]
    public void A_mmappable_region_without_the_sparse_capability_is_one_area_covering_it()
    {
        var parsed = VfioRegionInfoParser.Parse(Answer(Read | Write | Mmap, 0x2000_0000, 0x1000), 1, Dev);

        Assert.Equal([new VfioMmapArea(0, 0x2000_0000)], parsed.Info.MmapAreas);
    }

    [Fact]
    public void A_region_without_the_mmap_flag_has_no_areas_even_with_a_sparse_capability()
    {
        byte[] buffer = Answer(Read | Write | Caps, 0x4000, 0, length: 64, capOffset: 32, (32, Sparse(0, (0, 0x1000))));

        Assert.Empty(VfioRegionInfoParser.Parse(buffer, 7, Dev).Info.MmapAreas);
    }

    [Fact]
    public void A_sparse_capability_with_no_areas_means_nothing_is_mmappable()
    {
        byte[] buffer = Answer(Read | Mmap | Caps, 0x4000, 0, length: 48, capOffset: 32, (32, Sparse(0)));

        Assert.Empty(VfioRegionInfoParser.Parse(buffer, 0, Dev).Info.MmapAreas);
    }

    [Fact]
    public void A_capability_pointing_to_itself_is_a_loop_error_not_a_hang()
    {
        byte[] buffer = Answer(Read | Mmap | Caps, 0x4000, 0, length: 48, capOffset: 32, (32, Cap(0x77, 32)));

        var e = Assert.Throws<VfioException>(() => VfioRegionInfoParser.Parse(buffer, 2, Dev));

        Assert.Equal("0000:01:00.0: VFIO_DEVICE_GET_REGION_INFO for region 2: the capability chain loops back to offset 32", e.Message);
    }

    [Fact]
    public void A_two_capability_loop_is_detected()
    {
        byte[] buffer = Answer(Read | Mmap | Caps, 0x4000, 0, length: 48, capOffset: 32, (32, Cap(3, 40)), (40, Cap(0x77, 32)));

        var e = Assert.Throws<VfioException>(() => VfioRegionInfoParser.Parse(buffer, 0, Dev));

        Assert.Contains("loops back to offset 32", e.Message);
    }

    [Theory]
    [InlineData(44u)]   // header would end past the 48-byte buffer
    [InlineData(4096u)] // far outside
    [InlineData(8u)]    // inside the fixed vfio_region_info
    public void A_next_offset_outside_the_capability_area_is_an_error(uint next)
    {
        byte[] buffer = Answer(Read | Mmap | Caps, 0x4000, 0, length: 48, capOffset: 32, (32, Cap(0x77, next)));

        var e = Assert.Throws<VfioException>(() => VfioRegionInfoParser.Parse(buffer, 0, Dev));

        Assert.Contains($"a capability at offset {next} lies outside the 48-byte answer", e.Message);
    }

    [Fact]
    public void A_sparse_area_count_past_the_buffer_is_an_error()
    {
        byte[] buffer = Answer(Read | Mmap | Caps, 0x4000, 0, length: 64, capOffset: 32, (32, Sparse(0, 1000, (0, 0x1000))));

        var e = Assert.Throws<VfioException>(() => VfioRegionInfoParser.Parse(buffer, 0, Dev));

        Assert.Contains("claims 1000 areas", e.Message);
    }

    [Fact]
    public void A_sparse_area_outside_the_region_is_an_error()
    {
        byte[] buffer = Answer(Read | Mmap | Caps, 0x4000, 0, length: 64, capOffset: 32, (32, Sparse(0, (0x3000, 0x2000))));

        var e = Assert.Throws<VfioException>(() => VfioRegionInfoParser.Parse(buffer, 0, Dev));

        Assert.Contains("sparse-mmap area 0 [0x3000, +0x2000) lies outside the 0x4000-byte region", e.Message);
    }

    [Fact]
    public void Overlapping_sparse_areas_are_an_error()
    {
        byte[] buffer = Answer(Read | Mmap | Caps, 0x4000, 0, length: 80, capOffset: 32, (32, Sparse(0, (0, 0x2000), (0x1000, 0x1000))));

        var e = Assert.Throws<VfioException>(() => VfioRegionInfoParser.Parse(buffer, 0, Dev));

        Assert.Contains("overlap", e.Message);
    }

    [Fact]
    public void A_chain_that_needs_a_larger_buffer_says_to_reissue_with_the_kernels_argsz()
    {
        byte[] buffer = Answer(Read | Mmap | Caps, 0x4000, 0, length: 48, capOffset: 32, (32, Cap(3, 0)));
        BinaryPrimitives.WriteUInt32LittleEndian(buffer, 96); // the kernel needs 96

        Assert.Equal(96u, VfioRegionInfoParser.NeededSize(buffer));
        var e = Assert.Throws<VfioException>(() => VfioRegionInfoParser.Parse(buffer, 0, Dev));
        Assert.Contains("re-issue with argsz 96", e.Message);
    }

    [Fact]
    public void A_truncated_answer_is_an_error()
    {
        var e = Assert.Throws<VfioException>(() => VfioRegionInfoParser.Parse(new byte[16], 0, Dev));
        Assert.Contains("less than the 32 of vfio_region_info", e.Message);
    }
}

public sealed class VfioIrqSetBufferTests
{
    [Fact]
    public void The_header_is_the_size_of_struct_vfio_irq_set() =>
        Assert.Equal(VfioIrqSetBuffer.HeaderSize, Marshal.SizeOf<vfio_irq_set>());

    [Fact]
    public void Eventfds_follow_the_20_byte_header_as_s32_values()
    {
        byte[] b = VfioIrqSetBuffer.EventFds(VfioIrqIndex.Msix, 3, [10, -1, 12]);

        Assert.Equal(32, b.Length);
        Assert.Equal(32u, BinaryPrimitives.ReadUInt32LittleEndian(b));                 // argsz
        Assert.Equal(0x24u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(4)));     // DATA_EVENTFD | ACTION_TRIGGER
        Assert.Equal(2u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(8)));        // VFIO_PCI_MSIX_IRQ_INDEX
        Assert.Equal(3u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(12)));       // start
        Assert.Equal(3u, BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(16)));       // count
        Assert.Equal(10, BinaryPrimitives.ReadInt32LittleEndian(b.AsSpan(20)));
        Assert.Equal(-1, BinaryPrimitives.ReadInt32LittleEndian(b.AsSpan(24)));        // detaches vector 4
        Assert.Equal(12, BinaryPrimitives.ReadInt32LittleEndian(b.AsSpan(28)));
    }

    [Fact]
    public void Disabling_an_index_is_data_none_trigger_with_count_zero()
    {
        byte[] b = VfioIrqSetBuffer.None(VfioIrqIndex.Msi, 0, 0);

        Assert.Equal([20, 0, 0, 0, 0x21, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], b);
    }

    [Fact]
    public void The_intx_unmask_eventfd_is_data_eventfd_action_unmask_on_index_0()
    {
        byte[] b = VfioIrqSetBuffer.EventFds(VfioIrqIndex.Intx, 0, [7], VfioConstants.VFIO_IRQ_SET_ACTION_UNMASK);

        Assert.Equal([24, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0], b);
    }
}
