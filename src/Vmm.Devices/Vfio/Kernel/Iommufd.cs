using Vmm.Interop;
using static Vmm.Interop.IommufdConstants;

namespace Vmm.Devices.Vfio.Kernel;

/// <summary>/dev/iommu with one IO address space (IOAS) that every cdev-path device attaches to: IOVA = guest
/// physical, as with the type1 container. Mapping before or after devices attach both work.</summary>
public sealed class Iommufd : IVfioDmaSpace, IDisposable
{
    private const int EMSGSIZE = 90;
    private int _fd;
    private readonly string _path;

    private Iommufd(int fd, uint ioasId, string path)
    {
        _fd = fd;
        IoasId = ioasId;
        _path = path;
    }

    public int Fd => _fd;
    public uint IoasId { get; }

    /// <summary>Opens <paramref name="path"/> and allocates the IOAS (IOMMU_IOAS_ALLOC).</summary>
    public static Iommufd Open(string path = "/dev/iommu")
    {
        int fd = FileIo.Open(path, Sys.O_RDWR | Sys.O_CLOEXEC);
        if (fd < 0)
            throw VfioErrors.OpenFailed("iommufd", path, -fd);
        var alloc = new iommu_ioas_alloc { size = 12 };
        int r = FdCalls.Ioctl(fd, IOMMU_IOAS_ALLOC, ref alloc);
        if (r < 0)
        {
            Sys.Close(fd);
            throw VfioErrors.Call(path, "IOMMU_IOAS_ALLOC", -r);
        }
        return new Iommufd(fd, alloc.out_ioas_id, path);
    }

    /// <summary>IOMMU_IOAS_MAP at a fixed IOVA (pins the pages against RLIMIT_MEMLOCK).</summary>
    public void Map(ulong iova, ulong size, nint hostAddress, int fd, long fdOffset, bool writable)
    {
        var map = new iommu_ioas_map
        {
            size = 40,
            flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | (writable ? IOMMU_IOAS_MAP_WRITEABLE : 0),
            ioas_id = IoasId,
            user_va = (ulong)hostAddress,
            length = size,
            iova = iova,
        };
        int r = FdCalls.Ioctl(_fd, IOMMU_IOAS_MAP, ref map);
        if (r < 0)
            throw VfioErrors.Call(_path, $"IOMMU_IOAS_MAP iova 0x{iova:x}+0x{size:x}", -r,
                -r == Errno.ENOMEM ? "pinning the memory exceeds RLIMIT_MEMLOCK (see VfioHost.MemlockCheck)" : null);
    }

    public void Unmap(ulong iova, ulong size)
    {
        var unmap = new iommu_ioas_unmap { size = 24, ioas_id = IoasId, iova = iova, length = size };
        int r = FdCalls.Ioctl(_fd, IOMMU_IOAS_UNMAP, ref unmap);
        if (r < 0)
            throw VfioErrors.Call(_path, $"IOMMU_IOAS_UNMAP iova 0x{iova:x}+0x{size:x}", -r);
        if (unmap.length != size)
            throw new VfioException($"{_path}: IOMMU_IOAS_UNMAP iova 0x{iova:x}+0x{size:x} unmapped 0x{unmap.length:x} bytes", Errno.EINVAL);
    }

    /// <summary>IOMMU_IOAS_IOVA_RANGES: the IOVAs the attached devices allow (re-read after each attach).</summary>
    public IReadOnlyList<(ulong Start, ulong Last)> IovaRanges()
    {
        var ranges = new iommu_iova_range[8];
        for (int attempt = 0; attempt < 4; attempt++)
        {
            var query = new iommu_ioas_iova_ranges { size = 32, ioas_id = IoasId, num_iovas = (uint)ranges.Length };
            int r = FdCalls.IoasIovaRanges(_fd, ref query, ranges);
            if (r == -EMSGSIZE && query.num_iovas > ranges.Length && query.num_iovas <= 4096)
            {
                ranges = new iommu_iova_range[query.num_iovas];
                continue;
            }
            if (r < 0)
                throw VfioErrors.Call(_path, "IOMMU_IOAS_IOVA_RANGES", -r);
            return ranges.Take((int)Math.Min(query.num_iovas, (uint)ranges.Length)).Select(x => (x.start, x.last)).ToArray();
        }
        throw new VfioException($"{_path}: IOMMU_IOAS_IOVA_RANGES kept asking for a larger array", Errno.EINVAL);
    }

    public void Dispose()
    {
        // Closing the iommufd destroys the IOAS and unpins everything.
        Sys.Close(_fd);
        _fd = -1;
    }
}
