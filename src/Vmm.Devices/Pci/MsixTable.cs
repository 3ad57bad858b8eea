using System.Buffers.Binary;

namespace Vmm.Devices.Pci;

/// <summary>How a device delivers one MSI/MSI-X message. The machine implements it with a KVM GSI route and an
/// irqfd, so <see cref="Trigger"/> is one eventfd write and no code of ours runs on a vCPU per interrupt.</summary>
public interface IMsiVector
{
    /// <summary>Points the vector at a new message (address, data). Rare: when the guest reprograms an entry.</summary>
    void Configure(ulong address, uint data);

    /// <summary>Sends the configured message. Allocation-free; callable from any thread.</summary>
    void Trigger();
}

/// <summary>Hands out MSI vectors for a device (one per MSI-X table entry).</summary>
public interface IMsiController
{
    IMsiVector CreateVector(string owner, int index);
}

/// <summary>The MSI-X capability, table and pending-bit array of one function (PCI Local Bus 3.0 §6.8.2).
/// The table and PBA live in a BAR; masking (per vector and function-wide) holds messages back as pending
/// bits and sends them when unmasked, as the spec requires.</summary>
public sealed class MsixTable
{
    public const int EntrySize = 16;
    private const uint VectorMasked = 1;
    private const ushort ControlEnable = 1 << 15, ControlFunctionMask = 1 << 14;

    private readonly PciConfigSpace _config;
    private readonly int _capability;
    private readonly IMsiVector[] _vectors;
    private readonly byte[] _table;
    private readonly ulong[] _pending;
    private readonly bool[] _stale;
    private readonly Lock _lock = new();

    /// <summary>Adds the MSI-X capability for <paramref name="count"/> vectors whose table is at
    /// <paramref name="tableOffset"/> and PBA at <paramref name="pbaOffset"/> of BAR <paramref name="bar"/>.</summary>
    public MsixTable(PciConfigSpace config, int count, int bar, uint tableOffset, uint pbaOffset, IMsiController controller, string owner)
    {
        if (count is < 1 or > 2048)
            throw new PciConfigException($"MSI-X: {count} vectors (1-2048 allowed)");
        if ((tableOffset & 7) != 0 || (pbaOffset & 7) != 0)
            throw new PciConfigException("MSI-X: table and PBA offsets must be 8-byte aligned");
        _config = config;
        Count = count;
        Bar = bar;
        TableOffset = tableOffset;
        PbaOffset = pbaOffset;
        _table = new byte[count * EntrySize];
        for (int i = 0; i < count; i++)
            BinaryPrimitives.WriteUInt32LittleEndian(_table.AsSpan(i * EntrySize + 12), VectorMasked); // masked at reset
        _pending = new ulong[(count + 63) / 64];
        _stale = new bool[count];
        Array.Fill(_stale, true);
        _vectors = new IMsiVector[count];
        for (int i = 0; i < count; i++)
            _vectors[i] = controller.CreateVector(owner, i);
        Span<byte> body = stackalloc byte[10];
        BinaryPrimitives.WriteUInt16LittleEndian(body, (ushort)(count - 1));
        BinaryPrimitives.WriteUInt32LittleEndian(body[2..], tableOffset | (uint)bar);
        BinaryPrimitives.WriteUInt32LittleEndian(body[6..], pbaOffset | (uint)bar);
        Span<byte> writable = stackalloc byte[10];
        BinaryPrimitives.WriteUInt16LittleEndian(writable, ControlEnable | ControlFunctionMask);
        _capability = config.AddCapability(PciConfigSpace.CapabilityMsix, body, writable);
    }

    public int Count { get; }
    public int Bar { get; }
    public uint TableOffset { get; }
    public uint PbaOffset { get; }
    public int TableLength => Count * EntrySize;
    public int PbaLength => _pending.Length * 8;

    private ushort Control => _config.Get16(_capability + 2);

    public bool Enabled => (Control & ControlEnable) != 0;

    private bool FunctionMasked => (Control & ControlFunctionMask) != 0;

    /// <summary>True when [offset, offset+length) of the capability's registers was written.</summary>
    public bool TouchesCapability(int offset, int length) => offset < _capability + 12 && offset + length > _capability;

    /// <summary>Call after a config write to the capability: unmasking releases pending messages.</summary>
    public void ControlWritten()
    {
        lock (_lock)
        {
            for (int i = 0; i < Count; i++)
                DeliverPendingLocked(i);
        }
    }

    public bool IsVectorMasked(int vector) =>
        (BinaryPrimitives.ReadUInt32LittleEndian(_table.AsSpan(vector * EntrySize + 12)) & VectorMasked) != 0;

    public bool IsPending(int vector) => (_pending[vector / 64] & (1UL << (vector % 64))) != 0;

    /// <summary>Sends vector <paramref name="vector"/>, or records it pending while masked or MSI-X is off.
    /// Returns false for an out-of-range vector (e.g. the guest's VIRTIO_MSI_NO_VECTOR).</summary>
    public bool Signal(int vector)
    {
        if ((uint)vector >= (uint)Count)
            return false;
        lock (_lock)
        {
            if (!Enabled || FunctionMasked || IsVectorMasked(vector))
            {
                _pending[vector / 64] |= 1UL << (vector % 64);
                return true;
            }
            SendLocked(vector);
        }
        return true;
    }

    public void ReadTable(ulong offset, Span<byte> data)
    {
        lock (_lock)
        {
            if (offset + (ulong)data.Length > (ulong)_table.Length || !Aligned(offset, data.Length))
            {
                data.Fill(0xFF);
                return;
            }
            _table.AsSpan((int)offset, data.Length).CopyTo(data);
        }
    }

    public void WriteTable(ulong offset, ReadOnlySpan<byte> data)
    {
        lock (_lock)
        {
            if (offset + (ulong)data.Length > (ulong)_table.Length || !Aligned(offset, data.Length))
                return;
            int vector = (int)offset / EntrySize;
            data.CopyTo(_table.AsSpan((int)offset));
            if ((int)offset % EntrySize < 12 || data.Length == 8 && (int)offset % EntrySize == 8)
                _stale[vector] = true; // address or data changed: reroute before the next send
            DeliverPendingLocked(vector);
        }
    }

    public void ReadPba(ulong offset, Span<byte> data)
    {
        lock (_lock)
        {
            if (offset + (ulong)data.Length > (ulong)PbaLength || !Aligned(offset, data.Length))
            {
                data.Fill(0xFF);
                return;
            }
            Span<byte> bytes = stackalloc byte[8];
            for (int i = 0; i < data.Length; i++)
            {
                int at = (int)offset + i;
                BinaryPrimitives.WriteUInt64LittleEndian(bytes, _pending[at / 8]);
                data[i] = bytes[at % 8];
            }
        }
    }

    /// <summary>Device reset: every vector masked, nothing pending, MSI-X off.</summary>
    public void Reset()
    {
        lock (_lock)
        {
            Array.Clear(_table);
            for (int i = 0; i < Count; i++)
            {
                BinaryPrimitives.WriteUInt32LittleEndian(_table.AsSpan(i * EntrySize + 12), VectorMasked);
                _stale[i] = true;
            }
            Array.Clear(_pending);
            _config.Set16(_capability + 2, (ushort)(Count - 1));
        }
    }

    private static bool Aligned(ulong offset, int length) => (length == 4 || length == 8) && offset % (ulong)length == 0;

    private void DeliverPendingLocked(int vector)
    {
        if (IsPending(vector) && Enabled && !FunctionMasked && !IsVectorMasked(vector))
        {
            _pending[vector / 64] &= ~(1UL << (vector % 64));
            SendLocked(vector);
        }
    }

    private void SendLocked(int vector)
    {
        if (_stale[vector])
        {
            var entry = _table.AsSpan(vector * EntrySize);
            ulong address = BinaryPrimitives.ReadUInt64LittleEndian(entry);
            uint data = BinaryPrimitives.ReadUInt32LittleEndian(entry[8..]);
            _vectors[vector].Configure(address, data);
            _stale[vector] = false;
        }
        _vectors[vector].Trigger();
    }
}
