using Vmm.Devices.Virtio;
using Vmm.Memory;
using Vmm.Tests.TestKit;
using static Vmm.Tests.TestKit.VirtqueueBuilder;

namespace Vmm.Tests.Devices.Virtio;

/// <summary>The device side of a split virtqueue against well-behaved and hostile drivers. Every malformed chain
/// must come back as <see cref="PopResult.BadChain"/> with a reason, touch nothing, and leave the queue usable.</summary>
public sealed class SplitQueueTests : IDisposable
{
    private const ushort QueueSize = 8;
    private const ulong RamSize = 16 * MemoryLayout.MiB;

    private readonly GuestMemory _memory = GuestMemory.Create(RamSize);
    private readonly VirtqueueBuilder _vq;

    public SplitQueueTests() => _vq = new VirtqueueBuilder(_memory, QueueSize);

    public void Dispose() => _memory.Dispose();

    /// <summary>Pops a chain that must be bad for <paramref name="why"/>, completes it with 0 bytes, and checks that the
    /// next good chain on the same queue pops fine.</summary>
    private void AssertBadChainThenRecovers(SplitQueue queue, string why)
    {
        Assert.Equal(PopResult.BadChain, queue.Pop(out var bad));
        Assert.Contains(why, queue.LastError);
        ushort badHead = bad.Head;
        queue.Complete(badHead, 0);
        Assert.Equal(((uint)badHead, 0u), _vq.UsedElement(_vq.UsedIdx - 1));

        ushort good = _vq.AddChain([16], [32]);
        Assert.Equal(PopResult.Chain, queue.Pop(out var chain));
        Assert.Equal(good, chain.Head);
        Assert.Equal(2, chain.Buffers.Length);
        Assert.Equal(16u, chain.Readable[0].Length);
        Assert.Equal(32u, chain.Writable[0].Length);
        Assert.True(queue.Enabled);
        queue.Complete(good, 32);
        Assert.Equal(PopResult.Empty, queue.Pop(out _));
    }

    // ---- good paths ----

    [Fact]
    public void Pops_a_chain_with_readable_buffers_first_and_completes_it_into_the_used_ring()
    {
        var q = _vq.CreateQueue();
        ulong a = _vq.Allocate(100), b = _vq.Allocate(200), c = _vq.Allocate(300);
        ushort head = _vq.AddChain((a, 100, false), (b, 200, false), (c, 300, true));
        Assert.True(q.HasAvailable);

        Assert.Equal(PopResult.Chain, q.Pop(out var chain));
        Assert.Equal(head, chain.Head);
        Assert.Equal(2, chain.ReadableCount);
        Assert.Equal([new VirtqDescriptor(a, 100, false), new VirtqDescriptor(b, 200, false)], chain.Readable.ToArray());
        Assert.Equal([new VirtqDescriptor(c, 300, true)], chain.Writable.ToArray());
        Assert.False(q.HasAvailable);

        q.Complete(head, 123);
        Assert.Equal(1, _vq.UsedIdx);
        Assert.Equal(((uint)head, 123u), _vq.UsedElement(0));
        Assert.Equal(1, q.Completed);
        Assert.Equal(PopResult.Empty, q.Pop(out _));
    }

    [Fact]
    public void A_disabled_queue_pops_nothing()
    {
        var q = _vq.CreateQueue();
        q.Enabled = false;
        _vq.AddChain([8], []);
        Assert.False(q.HasAvailable);
        Assert.Equal(PopResult.Empty, q.Pop(out _));
    }

    [Fact]
    public void Several_chains_pop_in_publication_order_and_complete_in_any_order()
    {
        var q = _vq.CreateQueue();
        ushort h1 = _vq.AddChain([10], [20]);
        ushort h2 = _vq.AddChain([30], []);
        ushort h3 = _vq.AddChain([], [40, 50]);

        Assert.Equal(PopResult.Chain, q.Pop(out var c1));
        Assert.Equal(h1, c1.Head);
        Assert.Equal(PopResult.Chain, q.Pop(out var c2));
        Assert.Equal(h2, c2.Head);
        Assert.Equal(1, c2.ReadableCount);
        Assert.Equal(PopResult.Chain, q.Pop(out var c3));
        Assert.Equal(h3, c3.Head);
        Assert.Equal(0, c3.ReadableCount);
        Assert.Equal(2, c3.Writable.Length);
        Assert.Equal(PopResult.Empty, q.Pop(out _));

        q.Complete(h3, 90);
        q.Complete(h1, 20);
        q.Complete(h2, 0);
        Assert.Equal(3, _vq.UsedIdx);
        Assert.Equal(((uint)h3, 90u), _vq.UsedElement(0));
        Assert.Equal(((uint)h1, 20u), _vq.UsedElement(1));
        Assert.Equal(((uint)h2, 0u), _vq.UsedElement(2));
    }

    [Fact]
    public void A_full_ring_of_Size_chains_published_at_once_pops_entirely()
    {
        var q = _vq.CreateQueue();
        for (int i = 0; i < QueueSize; i++)
            _vq.AddChain(((ulong)0x200000 + (ulong)i * 64, 64, true));
        for (int i = 0; i < QueueSize; i++)
            Assert.Equal(PopResult.Chain, q.Pop(out _));
        Assert.Equal(PopResult.Empty, q.Pop(out _));
    }

    [Fact]
    public void A_chain_of_exactly_the_queue_size_is_fine()
    {
        var q = _vq.CreateQueue();
        var buffers = Enumerable.Range(0, QueueSize).Select(i => (0x200000UL + (ulong)i * 16, 16u, i >= 5)).ToArray();
        ushort head = _vq.AddChain(buffers);
        Assert.Equal(PopResult.Chain, q.Pop(out var chain));
        Assert.Equal(head, chain.Head);
        Assert.Equal(QueueSize, chain.Buffers.Length);
        Assert.Equal(5, chain.ReadableCount);
    }

    [Fact]
    public void An_indirect_chain_pops_with_the_buffers_of_its_table()
    {
        var q = _vq.CreateQueue(indirect: true);
        ulong a = _vq.Allocate(16), b = _vq.Allocate(512), c = _vq.Allocate(1);
        ushort head = _vq.AddIndirectChain((a, 16, false), (b, 512, true), (c, 1, true));
        Assert.Equal(PopResult.Chain, q.Pop(out var chain));
        Assert.Equal(head, chain.Head);
        Assert.Equal(1, chain.ReadableCount);
        Assert.Equal([new VirtqDescriptor(a, 16, false), new VirtqDescriptor(b, 512, true), new VirtqDescriptor(c, 1, true)],
            chain.Buffers.ToArray());
        q.Complete(head, 513);
        Assert.Equal(((uint)head, 513u), _vq.UsedElement(0));
    }

    [Fact]
    public void Direct_descriptors_may_precede_one_indirect_table()
    {
        // virtio 1.2 §2.7.5.3.2: the device MUST handle normal descriptors followed by a single indirect one.
        var q = _vq.CreateQueue(indirect: true);
        ulong header = _vq.Allocate(16);
        ulong table = _vq.WriteIndirectTable((_vq.Allocate(64), 64, false), (_vq.Allocate(8), 8, true));
        ushort d0 = _vq.AllocateDescriptor(), d1 = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(d0, header, 16, Next, d1);
        _vq.WriteDescriptor(d1, table, 32, Indirect);
        _vq.Publish(d0);
        Assert.Equal(PopResult.Chain, q.Pop(out var chain));
        Assert.Equal(3, chain.Buffers.Length);
        Assert.Equal(2, chain.ReadableCount);
        Assert.Equal(header, chain.Buffers[0].Address);
    }

    [Fact]
    public void The_16_bit_ring_indices_wrap_around()
    {
        // 70000 requests in batches of 5 on an 8-entry ring: both indices wrap past 65535 in the middle of a batch,
        // with requests outstanding across the wrap.
        var q = _vq.CreateQueue(eventIdx: true);
        ulong buffer = _vq.Allocate(64);
        int completed = 0;
        for (int batch = 0; batch < 14000; batch++)
        {
            var heads = new ushort[5];
            for (int i = 0; i < 5; i++)
                heads[i] = _vq.AddChain((buffer, 16, false), (buffer + 16, 48, true));
            for (int i = 0; i < 5; i++)
            {
                Assert.Equal(PopResult.Chain, q.Pop(out var chain));
                Assert.Equal(heads[i], chain.Head);
                Assert.Equal((ushort)(_vq.AvailIdx - (4 - i)), _vq.AvailEvent);
            }
            Assert.Equal(PopResult.Empty, q.Pop(out _));
            foreach (ushort h in heads)
            {
                q.Complete(h, 48);
                completed++;
            }
            Assert.Equal((ushort)completed, _vq.UsedIdx);
            Assert.Equal(((uint)heads[4], 48u), _vq.UsedElement(completed - 1));
        }
        Assert.Equal(70000, q.Completed);
        Assert.Equal(unchecked((ushort)70000), _vq.AvailIdx);
        Assert.Equal(unchecked((ushort)70000), _vq.AvailEvent);
    }

    [Fact]
    public void With_event_idx_pop_writes_avail_event()
    {
        var q = _vq.CreateQueue(eventIdx: true);
        _vq.AddChain([8], []);
        _vq.AddChain([8], []);
        Assert.Equal(PopResult.Chain, q.Pop(out _));
        Assert.Equal(1, _vq.AvailEvent);
        Assert.Equal(PopResult.Chain, q.Pop(out _));
        Assert.Equal(2, _vq.AvailEvent);
    }

    [Fact]
    public void Without_event_idx_avail_event_is_left_alone()
    {
        var q = _vq.CreateQueue();
        _vq.AddChain([8], []);
        Assert.Equal(PopResult.Chain, q.Pop(out _));
        Assert.Equal(0, _vq.AvailEvent);
    }

    [Fact]
    public void ShouldInterrupt_honours_VIRTQ_AVAIL_F_NO_INTERRUPT()
    {
        var q = _vq.CreateQueue();
        Assert.False(q.ShouldInterrupt()); // nothing completed
        ushort h = _vq.AddChain([8], []);
        q.Pop(out _);
        q.Complete(h, 0);
        Assert.True(q.ShouldInterrupt());
        Assert.False(q.ShouldInterrupt()); // nothing new since

        _vq.AvailFlags = 1; // VIRTQ_AVAIL_F_NO_INTERRUPT
        h = _vq.AddChain([8], []);
        q.Pop(out _);
        q.Complete(h, 0);
        Assert.False(q.ShouldInterrupt());

        _vq.AvailFlags = 0;
        h = _vq.AddChain([8], []);
        q.Pop(out _);
        q.Complete(h, 0);
        Assert.True(q.ShouldInterrupt());
    }

    [Fact]
    public void ShouldInterrupt_with_event_idx_fires_only_when_the_used_index_passes_used_event()
    {
        var q = _vq.CreateQueue(eventIdx: true);
        _vq.AvailFlags = 1; // must be ignored with VIRTIO_F_EVENT_IDX (§2.7.10)
        void CompleteOne()
        {
            ushort h = _vq.AddChain([8], []);
            Assert.Equal(PopResult.Chain, q.Pop(out _));
            q.Complete(h, 0);
        }

        _vq.UsedEvent = 1; // "interrupt me when used idx goes from 1 to 2"
        CompleteOne(); // used 0 -> 1
        Assert.False(q.ShouldInterrupt());
        CompleteOne(); // used 1 -> 2
        Assert.True(q.ShouldInterrupt());
        CompleteOne(); // used 2 -> 3: event 1 already passed
        Assert.False(q.ShouldInterrupt());

        _vq.UsedEvent = 4;
        CompleteOne();
        CompleteOne();
        CompleteOne(); // used 3 -> 6 in one batch crosses 4
        Assert.True(q.ShouldInterrupt());
        Assert.False(q.ShouldInterrupt());
    }

    [Fact]
    public void Validate_accepts_a_well_placed_ring()
    {
        var q = _vq.CreateQueue();
        Assert.Null(q.Validate());
    }

    [Theory]
    [InlineData(0, 0, 0, 0, "power of two")]
    [InlineData(6, 0, 0, 0, "power of two")]
    [InlineData(16, 0, 0, 0, "power of two")] // larger than MaxSize 8
    [InlineData(8, 8, 0, 0, "misaligned")]    // descriptor table needs 16
    [InlineData(8, 0, 1, 0, "misaligned")]    // avail ring needs 2
    [InlineData(8, 0, 0, 2, "misaligned")]    // used ring needs 4
    public void Validate_rejects_bad_sizes_and_misaligned_rings(int size, int descDelta, int availDelta, int usedDelta, string why)
    {
        var q = _vq.CreateQueue();
        q.Size = (ushort)size;
        q.DescriptorTable += (ulong)descDelta;
        q.AvailRing += (ulong)availDelta;
        q.UsedRing += (ulong)usedDelta;
        Assert.Contains(why, q.Validate());
    }

    [Theory]
    [InlineData("desc", RamSize, "descriptor table")]
    [InlineData("desc", RamSize - 16 * 4, "descriptor table")]     // half of the table past the end of RAM
    [InlineData("desc", 0xFFFF_FFFF_FFFF_FFF0, "descriptor table")] // address + length overflows
    [InlineData("avail", RamSize - 16, "available ring")]          // 6 + 2 * 8 bytes do not fit
    [InlineData("avail", 0xFFFF_FFFF_FFFF_FFFE, "available ring")]
    [InlineData("used", RamSize - 64, "used ring")]                // 6 + 8 * 8 bytes do not fit
    [InlineData("used", 0xC000_0000UL, "used ring")]                 // in the PCI window, not RAM
    public void Validate_rejects_rings_outside_guest_RAM(string ring, ulong address, string why)
    {
        var q = _vq.CreateQueue();
        switch (ring)
        {
            case "desc": q.DescriptorTable = address; break;
            case "avail": q.AvailRing = address; break;
            default: q.UsedRing = address; break;
        }
        Assert.Contains(why, q.Validate());
    }

    [Fact]
    public void The_constructor_refuses_a_max_size_that_is_not_a_power_of_two()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new SplitQueue(_memory, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new SplitQueue(_memory, 100));
        Assert.Throws<ArgumentOutOfRangeException>(() => new SplitQueue(_memory, 65535));
    }

    // ---- hostile rings: broken ring state ----

    [Fact]
    public void A_head_index_past_the_queue_size_breaks_the_queue()
    {
        var q = _vq.CreateQueue();
        _vq.Publish(QueueSize);
        Assert.Equal(PopResult.Broken, q.Pop(out _));
        Assert.Contains("head 8, past the queue size 8", q.LastError);
        Assert.False(q.Enabled);
        _vq.AddChain([8], []);
        Assert.Equal(PopResult.Empty, q.Pop(out _)); // no more touching the ring until a reset
    }

    [Fact]
    public void An_avail_index_more_than_Size_ahead_breaks_the_queue()
    {
        var q = _vq.CreateQueue();
        _vq.AvailIdx = QueueSize + 1;
        Assert.Equal(PopResult.Broken, q.Pop(out _));
        Assert.Contains("9 entries ahead", q.LastError);
        Assert.False(q.Enabled);
    }

    [Fact]
    public void An_avail_index_that_went_backwards_breaks_the_queue()
    {
        var q = _vq.CreateQueue();
        ushort h = _vq.AddChain([8], []);
        Assert.Equal(PopResult.Chain, q.Pop(out _));
        q.Complete(h, 0);
        _vq.AvailIdx = 0; // 65535 entries "ahead"
        Assert.Equal(PopResult.Broken, q.Pop(out _));
        Assert.Contains("65535 entries ahead", q.LastError);
    }

    [Fact]
    public void A_descriptor_table_that_runs_out_of_RAM_gives_a_bad_chain()
    {
        // Not validated (a device must never get here after Validate, but Pop must still be safe).
        var q = _vq.CreateQueue();
        q.DescriptorTable = RamSize - 16 * 4;
        _vq.Publish(5);
        Assert.Equal(PopResult.BadChain, q.Pop(out var chain));
        Assert.Equal(5, chain.Head);
        Assert.Contains("outside guest RAM", q.LastError);
    }

    // ---- hostile rings: bad chains ----

    [Fact]
    public void A_descriptor_loop_is_a_bad_chain()
    {
        var q = _vq.CreateQueue();
        ushort a = _vq.AllocateDescriptor(), b = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(a, 0x200000, 16, Next, b);
        _vq.WriteDescriptor(b, 0x200010, 16, Next, a);
        _vq.Publish(a);
        AssertBadChainThenRecovers(q, "longer than the queue size 8 (a loop?)");
    }

    [Fact]
    public void A_descriptor_pointing_at_itself_is_a_bad_chain()
    {
        var q = _vq.CreateQueue();
        ushort a = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(a, 0x200000, 16, Next, a);
        _vq.Publish(a);
        AssertBadChainThenRecovers(q, "(a loop?)");
    }

    [Fact]
    public void A_loop_through_the_whole_table_is_a_bad_chain()
    {
        var q = _vq.CreateQueue();
        for (ushort i = 0; i < QueueSize; i++)
            _vq.WriteDescriptor(i, 0x200000, 16, Next, (ushort)((i + 1) % QueueSize));
        _vq.Publish(3);
        Assert.Equal(PopResult.BadChain, q.Pop(out var chain));
        Assert.Equal(3, chain.Head);
        Assert.Contains("a loop?", q.LastError);
    }

    [Fact]
    public void A_chain_longer_than_the_queue_size_through_an_indirect_table_is_a_bad_chain()
    {
        // Size 4 on a queue that could be 16: one direct descriptor and a full 4-entry indirect table make 5 buffers,
        // more than the spec allows (§2.7.5.3.1: no chain longer than the queue size).
        var vq = new VirtqueueBuilder(_memory, 4, ringBase: 0x40000, dataBase: 0x300000);
        var q = vq.CreateQueue(maxSize: 16, indirect: true);
        ulong table = vq.WriteIndirectTable([.. Enumerable.Range(0, 4).Select(i => (0x200000UL + (ulong)i * 16, 16u, true))]);
        vq.WriteDescriptor(0, 0x200100, 16, Next, 1);
        vq.WriteDescriptor(1, table, 64, Indirect);
        vq.Publish(0);
        Assert.Equal(PopResult.BadChain, q.Pop(out _));
        Assert.Contains("queue size 4", q.LastError);
    }

    [Fact]
    public void A_next_index_past_the_queue_size_is_a_bad_chain()
    {
        var q = _vq.CreateQueue();
        ushort a = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(a, 0x200000, 16, Next, QueueSize);
        _vq.Publish(a);
        AssertBadChainThenRecovers(q, "descriptor index 8 is past the queue size 8");
    }

    [Theory]
    [InlineData(RamSize, 16u)]                      // starts at the end of RAM
    [InlineData(RamSize - 16, 32u)]                 // runs past the end of RAM
    [InlineData(0xC000_0000UL, 4096u)]                // PCI window
    [InlineData(0xFFFF_FFFF_FFFF_FF00, 0x200u)]     // address + length overflows 2^64
    [InlineData(0xFFFF_FFFF_FFFF_FFFF, 1u)]
    [InlineData(0UL, 0xFFFF_FFFFu)]                 // huge length
    [InlineData(0UL, 0x8000_0000u)]
    public void A_buffer_outside_guest_RAM_is_a_bad_chain(ulong address, uint length)
    {
        var q = _vq.CreateQueue();
        _vq.AddChain((0x200000, 16, false), (address, length, true));
        AssertBadChainThenRecovers(q, "outside guest RAM");
    }

    [Fact]
    public void A_buffer_ending_exactly_at_the_end_of_RAM_is_fine()
    {
        var q = _vq.CreateQueue();
        _vq.AddChain((RamSize - 16, 16, true));
        Assert.Equal(PopResult.Chain, q.Pop(out var chain));
        Assert.Equal(RamSize - 16, chain.Buffers[0].Address);
    }

    [Fact]
    public void A_zero_length_buffer_inside_RAM_is_fine()
    {
        var q = _vq.CreateQueue();
        _vq.AddChain((0x200000, 0, false), (0x200000, 16, true));
        Assert.Equal(PopResult.Chain, q.Pop(out var chain));
        Assert.Equal(0u, chain.Buffers[0].Length);
    }

    [Theory]
    [InlineData(RamSize + 4096)]
    [InlineData(0xFFFF_FFFF_FFFF_FFFF)]
    public void A_zero_length_buffer_outside_RAM_is_a_bad_chain(ulong address)
    {
        // VirtqDescriptor promises a buffer inside guest RAM: a device that turns even an empty one into a span
        // must not throw on the guest's say-so.
        var q = _vq.CreateQueue();
        _vq.AddChain((0x200000, 16, false), (address, 0, true));
        AssertBadChainThenRecovers(q, "outside guest RAM");
    }

    [Fact]
    public void A_chain_of_more_than_4_GiB_is_a_bad_chain()
    {
        using var memory = GuestMemory.Create(3 * MemoryLayout.GiB); // MAP_NORESERVE: never touched, costs nothing
        var vq = new VirtqueueBuilder(memory, QueueSize);
        var q = vq.CreateQueue();
        vq.AddChain((0, 0x7FFF_FFFF, true), (0, 0x7FFF_FFFF, true), (0, 0x7FFF_FFFF, true));
        Assert.Equal(PopResult.BadChain, q.Pop(out _));
        Assert.Contains("more than 4 GiB", q.LastError);
    }

    [Fact]
    public void Buffers_spanning_the_3_to_4_GiB_hole_or_the_end_of_high_RAM_are_bad_chains()
    {
        using var memory = GuestMemory.Create(5 * MemoryLayout.GiB); // RAM at [0, 3 GiB) and [4 GiB, 6 GiB)
        var vq = new VirtqueueBuilder(memory, QueueSize);
        var q = vq.CreateQueue();
        const ulong G = MemoryLayout.GiB;

        vq.AddChain((3 * G - 4096, 8192, true)); // from low RAM into the hole
        Assert.Equal(PopResult.BadChain, q.Pop(out var c1));
        Assert.Contains("outside guest RAM", q.LastError);
        q.Complete(c1.Head, 0);

        vq.AddChain((4 * G - 4096, 8192, true)); // from the hole into high RAM
        Assert.Equal(PopResult.BadChain, q.Pop(out var c2));
        q.Complete(c2.Head, 0);

        vq.AddChain((6 * G - 8, 16, true)); // past the end of high RAM
        Assert.Equal(PopResult.BadChain, q.Pop(out var c3));
        q.Complete(c3.Head, 0);

        vq.AddChain((3 * G - 4096, 4096, false), (4 * G, 4096, true)); // each side of the hole on its own: fine
        Assert.Equal(PopResult.Chain, q.Pop(out var good));
        Assert.Equal(4 * G, good.Writable[0].Address);
    }

    [Fact]
    public void A_readable_buffer_after_a_writable_one_is_a_bad_chain()
    {
        var q = _vq.CreateQueue();
        _vq.AddChain((0x200000, 16, false), (0x200010, 16, true), (0x200020, 16, false));
        AssertBadChainThenRecovers(q, "device-readable descriptor");
    }

    [Fact]
    public void A_readable_buffer_after_a_writable_one_inside_an_indirect_table_is_a_bad_chain()
    {
        var q = _vq.CreateQueue(indirect: true);
        _vq.AddIndirectChain((0x200000, 16, true), (0x200010, 16, false));
        AssertBadChainThenRecovers(q, "follows a device-writable one");
    }

    [Fact]
    public void An_indirect_descriptor_without_VIRTIO_F_INDIRECT_DESC_is_a_bad_chain()
    {
        var q = _vq.CreateQueue(indirect: false);
        _vq.AddIndirectChain((0x200000, 16, false));
        AssertBadChainThenRecovers(q, "VIRTIO_F_INDIRECT_DESC was not negotiated");
    }

    [Fact]
    public void A_nested_indirect_table_is_a_bad_chain()
    {
        var q = _vq.CreateQueue(indirect: true);
        ulong inner = _vq.WriteIndirectTable((0x200000, 16, false));
        ulong outer = _vq.Allocate(32);
        _vq.WriteDescriptor(0, 0x200010, 16, Next, 1, table: outer);
        _vq.WriteDescriptor(1, inner, 16, Indirect, table: outer);
        ushort head = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(head, outer, 32, Indirect);
        _vq.Publish(head);
        AssertBadChainThenRecovers(q, "nested indirect descriptor 1");
    }

    [Fact]
    public void INDIRECT_together_with_NEXT_is_a_bad_chain()
    {
        var q = _vq.CreateQueue(indirect: true);
        ulong table = _vq.WriteIndirectTable((0x200000, 16, false));
        ushort head = _vq.AllocateDescriptor(), tail = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(head, table, 16, Indirect | Next, tail);
        _vq.WriteDescriptor(tail, 0x200010, 16, Write);
        _vq.Publish(head);
        AssertBadChainThenRecovers(q, "both INDIRECT and NEXT");
    }

    [Theory]
    [InlineData(24u, 0x200000UL, "not a positive multiple of 16")]
    [InlineData(15u, 0x200000UL, "not a positive multiple of 16")]
    [InlineData(0u, 0x200000UL, "not a positive multiple of 16")]
    [InlineData(144u, 0x200000UL, "9 descriptors exceeds the queue size 8")]
    [InlineData(0xFFFF_FFF0u, 0x200000UL, "exceeds the queue size")]
    [InlineData(32u, RamSize - 16, "indirect table 0xfffff0+0x20 is outside guest RAM")]
    [InlineData(32u, 0xFFFF_FFFF_FFFF_FFF0UL, "is outside guest RAM")]
    public void A_bad_indirect_table_is_a_bad_chain(uint length, ulong address, string why)
    {
        var q = _vq.CreateQueue(indirect: true);
        ushort head = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(head, address, length, Indirect);
        _vq.Publish(head);
        AssertBadChainThenRecovers(q, why);
    }

    [Fact]
    public void An_indirect_table_that_loops_is_a_bad_chain()
    {
        var q = _vq.CreateQueue(indirect: true);
        ulong table = _vq.Allocate(32);
        _vq.WriteDescriptor(0, 0x200000, 16, Next, 1, table: table);
        _vq.WriteDescriptor(1, 0x200010, 16, Next, 0, table: table);
        ushort head = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(head, table, 32, Indirect);
        _vq.Publish(head);
        AssertBadChainThenRecovers(q, "(a loop?)");
    }

    [Fact]
    public void A_next_index_past_the_indirect_table_is_a_bad_chain()
    {
        var q = _vq.CreateQueue(indirect: true);
        ulong table = _vq.Allocate(32);
        _vq.WriteDescriptor(0, 0x200000, 16, Next, 2, table: table); // the table has 2 entries
        ushort head = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(head, table, 32, Indirect);
        _vq.Publish(head);
        AssertBadChainThenRecovers(q, "descriptor index 2 is past the indirect table size 2");
    }

    [Fact]
    public void Bad_chains_leave_the_used_ring_and_avail_event_consistent()
    {
        var q = _vq.CreateQueue(eventIdx: true);
        ushort a = _vq.AllocateDescriptor();
        _vq.WriteDescriptor(a, 0x200000, 16, Next, a);
        _vq.Publish(a);
        ushort good = _vq.AddChain([16], []);
        Assert.Equal(PopResult.BadChain, q.Pop(out _));
        Assert.Equal(1, _vq.AvailEvent); // the bad chain was consumed like any other
        Assert.Equal(PopResult.Chain, q.Pop(out var chain));
        Assert.Equal(good, chain.Head);
        q.Complete(a, 0);
        q.Complete(good, 0);
        Assert.Equal(2, _vq.UsedIdx);
        Assert.Equal(2, q.Completed);
    }

    [Fact]
    public void Reset_forgets_the_ring_and_the_negotiated_features()
    {
        var q = _vq.CreateQueue(eventIdx: true, indirect: true);
        q.MsixVector = 3;
        ushort h = _vq.AddChain([8], []);
        q.Pop(out _);
        q.Complete(h, 0);
        q.Reset();
        Assert.False(q.Enabled);
        Assert.Equal(QueueSize, q.Size);
        Assert.Equal(0UL, q.DescriptorTable);
        Assert.Equal(0UL, q.AvailRing);
        Assert.Equal(0UL, q.UsedRing);
        Assert.Equal(0xFFFF, q.MsixVector);
        Assert.False(q.EventIdx);
        Assert.False(q.IndirectDescriptors);
        Assert.Equal("", q.LastError);
    }
}
