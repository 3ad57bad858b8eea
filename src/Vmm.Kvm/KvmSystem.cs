using System.Runtime.InteropServices;
using Vmm.Interop;
using static Vmm.Interop.KvmConstants;

namespace Vmm.Kvm;

/// <summary>The open <c>/dev/kvm</c> system handle: capability queries and VM creation.</summary>
public sealed unsafe class KvmSystem : IDisposable
{
    private int _fd;

    private KvmSystem(int fd) => _fd = fd;

    /// <summary>Opens /dev/kvm and checks the API version. Missing or forbidden /dev/kvm becomes a
    /// <see cref="KvmUnavailableException"/> with a one-line remedy.</summary>
    public static KvmSystem Open(string path = "/dev/kvm")
    {
        int fd = Sys.Open(path, Sys.O_RDWR | Sys.O_CLOEXEC);
        if (fd < 0)
        {
            int errno = Errno.Last;
            throw errno switch
            {
                Errno.ENOENT => new KvmUnavailableException(
                    $"{path} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) and enable virtualization in the firmware, or run on a host that offers KVM"),
                Errno.EACCES or Errno.EPERM => new KvmUnavailableException(
                    $"{path}: permission denied: add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root"),
                Errno.ENXIO or Errno.ENODEV => new KvmUnavailableException(
                    $"{path} exists but no KVM driver is bound to it (the kernel has no usable virtualization support here)"),
                _ => new KvmUnavailableException($"cannot open {path}: {Errno.Describe(errno)}"),
            };
        }
        var kvm = new KvmSystem(fd);
        int version = Sys.Ioctl(fd, KVM_GET_API_VERSION, 0);
        if (version < 0)
        {
            int errno = Errno.Last;
            kvm.Dispose();
            throw new KvmUnavailableException(errno == Errno.ENOTTY
                ? $"{path} is not a KVM device (KVM_GET_API_VERSION: {Errno.Describe(errno)})"
                : $"{path}: KVM_GET_API_VERSION failed: {Errno.Describe(errno)}");
        }
        if (version != KVM_API_VERSION)
        {
            kvm.Dispose();
            throw new KvmUnavailableException($"{path} speaks KVM API version {version}, vmm needs {KVM_API_VERSION}");
        }
        return kvm;
    }

    public int Fd => _fd;

    public int ApiVersion => Check(Sys.Ioctl(_fd, KVM_GET_API_VERSION, 0), "KVM_GET_API_VERSION");

    /// <summary>KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific positive value.</summary>
    public int CheckExtension(int capability)
    {
        int r = Sys.Ioctl(_fd, KVM_CHECK_EXTENSION, capability);
        return r < 0 ? 0 : r;
    }

    public int VcpuMmapSize => Check(Sys.Ioctl(_fd, KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE");

    /// <summary>The CPUID leaves KVM can virtualize on this host (KVM_GET_SUPPORTED_CPUID).</summary>
    public kvm_cpuid_entry2[] GetSupportedCpuid()
    {
        // The kernel answers E2BIG while the buffer is too small; grow until it fits.
        for (int n = 64; n <= 4096; n *= 2)
        {
            int bytes = sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2);
            byte* buf = (byte*)NativeMemory.AllocZeroed((nuint)bytes);
            try
            {
                ((kvm_cpuid2*)buf)->nent = (uint)n;
                if (Sys.Ioctl(_fd, KVM_GET_SUPPORTED_CPUID, buf) < 0)
                {
                    int errno = Errno.Last;
                    if (errno == Errno.E2BIG)
                        continue;
                    throw new KvmException("KVM_GET_SUPPORTED_CPUID", errno);
                }
                int count = (int)((kvm_cpuid2*)buf)->nent;
                var entries = new kvm_cpuid_entry2[count];
                new ReadOnlySpan<kvm_cpuid_entry2>(buf + sizeof(kvm_cpuid2), count).CopyTo(entries);
                return entries;
            }
            finally
            {
                NativeMemory.Free(buf);
            }
        }
        throw new KvmException("KVM_GET_SUPPORTED_CPUID", Errno.E2BIG, "more than 4096 CPUID entries");
    }

    /// <summary>KVM_CREATE_VM (machine type 0: the default x86 VM).</summary>
    public VmFd CreateVm()
    {
        int fd;
        // KVM_CREATE_VM can fail with EINTR while the kernel sets up the VM's MMU; retrying is what QEMU does.
        do fd = Sys.Ioctl(_fd, KVM_CREATE_VM, 0);
        while (fd < 0 && Errno.Last == Errno.EINTR);
        Check(fd, "KVM_CREATE_VM");
        return new VmFd(fd, VcpuMmapSize);
    }

    internal static int Check(int result, string ioctl, string? detail = null)
    {
        if (result < 0)
            throw new KvmException(ioctl, Errno.Last, detail);
        return result;
    }

    public void Dispose()
    {
        Sys.Close(_fd);
        _fd = -1;
    }
}
