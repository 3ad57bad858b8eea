using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Vmm.Interop;

namespace Vmm.Memory;

/// <summary>One contiguous range of guest RAM and the host mapping behind it.</summary>
public sealed unsafe class GuestMemoryRegion
{
    internal GuestMemoryRegion(GuestAddress start, ulong size, byte* host, long fileOffset)
    {
        Start = start;
        Size = size;
        Host = host;
        FileOffset = fileOffset;
    }

    public GuestAddress Start { get; }
    public ulong Size { get; }
    public GuestAddress End => new(Start.Value + Size);

    /// <summary>Offset of this region in the backing memfd (for sharing guest RAM with another process later).</summary>
    public long FileOffset { get; }

    /// <summary>Host virtual address of <see cref="Start"/> (registered with KVM as a memory slot).</summary>
    public nint HostAddress => (nint)Host;

    internal byte* Host { get; }

    public bool Contains(GuestAddress a) => a.Value >= Start.Value && a.Value - Start.Value < Size;
}

/// <summary>Guest RAM: memfd-backed shared mappings (MAP_NORESERVE, so untouched memory costs nothing),
/// accessed only through bounds-checked calls by guest-physical address. Accesses never straddle regions;
/// an access outside RAM throws <see cref="GuestMemoryException"/> and never touches host memory.
/// Guest memory is shared with running vCPUs: callers copy data out, then validate it.</summary>
public sealed unsafe class GuestMemory : IDisposable
{
    private readonly GuestMemoryRegion[] _regions;
    private int _memfd;
    private bool _disposed;

    private GuestMemory(GuestMemoryRegion[] regions, int memfd)
    {
        _regions = regions;
        _memfd = memfd;
    }

    /// <summary>Allocates <paramref name="ramSize"/> bytes of guest RAM laid out by <see cref="MemoryLayout.RamRanges"/>.</summary>
    public static GuestMemory Create(ulong ramSize)
    {
        if (ramSize < MemoryLayout.MiB || ramSize % 4096 != 0)
            throw new ArgumentOutOfRangeException(nameof(ramSize), $"guest memory must be a multiple of 4 KiB and at least 1 MiB, not {ramSize} bytes");
        return Create(MemoryLayout.RamRanges(ramSize));
    }

    /// <summary>Allocates RAM at the given page-aligned, non-overlapping ranges.</summary>
    public static GuestMemory Create(IReadOnlyList<(GuestAddress Start, ulong Size)> ranges)
    {
        int memfd = Sys.MemfdCreate("vmm-guest-ram");
        var regions = new List<GuestMemoryRegion>();
        try
        {
            ulong total = 0;
            foreach (var (start, size) in ranges)
                total += size;
            Sys.Ftruncate(memfd, (long)total, "guest RAM memfd");
            long offset = 0;
            foreach (var (start, size) in ranges.OrderBy(r => r.Start.Value))
            {
                if (start.Value % 4096 != 0 || size % 4096 != 0 || size == 0)
                    throw new ArgumentException($"guest RAM range {start}+0x{size:x} is not page aligned");
                if (regions.Count > 0 && regions[^1].End.Value > start.Value)
                    throw new ArgumentException($"guest RAM range {start} overlaps the previous one");
                byte* host = (byte*)Sys.Mmap((nuint)size, Sys.PROT_READ | Sys.PROT_WRITE,
                    Sys.MAP_SHARED | Sys.MAP_NORESERVE, memfd, offset, $"guest RAM {start}+0x{size:x}");
                regions.Add(new GuestMemoryRegion(start, size, host, offset));
                offset += (long)size;
            }
            return new GuestMemory([.. regions], memfd);
        }
        catch
        {
            foreach (var r in regions)
                Sys.Munmap(r.Host, (nuint)r.Size);
            Sys.Close(memfd);
            throw;
        }
    }

    public IReadOnlyList<GuestMemoryRegion> Regions => _regions;

    /// <summary>Total bytes of RAM.</summary>
    public ulong Size
    {
        get
        {
            ulong s = 0;
            foreach (var r in _regions)
                s += r.Size;
            return s;
        }
    }

    /// <summary>The memfd backing all regions.</summary>
    public int MemFd => _memfd;

    /// <summary>True when [address, address+length) lies inside one RAM region.</summary>
    public bool IsValidRange(GuestAddress address, ulong length) => FindRegion(address, length) is not null;

    /// <summary>A span over guest RAM. Valid only until this memory is disposed: use it immediately, never store it.</summary>
    public Span<byte> GetSpan(GuestAddress address, int length)
    {
        var region = FindRegion(address, (ulong)length) ?? throw OutOfRange(address, (ulong)length);
        return new Span<byte>(region.Host + (address.Value - region.Start.Value), length);
    }

    /// <summary>Like <see cref="GetSpan"/> but reports failure instead of throwing (for the exit path).</summary>
    public bool TryGetSpan(GuestAddress address, int length, out Span<byte> span)
    {
        var region = FindRegion(address, (ulong)length);
        if (region is null)
        {
            span = default;
            return false;
        }
        span = new Span<byte>(region.Host + (address.Value - region.Start.Value), length);
        return true;
    }

    public void Read(GuestAddress address, Span<byte> destination) => GetSpan(address, destination.Length).CopyTo(destination);

    public void Write(GuestAddress address, ReadOnlySpan<byte> source) => source.CopyTo(GetSpan(address, source.Length));

    public T ReadObj<T>(GuestAddress address) where T : unmanaged =>
        Unsafe.ReadUnaligned<T>(ref MemoryMarshal.GetReference(GetSpan(address, sizeof(T))));

    public void WriteObj<T>(GuestAddress address, T value) where T : unmanaged =>
        Unsafe.WriteUnaligned(ref MemoryMarshal.GetReference(GetSpan(address, sizeof(T))), value);

    /// <summary>Fills a range with zeroes.</summary>
    public void Clear(GuestAddress address, ulong length)
    {
        while (length > 0)
        {
            int chunk = (int)Math.Min(length, 1u << 30);
            GetSpan(address, chunk).Clear();
            address = address.Add((ulong)chunk);
            length -= (ulong)chunk;
        }
    }

    private GuestMemoryRegion? FindRegion(GuestAddress address, ulong length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        foreach (var r in _regions)
        {
            if (address.Value >= r.Start.Value && address.Value - r.Start.Value <= r.Size
                && length <= r.Size - (address.Value - r.Start.Value))
                return r;
        }
        return null;
    }

    private GuestMemoryException OutOfRange(GuestAddress address, ulong length)
    {
        string ram = string.Join(", ", _regions.Select(r => $"{r.Start}-0x{r.End.Value - 1:x}"));
        return new GuestMemoryException(address, length,
            $"guest memory access {address}+0x{length:x} is outside guest RAM ({ram})");
    }

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        foreach (var r in _regions)
            Sys.Munmap(r.Host, (nuint)r.Size);
        Sys.Close(_memfd);
        _memfd = -1;
    }
}
