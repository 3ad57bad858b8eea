using Vmm.Interop;

namespace Vmm.Kvm;

/// <summary>An ioctl on a KVM object failed; <see cref="SyscallException.Call"/> is the ioctl's C name.</summary>
public sealed class KvmException(string ioctl, int errno, string? detail = null) : SyscallException(ioctl, errno, detail);

/// <summary>/dev/kvm cannot be used at all; <see cref="Exception.Message"/> is one line saying what to do.</summary>
public sealed class KvmUnavailableException(string message) : Exception(message);
