using System.Text;
using Iced.Intel;
using Decoder = Iced.Intel.Decoder;
using Vmm.Interop;
using Vmm.Kvm;
using static Vmm.Interop.KvmConstants;
using Vmm.Memory;

namespace Vmm.Machine;

/// <summary>Explains a dead vCPU: registers, segments, control registers and the instructions around RIP,
/// disassembled with Iced from guest memory (walking the guest's page tables when paging is on).</summary>
public static class CrashReport
{
    public static string Build(string headline, kvm_regs regs, kvm_sregs sregs, GuestMemory memory)
    {
        var sb = new StringBuilder();
        sb.AppendLine(headline);
        sb.AppendLine($"  rax={regs.rax:x16} rbx={regs.rbx:x16} rcx={regs.rcx:x16} rdx={regs.rdx:x16}");
        sb.AppendLine($"  rsi={regs.rsi:x16} rdi={regs.rdi:x16} rsp={regs.rsp:x16} rbp={regs.rbp:x16}");
        sb.AppendLine($"  r8 ={regs.r8:x16} r9 ={regs.r9:x16} r10={regs.r10:x16} r11={regs.r11:x16}");
        sb.AppendLine($"  r12={regs.r12:x16} r13={regs.r13:x16} r14={regs.r14:x16} r15={regs.r15:x16}");
        sb.AppendLine($"  rip={regs.rip:x16} rflags={regs.rflags:x8} ({Flags(regs.rflags)})");
        Segment(sb, "cs", sregs.cs); Segment(sb, "ds", sregs.ds); Segment(sb, "ss", sregs.ss);
        Segment(sb, "es", sregs.es); Segment(sb, "fs", sregs.fs); Segment(sb, "gs", sregs.gs);
        Segment(sb, "tr", sregs.tr);
        sb.AppendLine($"  gdt={sregs.gdt.@base:x}/{sregs.gdt.limit:x} idt={sregs.idt.@base:x}/{sregs.idt.limit:x}");
        sb.AppendLine($"  cr0={sregs.cr0:x8} cr2={sregs.cr2:x} cr3={sregs.cr3:x} cr4={sregs.cr4:x} efer={sregs.efer:x} ({Mode(sregs)})");

        int bitness = Bitness(sregs);
        ulong linear = bitness == 64 ? regs.rip : sregs.cs.@base + (bitness == 16 ? regs.rip & 0xFFFF : regs.rip & 0xFFFFFFFF);
        sb.Append(Disassemble(memory, sregs, linear, bitness));
        return sb.ToString().TrimEnd();
    }

    public static int Bitness(in kvm_sregs s)
    {
        if ((s.efer & 0x400) != 0 && s.cs.l != 0)
            return 64;
        return s.cs.db != 0 ? 32 : 16;
    }

    private static string Mode(in kvm_sregs s)
    {
        if ((s.cr0 & 1) == 0)
            return "real mode";
        string paging = (s.cr0 & 0x8000_0000) == 0 ? "paging off" : (s.efer & 0x400) != 0 ? "4-level paging" : (s.cr4 & 0x20) != 0 ? "PAE paging" : "32-bit paging";
        return Bitness(s) switch { 64 => "64-bit long mode", 32 => "32-bit protected mode", _ => "16-bit protected mode" } + ", " + paging;
    }

    private static string Flags(ulong f)
    {
        var parts = new List<string>();
        if ((f & 0x001) != 0) parts.Add("CF");
        if ((f & 0x040) != 0) parts.Add("ZF");
        if ((f & 0x080) != 0) parts.Add("SF");
        if ((f & 0x200) != 0) parts.Add("IF");
        if ((f & 0x400) != 0) parts.Add("DF");
        if ((f & 0x800) != 0) parts.Add("OF");
        return parts.Count == 0 ? "-" : string.Join(" ", parts);
    }

    private static void Segment(StringBuilder sb, string name, in kvm_segment s) =>
        sb.AppendLine($"  {name}={s.selector:x4} base={s.@base:x} limit={s.limit:x} type={s.type:x} s={s.s} dpl={s.dpl} p={s.present} db={s.db} l={s.l} g={s.g}{(s.unusable != 0 ? " unusable" : "")}");

    /// <summary>Guest linear → guest physical through the guest's page tables (or identity when paging is off).</summary>
    public static ulong? Translate(GuestMemory memory, in kvm_sregs s, ulong linear)
    {
        if ((s.cr0 & 0x8000_0000) == 0)
            return linear;
        try
        {
            const ulong addrMask = 0x000F_FFFF_FFFF_F000;
            if ((s.efer & 0x400) != 0)
            {
                ulong table = s.cr3 & addrMask;
                for (int level = 3; level >= 0; level--)
                {
                    ulong index = (linear >> (12 + 9 * level)) & 0x1FF;
                    ulong entry = memory.ReadObj<ulong>(new GuestAddress(table + index * 8));
                    if ((entry & 1) == 0)
                        return null;
                    if (level > 0 && level < 3 && (entry & 0x80) != 0)
                    {
                        ulong pageMask = (1UL << (12 + 9 * level)) - 1;
                        return (entry & addrMask & ~pageMask) | (linear & pageMask);
                    }
                    table = entry & addrMask;
                }
                return table | (linear & 0xFFF);
            }
            if ((s.cr4 & 0x20) != 0)
            {
                ulong pdpte = memory.ReadObj<ulong>(new GuestAddress((s.cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8));
                if ((pdpte & 1) == 0) return null;
                ulong pde = memory.ReadObj<ulong>(new GuestAddress((pdpte & addrMask) + ((linear >> 21) & 0x1FF) * 8));
                if ((pde & 1) == 0) return null;
                if ((pde & 0x80) != 0) return (pde & addrMask & ~0x1F_FFFFUL) | (linear & 0x1F_FFFF);
                ulong pte = memory.ReadObj<ulong>(new GuestAddress((pde & addrMask) + ((linear >> 12) & 0x1FF) * 8));
                if ((pte & 1) == 0) return null;
                return (pte & addrMask) | (linear & 0xFFF);
            }
            uint pde32 = memory.ReadObj<uint>(new GuestAddress((s.cr3 & 0xFFFF_F000) + ((linear >> 22) & 0x3FF) * 4));
            if ((pde32 & 1) == 0) return null;
            if ((pde32 & 0x80) != 0 && (s.cr4 & 0x10) != 0) return (pde32 & 0xFFC0_0000UL) | (linear & 0x3F_FFFF);
            uint pte32 = memory.ReadObj<uint>(new GuestAddress((pde32 & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4));
            if ((pte32 & 1) == 0) return null;
            return (pte32 & 0xFFFF_F000UL) | (linear & 0xFFF);
        }
        catch (GuestMemoryException)
        {
            return null;
        }
    }

    /// <summary>Reads guest-linear bytes one page at a time; unreadable bytes end the read.</summary>
    private static byte[] ReadLinear(GuestMemory memory, in kvm_sregs s, ulong linear, int length)
    {
        var bytes = new List<byte>(length);
        while (bytes.Count < length)
        {
            ulong at = linear + (ulong)bytes.Count;
            ulong? phys = Translate(memory, s, at);
            int chunk = (int)Math.Min((ulong)(length - bytes.Count), 0x1000 - (at & 0xFFF));
            if (phys is null || !memory.TryGetSpan(new GuestAddress(phys.Value), chunk, out var span))
                break;
            bytes.AddRange(span.ToArray());
        }
        return [.. bytes];
    }

    /// <summary>Disassembles a few instructions before RIP (choosing the start that decodes onto RIP exactly)
    /// and after it.</summary>
    public static string Disassemble(GuestMemory memory, in kvm_sregs s, ulong rip, int bitness)
    {
        const int before = 24, after = 40;
        var sb = new StringBuilder();
        sb.AppendLine($"  code at {rip:x} ({bitness}-bit):");
        ulong start = rip >= before ? rip - before : 0;
        byte[] code = ReadLinear(memory, s, start, (int)(rip - start) + after);
        if (code.Length <= (int)(rip - start))
        {
            // The bytes before RIP may be unmapped; try from RIP itself.
            start = rip;
            code = ReadLinear(memory, s, rip, after);
        }
        if (code.Length == 0)
        {
            sb.AppendLine("    (no guest memory at RIP)");
            return sb.ToString();
        }
        // x86 cannot be decoded backwards: decode from every start before RIP, keep the streams that land
        // exactly on RIP, and begin at the earliest instruction boundary that most streams passing over it
        // agree on (streams starting inside an instruction usually fall into step within a few bytes).
        ulong best = rip;
        var streams = new List<(ulong Start, HashSet<ulong> Boundaries)>();
        for (ulong candidate = start; candidate < rip; candidate++)
        {
            int at = (int)(candidate - start);
            if (code[at] == 0 && at + 1 < code.Length && code[at + 1] == 0)
                continue; // zero padding decodes as endless "add [rax],al"; no code starts there
            var boundaries = BoundariesOnto(code, start, candidate, rip, bitness);
            if (boundaries is not null)
                streams.Add((candidate, boundaries));
        }
        foreach (var (candidate, _) in streams)
        {
            int eligible = streams.Count(s => s.Start <= candidate);
            int votes = streams.Count(s => s.Boundaries.Contains(candidate));
            if (votes * 2 > eligible && eligible >= 2)
            {
                best = candidate;
                break;
            }
        }
        var formatter = new NasmFormatter();
        formatter.Options.FirstOperandCharIndex = 8;
        var output = new StringOutput();
        var reader = new ByteArrayCodeReader(code, (int)(best - start), code.Length - (int)(best - start));
        var decoder = Decoder.Create(bitness, reader, best);
        int shownAfter = 0;
        while (reader.CanReadByte && shownAfter < 6)
        {
            decoder.Decode(out var instr);
            if (instr.IsInvalid && instr.IP >= rip && (int)(instr.IP - start) + instr.Length > code.Length)
                break;
            formatter.Format(instr, output);
            int offset = (int)(instr.IP - start);
            string hex = Convert.ToHexString(code, offset, Math.Min(instr.Length, code.Length - offset)).ToLowerInvariant();
            sb.AppendLine($"  {(instr.IP == rip ? "=>" : "  ")} {instr.IP:x}: {hex,-20} {output.ToStringAndReset()}");
            if (instr.IP >= rip)
                shownAfter++;
        }
        return sb.ToString();
    }

    /// <summary>Instruction start addresses from <paramref name="candidate"/> up to RIP, or null if the stream
    /// does not land on RIP.</summary>
    private static HashSet<ulong>? BoundariesOnto(byte[] code, ulong start, ulong candidate, ulong rip, int bitness)
    {
        var reader = new ByteArrayCodeReader(code, (int)(candidate - start), code.Length - (int)(candidate - start));
        var decoder = Decoder.Create(bitness, reader, candidate);
        var boundaries = new HashSet<ulong>();
        while (decoder.IP < rip && reader.CanReadByte)
        {
            boundaries.Add(decoder.IP);
            decoder.Decode(out var instr);
            if (instr.IsInvalid)
                return null;
        }
        return decoder.IP == rip ? boundaries : null;
    }
    /// <summary>Turns a fatal exit into an outcome with a crash report (allocates; runs once, off the hot path).</summary>
    internal static VmOutcome FromExit(VcpuFd fd, ExitAction action, GuestMemory memory)
    {
        int id = fd.Id;
        var run = fd.RunPage;
        uint reason = BitConverter.ToUInt32(run[KvmRunOffsets.exit_reason..]);
        string headline;
        VmExitKind kind = VmExitKind.GuestCrash;
        switch (action)
        {
            case ExitAction.Halt:
                kind = VmExitKind.Halted;
                headline = $"vCPU {id} executed HLT and nothing can wake it (no in-kernel irqchip)";
                break;
            case ExitAction.Shutdown:
                headline = $"vCPU {id} triple-faulted (KVM_EXIT_SHUTDOWN): an exception occurred while delivering a double fault";
                break;
            case ExitAction.FailEntry:
                headline = $"vCPU {id} could not enter the guest (KVM_EXIT_FAIL_ENTRY): hardware entry failure reason 0x{BitConverter.ToUInt64(run[KvmRunOffsets.fail_entry_hardware_entry_failure_reason..]):x} on host CPU {BitConverter.ToUInt32(run[KvmRunOffsets.fail_entry_cpu..])}";
                break;
            case ExitAction.InternalError:
            {
                uint sub = BitConverter.ToUInt32(run[KvmRunOffsets.internal_suberror..]);
                uint n = Math.Min(BitConverter.ToUInt32(run[KvmRunOffsets.internal_ndata..]), 16);
                var data = new List<string>();
                for (int i = 0; i < n; i++)
                    data.Add($"0x{BitConverter.ToUInt64(run[(KvmRunOffsets.internal_data + 8 * i)..]):x}");
                string what = sub switch { 1 => "instruction emulation failed", 2 => "simultaneous exceptions", 3 => "delivery event failed", 4 => "unexpected exit reason", _ => "suberror " + sub };
                headline = $"vCPU {id}: KVM internal error (KVM_EXIT_INTERNAL_ERROR): {what}{(n > 0 ? " data=[" + string.Join(", ", data) + "]" : "")}";
                break;
            }
            case ExitAction.SystemEvent:
            {
                uint type = BitConverter.ToUInt32(run[KvmRunOffsets.system_event_type..]);
                if (type == KVM_SYSTEM_EVENT_SHUTDOWN)
                    return new VmOutcome(VmExitKind.PowerOff, $"vCPU {id}: guest powered off");
                if (type == KVM_SYSTEM_EVENT_RESET)
                    return new VmOutcome(VmExitKind.Reset, $"vCPU {id}: guest requested a reset");
                headline = $"vCPU {id}: KVM system event {type} (crash)";
                break;
            }
            default:
                headline = reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO
                    ? $"vCPU {id}: malformed {(reason == KVM_EXIT_IO ? "port I/O" : "MMIO")} exit in kvm_run"
                    : $"vCPU {id}: unhandled exit reason {reason}";
                break;
        }
        string diagnostic;
        try
        {
            var regs = fd.GetRegs();
            var sregs = fd.GetSregs();
            if (action == ExitAction.Shutdown && regs.rip == 0xFFF0 && sregs.cs.@base == 0xFFFF_0000)
            {
                // AMD SVM leaves the VMCB undefined after a shutdown intercept, so KVM re-initialises the vCPU:
                // what we read back is the reset state, not the state that faulted.
                headline += "\n  (KVM reset this vCPU on the shutdown, as it does on AMD hosts: the registers below are the" +
                    " reset state, not the faulting state; run on an Intel host or single-step to see the faulting code)";
            }
            diagnostic = Build(headline, regs, sregs, memory);
        }
        catch (Exception e)
        {
            diagnostic = headline + $"\n  (registers unavailable: {e.Message})";
        }
        return new VmOutcome(kind, headline, Diagnostic: diagnostic);
    }
}
