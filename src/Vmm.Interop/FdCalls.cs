using System.Runtime.InteropServices;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>ioctl, mmap and getrlimit over refs and spans, for layers built without unsafe code (the VFIO backends
/// in Vmm.Devices). Like <see cref="FileIo"/>, every call returns the kernel's answer — a negative errno on failure —
/// and never throws, so the caller builds the message that names the device and the operation.</summary>
public static unsafe partial class FdCalls
{
    public const int RLIMIT_MEMLOCK = 8; // x86-64
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
        byte[] bytes = new byte[System.Text.Encoding.UTF8.GetByteCount(text) + 1];
        System.Text.Encoding.UTF8.GetBytes(text, bytes);
        return Ioctl(fd, request, bytes.AsSpan());
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

    [LibraryImport("libc", SetLastError = true)]
    private static partial int getrlimit(int resource, ulong* rlim);
}
