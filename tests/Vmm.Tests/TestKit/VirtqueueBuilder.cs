using System.Buffers.Binary;
using Vmm.Devices.Virtio;
using Vmm.Memory;

namespace Vmm.Tests.TestKit;

/// <summary>The driver side of a split virtqueue (virtio 1.2 §2.7) for tests: lays out a descriptor table, an
/// available ring and a used ring in guest memory, allocates data buffers and indirect tables after them, adds
/// chains (direct and indirect) and publishes them. Raw writers let a test build any hostile ring it likes.</summary>
public sealed class VirtqueueBuilder
{
    public const ushort Next = 1, Write = 2, Indirect = 4;

    private readonly GuestMemory _memory;
    private ushort _nextDescriptor;
    private ulong _nextData;

    /// <summary>A ring of <paramref name="size"/> entries whose descriptor table starts at <paramref name="ringBase"/>;
    /// buffers are handed out from <paramref name="dataBase"/> on.</summary>
    public VirtqueueBuilder(GuestMemory memory, ushort size, ulong ringBase = 0x10000, ulong dataBase = 0x100000)
    {
        _memory = memory;
        Size = size;
        DescriptorTable = ringBase;
        AvailRing = DescriptorTable + 16UL * size;
        UsedRing = (AvailRing + 6 + 2UL * size + 3) & ~3UL;
        _nextData = dataBase;
        memory.Clear(new GuestAddress(DescriptorTable), UsedRing + 6 + 8UL * size - DescriptorTable);
    }

    public ushort Size { get; }
    public ulong DescriptorTable { get; }
    public ulong AvailRing { get; }
    public ulong UsedRing { get; }

    /// <summary>The driver's next available index (what it last published).</summary>
    public ushort AvailIdx
    {
        get => ReadU16(AvailRing + 2);
        set => WriteU16(AvailRing + 2, value);
    }

    public ushort AvailFlags
    {
        get => ReadU16(AvailRing);
        set => WriteU16(AvailRing, value);
    }

    /// <summary>used_event (VIRTIO_F_EVENT_IDX): interrupt me once the used index passes this.</summary>
    public ushort UsedEvent
    {
        get => ReadU16(AvailRing + 4 + 2UL * Size);
        set => WriteU16(AvailRing + 4 + 2UL * Size, value);
    }

    public ushort UsedIdx => ReadU16(UsedRing + 2);

    /// <summary>avail_event (VIRTIO_F_EVENT_IDX): the device wants a kick once the available index passes this.</summary>
    public ushort AvailEvent => ReadU16(UsedRing + 4 + 8UL * Size);

    /// <summary>Used ring element <paramref name="slot"/> (taken modulo the size).</summary>
    public (uint Id, uint Length) UsedElement(int slot)
    {
        ulong at = UsedRing + 4 + 8UL * (ulong)(slot % Size);
        return (_memory.ReadObj<uint>(new GuestAddress(at)), _memory.ReadObj<uint>(new GuestAddress(at + 4)));
    }

    /// <summary>A queue programmed with this ring, enabled, with the given negotiated features.</summary>
    public SplitQueue CreateQueue(ushort? maxSize = null, bool eventIdx = false, bool indirect = false)
    {
        var queue = new SplitQueue(_memory, maxSize ?? Size);
        Program(queue);
        queue.EventIdx = eventIdx;
        queue.IndirectDescriptors = indirect;
        queue.Enabled = true;
        return queue;
    }

    /// <summary>Writes this ring's size and addresses into <paramref name="queue"/>.</summary>
    public void Program(SplitQueue queue)
    {
        queue.Size = Size;
        queue.DescriptorTable = DescriptorTable;
        queue.AvailRing = AvailRing;
        queue.UsedRing = UsedRing;
    }

    /// <summary>A fresh, 16-byte aligned data area of <paramref name="length"/> bytes.</summary>
    public ulong Allocate(ulong length)
    {
        ulong at = _nextData;
        _nextData = (_nextData + Math.Max(length, 1) + 15) & ~15UL;
        return at;
    }

    /// <summary>The next free descriptor index (handed out round-robin, like a driver recycling its table).</summary>
    public ushort AllocateDescriptor()
    {
        ushort index = _nextDescriptor;
        _nextDescriptor = (ushort)((_nextDescriptor + 1) % Size);
        return index;
    }

    /// <summary>Writes descriptor <paramref name="index"/> of the table at <paramref name="table"/> (default: the ring's).</summary>
    public void WriteDescriptor(ushort index, ulong address, uint length, ushort flags, ushort next = 0, ulong? table = null)
    {
        Span<byte> d = stackalloc byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(d, address);
        BinaryPrimitives.WriteUInt32LittleEndian(d[8..], length);
        BinaryPrimitives.WriteUInt16LittleEndian(d[12..], flags);
        BinaryPrimitives.WriteUInt16LittleEndian(d[14..], next);
        _memory.Write(new GuestAddress((table ?? DescriptorTable) + 16UL * index), d);
    }

    /// <summary>Puts <paramref name="head"/> in the next available slot and publishes it.</summary>
    public void Publish(ushort head)
    {
        ushort idx = AvailIdx;
        WriteU16(AvailRing + 4 + 2UL * (ulong)(idx % Size), head);
        AvailIdx = (ushort)(idx + 1);
    }

    /// <summary>Adds a chain of direct descriptors for <paramref name="buffers"/> and publishes it; returns the head.</summary>
    public ushort AddChain(params (ulong Address, uint Length, bool Writable)[] buffers)
    {
        ushort head = WriteChain(buffers);
        Publish(head);
        return head;
    }

    /// <summary>Adds a chain of freshly allocated buffers of the given lengths: readable ones, then writable ones.</summary>
    public ushort AddChain(uint[] readable, uint[] writable) =>
        AddChain([.. readable.Select(l => (Allocate(l), l, false)), .. writable.Select(l => (Allocate(l), l, true))]);

    /// <summary>Writes the linked descriptors of a chain without publishing it; returns the head.</summary>
    public ushort WriteChain(params (ulong Address, uint Length, bool Writable)[] buffers)
    {
        var indices = buffers.Select(_ => AllocateDescriptor()).ToArray();
        for (int i = 0; i < buffers.Length; i++)
        {
            bool last = i == buffers.Length - 1;
            ushort flags = (ushort)((buffers[i].Writable ? Write : 0) | (last ? 0 : Next));
            WriteDescriptor(indices[i], buffers[i].Address, buffers[i].Length, flags, last ? (ushort)0 : indices[i + 1]);
        }
        return indices[0];
    }

    /// <summary>Writes <paramref name="buffers"/> as an indirect table (allocated in the data area), points one
    /// INDIRECT descriptor at it and publishes that; returns the head.</summary>
    public ushort AddIndirectChain(params (ulong Address, uint Length, bool Writable)[] buffers)
    {
        ulong table = WriteIndirectTable(buffers);
        ushort head = AllocateDescriptor();
        WriteDescriptor(head, table, (uint)(16 * buffers.Length), Indirect);
        Publish(head);
        return head;
    }

    /// <summary>Writes an indirect table for <paramref name="buffers"/> linked 0 → 1 → ...; returns its address.</summary>
    public ulong WriteIndirectTable(params (ulong Address, uint Length, bool Writable)[] buffers)
    {
        ulong table = Allocate(16UL * (ulong)buffers.Length);
        for (int i = 0; i < buffers.Length; i++)
        {
            bool last = i == buffers.Length - 1;
            ushort flags = (ushort)((buffers[i].Writable ? Write : 0) | (last ? 0 : Next));
            WriteDescriptor((ushort)i, buffers[i].Address, buffers[i].Length, flags, last ? (ushort)0 : (ushort)(i + 1), table);
        }
        return table;
    }

    private ushort ReadU16(ulong address) => _memory.ReadObj<ushort>(new GuestAddress(address));

    private void WriteU16(ulong address, ushort value) => _memory.WriteObj(new GuestAddress(address), value);
}
