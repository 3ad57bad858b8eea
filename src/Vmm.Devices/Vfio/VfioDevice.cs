namespace Vmm.Devices.Vfio;

/// <summary>vfio_region_info flags.</summary>
[Flags]
public enum VfioRegionFlags : uint
{
    None = 0,
    Read = 1,
    Write = 2,
    Mmap = 4,
    Caps = 8,
}

/// <summary>vfio_irq_info flags.</summary>
[Flags]
public enum VfioIrqFlags : uint
{
    None = 0,
    EventFd = 1,
    Maskable = 2,
    Automasked = 4,
    NoResize = 8,
}

/// <summary>VFIO_PCI_*_IRQ_INDEX.</summary>
public enum VfioIrqIndex
{
    Intx = 0,
    Msi = 1,
    Msix = 2,
    Err = 3,
    Req = 4,
}

/// <summary>VFIO_PCI_*_REGION_INDEX: BAR0-5 are 0-5.</summary>
public static class VfioRegionIndex
{
    public const int Bar0 = 0, Rom = 6, Config = 7, Vga = 8;
}

/// <summary>A part of a region the device lets the VMM mmap (VFIO_REGION_INFO_CAP_SPARSE_MMAP area, or the whole
/// region when it is mmappable without the capability). Offsets are relative to the region start.</summary>
public readonly record struct VfioMmapArea(ulong Offset, ulong Size)
{
    public ulong End => Offset + Size;
}

/// <summary>What the device says about one region (VFIO_DEVICE_GET_REGION_INFO, already parsed).</summary>
/// <param name="MmapAreas">The mmappable parts, sorted, not overlapping; empty when nothing may be mmapped.</param>
/// <param name="MsixMappable">VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: the MSI-X table page may be mmapped too
/// (vmm still traps it: the guest's table is virtual).</param>
public sealed record VfioRegionInfo(int Index, VfioRegionFlags Flags, ulong Size, IReadOnlyList<VfioMmapArea> MmapAreas,
    bool MsixMappable = false)
{
    public bool Readable => (Flags & VfioRegionFlags.Read) != 0;
    public bool Writable => (Flags & VfioRegionFlags.Write) != 0;
}

/// <summary>What the device says about one interrupt index (VFIO_DEVICE_GET_IRQ_INFO).</summary>
public sealed record VfioIrqInfo(VfioIrqIndex Index, VfioIrqFlags Flags, uint Count);

/// <summary>A host mapping of part of a region (munmapped on dispose).</summary>
public interface IVfioMapping : IDisposable
{
    nint HostAddress { get; }
    ulong Size { get; }

    /// <summary>The file behind the mapping and the offset of <see cref="HostAddress"/> in it, for handing the same
    /// memory to another process (a vfio-user server's DMA_MAP, for peer-to-peer DMA); -1 when the mapping cannot be
    /// shared that way (a kernel VFIO device fd means nothing to another process).</summary>
    int FileDescriptor => -1;
    long FileOffset => 0;
}

/// <summary>An address space the device DMAs through: a type1 container, an iommufd IOAS, or a vfio-user
/// connection. Several devices may share one (the VMM maps guest RAM once per space, IOVA = guest physical).</summary>
public interface IVfioDmaSpace
{
    /// <summary>Maps host memory [<paramref name="hostAddress"/>, +size) — which is also
    /// [<paramref name="fd"/>@<paramref name="fdOffset"/>, +size), for backends that pass the memory by file
    /// descriptor (vfio-user) — at <paramref name="iova"/>. Kernel backends pin it (RLIMIT_MEMLOCK).</summary>
    void Map(ulong iova, ulong size, nint hostAddress, int fd, long fdOffset, bool writable);

    /// <summary>Unmaps exactly a range given to <see cref="Map"/>.</summary>
    void Unmap(ulong iova, ulong size);
}

/// <summary>One VFIO device, whatever carries it: legacy VFIO group/container, the VFIO cdev on iommufd, or a
/// vfio-user server. The VMM's PCI model (<c>VfioPciFunction</c>) only talks to this interface, so every
/// backend gets the same config-space virtualization, BAR mapping and interrupt routing.
/// Errors are <see cref="VfioException"/>s naming the operation and the errno text.</summary>
public interface IVfioDevice : IDisposable
{
    /// <summary>For messages: "0000:01:00.0", "mdev 83b8f4f2-...", "vfio-user /run/gpu.sock".</summary>
    string Name { get; }

    /// <summary>VFIO_DEVICE_FLAGS_PCI.</summary>
    bool IsPci { get; }

    /// <summary>VFIO_DEVICE_FLAGS_RESET: <see cref="Reset"/> does a function-level reset.</summary>
    bool CanReset { get; }

    int RegionCount { get; }
    int IrqCount { get; }

    VfioRegionInfo GetRegionInfo(int index);
    VfioIrqInfo GetIrqInfo(VfioIrqIndex index);

    /// <summary>pread of region <paramref name="index"/> (config space, trapped BAR registers, ROM).</summary>
    void ReadRegion(int index, ulong offset, Span<byte> data);

    /// <summary>pwrite of region <paramref name="index"/>.</summary>
    void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data);

    /// <summary>mmaps [offset, offset+size) of region <paramref name="index"/>; the range must lie inside one of
    /// its <see cref="VfioRegionInfo.MmapAreas"/> and be page aligned.</summary>
    IVfioMapping MapRegion(int index, ulong offset, ulong size);

    /// <summary>VFIO_DEVICE_SET_IRQS, DATA_EVENTFD | ACTION_TRIGGER: vectors start.. of <paramref name="index"/>
    /// signal these eventfds (-1 detaches one vector). The first call for an index enables it.</summary>
    void SetIrqEventFds(VfioIrqIndex index, int start, ReadOnlySpan<int> eventFds);

    /// <summary>VFIO_DEVICE_SET_IRQS, DATA_NONE | ACTION_TRIGGER with count 0: disables every vector of the index.</summary>
    void DisableIrqs(VfioIrqIndex index);

    /// <summary>INTx: VFIO_DEVICE_SET_IRQS, DATA_EVENTFD | ACTION_UNMASK — the device unmasks INTx itself when
    /// <paramref name="eventFd"/> is signalled (KVM's irqfd resamplefd at the guest's EOI).</summary>
    void SetIntxUnmaskEventFd(int eventFd);

    /// <summary>Function-level reset (VFIO_DEVICE_RESET).</summary>
    void Reset();

    /// <summary>The DMA address space this device translates through.</summary>
    IVfioDmaSpace Dma { get; }
}

/// <summary>A VFIO operation failed: the message names the device, the operation (ioctl or vfio-user command)
/// and the errno text, and where possible what to do about it.</summary>
public class VfioException(string message, int errno = 0) : Exception(message)
{
    /// <summary>The errno behind the failure (0 when there is none).</summary>
    public int Errno { get; } = errno;
}
