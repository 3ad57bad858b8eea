using System.Buffers.Binary;

namespace Vmm.Devices.Virtio.Vsock;

/// <summary>virtio_vsock_hdr (virtio 1.2 §5.10.6): 44 bytes, little-endian, in front of every packet on the rx and
/// tx queues.</summary>
public struct VsockHeader
{
    public const int Size = 44;

    // Operations (§5.10.6).
    public const ushort OpRequest = 1, OpResponse = 2, OpRst = 3, OpShutdown = 4, OpRw = 5, OpCreditUpdate = 6,
        OpCreditRequest = 7;

    /// <summary>VIRTIO_VSOCK_TYPE_STREAM; SEQPACKET (2) needs VIRTIO_VSOCK_F_SEQPACKET, which is not offered.</summary>
    public const ushort TypeStream = 1;

    /// <summary>SHUTDOWN flags: the sender will receive / send no more.</summary>
    public const uint ShutdownReceive = 1, ShutdownSend = 2;

    public ulong SrcCid, DstCid;
    public uint SrcPort, DstPort, Len;
    public ushort Type, Op;
    public uint Flags, BufAlloc, FwdCnt;

    public static VsockHeader Read(ReadOnlySpan<byte> b) => new()
    {
        SrcCid = BinaryPrimitives.ReadUInt64LittleEndian(b),
        DstCid = BinaryPrimitives.ReadUInt64LittleEndian(b[8..]),
        SrcPort = BinaryPrimitives.ReadUInt32LittleEndian(b[16..]),
        DstPort = BinaryPrimitives.ReadUInt32LittleEndian(b[20..]),
        Len = BinaryPrimitives.ReadUInt32LittleEndian(b[24..]),
        Type = BinaryPrimitives.ReadUInt16LittleEndian(b[28..]),
        Op = BinaryPrimitives.ReadUInt16LittleEndian(b[30..]),
        Flags = BinaryPrimitives.ReadUInt32LittleEndian(b[32..]),
        BufAlloc = BinaryPrimitives.ReadUInt32LittleEndian(b[36..]),
        FwdCnt = BinaryPrimitives.ReadUInt32LittleEndian(b[40..]),
    };

    public readonly void Write(Span<byte> b)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(b, SrcCid);
        BinaryPrimitives.WriteUInt64LittleEndian(b[8..], DstCid);
        BinaryPrimitives.WriteUInt32LittleEndian(b[16..], SrcPort);
        BinaryPrimitives.WriteUInt32LittleEndian(b[20..], DstPort);
        BinaryPrimitives.WriteUInt32LittleEndian(b[24..], Len);
        BinaryPrimitives.WriteUInt16LittleEndian(b[28..], Type);
        BinaryPrimitives.WriteUInt16LittleEndian(b[30..], Op);
        BinaryPrimitives.WriteUInt32LittleEndian(b[32..], Flags);
        BinaryPrimitives.WriteUInt32LittleEndian(b[36..], BufAlloc);
        BinaryPrimitives.WriteUInt32LittleEndian(b[40..], FwdCnt);
    }
}
