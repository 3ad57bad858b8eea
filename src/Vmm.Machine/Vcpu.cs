using System.Diagnostics;
using Vmm.Boot;
using Vmm.Interop;
using Vmm.Kvm;
using Vmm.Memory;
using static Vmm.Interop.KvmConstants;

namespace Vmm.Machine;

/// <summary>One virtual CPU and the named thread running its KVM_RUN loop. The loop is a small state
/// machine: run → dispatch → continue, until the VM stops or this CPU dies (then a crash report is built,
/// off the hot path).</summary>
internal sealed class Vcpu : IDisposable
{
    private readonly VcpuFd _fd;
    private readonly VirtualMachine _vm;
    private readonly ExitDispatcher _dispatcher;
    private readonly GuestMemory _memory;
    private Thread? _thread;
    private readonly Lock _kickLock = new();
    private int _tid; // kernel thread id while the loop runs; 0 before and after (guarded by _kickLock)

    public Vcpu(VcpuFd fd, VirtualMachine vm, ExitDispatcher dispatcher, GuestMemory memory)
    {
        _fd = fd;
        _vm = vm;
        _dispatcher = dispatcher;
        _memory = memory;
    }

    public int Id => _fd.Id;

    public VcpuStats Stats { get; } = new();

    public void ConfigureCpuid(kvm_cpuid_entry2[] supported, int cpuCount, int physicalAddressBits = 0) =>
        _fd.SetCpuid(CpuidTemplate.ForVcpu(supported, Id, cpuCount, physicalAddressBits));

    /// <summary>MSRs as firmware leaves them (the same for every vCPU): SYSENTER/SYSCALL targets and the TSC at
    /// zero, fast strings on in IA32_MISC_ENABLE, and MTRRs enabled with write-back as the default type,
    /// so guests do not see "all blank" MTRRs and disable PAT.</summary>
    public void SetInitialMsrs()
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
        int set = _fd.SetMsrs(msrs);
        if (set != msrs.Length)
            throw new KvmException("KVM_SET_MSRS", Errno.EINVAL, $"vCPU {Id}: KVM refused MSR 0x{msrs[set].index:x} (set {set} of {msrs.Length})");
    }

    /// <summary>Puts the boot CPU into the state the loader defined.</summary>
    public void SetBootState(BootCpuState state)
    {
        var fpu = new kvm_fpu { fcw = 0x37F, mxcsr = 0x1F80 }; // FNINIT / reset values
        _fd.SetFpu(fpu);

        var sregs = _fd.GetSregs();
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
        _fd.SetSregs(sregs);

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
        _fd.SetRegs(regs);
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

    public void Start()
    {
        _thread = new Thread(RunLoop) { Name = $"vcpu{Id}", IsBackground = true };
        _thread.Start();
    }

    /// <summary>Makes the loop leave KVM_RUN soon: immediate_exit covers the window before the next entry,
    /// the signal interrupts a KVM_RUN in progress (e.g. a CPU halted in the kernel).</summary>
    public void Kick()
    {
        lock (_kickLock)
        {
            if (_disposed)
                return;
            _fd.SetImmediateExit(true);
            // Under the lock the thread cannot exit (and its tid be reused) between the check and the signal.
            if (_tid != 0 && _tid != Sys.GetTid())
                Sys.Tgkill(_tid, KickSignal.Number);
        }
    }

    private bool _disposed;

    public void Join() => _thread?.Join();

    private void RunLoop()
    {
        lock (_kickLock)
            _tid = Sys.GetTid();
        long startTicks = Stopwatch.GetTimestamp();
        var (user0, sys0) = Sys.ThreadCpuTime();
        VmOutcome? outcome = null;
        try
        {
            outcome = Loop();
        }
        catch (Exception e)
        {
            outcome = new VmOutcome(VmExitKind.VmmError, $"vCPU {Id}: {e.Message}");
        }
        finally
        {
            var (user1, sys1) = Sys.ThreadCpuTime();
            Stats.UserCpuNs = user1 - user0;
            Stats.SystemCpuNs = sys1 - sys0;
            Stats.WallNs = (long)Stopwatch.GetElapsedTime(startTicks).TotalNanoseconds;
            lock (_kickLock)
                _tid = 0;
        }
        if (outcome is not null)
            _vm.Finish(outcome);
    }

    /// <summary>The hot loop. Nothing in it allocates: the exit is read from the kvm_run page in place and
    /// devices get spans into it.</summary>
    private VmOutcome? Loop()
    {
        var stats = Stats;
        while (!_vm.Stopping)
        {
            int err = _fd.Run();
            if (err != 0)
            {
                if (err == Errno.EINTR || err == Errno.EAGAIN)
                {
                    stats.InterruptedRuns++;
                    continue;
                }
                return new VmOutcome(VmExitKind.VmmError, $"vCPU {Id}: KVM_RUN failed: {Errno.Describe(err)}");
            }
            // Allocations are counted over exits that resume the guest: the steady state the zero-allocation
            // rule is about (the final exit builds an outcome and may allocate).
            long allocatedBefore = GC.GetAllocatedBytesForCurrentThread();
            var action = _dispatcher.Dispatch(_fd.RunPage, stats);
            if (action != ExitAction.Continue)
                return Describe(action);
            if (!_vm.Stopping)
                stats.ExitAllocatedBytes += GC.GetAllocatedBytesForCurrentThread() - allocatedBefore;
        }
        return null;
    }

    /// <summary>Turns a fatal exit into an outcome with a crash report (allocates; runs once).</summary>
    private VmOutcome Describe(ExitAction action)
    {
        var run = _fd.RunPage;
        uint reason = BitConverter.ToUInt32(run[KvmRunOffsets.exit_reason..]);
        string headline;
        VmExitKind kind = VmExitKind.GuestCrash;
        switch (action)
        {
            case ExitAction.Halt:
                kind = VmExitKind.Halted;
                headline = $"vCPU {Id} executed HLT and nothing can wake it (no in-kernel irqchip)";
                break;
            case ExitAction.Shutdown:
                headline = $"vCPU {Id} triple-faulted (KVM_EXIT_SHUTDOWN): an exception occurred while delivering a double fault";
                break;
            case ExitAction.FailEntry:
                headline = $"vCPU {Id} could not enter the guest (KVM_EXIT_FAIL_ENTRY): hardware entry failure reason 0x{BitConverter.ToUInt64(run[KvmRunOffsets.fail_entry_hardware_entry_failure_reason..]):x} on host CPU {BitConverter.ToUInt32(run[KvmRunOffsets.fail_entry_cpu..])}";
                break;
            case ExitAction.InternalError:
            {
                uint sub = BitConverter.ToUInt32(run[KvmRunOffsets.internal_suberror..]);
                uint n = Math.Min(BitConverter.ToUInt32(run[KvmRunOffsets.internal_ndata..]), 16);
                var data = new List<string>();
                for (int i = 0; i < n; i++)
                    data.Add($"0x{BitConverter.ToUInt64(run[(KvmRunOffsets.internal_data + 8 * i)..]):x}");
                string what = sub switch { 1 => "instruction emulation failed", 2 => "simultaneous exceptions", 3 => "delivery event failed", 4 => "unexpected exit reason", _ => "suberror " + sub };
                headline = $"vCPU {Id}: KVM internal error (KVM_EXIT_INTERNAL_ERROR): {what}{(n > 0 ? " data=[" + string.Join(", ", data) + "]" : "")}";
                break;
            }
            case ExitAction.SystemEvent:
            {
                uint type = BitConverter.ToUInt32(run[KvmRunOffsets.system_event_type..]);
                if (type == KVM_SYSTEM_EVENT_SHUTDOWN)
                    return new VmOutcome(VmExitKind.PowerOff, $"vCPU {Id}: guest powered off");
                if (type == KVM_SYSTEM_EVENT_RESET)
                    return new VmOutcome(VmExitKind.Reset, $"vCPU {Id}: guest requested a reset");
                headline = $"vCPU {Id}: KVM system event {type} (crash)";
                break;
            }
            default:
                headline = reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO
                    ? $"vCPU {Id}: malformed {(reason == KVM_EXIT_IO ? "port I/O" : "MMIO")} exit in kvm_run"
                    : $"vCPU {Id}: unhandled exit reason {reason}";
                break;
        }
        string diagnostic;
        try
        {
            var regs = _fd.GetRegs();
            var sregs = _fd.GetSregs();
            if (action == ExitAction.Shutdown && regs.rip == 0xFFF0 && sregs.cs.@base == 0xFFFF_0000)
            {
                // AMD SVM leaves the VMCB undefined after a shutdown intercept, so KVM re-initialises the vCPU:
                // what we read back is the reset state, not the state that faulted.
                headline += "\n  (KVM reset this vCPU on the shutdown, as it does on AMD hosts: the registers below are the" +
                    " reset state, not the faulting state; run on an Intel host or single-step to see the faulting code)";
            }
            diagnostic = CrashReport.Build(headline, regs, sregs, _memory);
        }
        catch (Exception e)
        {
            diagnostic = headline + $"\n  (registers unavailable: {e.Message})";
        }
        return new VmOutcome(kind, headline, Diagnostic: diagnostic);
    }

    public void Dispose()
    {
        lock (_kickLock)
        {
            if (_disposed)
                return;
            _disposed = true;
            _fd.Dispose();
        }
    }
}
