using System.Buffers.Binary;
using System.Text;
using Iced.Intel;
using Vmm.Boot;
using static Iced.Intel.AssemblerRegisters;

namespace Vmm.Machine;

/// <summary>The built-in demo guest, assembled at start-up with Iced: a multiboot kernel (a.out-kludge
/// address fields, so it exercises the multiboot loader) that prints a banner and what it reads from the
/// machine — CPU vendor and brand (CPUID), memory size, command line and boot loader name (multiboot
/// info), the PIT's counter moving (in-kernel PIT) — over COM1, then writes 0 to the debug-exit port.</summary>
public static class DemoGuest
{
    public const string Name = "vmm-demo";
    public const string Banner = "vmm demo guest: hello from a guest assembled by vmm at start-up";
    public const string Goodbye = "vmm demo guest: all done, exiting through port 0xf4";

    private const uint LoadAddress = 0x10_0000;
    private const int HeaderSize = 32;
    private const uint DataAddress = LoadAddress + 0x1000;
    private const ushort Com1 = 0x3F8;

    public static BootFile Build()
    {
        var a = new Assembler(32);
        var puts = a.CreateLabel("puts");
        var putDec = a.CreateLabel("put_decimal");
        var putc = a.CreateLabel("putc");
        // Strings and buffers live in a data page after the code, at fixed addresses: Iced's label memory
        // operands are RIP-relative, which 32-bit code does not have.
        var data = new DataBlock(DataAddress);
        uint banner = data.Text(Banner + "\n"), cpuLabel = data.Text("cpu vendor: "), brandLabel = data.Text("cpu brand: ");
        uint memLabel = data.Text("memory: "), mibLabel = data.Text(" MiB\n"), cmdLabel = data.Text("command line: ");
        uint loaderLabel = data.Text("boot loader: "), pitLabel = data.Text("pit: channel 0 is counting\n");
        uint pitNo = data.Text("pit: channel 0 did not move\n"), bye = data.Text(Goodbye + "\n"), nl = data.Text("\n");
        uint vendorBuf = data.Buffer(16), brandBuf = data.Buffer(52);
        var pitYes = a.CreateLabel(); var noBrand = a.CreateLabel();
        var afterBrand = a.CreateLabel(); var pitMoved = a.CreateLabel(); var pitDone = a.CreateLabel();
        var pitLoop = a.CreateLabel();

        // Entry (multiboot): EAX = 0x2BADB002, EBX = multiboot info. Keep EBX in EBP.
        a.mov(ebp, ebx);
        a.mov(esp, 0x8_0000);
        // UART: 115200 8N1, FIFOs on, interrupts off (the demo polls LSR.THRE).
        Out(a, Com1 + 1, 0x00);
        Out(a, Com1 + 3, 0x80);
        Out(a, Com1 + 0, 0x01);
        Out(a, Com1 + 1, 0x00);
        Out(a, Com1 + 3, 0x03);
        Out(a, Com1 + 2, 0x07);
        Out(a, Com1 + 4, 0x03);

        a.mov(esi, banner); a.call(puts);

        // CPU vendor: CPUID leaf 0 → EBX, EDX, ECX.
        a.xor(eax, eax); a.cpuid();
        a.mov(edi, vendorBuf);
        a.mov(__dword_ptr[edi], ebx);
        a.mov(__dword_ptr[edi + 4], edx);
        a.mov(__dword_ptr[edi + 8], ecx);
        a.mov(esi, cpuLabel); a.call(puts);
        a.mov(esi, vendorBuf); a.call(puts);
        a.mov(esi, nl); a.call(puts);

        // Brand string (leaves 0x80000002-4) when the host offers it.
        a.mov(eax, 0x8000_0000); a.cpuid();
        a.cmp(eax, 0x8000_0004); a.jb(noBrand);
        a.mov(edi, brandBuf);
        for (uint leaf = 0x8000_0002; leaf <= 0x8000_0004; leaf++)
        {
            a.mov(eax, leaf); a.cpuid();
            a.mov(__dword_ptr[edi], eax); a.mov(__dword_ptr[edi + 4], ebx);
            a.mov(__dword_ptr[edi + 8], ecx); a.mov(__dword_ptr[edi + 12], edx);
            a.add(edi, 16);
        }
        a.mov(esi, brandLabel); a.call(puts);
        a.mov(esi, brandBuf); a.call(puts);
        a.mov(esi, nl); a.call(puts);
        a.Label(ref noBrand);
        a.nop();

        // Memory: (mem_upper + 1024) KiB → MiB, from multiboot info offset 8.
        a.mov(esi, memLabel); a.call(puts);
        a.mov(eax, __dword_ptr[ebp + 8]); a.add(eax, 1024); a.shr(eax, 10);
        a.call(putDec);
        a.mov(esi, mibLabel); a.call(puts);

        // Command line (offset 16) and boot loader name (offset 64).
        a.mov(esi, cmdLabel); a.call(puts);
        a.mov(esi, __dword_ptr[ebp + 16]); a.call(puts);
        a.mov(esi, nl); a.call(puts);
        a.mov(esi, loaderLabel); a.call(puts);
        a.mov(esi, __dword_ptr[ebp + 64]); a.call(puts);
        a.mov(esi, nl); a.call(puts);

        // PIT channel 0: latch the counter twice and see it move (proves the in-kernel PIT runs).
        Out(a, 0x43, 0x34);           // channel 0, lo/hi, mode 2
        Out(a, 0x40, 0xFF); Out(a, 0x40, 0xFF);
        a.mov(ecx, 0);                // previous reading
        a.mov(edi, 200);              // bounded: at most 200 tries
        a.Label(ref pitLoop);
        Out(a, 0x43, 0x00);           // latch channel 0
        a.@in(al, 0x40); a.mov(bl, al); a.@in(al, 0x40); a.mov(bh, al);
        a.movzx(ebx, bx);
        a.cmp(ecx, 0); a.je(pitMoved); // first reading: remember it
        a.cmp(ebx, ecx); a.jne(pitYes);
        a.Label(ref pitMoved);
        a.mov(ecx, ebx);
        a.dec(edi); a.jnz(pitLoop);
        a.mov(esi, pitNo); a.call(puts); a.jmp(pitDone);
        a.Label(ref pitYes);
        a.mov(esi, pitLabel); a.call(puts);
        a.Label(ref pitDone);

        a.mov(esi, bye); a.call(puts);
        a.mov(dx, 0xF4); a.xor(eax, eax); a.@out(dx, eax);
        a.Label(ref afterBrand);
        a.hlt(); a.jmp(afterBrand);

        // puts: ESI = NUL-terminated string.
        var putsEnd = a.CreateLabel();
        a.Label(ref puts);
        a.lodsb(); a.test(al, al); a.jz(putsEnd);
        a.call(putc); a.jmp(puts);
        a.Label(ref putsEnd);
        a.ret();

        // putc: AL = byte; waits for LSR.THRE.
        var wait = a.CreateLabel();
        a.Label(ref putc);
        a.mov(ah, al); a.mov(dx, Com1 + 5);
        a.Label(ref wait);
        a.@in(al, dx); a.test(al, 0x20); a.jz(wait);
        a.mov(al, ah); a.mov(dx, Com1); a.@out(dx, al);
        a.ret();

        // put_decimal: EAX = value.
        var divLoop = a.CreateLabel(); var outLoop = a.CreateLabel();
        a.Label(ref putDec);
        a.mov(ecx, 0); a.mov(ebx, 10);
        a.Label(ref divLoop);
        a.xor(edx, edx); a.div(ebx); a.push(edx); a.inc(ecx);
        a.test(eax, eax); a.jnz(divLoop);
        a.Label(ref outLoop);
        a.pop(eax); a.add(al, (byte)'0'); a.call(putc);
        a.dec(ecx); a.jnz(outLoop);
        a.ret();

        var code = new MemoryStream();
        a.Assemble(new StreamCodeWriter(code), LoadAddress + HeaderSize);
        if (HeaderSize + code.Length > DataAddress - LoadAddress)
            throw new InvalidOperationException("demo guest code overlaps its data page");

        byte[] dataBytes = data.ToArray();
        var image = new byte[DataAddress - LoadAddress + dataBytes.Length];
        dataBytes.CopyTo(image, (int)(DataAddress - LoadAddress));
        const uint flags = 0x0001_0002; // memory info, address fields
        var h = image.AsSpan();
        BinaryPrimitives.WriteUInt32LittleEndian(h[0..], MultibootHeader.Magic);
        BinaryPrimitives.WriteUInt32LittleEndian(h[4..], flags);
        BinaryPrimitives.WriteUInt32LittleEndian(h[8..], unchecked(0u - MultibootHeader.Magic - flags));
        BinaryPrimitives.WriteUInt32LittleEndian(h[12..], LoadAddress);            // header_addr
        BinaryPrimitives.WriteUInt32LittleEndian(h[16..], LoadAddress);            // load_addr
        BinaryPrimitives.WriteUInt32LittleEndian(h[20..], 0);                      // load_end_addr: whole file
        BinaryPrimitives.WriteUInt32LittleEndian(h[24..], 0);                      // bss_end_addr: none
        BinaryPrimitives.WriteUInt32LittleEndian(h[28..], LoadAddress + HeaderSize); // entry_addr
        code.ToArray().CopyTo(image, HeaderSize);
        return new BootFile(Name, image);
    }

    private static void Out(Assembler a, int port, byte value)
    {
        a.mov(dx, (ushort)port);
        a.mov(al, value);
        a.@out(dx, al);
    }

    /// <summary>Lays out NUL-terminated strings and zeroed buffers from a fixed guest address.</summary>
    private sealed class DataBlock(uint baseAddress)
    {
        private readonly MemoryStream _bytes = new();

        public uint Text(string text) => Add(Encoding.ASCII.GetBytes(text + "\0"));

        public uint Buffer(int size) => Add(new byte[size]);

        private uint Add(byte[] bytes)
        {
            uint at = baseAddress + (uint)_bytes.Length;
            _bytes.Write(bytes);
            return at;
        }

        public byte[] ToArray() => _bytes.ToArray();
    }
}
