using System.Buffers.Binary;
using System.Text;
using Vmm.Boot;
using Vmm.Memory;

namespace Vmm.Tests.Boot;

public class LinuxLoaderTests : IDisposable
{
    private readonly GuestMemory _mem = GuestMemory.Create(64 * MemoryLayout.MiB);

    public void Dispose() => _mem.Dispose();

    /// <summary>A minimal bzImage: one setup sector after the boot sector, then the protected-mode kernel,
    /// with the header fields a 6.x kernel has.</summary>
    private static byte[] BzImage(Action<byte[]>? patch = null, int payload = 0x3000)
    {
        var i = new byte[1024 + payload];
        i[0x1F1] = 1;                                        // setup_sects
        BinaryPrimitives.WriteUInt16LittleEndian(i.AsSpan(0x1FE), 0xAA55);
        i[0x200] = 0xEB; i[0x201] = 0x66;                    // jump over the header: it ends at 0x268
        BinaryPrimitives.WriteUInt32LittleEndian(i.AsSpan(0x202), 0x53726448);
        BinaryPrimitives.WriteUInt16LittleEndian(i.AsSpan(0x206), 0x020F);
        i[0x211] = 0x01;                                     // LOADED_HIGH
        BinaryPrimitives.WriteUInt32LittleEndian(i.AsSpan(0x22C), 0x7FFF_FFFF); // initrd_addr_max
        BinaryPrimitives.WriteUInt32LittleEndian(i.AsSpan(0x230), 0x20_0000);   // kernel_alignment
        i[0x234] = 1;                                        // relocatable
        BinaryPrimitives.WriteUInt16LittleEndian(i.AsSpan(0x236), 0x0003);      // XLF_KERNEL_64 | can load above 4G
        BinaryPrimitives.WriteUInt32LittleEndian(i.AsSpan(0x238), 2047);        // cmdline_size
        BinaryPrimitives.WriteUInt64LittleEndian(i.AsSpan(0x258), 0x100_0000);  // pref_address 16 MiB
        BinaryPrimitives.WriteUInt32LittleEndian(i.AsSpan(0x260), 0x10_0000);   // init_size
        for (int k = 1024; k < i.Length; k++)
            i[k] = (byte)k;
        patch?.Invoke(i);
        return i;
    }

    private byte Zero(int offset) => _mem.ReadObj<byte>(new GuestAddress(LinuxLoader.ZeroPageAddress + (ulong)offset));
    private uint Zero32(int offset) => _mem.ReadObj<uint>(new GuestAddress(LinuxLoader.ZeroPageAddress + (ulong)offset));

    [Fact]
    public void Loads_the_protected_mode_kernel_at_pref_address_and_enters_64_bit_with_RSI_at_boot_params()
    {
        var k = KernelLoader.Load(_mem, new BootFile("bzImage", BzImage()), "console=ttyS0 root=/dev/vda", null);
        Assert.Equal("Linux bzImage (boot protocol 2.15)", k.Format);
        Assert.Equal(CpuMode.Long64, k.Cpu.Mode);
        Assert.Equal(0x100_0200UL, k.Cpu.Rip);
        Assert.Equal(LinuxLoader.ZeroPageAddress, k.Cpu.Rsi);
        Assert.Equal(BootLayout.CodeSelector64, k.Cpu.Code.Selector); // __BOOT_CS
        Assert.Equal(BootLayout.DataSelector, k.Cpu.Data.Selector);   // __BOOT_DS
        Assert.Equal((byte)(1024 & 0xFF), _mem.ReadObj<byte>(new GuestAddress(0x100_0000)));
        Assert.Equal("console=ttyS0 root=/dev/vda", k.CommandLine); // Linux gets the arguments alone
    }

    [Fact]
    public void Boot_params_carry_the_header_the_loader_fields_the_command_line_and_the_e820_map()
    {
        KernelLoader.Load(_mem, new BootFile("bzImage", BzImage()), "quiet", null);
        Assert.Equal(0x53726448u, Zero32(0x202));            // setup header copied
        Assert.Equal(0xFF, Zero(0x210));                      // type_of_loader
        Assert.Equal(0x81, Zero(0x211) & 0x81);               // LOADED_HIGH | CAN_USE_HEAP
        uint cmd = Zero32(0x228);
        var text = new byte[6];
        _mem.Read(new GuestAddress(cmd), text);
        Assert.Equal("quiet\0", Encoding.ASCII.GetString(text));
        var map = MemoryMap.For(_mem);
        Assert.Equal(map.Count, Zero(0x1E8));
        for (int i = 0; i < map.Count; i++)
        {
            ulong at = LinuxLoader.ZeroPageAddress + 0x2D0 + 20 * (ulong)i;
            Assert.Equal(map[i].Base, _mem.ReadObj<ulong>(new GuestAddress(at)));
            Assert.Equal(map[i].Length, _mem.ReadObj<ulong>(new GuestAddress(at + 8)));
            Assert.Equal((uint)map[i].Type, _mem.ReadObj<uint>(new GuestAddress(at + 16)));
        }
        Assert.Contains(new MemoryMapEntry(0xE000_0000, MemoryLayout.MiB, MemoryType.Reserved), map); // ECAM
    }

    [Fact]
    public void The_initrd_goes_page_aligned_as_high_as_allowed_and_is_described_in_boot_params()
    {
        var initrd = new BootFile("initrd.img", Enumerable.Range(0, 10_000).Select(i => (byte)i).ToArray());
        var k = KernelLoader.Load(_mem, new BootFile("bzImage", BzImage(i => BinaryPrimitives.WriteUInt32LittleEndian(i.AsSpan(0x22C), 0x37FF_FFFF))), "", initrd);
        uint start = Zero32(0x218), size = Zero32(0x21C);
        Assert.Equal(10_000u, size);
        Assert.Equal(0u, start % 4096);
        Assert.True(start + size <= 64 * MemoryLayout.MiB && start + size > 64 * MemoryLayout.MiB - 8192);
        Assert.Equal((start, start + 10_000UL), k.Module);
        Assert.Equal(initrd.Contents[9_999], _mem.ReadObj<byte>(new GuestAddress(start + 9_999UL)));
    }

    [Fact]
    public void A_relocatable_kernel_that_does_not_fit_at_pref_address_moves_to_the_first_aligned_address()
    {
        using var small = GuestMemory.Create(16 * MemoryLayout.MiB);
        var k = KernelLoader.Load(small, new BootFile("bzImage", BzImage()), "", null);
        Assert.Equal(0x20_0200UL, k.Cpu.Rip); // 1 MiB rounded up to kernel_alignment (2 MiB)
    }

    public static TheoryData<string, Action<byte[]>, string> Corrupt => new()
    {
        { "boot flag", i => i[0x1FE] = 0, "boot_flag at offset 0x1fe is 0xaa00, expected 0xaa55" },
        { "old protocol", i => i[0x206] = 0x05, "Linux boot protocol version 2.05 at offset 0x206; vmm needs 2.06 or later" },
        { "zImage", i => i[0x211] = 0, "lacks LOADED_HIGH" },
        { "32-bit only", i => i[0x236] = 0, "lacks XLF_KERNEL_64" },
        { "setup past end", i => i[0x1F1] = 200, "setup_sects 200 at offset 0x1f1" },
        { "init_size too small", i => BinaryPrimitives.WriteUInt32LittleEndian(i.AsSpan(0x260), 0x10), "init_size 0x10 at offset 0x260 is smaller" },
        { "bad alignment", i => BinaryPrimitives.WriteUInt32LittleEndian(i.AsSpan(0x230), 0x30_0000), "kernel_alignment 0x300000 at offset 0x230 is not a power of two" },
        { "fixed address beyond RAM", i => { i[0x234] = 0; BinaryPrimitives.WriteUInt64LittleEndian(i.AsSpan(0x258), 0x1_0000_0000); }, "must run at pref_address 0x100000000" },
    };

    [Theory]
    [MemberData(nameof(Corrupt))]
    public void Corrupted_headers_name_the_field(string what, Action<byte[]> patch, string expected)
    {
        var e = Assert.Throws<KernelImageException>(() => KernelLoader.Load(_mem, new BootFile("bzImage", BzImage(patch)), "", null));
        Assert.True(e.Message.Contains(expected), $"{what}: {e.Message}");
    }

    [Fact]
    public void A_command_line_longer_than_cmdline_size_is_refused()
    {
        var e = Assert.Throws<KernelImageException>(() => KernelLoader.Load(_mem, new BootFile("bzImage", BzImage()), new string('a', 3000), null));
        Assert.Contains("cmdline_size (offset 0x238) allows 2047", e.Message);
    }

    [Fact]
    public void An_initrd_that_does_not_fit_below_initrd_addr_max_is_refused()
    {
        var e = Assert.Throws<KernelImageException>(() => KernelLoader.Load(_mem, new BootFile("bzImage", BzImage()), "", new BootFile("big", new byte[60 * 1024 * 1024])));
        Assert.Contains("initrd big", e.Message);
    }

    [Fact]
    public void The_real_Debian_kernel_header_parses_and_loads()
    {
        // The stock kernel tools/nested-kvm fetches (apt-get download linux-image-*-cloud-amd64).
        var image = File.ReadAllBytes(Vmm.Tests.Kvm.KvmFixture.StockKernel());
        var h = LinuxLoader.ParseHeader(image, "vmlinuz");
        Assert.True(h.Version >= 0x020F, $"protocol 0x{h.Version:x}");
        Assert.True(h.Relocatable);
        Assert.Equal(0x100_0000UL, h.PrefAddress);
        Assert.Equal(0x20_0000u, h.KernelAlignment);
        Assert.True(h.InitSize > image.Length - h.SetupBytes);
        using var big = GuestMemory.Create(256 * MemoryLayout.MiB);
        var k = KernelLoader.Load(big, new BootFile("vmlinuz", image), "console=ttyS0", null);
        Assert.Equal(0x100_0200UL, k.Cpu.Rip);
        // Truncating the real image anywhere in its setup area is a precise error, never a crash.
        foreach (int length in new[] { 0, 0x1F0, 0x203, 0x263, 0x400 })
            Assert.Throws<KernelImageException>(() => KernelLoader.Load(big, new BootFile("cut", image[..length]), "", null));
    }
}
