using System.Runtime.InteropServices;
using Tmds.Linux;

namespace Vmm.Interop;

/// <summary><c>struct iovec</c> (&lt;sys/uio.h&gt;) with the base as an integer so safe code can build arrays of
/// them; the memory it names must stay mapped for the call.</summary>
[StructLayout(LayoutKind.Sequential)]
public readonly record struct IoVec(nint Base, nuint Length);

/// <summary>read/write/readv/writev on raw fds (non-blocking ones included), returning the byte count or the
/// negated errno (kernel style: the errno is captured by the marshaller right after the call, so nothing can
/// clobber it). No allocation: device threads call them per packet.</summary>
public static unsafe partial class Uio
{
    public static long Read(int fd, Span<byte> buffer)
    {
        fixed (byte* p = buffer)
            return Result(LibC.read(fd, p, (size_t)(ulong)buffer.Length));
    }

    public static long Write(int fd, ReadOnlySpan<byte> buffer)
    {
        fixed (byte* p = buffer)
            return Result(LibC.write(fd, p, (size_t)(ulong)buffer.Length));
    }

    public static long Readv(int fd, ReadOnlySpan<IoVec> vectors)
    {
        fixed (IoVec* v = vectors)
        {
            nint n = readv(fd, v, vectors.Length);
            return n < 0 ? -Marshal.GetLastPInvokeError() : n;
        }
    }

    public static long Writev(int fd, ReadOnlySpan<IoVec> vectors)
    {
        fixed (IoVec* v = vectors)
        {
            nint n = writev(fd, v, vectors.Length);
            return n < 0 ? -Marshal.GetLastPInvokeError() : n;
        }
    }

    private static long Result(ssize_t n) => n < 0 ? -LibC.errno : (long)n;

    // Tmds.LibC has no readv/writev.
    [LibraryImport("libc.so.6", SetLastError = true)]
    private static partial nint readv(int fd, IoVec* iov, int iovcnt);

    [LibraryImport("libc.so.6", SetLastError = true)]
    private static partial nint writev(int fd, IoVec* iov, int iovcnt);
}
