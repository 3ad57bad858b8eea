using System.Buffers.Binary;
using Vmm.Interop;
using static Vmm.Interop.VfioConstants;

namespace Vmm.Devices.Vfio.Kernel;

/// <summary>A region as VFIO_DEVICE_GET_REGION_INFO describes it: what the VMM may do with it, and where it lies in
/// the device fd (<see cref="FdOffset"/>, opaque: pread/pwrite/mmap at FdOffset + offset).</summary>
public sealed record VfioParsedRegion(VfioRegionInfo Info, ulong FdOffset);

/// <summary>Parses a VFIO_DEVICE_GET_REGION_INFO answer: the fixed <c>vfio_region_info</c> and its capability chain
/// (uapi vfio.h: offsets are from the buffer start, <c>next</c> 0 ends the chain). The buffer comes from the kernel
/// (or a vfio-user server, which uses the same layout), so every offset and count is checked: a chain that loops or
/// leaves the buffer, or areas outside the region, give a <see cref="VfioException"/>, never a hang.</summary>
public static class VfioRegionInfoParser
{
    public const int FixedSize = 32; // sizeof(struct vfio_region_info)
    private const int CapHeaderSize = 8, SparseAreasOffset = 16, SparseAreaSize = 16;

    /// <summary>The argsz the kernel asked for (larger than the buffer when the capability chain did not fit).</summary>
    public static uint NeededSize(ReadOnlySpan<byte> buffer) => BinaryPrimitives.ReadUInt32LittleEndian(buffer);

    public static VfioParsedRegion Parse(ReadOnlySpan<byte> buffer, int index, string device)
    {
        if (buffer.Length < FixedSize)
            throw Bad(device, index, $"the answer has {buffer.Length} bytes, less than the {FixedSize} of vfio_region_info");
        uint argsz = NeededSize(buffer);
        var flags = (VfioRegionFlags)BinaryPrimitives.ReadUInt32LittleEndian(buffer[4..]);
        uint capOffset = BinaryPrimitives.ReadUInt32LittleEndian(buffer[12..]);
        ulong size = BinaryPrimitives.ReadUInt64LittleEndian(buffer[16..]);
        ulong fdOffset = BinaryPrimitives.ReadUInt64LittleEndian(buffer[24..]);

        // Only the part the kernel filled in counts (argsz may be smaller than our buffer).
        var filled = buffer[..(int)Math.Min((ulong)buffer.Length, Math.Max(argsz, (uint)FixedSize))];
        List<VfioMmapArea>? sparse = null;
        bool msixMappable = false;
        if ((flags & VfioRegionFlags.Caps) != 0 && capOffset != 0)
        {
            if (argsz > buffer.Length)
                throw Bad(device, index, $"the capability chain needs {argsz} bytes but only {buffer.Length} were read; re-issue with argsz {argsz}");
            var visited = new HashSet<uint>();
            uint at = capOffset;
            while (at != 0)
            {
                if (at < FixedSize || (ulong)at + CapHeaderSize > (ulong)filled.Length)
                    throw Bad(device, index, $"a capability at offset {at} lies outside the {filled.Length}-byte answer (capabilities follow the {FixedSize}-byte header)");
                if (!visited.Add(at))
                    throw Bad(device, index, $"the capability chain loops back to offset {at}");
                ushort id = BinaryPrimitives.ReadUInt16LittleEndian(filled[(int)at..]);
                uint next = BinaryPrimitives.ReadUInt32LittleEndian(filled[((int)at + 4)..]);
                switch (id)
                {
                    case VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                        sparse = ParseSparse(filled, (int)at, size, device, index);
                        break;
                    case VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                        msixMappable = true;
                        break;
                    default:
                        break; // VFIO_REGION_INFO_CAP_TYPE and ids vmm does not know: skipped by design
                }
                at = next;
            }
        }

        IReadOnlyList<VfioMmapArea> areas = (flags & VfioRegionFlags.Mmap) == 0 || size == 0
            ? []
            : sparse ?? [new VfioMmapArea(0, size)];
        return new VfioParsedRegion(new VfioRegionInfo(index, flags, size, areas, msixMappable), fdOffset);
    }

    private static List<VfioMmapArea> ParseSparse(ReadOnlySpan<byte> buffer, int at, ulong regionSize, string device, int index)
    {
        if (at + SparseAreasOffset > buffer.Length)
            throw Bad(device, index, $"the sparse-mmap capability at offset {at} is cut off by the end of the answer");
        uint count = BinaryPrimitives.ReadUInt32LittleEndian(buffer[(at + 8)..]);
        ulong end = (ulong)at + SparseAreasOffset + (ulong)count * SparseAreaSize;
        if (end > (ulong)buffer.Length)
            throw Bad(device, index, $"the sparse-mmap capability at offset {at} claims {count} areas, which end at byte {end} of a {buffer.Length}-byte answer");
        var areas = new List<VfioMmapArea>((int)count);
        for (int i = 0; i < count; i++)
        {
            var a = buffer[(at + SparseAreasOffset + i * SparseAreaSize)..];
            ulong offset = BinaryPrimitives.ReadUInt64LittleEndian(a);
            ulong length = BinaryPrimitives.ReadUInt64LittleEndian(a[8..]);
            if (length == 0)
                continue;
            if (offset > regionSize || length > regionSize - offset)
                throw Bad(device, index, $"sparse-mmap area {i} [0x{offset:x}, +0x{length:x}) lies outside the 0x{regionSize:x}-byte region");
            areas.Add(new VfioMmapArea(offset, length));
        }
        areas.Sort((x, y) => x.Offset.CompareTo(y.Offset));
        for (int i = 1; i < areas.Count; i++)
            if (areas[i].Offset < areas[i - 1].End)
                throw Bad(device, index, $"sparse-mmap areas overlap at 0x{areas[i].Offset:x}");
        return areas;
    }

    private static VfioException Bad(string device, int index, string what) =>
        new($"{device}: VFIO_DEVICE_GET_REGION_INFO for region {index}: {what}", Errno.EINVAL);
}
