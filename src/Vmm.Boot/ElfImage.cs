using System.Buffers.Binary;

namespace Vmm.Boot;

/// <summary>One PT_LOAD program header.</summary>
public readonly record struct ElfSegment(int Index, ulong FileOffset, ulong VirtualAddress, ulong PhysicalAddress,
    ulong FileSize, ulong MemorySize);

/// <summary>A validated little-endian x86 ELF executable (32- or 64-bit): just what loaders need. Every
/// offset and size is checked against the file before use.</summary>
public sealed class ElfImage
{
    public const int EM_386 = 3, EM_X86_64 = 62;
    private const uint PT_LOAD = 1, PT_NOTE = 4;
    /// <summary>Xen's ELF note type for the PVH 32-bit entry point (include/xen/interface/elfnote.h).</summary>
    public const uint XEN_ELFNOTE_PHYS32_ENTRY = 18;

    private ElfImage(bool is64, ushort machine, ulong entry, IReadOnlyList<ElfSegment> segments, ulong? pvhEntry)
    {
        PvhEntry = pvhEntry;
        Is64 = is64;
        Machine = machine;
        Entry = entry;
        Segments = segments;
    }

    public bool Is64 { get; }
    public ushort Machine { get; }
    public ulong Entry { get; }
    public IReadOnlyList<ElfSegment> Segments { get; }

    /// <summary>The PVH entry point (the "Xen" note XEN_ELFNOTE_PHYS32_ENTRY), if the image has one.</summary>
    public ulong? PvhEntry { get; }

    public static bool HasElfMagic(ReadOnlySpan<byte> image) =>
        image.Length >= 4 && image[0] == 0x7F && image[1] == (byte)'E' && image[2] == (byte)'L' && image[3] == (byte)'F';

    public static ElfImage Parse(ReadOnlySpan<byte> image)
    {
        if (!HasElfMagic(image))
            throw new KernelImageException("ELF header at offset 0x0: e_ident magic is not 7f 45 4c 46");
        if (image.Length < 52)
            throw new KernelImageException($"ELF header at offset 0x0: file is {image.Length} bytes, shorter than an ELF header");
        byte cls = image[4];
        if (cls != 1 && cls != 2)
            throw new KernelImageException($"ELF header: e_ident[EI_CLASS] at offset 0x4 is {cls}, expected 1 (ELF32) or 2 (ELF64)");
        if (image[5] != 1)
            throw new KernelImageException($"ELF header: e_ident[EI_DATA] at offset 0x5 is {image[5]}, expected 1 (little-endian)");
        bool is64 = cls == 2;
        if (is64 && image.Length < 64)
            throw new KernelImageException($"ELF64 header at offset 0x0: file is {image.Length} bytes, shorter than an ELF64 header");

        ushort type = U16(image, 16);
        if (type != 2)
            throw new KernelImageException($"ELF header: e_type at offset 0x10 is {type}, expected 2 (ET_EXEC)");
        ushort machine = U16(image, 18);
        ushort expectedMachine = is64 ? (ushort)EM_X86_64 : (ushort)EM_386;
        if (machine != expectedMachine)
            throw new KernelImageException($"ELF header: e_machine at offset 0x12 is {machine}, expected {expectedMachine} ({(is64 ? "EM_X86_64" : "EM_386")})");

        ulong entry = is64 ? U64(image, 24) : U32(image, 24);
        ulong phoff = is64 ? U64(image, 32) : U32(image, 28);
        int phentsizeOffset = is64 ? 54 : 42;
        ushort phentsize = U16(image, phentsizeOffset);
        ushort phnum = U16(image, phentsizeOffset + 2);
        int minEntry = is64 ? 56 : 32;
        if (phnum == 0)
            throw new KernelImageException($"ELF header: e_phnum at offset 0x{phentsizeOffset + 2:x} is 0: no program headers to load");
        if (phentsize < minEntry)
            throw new KernelImageException($"ELF header: e_phentsize at offset 0x{phentsizeOffset:x} is {phentsize}, expected at least {minEntry}");
        if (phoff > (ulong)image.Length || (ulong)phentsize * phnum > (ulong)image.Length - phoff)
            throw new KernelImageException($"ELF header: program headers at e_phoff 0x{phoff:x} ({phnum} x {phentsize} bytes) run past the end of the {image.Length}-byte file");

        var segments = new List<ElfSegment>();
        ulong? pvhEntry = null;
        for (int i = 0; i < phnum; i++)
        {
            int at = (int)phoff + i * phentsize;
            uint ptype = U32(image, at);
            if (ptype == PT_NOTE)
            {
                ulong noteOffset = is64 ? U64(image, at + 8) : U32(image, at + 4);
                ulong noteSize = is64 ? U64(image, at + 32) : U32(image, at + 16);
                if (noteOffset > (ulong)image.Length || noteSize > (ulong)image.Length - noteOffset)
                    throw new KernelImageException($"ELF program header {i} at offset 0x{at:x}: PT_NOTE at 0x{noteOffset:x} + 0x{noteSize:x} runs past the end of the {image.Length}-byte file");
                pvhEntry ??= FindPvhEntry(image.Slice((int)noteOffset, (int)noteSize));
                continue;
            }
            if (ptype != PT_LOAD)
                continue;
            ulong offset, vaddr, paddr, filesz, memsz;
            if (is64)
            {
                offset = U64(image, at + 8); vaddr = U64(image, at + 16); paddr = U64(image, at + 24);
                filesz = U64(image, at + 32); memsz = U64(image, at + 40);
            }
            else
            {
                offset = U32(image, at + 4); vaddr = U32(image, at + 8); paddr = U32(image, at + 12);
                filesz = U32(image, at + 16); memsz = U32(image, at + 20);
            }
            if (offset > (ulong)image.Length || filesz > (ulong)image.Length - offset)
                throw new KernelImageException($"ELF program header {i} at offset 0x{at:x}: p_offset 0x{offset:x} + p_filesz 0x{filesz:x} runs past the end of the {image.Length}-byte file");
            if (filesz > memsz)
                throw new KernelImageException($"ELF program header {i} at offset 0x{at:x}: p_filesz 0x{filesz:x} is larger than p_memsz 0x{memsz:x}");
            if (paddr + memsz < paddr)
                throw new KernelImageException($"ELF program header {i} at offset 0x{at:x}: p_paddr 0x{paddr:x} + p_memsz 0x{memsz:x} overflows");
            segments.Add(new ElfSegment(i, offset, vaddr, paddr, filesz, memsz));
        }
        if (segments.Count == 0)
            throw new KernelImageException("ELF program headers: no PT_LOAD segment to load");
        return new ElfImage(is64, machine, entry, segments, pvhEntry);
    }

    /// <summary>The entry point as a physical address: e_entry itself, or translated through the segment whose
    /// virtual range holds it (higher-half kernels link at virtual addresses but load at p_paddr, as GRUB does).</summary>
    public ulong PhysicalEntry
    {
        get
        {
            foreach (var s in Segments)
            {
                if (s.VirtualAddress != s.PhysicalAddress && Entry >= s.VirtualAddress && Entry - s.VirtualAddress < s.MemorySize)
                    return Entry - s.VirtualAddress + s.PhysicalAddress;
            }
            return Entry;
        }
    }

    /// <summary>Walks ELF notes (namesz, descsz, type, name and desc each padded to 4 bytes) for Xen's PVH entry.</summary>
    private static ulong? FindPvhEntry(ReadOnlySpan<byte> notes)
    {
        int at = 0;
        while (at + 12 <= notes.Length)
        {
            uint nameSize = U32(notes, at), descSize = U32(notes, at + 4), type = U32(notes, at + 8);
            long nameAt = at + 12, descAt = nameAt + ((nameSize + 3L) & ~3L), next = descAt + ((descSize + 3L) & ~3L);
            if (next > notes.Length || descAt + descSize > notes.Length)
                return null; // a truncated note ends the walk: no PVH entry here
            if (type == XEN_ELFNOTE_PHYS32_ENTRY && nameSize == 4 && notes.Slice((int)nameAt, 4).SequenceEqual("Xen\0"u8))
            {
                if (descSize == 4)
                    return U32(notes, (int)descAt);
                if (descSize == 8)
                    return U64(notes, (int)descAt);
            }
            at = (int)next;
        }
        return null;
    }

    private static ushort U16(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt16LittleEndian(b[at..]);
    private static uint U32(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt32LittleEndian(b[at..]);
    private static ulong U64(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt64LittleEndian(b[at..]);
}
