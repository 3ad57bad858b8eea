using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using Vmm.Memory;

namespace Vmm.Devices.Virtio;

/// <summary>One buffer of a descriptor chain, already checked to lie inside one guest RAM region.</summary>
public readonly record struct VirtqDescriptor(ulong Address, uint Length, bool DeviceWritable);

/// <summary>A popped request: the head index to complete it with and its buffers, readable ones first. The
/// buffers live in the queue's scratch array: valid until the next <see cref="SplitQueue.Pop"/>.</summary>
public readonly ref struct DescriptorChain(ushort head, ReadOnlySpan<VirtqDescriptor> buffers, int readableCount)
{
    public ushort Head { get; } = head;
    public ReadOnlySpan<VirtqDescriptor> Buffers { get; } = buffers;
    /// <summary>The device-readable buffers come first; this many of them.</summary>
    public int ReadableCount { get; } = readableCount;
    public ReadOnlySpan<VirtqDescriptor> Readable => Buffers[..ReadableCount];
    public ReadOnlySpan<VirtqDescriptor> Writable => Buffers[ReadableCount..];
}

/// <summary>What <see cref="SplitQueue.Pop"/> found.</summary>
public enum PopResult
{
    /// <summary>No new request.</summary>
    Empty,
    /// <summary>A valid chain.</summary>
    Chain,
    /// <summary>A chain that breaks a rule (see <see cref="SplitQueue.LastError"/>): complete <c>Head</c> with 0 bytes
    /// written and go on; nothing of it was touched.</summary>
    BadChain,
    /// <summary>The ring itself is corrupt (avail index or head out of range): the device needs a reset.</summary>
    Broken,
}

/// <summary>A split virtqueue (virtio 1.2 §2.7) driven by the device side. Every index, length and address the
/// driver supplies is validated before use: descriptor indices against the queue size, chains against loops
/// and the queue size, buffers against guest RAM, the readable-before-writable order, indirect tables
/// (negotiated, not nested, a whole number of descriptors). Nothing outside guest RAM is ever touched.
/// One thread (the device's worker) pops and completes; configuration happens while the device is stopped.</summary>
public sealed class SplitQueue
{
    private const ushort DescFlagNext = 1, DescFlagWrite = 2, DescFlagIndirect = 4;
    private const ushort AvailFlagNoInterrupt = 1;
    private const int DescriptorSize = 16;

    private readonly GuestMemory _memory;
    private readonly VirtqDescriptor[] _scratch;
    private ushort _nextAvail;
    private ushort _nextUsed;
    private ushort _lastSignalledUsed;

    public SplitQueue(GuestMemory memory, ushort maxSize)
    {
        if (maxSize == 0 || maxSize > 32768 || (maxSize & (maxSize - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(maxSize), "queue size must be a power of two up to 32768");
        _memory = memory;
        MaxSize = maxSize;
        _scratch = new VirtqDescriptor[maxSize];
        Reset();
    }

    public ushort MaxSize { get; }

    // Driver-programmed state (common configuration).
    public ushort Size { get; set; }
    public ulong DescriptorTable { get; set; }
    public ulong AvailRing { get; set; }
    public ulong UsedRing { get; set; }
    public bool Enabled { get; set; }
    public ushort MsixVector { get; set; }

    // Negotiated features.
    public bool EventIdx { get; set; }
    public bool IndirectDescriptors { get; set; }

    /// <summary>Why the last <see cref="PopResult.BadChain"/> / <see cref="PopResult.Broken"/> happened.</summary>
    public string LastError { get; private set; } = "";

    /// <summary>Requests popped but not yet completed are the driver's business; this counts completions.</summary>
    public long Completed { get; private set; }

    public void Reset()
    {
        Size = MaxSize;
        DescriptorTable = AvailRing = UsedRing = 0;
        Enabled = false;
        MsixVector = 0xFFFF;
        EventIdx = IndirectDescriptors = false;
        _nextAvail = _nextUsed = _lastSignalledUsed = 0;
        LastError = "";
    }

    /// <summary>Checks what the driver programmed before the device uses it; null when fine, else why not.</summary>
    public string? Validate()
    {
        if (Size == 0 || Size > MaxSize || (Size & (Size - 1)) != 0)
            return $"queue size {Size} is not a power of two between 1 and {MaxSize}";
        if (DescriptorTable % 16 != 0 || AvailRing % 2 != 0 || UsedRing % 4 != 0)
            return $"misaligned ring (desc 0x{DescriptorTable:x}, avail 0x{AvailRing:x}, used 0x{UsedRing:x})";
        if (!InRam(DescriptorTable, (ulong)Size * DescriptorSize))
            return $"descriptor table 0x{DescriptorTable:x}+0x{(ulong)Size * DescriptorSize:x} is outside guest RAM";
        if (!InRam(AvailRing, 6 + 2UL * Size))
            return $"available ring 0x{AvailRing:x} is outside guest RAM";
        if (!InRam(UsedRing, 6 + 8UL * Size))
            return $"used ring 0x{UsedRing:x} is outside guest RAM";
        return null;
    }

    private bool InRam(ulong address, ulong length) =>
        address + length >= address && _memory.IsValidRange(new GuestAddress(address), length);

    /// <summary>Takes the next available request, validating the whole chain first.</summary>
    public PopResult Pop(out DescriptorChain chain)
    {
        chain = default;
        if (!Enabled)
            return PopResult.Empty;
        ushort availIdx = ReadU16(AvailRing + 2);
        ushort pending = (ushort)(availIdx - _nextAvail);
        if (pending == 0)
            return PopResult.Empty;
        if (pending > Size)
            return Fail($"available index {availIdx} is {pending} entries ahead of the device (queue size {Size})");
        // The ring entries must be read after the index that published them.
        Interlocked.MemoryBarrier();
        ushort head = ReadU16(AvailRing + 4 + 2UL * (ulong)(_nextAvail % Size));
        if (head >= Size)
            return Fail($"available ring slot {_nextAvail % Size} holds head {head}, past the queue size {Size}");
        _nextAvail++;
        if (EventIdx)
            WriteU16(UsedRing + 4 + 8UL * Size, _nextAvail); // avail_event: kick us again for the next one
        var result = Walk(head, out int count, out int readable);
        chain = new DescriptorChain(head, _scratch.AsSpan(0, count), readable);
        return result;
    }

    private PopResult Walk(ushort head, out int count, out int readable)
    {
        count = 0;
        readable = 0;
        ulong table = DescriptorTable;
        uint tableSize = Size;
        bool indirect = false;
        uint index = head;
        ulong total = 0;
        int visited = 0;
        Span<byte> d = stackalloc byte[DescriptorSize];
        while (true)
        {
            if (index >= tableSize)
                return Bad(head, $"descriptor index {index} is past the {(indirect ? "indirect table" : "queue")} size {tableSize}");
            // Longer than the queue can only be a loop (or a chain the spec forbids).
            if (++visited > Size)
                return Bad(head, $"chain from head {head} is longer than the queue size {Size} (a loop?)");
            if (!_memory.TryGetSpan(new GuestAddress(table + index * DescriptorSize), DescriptorSize, out var raw))
                return Bad(head, $"descriptor {index} at 0x{table + index * DescriptorSize:x} is outside guest RAM");
            raw.CopyTo(d); // one snapshot: the driver may change it under us
            ulong address = BinaryPrimitives.ReadUInt64LittleEndian(d);
            uint length = BinaryPrimitives.ReadUInt32LittleEndian(d[8..]);
            ushort flags = BinaryPrimitives.ReadUInt16LittleEndian(d[12..]);
            ushort next = BinaryPrimitives.ReadUInt16LittleEndian(d[14..]);
            if ((flags & DescFlagIndirect) != 0)
            {
                if (!IndirectDescriptors)
                    return Bad(head, $"descriptor {index} is indirect but VIRTIO_F_INDIRECT_DESC was not negotiated");
                if (indirect)
                    return Bad(head, $"nested indirect descriptor {index}");
                if ((flags & DescFlagNext) != 0)
                    return Bad(head, $"descriptor {index} sets both INDIRECT and NEXT");
                if (length == 0 || length % DescriptorSize != 0)
                    return Bad(head, $"indirect table length {length} is not a positive multiple of {DescriptorSize}");
                if (length / DescriptorSize > Size)
                    return Bad(head, $"indirect table of {length / DescriptorSize} descriptors exceeds the queue size {Size}");
                if (!InRam(address, length))
                    return Bad(head, $"indirect table 0x{address:x}+0x{length:x} is outside guest RAM");
                indirect = true;
                table = address;
                tableSize = length / DescriptorSize;
                index = 0;
                visited = 0;
                continue;
            }
            bool writable = (flags & DescFlagWrite) != 0;
            // Empty buffers too: VirtqDescriptor promises an address inside RAM, and a device that makes even a
            // zero-length span of it must not throw on the guest's say-so.
            if (length > int.MaxValue || !InRam(address, length))
                return Bad(head, $"buffer 0x{address:x}+0x{length:x} of descriptor {index} is outside guest RAM");
            if (!writable && count > readable)
                return Bad(head, $"device-readable descriptor {index} follows a device-writable one");
            total += length;
            if (total > uint.MaxValue)
                return Bad(head, "chain holds more than 4 GiB");
            // Direct descriptors followed by an indirect table can exceed the queue size without a loop
            // (virtio 1.2 §2.7.5.3.1 forbids chains longer than the queue size). The scratch bound guards an
            // unvalidated Size above MaxSize.
            if (count == Size || count == _scratch.Length)
                return Bad(head, $"chain from head {head} has more buffers than the queue size {Size}");
            _scratch[count++] = new VirtqDescriptor(address, length, writable);
            if (!writable)
                readable++;
            if ((flags & DescFlagNext) == 0)
                return PopResult.Chain;
            index = next;
        }
    }

    private PopResult Bad(ushort head, string why)
    {
        LastError = why;
        return PopResult.BadChain;
    }

    private PopResult Fail(string why)
    {
        LastError = why;
        Enabled = false; // stop touching a ring we cannot trust until the driver resets the device
        return PopResult.Broken;
    }

    /// <summary>Returns request <paramref name="head"/> to the driver with <paramref name="written"/> bytes written.</summary>
    public void Complete(ushort head, uint written)
    {
        ulong slot = UsedRing + 4 + 8UL * (ulong)(_nextUsed % Size);
        WriteU32(slot, head);
        WriteU32(slot + 4, written);
        _nextUsed++;
        // The element must be visible before the index that publishes it.
        Interlocked.MemoryBarrier();
        WriteU16(UsedRing + 2, _nextUsed);
        Completed++;
    }

    /// <summary>Whether the driver wants an interrupt for what was completed since the last one
    /// (VIRTQ_AVAIL_F_NO_INTERRUPT, or used_event with VIRTIO_F_EVENT_IDX).</summary>
    public bool ShouldInterrupt()
    {
        // The used index write must be visible before we read the driver's suppression state.
        Interlocked.MemoryBarrier();
        ushort old = _lastSignalledUsed, now = _nextUsed;
        if (old == now)
            return false;
        _lastSignalledUsed = now;
        if (EventIdx)
        {
            ushort usedEvent = ReadU16(AvailRing + 4 + 2UL * Size);
            return (ushort)(now - usedEvent - 1) < (ushort)(now - old);
        }
        return (ReadU16(AvailRing) & AvailFlagNoInterrupt) == 0;
    }

    /// <summary>True when the driver has published requests not yet popped.</summary>
    public bool HasAvailable => Enabled && ReadU16(AvailRing + 2) != _nextAvail;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private ushort ReadU16(ulong address) =>
        _memory.TryGetSpan(new GuestAddress(address), 2, out var s) ? BinaryPrimitives.ReadUInt16LittleEndian(s) : (ushort)0;

    private void WriteU16(ulong address, ushort value)
    {
        if (_memory.TryGetSpan(new GuestAddress(address), 2, out var s))
            BinaryPrimitives.WriteUInt16LittleEndian(s, value);
    }

    private void WriteU32(ulong address, uint value)
    {
        if (_memory.TryGetSpan(new GuestAddress(address), 4, out var s))
            BinaryPrimitives.WriteUInt32LittleEndian(s, value);
    }
}
