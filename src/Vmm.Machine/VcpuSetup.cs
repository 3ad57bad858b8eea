using Vmm.Boot;
using Vmm.Interop;
using Vmm.Kvm;

namespace Vmm.Machine;

/// <summary>A vCPU's state before it first runs: the CPUID it reports, the MSRs firmware would leave, and (for the
/// boot CPU) the registers the loader defined. Kept apart from the run loop, which only runs.</summary>
internal static class VcpuSetup
{
    public static void ConfigureCpuid(VcpuFd fd, kvm_cpuid_entry2[] supported, int cpuCount, int physicalAddressBits = 0) =>
        fd.SetCpuid(CpuidTemplate.ForVcpu(supported, fd.Id, cpuCount, physicalAddressBits));

    /// <summary>MSRs as firmware leaves them (the same for every vCPU): SYSENTER/SYSCALL targets and the TSC at
    /// zero, fast strings on in IA32_MISC_ENABLE, and MTRRs enabled with write-back as the default type,
    /// so guests do not see "all blank" MTRRs and disable PAT.</summary>
    public static void SetInitialMsrs(VcpuFd fd)
    {
        ReadOnlySpan<kvm_msr_entry> msrs =
        [
            new() { index = 0x174 }, // IA32_SYSENTER_CS
            new() { index = 0x175 }, // IA32_SYSENTER_ESP
            new() { index = 0x176 }, // IA32_SYSENTER_EIP
            new() { index = 0xC000_0081 }, // STAR
            new() { index = 0xC000_0082 }, // LSTAR
            new() { index = 0xC000_0083 }, // CSTAR
            new() { index = 0xC000_0084 }, // SYSCALL_MASK
            new() { index = 0xC000_0102 }, // KERNEL_GS_BASE
            new() { index = 0x10 },  // IA32_TSC
            new() { index = 0x1A0, data = 1 }, // IA32_MISC_ENABLE: fast strings
            new() { index = 0x2FF, data = (1 << 11) | 6 }, // IA32_MTRR_DEF_TYPE: enabled, write-back
        ];
        int set = fd.SetMsrs(msrs);
        if (set != msrs.Length)
            throw new KvmException("KVM_SET_MSRS", Errno.EINVAL, $"vCPU {fd.Id}: KVM refused MSR 0x{msrs[set].index:x} (set {set} of {msrs.Length})");
    }

    /// <summary>Puts the boot CPU into the state the loader defined.</summary>
    public static void SetBootState(VcpuFd fd, BootCpuState state)
    {
        var fpu = new kvm_fpu { fcw = 0x37F, mxcsr = 0x1F80 }; // FNINIT / reset values
        fd.SetFpu(fpu);

        var sregs = fd.GetSregs();
        var code = ToKvm(state.Code);
        var data = ToKvm(state.Data);
        sregs.cs = code;
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
        sregs.gdt.@base = state.GdtBase;
        sregs.gdt.limit = state.GdtLimit;
        sregs.cr0 = state.Cr0;
        sregs.cr3 = state.Cr3;
        sregs.cr4 = state.Cr4;
        sregs.efer = state.Efer;
        fd.SetSregs(sregs);

        var regs = new kvm_regs
        {
            rip = state.Rip,
            rsp = state.Rsp,
            rax = state.Rax,
            rbx = state.Rbx,
            rsi = state.Rsi,
            rdi = state.Rdi,
            rflags = state.Rflags,
        };
        fd.SetRegs(regs);
    }

    private static kvm_segment ToKvm(X86Segment s) => new()
    {
        @base = s.Base,
        limit = s.Limit,
        selector = s.Selector,
        type = s.Type,
        present = s.Present ? (byte)1 : (byte)0,
        dpl = s.Dpl,
        db = s.DefaultBig ? (byte)1 : (byte)0,
        s = s.CodeOrData ? (byte)1 : (byte)0,
        l = s.LongMode ? (byte)1 : (byte)0,
        g = s.Granularity ? (byte)1 : (byte)0,
    };
}
