using Vmm.Memory;

namespace Vmm.Boot;

public enum MemoryType : uint
{
    Ram = 1,
    Reserved = 2,
}

public readonly record struct MemoryMapEntry(ulong Base, ulong Length, MemoryType Type)
{
    public ulong End => Base + Length;
}

/// <summary>The one memory map every loader reports (multiboot mmap, PVH memmap, Linux e820), sorted by address: RAM
/// below 640 KiB, the EBDA and BIOS areas reserved, RAM from 1 MiB to the 32-bit MMIO hole, the PCI ECAM area
/// reserved, RAM above 4 GiB. The PCI windows stay out of the map, so the guest is free to place BARs there.</summary>
public static class MemoryMap
{
    public const ulong EbdaStart = 0x9_FC00;
    public const ulong BiosAreaStart = 0xF_0000;

    public static IReadOnlyList<MemoryMapEntry> For(GuestMemory memory)
    {
        var map = new List<MemoryMapEntry>();
        foreach (var region in memory.Regions)
        {
            ulong start = region.Start.Value, end = region.End.Value;
            if (start < MemoryLayout.HighMemoryStart)
            {
                ulong lowEnd = Math.Min(end, EbdaStart);
                map.Add(new MemoryMapEntry(start, lowEnd - start, MemoryType.Ram));
                if (end > EbdaStart)
                    map.Add(new MemoryMapEntry(EbdaStart, MemoryLayout.LowMemoryEnd - EbdaStart, MemoryType.Reserved));
                if (end > BiosAreaStart)
                    map.Add(new MemoryMapEntry(BiosAreaStart, MemoryLayout.HighMemoryStart - BiosAreaStart, MemoryType.Reserved));
                start = MemoryLayout.HighMemoryStart;
            }
            if (end > start)
                map.Add(new MemoryMapEntry(start, end - start, MemoryType.Ram));
        }
        // Reserved as e820 type 2, as PC firmware reports MMCONFIG: Linux checks the MCFG range against the e820
        // map and the ACPI motherboard resources before using it (arch/x86/pci/mmconfig-shared.c).
        map.Add(new MemoryMapEntry(MemoryLayout.PciEcamBase, MemoryLayout.PciEcamSize, MemoryType.Reserved));
        map.Sort((a, b) => a.Base.CompareTo(b.Base));
        return map;
    }

    /// <summary>The end of the RAM that starts at 1 MiB (what multiboot calls mem_upper + 1 MiB).</summary>
    public static ulong ContiguousHighMemoryEnd(GuestMemory memory)
    {
        foreach (var e in For(memory))
        {
            if (e.Type == MemoryType.Ram && e.Base == MemoryLayout.HighMemoryStart)
                return e.End;
        }
        return MemoryLayout.HighMemoryStart;
    }
}
