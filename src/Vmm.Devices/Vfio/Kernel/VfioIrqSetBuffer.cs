using System.Buffers.Binary;
using static Vmm.Interop.VfioConstants;

namespace Vmm.Devices.Vfio.Kernel;

/// <summary>Builds VFIO_DEVICE_SET_IRQS' argument: a 20-byte <c>vfio_irq_set</c> header (argsz, flags, index, start,
/// count) and, for DATA_EVENTFD, <c>count</c> s32 fds right after it (offset 20, not 8-aligned; -1 detaches one
/// vector).</summary>
public static class VfioIrqSetBuffer
{
    public const int HeaderSize = 20; // sizeof(struct vfio_irq_set)

    /// <summary>DATA_EVENTFD | <paramref name="action"/> for vectors <paramref name="start"/>.. of <paramref name="index"/>.</summary>
    public static byte[] EventFds(VfioIrqIndex index, uint start, ReadOnlySpan<int> eventFds, uint action = VFIO_IRQ_SET_ACTION_TRIGGER)
    {
        byte[] buffer = new byte[HeaderSize + 4 * eventFds.Length];
        WriteHeader(buffer, VFIO_IRQ_SET_DATA_EVENTFD | action, index, start, (uint)eventFds.Length);
        for (int i = 0; i < eventFds.Length; i++)
            BinaryPrimitives.WriteInt32LittleEndian(buffer.AsSpan(HeaderSize + 4 * i), eventFds[i]);
        return buffer;
    }

    /// <summary>DATA_NONE | <paramref name="action"/>: with ACTION_TRIGGER and count 0 it disables the whole index.</summary>
    public static byte[] None(VfioIrqIndex index, uint start, uint count, uint action = VFIO_IRQ_SET_ACTION_TRIGGER)
    {
        byte[] buffer = new byte[HeaderSize];
        WriteHeader(buffer, VFIO_IRQ_SET_DATA_NONE | action, index, start, count);
        return buffer;
    }

    private static void WriteHeader(Span<byte> buffer, uint flags, VfioIrqIndex index, uint start, uint count)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(buffer, (uint)buffer.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[4..], flags);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[8..], (uint)index);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[12..], start);
        BinaryPrimitives.WriteUInt32LittleEndian(buffer[16..], count);
    }
}
