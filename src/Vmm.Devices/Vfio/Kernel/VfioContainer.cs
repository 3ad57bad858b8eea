using Vmm.Interop;
using static Vmm.Interop.VfioConstants;

namespace Vmm.Devices.Vfio.Kernel;

/// <summary>The legacy VFIO container (/dev/vfio/vfio) with the type1v2 IOMMU: one DMA address space shared by every
/// group attached to it. Order (vfio.rst): open → GET_API_VERSION (0) → CHECK_EXTENSION(TYPE1v2) → attach the first
/// group (GROUP_SET_CONTAINER) → SET_IOMMU → MAP_DMA. Later groups join the same IOMMU context and see the existing
/// mappings.</summary>
public sealed class VfioContainer : IVfioDmaSpace, IDisposable
{
    private int _fd;
    private bool _iommuSet;
    private readonly string _path;

    private VfioContainer(int fd, string path)
    {
        _fd = fd;
        _path = path;
    }

    public int Fd => _fd;

    public static VfioContainer Open(string path = "/dev/vfio/vfio")
    {
        int fd = FileIo.Open(path, Sys.O_RDWR | Sys.O_CLOEXEC);
        if (fd < 0)
            throw VfioErrors.OpenFailed("VFIO container", path, -fd);
        try
        {
            int version = FdCalls.Ioctl(fd, VFIO_GET_API_VERSION, 0);
            if (version < 0)
                throw VfioErrors.Call(path, "VFIO_GET_API_VERSION", -version);
            if (version != VFIO_API_VERSION)
                throw new VfioException($"{path}: VFIO API version {version}, vmm speaks {VFIO_API_VERSION}", Errno.EINVAL);
            int type1v2 = FdCalls.Ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU);
            if (type1v2 < 0)
                throw VfioErrors.Call(path, "VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU)", -type1v2);
            if (type1v2 == 0)
                throw new VfioException($"{path}: the kernel has no VFIO type1v2 IOMMU backend (VFIO_CHECK_EXTENSION answered 0): " +
                    "load vfio_iommu_type1 (modprobe vfio_iommu_type1) or use the iommufd cdev path", Errno.EOPNOTSUPP);
            return new VfioContainer(fd, path);
        }
        catch
        {
            Sys.Close(fd);
            throw;
        }
    }

    /// <summary>GROUP_SET_CONTAINER for <paramref name="group"/>, then SET_IOMMU(TYPE1v2) after the first one.</summary>
    public void Attach(VfioGroup group)
    {
        group.SetContainer(_fd);
        if (_iommuSet)
            return;
        int r = FdCalls.Ioctl(_fd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU);
        if (r < 0)
            throw VfioErrors.Call(group.Name, "VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU)", -r);
        _iommuSet = true;
    }

    /// <summary>VFIO_IOMMU_MAP_DMA (pins the pages: RLIMIT_MEMLOCK). <paramref name="fd"/> is not needed here.</summary>
    public void Map(ulong iova, ulong size, nint hostAddress, int fd, long fdOffset, bool writable)
    {
        RequireIommu("VFIO_IOMMU_MAP_DMA");
        var map = new vfio_iommu_type1_dma_map
        {
            argsz = 32,
            flags = VFIO_DMA_MAP_FLAG_READ | (writable ? VFIO_DMA_MAP_FLAG_WRITE : 0),
            vaddr = (ulong)hostAddress,
            iova = iova,
            size = size,
        };
        int r = FdCalls.Ioctl(_fd, VFIO_IOMMU_MAP_DMA, ref map);
        if (r < 0)
            throw VfioErrors.Call(_path, $"VFIO_IOMMU_MAP_DMA iova 0x{iova:x}+0x{size:x}", -r,
                -r == Errno.ENOMEM ? "pinning the memory exceeds RLIMIT_MEMLOCK (see VfioHost.MemlockCheck)" : null);
    }

    public void Unmap(ulong iova, ulong size)
    {
        RequireIommu("VFIO_IOMMU_UNMAP_DMA");
        var unmap = new vfio_iommu_type1_dma_unmap { argsz = 24, iova = iova, size = size };
        int r = FdCalls.Ioctl(_fd, VFIO_IOMMU_UNMAP_DMA, ref unmap);
        if (r < 0)
            throw VfioErrors.Call(_path, $"VFIO_IOMMU_UNMAP_DMA iova 0x{iova:x}+0x{size:x}", -r);
        if (unmap.size != size)
            throw new VfioException($"{_path}: VFIO_IOMMU_UNMAP_DMA iova 0x{iova:x}+0x{size:x} unmapped 0x{unmap.size:x} bytes", Errno.EINVAL);
    }

    private void RequireIommu(string call)
    {
        if (!_iommuSet)
            throw new VfioException($"{_path}: {call} before any group was attached (SET_IOMMU comes after the first group)", Errno.EINVAL);
    }

    public void Dispose()
    {
        Sys.Close(_fd);
        _fd = -1;
    }
}
