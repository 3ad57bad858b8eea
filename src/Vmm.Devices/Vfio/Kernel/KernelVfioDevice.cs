using System.Buffers.Binary;
using Vmm.Interop;
using static Vmm.Interop.VfioConstants;

namespace Vmm.Devices.Vfio.Kernel;

/// <summary>A VFIO device fd from the kernel — from VFIO_GROUP_GET_DEVICE_FD (legacy) or a bound and attached
/// /dev/vfio/devices/vfioN (iommufd) — behind <see cref="IVfioDevice"/>. Owns the fd. Region reads and writes may come
/// from vCPU threads at once: region descriptions are cached, and pread/pwrite need no lock.</summary>
public sealed class KernelVfioDevice : IVfioDevice
{
    private const int MaxRegionInfoSize = 64 * 1024; // a chain larger than this is a broken answer, not a big one

    private int _fd;
    private readonly uint _flags;
    private readonly VfioParsedRegion?[] _regions;
    /// <summary>Takes ownership of <paramref name="fd"/> and reads VFIO_DEVICE_GET_INFO (the caller closes the fd
    /// when this throws).</summary>
    internal KernelVfioDevice(string name, int fd, IVfioDmaSpace dma)
    {
        Name = name;
        _fd = fd;
        Dma = dma;
        var info = new vfio_device_info { argsz = 20 };
        int r = FdCalls.Ioctl(fd, VFIO_DEVICE_GET_INFO, ref info);
        if (r < 0)
            throw VfioErrors.Call(name, "VFIO_DEVICE_GET_INFO", -r);
        _flags = info.flags;
        RegionCount = (int)info.num_regions;
        IrqCount = (int)info.num_irqs;
        _regions = new VfioParsedRegion?[Math.Min(RegionCount, 256)];
    }

    public string Name { get; }
    public int Fd => _fd;
    public bool IsPci => (_flags & VFIO_DEVICE_FLAGS_PCI) != 0;
    public bool CanReset => (_flags & VFIO_DEVICE_FLAGS_RESET) != 0;
    public int RegionCount { get; }
    public int IrqCount { get; }
    public IVfioDmaSpace Dma { get; }

    public VfioRegionInfo GetRegionInfo(int index) => Region(index).Info;

    private VfioParsedRegion Region(int index)
    {
        if ((uint)index >= (uint)_regions.Length)
            throw new VfioException($"{Name}: region {index} does not exist (the device has {RegionCount})", Errno.EINVAL);
        if (Volatile.Read(ref _regions[index]) is { } cached)
            return cached;
        var parsed = QueryRegion(index);
        Volatile.Write(ref _regions[index], parsed);
        return parsed;
    }

    /// <summary>GET_REGION_INFO, re-issued with the argsz the kernel answers while the capability chain does not fit.</summary>
    private VfioParsedRegion QueryRegion(int index)
    {
        int size = VfioRegionInfoParser.FixedSize;
        for (int attempt = 0; attempt < 4; attempt++)
        {
            byte[] buffer = new byte[size];
            BinaryPrimitives.WriteUInt32LittleEndian(buffer, (uint)size);
            BinaryPrimitives.WriteUInt32LittleEndian(buffer.AsSpan(8), (uint)index);
            int r = FdCalls.Ioctl(_fd, VFIO_DEVICE_GET_REGION_INFO, buffer.AsSpan());
            if (r < 0)
                throw VfioErrors.Call(Name, $"VFIO_DEVICE_GET_REGION_INFO (region {index})", -r);
            uint needed = VfioRegionInfoParser.NeededSize(buffer);
            if (needed <= size)
                return VfioRegionInfoParser.Parse(buffer, index, Name);
            if (needed > MaxRegionInfoSize)
                throw new VfioException($"{Name}: VFIO_DEVICE_GET_REGION_INFO for region {index} asks for {needed} bytes (more than {MaxRegionInfoSize})", Errno.EINVAL);
            size = (int)needed;
        }
        throw new VfioException($"{Name}: VFIO_DEVICE_GET_REGION_INFO for region {index} kept asking for a larger buffer", Errno.EINVAL);
    }

    public VfioIrqInfo GetIrqInfo(VfioIrqIndex index)
    {
        var info = new vfio_irq_info { argsz = 16, index = (uint)index };
        int r = FdCalls.Ioctl(_fd, VFIO_DEVICE_GET_IRQ_INFO, ref info);
        if (r < 0)
            throw VfioErrors.Call(Name, $"VFIO_DEVICE_GET_IRQ_INFO ({index})", -r);
        return new VfioIrqInfo(index, (VfioIrqFlags)info.flags, info.count);
    }

    public void ReadRegion(int index, ulong offset, Span<byte> data)
    {
        var region = CheckAccess(index, offset, (ulong)data.Length, VfioRegionFlags.Read, "read");
        while (data.Length > 0)
        {
            long n = FileIo.ReadAt(_fd, data, (long)(region.FdOffset + offset));
            if (n <= 0)
                throw VfioErrors.Call(Name, $"pread of region {index} at 0x{offset:x} ({data.Length} bytes)", n < 0 ? (int)-n : Errno.EIO);
            data = data[(int)n..];
            offset += (ulong)n;
        }
    }

    public void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        var region = CheckAccess(index, offset, (ulong)data.Length, VfioRegionFlags.Write, "write");
        while (data.Length > 0)
        {
            long n = FileIo.WriteAt(_fd, data, (long)(region.FdOffset + offset));
            if (n <= 0)
                throw VfioErrors.Call(Name, $"pwrite of region {index} at 0x{offset:x} ({data.Length} bytes)", n < 0 ? (int)-n : Errno.EIO);
            data = data[(int)n..];
            offset += (ulong)n;
        }
    }

    private VfioParsedRegion CheckAccess(int index, ulong offset, ulong length, VfioRegionFlags needed, string what)
    {
        var region = Region(index);
        if ((region.Info.Flags & needed) == 0)
            throw new VfioException($"{Name}: region {index} is not {(needed == VfioRegionFlags.Read ? "readable" : "writable")} (flags {region.Info.Flags})", Errno.EINVAL);
        if (offset > region.Info.Size || length > region.Info.Size - offset)
            throw new VfioException($"{Name}: {what} of region {index} at 0x{offset:x}+{length} is outside its 0x{region.Info.Size:x} bytes", Errno.EINVAL);
        return region;
    }

    public IVfioMapping MapRegion(int index, ulong offset, ulong size)
    {
        var region = Region(index);
        ulong page = (ulong)Environment.SystemPageSize;
        if (size == 0 || offset % page != 0 || size % page != 0)
            throw new VfioException($"{Name}: mmap of region {index} at 0x{offset:x}+0x{size:x} is not page aligned", Errno.EINVAL);
        if (!region.Info.MmapAreas.Any(a => offset >= a.Offset && offset - a.Offset <= a.Size && size <= a.End - offset))
            throw new VfioException($"{Name}: region {index} [0x{offset:x}, +0x{size:x}) is not inside one of its mmappable areas", Errno.EINVAL);
        int r = FdCalls.MapShared(_fd, (long)(region.FdOffset + offset), size, region.Info.Writable, out nint address);
        if (r < 0)
            throw VfioErrors.Call(Name, $"mmap of region {index} at 0x{offset:x}+0x{size:x}", -r);
        return new Mapping(address, size);
    }

    public void SetIrqEventFds(VfioIrqIndex index, int start, ReadOnlySpan<int> eventFds) =>
        SetIrqs(VfioIrqSetBuffer.EventFds(index, (uint)start, eventFds), $"VFIO_DEVICE_SET_IRQS ({index} {start}..+{eventFds.Length} eventfds)");

    public void DisableIrqs(VfioIrqIndex index) =>
        SetIrqs(VfioIrqSetBuffer.None(index, 0, 0), $"VFIO_DEVICE_SET_IRQS ({index} disable)");

    public void SetIntxUnmaskEventFd(int eventFd) =>
        SetIrqs(VfioIrqSetBuffer.EventFds(VfioIrqIndex.Intx, 0, [eventFd], VFIO_IRQ_SET_ACTION_UNMASK), "VFIO_DEVICE_SET_IRQS (INTx unmask eventfd)");

    private void SetIrqs(byte[] buffer, string what)
    {
        int r = FdCalls.Ioctl(_fd, VFIO_DEVICE_SET_IRQS, buffer.AsSpan());
        if (r < 0)
            throw VfioErrors.Call(Name, what, -r);
    }

    public void Reset()
    {
        int r = FdCalls.Ioctl(_fd, VFIO_DEVICE_RESET, 0);
        if (r < 0)
            throw VfioErrors.Call(Name, "VFIO_DEVICE_RESET", -r,
                CanReset ? null : "the device has no function-level reset (VFIO_DEVICE_FLAGS_RESET is clear)");
    }

    public void Dispose()
    {
        if (_fd >= 0)
            Sys.Close(_fd);
        _fd = -1;
    }

    private sealed class Mapping(nint address, ulong size) : IVfioMapping
    {
        private nint _address = address;

        public nint HostAddress => _address;
        public ulong Size { get; } = size;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _address, 0) is var a && a != 0)
                FdCalls.Unmap(a, Size);
        }
    }
}
