using System.Buffers.Binary;
using Iced.Intel;
using Vmm.Boot;

namespace Vmm.Tests.TestKit;

/// <summary>Builds small kernel images for loader tests and micro-guests: ELF32/ELF64 executables and
/// multiboot a.out-kludge images, so tests can also corrupt any field on purpose.</summary>
public static class ImageBuilder
{
    public sealed record Segment(ulong PhysicalAddress, byte[] Data, ulong MemorySize = 0, ulong VirtualAddress = ulong.MaxValue);

    /// <summary>An ELF executable; <paramref name="multibootHeader"/> adds a multiboot header (flags 0x3) as the
    /// first bytes of the first segment's file data area.</summary>
    public static byte[] Elf(bool is64, ulong entry, IReadOnlyList<Segment> segments, byte[]? note = null)
    {
        if (note is not null)
        {
            // The note travels as one more "segment" whose program header is rewritten to PT_NOTE below.
            var withNote = Elf(is64, entry, [.. segments, new Segment(0, note)]);
            int ph = (is64 ? 64 : 52) + segments.Count * (is64 ? 56 : 32);
            W32(withNote, ph, 4); // PT_NOTE
            return withNote;
        }
        int ehsize = is64 ? 64 : 52, phentsize = is64 ? 56 : 32;
        int dataStart = Align(ehsize + phentsize * segments.Count, 16);
        var offsets = new List<int>();
        int at = dataStart;
        foreach (var s in segments)
        {
            offsets.Add(at);
            at = Align(at + s.Data.Length, 16);
        }
        var image = new byte[at];
        var b = image.AsSpan();
        b[0] = 0x7F; b[1] = (byte)'E'; b[2] = (byte)'L'; b[3] = (byte)'F';
        b[4] = (byte)(is64 ? 2 : 1); b[5] = 1; b[6] = 1;
        W16(b, 16, 2);                                   // ET_EXEC
        W16(b, 18, (ushort)(is64 ? 62 : 3));             // EM_X86_64 / EM_386
        W32(b, 20, 1);
        if (is64)
        {
            W64(b, 24, entry); W64(b, 32, (ulong)ehsize);
            W16(b, 52, (ushort)ehsize); W16(b, 54, (ushort)phentsize); W16(b, 56, (ushort)segments.Count);
        }
        else
        {
            W32(b, 24, (uint)entry); W32(b, 28, (uint)ehsize);
            W16(b, 40, (ushort)ehsize); W16(b, 42, (ushort)phentsize); W16(b, 44, (ushort)segments.Count);
        }
        for (int i = 0; i < segments.Count; i++)
        {
            var s = segments[i];
            int ph = ehsize + i * phentsize;
            ulong vaddr = s.VirtualAddress == ulong.MaxValue ? s.PhysicalAddress : s.VirtualAddress;
            ulong memsz = Math.Max(s.MemorySize, (ulong)s.Data.Length);
            W32(b, ph, 1); // PT_LOAD
            if (is64)
            {
                W32(b, ph + 4, 7); W64(b, ph + 8, (ulong)offsets[i]); W64(b, ph + 16, vaddr); W64(b, ph + 24, s.PhysicalAddress);
                W64(b, ph + 32, (ulong)s.Data.Length); W64(b, ph + 40, memsz); W64(b, ph + 48, 0x1000);
            }
            else
            {
                W32(b, ph + 4, (uint)offsets[i]); W32(b, ph + 8, (uint)vaddr); W32(b, ph + 12, (uint)s.PhysicalAddress);
                W32(b, ph + 16, (uint)s.Data.Length); W32(b, ph + 20, (uint)memsz); W32(b, ph + 24, 7); W32(b, ph + 28, 0x1000);
            }
            s.Data.CopyTo(image, offsets[i]);
        }
        return image;
    }

    /// <summary>A multiboot header (12 bytes, flags as given) to put at the start of a segment.</summary>
    public static byte[] MultibootHeaderBytes(uint flags = 0x3)
    {
        var h = new byte[12];
        W32(h, 0, MultibootHeader.Magic);
        W32(h, 4, flags);
        W32(h, 8, unchecked(0u - MultibootHeader.Magic - flags));
        return h;
    }

    /// <summary>A multiboot a.out-kludge image: header at <paramref name="loadAddress"/>, code right after it.</summary>
    public static byte[] AoutKludge(uint loadAddress, byte[] code, uint bssSize = 0)
    {
        const uint flags = 0x0001_0003;
        var image = new byte[32 + code.Length];
        var h = image.AsSpan();
        W32(h, 0, MultibootHeader.Magic);
        W32(h, 4, flags);
        W32(h, 8, unchecked(0u - MultibootHeader.Magic - flags));
        W32(h, 12, loadAddress);
        W32(h, 16, loadAddress);
        W32(h, 20, loadAddress + (uint)image.Length);
        W32(h, 24, bssSize == 0 ? 0 : loadAddress + (uint)image.Length + bssSize);
        W32(h, 28, loadAddress + 32);
        code.CopyTo(image, 32);
        return image;
    }

    /// <summary>Where <see cref="Guest32"/> puts its data bytes (Iced label operands are RIP-relative, which
    /// 32-bit code lacks, so micro-guests address their data at this fixed place).</summary>
    public const uint Guest32Data = 0x10_1000;

    /// <summary>Assembles 32-bit code for <see cref="AoutKludge"/> at 1 MiB, with <paramref name="data"/> at
    /// <see cref="Guest32Data"/>.</summary>
    public static byte[] Guest32(Action<Assembler> body, byte[]? data = null)
    {
        var a = new Assembler(32);
        body(a);
        var ms = new MemoryStream();
        a.Assemble(new StreamCodeWriter(ms), 0x10_0000 + 32);
        var code = ms.ToArray();
        if (32 + code.Length > Guest32Data - 0x10_0000)
            throw new InvalidOperationException("micro-guest code overlaps its data");
        var body2 = new byte[Guest32Data - 0x10_0000 - 32 + (data?.Length ?? 0)];
        code.CopyTo(body2, 0);
        data?.CopyTo(body2, (int)(Guest32Data - 0x10_0000 - 32));
        return AoutKludge(0x10_0000, body2);
    }

    /// <summary>Assembles 64-bit code into an ELF64 at 2 MiB (entered in long mode).</summary>
    public static byte[] Guest64(Action<Assembler> body)
    {
        var a = new Assembler(64);
        body(a);
        var ms = new MemoryStream();
        a.Assemble(new StreamCodeWriter(ms), 0x20_0000);
        return Elf(true, 0x20_0000, [new Segment(0x20_0000, ms.ToArray())]);
    }

    /// <summary>An ELF note: namesz, descsz, type, name and desc padded to 4 bytes.</summary>
    public static byte[] Note(string name, uint type, byte[] desc)
    {
        byte[] n = System.Text.Encoding.ASCII.GetBytes(name + "\0");
        var note = new byte[12 + Align(n.Length, 4) + Align(desc.Length, 4)];
        W32(note, 0, (uint)n.Length);
        W32(note, 4, (uint)desc.Length);
        W32(note, 8, type);
        n.CopyTo(note, 12);
        desc.CopyTo(note, 12 + Align(n.Length, 4));
        return note;
    }

    private static int Align(int v, int a) => (v + a - 1) / a * a;
    public static void W16(Span<byte> b, int at, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(b[at..], v);
    public static void W32(Span<byte> b, int at, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(b[at..], v);
    public static void W64(Span<byte> b, int at, ulong v) => BinaryPrimitives.WriteUInt64LittleEndian(b[at..], v);
}
