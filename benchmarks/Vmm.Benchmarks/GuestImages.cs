using System.Buffers.Binary;
using System.Text;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace Vmm.Benchmarks;

/// <summary>The micro-guests of the end-to-end comparison (benchmarks/e2e): multiboot a.out-kludge images,
/// entered in 32-bit protected mode (paging off) at 0x100020, that end through QEMU's isa-debug-exit
/// protocol (a 4-byte <c>out</c> of 0 to port 0xf4, process exit status 1 under both vmm and QEMU).</summary>
public static class GuestImages
{
    /// <summary>Exits of each loop guest; the C floor (kvm_exit_floor) is run with the same count.</summary>
    public const uint LoopExits = 20_000;

    /// <summary>Unclaimed guest-physical address the MMIO loop writes to (in the PCI hole, above any RAM).</summary>
    public const uint MmioAddress = 0xD000_0000;

    public const string HelloLine = "hello from a multiboot micro-guest";

    private const uint LoadAddress = 0x10_0000;
    private const int HeaderSize = 32;

    public static IReadOnlyList<string> WriteAll(string directory)
    {
        Directory.CreateDirectory(directory);
        var images = new (string Name, byte[] Image)[]
        {
            ("pio-loop.bin", PioLoop(LoopExits)),
            ("mmio-loop.bin", MmioLoop(LoopExits)),
            ("hello.bin", Hello(HelloLine + "\n")),
        };
        var paths = new List<string>();
        foreach (var (name, image) in images)
        {
            string path = Path.Combine(directory, name);
            File.WriteAllBytes(path, image);
            paths.Add(path);
        }
        return paths;
    }

    /// <summary><paramref name="count"/> one-byte <c>out 0x80, al</c> (the POST-code port), then exit 0.</summary>
    public static byte[] PioLoop(uint count) => Multiboot(a =>
    {
        var loop = a.CreateLabel();
        a.mov(ecx, count);
        a.mov(al, 0x42);
        a.Label(ref loop);
        a.@out(0x80, al);
        a.dec(ecx);
        a.jnz(loop);
        Exit(a);
    });

    /// <summary><paramref name="count"/> four-byte writes to unclaimed <see cref="MmioAddress"/>, then exit 0.</summary>
    public static byte[] MmioLoop(uint count) => Multiboot(a =>
    {
        var loop = a.CreateLabel();
        a.mov(ecx, count);
        a.mov(ebx, MmioAddress);
        a.mov(eax, 0xAB);
        a.Label(ref loop);
        a.mov(__dword_ptr[ebx], eax);
        a.dec(ecx);
        a.jnz(loop);
        Exit(a);
    });

    /// <summary>Prints <paramref name="text"/> on COM1 (poll LSR bit 5 "THR empty", then write THR; no UART
    /// set-up, so it works with whatever the firmware left), then exit 0. Unrolled per character: multiboot
    /// gives no stack and 32-bit code has no RIP-relative data.</summary>
    public static byte[] Hello(string text) => Multiboot(a =>
    {
        foreach (byte c in Encoding.ASCII.GetBytes(text))
        {
            var poll = a.CreateLabel();
            a.mov(dx, 0x3FD);
            a.Label(ref poll);
            a.@in(al, dx);
            a.test(al, 0x20);
            a.jz(poll);
            a.mov(dx, 0x3F8);
            a.mov(al, c);
            a.@out(dx, al);
        }
        Exit(a);
    });

    /// <summary>isa-debug-exit with value 0: a 4-byte write to port 0xf4 (the process exits with status 1).</summary>
    private static void Exit(Assembler a)
    {
        a.mov(dx, 0xF4);
        a.xor(eax, eax);
        a.@out(dx, eax);
        a.cli();
        var halt = a.CreateLabel();
        a.Label(ref halt);
        a.hlt();
        a.jmp(halt);
    }

    /// <summary>32-bit code assembled at 0x100020 behind a multiboot a.out-kludge header (flags 0x00010003:
    /// page-aligned modules, memory info, address fields valid) at file offset 0 / load address 1 MiB.</summary>
    public static byte[] Multiboot(Action<Assembler> body)
    {
        var a = new Assembler(32);
        body(a);
        var ms = new MemoryStream();
        a.Assemble(new StreamCodeWriter(ms), LoadAddress + HeaderSize);
        byte[] code = ms.ToArray();

        const uint magic = 0x1BAD_B002, flags = 0x0001_0003;
        var image = new byte[HeaderSize + code.Length];
        var h = image.AsSpan();
        BinaryPrimitives.WriteUInt32LittleEndian(h[0..], magic);
        BinaryPrimitives.WriteUInt32LittleEndian(h[4..], flags);
        BinaryPrimitives.WriteUInt32LittleEndian(h[8..], unchecked(0u - magic - flags));
        BinaryPrimitives.WriteUInt32LittleEndian(h[12..], LoadAddress);                      // header_addr
        BinaryPrimitives.WriteUInt32LittleEndian(h[16..], LoadAddress);                      // load_addr
        BinaryPrimitives.WriteUInt32LittleEndian(h[20..], LoadAddress + (uint)image.Length); // load_end_addr
        BinaryPrimitives.WriteUInt32LittleEndian(h[24..], 0);                                // bss_end_addr
        BinaryPrimitives.WriteUInt32LittleEndian(h[28..], LoadAddress + HeaderSize);         // entry_addr
        code.CopyTo(image, HeaderSize);
        return image;
    }
}
