using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using Vmm.Devices.Virtio;
using Vmm.Interop;
using Vmm.Memory;

namespace Vmm.Tests.TestKit;

/// <summary>Records what a device asks of its transport (called from device threads).</summary>
public sealed class RecordingVirtioInterrupts : IVirtioInterrupts
{
    private int _queueInterrupts, _configInterrupts;

    public int QueueInterrupts => Volatile.Read(ref _queueInterrupts);
    public int ConfigInterrupts => Volatile.Read(ref _configInterrupts);
    public ConcurrentQueue<string> NeedsResetReasons { get; } = new();

    public void QueueInterrupt(SplitQueue queue) => Interlocked.Increment(ref _queueInterrupts);
    public void ConfigInterrupt() => Interlocked.Increment(ref _configInterrupts);
    public void NeedsReset(string why) => NeedsResetReasons.Enqueue(why);
}

/// <summary>One buffer of a chain the test driver builds.</summary>
public readonly record struct VirtqBuffer(ulong Address, uint Length, bool Writable);

/// <summary>An element of the used ring.</summary>
public readonly record struct UsedElement(uint Id, uint Length);

/// <summary>The driver side of one split virtqueue, built by hand in 16 MiB of guest memory, for driving a
/// <see cref="VirtioDevice"/> without KVM: descriptor table at 0x1000, available ring at 0x3000, used ring at 0x4000,
/// request buffers from 0x10000 up. Requests are published, the kick eventfd signalled, and the used ring polled.</summary>
public sealed class VirtioDeviceHarness : IDisposable
{
    public const ulong DescriptorTable = 0x1000, AvailRing = 0x3000, UsedRing = 0x4000, HeapStart = 0x10000;
    public const ulong RamSize = 16 << 20;
    public const ushort FlagNext = 1, FlagWrite = 2, FlagIndirect = 4;

    private readonly EventFd _kick = new();
    private ulong _heap = HeapStart;
    private ushort _nextDescriptor;
    private ushort _availIndex;
    private ushort _seenUsed;

    public VirtioDeviceHarness(ulong deviceFeatures, ushort queueSize = 256, bool indirect = false, bool eventIdx = false)
    {
        Memory = GuestMemory.Create(RamSize);
        Queue = new SplitQueue(Memory, queueSize)
        {
            Size = queueSize,
            DescriptorTable = DescriptorTable,
            AvailRing = AvailRing,
            UsedRing = UsedRing,
            IndirectDescriptors = indirect,
            EventIdx = eventIdx,
            Enabled = true,
        };
        ulong features = deviceFeatures | (1UL << VirtioFeatures.Version1);
        if (indirect)
            features |= 1UL << VirtioFeatures.RingIndirectDesc;
        if (eventIdx)
            features |= 1UL << VirtioFeatures.RingEventIdx;
        Context = new VirtioContext(Memory, features, [Queue], [_kick], Interrupts);
    }

    public GuestMemory Memory { get; }
    public SplitQueue Queue { get; }
    public RecordingVirtioInterrupts Interrupts { get; } = new();
    public VirtioContext Context { get; }
    public ushort Size => Queue.Size;

    /// <summary>Guest memory for a buffer (bump allocation; <see cref="ResetHeap"/> starts over).</summary>
    public ulong Alloc(ulong length, ulong alignment = 16)
    {
        ulong at = (_heap + alignment - 1) & ~(alignment - 1);
        if (at + length > RamSize)
            throw new InvalidOperationException("test heap exhausted");
        _heap = at + Math.Max(length, 1);
        return at;
    }

    public void ResetHeap() => _heap = HeapStart;

    /// <summary>A buffer holding <paramref name="data"/>.</summary>
    public ulong Place(ReadOnlySpan<byte> data, ulong alignment = 16)
    {
        ulong at = Alloc((ulong)data.Length, alignment);
        Memory.Write(new GuestAddress(at), data);
        return at;
    }

    public byte[] ReadBytes(ulong address, int length)
    {
        var bytes = new byte[length];
        Memory.Read(new GuestAddress(address), bytes);
        return bytes;
    }

    public void WriteDescriptor(ushort index, ulong address, uint length, ushort flags, ushort next, ulong table = DescriptorTable)
    {
        Span<byte> d = stackalloc byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(d, address);
        BinaryPrimitives.WriteUInt32LittleEndian(d[8..], length);
        BinaryPrimitives.WriteUInt16LittleEndian(d[12..], flags);
        BinaryPrimitives.WriteUInt16LittleEndian(d[14..], next);
        Memory.Write(new GuestAddress(table + 16UL * index), d);
    }

    /// <summary>Writes a chain into consecutive free descriptors; returns its head (not yet published).</summary>
    public ushort AddChain(params ReadOnlySpan<VirtqBuffer> buffers)
    {
        if (buffers.Length == 0 || buffers.Length > Size)
            throw new ArgumentException("a chain needs 1..queue size buffers");
        if (_nextDescriptor + buffers.Length > Size)
            _nextDescriptor = 0; // every earlier request has completed by now
        ushort head = _nextDescriptor;
        for (int i = 0; i < buffers.Length; i++)
        {
            ushort index = (ushort)(head + i);
            bool last = i == buffers.Length - 1;
            WriteDescriptor(index, buffers[i].Address, buffers[i].Length,
                (ushort)((buffers[i].Writable ? FlagWrite : 0) | (last ? 0 : FlagNext)), (ushort)(last ? 0 : index + 1));
        }
        _nextDescriptor = (ushort)(head + buffers.Length);
        return head;
    }

    /// <summary>Puts <paramref name="head"/> in the available ring and publishes it.</summary>
    public void Publish(ushort head)
    {
        Memory.WriteObj(new GuestAddress(AvailRing + 4 + 2UL * (ulong)(_availIndex % Size)), head);
        _availIndex++;
        Interlocked.MemoryBarrier();
        Memory.WriteObj(new GuestAddress(AvailRing + 2), _availIndex);
    }

    /// <summary>Writes the available index directly (for corrupt-ring tests).</summary>
    public void SetAvailIndex(ushort value)
    {
        _availIndex = value;
        Memory.WriteObj(new GuestAddress(AvailRing + 2), value);
    }

    public void Kick() => _kick.Signal();

    /// <summary>The device's used index (read with a full barrier: the device thread writes it).</summary>
    public ushort UsedIndex
    {
        get
        {
            Interlocked.MemoryBarrier();
            return BinaryPrimitives.ReadUInt16LittleEndian(Memory.GetSpan(new GuestAddress(UsedRing + 2), 2));
        }
    }

    /// <summary>Waits for the next used element (generous timeout: the machine is shared).</summary>
    public UsedElement WaitUsed(int timeoutMs = 20_000)
    {
        long deadline = Stopwatch.GetTimestamp() + timeoutMs * Stopwatch.Frequency / 1000;
        while (UsedIndex == _seenUsed)
        {
            if (Stopwatch.GetTimestamp() > deadline)
                throw new TimeoutException($"no used element after {timeoutMs} ms (used index {_seenUsed})");
            Thread.Sleep(1);
        }
        Interlocked.MemoryBarrier();
        ulong slot = UsedRing + 4 + 8UL * (ulong)(_seenUsed % Size);
        _seenUsed++;
        return new UsedElement(Memory.ReadObj<uint>(new GuestAddress(slot)), Memory.ReadObj<uint>(new GuestAddress(slot + 4)));
    }

    /// <summary>True when nothing new reaches the used ring within <paramref name="ms"/>.</summary>
    public bool StaysIdle(int ms = 200)
    {
        Thread.Sleep(ms);
        return UsedIndex == _seenUsed;
    }

    /// <summary>Builds, publishes and kicks a chain, and waits for its completion.</summary>
    public UsedElement Submit(params ReadOnlySpan<VirtqBuffer> buffers)
    {
        ushort head = AddChain(buffers);
        Publish(head);
        Kick();
        var used = WaitUsed();
        if (used.Id != head)
            throw new InvalidOperationException($"completed head {used.Id}, expected {head}");
        return used;
    }

    public void Dispose()
    {
        _kick.Dispose();
        Memory.Dispose();
    }
}
