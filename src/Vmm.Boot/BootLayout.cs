using System.Buffers.Binary;
using Vmm.Memory;

namespace Vmm.Boot;

/// <summary>Where the loaders put their boot structures in low guest memory (below 640 KiB; multiboot
/// kernels are told the whole low range is RAM and must not assume these survive).</summary>
public static class BootLayout
{
    public const ulong GdtAddress = 0x500;
    public const ushort CodeSelector32 = 0x08;
    /// <summary>Linux's __BOOT_CS / __BOOT_DS values, so the same GDT serves the Linux boot protocol later.</summary>
    public const ushort CodeSelector64 = 0x10;
    public const ushort DataSelector = 0x18;

    public const ulong MultibootInfoAddress = 0x6000;
    public const ulong MultibootMmapAddress = 0x6100;
    public const ulong MultibootModulesAddress = 0x6400;
    public const ulong MultibootModuleStringsAddress = 0x6800;
    public const ulong BootLoaderNameAddress = 0x6F00;
    public const ulong CommandLineAddress = 0x7000;
    public const int CommandLineMax = 0x1000;

    /// <summary>PML4, PDPT and four page directories identity-mapping 4 GiB with 2 MiB pages.</summary>
    public const ulong PageTablesAddress = 0x9000;
    public const ulong PageTablesEnd = PageTablesAddress + 6 * 0x1000;

    /// <summary>The boot CPU's initial stack pointer (multiboot leaves ESP undefined; a valid one is friendlier):
    /// the page below the page tables, inside the area kernels may not load into.</summary>
    public const ulong InitialStack = 0x9000;

    /// <summary>Writes the flat GDT (null, code32, code64, data) and returns its limit.</summary>
    public static ushort WriteGdt(GuestMemory memory)
    {
        Span<byte> gdt = stackalloc byte[32];
        BinaryPrimitives.WriteUInt64LittleEndian(gdt[0..], 0);
        BinaryPrimitives.WriteUInt64LittleEndian(gdt[8..], X86Segment.FlatCode32(CodeSelector32).ToDescriptor());
        BinaryPrimitives.WriteUInt64LittleEndian(gdt[16..], X86Segment.Code64(CodeSelector64).ToDescriptor());
        BinaryPrimitives.WriteUInt64LittleEndian(gdt[24..], X86Segment.FlatData(DataSelector).ToDescriptor());
        memory.Write(new GuestAddress(GdtAddress), gdt);
        return (ushort)(gdt.Length - 1);
    }

    /// <summary>Identity-maps the first 4 GiB with 2 MiB pages and returns CR3.</summary>
    public static ulong WriteIdentityPageTables(GuestMemory memory)
    {
        const ulong present = 1, writable = 2, pageSize = 0x80;
        ulong pml4 = PageTablesAddress, pdpt = pml4 + 0x1000, pd = pdpt + 0x1000;
        memory.Clear(new GuestAddress(pml4), PageTablesEnd - PageTablesAddress);
        memory.WriteObj(new GuestAddress(pml4), pdpt | present | writable);
        for (ulong i = 0; i < 4; i++)
        {
            ulong dir = pd + i * 0x1000;
            memory.WriteObj(new GuestAddress(pdpt + i * 8), dir | present | writable);
            for (ulong j = 0; j < 512; j++)
            {
                ulong physical = (i << 30) | (j << 21);
                memory.WriteObj(new GuestAddress(dir + j * 8), physical | present | writable | pageSize);
            }
        }
        return pml4;
    }
}
