using System.Buffers.Binary;
using Vmm.Interop;

namespace Vmm.Devices.Pci;

/// <summary>How a device delivers one MSI/MSI-X message. The machine implements it with a KVM GSI route and an
/// irqfd, so <see cref="Trigger"/> is one eventfd write and no code of ours runs on a vCPU per interrupt.</summary>
public interface IMsiVector
{
    /// <summary>Points the vector at a new message (address, data). Rare: when the guest reprograms an entry.</summary>
    void Configure(ulong address, uint data);

    /// <summary>Sends the configured message. Allocation-free; callable from any thread.</summary>
    void Trigger();

    /// <summary>The eventfd whose signal is the interrupt (the irqfd). A passed-through device signals it itself
    /// (VFIO SET_IRQS), so no code of ours runs per interrupt.</summary>
    EventFd EventFd { get; }

    /// <summary>Masked: the eventfd is detached from the interrupt (irqfd deassigned), so signals accumulate in it;
    /// unmasked: attached again, and the kernel delivers what accumulated. Vectors start unmasked.</summary>
    void SetMasked(bool masked);

    /// <summary>The eventfd has been signalled and not delivered (only while masked): a passed-through vector's
    /// pending bit. Does not consume the signal.</summary>
    bool IsPending { get; }
}

/// <summary>Hands out MSI vectors for a device (one per MSI-X table entry).</summary>
public interface IMsiController
{
    IMsiVector CreateVector(string owner, int index);
}

/// <summary>The MSI-X capability, table and pending-bit array of one function (PCI Local Bus 3.0 §6.8.2).
/// The table and PBA live in a BAR; masking (per vector and function-wide) holds messages back as pending
/// bits and sends them when unmasked, as the spec requires.
/// In passthrough mode (a VFIO device) the device signals the vectors' eventfds itself: masking detaches a vector's
/// eventfd from its interrupt (<see cref="IMsiVector.SetMasked"/>) so signals wait in it, and the PBA reads
/// <see cref="IMsiVector.IsPending"/>; <see cref="Signal"/> just signals the eventfd (a virtio transport's config
/// interrupt while a vhost-user back-end signals the queue vectors).</summary>
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
    // Passthrough mode: the mask state each vector was last given (SetMasked), so only changes reach KVM.
    private readonly bool[]? _maskApplied;
    private readonly Lock _lock = new();

    /// <summary>Adds the MSI-X capability for <paramref name="count"/> vectors whose table is at
    /// <paramref name="tableOffset"/> and PBA at <paramref name="pbaOffset"/> of BAR <paramref name="bar"/>.</summary>
    public MsixTable(PciConfigSpace config, int count, int bar, uint tableOffset, uint pbaOffset, IMsiController controller, string owner)
        : this(config, count, bar, tableOffset, bar, pbaOffset, controller, owner, passthrough: false, capabilityOffset: 0)
    {
    }

    /// <summary>The general form: table and PBA may sit in different BARs; with <paramref name="passthrough"/> the
    /// vectors are driven by a device (see the class summary); a non-zero <paramref name="capabilityOffset"/> puts the
    /// capability there (its next pointer is the caller's) instead of appending it to the list.</summary>
    public MsixTable(PciConfigSpace config, int count, int tableBar, uint tableOffset, int pbaBar, uint pbaOffset,
        IMsiController controller, string owner, bool passthrough, int capabilityOffset)
    {
        if (count is < 1 or > 2048)
            throw new PciConfigException($"MSI-X: {count} vectors (1-2048 allowed)");
        if ((tableOffset & 7) != 0 || (pbaOffset & 7) != 0)
            throw new PciConfigException("MSI-X: table and PBA offsets must be 8-byte aligned");
        if ((uint)tableBar > 5 || (uint)pbaBar > 5)
            throw new PciConfigException($"MSI-X: table BAR{tableBar} / PBA BAR{pbaBar} (0-5 allowed)");
        _config = config;
        Count = count;
        Bar = tableBar;
        PbaBar = pbaBar;
        Passthrough = passthrough;
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
        BinaryPrimitives.WriteUInt32LittleEndian(body[2..], tableOffset | (uint)tableBar);
        BinaryPrimitives.WriteUInt32LittleEndian(body[6..], pbaOffset | (uint)pbaBar);
        Span<byte> writable = stackalloc byte[10];
        writable.Clear();
        BinaryPrimitives.WriteUInt16LittleEndian(writable, ControlEnable | ControlFunctionMask);
        if (capabilityOffset != 0)
        {
            config.PlaceCapability(capabilityOffset, PciConfigSpace.CapabilityMsix, body, writable);
            _capability = capabilityOffset;
        }
        else
            _capability = config.AddCapability(PciConfigSpace.CapabilityMsix, body, writable);
        if (passthrough)
        {
            _maskApplied = new bool[count];
            lock (_lock)
            {
                for (int i = 0; i < count; i++)
                    ApplyMaskLocked(i); // every entry starts masked and MSI-X off: detach them all
            }
        }
    }

    public int Count { get; }

    /// <summary>The BAR holding the table.</summary>
    public int Bar { get; }

    /// <summary>The BAR holding the PBA (usually <see cref="Bar"/>).</summary>
    public int PbaBar { get; }

    public bool Passthrough { get; }

    /// <summary>The capability's offset in configuration space.</summary>
    public int CapabilityOffset => _capability;

    /// <summary>Vector <paramref name="index"/>'s eventfd and routing.</summary>
    public IMsiVector Vector(int index) => _vectors[index];
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
                UpdateVectorLocked(i);
        }
    }

    public bool IsVectorMasked(int vector) =>
        (BinaryPrimitives.ReadUInt32LittleEndian(_table.AsSpan(vector * EntrySize + 12)) & VectorMasked) != 0;

    public bool IsPending(int vector) => _maskApplied is { } applied
        ? applied[vector] && _vectors[vector].IsPending
        : (_pending[vector / 64] & (1UL << (vector % 64))) != 0;

    /// <summary>Sends vector <paramref name="vector"/>, or records it pending while masked or MSI-X is off.
    /// Returns false for an out-of-range vector (e.g. the guest's VIRTIO_MSI_NO_VECTOR).</summary>
    public bool Signal(int vector)
    {
        if ((uint)vector >= (uint)Count)
            return false;
        if (_maskApplied is not null)
        {
            // Passthrough: the eventfd is the interrupt. Masked, it is detached and keeps the signal until unmasked.
            _vectors[vector].Trigger();
            return true;
        }
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
            UpdateVectorLocked(vector);
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
            if (_maskApplied is not null)
            {
                for (int i = 0; i < data.Length; i++)
                {
                    int first = ((int)offset + i) * 8;
                    byte bits = 0;
                    for (int b = 0; b < 8 && first + b < Count; b++)
                        bits |= (byte)(IsPending(first + b) ? 1 << b : 0);
                    data[i] = bits;
                }
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
            for (int i = 0; i < Count; i++)
                UpdateVectorLocked(i);
        }
    }

    private static bool Aligned(ulong offset, int length) => (length == 4 || length == 8) && offset % (ulong)length == 0;

    private void UpdateVectorLocked(int vector)
    {
        if (_maskApplied is not null)
            ApplyMaskLocked(vector);
        else
            DeliverPendingLocked(vector);
    }

    /// <summary>Passthrough: routes a vector that is about to be (or stays) unmasked to its current message, then
    /// attaches or detaches its eventfd; attaching delivers a signal that waited while masked.</summary>
    private void ApplyMaskLocked(int vector)
    {
        bool masked = !Enabled || FunctionMasked || IsVectorMasked(vector);
        if (!masked && _stale[vector])
        {
            var entry = _table.AsSpan(vector * EntrySize);
            _vectors[vector].Configure(BinaryPrimitives.ReadUInt64LittleEndian(entry), BinaryPrimitives.ReadUInt32LittleEndian(entry[8..]));
            _stale[vector] = false;
        }
        if (masked != _maskApplied![vector])
        {
            _vectors[vector].SetMasked(masked);
            _maskApplied[vector] = masked;
        }
    }

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
