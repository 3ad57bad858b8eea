using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;

namespace Vmm.Interop;

/// <summary>The vfio-user wire format (QEMU docs/interop/vfio-user.rst, "vfio-user protocol specification"):
/// every message is a 16-byte header and a command-specific payload on an AF_UNIX stream, in host byte order;
/// file descriptors travel as SCM_RIGHTS. The payloads reuse the kernel's vfio structs where the spec says so.
/// Shared by vmm's client and the test GPU server. The structs are nested here so their C names cannot clash
/// with the kernel VFIO structs in this namespace.</summary>
public static class VfioUser
{
    public const int HeaderSize = 16;

    /// <summary>Protocol version both sides speak (the spec's current 0.1).</summary>
    public const ushort Major = 0, Minor = 1;

    /// <summary>The spec's defaults when a peer's capabilities leave them out.</summary>
    public const int DefaultMaxMsgFds = 1;
    public const uint DefaultMaxDataXferSize = 1024 * 1024;

    // Header flags: bits 0-3 the type, bit 4 no-reply, bit 5 error.
    public const uint VFIO_USER_F_TYPE_COMMAND = 0, VFIO_USER_F_TYPE_REPLY = 1, VFIO_USER_F_TYPE_MASK = 0xF;
    public const uint VFIO_USER_F_NO_REPLY = 0x10, VFIO_USER_F_ERROR = 0x20;

    // The payloads carry <linux/vfio.h> values: VfioConstants (checked against the header by VfioAbiTests).

    // DMA_MAP flags (bit 0 readable, bit 1 writeable).
    public const uint VFIO_USER_F_DMA_REGION_READ = 1, VFIO_USER_F_DMA_REGION_WRITE = 2;

    [StructLayout(LayoutKind.Sequential, Pack = 1)]
    public struct vfio_user_header
    {
        public ushort msg_id;
        public ushort cmd;
        public uint msg_size;
        public uint flags;
        public uint error_no;

        public readonly bool IsReply => (flags & VFIO_USER_F_TYPE_MASK) == VFIO_USER_F_TYPE_REPLY;
        public readonly bool IsCommand => (flags & VFIO_USER_F_TYPE_MASK) == VFIO_USER_F_TYPE_COMMAND;
        public readonly bool IsError => (flags & VFIO_USER_F_ERROR) != 0;
        public readonly bool NoReply => (flags & VFIO_USER_F_NO_REPLY) != 0;
    }

    /// <summary>VERSION payload; NUL-terminated JSON capabilities follow.</summary>
    [StructLayout(LayoutKind.Sequential, Pack = 1)]
    public struct vfio_user_version
    {
        public ushort major;
        public ushort minor;
    }

    /// <summary>DMA_MAP: [address, +size) of the client's DMA space is [fd@offset, +size) (fd in SCM_RIGHTS; none:
    /// the server must use DMA_READ/DMA_WRITE). 32 bytes.</summary>
    [StructLayout(LayoutKind.Sequential, Pack = 1)]
    public struct vfio_user_dma_map
    {
        public uint argsz;
        public uint flags;
        public ulong offset;
        public ulong address;
        public ulong size;
    }

    /// <summary>DMA_UNMAP: exactly a range given to DMA_MAP. 24 bytes; the reply echoes it.</summary>
    [StructLayout(LayoutKind.Sequential, Pack = 1)]
    public struct vfio_user_dma_unmap
    {
        public uint argsz;
        public uint flags;
        public ulong address;
        public ulong size;
    }

    /// <summary>DEVICE_GET_INFO request and reply (vfio_device_info without cap_offset). 16 bytes.</summary>
    [StructLayout(LayoutKind.Sequential, Pack = 1)]
    public struct vfio_user_device_info
    {
        public uint argsz;
        public uint flags;
        public uint num_regions;
        public uint num_irqs;
    }

    // DEVICE_GET_REGION_INFO, GET_IRQ_INFO and SET_IRQS carry the kernel's own structs (Vfio.cs): vfio_region_info
    // (capabilities at cap_offset from its start; offset = the mmap offset in the fd the reply carries, sparse areas
    // relative to it), vfio_info_cap_header, vfio_region_info_cap_sparse_mmap + areas, vfio_irq_info, and
    // vfio_irq_set (its eventfds travel in SCM_RIGHTS, none = deassign).

    /// <summary>REGION_READ/REGION_WRITE request and reply (16 bytes; the data follows for a write request and a
    /// read reply).</summary>
    [StructLayout(LayoutKind.Sequential, Pack = 1)]
    public struct vfio_user_region_access
    {
        public ulong offset;
        public uint region;
        public uint count;
    }

    /// <summary>DMA_READ/DMA_WRITE (server → client) request and reply (16 bytes; data follows for a write request
    /// and a read reply).</summary>
    [StructLayout(LayoutKind.Sequential, Pack = 1)]
    public struct vfio_user_dma_region_access
    {
        public ulong address;
        public ulong count;
    }

    /// <summary>Copies a struct out of a payload; false when the payload is too short.</summary>
    public static bool TryRead<T>(ReadOnlySpan<byte> payload, int offset, out T value) where T : unmanaged
    {
        if (offset < 0 || offset > payload.Length || payload.Length - offset < Unsafe.SizeOf<T>())
        {
            value = default;
            return false;
        }
        value = MemoryMarshal.Read<T>(payload[offset..]);
        return true;
    }

    public static void Write<T>(Span<byte> destination, in T value) where T : unmanaged =>
        MemoryMarshal.Write(destination, in value);

    /// <summary>The struct's bytes, for building a payload.</summary>
    public static byte[] ToBytes<T>(in T value) where T : unmanaged
    {
        var bytes = new byte[Unsafe.SizeOf<T>()];
        MemoryMarshal.Write(bytes, in value);
        return bytes;
    }

    public static string CommandName(ushort command) => command switch
    {
        (ushort)VfioUserCommand.Version => "VFIO_USER_VERSION",
        (ushort)VfioUserCommand.DmaMap => "VFIO_USER_DMA_MAP",
        (ushort)VfioUserCommand.DmaUnmap => "VFIO_USER_DMA_UNMAP",
        (ushort)VfioUserCommand.DeviceGetInfo => "VFIO_USER_DEVICE_GET_INFO",
        (ushort)VfioUserCommand.DeviceGetRegionInfo => "VFIO_USER_DEVICE_GET_REGION_INFO",
        (ushort)VfioUserCommand.DeviceGetRegionIoFds => "VFIO_USER_DEVICE_GET_REGION_IO_FDS",
        (ushort)VfioUserCommand.DeviceGetIrqInfo => "VFIO_USER_DEVICE_GET_IRQ_INFO",
        (ushort)VfioUserCommand.DeviceSetIrqs => "VFIO_USER_DEVICE_SET_IRQS",
        (ushort)VfioUserCommand.RegionRead => "VFIO_USER_REGION_READ",
        (ushort)VfioUserCommand.RegionWrite => "VFIO_USER_REGION_WRITE",
        (ushort)VfioUserCommand.DmaRead => "VFIO_USER_DMA_READ",
        (ushort)VfioUserCommand.DmaWrite => "VFIO_USER_DMA_WRITE",
        (ushort)VfioUserCommand.DeviceReset => "VFIO_USER_DEVICE_RESET",
        _ => $"vfio-user command {command}",
    };

    /// <summary>The VERSION payload: major, minor and <c>{"capabilities":{...}}</c> with a NUL. Migration is
    /// left out (neither side supports it).</summary>
    public static byte[] VersionPayload(int maxMsgFds, uint maxDataXferSize)
    {
        string json = $"{{\"capabilities\":{{\"max_msg_fds\":{maxMsgFds},\"max_data_xfer_size\":{maxDataXferSize}}}}}";
        var payload = new byte[4 + Encoding.UTF8.GetByteCount(json) + 1];
        BinaryPrimitives.WriteUInt16LittleEndian(payload, Major);
        BinaryPrimitives.WriteUInt16LittleEndian(payload.AsSpan(2), Minor);
        Encoding.UTF8.GetBytes(json, payload.AsSpan(4));
        return payload;
    }

    /// <summary>Parses a VERSION payload (request or reply). Missing capabilities take the spec's defaults;
    /// malformed JSON or out-of-range numbers give an error text instead.</summary>
    public static bool TryParseVersion(ReadOnlySpan<byte> payload, out VfioUserVersionInfo version, out string? error)
    {
        version = default;
        error = null;
        if (!TryRead(payload, 0, out vfio_user_version v))
        {
            error = $"payload is {payload.Length} bytes, less than the 4-byte version header";
            return false;
        }
        int maxMsgFds = DefaultMaxMsgFds;
        uint maxXfer = DefaultMaxDataXferSize;
        var json = payload[4..];
        int nul = json.IndexOf((byte)0);
        if (nul >= 0)
            json = json[..nul];
        if (!json.IsEmpty)
        {
            try
            {
                using var doc = JsonDocument.Parse(json.ToArray(), new JsonDocumentOptions { MaxDepth = 8 });
                if (doc.RootElement.ValueKind != JsonValueKind.Object)
                    throw new FormatException("the version data is not a JSON object");
                if (doc.RootElement.TryGetProperty("capabilities", out var caps))
                {
                    if (caps.ValueKind != JsonValueKind.Object)
                        throw new FormatException("\"capabilities\" is not an object");
                    if (caps.TryGetProperty("max_msg_fds", out var fds))
                    {
                        if (!fds.TryGetInt32(out maxMsgFds) || maxMsgFds < 0)
                            throw new FormatException($"max_msg_fds {fds.GetRawText()} is not a non-negative 32-bit number");
                    }
                    if (caps.TryGetProperty("max_data_xfer_size", out var xfer))
                    {
                        if (!xfer.TryGetUInt32(out maxXfer) || maxXfer == 0)
                            throw new FormatException($"max_data_xfer_size {xfer.GetRawText()} is not a positive 32-bit number");
                    }
                }
            }
            catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException)
            {
                error = "bad capabilities JSON: " + e.Message;
                return false;
            }
        }
        version = new VfioUserVersionInfo(v.major, v.minor, maxMsgFds, maxXfer);
        return true;
    }
}

/// <summary>vfio-user command numbers (the spec's command table).</summary>
public enum VfioUserCommand : ushort
{
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    DeviceGetRegionIoFds = 6,
    DeviceGetIrqInfo = 7,
    DeviceSetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
}

/// <summary>What a VERSION message says.</summary>
public readonly record struct VfioUserVersionInfo(ushort Major, ushort Minor, int MaxMsgFds, uint MaxDataXferSize);

/// <summary>One received message. <see cref="Fds"/> came with it (SCM_RIGHTS) and belong to whoever handles it:
/// <see cref="CloseFds"/> closes the ones nobody took (set to -1 when taken).</summary>
public sealed class VfioUserMessage(VfioUser.vfio_user_header header, byte[] payload, int[] fds)
{
    public VfioUser.vfio_user_header Header { get; } = header;
    public byte[] Payload { get; } = payload;
    public int[] Fds { get; } = fds;

    public ushort Command => Header.cmd;

    /// <summary>Takes ownership of the fd at <paramref name="index"/> (-1 when there is none).</summary>
    public int TakeFd(int index)
    {
        if (index < 0 || index >= Fds.Length)
            return -1;
        int fd = Fds[index];
        Fds[index] = -1;
        return fd;
    }

    public void CloseFds()
    {
        for (int i = 0; i < Fds.Length; i++)
        {
            Sys.Close(Fds[i]);
            Fds[i] = -1;
        }
    }
}

/// <summary>The message stream was broken by the peer (a header that cannot be a message, or a size beyond what
/// this side accepts). <see cref="InSync"/> says whether the stream is still usable (the oversized payload was
/// read and dropped).</summary>
public sealed class VfioUserProtocolException(string message, VfioUser.vfio_user_header header, bool inSync) : Exception(message)
{
    public VfioUser.vfio_user_header Header { get; } = header;
    public bool InSync { get; } = inSync;
}

/// <summary>vfio-user framing over a <see cref="UnixSocket"/>: whole messages out, whole messages in, with the
/// size checked against a cap before anything is allocated. Not thread-safe: one sender and one receiver at a
/// time (the client serializes with a lock, the server is single-threaded).
/// Sending never allocates (the header is built on the stack and goes out with the payload in one gathered write);
/// <see cref="ReceiveInPlace"/> reads into a payload buffer the channel keeps, so a client's steady stream of small
/// requests and replies (region accesses from vCPU threads) allocates nothing.</summary>
public sealed class VfioUserChannel(UnixSocket socket, uint maxMessageSize) : IDisposable
{
    /// <summary>The receive buffer starts at this size and doubles as needed (up to the largest accepted payload).</summary>
    private const int InitialPayloadBuffer = 256;

    private byte[] _payload = new byte[InitialPayloadBuffer];
    private int _payloadLength;
    private readonly List<int> _fds = new(UnixSocket.MaxReceivedFds);

    public UnixSocket Socket { get; } = socket;

    /// <summary>The largest message (header included) <see cref="Receive"/> accepts.</summary>
    public uint MaxMessageSize { get; set; } = maxMessageSize;

    public void Send(ushort msgId, ushort command, uint flags, uint errorNo, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds = default) =>
        SendParts(msgId, command, flags, errorNo, payload, default, fds);

    /// <summary>Sends one message whose payload is <paramref name="payloadHead"/> followed by
    /// <paramref name="payloadData"/> (a request struct and the data it carries, which then needs no copying).</summary>
    public void SendParts(ushort msgId, ushort command, uint flags, uint errorNo, ReadOnlySpan<byte> payloadHead,
        ReadOnlySpan<byte> payloadData, ReadOnlySpan<int> fds = default)
    {
        Span<byte> header = stackalloc byte[VfioUser.HeaderSize];
        VfioUser.Write(header, new VfioUser.vfio_user_header
        {
            msg_id = msgId,
            cmd = command,
            // Two spans of at most int.MaxValue bytes each and the header fit in a uint.
            msg_size = (uint)(VfioUser.HeaderSize + (long)payloadHead.Length + payloadData.Length),
            flags = flags,
            error_no = errorNo,
        });
        Socket.Send(header, payloadHead, payloadData, fds);
    }

    /// <summary>A reply to <paramref name="request"/>: same id and command, the reply type, optionally the error bit.</summary>
    public void Reply(in VfioUser.vfio_user_header request, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds = default) =>
        Send(request.msg_id, request.cmd, VfioUser.VFIO_USER_F_TYPE_REPLY, 0, payload, fds);

    /// <summary>A reply whose payload is <paramref name="payloadHead"/> followed by <paramref name="payloadData"/>.</summary>
    public void ReplyParts(in VfioUser.vfio_user_header request, ReadOnlySpan<byte> payloadHead, ReadOnlySpan<byte> payloadData) =>
        SendParts(request.msg_id, request.cmd, VfioUser.VFIO_USER_F_TYPE_REPLY, 0, payloadHead, payloadData);

    /// <summary>An error reply: header only (the spec: "the reply message must only include the reply header").</summary>
    public void ReplyError(in VfioUser.vfio_user_header request, int errno) =>
        Send(request.msg_id, request.cmd, VfioUser.VFIO_USER_F_TYPE_REPLY | VfioUser.VFIO_USER_F_ERROR, (uint)errno, default);

    /// <summary>The next message as an object of its own, or null when the peer closed the connection between
    /// messages. Errors as for <see cref="ReceiveInPlace"/>.</summary>
    public VfioUserMessage? Receive(bool discardOversized)
    {
        if (!ReceiveInPlace(discardOversized, out var header))
            return null;
        return new VfioUserMessage(header, ReceivedPayload.ToArray(), TakeReceivedFds());
    }

    /// <summary>Receives the next message into buffers the channel keeps: its payload is <see cref="ReceivedPayload"/>
    /// and its descriptors <see cref="ReceivedFdCount"/>/<see cref="TakeReceivedFds"/>, both valid until the next
    /// receive (which closes descriptors nobody took). Allocates nothing once the payload buffer has grown to the
    /// sizes seen. Returns false when the peer closed the connection between messages. A message shorter than its
    /// header or larger than <see cref="MaxMessageSize"/> throws <see cref="VfioUserProtocolException"/>; with
    /// <paramref name="discardOversized"/> the oversized payload is read and dropped first, so the stream stays in
    /// sync. Socket errors (a receive timeout: EAGAIN) throw <see cref="SyscallException"/>.</summary>
    public bool ReceiveInPlace(bool discardOversized, out VfioUser.vfio_user_header header)
    {
        CloseReceivedFds();
        _payloadLength = 0;
        try
        {
            Span<byte> headerBytes = stackalloc byte[VfioUser.HeaderSize];
            if (!Socket.ReceiveExactly(headerBytes, _fds))
            {
                header = default;
                return false;
            }
            header = MemoryMarshal.Read<VfioUser.vfio_user_header>(headerBytes);
            if (header.msg_size < VfioUser.HeaderSize)
                throw new VfioUserProtocolException(
                    $"{VfioUser.CommandName(header.cmd)} message (id {header.msg_id}) says it is {header.msg_size} bytes, less than its {VfioUser.HeaderSize}-byte header",
                    header, inSync: false);
            if (header.msg_size > MaxMessageSize)
            {
                bool inSync = discardOversized && Socket.Discard(header.msg_size - VfioUser.HeaderSize);
                throw new VfioUserProtocolException(
                    $"{VfioUser.CommandName(header.cmd)} message (id {header.msg_id}) is {header.msg_size} bytes, more than the {MaxMessageSize} accepted",
                    header, inSync);
            }
            int length = (int)(header.msg_size - VfioUser.HeaderSize);
            if (length > _payload.Length)
                _payload = new byte[(int)Math.Min(Math.Max(length, 2L * _payload.Length), MaxMessageSize - VfioUser.HeaderSize)];
            if (length > 0 && !Socket.ReceiveExactly(_payload.AsSpan(0, length), _fds))
                throw new SyscallException("recvmsg", Errno.ECONNRESET, $"connection closed inside a {header.msg_size}-byte message");
            _payloadLength = length;
            return true;
        }
        catch
        {
            CloseReceivedFds();
            throw;
        }
    }

    /// <summary>The payload of the message <see cref="ReceiveInPlace"/> received last (valid until the next receive).</summary>
    public ReadOnlySpan<byte> ReceivedPayload => _payload.AsSpan(0, _payloadLength);

    /// <summary>How many descriptors came with the last received message (and were not taken yet).</summary>
    public int ReceivedFdCount => _fds.Count;

    /// <summary>Takes ownership of the descriptors of the last received message.</summary>
    public int[] TakeReceivedFds()
    {
        if (_fds.Count == 0)
            return [];
        int[] fds = [.. _fds];
        _fds.Clear();
        return fds;
    }

    /// <summary>Closes the descriptors of the last received message that nobody took.</summary>
    public void CloseReceivedFds()
    {
        foreach (int fd in _fds)
            Sys.Close(fd);
        _fds.Clear();
    }

    /// <summary>Closes the socket. Descriptors of a received message are the receiver's to take or close (the next
    /// receive closes leftovers); Dispose may run on another thread to end a blocked receive, so it leaves them.</summary>
    public void Dispose() => Socket.Dispose();
}
