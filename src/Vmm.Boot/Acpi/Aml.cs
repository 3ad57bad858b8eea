using System.Buffers.Binary;
using System.Text;

namespace Vmm.Boot.Acpi;

/// <summary>Just enough hand-encoded AML (ACPI 6.4, chapter 20) for vmm's DSDT: names, scopes, devices,
/// integers, strings, packages and buffers; methods with the few statements PCI hotplug needs (If, Store, Notify,
/// And, ShiftLeft, LEqual, LAnd, method calls, Local and Arg objects); operation regions and their fields. Each helper
/// returns the encoded term; callers concatenate them.</summary>
public static class Aml
{
    // ACPI 6.4, 20.2: opcodes and prefixes.
    private const byte ZeroOp = 0x00, OneOp = 0x01, NameOp = 0x08, BytePrefix = 0x0A, WordPrefix = 0x0B,
        DWordPrefix = 0x0C, QWordPrefix = 0x0E, ScopeOp = 0x10, BufferOp = 0x11, PackageOp = 0x12,
        DualNamePrefix = 0x2E, MultiNamePrefix = 0x2F, RootChar = (byte)'\\', ExtOpPrefix = 0x5B, DeviceOp = 0x82,
        StringPrefix = 0x0D, MethodOp = 0x14, Local0Op = 0x60, Arg0Op = 0x68, StoreOp = 0x70, ShiftLeftOp = 0x79, AndOp = 0x7B,
        NotifyOp = 0x86, LAndOp = 0x90, LEqualOp = 0x93, IfOp = 0xA0, NullName = 0x00, OpRegionOp = 0x80, FieldOp = 0x81;

    /// <summary>Operation region spaces (ACPI 6.4, 19.6.100).</summary>
    public enum RegionSpace : byte { SystemMemory = 0, SystemIo = 1 }

    /// <summary>Field access types (the low nibble of FieldFlags; 19.6.48).</summary>
    public enum FieldAccess : byte { Any = 0, Byte = 1, Word = 2, DWord = 3, QWord = 4 }

    /// <summary>Notify values (ACPI 6.4, 5.6.6): what <see cref="Notify"/> tells the OS about a device.</summary>
    public const byte DeviceCheck = 1, EjectRequest = 3;

    /// <summary>"text": a null-terminated ASCII string constant.</summary>
    public static byte[] String(string text) => [StringPrefix, .. Encoding.ASCII.GetBytes(text), 0];

    /// <summary>Method(<paramref name="name"/>, <paramref name="argCount"/>, NotSerialized) { <paramref name="terms"/> }.
    /// <paramref name="serialized"/> makes the OS run one invocation at a time (MethodFlags bit 3).</summary>
    public static byte[] Method(string name, int argCount, bool serialized, params byte[][] terms)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)argCount, 7u, nameof(argCount));
        return [MethodOp, .. Sized([.. NameString(name), (byte)(argCount | (serialized ? 0x08 : 0)), .. Concat(terms)])];
    }

    /// <summary>If (<paramref name="predicate"/>) { <paramref name="terms"/> }.</summary>
    public static byte[] If(byte[] predicate, params byte[][] terms) => [IfOp, .. Sized([.. predicate, .. Concat(terms)])];

    /// <summary>Store(<paramref name="value"/>, <paramref name="target"/>): target = value.</summary>
    public static byte[] Store(byte[] value, byte[] target) => [StoreOp, .. value, .. target];

    /// <summary>Notify(<paramref name="device"/>, <paramref name="value"/>).</summary>
    public static byte[] Notify(string device, byte value) => [NotifyOp, .. NameString(device), .. Integer(value)];

    /// <summary>And(<paramref name="a"/>, <paramref name="b"/>) with no target: the bitwise and as a value.</summary>
    public static byte[] And(byte[] a, byte[] b) => [AndOp, .. a, .. b, NullName];

    /// <summary>ShiftLeft(<paramref name="value"/>, <paramref name="count"/>) with no target.</summary>
    public static byte[] ShiftLeft(byte[] value, byte[] count) => [ShiftLeftOp, .. value, .. count, NullName];

    /// <summary>LEqual(<paramref name="a"/>, <paramref name="b"/>): a == b.</summary>
    public static byte[] LEqual(byte[] a, byte[] b) => [LEqualOp, .. a, .. b];

    /// <summary>LAnd(<paramref name="a"/>, <paramref name="b"/>): a &amp;&amp; b.</summary>
    public static byte[] LAnd(byte[] a, byte[] b) => [LAndOp, .. a, .. b];

    /// <summary>Local0 .. Local7.</summary>
    public static byte[] Local(int index)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)index, 7u, nameof(index));
        return [(byte)(Local0Op + index)];
    }

    /// <summary>Arg0 .. Arg6.</summary>
    public static byte[] Arg(int index)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)index, 6u, nameof(index));
        return [(byte)(Arg0Op + index)];
    }

    /// <summary>A method invocation, <paramref name="method"/>(<paramref name="args"/>): the name, then the arguments
    /// (the OS knows how many from the method's definition, which must come first in the table).</summary>
    public static byte[] Call(string method, params byte[][] args) => [.. NameString(method), .. Concat(args)];

    /// <summary>A reference to a named object (a field unit, a device) as an operand or a target.</summary>
    public static byte[] Ref(string name) => NameString(name);

    /// <summary>OperationRegion(<paramref name="name"/>, <paramref name="space"/>, offset, length).</summary>
    public static byte[] OperationRegion(string name, RegionSpace space, ulong offset, ulong length) =>
        [ExtOpPrefix, OpRegionOp, .. NameString(name), (byte)space, .. Integer(offset), .. Integer(length)];

    /// <summary>Field(<paramref name="region"/>, <paramref name="access"/>, NoLock, WriteAsZeros) { name, bits, ... }:
    /// consecutive named fields from offset 0 of the region (each name one segment).</summary>
    public static byte[] Field(string region, FieldAccess access, params (string Name, int Bits)[] fields)
    {
        var list = new List<byte>();
        foreach (var (name, bits) in fields)
        {
            if (name.Length is 0 or > 4 || name.Contains('.'))
                throw new ArgumentException($"AML field name \"{name}\" is not one 1-4 character segment", nameof(fields));
            list.AddRange(Encoding.ASCII.GetBytes(name.PadRight(4, '_')));
            list.AddRange(FieldLength(bits));
        }
        // FieldFlags: AccessType bits 0-3, LockRule bit 4 (0 NoLock), UpdateRule bits 5-6 (2 WriteAsZeros).
        return [ExtOpPrefix, FieldOp, .. Sized([.. NameString(region), (byte)((byte)access | 0x40), .. list])];
    }

    /// <summary>Name(<paramref name="name"/>, <paramref name="value"/>).</summary>
    public static byte[] Name(string name, byte[] value) => [NameOp, .. NameString(name), .. value];

    /// <summary>Scope(<paramref name="name"/>) { <paramref name="terms"/> }.</summary>
    public static byte[] Scope(string name, params byte[][] terms) => [ScopeOp, .. Sized([.. NameString(name), .. Concat(terms)])];

    /// <summary>Device(<paramref name="name"/>) { <paramref name="terms"/> }.</summary>
    public static byte[] Device(string name, params byte[][] terms) =>
        [ExtOpPrefix, DeviceOp, .. Sized([.. NameString(name), .. Concat(terms)])];

    /// <summary>Package(){ <paramref name="elements"/> } (at most 255 elements: no VarPackage).</summary>
    public static byte[] Package(params byte[][] elements)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(elements.Length, 255);
        return [PackageOp, .. Sized([(byte)elements.Length, .. Concat(elements)])];
    }

    /// <summary>Buffer(){ <paramref name="data"/> }.</summary>
    public static byte[] Buffer(ReadOnlySpan<byte> data) => [BufferOp, .. Sized([.. Integer((ulong)data.Length), .. data])];

    /// <summary>An integer in the shortest encoding, as iasl emits it: Zero, One, or a Byte/Word/DWord/QWord constant.</summary>
    public static byte[] Integer(ulong value) => value switch
    {
        0 => [ZeroOp],
        1 => [OneOp],
        <= byte.MaxValue => [BytePrefix, (byte)value],
        <= ushort.MaxValue => [WordPrefix, .. LittleEndian(value, 2)],
        <= uint.MaxValue => [DWordPrefix, .. LittleEndian(value, 4)],
        _ => [QWordPrefix, .. LittleEndian(value, 8)],
    };

    /// <summary>EisaId("<paramref name="id"/>"): always a DWord constant, which is how disassemblers recognise it.</summary>
    public static byte[] EisaIdConst(string id) => [DWordPrefix, .. LittleEndian(EisaId(id), 4)];

    /// <summary>The compressed EISA id ACPI uses for _HID ("PNP0501" → 0x0105D041): three 5-bit letters and four hex
    /// digits, stored big-endian.</summary>
    public static uint EisaId(string id)
    {
        uint c(int i) => (uint)(id[i] - '@') & 0x1F;
        uint h(int i) => Convert.ToUInt32(id[i].ToString(), 16);
        uint v = (c(0) << 26) | (c(1) << 21) | (c(2) << 16) | (h(3) << 12) | (h(4) << 8) | (h(5) << 4) | h(6);
        return BinaryPrimitives.ReverseEndianness(v);
    }

    /// <summary>A NameString (ACPI 6.4, 20.2.2): an optional root prefix '\', then dot-separated segments, each padded
    /// with '_' to four characters ("\_SB.PCI0", "_HID", "COM1").</summary>
    public static byte[] NameString(string path)
    {
        var bytes = new List<byte>();
        if (path.StartsWith('\\'))
        {
            bytes.Add(RootChar);
            path = path[1..];
        }
        string[] segments = path.Split('.');
        if (segments.Length == 2)
            bytes.Add(DualNamePrefix);
        else if (segments.Length > 2)
            bytes.AddRange([MultiNamePrefix, (byte)segments.Length]);
        foreach (string segment in segments)
        {
            if (segment.Length is 0 or > 4)
                throw new ArgumentException($"AML name segment \"{segment}\" in \"{path}\" is not 1-4 characters", nameof(path));
            bytes.AddRange(Encoding.ASCII.GetBytes(segment.PadRight(4, '_')));
        }
        return [.. bytes];
    }

    /// <summary>AML PkgLength for <paramref name="contentLength"/> bytes after it (the encoding counts itself).</summary>
    public static byte[] PkgLength(int contentLength)
    {
        if (contentLength + 1 <= 0x3F)
            return [(byte)(contentLength + 1)];
        int total = contentLength + 2;
        if (total <= 0xFFF)
            return [(byte)(0x40 | (total & 0x0F)), (byte)(total >> 4)];
        total = contentLength + 3;
        if (total <= 0xF_FFFF)
            return [(byte)(0x80 | (total & 0x0F)), (byte)(total >> 4), (byte)(total >> 12)];
        total = contentLength + 4;
        return [(byte)(0xC0 | (total & 0x0F)), (byte)(total >> 4), (byte)(total >> 12), (byte)(total >> 20)];
    }

    /// <summary>ResourceTemplate(){ <paramref name="descriptors"/> }: a buffer of resource descriptors closed by the
    /// end tag, whose checksum makes the bytes sum to zero (ACPI 6.4, 6.4.2.9).</summary>
    public static byte[] ResourceTemplate(params byte[][] descriptors)
    {
        byte[] data = [.. Concat(descriptors), 0x79, 0x00];
        data[^1] = (byte)-AcpiTables.Checksum(data);
        return Buffer(data);
    }

    /// <summary>A field's bit count: PkgLength's encoding, but the value is the count itself (it does not count its own
    /// bytes, 20.2.5.2 NamedField).</summary>
    private static byte[] FieldLength(int bits)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bits);
        if (bits <= 0x3F)
            return [(byte)bits];
        if (bits <= 0xFFF)
            return [(byte)(0x40 | (bits & 0x0F)), (byte)(bits >> 4)];
        return [(byte)(0x80 | (bits & 0x0F)), (byte)(bits >> 4), (byte)(bits >> 12)];
    }

    private static byte[] Sized(byte[] content) => [.. PkgLength(content.Length), .. content];

    private static IEnumerable<byte> Concat(byte[][] parts) => parts.SelectMany(p => p);

    private static byte[] LittleEndian(ulong value, int size)
    {
        var b = new byte[size];
        for (int i = 0; i < size; i++)
            b[i] = (byte)(value >> (8 * i));
        return b;
    }
}

/// <summary>The resource descriptors vmm's _CRS objects use (ACPI 6.4, 6.4.2 small and 6.4.3 large resource
/// data types). Bridge windows are "producer" address-space descriptors with fixed minimum and maximum.</summary>
public static class AmlResource
{
    private enum AddressSpace : byte { Memory = 0, Io = 1, BusNumber = 2 }

    /// <summary>IO(Decode16, min, max, alignment, length): a fixed I/O range the device itself decodes (6.4.2.5).</summary>
    public static byte[] Io(ushort min, ushort max, byte alignment, byte length) =>
        [0x47, 0x01, (byte)min, (byte)(min >> 8), (byte)max, (byte)(max >> 8), alignment, length];

    /// <summary>IRQNoFlags(){<paramref name="irq"/>}: edge-triggered, active-high, exclusive ISA IRQ (6.4.2.1).</summary>
    public static byte[] IrqNoFlags(int irq) => [0x22, (byte)(1 << irq), (byte)((1 << irq) >> 8)];

    /// <summary>Interrupt(ResourceConsumer, Edge or Level, ActiveHigh, Exclusive) {<paramref name="gsi"/>}: the
    /// Extended Interrupt Descriptor (6.4.3.6), which names a GSI directly.</summary>
    public static byte[] Interrupt(uint gsi, bool edge)
    {
        var d = new byte[9];
        d[0] = 0x89;
        BinaryPrimitives.WriteUInt16LittleEndian(d.AsSpan(1), 6);
        d[3] = (byte)(0x01 | (edge ? 0x02 : 0)); // bit 0 consumer, bit 1 edge; bit 2 = 0 active high; bit 3 = 0 exclusive
        d[4] = 1;                                // one interrupt number
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(5), gsi);
        return d;
    }

    /// <summary>Memory32Fixed(ReadWrite, base, length) (6.4.3.4).</summary>
    public static byte[] Memory32Fixed(uint address, uint length)
    {
        var d = new byte[12];
        d[0] = 0x86;
        BinaryPrimitives.WriteUInt16LittleEndian(d.AsSpan(1), 9);
        d[3] = 0x01; // read-write
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(4), address);
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(8), length);
        return d;
    }

    /// <summary>WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, max - min + 1).</summary>
    public static byte[] WordBusNumber(ushort min, ushort max) => Address(0x88, 2, AddressSpace.BusNumber, 0, min, max);

    /// <summary>WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, max - min + 1).</summary>
    public static byte[] WordIo(ushort min, ushort max) => Address(0x88, 2, AddressSpace.Io, IoEntireRange, min, max);

    /// <summary>DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite, 0, min, max, 0, length).</summary>
    public static byte[] DWordMemory(uint min, uint max) => Address(0x87, 4, AddressSpace.Memory, MemoryCacheableReadWrite, min, max);

    /// <summary>QWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite, 0, min, max, 0, length).</summary>
    public static byte[] QWordMemory(ulong min, ulong max) => Address(0x8A, 8, AddressSpace.Memory, MemoryCacheableReadWrite, min, max);

    /// <summary>Type-specific flags (6.4.3.5.4): I/O _RNG = 3, both ISA and non-ISA ranges; memory _RW = 1 and
    /// _MEM = 1, cacheable (not prefetchable: Linux never places a non-prefetchable BAR in a prefetchable window).</summary>
    private const byte IoEntireRange = 0x03, MemoryCacheableReadWrite = 0x03;

    /// <summary>A Word (0x88), DWord (0x87) or QWord (0x8A) Address Space Descriptor (6.4.3.5.1-3): general flags
    /// _MAF | _MIF, positive decode, producer (a bridge window); fields _GRA (0: fixed size and location), _MIN,
    /// _MAX, _TRA (0: no translation) and _LEN, each <paramref name="width"/> bytes.</summary>
    private static byte[] Address(byte tag, int width, AddressSpace type, byte typeFlags, ulong min, ulong max)
    {
        var d = new byte[6 + 5 * width];
        d[0] = tag;
        BinaryPrimitives.WriteUInt16LittleEndian(d.AsSpan(1), (ushort)(d.Length - 3));
        d[3] = (byte)type;
        d[4] = 0x0C; // bit 3 _MAF, bit 2 _MIF; bit 1 _DEC = 0 positive decode; bit 0 = 0 producer and consumer
        d[5] = typeFlags;
        ReadOnlySpan<ulong> fields = [0, min, max, 0, max - min + 1];
        for (int i = 0; i < fields.Length; i++)
            for (int b = 0; b < width; b++)
                d[6 + i * width + b] = (byte)(fields[i] >> (8 * b));
        return d;
    }
}
