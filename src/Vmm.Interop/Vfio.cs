// Declarations from <linux/vfio.h> and <linux/iommufd.h> (x86-64), kept under their C names so they can be grepped
// against the headers. Checked by tests/Vmm.Tests/Abi/VfioAbiTests.cs: the classic VFIO part against the installed
// <linux/vfio.h> (6.1), the device-cdev ioctls against a vendored excerpt of a current vfio.h, iommufd against a
// vendored <linux/iommufd.h> (Linux 6.7).
//
// Every VFIO/iommufd ioctl is _IO(';', n): no size is encoded; each structure starts with argsz/size, which the
// caller sets, and the kernel answers with a larger argsz when a capability chain needs more room.
using System.Runtime.InteropServices;

namespace Vmm.Interop;

#pragma warning disable IDE1006 // C names on purpose
#pragma warning disable CS0649  // fields are written by the kernel

/// <summary>ioctl numbers and flags of &lt;linux/vfio.h&gt; that vmm uses.</summary>
public static class VfioConstants
{
    public const int VFIO_API_VERSION = 0;
    public const int VFIO_TYPE1v2_IOMMU = 3;

    // /dev/vfio/vfio (container)
    public const uint VFIO_GET_API_VERSION = 0x3B64;
    public const uint VFIO_CHECK_EXTENSION = 0x3B65;
    public const uint VFIO_SET_IOMMU = 0x3B66;
    public const uint VFIO_IOMMU_GET_INFO = 0x3B70;
    public const uint VFIO_IOMMU_MAP_DMA = 0x3B71;
    public const uint VFIO_IOMMU_UNMAP_DMA = 0x3B72;

    // /dev/vfio/N (group)
    public const uint VFIO_GROUP_GET_STATUS = 0x3B67;
    public const uint VFIO_GROUP_SET_CONTAINER = 0x3B68;
    public const uint VFIO_GROUP_GET_DEVICE_FD = 0x3B6A;
    public const uint VFIO_GROUP_FLAGS_VIABLE = 1;
    public const uint VFIO_GROUP_FLAGS_CONTAINER_SET = 2;

    // device fd
    public const uint VFIO_DEVICE_GET_INFO = 0x3B6B;
    public const uint VFIO_DEVICE_GET_REGION_INFO = 0x3B6C;
    public const uint VFIO_DEVICE_GET_IRQ_INFO = 0x3B6D;
    public const uint VFIO_DEVICE_SET_IRQS = 0x3B6E;
    public const uint VFIO_DEVICE_RESET = 0x3B6F;
    public const uint VFIO_DEVICE_FLAGS_RESET = 1;
    public const uint VFIO_DEVICE_FLAGS_PCI = 2;
    public const uint VFIO_DEVICE_FLAGS_CAPS = 0x80;

    public const uint VFIO_REGION_INFO_FLAG_READ = 1;
    public const uint VFIO_REGION_INFO_FLAG_WRITE = 2;
    public const uint VFIO_REGION_INFO_FLAG_MMAP = 4;
    public const uint VFIO_REGION_INFO_FLAG_CAPS = 8;
    public const int VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1;
    public const int VFIO_REGION_INFO_CAP_TYPE = 2;
    public const int VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3;

    public const uint VFIO_IRQ_INFO_EVENTFD = 1;
    public const uint VFIO_IRQ_INFO_MASKABLE = 2;
    public const uint VFIO_IRQ_INFO_AUTOMASKED = 4;
    public const uint VFIO_IRQ_INFO_NORESIZE = 8;

    public const uint VFIO_IRQ_SET_DATA_NONE = 1;
    public const uint VFIO_IRQ_SET_DATA_BOOL = 2;
    public const uint VFIO_IRQ_SET_DATA_EVENTFD = 4;
    public const uint VFIO_IRQ_SET_ACTION_MASK = 8;
    public const uint VFIO_IRQ_SET_ACTION_UNMASK = 0x10;
    public const uint VFIO_IRQ_SET_ACTION_TRIGGER = 0x20;
    public const uint VFIO_IRQ_SET_DATA_TYPE_MASK = 7;
    public const uint VFIO_IRQ_SET_ACTION_TYPE_MASK = 0x38;

    public const uint VFIO_DMA_MAP_FLAG_READ = 1;
    public const uint VFIO_DMA_MAP_FLAG_WRITE = 2;

    // device cdev (/dev/vfio/devices/vfioN, Linux 6.6+)
    public const uint VFIO_DEVICE_BIND_IOMMUFD = 0x3B76;
    public const uint VFIO_DEVICE_ATTACH_IOMMUFD_PT = 0x3B77;
    public const uint VFIO_DEVICE_DETACH_IOMMUFD_PT = 0x3B78;
}

/// <summary>ioctl numbers and flags of &lt;linux/iommufd.h&gt; that vmm uses. The map flags are enumerators in C.</summary>
public static class IommufdConstants
{
    public const uint IOMMU_DESTROY = 0x3B80;
    public const uint IOMMU_IOAS_ALLOC = 0x3B81;
    public const uint IOMMU_IOAS_IOVA_RANGES = 0x3B84;
    public const uint IOMMU_IOAS_MAP = 0x3B85;
    public const uint IOMMU_IOAS_UNMAP = 0x3B86;

    public const uint IOMMU_IOAS_MAP_FIXED_IOVA = 1;
    public const uint IOMMU_IOAS_MAP_WRITEABLE = 2;
    public const uint IOMMU_IOAS_MAP_READABLE = 4;
}

/// <summary>A capability header in an INFO buffer; <c>next</c> is an offset from the buffer start (0 ends the chain).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct vfio_info_cap_header
{
    public ushort id;
    public ushort version;
    public uint next;
}

[StructLayout(LayoutKind.Sequential)]
public struct vfio_group_status
{
    public uint argsz;
    public uint flags;
}

/// <summary>The 6.1 layout (20 bytes). Current headers append a <c>pad</c> (24 bytes); the kernel needs only the
/// first 16, so this size works on every kernel.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct vfio_device_info
{
    public uint argsz;
    public uint flags;
    public uint num_regions;
    public uint num_irqs;
    public uint cap_offset;
}

[StructLayout(LayoutKind.Sequential)]
public struct vfio_region_info
{
    public uint argsz;
    public uint flags;
    public uint index;
    public uint cap_offset;
    public ulong size;
    public ulong offset;
}

[StructLayout(LayoutKind.Sequential)]
public struct vfio_region_sparse_mmap_area
{
    public ulong offset;
    public ulong size;
}

/// <summary>Header of the SPARSE_MMAP capability; <c>nr_areas</c> <see cref="vfio_region_sparse_mmap_area"/>s follow.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct vfio_region_info_cap_sparse_mmap
{
    public vfio_info_cap_header header;
    public uint nr_areas;
    public uint reserved;
}

[StructLayout(LayoutKind.Sequential)]
public struct vfio_irq_info
{
    public uint argsz;
    public uint flags;
    public uint index;
    public uint count;
}

/// <summary>Header of VFIO_DEVICE_SET_IRQS' argument; <c>count</c> s32 eventfds (DATA_EVENTFD) or u8 bools
/// (DATA_BOOL) follow at offset 20, unaligned.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct vfio_irq_set
{
    public uint argsz;
    public uint flags;
    public uint index;
    public uint start;
    public uint count;
}

/// <summary>24 bytes: 4 bytes of tail padding after <c>cap_offset</c> (named <c>pad</c> in newer headers).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct vfio_iommu_type1_info
{
    public uint argsz;
    public uint flags;
    public ulong iova_pgsizes;
    public uint cap_offset;
}

[StructLayout(LayoutKind.Sequential)]
public struct vfio_iommu_type1_dma_map
{
    public uint argsz;
    public uint flags;
    public ulong vaddr;
    public ulong iova;
    public ulong size;
}

/// <summary>The kernel writes back in <c>size</c> how many bytes it unmapped.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct vfio_iommu_type1_dma_unmap
{
    public uint argsz;
    public uint flags;
    public ulong iova;
    public ulong size;
}

/// <summary>The current layout (24 bytes, with the PF/VF token pointer); kernels before it read the first 16.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct vfio_device_bind_iommufd
{
    public uint argsz;
    public uint flags;
    public int iommufd;
    public uint out_devid;
    public ulong token_uuid_ptr;
}

/// <summary>The current layout (16 bytes, with <c>pasid</c>, used only with VFIO_DEVICE_ATTACH_PASID).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct vfio_device_attach_iommufd_pt
{
    public uint argsz;
    public uint flags;
    public uint pt_id;
    public uint pasid;
}

[StructLayout(LayoutKind.Sequential)]
public struct iommu_destroy
{
    public uint size;
    public uint id;
}

[StructLayout(LayoutKind.Sequential)]
public struct iommu_ioas_alloc
{
    public uint size;
    public uint flags;
    public uint out_ioas_id;
}

[StructLayout(LayoutKind.Sequential)]
public struct iommu_iova_range
{
    public ulong start;
    public ulong last;
}

/// <summary><c>allowed_iovas</c> points to an array of <see cref="iommu_iova_range"/>; EMSGSIZE when too short.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct iommu_ioas_iova_ranges
{
    public uint size;
    public uint ioas_id;
    public uint num_iovas;
    public uint __reserved;
    public ulong allowed_iovas;
    public ulong out_iova_alignment;
}

[StructLayout(LayoutKind.Sequential)]
public struct iommu_ioas_map
{
    public uint size;
    public uint flags;
    public uint ioas_id;
    public uint __reserved;
    public ulong user_va;
    public ulong length;
    public ulong iova;
}

[StructLayout(LayoutKind.Sequential)]
public struct iommu_ioas_unmap
{
    public uint size;
    public uint ioas_id;
    public ulong iova;
    public ulong length;
}
