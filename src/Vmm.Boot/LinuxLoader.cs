using System.Buffers.Binary;
using System.Text;
using Vmm.Memory;

namespace Vmm.Boot;

/// <summary>The Linux x86 boot protocol (Documentation/arch/x86/boot.rst), version 2.06 and later, for
/// bzImage kernels entered at their 64-bit entry point: the setup header is validated, the protected-mode
/// kernel loaded at its preferred address, and the zero page (boot_params) filled with the e820 map, the
/// command line and the initrd before the CPU starts in long mode with RSI pointing at it.</summary>
public static class LinuxLoader
{
    public const ulong ZeroPageAddress = 0x7000;
    public const ulong CommandLineAddress = 0x2_0000;
    public const ushort MinimumVersion = 0x0206;

    // Offsets of setup-header fields, the same in the image and in boot_params (boot.rst, "The real-mode kernel header").
    private const int SetupSects = 0x1F1, SysSize = 0x1F4, BootFlag = 0x1FE, Jump = 0x200, Header = 0x202, Version = 0x206,
        TypeOfLoader = 0x210, LoadFlags = 0x211, RamdiskImage = 0x218, RamdiskSize = 0x21C, HeapEndPtr = 0x224,
        CmdLinePtr = 0x228, InitrdAddrMax = 0x22C, KernelAlignment = 0x230, RelocatableKernel = 0x234,
        XLoadFlags = 0x236, CmdlineSize = 0x238, PrefAddress = 0x258, InitSize = 0x260;

    // boot_params fields outside the setup header (zero-page.rst).
    private const int ExtRamdiskImage = 0x0C0, ExtRamdiskSize = 0x0C4, ExtCmdLinePtr = 0x0C8, E820Entries = 0x1E8, E820Table = 0x2D0;
    private const int E820Max = 128;

    private const byte LOADED_HIGH = 0x01, CAN_USE_HEAP = 0x80;
    private const ushort XLF_KERNEL_64 = 0x01;

    public static bool IsBzImage(ReadOnlySpan<byte> image) =>
        image.Length > Header + 4 && BinaryPrimitives.ReadUInt32LittleEndian(image[Header..]) == 0x5372_6448; // "HdrS"

    /// <summary>The validated setup header.</summary>
    public sealed record SetupHeader(int SetupBytes, ushort Version, ulong PrefAddress, uint KernelAlignment,
        bool Relocatable, uint InitSize, uint InitrdAddrMax, uint CmdlineSize);

    public static SetupHeader ParseHeader(ReadOnlySpan<byte> image, string name)
    {
        if (image.Length < 0x264)
            throw new KernelImageException($"{name}: {image.Length} bytes is too short for a Linux setup header (needs 0x264)");
        ushort bootFlag = BinaryPrimitives.ReadUInt16LittleEndian(image[BootFlag..]);
        if (bootFlag != 0xAA55)
            throw new KernelImageException($"{name}: Linux setup header boot_flag at offset 0x1fe is 0x{bootFlag:x4}, expected 0xaa55");
        if (!IsBzImage(image))
            throw new KernelImageException($"{name}: Linux setup header magic at offset 0x202 is not \"HdrS\"");
        ushort version = BinaryPrimitives.ReadUInt16LittleEndian(image[Version..]);
        if (version < MinimumVersion)
            throw new KernelImageException($"{name}: Linux boot protocol version {version >> 8}.{version & 0xFF:d2} at offset 0x206; vmm needs 2.06 or later");
        byte loadFlags = image[LoadFlags];
        if ((loadFlags & LOADED_HIGH) == 0)
            throw new KernelImageException($"{name}: loadflags 0x{loadFlags:x2} at offset 0x211 lacks LOADED_HIGH: a zImage loaded at 0x10000 is not supported");
        ushort xloadflags = BinaryPrimitives.ReadUInt16LittleEndian(image[XLoadFlags..]);
        if ((xloadflags & XLF_KERNEL_64) == 0)
            throw new KernelImageException($"{name}: xloadflags 0x{xloadflags:x4} at offset 0x236 lacks XLF_KERNEL_64: the kernel has no 64-bit entry point");
        int setupSects = image[SetupSects] == 0 ? 4 : image[SetupSects];
        int setupBytes = (setupSects + 1) * 512;
        if (setupBytes >= image.Length)
            throw new KernelImageException($"{name}: setup_sects {image[SetupSects]} at offset 0x1f1 puts the protected-mode kernel at 0x{setupBytes:x}, past the end of the {image.Length}-byte file");
        // syssize: the protected-mode kernel's length in 16-byte paragraphs. A shorter file was cut off (a partial copy or
        // download); booting it would fault somewhere in the decompressor, so say so before any guest runs.
        ulong payload = BinaryPrimitives.ReadUInt32LittleEndian(image[SysSize..]) * 16UL;
        if ((ulong)(image.Length - setupBytes) < payload)
            throw new KernelImageException($"{name}: truncated: syssize at offset 0x1f4 says the protected-mode kernel is {payload} bytes, " +
                $"the file holds {image.Length - setupBytes} after the {setupBytes}-byte setup code");
        uint alignment = BinaryPrimitives.ReadUInt32LittleEndian(image[KernelAlignment..]);
        bool relocatable = image[RelocatableKernel] != 0;
        if (relocatable && (alignment == 0 || (alignment & (alignment - 1)) != 0))
            throw new KernelImageException($"{name}: kernel_alignment 0x{alignment:x} at offset 0x230 is not a power of two");
        ulong pref = BinaryPrimitives.ReadUInt64LittleEndian(image[PrefAddress..]);
        uint initSize = BinaryPrimitives.ReadUInt32LittleEndian(image[InitSize..]);
        if (initSize < image.Length - setupBytes)
            throw new KernelImageException($"{name}: init_size 0x{initSize:x} at offset 0x260 is smaller than the 0x{image.Length - setupBytes:x}-byte protected-mode kernel");
        return new SetupHeader(setupBytes, version, pref, alignment, relocatable, initSize,
            BinaryPrimitives.ReadUInt32LittleEndian(image[InitrdAddrMax..]), BinaryPrimitives.ReadUInt32LittleEndian(image[CmdlineSize..]));
    }

    public static LoadedKernel Load(GuestMemory memory, BootFile kernel, string arguments, BootFile? initrd)
    {
        var image = kernel.Contents;
        var h = ParseHeader(image, kernel.Name);
        ulong ramEnd = MemoryMap.ContiguousHighMemoryEnd(memory);

        // Load at pref_address; a relocatable kernel that does not fit there goes to the first aligned
        // address at or above 1 MiB (boot.rst: "relocatable_kernel").
        ulong load = h.PrefAddress;
        if (load < MemoryLayout.HighMemoryStart || load + h.InitSize > ramEnd)
        {
            if (!h.Relocatable)
                throw new KernelImageException($"{kernel.Name}: the kernel must run at pref_address 0x{h.PrefAddress:x} and needs init_size 0x{h.InitSize:x} bytes there, beyond guest RAM (ends at 0x{ramEnd:x}); give the VM more --memory");
            load = (MemoryLayout.HighMemoryStart + h.KernelAlignment - 1) & ~((ulong)h.KernelAlignment - 1);
            if (load + h.InitSize > ramEnd)
                throw new KernelImageException($"{kernel.Name}: the kernel needs init_size 0x{h.InitSize:x} bytes at 0x{load:x}, beyond guest RAM (ends at 0x{ramEnd:x}); give the VM more --memory");
        }
        memory.Write(new GuestAddress(load), image.AsSpan(h.SetupBytes));

        // The zero page: the setup header copied from the image, then the loader's fields.
        var zero = new byte[4096];
        int headerEnd = Math.Min(0x202 + image[0x201], image.Length);
        image.AsSpan(SetupSects, headerEnd - SetupSects).CopyTo(zero.AsSpan(SetupSects));
        zero[TypeOfLoader] = 0xFF; // "undefined" loader id
        zero[LoadFlags] = (byte)((zero[LoadFlags] | CAN_USE_HEAP) & ~0x20 /* QUIET */);
        BinaryPrimitives.WriteUInt16LittleEndian(zero.AsSpan(HeapEndPtr), 0xFE00);
        BinaryPrimitives.WriteUInt32LittleEndian(zero.AsSpan(0x214), (uint)load); // code32_start

        byte[] cmd = Encoding.UTF8.GetBytes(arguments);
        uint cmdlineMax = h.CmdlineSize == 0 ? 255u : h.CmdlineSize;
        if ((ulong)cmd.Length > cmdlineMax)
            throw new KernelImageException($"the command line is {cmd.Length} bytes; this kernel's cmdline_size (offset 0x238) allows {cmdlineMax}");
        memory.Clear(new GuestAddress(CommandLineAddress), (ulong)cmd.Length + 1);
        memory.Write(new GuestAddress(CommandLineAddress), cmd);
        BinaryPrimitives.WriteUInt32LittleEndian(zero.AsSpan(CmdLinePtr), (uint)CommandLineAddress);
        BinaryPrimitives.WriteUInt32LittleEndian(zero.AsSpan(ExtCmdLinePtr), 0);

        (ulong, ulong)? initrdRange = null;
        if (initrd is not null)
        {
            // As high as allowed (below initrd_addr_max and the end of low RAM), page-aligned, above the kernel.
            ulong limit = Math.Min((ulong)h.InitrdAddrMax + 1, ramEnd);
            ulong size = (ulong)initrd.Contents.Length;
            ulong start = size > limit ? 0 : (limit - size) & ~0xFFFUL;
            if (start < load + h.InitSize)
                throw new KernelImageException($"initrd {initrd.Name} ({size} bytes) does not fit between the kernel (0x{load:x}+0x{h.InitSize:x}) and 0x{limit:x} (initrd_addr_max / end of RAM); give the VM more --memory");
            memory.Write(new GuestAddress(start), initrd.Contents);
            BinaryPrimitives.WriteUInt32LittleEndian(zero.AsSpan(RamdiskImage), (uint)start);
            BinaryPrimitives.WriteUInt32LittleEndian(zero.AsSpan(RamdiskSize), (uint)size);
            BinaryPrimitives.WriteUInt32LittleEndian(zero.AsSpan(ExtRamdiskImage), (uint)(start >> 32));
            BinaryPrimitives.WriteUInt32LittleEndian(zero.AsSpan(ExtRamdiskSize), (uint)(size >> 32));
            initrdRange = (start, start + size);
        }

        var map = MemoryMap.For(memory);
        if (map.Count > E820Max)
            throw new InvalidOperationException("more memory map entries than boot_params holds");
        zero[E820Entries] = (byte)map.Count;
        for (int i = 0; i < map.Count; i++)
        {
            var e = zero.AsSpan(E820Table + 20 * i, 20);
            BinaryPrimitives.WriteUInt64LittleEndian(e, map[i].Base);
            BinaryPrimitives.WriteUInt64LittleEndian(e[8..], map[i].Length);
            BinaryPrimitives.WriteUInt32LittleEndian(e[16..], (uint)map[i].Type);
        }
        memory.Write(new GuestAddress(ZeroPageAddress), zero);

        BootLayout.WriteGdt(memory);
        ulong cr3 = BootLayout.WriteIdentityPageTables(memory);
        var cpu = new BootCpuState
        {
            Mode = CpuMode.Long64,
            Rip = load + 0x200, // the 64-bit entry point (boot.rst, "64-bit boot protocol")
            Rsi = ZeroPageAddress,
            Rsp = BootLayout.InitialStack,
            Code = X86Segment.Code64(BootLayout.CodeSelector64),
            Data = X86Segment.FlatData(BootLayout.DataSelector),
            GdtBase = BootLayout.GdtAddress,
            GdtLimit = 31,
            Cr0 = 0x8000_0033,
            Cr3 = cr3,
            Cr4 = 0x620,
            Efer = 0x500,
        };
        return new LoadedKernel($"Linux bzImage (boot protocol {h.Version >> 8}.{h.Version & 0xFF:d2})", cpu, arguments,
            [(load, load + h.InitSize)], initrdRange);
    }
}
