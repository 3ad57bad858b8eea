using System.Buffers.Binary;
using Vmm.Interop;
using static Vmm.Devices.VhostUser.VhostUserProtocol;

namespace Vmm.Devices.VhostUser;

/// <summary>The front-end side of one vhost-user connection (QEMU docs/interop/vhost-user.rst): one request at a
/// time, each reply checked (same request, reply flag and version 1, exactly the expected size, no descriptors)
/// and awaited at most <see cref="ReplyTimeout"/>. Any violation, a timeout or a closed socket throws
/// <see cref="VhostUserException"/> naming the socket and the request, and leaves the connection broken: after a
/// lost or garbled reply the two sides no longer agree on where a message starts, so every later request fails
/// at once with the first error instead of reading someone else's reply.</summary>
public sealed class VhostUserConnection : IDisposable
{
    public static readonly TimeSpan DefaultReplyTimeout = TimeSpan.FromSeconds(10);

    private readonly UnixSocket _socket;
    private readonly Lock _lock = new();
    private string? _broken;

    /// <summary>Takes ownership of a connected socket; <paramref name="name"/> (the socket path) goes in every error.</summary>
    public VhostUserConnection(UnixSocket socket, string name, TimeSpan? replyTimeout = null)
    {
        _socket = socket;
        Name = name;
        ReplyTimeout = replyTimeout ?? DefaultReplyTimeout;
        _socket.SetReceiveTimeout(ReplyTimeout);
    }

    /// <summary>Connects to the back-end listening at <paramref name="path"/>.</summary>
    public static VhostUserConnection Connect(string path, TimeSpan? replyTimeout = null)
    {
        UnixSocket socket;
        try
        {
            socket = UnixSocket.Connect(path);
        }
        catch (Exception e) when (e is SyscallException or ArgumentException)
        {
            throw new VhostUserException($"vhost-user socket {path}: cannot connect: {e.Message}", e);
        }
        return new VhostUserConnection(socket, path, replyTimeout);
    }

    /// <summary>The socket path (for messages).</summary>
    public string Name { get; }

    public TimeSpan ReplyTimeout { get; }

    /// <summary>The socket fd, for watching the back-end hang up (never read from it elsewhere).</summary>
    public int Fd => _socket.Fd;

    /// <summary>Why the connection is unusable, or null while it works.</summary>
    public string? Broken => Volatile.Read(ref _broken);

    /// <summary>Protocol features both sides agreed on (SET_PROTOCOL_FEATURES).</summary>
    public ulong ProtocolFeatures { get; private set; }

    private bool ReplyAck => (ProtocolFeatures & (1UL << ProtocolReplyAck)) != 0;

    // ---- requests ----

    public ulong GetFeatures() => ReadU64(Request(VhostUserRequest.GetFeatures, [], default, U64Size));

    public void SetFeatures(ulong features) => Command(VhostUserRequest.SetFeatures, U64(features));

    public ulong GetProtocolFeatures() => ReadU64(Request(VhostUserRequest.GetProtocolFeatures, [], default, U64Size));

    /// <summary>Acknowledges protocol features; REPLY_ACK among them makes every later command wait for an ack.</summary>
    public void SetProtocolFeatures(ulong features)
    {
        Command(VhostUserRequest.SetProtocolFeatures, U64(features));
        ProtocolFeatures = features;
    }

    public void SetOwner() => Command(VhostUserRequest.SetOwner, []);

    public void ResetOwner() => Command(VhostUserRequest.ResetOwner, []);

    public void ResetDevice() => Command(VhostUserRequest.ResetDevice, []);

    public ulong GetQueueNum() => ReadU64(Request(VhostUserRequest.GetQueueNum, [], default, U64Size));

    /// <summary>Shares guest RAM: one fd per region (the same memfd may repeat; the kernel duplicates it).</summary>
    public void SetMemTable(IReadOnlyList<VhostUserMemoryRegion> regions, ReadOnlySpan<int> fds)
    {
        if (fds.Length != regions.Count)
            throw new ArgumentException($"{regions.Count} regions need {regions.Count} fds, not {fds.Length}", nameof(fds));
        Command(VhostUserRequest.SetMemTable, MemoryTable(regions), fds);
    }

    public void SetVringNum(uint index, uint size) => Command(VhostUserRequest.SetVringNum, VringState(index, size));

    /// <summary>Ring addresses in the front-end's address space (the userspace_addr of SET_MEM_TABLE).</summary>
    public void SetVringAddr(uint index, ulong descriptor, ulong used, ulong available) =>
        Command(VhostUserRequest.SetVringAddr, VringAddr(index, 0, descriptor, used, available, 0));

    /// <summary>The next available-ring index the back-end will read.</summary>
    public void SetVringBase(uint index, uint next) => Command(VhostUserRequest.SetVringBase, VringState(index, next));

    /// <summary>Stops ring <paramref name="index"/> and returns the back-end's next available index.</summary>
    public uint GetVringBase(uint index)
    {
        var reply = Request(VhostUserRequest.GetVringBase, VringState(index, 0), default, VringStateSize);
        uint replyIndex = BinaryPrimitives.ReadUInt32LittleEndian(reply);
        if (replyIndex != index)
            throw Break($"{Name}: {VhostUserProtocol.Name(VhostUserRequest.GetVringBase)} for ring {index} answered for ring {replyIndex}");
        return BinaryPrimitives.ReadUInt32LittleEndian(reply.AsSpan(4));
    }

    /// <summary>The eventfd the driver's notifications arrive on; null: none (the back-end polls).</summary>
    public void SetVringKick(uint index, EventFd? fd) => VringFd(VhostUserRequest.SetVringKick, index, fd);

    /// <summary>The eventfd the back-end signals to interrupt the driver.</summary>
    public void SetVringCall(uint index, EventFd? fd) => VringFd(VhostUserRequest.SetVringCall, index, fd);

    /// <summary>The eventfd the back-end signals when the ring is broken.</summary>
    public void SetVringErr(uint index, EventFd? fd) => VringFd(VhostUserRequest.SetVringErr, index, fd);

    public void SetVringEnable(uint index, bool enable) => Command(VhostUserRequest.SetVringEnable, VringState(index, enable ? 1u : 0u));

    /// <summary>Reads <paramref name="size"/> bytes of device configuration at <paramref name="offset"/>.</summary>
    public byte[] GetConfig(uint offset, int size)
    {
        if (size is < 1 or > MaxConfigSize)
            throw new ArgumentOutOfRangeException(nameof(size), $"1 to {MaxConfigSize} bytes of configuration");
        var reply = Request(VhostUserRequest.GetConfig, Config(offset, 0, new byte[size]), default, ConfigHeaderSize + size,
            refusedSize: 0);
        if (reply.Length == 0)
            throw Break($"{Name}: the back-end refused {VhostUserProtocol.Name(VhostUserRequest.GetConfig)} ({size} bytes at {offset})");
        uint replyOffset = BinaryPrimitives.ReadUInt32LittleEndian(reply), replySize = BinaryPrimitives.ReadUInt32LittleEndian(reply.AsSpan(4));
        if (replyOffset != offset || replySize != size)
            throw Break($"{Name}: {VhostUserProtocol.Name(VhostUserRequest.GetConfig)} asked for {size} bytes at {offset}, the reply says {replySize} at {replyOffset}");
        return reply[ConfigHeaderSize..];
    }

    /// <summary>Writes device configuration (flags 0: VHOST_SET_CONFIG_TYPE_FRONTEND).</summary>
    public void SetConfig(uint offset, ReadOnlySpan<byte> data) => Command(VhostUserRequest.SetConfig, Config(offset, 0, data));

    private void VringFd(VhostUserRequest request, uint index, EventFd? fd)
    {
        ulong payload = (index & VringIndexMask) | (fd is null ? VringNoFd : 0);
        Span<int> fds = [fd?.Fd ?? -1];
        Command(request, U64(payload), fd is null ? default : fds);
    }

    // ---- transport ----

    /// <summary>A request without a reply of its own; with REPLY_ACK it asks for one and checks the status.</summary>
    private void Command(VhostUserRequest request, byte[] payload, ReadOnlySpan<int> fds = default)
    {
        if (!ReplyAck)
        {
            lock (_lock)
                SendLocked(request, 0, payload, fds);
            return;
        }
        ulong status = ReadU64(Request(request, payload, fds, U64Size, needReply: true));
        if (status != 0)
            throw new VhostUserException($"{Name}: the back-end rejected {VhostUserProtocol.Name(request)} (status {status})");
    }

    /// <summary>Sends a request and returns its reply's payload, which must be exactly
    /// <paramref name="replySize"/> bytes (or <paramref name="refusedSize"/>, a back-end's way of saying no).</summary>
    private byte[] Request(VhostUserRequest request, byte[] payload, ReadOnlySpan<int> fds, int replySize,
        bool needReply = false, int refusedSize = -1)
    {
        lock (_lock)
        {
            SendLocked(request, needReply ? FlagNeedReply : 0, payload, fds);
            return ReceiveLocked(request, replySize, refusedSize);
        }
    }

    private void SendLocked(VhostUserRequest request, uint flags, byte[] payload, ReadOnlySpan<int> fds)
    {
        ThrowIfBroken(request);
        Span<byte> header = stackalloc byte[HeaderSize];
        WriteHeader(header, request, FlagVersion | flags, payload.Length);
        try
        {
            _socket.Send(header, payload, default, fds);
        }
        catch (SyscallException e)
        {
            throw Break(e.ErrorNumber is Errno.EPIPE or Errno.ECONNRESET
                ? $"{Name}: the back-end closed the connection (sending {VhostUserProtocol.Name(request)})"
                : $"{Name}: sending {VhostUserProtocol.Name(request)} failed: {e.Message}", e);
        }
    }

    private byte[] ReceiveLocked(VhostUserRequest request, int replySize, int refusedSize)
    {
        string what = VhostUserProtocol.Name(request);
        var fds = new List<int>();
        try
        {
            Span<byte> header = stackalloc byte[HeaderSize];
            if (!Receive(header, fds, what))
                throw Break($"{Name}: the back-end closed the connection instead of replying to {what}");
            var (replyRequest, flags, size) = ReadHeader(header);
            if (replyRequest != request)
                throw Break($"{Name}: the reply to {what} is for {VhostUserProtocol.Name(replyRequest)}");
            if ((flags & VersionMask) != FlagVersion)
                throw Break($"{Name}: the reply to {what} has protocol version {flags & VersionMask}, not 1 (flags 0x{flags:x})");
            if ((flags & FlagReply) == 0)
                throw Break($"{Name}: the reply to {what} lacks the reply flag (flags 0x{flags:x})");
            if (size > MaxPayload)
                throw Break($"{Name}: the reply to {what} announces {size} bytes (at most {MaxPayload})");
            if (size != replySize && size != refusedSize)
                throw Break($"{Name}: the reply to {what} has {size} bytes of payload, not {replySize}");
            var payload = new byte[size];
            if (size > 0 && !Receive(payload, fds, what))
                throw Break($"{Name}: the back-end closed the connection after the header of its reply to {what}");
            if (fds.Count > 0)
                throw Break($"{Name}: the reply to {what} carries {fds.Count} file descriptor(s); none belong there");
            return payload;
        }
        finally
        {
            foreach (int fd in fds)
                Sys.Close(fd);
        }
    }

    private bool Receive(Span<byte> buffer, List<int> fds, string what)
    {
        try
        {
            return _socket.ReceiveExactly(buffer, fds);
        }
        catch (SyscallException e) when (e.ErrorNumber == Errno.EAGAIN)
        {
            throw Break($"{Name}: no reply to {what} within {ReplyTimeout.TotalSeconds:0.###} s", e);
        }
        catch (SyscallException e) when (e.ErrorNumber == Errno.ECONNRESET)
        {
            throw Break($"{Name}: the back-end closed the connection in the middle of its reply to {what}", e);
        }
        catch (SyscallException e)
        {
            throw Break($"{Name}: receiving the reply to {what} failed: {e.Message}", e);
        }
    }

    private static ulong ReadU64(byte[] payload) => BinaryPrimitives.ReadUInt64LittleEndian(payload);

    private void ThrowIfBroken(VhostUserRequest request)
    {
        if (Broken is string why)
            throw new VhostUserException($"{Name}: cannot send {VhostUserProtocol.Name(request)}: the connection broke earlier ({why})");
    }

    /// <summary>Records the first failure: the stream is out of step, nothing more can be sent.</summary>
    private VhostUserException Break(string message, Exception? inner = null)
    {
        Interlocked.CompareExchange(ref _broken, message, null);
        return new VhostUserException(message, inner);
    }

    /// <summary>Marks the connection dead from outside (the back-end hung up) so later requests fail fast.</summary>
    public void MarkBroken(string why) => Interlocked.CompareExchange(ref _broken, why, null);

    public void Dispose() => _socket.Dispose();
}
