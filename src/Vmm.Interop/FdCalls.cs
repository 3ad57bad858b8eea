using System.Runtime.InteropServices;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>ioctl, mmap, getrlimit and setrlimit over refs and spans, for layers built without unsafe code (the VFIO backends
/// in Vmm.Devices). Like <see cref="FileIo"/>, every call returns the kernel's answer — a negative errno on failure —
/// and never throws, so the caller builds the message that names the device and the operation.</summary>
public static unsafe partial class FdCalls
{
    public const int RLIMIT_FSIZE = 1, RLIMIT_NOFILE = 7, RLIMIT_MEMLOCK = 8; // <sys/resource.h>, x86-64
    public const ulong RLIM_INFINITY = ulong.MaxValue;

    /// <summary>ioctl with an integer argument: the result, or a negative errno.</summary>
    public static int Ioctl(int fd, uint request, nint value)
    {
        int r = Sys.Ioctl(fd, request, value);
        return r >= 0 ? r : -Errno.Last;
    }

    /// <summary>ioctl with a pointer to <paramref name="arg"/> (which the kernel may update).</summary>
    public static int Ioctl<T>(int fd, uint request, ref T arg) where T : unmanaged
    {
        fixed (T* p = &arg)
        {
            int r = Sys.Ioctl(fd, request, p);
            return r >= 0 ? r : -Errno.Last;
        }
    }

    /// <summary>ioctl with a pointer to <paramref name="buffer"/> (a header and the data or capabilities after it).</summary>
    public static int Ioctl(int fd, uint request, Span<byte> buffer)
    {
        fixed (byte* p = buffer)
        {
            int r = Sys.Ioctl(fd, request, p);
            return r >= 0 ? r : -Errno.Last;
        }
    }

    /// <summary>ioctl whose argument is a NUL-terminated string (VFIO_GROUP_GET_DEVICE_FD's device name).</summary>
    public static int Ioctl(int fd, uint request, string text)
    {
        return Ioctl(fd, request, CString.From(text).AsSpan());
    }

    /// <summary>IOMMU_IOAS_IOVA_RANGES: <paramref name="query"/>.allowed_iovas is pointed at <paramref name="ranges"/>
    /// for the call. -EMSGSIZE (with num_iovas set to the count needed) when the span is too short.</summary>
    public static int IoasIovaRanges(int fd, ref iommu_ioas_iova_ranges query, Span<iommu_iova_range> ranges)
    {
        fixed (iommu_iova_range* p = ranges)
        {
            query.allowed_iovas = (ulong)p;
            query.num_iovas = (uint)ranges.Length;
            int r = Ioctl(fd, IommufdConstants.IOMMU_IOAS_IOVA_RANGES, ref query);
            query.allowed_iovas = 0;
            return r;
        }
    }

    /// <summary>mmap(MAP_SHARED) of [<paramref name="offset"/>, +<paramref name="length"/>) of <paramref name="fd"/>:
    /// 0 and the address, or a negative errno.</summary>
    public static int MapShared(int fd, long offset, ulong length, bool writable, out nint address)
    {
        int prot = Sys.PROT_READ | (writable ? Sys.PROT_WRITE : 0);
        void* p = LibC.mmap(null, (size_t)length, prot, Sys.MAP_SHARED, fd, offset);
        if (p == (void*)-1)
        {
            address = 0;
            return -Errno.Last;
        }
        address = (nint)p;
        return 0;
    }

    /// <summary>munmap: 0 or a negative errno.</summary>
    public static int Unmap(nint address, ulong length) =>
        LibC.munmap((void*)address, (size_t)length) == 0 ? 0 : -Errno.Last;

    /// <summary>getrlimit(2) (Tmds.LibC 0.5 does not declare it): 0 or a negative errno.
    /// <see cref="RLIM_INFINITY"/> means unlimited.</summary>
    public static int GetRlimit(int resource, out ulong soft, out ulong hard)
    {
        ulong* limits = stackalloc ulong[2];
        if (getrlimit(resource, limits) != 0)
        {
            soft = hard = 0;
            return -Marshal.GetLastPInvokeError();
        }
        soft = limits[0];
        hard = limits[1];
        return 0;
    }

    /// <summary>setrlimit(2) (not in Tmds.LibC 0.5 either): 0 or a negative errno.</summary>
    public static int SetRlimit(int resource, ulong soft, ulong hard)
    {
        ulong* limits = stackalloc ulong[2];
        limits[0] = soft;
        limits[1] = hard;
        return setrlimit(resource, limits) == 0 ? 0 : -Marshal.GetLastPInvokeError();
    }

    public const int R_OK = 4, W_OK = 2;

    /// <summary>access(2) with <paramref name="mode"/> (R_OK | W_OK ...): 0 or a negative errno (EACCES, ENOENT).</summary>
    public static int Access(string path, int mode)
    {
        fixed (byte* p = CString.From(path))
            return access(p, mode) == 0 ? 0 : -Marshal.GetLastPInvokeError();
    }

    [LibraryImport("libc", SetLastError = true)]
    private static partial int access(byte* path, int mode);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int getrlimit(int resource, ulong* rlim);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int setrlimit(int resource, ulong* rlim);
}
