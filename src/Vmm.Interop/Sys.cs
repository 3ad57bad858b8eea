using System.Runtime.InteropServices;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>A failed system call: names the call (an ioctl by its C name) and the errno, with its text.</summary>
public class SyscallException : Exception
{
    public SyscallException(string call, int errno, string? detail = null)
        : base($"{call} failed: {Errno.Describe(errno)}{(detail is null ? "" : " — " + detail)}")
    {
        Call = call;
        ErrorNumber = errno;
    }

    /// <summary>The system call or ioctl that failed, e.g. <c>KVM_CREATE_VM</c>.</summary>
    public string Call { get; }

    /// <summary>The errno value the kernel returned.</summary>
    public int ErrorNumber { get; }
}

/// <summary>errno values the VMM reacts to, and their symbolic names for messages.</summary>
public static class Errno
{
    public const int EPERM = 1, ENOENT = 2, EINTR = 4, EIO = 5, ENXIO = 6, E2BIG = 7, EBADF = 9, EAGAIN = 11,
        ENOMEM = 12, EACCES = 13, EFAULT = 14, EBUSY = 16, EEXIST = 17, ENODEV = 19, EINVAL = 22, ENOTTY = 25, ENOSPC = 28,
        EPIPE = 32, ENOSYS = 38, EMSGSIZE = 90, EOPNOTSUPP = 95, ECONNRESET = 104, ETIMEDOUT = 110;

    /// <summary>The calling thread's errno after a failed libc call.</summary>
    public static int Last => LibC.errno;

    public static string Name(int errno) => errno switch
    {
        EPERM => "EPERM", ENOENT => "ENOENT", EINTR => "EINTR", EIO => "EIO", ENXIO => "ENXIO", E2BIG => "E2BIG",
        EBADF => "EBADF", EAGAIN => "EAGAIN", ENOMEM => "ENOMEM", EACCES => "EACCES", EFAULT => "EFAULT",
        EBUSY => "EBUSY", EEXIST => "EEXIST", ENODEV => "ENODEV", EINVAL => "EINVAL", ENOTTY => "ENOTTY", ENOSPC => "ENOSPC",
        EPIPE => "EPIPE", ENOSYS => "ENOSYS", EMSGSIZE => "EMSGSIZE", EOPNOTSUPP => "EOPNOTSUPP", ECONNRESET => "ECONNRESET",
        ETIMEDOUT => "ETIMEDOUT", _ => "errno " + errno,
    };

    /// <summary>"Permission denied (EACCES)".</summary>
    public static string Describe(int errno) => $"{Marshal.GetPInvokeErrorMessage(errno)} ({Name(errno)})";
}

/// <summary>Thin libc helpers shared by the layers above (all through Tmds.LibC).</summary>
public static unsafe class Sys
{
    public const int O_RDWR = 2, O_RDONLY = 0, O_CLOEXEC = 0x80000;
    public const int PROT_READ = 1, PROT_WRITE = 2;
    public const int MAP_SHARED = 0x01, MAP_PRIVATE = 0x02, MAP_ANONYMOUS = 0x20, MAP_NORESERVE = 0x4000;
    public const uint MFD_CLOEXEC = 1;

    /// <summary>Whether this process runs on the .NET runtime with its JIT (libcoreclr is mapped: <c>dotnet run</c>, the
    /// tests) rather than as the NativeAOT executable. RuntimeFeature.IsDynamicCodeSupported cannot tell: PublishAot
    /// turns it off in JIT builds too. Read once.</summary>
    public static bool RunsOnCoreClr => s_runsOnCoreClr.Value;

    private static readonly Lazy<bool> s_runsOnCoreClr =
        new(() => File.ReadLines("/proc/self/maps").Any(l => l.EndsWith("/libcoreclr.so", StringComparison.Ordinal)));

    public static int Open(string path, int flags, int mode = 0)
    {
        int byteCount = System.Text.Encoding.UTF8.GetByteCount(path);
        Span<byte> buf = byteCount < 1024 ? stackalloc byte[byteCount + 1] : new byte[byteCount + 1];
        System.Text.Encoding.UTF8.GetBytes(path, buf);
        buf[byteCount] = 0;
        fixed (byte* p = buf)
            return LibC.open(p, flags, (mode_t)(uint)mode);
    }

    /// <summary>ioctl with a pointer argument; returns the kernel's result or -1 (errno in <see cref="Errno.Last"/>).</summary>
    public static int Ioctl(int fd, uint request, void* arg) => LibC.ioctl(fd, unchecked((int)request), arg);

    /// <summary>ioctl with an integer argument (e.g. KVM_CREATE_VCPU's id, KVM_CHECK_EXTENSION's capability).</summary>
    public static int Ioctl(int fd, uint request, nint arg) => LibC.ioctl(fd, unchecked((int)request), (void*)arg);

    public static void Close(int fd)
    {
        // Never retry close on EINTR: the fd is released either way on Linux.
        if (fd >= 0)
            LibC.close(fd);
    }

    public static void* Mmap(nuint length, int prot, int flags, int fd, long offset, string what)
    {
        void* p = LibC.mmap(null, (size_t)(ulong)length, prot, flags, fd, offset);
        if (p == (void*)-1)
            throw new SyscallException("mmap", Errno.Last, what);
        return p;
    }

    public static void Munmap(void* addr, nuint length)
    {
        if (addr != null)
            LibC.munmap(addr, (size_t)(ulong)length);
    }

    public static int MemfdCreate(string name)
    {
        byte[] n = System.Text.Encoding.ASCII.GetBytes(name + "\0");
        fixed (byte* p = n)
        {
            int fd = LibC.memfd_create(p, MFD_CLOEXEC);
            if (fd < 0)
                throw new SyscallException("memfd_create", Errno.Last, name);
            return fd;
        }
    }

    public static void Ftruncate(int fd, long length, string what)
    {
        if (LibC.ftruncate(fd, length) < 0)
            throw new SyscallException("ftruncate", Errno.Last, what);
    }

    public static int EventFd(uint initial, int flags)
    {
        int fd = LibC.eventfd(initial, flags);
        if (fd < 0)
            throw new SyscallException("eventfd", Errno.Last);
        return fd;
    }

    /// <summary>Fills <paramref name="buffer"/> from the kernel CSPRNG (getrandom(2)), without OpenSSL, which
    /// .NET's RandomNumberGenerator loads on Linux and a minimal host may lack. Blocks only before the kernel's
    /// pool is initialized at boot.</summary>
    public static void GetRandom(Span<byte> buffer)
    {
        fixed (byte* p = buffer)
        {
            int done = 0;
            while (done < buffer.Length)
            {
                long n = (long)LibC.syscall(318 /* SYS_getrandom */, p + done, buffer.Length - done, 0);
                if (n < 0)
                {
                    if (Errno.Last == Errno.EINTR)
                        continue;
                    throw new SyscallException("getrandom", Errno.Last);
                }
                done += (int)n;
            }
        }
    }

    /// <summary>The kernel thread id of the calling thread (for signalling a vCPU thread out of KVM_RUN).</summary>
    public static int GetTid() => (int)(long)LibC.syscall(186 /* SYS_gettid */);

    public static int GetPid() => (int)(long)LibC.syscall(39 /* SYS_getpid */);

    /// <summary>Sends <paramref name="signal"/> to one thread of this process.</summary>
    public static void Tgkill(int tid, int signal) => LibC.syscall(234 /* SYS_tgkill */, GetPid(), tid, signal);

    /// <summary>User and system CPU time of the calling thread in nanoseconds (CLOCK_THREAD_CPUTIME_ID gives the sum;
    /// getrusage(RUSAGE_THREAD) splits it).</summary>
    public static (long UserNs, long SystemNs) ThreadCpuTime()
    {
        // struct rusage starts with ru_utime and ru_stime (struct timeval: two longs each).
        long* ru = stackalloc long[18];
        if ((long)LibC.syscall(98 /* SYS_getrusage */, 1 /* RUSAGE_THREAD */, (void*)ru) != 0)
            return (0, 0);
        return (ru[0] * 1_000_000_000 + ru[1] * 1000, ru[2] * 1_000_000_000 + ru[3] * 1000);
    }
}
