using System.Text;
using Vmm.Boot;
using Vmm.Memory;
using Vmm.Tests.TestKit;
using static Vmm.Tests.TestKit.ImageBuilder;

namespace Vmm.Tests.Boot;

public class PvhLoaderTests : IDisposable
{
    private readonly GuestMemory _mem = GuestMemory.Create(64 * MemoryLayout.MiB);

    public void Dispose() => _mem.Dispose();

    /// <summary>A vmlinux-like ELF64: linked high, loaded at 16 MiB, with a PVH entry note (as CONFIG_PVH adds)
    /// before an unrelated note.</summary>
    private static byte[] Vmlinux(uint pvhEntry = 0x100_0040)
    {
        var notes = Note("GNU", 3, new byte[20]).Concat(Note("Xen", ElfImage.XEN_ELFNOTE_PHYS32_ENTRY, BitConverter.GetBytes(pvhEntry))).ToArray();
        return Elf(true, 0xFFFF_FFFF_8100_0000, [new Segment(0x100_0000, Enumerable.Repeat((byte)0x90, 0x100).ToArray(), VirtualAddress: 0xFFFF_FFFF_8100_0000)], notes);
    }

    private uint U32(ulong at) => _mem.ReadObj<uint>(new GuestAddress(at));
    private ulong U64(ulong at) => _mem.ReadObj<ulong>(new GuestAddress(at));

    [Fact]
    public void A_PVH_note_selects_the_32_bit_PVH_entry_with_EBX_at_hvm_start_info()
    {
        var k = KernelLoader.Load(_mem, new BootFile("vmlinux", Vmlinux()), "console=ttyS0", new BootFile("initrd", Encoding.ASCII.GetBytes("cpio")));
        Assert.Equal("PVH ELF (hvm_start_info)", k.Format);
        Assert.Equal(CpuMode.Protected32, k.Cpu.Mode);
        Assert.Equal(0x100_0040UL, k.Cpu.Rip);
        Assert.Equal(0UL, k.Cpu.Cr0 & 0x8000_0000);
        ulong info = k.Cpu.Rbx;
        Assert.Equal(KernelLoader.HvmStartMagic, U32(info));
        Assert.Equal(1u, U32(info + 4));                 // version
        Assert.Equal(1u, U32(info + 12));                // nr_modules
        var cmd = new byte[13];
        _mem.Read(new GuestAddress(U64(info + 24)), cmd);
        Assert.Equal("console=ttyS0", Encoding.ASCII.GetString(cmd));
        Assert.Equal(0xE0000UL, U64(info + 32));          // rsdp_paddr
        var map = MemoryMap.For(_mem);
        Assert.Equal((uint)map.Count, U32(info + 48));
        ulong memmap = U64(info + 40);
        for (int i = 0; i < map.Count; i++)
        {
            Assert.Equal(map[i].Base, U64(memmap + 24 * (ulong)i));
            Assert.Equal(map[i].Length, U64(memmap + 24 * (ulong)i + 8));
            Assert.Equal((uint)map[i].Type, U32(memmap + 24 * (ulong)i + 16));
        }
        Assert.Contains(new MemoryMapEntry(0xE000_0000, MemoryLayout.MiB, MemoryType.Reserved), map); // ECAM
        ulong mod = U64(info + 16);
        ulong modStart = U64(mod);
        Assert.Equal(4UL, U64(mod + 8));
        Assert.Equal((byte)'c', _mem.ReadObj<byte>(new GuestAddress(modStart)));
        Assert.True(modStart >= 0x100_0100);
    }

    [Fact]
    public void An_ELF64_without_the_note_still_enters_in_long_mode()
    {
        var k = KernelLoader.Load(_mem, new BootFile("k", Elf(true, 0x20_0000, [new Segment(0x20_0000, [0xF4])], Note("GNU", 3, new byte[8]))), "", null);
        Assert.Equal(CpuMode.Long64, k.Cpu.Mode);
    }

    [Fact]
    public void A_PVH_entry_outside_the_loaded_segments_is_refused()
    {
        var e = Assert.Throws<KernelImageException>(() => KernelLoader.Load(_mem, new BootFile("vmlinux", Vmlinux(0x300_0000)), "", null));
        Assert.Contains("entry point 0x3000000 is not inside any loaded segment", e.Message);
    }

    [Fact]
    public void A_note_segment_past_the_end_of_the_file_is_a_precise_error()
    {
        var image = Vmlinux();
        ImageBuilder.W64(image, 64 + 56 + 32, 0x10_0000); // PT_NOTE p_filesz
        var e = Assert.Throws<KernelImageException>(() => KernelLoader.Load(_mem, new BootFile("vmlinux", image), "", null));
        Assert.Contains("PT_NOTE", e.Message);
    }
}
