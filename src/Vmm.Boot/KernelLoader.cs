using System.Buffers.Binary;
using System.Text;
using Vmm.Memory;

namespace Vmm.Boot;

/// <summary>A file to load, with the name the guest is told (multiboot command lines begin with it).</summary>
public sealed record BootFile(string Name, byte[] Contents)
{
    /// <summary>The largest kernel or initrd vmm reads: what one .NET array holds (about 2 GiB).</summary>
    public static long MaxBytes => Array.MaxLength;
}

/// <summary>What a loader did: the entry state, and a description of what went where (for logs and tests).</summary>
public sealed record LoadedKernel(string Format, BootCpuState Cpu, string CommandLine,
    IReadOnlyList<(ulong Start, ulong End)> KernelRanges, (ulong Start, ulong End)? Module)
{
    /// <summary>Things the kernel asked for that vmm does not provide but that need not stop the boot.</summary>
    public IReadOnlyList<string> Warnings { get; init; } = [];
}

/// <summary>Recognises a kernel image and loads it: Multiboot v1 (ELF32 or the a.out-kludge address fields),
/// entered in 32-bit protected mode as the spec defines; or a 64-bit ELF entered in long mode on
/// identity-mapped page tables. Both get a multiboot information structure (command line, memory map,
/// module 0). Linux bzImage is the next loader to come.</summary>
public static class KernelLoader
{
    /// <summary>Boot structures live below this address; kernels must load above it.</summary>
    public const ulong ReservedLowEnd = 0x1_0000;

    public static LoadedKernel Load(GuestMemory memory, BootFile kernel, string arguments, BootFile? module)
    {
        var image = kernel.Contents;
        if (image.Length == 0)
            throw new KernelImageException($"{kernel.Name}: the kernel image is empty");
        bool isElf = ElfImage.HasElfMagic(image);
        MultibootHeader? multiboot = MultibootHeader.Find(image, out string? nearMiss);

        // The ELF headers decide unless multiboot address fields say where to load: parse them once.
        ElfImage? elf = isElf && (multiboot is null || !multiboot.HasAddressFields) ? ElfImage.Parse(image) : null;
        if (elf?.PvhEntry is not null)
            return LoadPvh(memory, kernel, elf, arguments, module);
        if (elf is { Is64: true })
            return LoadElf64(memory, kernel, elf, arguments, module);
        if (multiboot is not null)
            return LoadMultiboot(memory, kernel, multiboot, elf, arguments, module);
        if (LinuxLoader.IsBzImage(image))
            return LinuxLoader.Load(memory, kernel, arguments, module);
        if (nearMiss is not null)
            throw new KernelImageException(nearMiss);
        if (isElf)
            throw new KernelImageException($"{kernel.Name}: a 32-bit ELF without a multiboot header in its first {MultibootHeader.SearchLimit} bytes; vmm boots multiboot kernels and 64-bit ELF kernels");
        throw new KernelImageException($"{kernel.Name}: not a kernel vmm can boot: no ELF magic at offset 0 and no multiboot header (magic 0x{MultibootHeader.Magic:x8}) in the first {MultibootHeader.SearchLimit} bytes");
    }

    private static LoadedKernel LoadMultiboot(GuestMemory memory, BootFile kernel, MultibootHeader header, ElfImage? elf, string arguments, BootFile? module)
    {
        var image = kernel.Contents;
        List<(ulong, ulong)> ranges;
        ulong entry;
        string format;
        if (header.HasAddressFields)
        {
            format = "multiboot (a.out kludge)";
            (ranges, entry) = LoadAddressFields(memory, image, header);
        }
        else
        {
            format = "multiboot ELF32";
            if (elf is null)
                throw new KernelImageException($"{kernel.Name}: multiboot header at offset 0x{header.FileOffset:x} has no address fields (flag 16) and the image is not ELF: nothing says where to load it");
            if (elf.Is64)
                throw new KernelImageException($"{kernel.Name}: multiboot header at offset 0x{header.FileOffset:x} has no address fields (flag 16) and the image is ELF64; multiboot v1 loads ELF32 only");
            ranges = LoadSegments(memory, image, elf);
            entry = elf.PhysicalEntry;
        }
        CheckEntry(memory, entry, ranges, kernel.Name);

        var info = WriteMultibootInfo(memory, kernel.Name, arguments, module, ranges);
        BootLayout.WriteGdt(memory);
        var warnings = new List<string>();
        if ((header.Flags & MultibootHeader.FlagVideoMode) != 0)
            warnings.Add($"{kernel.Name}: the multiboot header asks for a video mode (flag 2); vmm has no display and passes no video information (as QEMU does)");
        var cpu = new BootCpuState
        {
            Mode = CpuMode.Protected32,
            Rip = entry,
            Rax = MultibootHeader.BootloaderMagic,
            Rbx = BootLayout.MultibootInfoAddress,
            Rsp = BootLayout.InitialStack,
            Code = X86Segment.FlatCode32(BootLayout.CodeSelector32),
            Data = X86Segment.FlatData(BootLayout.DataSelector),
            GdtBase = BootLayout.GdtAddress,
            GdtLimit = 31,
            Cr0 = 0x11, // PE | ET: protected mode, paging off (spec 3.2)
        };
        return new LoadedKernel(format, cpu, info.CommandLine, ranges, info.Module) { Warnings = warnings };
    }

    private static LoadedKernel LoadElf64(GuestMemory memory, BootFile kernel, ElfImage elf, string arguments, BootFile? module)
    {
        var ranges = LoadSegments(memory, kernel.Contents, elf);
        ulong entry = elf.PhysicalEntry;
        CheckEntry(memory, entry, ranges, kernel.Name);
        if (entry >= MemoryLayout.MmioHoleEnd)
            throw new KernelImageException($"{kernel.Name}: ELF entry point 0x{entry:x} is above the 4 GiB identity map");

        var info = WriteMultibootInfo(memory, kernel.Name, arguments, module, ranges);
        BootLayout.WriteGdt(memory);
        ulong cr3 = BootLayout.WriteIdentityPageTables(memory);
        var cpu = new BootCpuState
        {
            Mode = CpuMode.Long64,
            Rip = entry,
            // The multiboot handshake in long mode too, so 64-bit kernels find their command line and memory map.
            Rax = MultibootHeader.BootloaderMagic,
            Rbx = BootLayout.MultibootInfoAddress,
            Rdi = BootLayout.MultibootInfoAddress,
            Rsp = BootLayout.InitialStack,
            Code = X86Segment.Code64(BootLayout.CodeSelector64),
            Data = X86Segment.FlatData(BootLayout.DataSelector),
            GdtBase = BootLayout.GdtAddress,
            GdtLimit = 31,
            Cr0 = 0x8000_0033, // PG | NE | ET | MP | PE
            Cr3 = cr3,
            Cr4 = 0x620,       // PAE | OSFXSR | OSXMMEXCPT: compilers use SSE in 64-bit code
            Efer = 0x500,      // LME | LMA
        };
        return new LoadedKernel("ELF64 (long mode)", cpu, info.CommandLine, ranges, info.Module);
    }

    public const uint HvmStartMagic = 0x336E_C578;

    /// <summary>An uncompressed kernel with a PVH entry note (Linux vmlinux with CONFIG_PVH): loaded by its
    /// PT_LOAD segments and entered in 32-bit protected mode at the note's address with EBX pointing at an
    /// hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h, version 1): memory map, command line,
    /// the initrd as module 0, and the RSDP.</summary>
    private static LoadedKernel LoadPvh(GuestMemory memory, BootFile kernel, ElfImage elf, string arguments, BootFile? module)
    {
        var ranges = LoadSegments(memory, kernel.Contents, elf);
        ulong entry = elf.PvhEntry!.Value;
        CheckEntry(memory, entry, ranges, kernel.Name);

        const ulong startInfo = BootLayout.MultibootInfoAddress, memmapAt = BootLayout.MultibootMmapAddress,
            modlistAt = BootLayout.MultibootModulesAddress;
        byte[] cmd = Encoding.UTF8.GetBytes(arguments);
        if (cmd.Length >= BootLayout.CommandLineMax)
            throw new KernelImageException($"the command line is {cmd.Length} bytes; at most {BootLayout.CommandLineMax - 1} fit");
        memory.Clear(new GuestAddress(BootLayout.CommandLineAddress), BootLayout.CommandLineMax);
        memory.Write(new GuestAddress(BootLayout.CommandLineAddress), cmd);

        var map = MemoryMap.For(memory);
        Span<byte> e = stackalloc byte[24];
        for (int i = 0; i < map.Count; i++)
        {
            e.Clear();
            BinaryPrimitives.WriteUInt64LittleEndian(e, map[i].Base);
            BinaryPrimitives.WriteUInt64LittleEndian(e[8..], map[i].Length);
            BinaryPrimitives.WriteUInt32LittleEndian(e[16..], (uint)map[i].Type);
            memory.Write(new GuestAddress(memmapAt + 24 * (ulong)i), e);
        }

        Span<byte> info = stackalloc byte[56];
        info.Clear();
        W32(info, 0, HvmStartMagic);
        W32(info, 4, 1);                                                                 // version
        BinaryPrimitives.WriteUInt64LittleEndian(info[24..], BootLayout.CommandLineAddress); // cmdline_paddr
        BinaryPrimitives.WriteUInt64LittleEndian(info[32..], Acpi.AcpiTables.RsdpAddress);   // rsdp_paddr
        BinaryPrimitives.WriteUInt64LittleEndian(info[40..], memmapAt);                  // memmap_paddr
        W32(info, 48, (uint)map.Count);                                                  // memmap_entries
        (ulong, ulong)? moduleRange = null;
        if (module is not null)
        {
            ulong kernelEnd = ranges.Max(r => r.Item2);
            ulong start = Math.Max((kernelEnd + 0xFFF) & ~0xFFFUL, MemoryLayout.HighMemoryStart);
            ulong size = (ulong)module.Contents.Length;
            if (!memory.IsValidRange(new GuestAddress(start), size) || start + size > MemoryMap.ContiguousHighMemoryEnd(memory))
                throw new KernelImageException($"module {module.Name} ({size} bytes) does not fit in guest RAM after the kernel (which ends at 0x{kernelEnd:x}); give the VM more --memory");
            memory.Write(new GuestAddress(start), module.Contents);
            Span<byte> mod = stackalloc byte[32];
            mod.Clear();
            BinaryPrimitives.WriteUInt64LittleEndian(mod, start);
            BinaryPrimitives.WriteUInt64LittleEndian(mod[8..], size);
            memory.Write(new GuestAddress(modlistAt), mod);
            W32(info, 12, 1);                                                            // nr_modules
            BinaryPrimitives.WriteUInt64LittleEndian(info[16..], modlistAt);             // modlist_paddr
            moduleRange = (start, start + size);
        }
        memory.Write(new GuestAddress(startInfo), info);
        BootLayout.WriteGdt(memory);
        var cpu = new BootCpuState
        {
            Mode = CpuMode.Protected32,
            Rip = entry,
            Rbx = startInfo,
            Rsp = BootLayout.InitialStack,
            Code = X86Segment.FlatCode32(BootLayout.CodeSelector32),
            Data = X86Segment.FlatData(BootLayout.DataSelector),
            GdtBase = BootLayout.GdtAddress,
            GdtLimit = 31,
            Cr0 = 0x11, // PE | ET; paging off, CR4 clear (PVH boot ABI)
        };
        return new LoadedKernel("PVH ELF (hvm_start_info)", cpu, arguments, ranges, moduleRange);
    }

    private static (List<(ulong, ulong)>, ulong) LoadAddressFields(GuestMemory memory, byte[] image, MultibootHeader h)
    {
        int at = h.FileOffset;
        if (h.LoadAddr > h.HeaderAddr)
            throw new KernelImageException($"multiboot header at offset 0x{at:x}: load_addr 0x{h.LoadAddr:x} (offset 0x{at + 16:x}) is above header_addr 0x{h.HeaderAddr:x}");
        long fileStart = at - (long)(h.HeaderAddr - h.LoadAddr);
        if (fileStart < 0)
            throw new KernelImageException($"multiboot header at offset 0x{at:x}: header_addr 0x{h.HeaderAddr:x} - load_addr 0x{h.LoadAddr:x} puts the text start before the start of the file");
        ulong loadEnd = h.LoadEndAddr == 0 ? h.LoadAddr + (ulong)(image.Length - fileStart) : h.LoadEndAddr;
        if (loadEnd < h.LoadAddr)
            throw new KernelImageException($"multiboot header at offset 0x{at:x}: load_end_addr 0x{h.LoadEndAddr:x} (offset 0x{at + 20:x}) is below load_addr 0x{h.LoadAddr:x}");
        ulong loadSize = loadEnd - h.LoadAddr;
        if ((ulong)fileStart + loadSize > (ulong)image.Length)
            throw new KernelImageException($"multiboot header at offset 0x{at:x}: load_end_addr 0x{loadEnd:x} (offset 0x{at + 20:x}) asks for 0x{loadSize:x} bytes from file offset 0x{fileStart:x}, past the end of the {image.Length}-byte file");
        ulong bssEnd = h.BssEndAddr == 0 ? loadEnd : h.BssEndAddr;
        if (bssEnd < loadEnd)
            throw new KernelImageException($"multiboot header at offset 0x{at:x}: bss_end_addr 0x{h.BssEndAddr:x} (offset 0x{at + 24:x}) is below load_end_addr 0x{loadEnd:x}");
        CheckPlacement(memory, h.LoadAddr, bssEnd - h.LoadAddr, $"multiboot header at offset 0x{at:x}: load_addr 0x{h.LoadAddr:x}..bss_end_addr 0x{bssEnd:x}");
        memory.Write(new GuestAddress(h.LoadAddr), image.AsSpan((int)fileStart, (int)loadSize));
        memory.Clear(new GuestAddress(loadEnd), bssEnd - loadEnd);
        return ([(h.LoadAddr, bssEnd)], h.EntryAddr);
    }

    private static List<(ulong, ulong)> LoadSegments(GuestMemory memory, byte[] image, ElfImage elf)
    {
        var ranges = new List<(ulong, ulong)>();
        foreach (var s in elf.Segments)
        {
            if (s.MemorySize == 0)
                continue;
            CheckPlacement(memory, s.PhysicalAddress, s.MemorySize,
                $"ELF program header {s.Index}: p_paddr 0x{s.PhysicalAddress:x} + p_memsz 0x{s.MemorySize:x}");
            memory.Write(new GuestAddress(s.PhysicalAddress), image.AsSpan((int)s.FileOffset, (int)s.FileSize));
            memory.Clear(new GuestAddress(s.PhysicalAddress + s.FileSize), s.MemorySize - s.FileSize);
            ranges.Add((s.PhysicalAddress, s.PhysicalAddress + s.MemorySize));
        }
        return ranges;
    }

    private static void CheckPlacement(GuestMemory memory, ulong start, ulong size, string what)
    {
        if (start < ReservedLowEnd)
            throw new KernelImageException($"{what} overlaps vmm's boot structures below 0x{ReservedLowEnd:x} (GDT, multiboot info, page tables, stack); link the kernel at 1 MiB or above");
        if (start < MemoryLayout.HighMemoryStart && start + size > MemoryMap.EbdaStart)
            throw new KernelImageException($"{what} overlaps the EBDA/BIOS area 0x{MemoryMap.EbdaStart:x}-0x{MemoryLayout.HighMemoryStart - 1:x} the memory map reports as reserved; link the kernel at 1 MiB or above");
        if (!memory.IsValidRange(new GuestAddress(start), size))
            throw new KernelImageException($"{what} is outside guest RAM ({DescribeRam(memory)}); link the kernel lower or give the VM more --memory");
    }

    private static void CheckEntry(GuestMemory memory, ulong entry, List<(ulong Start, ulong End)> ranges, string name)
    {
        foreach (var (start, end) in ranges)
        {
            if (entry >= start && entry < end)
                return;
        }
        throw new KernelImageException($"{name}: entry point 0x{entry:x} is not inside any loaded segment ({string.Join(", ", ranges.Select(r => $"0x{r.Start:x}-0x{r.End - 1:x}"))})");
    }

    private static string DescribeRam(GuestMemory memory) =>
        string.Join(", ", memory.Regions.Select(r => $"0x{r.Start.Value:x}-0x{r.End.Value - 1:x}"));

    private sealed record InfoResult(string CommandLine, (ulong, ulong)? Module);

    /// <summary>The multiboot information structure (spec 3.3) with mem_lower/upper, the memory map, the
    /// command line (kernel name, then arguments, as GRUB and QEMU pass it), module 0 and the loader name.</summary>
    private static InfoResult WriteMultibootInfo(GuestMemory memory, string kernelName, string arguments, BootFile? module,
        List<(ulong Start, ulong End)> kernelRanges)
    {
        const uint MEM = 1 << 0, CMDLINE = 1 << 2, MODS = 1 << 3, MMAP = 1 << 6, LOADER_NAME = 1 << 9;
        string commandLine = arguments.Length == 0 ? kernelName : kernelName + " " + arguments;
        byte[] cmd = Encoding.UTF8.GetBytes(commandLine);
        if (cmd.Length >= BootLayout.CommandLineMax)
            throw new KernelImageException($"the command line is {cmd.Length} bytes; at most {BootLayout.CommandLineMax - 1} fit");

        Span<byte> info = stackalloc byte[88];
        info.Clear();
        uint flags = MEM | CMDLINE | MMAP | LOADER_NAME;
        var map = MemoryMap.For(memory);
        ulong highEnd = MemoryMap.ContiguousHighMemoryEnd(memory);
        // mem_lower: KiB of conventional memory; mem_upper: KiB from 1 MiB to the first hole (spec 3.3).
        W32(info, 4, (uint)(MemoryMap.EbdaStart / 1024));
        W32(info, 8, (uint)Math.Min((highEnd - MemoryLayout.HighMemoryStart) / 1024, uint.MaxValue));

        memory.Clear(new GuestAddress(BootLayout.CommandLineAddress), BootLayout.CommandLineMax);
        memory.Write(new GuestAddress(BootLayout.CommandLineAddress), cmd);
        W32(info, 16, (uint)BootLayout.CommandLineAddress);

        Span<byte> entry = stackalloc byte[24];
        ulong mmapAt = BootLayout.MultibootMmapAddress;
        foreach (var e in map)
        {
            W32(entry, 0, 20); // size of the rest of the entry
            BinaryPrimitives.WriteUInt64LittleEndian(entry[4..], e.Base);
            BinaryPrimitives.WriteUInt64LittleEndian(entry[12..], e.Length);
            W32(entry, 20, (uint)e.Type);
            memory.Write(new GuestAddress(mmapAt), entry);
            mmapAt += 24;
        }
        W32(info, 44, (uint)(mmapAt - BootLayout.MultibootMmapAddress));
        W32(info, 48, (uint)BootLayout.MultibootMmapAddress);

        (ulong, ulong)? moduleRange = null;
        if (module is not null)
        {
            ulong kernelEnd = kernelRanges.Max(r => r.End);
            // Page-aligned whether or not flag 0 asks, and never in the reserved area below 1 MiB.
            ulong start = Math.Max((kernelEnd + 0xFFF) & ~0xFFFUL, MemoryLayout.HighMemoryStart);
            ulong end = start + (ulong)module.Contents.Length;
            if (!memory.IsValidRange(new GuestAddress(start), (ulong)module.Contents.Length) || end > highEnd)
                throw new KernelImageException($"module {module.Name} ({module.Contents.Length} bytes) does not fit in guest RAM after the kernel (which ends at 0x{kernelEnd:x}; RAM ends at 0x{highEnd:x}); give the VM more --memory");
            if (end > uint.MaxValue)
                throw new KernelImageException($"module {module.Name} would end above 4 GiB (0x{end:x}), beyond multiboot's 32-bit fields");
            memory.Write(new GuestAddress(start), module.Contents);
            byte[] name = Encoding.UTF8.GetBytes(module.Name);
            int nameLength = Math.Min(name.Length, 0x6FF);
            memory.Clear(new GuestAddress(BootLayout.MultibootModuleStringsAddress), (ulong)nameLength + 1);
            memory.Write(new GuestAddress(BootLayout.MultibootModuleStringsAddress), name.AsSpan(0, nameLength));
            Span<byte> mod = stackalloc byte[16];
            mod.Clear();
            W32(mod, 0, (uint)start);
            W32(mod, 4, (uint)end);
            W32(mod, 8, (uint)BootLayout.MultibootModuleStringsAddress);
            memory.Write(new GuestAddress(BootLayout.MultibootModulesAddress), mod);
            flags |= MODS;
            W32(info, 20, 1);
            W32(info, 24, (uint)BootLayout.MultibootModulesAddress);
            moduleRange = (start, end);
        }

        byte[] loaderName = Encoding.ASCII.GetBytes("vmm\0");
        memory.Write(new GuestAddress(BootLayout.BootLoaderNameAddress), loaderName);
        W32(info, 64, (uint)BootLayout.BootLoaderNameAddress);
        W32(info, 0, flags);
        memory.Write(new GuestAddress(BootLayout.MultibootInfoAddress), info);
        return new InfoResult(commandLine, moduleRange);
    }

    private static void W32(Span<byte> b, int at, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(b[at..], v);
}
