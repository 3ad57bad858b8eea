using System.Buffers.Binary;
using System.Diagnostics;
using Vmm.Devices.Virtio;
using Vmm.Interop;
using Vmm.Memory;

namespace Vmm.Tests.TestKit;

/// <summary>The driver side of one split virtqueue in guest memory, for device tests without KVM: lays out the
/// descriptor table, available and used rings at <c>baseAddress</c>, programs a <see cref="SplitQueue"/> as the
/// transport would, publishes chains and reads completions. Descriptors are handed out round-robin.</summary>
public sealed class DriverQueue : IDisposable
{
    public const ushort FlagNext = 1, FlagWrite = 2, FlagIndirect = 4;

    private readonly GuestMemory _memory;
    private ushort _nextDescriptor;
    private ushort _availIndex;

    public DriverQueue(GuestMemory memory, ulong baseAddress, ushort size, ushort maxSize = 256)
    {
        _memory = memory;
        Size = size;
        DescriptorTable = baseAddress;
        AvailRing = baseAddress + 16UL * size;
        UsedRing = (AvailRing + 6 + 2UL * size + 3) & ~3UL;
        memory.Clear(new GuestAddress(baseAddress), UsedRing + 6 + 8UL * size - baseAddress);
        Queue = new SplitQueue(memory, maxSize)
        {
            Size = size,
            DescriptorTable = DescriptorTable,
            AvailRing = AvailRing,
            UsedRing = UsedRing,
            Enabled = true,
        };
        Assert.Null(Queue.Validate());
    }

    public ushort Size { get; }
    public ulong DescriptorTable { get; }
    public ulong AvailRing { get; }
    public ulong UsedRing { get; }
    public SplitQueue Queue { get; }
    public EventFd Kick { get; } = new();

    /// <summary>Writes descriptor <paramref name="index"/> as given (for hostile chains).</summary>
    public void WriteDescriptor(ushort index, ulong address, uint length, ushort flags, ushort next)
    {
        Span<byte> d = stackalloc byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(d, address);
        BinaryPrimitives.WriteUInt32LittleEndian(d[8..], length);
        BinaryPrimitives.WriteUInt16LittleEndian(d[12..], flags);
        BinaryPrimitives.WriteUInt16LittleEndian(d[14..], next);
        _memory.Write(new GuestAddress(DescriptorTable + 16UL * index), d);
    }

    /// <summary>Builds a chain of buffers (readable ones first) from free descriptors and publishes it; returns its head.</summary>
    public ushort AddChain(params (ulong Address, uint Length, bool Writable)[] buffers)
    {
        ushort head = _nextDescriptor;
        for (int i = 0; i < buffers.Length; i++)
        {
            ushort index = (ushort)((head + i) % Size);
            bool last = i == buffers.Length - 1;
            WriteDescriptor(index, buffers[i].Address, buffers[i].Length,
                (ushort)((last ? 0 : FlagNext) | (buffers[i].Writable ? FlagWrite : 0)), (ushort)((index + 1) % Size));
        }
        _nextDescriptor = (ushort)((head + buffers.Length) % Size);
        Publish(head);
        return head;
    }

    /// <summary>Puts <paramref name="head"/> in the available ring and advances its index (no kick).</summary>
    public void Publish(ushort head)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, head);
        _memory.Write(new GuestAddress(AvailRing + 4 + 2UL * (ulong)(_availIndex % Size)), b);
        Interlocked.MemoryBarrier();
        _availIndex++;
        BinaryPrimitives.WriteUInt16LittleEndian(b, _availIndex);
        _memory.Write(new GuestAddress(AvailRing + 2), b);
    }

    /// <summary>Reserves <paramref name="count"/> descriptors for hand-written chains; returns the first index.</summary>
    public ushort Reserve(int count)
    {
        ushort first = _nextDescriptor;
        _nextDescriptor = (ushort)((first + count) % Size);
        return first;
    }

    public ushort UsedIndex
    {
        get
        {
            Span<byte> b = stackalloc byte[2];
            _memory.Read(new GuestAddress(UsedRing + 2), b);
            return BinaryPrimitives.ReadUInt16LittleEndian(b);
        }
    }

    /// <summary>Used element <paramref name="i"/>: (descriptor head, bytes written).</summary>
    public (uint Id, uint Length) Used(int i)
    {
        Span<byte> b = stackalloc byte[8];
        _memory.Read(new GuestAddress(UsedRing + 4 + 8UL * (ulong)(i % Size)), b);
        return (BinaryPrimitives.ReadUInt32LittleEndian(b), BinaryPrimitives.ReadUInt32LittleEndian(b[4..]));
    }

    /// <summary>Waits until the device has completed at least <paramref name="count"/> requests in total.</summary>
    public bool WaitUsed(int count, TimeSpan? timeout = null)
    {
        var deadline = Stopwatch.StartNew();
        while ((ushort)(UsedIndex) < count)
        {
            if (deadline.Elapsed > (timeout ?? TimeSpan.FromSeconds(10)))
                return false;
            Thread.Sleep(2);
        }
        return true;
    }

    public void Dispose() => Kick.Dispose();

    /// <summary>A <see cref="VirtioContext"/> over these queues, as the transport builds it at DRIVER_OK.</summary>
    public static VirtioContext Context(GuestMemory memory, ulong features, IVirtioInterrupts interrupts, params DriverQueue[] queues) =>
        new(memory, features | (1UL << VirtioFeatures.Version1), [.. queues.Select(q => q.Queue)], [.. queues.Select(q => q.Kick)], interrupts);
}
