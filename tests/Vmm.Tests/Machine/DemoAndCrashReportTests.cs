using Iced.Intel;
using Vmm.Boot;
using Vmm.Interop;
using Vmm.Machine;
using Vmm.Memory;
using static Iced.Intel.AssemblerRegisters;

namespace Vmm.Tests.Machine;

public class DemoAndCrashReportTests
{
    [Fact]
    public void Demo_guest_is_a_multiboot_image_whose_code_starts_by_saving_the_info_pointer()
    {
        var demo = DemoGuest.Build();
        using var mem = GuestMemory.Create(32 * MemoryLayout.MiB);
        var k = KernelLoader.Load(mem, demo, "", null);
        Assert.Equal("multiboot (a.out kludge)", k.Format);
        var code = mem.GetSpan(new GuestAddress(k.Cpu.Rip), 16).ToArray();
        var decoder = Iced.Intel.Decoder.Create(32, new ByteArrayCodeReader(code), k.Cpu.Rip);
        decoder.Decode(out var first);
        Assert.Equal("mov ebp,ebx", first.ToString());
        // Every message the guest prints is in the image.
        string text = System.Text.Encoding.ASCII.GetString(demo.Contents);
        Assert.Contains(DemoGuest.Banner, text);
        Assert.Contains(DemoGuest.Goodbye, text);
    }

    private static kvm_segment Seg(bool code, bool is64, bool big) => new()
    {
        type = code ? (byte)0xB : (byte)0x3, present = 1, s = 1, l = is64 ? (byte)1 : (byte)0, db = big ? (byte)1 : (byte)0,
        g = 1, limit = 0xFFFFFFFF, selector = code ? (ushort)0x10 : (ushort)0x18,
    };

    [Fact]
    public void Crash_report_disassembles_around_RIP_in_long_mode_through_the_page_tables()
    {
        using var mem = GuestMemory.Create(32 * MemoryLayout.MiB);
        var a = new Assembler(64);
        // A realistic prologue before the fault, so the bytes before RIP decode one way only.
        a.push(rbp); a.mov(rbp, rsp); a.sub(rsp, 0x20); a.mov(__qword_ptr[rbp - 8], rdi); a.mov(eax, 0x1234); a.add(rax, rbx); a.ud2(); a.nop();
        var ms = new MemoryStream();
        a.Assemble(new StreamCodeWriter(ms), 0x20_0000);
        mem.Write(new GuestAddress(0x20_0000), ms.ToArray());
        ulong cr3 = BootLayout.WriteIdentityPageTables(mem);
        var sregs = new kvm_sregs { cs = Seg(true, true, false), ds = Seg(false, false, true), cr0 = 0x8000_0011, cr3 = cr3, cr4 = 0x20, efer = 0x500 };
        ulong ripOfUd2 = 0x20_0000 + 1 + 3 + 4 + 4 + 5 + 3;
        var regs = new kvm_regs { rip = ripOfUd2, rax = 0x1234 };
        string report = CrashReport.Build("vCPU 0 triple-faulted", regs, sregs, mem);
        Assert.Contains("vCPU 0 triple-faulted", report);
        Assert.Contains("64-bit long mode, 4-level paging", report);
        Assert.Contains("rax=0000000000001234", report);
        Assert.True(System.Text.RegularExpressions.Regex.IsMatch(report, @"=> 200014: 0f0b\s+ud2"), report);
        Assert.True(System.Text.RegularExpressions.Regex.IsMatch(report, @"   20000c: b834120000\s+mov\s+eax,1234h"), report);
        Assert.True(System.Text.RegularExpressions.Regex.IsMatch(report, @"   200011: 4801d8\s+add\s+rax,rbx"), report);
    }

    [Fact]
    public void Crash_report_handles_real_mode_addresses_and_unmapped_RIP()
    {
        using var mem = GuestMemory.Create(2 * MemoryLayout.MiB);
        mem.Write(new GuestAddress(0xF_0010), new byte[] { 0xEB, 0xFE }); // jmp $
        var cs = new kvm_segment { @base = 0xF_0000, selector = 0xF000, limit = 0xFFFF, type = 0xB, present = 1, s = 1 };
        var sregs = new kvm_sregs { cs = cs };
        string report = CrashReport.Build("stuck", new kvm_regs { rip = 0x10 }, sregs, mem);
        Assert.Contains("real mode", report);
        Assert.Matches(@"=> f0010: ebfe\s+jmp", report);

        var lost = CrashReport.Build("gone", new kvm_regs { rip = 0x7000_0000 }, new kvm_sregs { cs = Seg(true, false, true), cr0 = 1 }, mem);
        Assert.Contains("(no guest memory at RIP)", lost);
    }
}
