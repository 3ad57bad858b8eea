using Vmm.Devices.Virtio;
using Vmm.Memory;

namespace Vmm.Fuzz;

/// <summary>The split-virtqueue walk on its own (virtio 1.2 §2.7). Guest RAM is two 64 KiB regions with a hole
/// between them (0x0-0xFFFF, 0x20000-0x2FFFF), so buffers can straddle a region end or point into the hole.
/// Input: [flags: bit 0 INDIRECT_DESC, bit 1 EVENT_IDX, bits 4-7 log2 queue size (mod 5)] [available ring: flags,
/// idx, 16 entries, used_event — 38 bytes, at 0x2000] [descriptor table: 16 × 16 bytes, at 0x1000] [the rest: data
/// and indirect tables at 0x4000, past 48 KiB at 0x20000]. The used ring is at 0x3000.
/// Invariants: every chain handed out has at most queue-size buffers, each inside one RAM region, readable ones
/// first, under 4 GiB in all; a bad chain or a broken ring is reported, never thrown; the walk ends.</summary>
public sealed class VirtqueueTarget : IFuzzTarget
{
    private const ushort MaxSize = 16;
    private const ulong Desc = 0x1000, Avail = 0x2000, Used = 0x3000, Data = 0x4000, DataBytes = 0xC000, High = 0x20000;
    private readonly GuestMemory _memory = GuestMemory.Create([(new GuestAddress(0), 0x10000UL), (new GuestAddress(High), 0x10000UL)]);

    public void Run(ReadOnlySpan<byte> input)
    {
        var r = new FuzzReader(input);
        _memory.Clear(new GuestAddress(0), 0x10000);
        _memory.Clear(new GuestAddress(High), 0x10000);
        byte flags = r.U8();
        _memory.Write(new GuestAddress(Avail), r.Bytes(6 + 2 * MaxSize));
        _memory.Write(new GuestAddress(Desc), r.Bytes(16 * MaxSize));
        _memory.Write(new GuestAddress(Data), r.Bytes((int)DataBytes));
        _memory.Write(new GuestAddress(High), r.Bytes(0x10000));

        var queue = new SplitQueue(_memory, MaxSize)
        {
            Size = (ushort)(1 << ((flags >> 4) % 5)),
            DescriptorTable = Desc,
            AvailRing = Avail,
            UsedRing = Used,
            IndirectDescriptors = (flags & 1) != 0,
            EventIdx = (flags & 2) != 0,
        };
        if (queue.Validate() is { } why)
            throw new FuzzInvariantException("the fixed ring layout failed validation: " + why);
        queue.Enabled = true;
        // More pops than the ring can hold: the available index may run ahead and must be caught (Broken).
        for (int i = 0; i < 4 * MaxSize; i++)
        {
            var result = queue.Pop(out var chain);
            if (result is PopResult.Empty or PopResult.Broken)
                break;
            if (chain.Head >= queue.Size)
                throw new FuzzInvariantException($"head {chain.Head} past the queue size {queue.Size}");
            if (result == PopResult.BadChain)
            {
                if (queue.LastError.Length == 0)
                    throw new FuzzInvariantException("a bad chain without a reason");
                queue.Complete(chain.Head, 0);
                continue;
            }
            Check(queue, chain);
            queue.Complete(chain.Head, 0);
        }
        queue.ShouldInterrupt();
        _ = queue.HasAvailable;
    }

    private void Check(SplitQueue queue, DescriptorChain chain)
    {
        if (chain.Buffers.Length == 0 || chain.Buffers.Length > queue.Size)
            throw new FuzzInvariantException($"chain of {chain.Buffers.Length} buffers (queue size {queue.Size})");
        ulong total = 0;
        for (int i = 0; i < chain.Buffers.Length; i++)
        {
            var d = chain.Buffers[i];
            if (!_memory.IsValidRange(new GuestAddress(d.Address), d.Length))
                throw new FuzzInvariantException($"buffer {i} 0x{d.Address:x}+0x{d.Length:x} is not inside one RAM region");
            if (d.DeviceWritable != (i >= chain.ReadableCount))
                throw new FuzzInvariantException($"buffer {i} writable={d.DeviceWritable} but {chain.ReadableCount} readable ones come first");
            total += d.Length;
            // What a device does with it: a span over the whole buffer must be available.
            _memory.GetSpan(new GuestAddress(d.Address), (int)d.Length);
        }
        if (total > uint.MaxValue)
            throw new FuzzInvariantException($"chain of {total} bytes");
    }

    public void Dispose() => _memory.Dispose();
}
