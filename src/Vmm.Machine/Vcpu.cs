using System.Diagnostics;
using Vmm.Boot;
using Vmm.Interop;
using Vmm.Interop.Seccomp;
using Vmm.Kvm;
using Vmm.Memory;
using static Vmm.Interop.KvmConstants;

namespace Vmm.Machine;

/// <summary>What a vCPU loop needs from the machine it belongs to (and nothing more).</summary>
internal interface IVcpuHost
{
    /// <summary>The VM is ending: leave the loop.</summary>
    bool Stopping { get; }

    /// <summary>A pause was requested: call <see cref="Park"/> before entering the guest again.</summary>
    bool PauseRequested { get; }

    /// <summary>Blocks the calling vCPU thread while the VM is paused.</summary>
    void Park(Vcpu vcpu);

    /// <summary>This vCPU ended the VM (a power-off, reset, crash or error); the first report wins.</summary>
    void Finish(VmOutcome outcome);
}

/// <summary>One virtual CPU and the named thread running its KVM_RUN loop. The loop is a small state
/// machine: run → dispatch → continue; interrupted → park while paused → run; until the VM stops or this CPU dies
/// (then a crash report is built, off the hot path).</summary>
internal sealed class Vcpu : IDisposable
{
    private readonly VcpuFd _fd;
    private readonly IVcpuHost _vm;
    private readonly ExitDispatcher _dispatcher;
    private readonly GuestMemory _memory;
    private Thread? _thread;
    private readonly Lock _kickLock = new();
    private int _tid; // kernel thread id while the loop runs; 0 before and after (guarded by _kickLock)

    public Vcpu(VcpuFd fd, IVcpuHost vm, ExitDispatcher dispatcher, GuestMemory memory)
    {
        _fd = fd;
        _vm = vm;
        _dispatcher = dispatcher;
        _memory = memory;
    }

    public int Id => _fd.Id;

    public VcpuStats Stats { get; } = new();

    /// <summary>The KVM vCPU, for setting it up before <see cref="Start"/> (see <see cref="VcpuSetup"/>).</summary>
    internal VcpuFd Fd => _fd;

    public void Start()
    {
        _thread = new Thread(RunLoop) { Name = $"vcpu{Id}", IsBackground = true };
        SeccompThreads.Start(_thread);
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
            // Before the first KVM_RUN: from here on this thread runs the guest.
            Seccomp.Enter(SeccompRole.Vcpu);
            SeccompTestHook.AfterFilter("vcpu", Id);
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
                    if (_vm.PauseRequested)
                        ParkWhilePaused();
                    continue;
                }
                return new VmOutcome(VmExitKind.VmmError, $"vCPU {Id}: KVM_RUN failed: {Errno.Describe(err)}");
            }
            // Allocations are counted over exits that resume the guest: the steady state the zero-allocation
            // rule is about (the final exit builds an outcome and may allocate).
            long allocatedBefore = GC.GetAllocatedBytesForCurrentThread();
            var action = _dispatcher.Dispatch(_fd.RunPage, stats);
            if (action != ExitAction.Continue)
                return CrashReport.FromExit(_fd, action, _memory);
            if (!_vm.Stopping)
                stats.ExitAllocatedBytes += GC.GetAllocatedBytesForCurrentThread() - allocatedBefore;
        }
        return null;
    }

    /// <summary>Parks this thread until resumed. The kick that brought us here left immediate_exit set: clear it, then
    /// look at the pause flag again, because a pause requested between our wake-up and the clear kicked us while we
    /// were outside KVM_RUN, and that kick is gone with the clear.</summary>
    private void ParkWhilePaused()
    {
        while (true)
        {
            _vm.Park(this);
            _fd.SetImmediateExit(false);
            Interlocked.MemoryBarrier(); // the clear must not pass the flag read below (store-load ordering)
            if (!_vm.PauseRequested || _vm.Stopping)
                return;
        }
    }

    /// <summary>Tells the guest it was stopped (KVM_KVMCLOCK_CTRL), so a Linux guest's soft-lockup watchdog does not
    /// count the pause. A guest without kvmclock answers EINVAL: nothing to tell.</summary>
    internal void NotifyPaused() => _fd.TryKvmclockCtrl();

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
