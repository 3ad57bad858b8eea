using System.Runtime.InteropServices;

namespace Vmm.Interop.Seccomp;

/// <summary>One classic BPF instruction, <c>struct sock_filter</c> from <c>&lt;linux/filter.h&gt;</c>.</summary>
[StructLayout(LayoutKind.Sequential)]
public readonly record struct sock_filter(ushort code, byte jt, byte jf, uint k);

/// <summary>Classic BPF opcodes (<c>&lt;linux/bpf_common.h&gt;</c>) and the seccomp ABI (<c>&lt;linux/seccomp.h&gt;</c>,
/// <c>&lt;linux/audit.h&gt;</c>) that the filters use.</summary>
public static class Bpf
{
    public const ushort BPF_LD = 0x00, BPF_JMP = 0x05, BPF_RET = 0x06, BPF_ALU = 0x04;
    public const ushort BPF_W = 0x00, BPF_ABS = 0x20, BPF_K = 0x00;
    public const ushort BPF_JA = 0x00, BPF_JEQ = 0x10, BPF_JGT = 0x20, BPF_JGE = 0x30, BPF_JSET = 0x40;
    public const ushort BPF_AND = 0x50;

    /// <summary><c>struct seccomp_data</c>: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].</summary>
    public const uint OffsetNr = 0, OffsetArch = 4, OffsetArgs = 16;

    public const uint AUDIT_ARCH_X86_64 = 0xC000003E; // EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
    /// <summary>x32 system calls are x86-64 numbers with this bit set; the same arch value, so they must be refused
    /// by number or every rule could be bypassed through the x32 entry (seccomp_filter.rst).</summary>
    public const uint X32_SYSCALL_BIT = 0x40000000;

    public const uint SECCOMP_RET_KILL_PROCESS = 0x80000000, SECCOMP_RET_KILL_THREAD = 0x00000000,
        SECCOMP_RET_TRAP = 0x00030000, SECCOMP_RET_ERRNO = 0x00050000, SECCOMP_RET_LOG = 0x7FFC0000,
        SECCOMP_RET_ALLOW = 0x7FFF0000;

    /// <summary>The kernel's limit on one program (BPF_MAXINSNS).</summary>
    public const int MaxInstructions = 4096;

    public static sock_filter Stmt(ushort code, uint k) => new(code, 0, 0, k);
    public static sock_filter Jump(ushort code, uint k, byte jt, byte jf) => new(code, jt, jf, k);
    public static sock_filter LoadAbs(uint offset) => Stmt(BPF_LD | BPF_W | BPF_ABS, offset);
    public static sock_filter Ret(uint action) => Stmt(BPF_RET | BPF_K, action);
}
