using System.Buffers.Binary;

namespace Vmm.Boot;

/// <summary>The Multiboot v1 header (Multiboot Specification 0.6.96, section 3.1): found in the first 8192
/// bytes of the image, 32-bit aligned.</summary>
public sealed record MultibootHeader
{
    public const uint Magic = 0x1BADB002;
    public const uint BootloaderMagic = 0x2BADB002;
    public const int SearchLimit = 8192;

    public const uint FlagPageAlignModules = 1 << 0;
    public const uint FlagMemoryInfo = 1 << 1;
    public const uint FlagVideoMode = 1 << 2;
    public const uint FlagAddressFields = 1 << 16;

    public required int FileOffset { get; init; }
    public required uint Flags { get; init; }
    public uint HeaderAddr { get; init; }
    public uint LoadAddr { get; init; }
    public uint LoadEndAddr { get; init; }
    public uint BssEndAddr { get; init; }
    public uint EntryAddr { get; init; }

    public bool HasAddressFields => (Flags & FlagAddressFields) != 0;

    /// <summary>Finds and validates the header; null when the image has none. Like GRUB and QEMU, a magic
    /// value whose checksum does not match is skipped (the constant may occur in code or data);
    /// <paramref name="nearMiss"/> describes the first such one, for the error when no header is found.</summary>
    public static MultibootHeader? Find(ReadOnlySpan<byte> image, out string? nearMiss)
    {
        int limit = Math.Min(image.Length, SearchLimit) - 12;
        nearMiss = null;
        for (int at = 0; at <= limit; at += 4)
        {
            if (BinaryPrimitives.ReadUInt32LittleEndian(image[at..]) != Magic)
                continue;
            uint flags = BinaryPrimitives.ReadUInt32LittleEndian(image[(at + 4)..]);
            uint checksum = BinaryPrimitives.ReadUInt32LittleEndian(image[(at + 8)..]);
            if (unchecked(Magic + flags + checksum) != 0)
            {
                nearMiss ??= $"multiboot header at offset 0x{at:x}: checksum 0x{checksum:x8} at offset 0x{at + 8:x} does not make magic + flags + checksum zero (expected 0x{unchecked(0u - Magic - flags):x8})";
                continue;
            }
            // Bits 0-15 are requirements: a loader must refuse one it does not understand (spec 3.1.2).
            uint unknown = flags & 0xFFF8;
            if (unknown != 0)
                throw new KernelImageException($"multiboot header at offset 0x{at:x}: flags 0x{flags:x8} at offset 0x{at + 4:x} require features vmm does not provide (bits 0x{unknown:x})");
            var header = new MultibootHeader { FileOffset = at, Flags = flags };
            if ((flags & FlagAddressFields) == 0)
                return header;
            if (at + 32 > image.Length)
                throw new KernelImageException($"multiboot header at offset 0x{at:x}: flag 16 (address fields) is set but the file ends before the address fields");
            return header with
            {
                HeaderAddr = BinaryPrimitives.ReadUInt32LittleEndian(image[(at + 12)..]),
                LoadAddr = BinaryPrimitives.ReadUInt32LittleEndian(image[(at + 16)..]),
                LoadEndAddr = BinaryPrimitives.ReadUInt32LittleEndian(image[(at + 20)..]),
                BssEndAddr = BinaryPrimitives.ReadUInt32LittleEndian(image[(at + 24)..]),
                EntryAddr = BinaryPrimitives.ReadUInt32LittleEndian(image[(at + 28)..]),
            };
        }
        return null;
    }
}
