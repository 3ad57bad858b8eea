namespace Vmm.Interop;

/// <summary>A MAP_SHARED mapping of part of a file (a memfd, a VFIO region fd) that owns the mapping: disposing it
/// munmaps. Lets layers without <c>unsafe</c> map file descriptors they were given.</summary>
public sealed unsafe class FileMapping : IDisposable
{
    private nint _address;

    private FileMapping(nint address, ulong size)
    {
        _address = address;
        Size = size;
    }

    /// <summary>mmaps [<paramref name="offset"/>, +<paramref name="size"/>) of <paramref name="fd"/>, shared, readable and,
    /// with <paramref name="writable"/>, writable. MAP_NORESERVE: untouched pages of a sparse memfd cost nothing.
    /// <paramref name="what"/> names it in the error.</summary>
    public static FileMapping Map(int fd, long offset, ulong size, bool writable, string what)
    {
        if (size == 0 || size > long.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(size), $"{what}: cannot map {size} bytes");
        int prot = Sys.PROT_READ | (writable ? Sys.PROT_WRITE : 0);
        void* p = Sys.Mmap((nuint)size, prot, Sys.MAP_SHARED | Sys.MAP_NORESERVE, fd, offset, what);
        return new FileMapping((nint)p, size);
    }

    /// <summary>0 once disposed.</summary>
    public nint Address => _address;

    public ulong Size { get; }

    /// <summary>A span over [<paramref name="offset"/>, +<paramref name="length"/>) of the mapping (bounds checked);
    /// valid only until the mapping is disposed.</summary>
    public Span<byte> GetSpan(ulong offset, int length)
    {
        if (_address == 0)
            throw new ObjectDisposedException(nameof(FileMapping));
        if (length < 0 || offset > Size || (ulong)length > Size - offset)
            throw new ArgumentOutOfRangeException(nameof(offset), $"0x{offset:x}+{length} is outside the 0x{Size:x}-byte mapping");
        return new Span<byte>((byte*)_address + offset, length);
    }

    public void Dispose()
    {
        nint a = Interlocked.Exchange(ref _address, 0);
        if (a != 0)
            Sys.Munmap((void*)a, (nuint)Size);
    }
}
