using System.Buffers.Binary;
using Vmm.Devices.Pci;

namespace Vmm.Devices.Vfio;

/// <summary>The MSI capability of a passed-through function, emulated in vmm's copy of configuration space (PCI 3.0
/// §6.8.1): the guest programs address, data, multiple-message enable and (if the device has it) per-vector masks
/// here; each enabled vector is a KVM route fed by an eventfd the device signals itself. Masking detaches the
/// eventfd (<see cref="IMsiVector.SetMasked"/>), and the pending bits read the eventfds' state.
/// Config accesses are serialized by the root bus, so this class takes no lock.</summary>
public sealed class VfioMsi
{
    private const ushort ControlEnable = 1, Control64Bit = 1 << 7, ControlPerVectorMask = 1 << 8;

    private readonly PciConfigSpace _config;
    private readonly IMsiVector[] _vectors;
    private readonly bool[] _masked;
    private readonly (ulong Address, uint Data)?[] _routed;
    private readonly int _addressHigh, _data, _mask, _pending;

    /// <summary>Emulates the device's MSI capability at <paramref name="offset"/> (its control word is
    /// <paramref name="deviceControl"/>) with at most <paramref name="irqCount"/> vectors (VFIO's MSI count).</summary>
    public VfioMsi(PciConfigSpace config, int offset, ushort deviceControl, uint irqCount, IMsiController controller, string owner)
    {
        _config = config;
        Offset = offset;
        Is64Bit = (deviceControl & Control64Bit) != 0;
        PerVectorMasking = (deviceControl & ControlPerVectorMask) != 0;
        // Multiple Message Capable is log2 of the vectors (at most 32); VFIO may offer fewer, in powers of two.
        int capable = Math.Min((deviceControl >> 1) & 7, 5);
        while (capable > 0 && (1u << capable) > irqCount)
            capable--;
        _vectors = new IMsiVector[1 << capable];
        _masked = new bool[_vectors.Length];
        _routed = new (ulong, uint)?[_vectors.Length];
        _addressHigh = Is64Bit ? 8 : 0;
        _data = Is64Bit ? 0xC : 8;
        _mask = PerVectorMasking ? _data + 4 : 0;
        _pending = PerVectorMasking ? _data + 8 : 0;
        Length = PerVectorMasking ? _data + 12 : _data + 2;

        Span<byte> body = stackalloc byte[Length - 2];
        Span<byte> writable = stackalloc byte[Length - 2];
        body.Clear();
        writable.Clear();
        ushort control = (ushort)((capable << 1) | (deviceControl & (Control64Bit | ControlPerVectorMask)));
        BinaryPrimitives.WriteUInt16LittleEndian(body, control);
        BinaryPrimitives.WriteUInt16LittleEndian(writable, ControlEnable | 0x70); // enable, Multiple Message Enable
        BinaryPrimitives.WriteUInt32LittleEndian(writable[2..], 0xFFFF_FFFC);   // message address (dword aligned)
        if (Is64Bit)
            BinaryPrimitives.WriteUInt32LittleEndian(writable[(_addressHigh - 2)..], 0xFFFF_FFFF);
        BinaryPrimitives.WriteUInt16LittleEndian(writable[(_data - 2)..], 0xFFFF);
        if (PerVectorMasking)
            BinaryPrimitives.WriteUInt32LittleEndian(writable[(_mask - 2)..], (uint)((1UL << _vectors.Length) - 1));
        config.PlaceCapability(offset, PciConfigSpace.CapabilityMsi, body, writable);

        for (int i = 0; i < _vectors.Length; i++)
        {
            _vectors[i] = controller.CreateVector(owner + " MSI", i);
            _vectors[i].SetMasked(true); // nothing is enabled yet
            _masked[i] = true;
        }
    }

    public int Offset { get; }

    /// <summary>Bytes of the capability (10 to 24, by 64-bit addressing and per-vector masking).</summary>
    public int Length { get; }

    public bool Is64Bit { get; }
    public bool PerVectorMasking { get; }

    /// <summary>The vectors the capability offers (Multiple Message Capable).</summary>
    public int VectorCount => _vectors.Length;

    private ushort Control => _config.Get16(Offset + 2);

    public bool Enabled => (Control & ControlEnable) != 0;

    /// <summary>The vectors the guest enabled (Multiple Message Enable, capped at what the capability offers).</summary>
    public int EnabledVectors => Math.Min(1 << ((Control >> 4) & 7), _vectors.Length);

    public IMsiVector Vector(int index) => _vectors[index];

    public bool Touches(int offset, int length) => offset < Offset + Length && offset + length > Offset;

    /// <summary>True when [offset, offset+length) reads the pending bits (refresh them first).</summary>
    public bool TouchesPending(int offset, int length) =>
        PerVectorMasking && offset < Offset + _pending + 4 && offset + length > Offset + _pending;

    /// <summary>Recomputes the pending bits from the masked vectors' eventfds.</summary>
    public void RefreshPending()
    {
        if (!PerVectorMasking)
            return;
        uint bits = 0;
        for (int i = 0; i < _vectors.Length; i++)
        {
            if (_masked[i] && _vectors[i].IsPending)
                bits |= 1u << i;
        }
        _config.Set32(Offset + _pending, bits);
    }

    /// <summary>After a guest write to the capability: routes the enabled vectors to (address, data with the vector
    /// number in its low bits, as Multiple Message Enable says) and attaches exactly the enabled, unmasked ones.</summary>
    public void Written()
    {
        bool enabled = Enabled;
        int count = EnabledVectors;
        ulong address = _config.Get32(Offset + 4) | (Is64Bit ? (ulong)_config.Get32(Offset + _addressHigh) << 32 : 0);
        uint data = _config.Get16(Offset + _data);
        uint maskBits = PerVectorMasking ? _config.Get32(Offset + _mask) : 0;
        for (int i = 0; i < _vectors.Length; i++)
        {
            bool masked = !enabled || i >= count || (maskBits & (1u << i)) != 0;
            if (!masked)
            {
                uint vectorData = (data & ~(uint)(count - 1)) | (uint)i;
                if (_routed[i] != (address, vectorData))
                {
                    _vectors[i].Configure(address, vectorData);
                    _routed[i] = (address, vectorData);
                }
            }
            if (masked != _masked[i])
            {
                _vectors[i].SetMasked(masked);
                _masked[i] = masked;
            }
        }
    }
}
