using System.Text;
using Vmm.Boot;
using Vmm.Memory;
using Vmm.Tests.TestKit;
using static Vmm.Tests.TestKit.ImageBuilder;

namespace Vmm.Tests.Boot;

public class KernelLoaderTests : IDisposable
{
    private readonly GuestMemory _mem = GuestMemory.Create(64 * MemoryLayout.MiB);

    public void Dispose() => _mem.Dispose();

    private static byte[] Code(params byte[] bytes) => bytes;

    /// <summary>An ELF32 multiboot kernel: header + code at 1 MiB, a bss segment after it.</summary>
    private static byte[] MultibootElf32(ulong entry = 0x10_0010)
    {
        var text = MultibootHeaderBytes().Concat(new byte[4]).Concat(Code(0xF4, 0xEB, 0xFD)).ToArray(); // hlt; jmp $-1
        return Elf(false, entry, [new Segment(0x10_0000, text), new Segment(0x10_1000, [1, 2, 3], MemorySize: 0x2000)]);
    }

    private uint U32(ulong at) => _mem.ReadObj<uint>(new GuestAddress(at));

    private string CString(ulong at)
    {
        var sb = new StringBuilder();
        for (byte c; (c = _mem.ReadObj<byte>(new GuestAddress(at))) != 0; at++)
            sb.Append((char)c);
        return sb.ToString();
    }

    [Fact]
    public void Multiboot_ELF32_loads_segments_zeroes_bss_and_enters_protected_mode_per_spec()
    {
        _mem.WriteObj(new GuestAddress(0x10_1004), 0xFFFFFFFFu); // garbage where bss goes
        var k = KernelLoader.Load(_mem, new BootFile("kernel.elf", MultibootElf32()), "", null);
        Assert.Equal("multiboot ELF32", k.Format);
        Assert.Equal(0xF4, _mem.ReadObj<byte>(new GuestAddress(0x10_0010)));
        Assert.Equal(3, _mem.ReadObj<byte>(new GuestAddress(0x10_1002)));
        Assert.Equal(0u, U32(0x10_1004));
        // Spec 3.2: EAX magic, EBX info, 32-bit flat CS, PE on, PG off, IF off.
        Assert.Equal(CpuMode.Protected32, k.Cpu.Mode);
        Assert.Equal(0x2BADB002UL, k.Cpu.Rax);
        Assert.Equal(BootLayout.MultibootInfoAddress, k.Cpu.Rbx);
        Assert.Equal(0x10_0010UL, k.Cpu.Rip);
        Assert.True(k.Cpu.Code.DefaultBig);
        Assert.Equal(0xFFFFFFFFu, k.Cpu.Code.Limit);
        Assert.Equal(1UL, k.Cpu.Cr0 & 1);
        Assert.Equal(0UL, k.Cpu.Cr0 & 0x8000_0000);
        Assert.Equal(0UL, k.Cpu.Rflags & 0x200);
    }

    [Fact]
    public void Multiboot_info_has_memory_command_line_memory_map_and_module()
    {
        var module = new BootFile("/boot/initrd.img", Encoding.ASCII.GetBytes("hello module"));
        var k = KernelLoader.Load(_mem, new BootFile("/boot/kernel.elf", MultibootElf32()), "console=ttyS0 quiet", module);
        ulong info = BootLayout.MultibootInfoAddress;
        uint flags = U32(info);
        Assert.Equal(0x24Du, flags & 0x24D); // mem, cmdline, mods, mmap, loader name
        Assert.Equal(639u, U32(info + 4));
        Assert.Equal((64u - 1) * 1024, U32(info + 8));
        // GRUB and QEMU pass the kernel's name first.
        Assert.Equal("/boot/kernel.elf console=ttyS0 quiet", CString(U32(info + 16)));
        Assert.Equal("/boot/kernel.elf console=ttyS0 quiet", k.CommandLine);
        Assert.Equal(1u, U32(info + 20));
        ulong mod = U32(info + 24);
        uint start = U32(mod), end = U32(mod + 4);
        Assert.Equal(0u, start % 4096);
        Assert.True(start >= 0x10_3000); // after the kernel's bss
        Assert.Equal(12u, end - start);
        Assert.Equal("/boot/initrd.img", CString(U32(mod + 8)));
        var content = new byte[12];
        _mem.Read(new GuestAddress(start), content);
        Assert.Equal("hello module", Encoding.ASCII.GetString(content));
        Assert.Equal("vmm", CString(U32(info + 64)));

        uint mmapLength = U32(info + 44);
        ulong mmap = U32(info + 48);
        var entries = new List<(ulong, ulong, uint)>();
        for (ulong at = mmap; at < mmap + mmapLength; at += U32(at) + 4)
            entries.Add((_mem.ReadObj<ulong>(new GuestAddress(at + 4)), _mem.ReadObj<ulong>(new GuestAddress(at + 12)), U32(at + 20)));
        Assert.Equal([(0UL, 0x9FC00UL, 1u), (0x9FC00UL, 0x400UL, 2u), (0xF0000UL, 0x10000UL, 2u), (0x100000UL, 63 * MemoryLayout.MiB, 1u),
            (0xE000_0000UL, MemoryLayout.MiB, 2u)], entries);
    }

    [Fact]
    public void Command_line_without_arguments_is_just_the_kernel_name()
    {
        var k = KernelLoader.Load(_mem, new BootFile("k", MultibootElf32()), "", null);
        Assert.Equal("k", CString(U32(BootLayout.MultibootInfoAddress + 16)));
        Assert.Equal(0u, U32(BootLayout.MultibootInfoAddress) & 0x8); // no modules flag
    }

    [Fact]
    public void Aout_kludge_loads_from_the_header_offset_and_clears_bss()
    {
        var image = AoutKludge(0x20_0000, [0x90, 0x90, 0xF4], bssSize: 0x100);
        // Put the image after 64 bytes of padding: the header is found at offset 64.
        var padded = new byte[64].Concat(image).ToArray();
        _mem.WriteObj(new GuestAddress(0x20_0000 + 35 + 8), 0xFFu);
        var k = KernelLoader.Load(_mem, new BootFile("aout", padded), "", null);
        Assert.Equal("multiboot (a.out kludge)", k.Format);
        Assert.Equal(0x20_0020UL, k.Cpu.Rip);
        Assert.Equal(0xF4, _mem.ReadObj<byte>(new GuestAddress(0x20_0022)));
        Assert.Equal(0, _mem.ReadObj<byte>(new GuestAddress(0x20_0000 + 35 + 8)));
    }

    [Fact]
    public void ELF64_enters_long_mode_on_identity_mapped_page_tables()
    {
        var image = Elf(true, 0x20_0000, [new Segment(0x20_0000, [0xF4])]);
        var k = KernelLoader.Load(_mem, new BootFile("k64", image), "x", null);
        Assert.Equal(CpuMode.Long64, k.Cpu.Mode);
        Assert.True(k.Cpu.Code.LongMode);
        Assert.Equal(0x500UL, k.Cpu.Efer & 0x500);
        Assert.Equal(0x8000_0000UL, k.Cpu.Cr0 & 0x8000_0000);
        Assert.Equal(0x20UL, k.Cpu.Cr4 & 0x20);
        // Walk the tables by hand: 0xC0201234 must map to itself.
        ulong linear = 0xC020_1234;
        ulong pml4e = _mem.ReadObj<ulong>(new GuestAddress(k.Cpu.Cr3));
        ulong pdpte = _mem.ReadObj<ulong>(new GuestAddress((pml4e & ~0xFFFUL) + ((linear >> 30) & 0x1FF) * 8));
        ulong pde = _mem.ReadObj<ulong>(new GuestAddress((pdpte & ~0xFFFUL) + ((linear >> 21) & 0x1FF) * 8));
        Assert.Equal(0x81UL, pde & 0x81); // present, 2 MiB page
        Assert.Equal(linear, (pde & ~0x1F_FFFFUL & 0xF_FFFF_FFFF_F000UL) | (linear & 0x1F_FFFF));
        Assert.Equal("k64 x", CString(U32(BootLayout.MultibootInfoAddress + 16)));
    }

    [Fact]
    public void Higher_half_ELF_entry_is_translated_to_its_physical_address()
    {
        const ulong virt = 0xFFFF_FFFF_8020_0000;
        var image = Elf(true, virt + 4, [new Segment(0x20_0000, [0x90, 0x90, 0x90, 0x90, 0xF4], VirtualAddress: virt)]);
        var k = KernelLoader.Load(_mem, new BootFile("hh", image), "", null);
        Assert.Equal(0x20_0004UL, k.Cpu.Rip);
    }

    public static TheoryData<string, Func<byte[]>, string> Malformed => new()
    {
        { "empty", () => [], "empty" },
        { "garbage", () => Encoding.ASCII.GetBytes("not a kernel at all, just text"), "no ELF magic at offset 0 and no multiboot header" },
        { "bad checksum", () => { var i = MultibootElf32(); i[0x80 + 8] ^= 1; return i; }, "checksum" },
        { "unsupported flag", () => { var i = MultibootElf32(); ImageBuilder.W32(i, 0x80 + 4, 0x0000_0103); ImageBuilder.W32(i, 0x80 + 8, unchecked(0u - MultibootHeader.Magic - 0x103)); return i; }, "require features vmm does not provide (bits 0x100)" },
        { "segment past file end", () => { var i = MultibootElf32(); ImageBuilder.W32(i, 52 + 16, 0x10000); return i; }, "ELF program header 0 at offset 0x34: p_offset 0x80 + p_filesz 0x10000 runs past the end" },
        { "filesz above memsz", () => { var i = MultibootElf32(); ImageBuilder.W32(i, 52 + 32 + 20, 1); return i; }, "p_filesz 0x3 is larger than p_memsz 0x1" },
        { "segment outside RAM", () => { var i = MultibootElf32(0x1000_0010); ImageBuilder.W32(i, 52 + 12, 0x1000_0000); return i; }, "is outside guest RAM" },
        { "segment over boot structures", () => { var i = MultibootElf32(); ImageBuilder.W32(i, 52 + 12, 0x5000); return i; }, "overlaps vmm's boot structures" },
        { "entry outside segments", () => MultibootElf32(0x50_0000), "entry point 0x500000 is not inside any loaded segment" },
        { "wrong machine", () => { var i = MultibootElf32(); i[18] = 0x28; return i; }, "e_machine at offset 0x12 is 40, expected 3" },
        { "program headers past end", () => { var i = MultibootElf32(); ImageBuilder.W32(i, 28, 0xFFFF0); return i; }, "program headers at e_phoff 0xffff0" },
        { "not executable", () => { var i = MultibootElf32(); i[16] = 3; return i; }, "e_type at offset 0x10 is 3" },
        { "big-endian", () => { var i = MultibootElf32(); i[5] = 2; return i; }, "EI_DATA" },
        { "ELF32 without multiboot header", () => Elf(false, 0x10_0000, [new Segment(0x10_0000, [0xF4])]), "a 32-bit ELF without a multiboot header" },
        { "bzImage without boot flag", () => { var i = new byte[0x1000]; ImageBuilder.W32(i, 0x202, 0x53726448); return i; }, "Linux setup header boot_flag at offset 0x1fe is 0x0000, expected 0xaa55" },
        { "aout load_end past file", () => { var i = AoutKludge(0x10_0000, [0xF4]); ImageBuilder.W32(i, 20, 0x20_0000); return i; }, "load_end_addr 0x200000 (offset 0x14) asks for 0x100000 bytes" },
        { "aout load_addr above header", () => { var i = AoutKludge(0x10_0000, [0xF4]); ImageBuilder.W32(i, 16, 0x10_1000); return i; }, "load_addr 0x101000 (offset 0x10) is above header_addr" },
        { "aout bss below load end", () => { var i = AoutKludge(0x10_0000, [0xF4]); ImageBuilder.W32(i, 24, 0x10_0001); return i; }, "bss_end_addr 0x100001 (offset 0x18) is below load_end_addr" },
        { "raw binary without address fields", () => MultibootHeaderBytes().Concat(new byte[64]).ToArray(), "has no address fields (flag 16) and the image is not ELF" },
        { "aout truncated address fields", () => { var i = AoutKludge(0x10_0000, [0xF4]); return i[..20]; }, "file ends before the address fields" },
    };

    [Theory]
    [MemberData(nameof(Malformed))]
    public void Malformed_images_get_a_precise_error(string what, Func<byte[]> image, string expected)
    {
        var e = Assert.Throws<KernelImageException>(() => KernelLoader.Load(_mem, new BootFile("bad.img", image()), "", null));
        Assert.True(e.Message.Contains(expected), $"{what}: '{e.Message}' does not contain '{expected}'");
    }

    [Fact]
    public void A_module_that_does_not_fit_in_RAM_is_refused_with_advice()
    {
        var module = new BootFile("huge", new byte[64 * 1024 * 1024]);
        var e = Assert.Throws<KernelImageException>(() => KernelLoader.Load(_mem, new BootFile("k", MultibootElf32()), "", module));
        Assert.Contains("module huge (67108864 bytes) does not fit", e.Message);
        Assert.Contains("--memory", e.Message);
    }

    [Fact]
    public void An_overlong_command_line_is_refused()
    {
        var e = Assert.Throws<KernelImageException>(() => KernelLoader.Load(_mem, new BootFile("k", MultibootElf32()), new string('x', 5000), null));
        Assert.Contains("command line", e.Message);
    }

    [Fact]
    public void GDT_descriptors_encode_flat_segments()
    {
        Assert.Equal(0x00CF9B000000FFFFUL, X86Segment.FlatCode32(8).ToDescriptor());
        Assert.Equal(0x00AF9B000000FFFFUL, X86Segment.Code64(0x10).ToDescriptor());
        Assert.Equal(0x00CF93000000FFFFUL, X86Segment.FlatData(0x18).ToDescriptor());
    }

    [Fact]
    public void Memory_map_reserves_the_BIOS_areas_and_ECAM_and_resumes_above_4_GiB()
    {
        using var big = GuestMemory.Create(4 * MemoryLayout.GiB);
        var map = MemoryMap.For(big);
        Assert.Equal(new MemoryMapEntry(0x1_0000_0000, MemoryLayout.GiB, MemoryType.Ram), map[^1]);
        Assert.Equal(new MemoryMapEntry(0xE000_0000, MemoryLayout.MiB, MemoryType.Reserved), map[^2]);
        Assert.Equal(new MemoryMapEntry(0x10_0000, MemoryLayout.MmioHoleStart - 0x10_0000, MemoryType.Ram), map[^3]);
    }

    [Fact]
    public void Memory_map_leaves_the_32_bit_PCI_window_out_so_the_guest_can_assign_BARs_there()
    {
        using var big = GuestMemory.Create(4 * MemoryLayout.GiB);
        var map = MemoryMap.For(big);
        Assert.DoesNotContain(map, e => e.Base < MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size && e.End > MemoryLayout.PciMmio32Start);
        Assert.Equal(map.OrderBy(e => e.Base), map);
    }

    [Fact]
    public void A_stray_multiboot_magic_before_the_real_header_is_skipped_like_GRUB_does()
    {
        var image = AoutKludge(0x20_0000, [0xF4]);
        var stray = new byte[16];
        ImageBuilder.W32(stray, 0, MultibootHeader.Magic); // the constant in code, no valid checksum after it
        var k = KernelLoader.Load(_mem, new BootFile("k", stray.Concat(image).ToArray()), "", null);
        Assert.Equal(0x20_0020UL, k.Cpu.Rip);
    }

    [Fact]
    public void A_video_mode_request_is_a_warning_not_an_error()
    {
        var text = MultibootHeaderBytes(0x7).Concat(new byte[4]).Concat(Code(0xF4)).ToArray();
        var k = KernelLoader.Load(_mem, new BootFile("fb", Elf(false, 0x10_0010, [new Segment(0x10_0000, text)])), "", null);
        Assert.Contains(k.Warnings, w => w.Contains("video mode"));
    }

    [Fact]
    public void Kernels_may_not_load_over_the_reserved_BIOS_area()
    {
        var text = MultibootHeaderBytes().Concat(new byte[4]).Concat(Code(0xF4)).ToArray();
        var e = Assert.Throws<KernelImageException>(() =>
            KernelLoader.Load(_mem, new BootFile("low", Elf(false, 0xA0010, [new Segment(0xA0000, text)])), "", null));
        Assert.Contains("overlaps the EBDA/BIOS area", e.Message);
    }

    [Fact]
    public void The_module_goes_above_1_MiB_even_after_a_low_kernel()
    {
        var text = MultibootHeaderBytes().Concat(new byte[4]).Concat(Code(0xF4)).ToArray();
        var k = KernelLoader.Load(_mem, new BootFile("low", Elf(false, 0x2_0010, [new Segment(0x2_0000, text)])), "",
            new BootFile("m", new byte[0x10_0000]));
        Assert.True(k.Module!.Value.Start >= 0x10_0000);
    }
}
