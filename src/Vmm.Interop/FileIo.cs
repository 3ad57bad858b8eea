using System.Runtime.InteropServices;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>Positional file I/O for disk images, over spans so device code needs no pointers. Every call returns
/// the kernel's answer (bytes, or a negative errno) instead of throwing: a failed guest request is data, not an
/// exception. EINTR is retried here.</summary>
public static unsafe partial class FileIo
{
    public const int O_DIRECT = 0x4000; // x86-64 (040000)
    public const int SEEK_END = 2;
    public const int FALLOC_FL_KEEP_SIZE = 0x01, FALLOC_FL_PUNCH_HOLE = 0x02, FALLOC_FL_ZERO_RANGE = 0x10;

    /// <summary>open(2) with mode 0; the fd, or a negative errno.</summary>
    public static int Open(string path, int flags)
    {
        int fd = Sys.Open(path, flags);
        return fd >= 0 ? fd : -Errno.Last;
    }

    /// <summary>The size of the file (or block device) behind <paramref name="fd"/>, or a negative errno.</summary>
    public static long Size(int fd)
    {
        long size = LibC.lseek(fd, 0, SEEK_END);
        return size >= 0 ? size : -Errno.Last;
    }

    /// <summary>pread(2) once (retrying EINTR): bytes read (0 at end of file) or a negative errno.</summary>
    public static long ReadAt(int fd, Span<byte> buffer, long offset)
    {
        fixed (byte* p = buffer)
        {
            while (true)
            {
                long n = LibC.pread(fd, p, (size_t)(ulong)buffer.Length, offset);
                if (n >= 0)
                    return n;
                int errno = Errno.Last;
                if (errno != Errno.EINTR)
                    return -errno;
            }
        }
    }

    /// <summary>pwrite(2) once (retrying EINTR): bytes written (possibly short) or a negative errno.</summary>
    public static long WriteAt(int fd, ReadOnlySpan<byte> buffer, long offset)
    {
        fixed (byte* p = buffer)
        {
            while (true)
            {
                long n = LibC.pwrite(fd, p, (size_t)(ulong)buffer.Length, offset);
                if (n >= 0)
                    return n;
                int errno = Errno.Last;
                if (errno != Errno.EINTR)
                    return -errno;
            }
        }
    }

    /// <summary>fdatasync(2): 0 or a negative errno.</summary>
    public static int DataSync(int fd)
    {
        while (true)
        {
            if (LibC.fdatasync(fd) == 0)
                return 0;
            int errno = Errno.Last;
            if (errno != Errno.EINTR)
                return -errno;
        }
    }

    /// <summary>fallocate(2) (Tmds.LibC 0.5 does not declare it): 0 or a negative errno.</summary>
    public static int Fallocate(int fd, int mode, long offset, long length)
    {
        while (true)
        {
            if (fallocate(fd, mode, offset, length) == 0)
                return 0;
            int errno = Marshal.GetLastPInvokeError();
            if (errno != Errno.EINTR)
                return -errno;
        }
    }

    [LibraryImport("libc", SetLastError = true)]
    private static partial int fallocate(int fd, int mode, long offset, long len);
}

/// <summary>Native memory aligned for O_DIRECT (and zeroed), freed by <see cref="Dispose"/>. For bounce buffers
/// that live as long as their device.</summary>
public sealed unsafe class AlignedBuffer : IDisposable
{
    private byte* _pointer;

    public AlignedBuffer(int length, int alignment = 4096)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        _pointer = (byte*)NativeMemory.AlignedAlloc((nuint)length, (nuint)alignment);
        NativeMemory.Clear(_pointer, (nuint)length);
        Length = length;
    }

    public int Length { get; }

    public Span<byte> Span
    {
        get
        {
            ObjectDisposedException.ThrowIf(_pointer == null, this);
            return new Span<byte>(_pointer, Length);
        }
    }

    public void Dispose()
    {
        if (_pointer != null)
            NativeMemory.AlignedFree(_pointer);
        _pointer = null;
    }
}
