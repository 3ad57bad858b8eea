using System.Buffers.Binary;

namespace Vmm.Devices.Pci;

/// <summary>What a base address register decodes.</summary>
public enum PciBarKind
{
    /// <summary>A 32-bit memory BAR: placed in the 32-bit window below 4 GiB.</summary>
    Memory32,
    /// <summary>A 64-bit memory BAR (uses this BAR register and the next one).</summary>
    Memory64,
}

/// <summary>One BAR as the device declares it: its register index, size (a power of two) and type.</summary>
public sealed record PciBar(int Index, ulong Size, PciBarKind Kind, bool Prefetchable)
{
    public override string ToString() =>
        $"BAR{Index} {(Kind == PciBarKind.Memory64 ? "64-bit" : "32-bit")}{(Prefetchable ? " prefetchable" : "")} memory, 0x{Size:x} bytes";
}

/// <summary>A bad device description (a VMM bug, not guest input).</summary>
public sealed class PciConfigException(string message) : Exception(message);

/// <summary>The 4 KiB PCI Express configuration space of one function (a type 0 header): the bytes, a mask of the
/// bits the guest may write, and a mask of write-1-to-clear status bits. BARs answer sizing probes (all-ones
/// writes read back the size mask) because only their address bits are writable. Accesses come from vCPU threads
/// through <see cref="PciRootBus"/>, which serializes them.</summary>
public sealed class PciConfigSpace
{
    public const int Size = 4096;
    public const int LegacySize = 256;

    // Type 0 header offsets.
    public const int VendorId = 0x00, DeviceId = 0x02, Command = 0x04, Status = 0x06, RevisionId = 0x08,
        ProgIf = 0x09, SubClass = 0x0A, ClassCode = 0x0B, HeaderType = 0x0E, Bar0 = 0x10,
        SubsystemVendorId = 0x2C, SubsystemId = 0x2E, ExpansionRom = 0x30, CapabilitiesPointer = 0x34,
        InterruptLine = 0x3C, InterruptPin = 0x3D;

    /// <summary>The expansion ROM BAR (register 0x30) counts as BAR index 6 in <see cref="Bars"/>,
    /// <see cref="BarAddress"/>, <see cref="SetBarAddress"/> and <see cref="PciFunction.BarRead"/>.</summary>
    public const int RomBarIndex = 6;
    private const uint RomEnable = 1, RomAddressMask = 0xFFFF_F800;

    public const ushort CommandIoSpace = 1 << 0, CommandMemorySpace = 1 << 1, CommandBusMaster = 1 << 2,
        CommandInterruptDisable = 1 << 10;
    public const ushort StatusInterrupt = 1 << 3, StatusCapabilities = 1 << 4;

    public const byte CapabilityMsi = 0x05, CapabilityVendor = 0x09, CapabilityPciExpress = 0x10, CapabilityMsix = 0x11;

    private readonly byte[] _bytes = new byte[Size];
    private readonly byte[] _writable = new byte[Size];
    private readonly byte[] _writeOneToClear = new byte[Size];
    private readonly PciBar?[] _bars = new PciBar?[7]; // BAR0-5 and the expansion ROM
    private int _lastCapability;
    private int _nextCapabilityOffset = 0x40;

    public PciConfigSpace(ushort vendorId, ushort deviceId, byte classCode, byte subClass, byte progIf = 0,
        byte revision = 0, ushort subsystemVendorId = 0, ushort subsystemId = 0)
    {
        Set16(VendorId, vendorId);
        Set16(DeviceId, deviceId);
        _bytes[RevisionId] = revision;
        _bytes[ProgIf] = progIf;
        _bytes[SubClass] = subClass;
        _bytes[ClassCode] = classCode;
        Set16(SubsystemVendorId, subsystemVendorId);
        Set16(SubsystemId, subsystemId);
        // Command: I/O, memory, bus master and INTx disable; vmm has no I/O BARs but guests may toggle the bit.
        SetWritable(Command, 2, CommandIoSpace | CommandMemorySpace | CommandBusMaster | CommandInterruptDisable);
        _writable[InterruptLine] = 0xFF;
    }

    public IReadOnlyList<PciBar> Bars => _bars.OfType<PciBar>().ToList();

    public ushort CommandRegister => Get16(Command);

    public bool MemoryDecodeEnabled => (CommandRegister & CommandMemorySpace) != 0;

    public bool BusMasterEnabled => (CommandRegister & CommandBusMaster) != 0;

    public bool InterruptDisabled => (CommandRegister & CommandInterruptDisable) != 0;

    /// <summary>The expansion ROM's enable bit: the ROM decodes only with it and memory decode both on.</summary>
    public bool RomEnabled => (Get32(ExpansionRom) & RomEnable) != 0;

    /// <summary>Whether BAR <paramref name="index"/> decodes when memory decode is on (the ROM also needs its enable bit).</summary>
    public bool BarEnabled(int index) => index != RomBarIndex || RomEnabled;

    /// <summary>Declares BAR <paramref name="index"/> (a 64-bit BAR also takes index + 1).</summary>
    public PciBar AddBar(int index, ulong size, PciBarKind kind, bool prefetchable = false)
    {
        int registers = kind == PciBarKind.Memory64 ? 2 : 1;
        if (index < 0 || index + registers > 6)
            throw new PciConfigException($"BAR{index}: index out of range for a {kind} BAR");
        if (size < 16 || (size & (size - 1)) != 0)
            throw new PciConfigException($"BAR{index}: size 0x{size:x} is not a power of two of at least 16 bytes");
        if (kind == PciBarKind.Memory32 && size > 1UL << 31)
            throw new PciConfigException($"BAR{index}: 0x{size:x} bytes do not fit a 32-bit BAR");
        for (int i = index; i < index + registers; i++)
        {
            if (_bars[i] is not null || (i > 0 && _bars[i - 1]?.Kind == PciBarKind.Memory64))
                throw new PciConfigException($"BAR{index}: register {i} is already in use");
        }
        var bar = new PciBar(index, size, kind, prefetchable);
        _bars[index] = bar;
        uint flags = (kind == PciBarKind.Memory64 ? 0b100u : 0) | (prefetchable ? 0b1000u : 0);
        int offset = Bar0 + 4 * index;
        Set32(offset, flags);
        ulong mask = ~(size - 1);
        SetWritable(offset, 4, (uint)mask & ~0xFu);
        if (kind == PciBarKind.Memory64)
            SetWritable(offset + 4, 4, (uint)(mask >> 32));
        return bar;
    }

    /// <summary>Declares the expansion ROM BAR (PCI 3.0 §6.2.5.2): <paramref name="size"/> a power of two of at least
    /// 2 KiB; address bits and the enable bit are writable, so sizing probes read back the size mask.</summary>
    public PciBar AddRomBar(ulong size)
    {
        if (size < 2048 || (size & (size - 1)) != 0 || size > 1UL << 31)
            throw new PciConfigException($"expansion ROM: size 0x{size:x} is not a power of two from 2 KiB to 2 GiB");
        if (_bars[RomBarIndex] is not null)
            throw new PciConfigException("expansion ROM: already declared");
        var bar = new PciBar(RomBarIndex, size, PciBarKind.Memory32, Prefetchable: false);
        _bars[RomBarIndex] = bar;
        Set32(ExpansionRom, 0);
        SetWritable(ExpansionRom, 4, ((uint)~(size - 1) & RomAddressMask) | RomEnable);
        return bar;
    }

    /// <summary>The guest-physical address BAR <paramref name="index"/> is programmed to.</summary>
    public ulong BarAddress(int index)
    {
        var bar = _bars[index] ?? throw new PciConfigException($"BAR{index} is not implemented");
        if (index == RomBarIndex)
            return Get32(ExpansionRom) & RomAddressMask;
        ulong low = Get32(Bar0 + 4 * index) & ~0xFu;
        return bar.Kind == PciBarKind.Memory64 ? low | ((ulong)Get32(Bar0 + 4 * index + 4) << 32) : low;
    }

    /// <summary>Programs BAR <paramref name="index"/> (the VMM's placement; the guest may move it later).</summary>
    public void SetBarAddress(int index, ulong address)
    {
        var bar = _bars[index] ?? throw new PciConfigException($"BAR{index} is not implemented");
        if ((address & (bar.Size - 1)) != 0)
            throw new PciConfigException($"BAR{index}: 0x{address:x} is not aligned to its size 0x{bar.Size:x}");
        // Checked before anything is written: a refused address must leave the BAR as it was.
        if (bar.Kind == PciBarKind.Memory32 && address >> 32 != 0)
            throw new PciConfigException($"BAR{index}: 0x{address:x} is above 4 GiB for a 32-bit BAR");
        if (index == RomBarIndex)
        {
            Set32(ExpansionRom, (Get32(ExpansionRom) & RomEnable) | (uint)address);
            return;
        }
        int offset = Bar0 + 4 * index;
        Set32(offset, (Get32(offset) & 0xFu) | (uint)address);
        if (bar.Kind == PciBarKind.Memory64)
            Set32(offset + 4, (uint)(address >> 32));
    }

    public void SetInterruptPin(byte pin) => _bytes[InterruptPin] = pin;

    public void SetInterruptLine(byte line) => _bytes[InterruptLine] = line;

    /// <summary>Appends a capability to the list in the legacy 256 bytes. <paramref name="body"/> is everything after
    /// the ID and next-pointer bytes; <paramref name="writableBody"/>, if given, is its write mask. Returns the offset.</summary>
    public int AddCapability(byte id, ReadOnlySpan<byte> body, ReadOnlySpan<byte> writableBody = default)
    {
        int length = (2 + body.Length + 3) & ~3;
        int offset = _nextCapabilityOffset;
        if (offset + length > LegacySize)
            throw new PciConfigException($"capability 0x{id:x2} ({body.Length + 2} bytes) does not fit in configuration space");
        _bytes[offset] = id;
        _bytes[offset + 1] = 0;
        body.CopyTo(_bytes.AsSpan(offset + 2));
        if (!writableBody.IsEmpty)
            writableBody.CopyTo(_writable.AsSpan(offset + 2));
        if (_lastCapability == 0)
            _bytes[CapabilitiesPointer] = (byte)offset;
        else
            _bytes[_lastCapability + 1] = (byte)offset;
        _lastCapability = offset;
        _nextCapabilityOffset = offset + length;
        Set16(Status, (ushort)(Get16(Status) | StatusCapabilities));
        return offset;
    }

    /// <summary>Writes a capability at a fixed <paramref name="offset"/> without linking it: for functions that lay
    /// out the chain themselves (a passed-through device keeps its own offsets). The next pointer is left as is.</summary>
    public void PlaceCapability(int offset, byte id, ReadOnlySpan<byte> body, ReadOnlySpan<byte> writableBody = default)
    {
        if (offset < 0x40 || offset + 2 + body.Length > Size || (offset < LegacySize && offset + 2 + body.Length > LegacySize))
            throw new PciConfigException($"capability 0x{id:x2} ({body.Length + 2} bytes) does not fit at 0x{offset:x}");
        _bytes[offset] = id;
        body.CopyTo(_bytes.AsSpan(offset + 2));
        _writable.AsSpan(offset + 2, body.Length).Clear();
        if (!writableBody.IsEmpty)
            writableBody.CopyTo(_writable.AsSpan(offset + 2));
    }

    /// <summary>The offset of the first capability with <paramref name="id"/>, or 0.</summary>
    public int FindCapability(byte id)
    {
        int offset = _bytes[CapabilitiesPointer];
        for (int hops = 0; offset != 0 && hops < 48; hops++)
        {
            if (_bytes[offset] == id)
                return offset;
            offset = _bytes[offset + 1];
        }
        return 0;
    }

    /// <summary>Guest read: <paramref name="offset"/> + length must lie inside the 4 KiB (checked by the caller).</summary>
    public void Read(int offset, Span<byte> data) => _bytes.AsSpan(offset, data.Length).CopyTo(data);

    /// <summary>Guest write: only writable bits change; write-1-to-clear bits clear where ones are written.</summary>
    public void Write(int offset, ReadOnlySpan<byte> data)
    {
        for (int i = 0; i < data.Length; i++)
        {
            int at = offset + i;
            byte w = _writable[at];
            byte value = (byte)((_bytes[at] & ~w) | (data[i] & w));
            value &= (byte)~(data[i] & _writeOneToClear[at]);
            _bytes[at] = value;
        }
    }

    /// <summary>True when [offset, offset+length) touches a BAR register or the expansion ROM BAR.</summary>
    public static bool TouchesBars(int offset, int length) =>
        offset < Bar0 + 24 && offset + length > Bar0 || offset < ExpansionRom + 4 && offset + length > ExpansionRom;

    public static bool TouchesCommand(int offset, int length) => offset < Command + 2 && offset + length > Command;

    // Device-side accessors (no masks).
    public byte Get8(int offset) => _bytes[offset];

    public ushort Get16(int offset) => BinaryPrimitives.ReadUInt16LittleEndian(_bytes.AsSpan(offset));

    public uint Get32(int offset) => BinaryPrimitives.ReadUInt32LittleEndian(_bytes.AsSpan(offset));

    public void Set8(int offset, byte value) => _bytes[offset] = value;

    public void Set16(int offset, ushort value) => BinaryPrimitives.WriteUInt16LittleEndian(_bytes.AsSpan(offset), value);

    public void Set32(int offset, uint value) => BinaryPrimitives.WriteUInt32LittleEndian(_bytes.AsSpan(offset), value);

    public void SetWritable(int offset, int length, uint mask)
    {
        for (int i = 0; i < length; i++)
            _writable[offset + i] = (byte)(mask >> (8 * i));
    }

    public void SetWriteOneToClear(int offset, int length, uint mask)
    {
        for (int i = 0; i < length; i++)
            _writeOneToClear[offset + i] = (byte)(mask >> (8 * i));
    }
}
