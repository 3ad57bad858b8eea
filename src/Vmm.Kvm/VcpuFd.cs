using System.Runtime.InteropServices;
using Vmm.Interop;
using static Vmm.Interop.KvmConstants;

namespace Vmm.Kvm;

/// <summary>A virtual CPU: its fd, its mmapped <c>kvm_run</c> page and the register ioctls.</summary>
public sealed unsafe class VcpuFd : IDisposable
{
    private int _fd;
    private byte* _run;
    private readonly int _runSize;

    internal VcpuFd(int fd, int id, byte* run, int runSize)
    {
        _fd = fd;
        Id = id;
        _run = run;
        _runSize = runSize;
    }

    public int Id { get; }

    public int Fd => _fd;

    /// <summary>The shared <c>kvm_run</c> page (offsets in <see cref="KvmRunOffsets"/>). Valid until the next
    /// <see cref="Run"/> and only while this object is alive: never store it.</summary>
    public Span<byte> RunPage => new(_run, _runSize);

    /// <summary>KVM_RUN. Returns 0 on an exit to handle, or the errno (EINTR when a signal or
    /// <c>immediate_exit</c> interrupted it). Never throws and allocates nothing: this is the hot path.</summary>
    public int Run()
    {
        int r = Sys.Ioctl(_fd, KVM_RUN, 0);
        return r < 0 ? Errno.Last : 0;
    }

    /// <summary>Sets <c>kvm_run.immediate_exit</c>: a KVM_RUN entered afterwards returns EINTR at once. Safe
    /// from any thread; together with a signal it stops a vCPU without a race.</summary>
    public void SetImmediateExit(bool value) => Volatile.Write(ref _run[KvmRunOffsets.immediate_exit], value ? (byte)1 : (byte)0);

    public kvm_regs GetRegs()
    {
        kvm_regs r;
        Check(Sys.Ioctl(_fd, KVM_GET_REGS, &r), "KVM_GET_REGS");
        return r;
    }

    public void SetRegs(in kvm_regs regs)
    {
        fixed (kvm_regs* p = &regs)
            Check(Sys.Ioctl(_fd, KVM_SET_REGS, p), "KVM_SET_REGS");
    }

    public kvm_sregs GetSregs()
    {
        kvm_sregs s;
        Check(Sys.Ioctl(_fd, KVM_GET_SREGS, &s), "KVM_GET_SREGS");
        return s;
    }

    public void SetSregs(in kvm_sregs sregs)
    {
        fixed (kvm_sregs* p = &sregs)
            Check(Sys.Ioctl(_fd, KVM_SET_SREGS, p), "KVM_SET_SREGS");
    }

    public kvm_fpu GetFpu()
    {
        kvm_fpu f;
        Check(Sys.Ioctl(_fd, KVM_GET_FPU, &f), "KVM_GET_FPU");
        return f;
    }

    public void SetFpu(in kvm_fpu fpu)
    {
        fixed (kvm_fpu* p = &fpu)
            Check(Sys.Ioctl(_fd, KVM_SET_FPU, p), "KVM_SET_FPU");
    }

    /// <summary>KVM_KVMCLOCK_CTRL: marks the guest's kvmclock as stopped by the host (PVCLOCK_GUEST_STOPPED), so the
    /// guest's watchdogs discount the pause. Returns false where the guest has not enabled kvmclock (EINVAL) or KVM
    /// lacks it; those are not errors.</summary>
    public bool TryKvmclockCtrl() => Sys.Ioctl(_fd, KVM_KVMCLOCK_CTRL, 0) == 0;

    /// <summary>KVM_GET_MSRS for the indexes in <paramref name="entries"/>; fills their data. Returns how many were read.</summary>
    public int GetMsrs(Span<kvm_msr_entry> entries) => MsrIoctl(entries, KVM_GET_MSRS, "KVM_GET_MSRS");

    /// <summary>KVM_SET_MSRS. Returns how many were set (KVM stops at the first MSR it refuses).</summary>
    public int SetMsrs(ReadOnlySpan<kvm_msr_entry> entries)
    {
        var copy = entries.ToArray();
        return MsrIoctl(copy, KVM_SET_MSRS, "KVM_SET_MSRS");
    }

    private int MsrIoctl(Span<kvm_msr_entry> entries, uint request, string name)
    {
        int bytes = sizeof(kvm_msrs) + entries.Length * sizeof(kvm_msr_entry);
        byte* buf = (byte*)NativeMemory.AllocZeroed((nuint)bytes);
        try
        {
            ((kvm_msrs*)buf)->nmsrs = (uint)entries.Length;
            var body = new Span<kvm_msr_entry>(buf + sizeof(kvm_msrs), entries.Length);
            entries.CopyTo(body);
            int n = Check(Sys.Ioctl(_fd, request, buf), name);
            body.CopyTo(entries);
            return n;
        }
        finally
        {
            NativeMemory.Free(buf);
        }
    }

    /// <summary>KVM_SET_CPUID2: the CPUID leaves this vCPU reports.</summary>
    public void SetCpuid(ReadOnlySpan<kvm_cpuid_entry2> entries)
    {
        int bytes = sizeof(kvm_cpuid2) + entries.Length * sizeof(kvm_cpuid_entry2);
        byte* buf = (byte*)NativeMemory.AllocZeroed((nuint)bytes);
        try
        {
            ((kvm_cpuid2*)buf)->nent = (uint)entries.Length;
            entries.CopyTo(new Span<kvm_cpuid_entry2>(buf + sizeof(kvm_cpuid2), entries.Length));
            Check(Sys.Ioctl(_fd, KVM_SET_CPUID2, buf), "KVM_SET_CPUID2");
        }
        finally
        {
            NativeMemory.Free(buf);
        }
    }

    public uint GetMpState()
    {
        kvm_mp_state s;
        Check(Sys.Ioctl(_fd, KVM_GET_MP_STATE, &s), "KVM_GET_MP_STATE");
        return s.mp_state;
    }

    public void SetMpState(uint state)
    {
        var s = new kvm_mp_state { mp_state = state };
        Check(Sys.Ioctl(_fd, KVM_SET_MP_STATE, &s), "KVM_SET_MP_STATE");
    }

    private int Check(int result, string ioctl)
    {
        if (result < 0)
            throw new KvmException(ioctl, Errno.Last, $"vCPU {Id}");
        return result;
    }

    public void Dispose()
    {
        Sys.Munmap(_run, (nuint)_runSize);
        _run = null;
        Sys.Close(_fd);
        _fd = -1;
    }
}
