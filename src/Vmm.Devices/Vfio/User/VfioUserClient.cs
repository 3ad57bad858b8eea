using System.Diagnostics;
using Vmm.Interop;
using Vmm.Memory;
using static Vmm.Interop.VfioConstants;
using static Vmm.Interop.VfioUser;

namespace Vmm.Devices.Vfio.User;

/// <summary>Settings of a <see cref="VfioUserClient"/>.</summary>
public sealed class VfioUserClientOptions
{
    /// <summary>How long one request may wait for its reply (the whole exchange, server → client DMA requests
    /// included). A server that does not answer in time makes the connection unusable.</summary>
    public TimeSpan ReplyTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Guest RAM that answers the server's VFIO_USER_DMA_READ/DMA_WRITE requests (IOVA = guest physical
    /// address), and only inside ranges given to <see cref="IVfioDmaSpace.Map"/>. Null: those requests get an
    /// error reply (a server that wants DMA then needs the fd vmm passes with DMA_MAP).</summary>
    public GuestMemory? DmaMemory { get; init; }
}

/// <summary>A VFIO device served by a vfio-user server over an AF_UNIX socket (QEMU's "vfio-user protocol
/// specification"). Region reads and writes become REGION_READ/REGION_WRITE messages (they come from vCPU threads:
/// one request is in flight at a time, under a lock); mmappable regions are mmapped from the fd the server sent with
/// GET_REGION_INFO; DMA_MAP passes guest RAM as memfd + offset; SET_IRQS passes eventfds.
/// A server is not trusted: every reply is checked (size, id, command, echoed fields) and a broken connection — the
/// server closed it, sent garbage, or did not answer within <see cref="VfioUserClientOptions.ReplyTimeout"/> — turns
/// into a <see cref="VfioException"/> for this and every later call, never a hang or a crash.
/// Server → client commands that arrive while a reply is awaited are answered: DMA_READ/DMA_WRITE from
/// <see cref="VfioUserClientOptions.DmaMemory"/> (or with an error when there is none), anything else with
/// EOPNOTSUPP.</summary>
public sealed class VfioUserClient : IVfioDevice, IVfioDmaSpace
{
    /// <summary>Most bytes one REGION_READ/WRITE or DMA_READ/WRITE carries from this side (and what we announce).</summary>
    private const uint ClientMaxDataXferSize = 1024 * 1024;

    /// <summary>Descriptors this side accepts in one message (GET_REGION_INFO sends one).</summary>
    private const int ClientMaxMsgFds = 8;

    /// <summary>The largest message accepted from the server: a data transfer of ClientMaxDataXferSize plus its
    /// headers. Anything bigger is a broken server.</summary>
    private const uint MaxReplySize = ClientMaxDataXferSize + 4096;

    /// <summary>Limits on what the server may claim, so a bad reply cannot make vmm allocate without bound.</summary>
    private const uint MaxRegions = 64, MaxIrqIndexes = 16, MaxIrqCount = 2048, MaxRegionInfoSize = 64 * 1024, MaxSparseAreas = 1024;

    private readonly object _lock = new();
    private readonly VfioUserChannel _channel;
    private readonly string _path;
    private readonly VfioUserClientOptions _options;
    private readonly List<(ulong Iova, ulong Size, bool Writable)> _dmaMaps = [];
    private ushort _nextId;
    private string? _broken;
    private bool _disposed;
    private VfioUserVersionInfo _server;
    private uint _maxXfer;
    private VfioRegionInfo[] _regions = [];
    private ulong[] _regionMmapOffsets = [];
    private int[] _regionFds = [];
    private VfioIrqInfo[] _irqs = [];

    private VfioUserClient(UnixSocket socket, string path, VfioUserClientOptions options)
    {
        _channel = new VfioUserChannel(socket, MaxReplySize);
        _path = path;
        _options = options;
        Name = "vfio-user " + path;
    }

    /// <summary>Connects to the server at <paramref name="socketPath"/>, negotiates the protocol version and reads
    /// the device, region and interrupt information.</summary>
    public static VfioUserClient Connect(string socketPath, VfioUserClientOptions? options = null)
    {
        options ??= new VfioUserClientOptions();
        UnixSocket socket;
        try
        {
            socket = UnixSocket.Connect(socketPath);
            socket.SetReceiveTimeout(options.ReplyTimeout);
        }
        catch (SyscallException e)
        {
            throw new VfioException($"cannot connect to the vfio-user server at {socketPath}: {e.Message}", e.ErrorNumber);
        }
        catch (ArgumentException e)
        {
            throw new VfioException($"cannot connect to the vfio-user server at {socketPath}: {e.Message}");
        }
        var client = new VfioUserClient(socket, socketPath, options);
        try
        {
            client.Negotiate();
            client.ReadDeviceInfo();
            return client;
        }
        catch
        {
            client.Dispose();
            throw;
        }
    }

    public string Name { get; }
    public bool IsPci { get; private set; }
    public bool CanReset { get; private set; }
    public int RegionCount => _regions.Length;
    public int IrqCount => _irqs.Length;
    public IVfioDmaSpace Dma => this;

    /// <summary>What the server announced in its VERSION reply.</summary>
    public VfioUserVersionInfo ServerVersion => _server;

    public VfioRegionInfo GetRegionInfo(int index)
    {
        if ((uint)index >= (uint)_regions.Length)
            throw new VfioException($"{Name}: no region {index} (the device has {_regions.Length})");
        return _regions[index];
    }

    public VfioIrqInfo GetIrqInfo(VfioIrqIndex index)
    {
        if ((uint)index >= (uint)_irqs.Length)
            throw new VfioException($"{Name}: no interrupt index {index} (the device has {_irqs.Length})");
        return _irqs[(int)index];
    }

    // Region reads and writes come from vCPU threads (a guest polling a register of a trapped BAR exits on every
    // access), so they allocate nothing: the request is built on the stack, the data goes out from the caller's span,
    // the reply lands in the channel's reused buffer, and error texts are built only when a reply is wrong.

    public void ReadRegion(int index, ulong offset, Span<byte> data)
    {
        CheckRegionAccess(index, offset, (ulong)data.Length, write: false);
        Span<byte> request = stackalloc byte[16];
        lock (_lock)
        {
            int done = 0;
            while (done < data.Length)
            {
                int count = (int)Math.Min((uint)(data.Length - done), _maxXfer);
                ulong at = offset + (ulong)done;
                Write(request, new vfio_user_region_access { offset = at, region = (uint)index, count = (uint)count });
                var h = Exchange(VfioUserCommand.RegionRead, request, default, default);
                _channel.CloseReceivedFds();
                if (h.IsError)
                    throw ErrorReply(h, RegionContext(index, at, count));
                var reply = _channel.ReceivedPayload;
                if (!TryRead(reply, 0, out vfio_user_region_access echo) || reply.Length != 16 + count
                    || echo.offset != at || echo.region != (uint)index || echo.count != (uint)count)
                    throw new VfioException($"{Name}: VFIO_USER_REGION_READ {RegionContext(index, at, count)}: the reply has {reply.Length} payload bytes " +
                        $"for region {echo.region} offset 0x{echo.offset:x} count {echo.count}, expected {16 + count} for the request");
                reply.Slice(16, count).CopyTo(data[done..]);
                done += count;
            }
        }
    }

    public void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        CheckRegionAccess(index, offset, (ulong)data.Length, write: true);
        Span<byte> request = stackalloc byte[16];
        lock (_lock)
        {
            int done = 0;
            while (done < data.Length)
            {
                int count = (int)Math.Min((uint)(data.Length - done), _maxXfer);
                ulong at = offset + (ulong)done;
                Write(request, new vfio_user_region_access { offset = at, region = (uint)index, count = (uint)count });
                var h = Exchange(VfioUserCommand.RegionWrite, request, data.Slice(done, count), default);
                _channel.CloseReceivedFds();
                if (h.IsError)
                    throw ErrorReply(h, RegionContext(index, at, count));
                // The reply echoes offset, region and count; an empty reply is tolerated (older servers).
                var reply = _channel.ReceivedPayload;
                if (reply.Length != 0 && (!TryRead(reply, 0, out vfio_user_region_access echo) || echo.count != (uint)count))
                    throw new VfioException($"{Name}: VFIO_USER_REGION_WRITE {RegionContext(index, at, count)}: the reply acknowledges a different access " +
                        $"({reply.Length} payload bytes)");
                done += count;
            }
        }
    }

    public IVfioMapping MapRegion(int index, ulong offset, ulong size)
    {
        var info = GetRegionInfo(index);
        if (size == 0 || offset % 4096 != 0 || size % 4096 != 0)
            throw new VfioException($"{Name}: mapping region {index} at 0x{offset:x}+0x{size:x}: offset and size must be page aligned and not empty");
        bool inside = false;
        foreach (var area in info.MmapAreas)
            inside |= offset >= area.Offset && offset <= area.End && size <= area.End - offset;
        if (!inside)
            throw new VfioException($"{Name}: region {index} range 0x{offset:x}+0x{size:x} is not inside one of its mmappable areas");
        int fd = _regionFds[index];
        ulong fileOffset = _regionMmapOffsets[index] + offset;
        if (fd < 0 || fileOffset < offset || fileOffset > long.MaxValue)
            throw new VfioException($"{Name}: region {index} has no usable mmap file descriptor or offset");
        try
        {
            return new Mapping(FileMapping.Map(fd, (long)fileOffset, size, info.Writable, $"{Name} region {index} 0x{offset:x}+0x{size:x}"),
                fd, (long)fileOffset);
        }
        catch (SyscallException e)
        {
            throw new VfioException($"{Name}: {e.Message}", e.ErrorNumber);
        }
    }

    public void SetIrqEventFds(VfioIrqIndex index, int start, ReadOnlySpan<int> eventFds)
    {
        var info = GetIrqInfo(index);
        if (start < 0 || (ulong)start + (ulong)eventFds.Length > info.Count)
            throw new VfioException($"{Name}: interrupt {index} vectors {start}..{start + eventFds.Length - 1} are outside its {info.Count} vectors");
        // A vector set to -1 is detached: DATA_EVENTFD with no descriptors for its range (the spec: "if no file
        // descriptors are provided, this de-assigns"). Runs of real fds go in messages of at most max_msg_fds.
        int chunk = Math.Max(1, _server.MaxMsgFds);
        int i = 0;
        while (i < eventFds.Length)
        {
            int j = i;
            bool detach = eventFds[i] < 0;
            while (j < eventFds.Length && (eventFds[j] < 0) == detach && (detach || j - i < chunk))
                j++;
            SetIrqs(index, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, start + i, j - i,
                detach ? default : eventFds[i..j]);
            i = j;
        }
    }

    public void DisableIrqs(VfioIrqIndex index)
    {
        GetIrqInfo(index);
        SetIrqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, default);
    }

    public void SetIntxUnmaskEventFd(int eventFd)
    {
        GetIrqInfo(VfioIrqIndex.Intx);
        SetIrqs(VfioIrqIndex.Intx, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK, 0, 1, [eventFd]);
    }

    public void Reset() => Request(VfioUserCommand.DeviceReset, default, default, "").CloseFds();

    void IVfioDmaSpace.Map(ulong iova, ulong size, nint hostAddress, int fd, long fdOffset, bool writable)
    {
        if (size == 0 || iova + size < iova || fdOffset < 0)
            throw new VfioException($"{Name}: DMA map of IOVA 0x{iova:x}+0x{size:x} (fd offset {fdOffset}) is empty or wraps");
        var map = new vfio_user_dma_map
        {
            argsz = 32,
            flags = VFIO_USER_F_DMA_REGION_READ | (writable ? VFIO_USER_F_DMA_REGION_WRITE : 0),
            offset = fd >= 0 ? (ulong)fdOffset : 0,
            address = iova,
            size = size,
        };
        Request(VfioUserCommand.DmaMap, ToBytes(map), fd >= 0 ? [fd] : default, $"IOVA 0x{iova:x}+0x{size:x}").CloseFds();
        lock (_lock)
            _dmaMaps.Add((iova, size, writable));
    }

    void IVfioDmaSpace.Unmap(ulong iova, ulong size)
    {
        var unmap = new vfio_user_dma_unmap { argsz = 24, address = iova, size = size };
        Request(VfioUserCommand.DmaUnmap, ToBytes(unmap), default, $"IOVA 0x{iova:x}+0x{size:x}").CloseFds();
        lock (_lock)
            _dmaMaps.RemoveAll(m => m.Iova == iova && m.Size == size);
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            _broken ??= $"{Name} is closed";
            _channel.Dispose();
            foreach (int fd in _regionFds)
                Sys.Close(fd);
            _regionFds = [.. _regionFds.Select(_ => -1)];
        }
    }

    // ---- connection set-up ----

    private void Negotiate()
    {
        var reply = Request(VfioUserCommand.Version, VersionPayload(ClientMaxMsgFds, ClientMaxDataXferSize), default, "");
        reply.CloseFds();
        if (!TryParseVersion(reply.Payload, out var version, out string? error))
            throw Broken($"{Name}: VFIO_USER_VERSION reply is malformed: {error}");
        if (version.Major != Major || version.Minor > Minor)
            throw Broken($"{Name}: the server speaks vfio-user {version.Major}.{version.Minor}, vmm speaks {Major}.{Minor}");
        _server = version;
        _maxXfer = Math.Min(version.MaxDataXferSize, ClientMaxDataXferSize);
    }

    private void ReadDeviceInfo()
    {
        var reply = Request(VfioUserCommand.DeviceGetInfo, ToBytes(new vfio_user_device_info { argsz = 16 }), default, "");
        reply.CloseFds();
        if (!TryRead(reply.Payload, 0, out vfio_user_device_info info))
            throw new VfioException($"{Name}: VFIO_USER_DEVICE_GET_INFO reply has {reply.Payload.Length} payload bytes, less than 16");
        if (info.num_regions > MaxRegions || info.num_irqs > MaxIrqIndexes)
            throw new VfioException($"{Name}: the device claims {info.num_regions} regions and {info.num_irqs} interrupt indexes " +
                $"(vmm accepts at most {MaxRegions} and {MaxIrqIndexes})");
        IsPci = (info.flags & VFIO_DEVICE_FLAGS_PCI) != 0;
        CanReset = (info.flags & VFIO_DEVICE_FLAGS_RESET) != 0;

        var regions = new VfioRegionInfo[info.num_regions];
        _regionFds = [.. Enumerable.Repeat(-1, regions.Length)];
        _regionMmapOffsets = new ulong[regions.Length];
        for (int i = 0; i < regions.Length; i++)
            regions[i] = ReadRegionInfo(i);
        _regions = regions;

        var irqs = new VfioIrqInfo[info.num_irqs];
        for (int i = 0; i < irqs.Length; i++)
        {
            var r = Request(VfioUserCommand.DeviceGetIrqInfo, ToBytes(new vfio_irq_info { argsz = 16, index = (uint)i }), default, $"index {i}");
            r.CloseFds();
            if (!TryRead(r.Payload, 0, out vfio_irq_info irq) || irq.index != (uint)i || irq.count > MaxIrqCount)
                throw new VfioException($"{Name}: VFIO_USER_DEVICE_GET_IRQ_INFO reply for index {i} is malformed " +
                    $"({r.Payload.Length} payload bytes, index {irq.index}, count {irq.count})");
            irqs[i] = new VfioIrqInfo((VfioIrqIndex)i, (VfioIrqFlags)irq.flags, irq.count);
        }
        _irqs = irqs;
    }

    private VfioRegionInfo ReadRegionInfo(int index)
    {
        uint argsz = 32 + 1024;
        for (int attempt = 0; ; attempt++)
        {
            var reply = Request(VfioUserCommand.DeviceGetRegionInfo, ToBytes(new vfio_region_info { argsz = argsz, index = (uint)index }),
                default, $"region {index}");
            try
            {
                byte[] p = reply.Payload;
                if (!TryRead(p, 0, out vfio_region_info info) || info.index != (uint)index)
                    throw new VfioException($"{Name}: VFIO_USER_DEVICE_GET_REGION_INFO reply for region {index} is malformed " +
                        $"({p.Length} payload bytes, index {info.index})");
                // The server says how much room the capabilities need; ask again once with that much.
                if (info.argsz > p.Length && info.argsz > argsz && attempt == 0 && info.argsz <= MaxRegionInfoSize)
                {
                    argsz = info.argsz;
                    continue;
                }
                var flags = (VfioRegionFlags)info.flags;
                var (sparse, msixMappable) = (flags & VfioRegionFlags.Caps) != 0 && info.cap_offset != 0
                    ? ParseRegionCaps(index, p, info)
                    : (null, false);
                List<VfioMmapArea> areas = [];
                if ((flags & VfioRegionFlags.Mmap) != 0 && info.size > 0)
                {
                    int fd = reply.TakeFd(0);
                    if (fd < 0)
                        throw new VfioException($"{Name}: region {index} is mmappable but VFIO_USER_DEVICE_GET_REGION_INFO sent no file descriptor");
                    _regionFds[index] = fd;
                    _regionMmapOffsets[index] = info.offset;
                    areas = sparse ?? [new VfioMmapArea(0, info.size)];
                }
                return new VfioRegionInfo(index, flags, info.size, areas, msixMappable);
            }
            finally
            {
                reply.CloseFds();
            }
        }
    }

    /// <summary>Walks the capability chain of a region info reply: every offset is bounds checked, the chain must
    /// move forward (no loops), sparse areas must lie inside the region and not overlap.</summary>
    private (List<VfioMmapArea>? Sparse, bool MsixMappable) ParseRegionCaps(int index, byte[] p, vfio_region_info info)
    {
        List<VfioMmapArea>? sparse = null;
        bool msixMappable = false;
        uint at = info.cap_offset;
        uint previous = 0;
        while (at != 0)
        {
            if (at < 32 || at <= previous || !TryRead(p, (int)Math.Min(at, int.MaxValue), out vfio_info_cap_header cap))
                throw new VfioException($"{Name}: region {index} capability at offset {at} is outside the {p.Length}-byte reply or loops back");
            if (cap.id == VFIO_REGION_INFO_CAP_SPARSE_MMAP)
            {
                if (!TryRead(p, (int)at, out vfio_region_info_cap_sparse_mmap s) || s.nr_areas > MaxSparseAreas
                    || p.Length - (int)at - 16 < (long)s.nr_areas * 16)
                    throw new VfioException($"{Name}: region {index} sparse mmap capability does not fit in the reply");
                sparse = [];
                for (int i = 0; i < s.nr_areas; i++)
                {
                    TryRead(p, (int)at + 16 + i * 16, out vfio_region_sparse_mmap_area a);
                    if (a.size == 0)
                        continue;
                    if (a.offset > info.size || a.size > info.size - a.offset)
                        throw new VfioException($"{Name}: region {index} sparse mmap area 0x{a.offset:x}+0x{a.size:x} is outside the 0x{info.size:x}-byte region");
                    if (a.offset % 4096 != 0 || a.size % 4096 != 0)
                        throw new VfioException($"{Name}: region {index} sparse mmap area 0x{a.offset:x}+0x{a.size:x} is not page aligned");
                    sparse.Add(new VfioMmapArea(a.offset, a.size));
                }
                sparse.Sort((x, y) => x.Offset.CompareTo(y.Offset));
                for (int i = 1; i < sparse.Count; i++)
                {
                    if (sparse[i].Offset < sparse[i - 1].End)
                        throw new VfioException($"{Name}: region {index} sparse mmap areas at 0x{sparse[i - 1].Offset:x} and 0x{sparse[i].Offset:x} overlap");
                }
            }
            else if (cap.id == VFIO_REGION_INFO_CAP_MSIX_MAPPABLE)
            {
                msixMappable = true;
            }
            previous = at;
            at = cap.next;
        }
        return (sparse, msixMappable);
    }

    // ---- requests ----

    private void CheckRegionAccess(int index, ulong offset, ulong length, bool write)
    {
        var info = GetRegionInfo(index);
        if (offset > info.Size || length > info.Size - offset)
            throw new VfioException($"{Name}: region {index} access at 0x{offset:x}+{length} is outside its 0x{info.Size:x} bytes");
        if (write ? !info.Writable : !info.Readable)
            throw new VfioException($"{Name}: region {index} is not {(write ? "writable" : "readable")}");
    }

    private static string RegionContext(int index, ulong offset, int count) => $"region {index} offset 0x{offset:x} count {count}";

    private void SetIrqs(VfioIrqIndex index, uint flags, int start, int count, ReadOnlySpan<int> fds)
    {
        var set = new vfio_irq_set { argsz = 20, flags = flags, index = (uint)index, start = (uint)start, count = (uint)count };
        Request(VfioUserCommand.DeviceSetIrqs, ToBytes(set), fds, $"index {index} vectors {start}+{count} flags 0x{flags:x}").CloseFds();
    }

    /// <summary>One command of the connection's set-up or control path (not per guest access): its reply as an
    /// object of its own. An error reply throws a <see cref="VfioException"/> naming the command,
    /// <paramref name="context"/> and the errno (the connection stays usable).</summary>
    private VfioUserMessage Request(VfioUserCommand command, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds, string context)
    {
        lock (_lock)
        {
            var h = Exchange(command, payload, default, fds);
            if (h.IsError)
            {
                _channel.CloseReceivedFds();
                throw ErrorReply(h, context);
            }
            return new VfioUserMessage(h, _channel.ReceivedPayload.ToArray(), _channel.TakeReceivedFds());
        }
    }

    /// <summary>Sends one command (payload: <paramref name="payloadHead"/> then <paramref name="payloadData"/>) and
    /// waits for its reply, answering server → client commands meanwhile. Returns the reply's header, error replies
    /// included (the caller throws <see cref="ErrorReply"/> with its context, so that text is built only then); the
    /// payload is the channel's <see cref="VfioUserChannel.ReceivedPayload"/> and its descriptors the channel's until
    /// taken or closed. Allocates nothing on the way. Anything that breaks the stream makes the connection unusable.
    /// Called with the lock held.</summary>
    private vfio_user_header Exchange(VfioUserCommand command, ReadOnlySpan<byte> payloadHead, ReadOnlySpan<byte> payloadData,
        ReadOnlySpan<int> fds)
    {
        Debug.Assert(Monitor.IsEntered(_lock));
        if (_broken is not null)
            throw new VfioException(_broken);
        ushort id = _nextId++;
        try
        {
            _channel.SendParts(id, (ushort)command, VFIO_USER_F_TYPE_COMMAND, 0, payloadHead, payloadData, fds);
        }
        catch (SyscallException e)
        {
            throw BrokenBySocket(e, CommandName((ushort)command));
        }
        long started = Stopwatch.GetTimestamp();
        while (true)
        {
            vfio_user_header h;
            bool received;
            try
            {
                received = _channel.ReceiveInPlace(discardOversized: false, out h);
            }
            catch (SyscallException e)
            {
                throw BrokenBySocket(e, CommandName((ushort)command));
            }
            catch (VfioUserProtocolException e)
            {
                throw Broken($"vfio-user server at {_path} broke the protocol while vmm waited for {CommandName((ushort)command)}: {e.Message}");
            }
            if (!received)
                throw Broken($"vfio-user server at {_path} closed the connection (while vmm waited for {CommandName((ushort)command)})");
            if (h.IsCommand)
            {
                AnswerServerCommand(h);
                if (Stopwatch.GetElapsedTime(started) > _options.ReplyTimeout)
                    throw Broken($"vfio-user server at {_path} did not answer {CommandName((ushort)command)} within {_options.ReplyTimeout.TotalSeconds:0.#} s");
                continue;
            }
            if (!h.IsReply || h.msg_id != id || h.cmd != (ushort)command)
            {
                _channel.CloseReceivedFds();
                throw Broken($"vfio-user server at {_path} sent {(h.IsReply ? "a reply" : $"a message of type {h.flags & VFIO_USER_F_TYPE_MASK}")} " +
                    $"with id {h.msg_id} for {CommandName(h.cmd)} while vmm waited for the reply to {CommandName((ushort)command)} (id {id})");
            }
            return h;
        }
    }

    /// <summary>The exception for an error reply: the command, what it was about and the server's errno.</summary>
    private VfioException ErrorReply(in vfio_user_header reply, string context) =>
        new($"{Name}: {CommandName(reply.cmd)}{(context.Length > 0 ? " " + context : "")} failed: " +
            (reply.error_no == 0 ? "the server gave no errno" : Errno.Describe((int)reply.error_no)), (int)reply.error_no);

    /// <summary>Server → client commands (the payload is the channel's received one). DMA_READ/DMA_WRITE are served
    /// from guest RAM inside DMA-mapped ranges; everything else is refused with EOPNOTSUPP. Called with the lock held.</summary>
    private void AnswerServerCommand(in vfio_user_header h)
    {
        _channel.CloseReceivedFds();
        int errno = Errno.EOPNOTSUPP;
        if (h.cmd == (ushort)VfioUserCommand.DmaRead || h.cmd == (ushort)VfioUserCommand.DmaWrite)
        {
            bool write = h.cmd == (ushort)VfioUserCommand.DmaWrite;
            var payload = _channel.ReceivedPayload;
            errno = ResolveDma(payload, write, out var access, out var memory);
            if (errno == 0)
            {
                if (write)
                    payload[16..].CopyTo(memory);
                if (!h.NoReply)
                {
                    // The reply echoes the access; a read's data follows straight from guest RAM.
                    Span<byte> echo = stackalloc byte[16];
                    Write(echo, access);
                    try
                    {
                        _channel.ReplyParts(h, echo, write ? default : memory);
                    }
                    catch (SyscallException e)
                    {
                        throw BrokenBySocket(e, "a reply to the server");
                    }
                }
                return;
            }
        }
        if (!h.NoReply)
        {
            try
            {
                _channel.ReplyError(h, errno);
            }
            catch (SyscallException e)
            {
                throw BrokenBySocket(e, "a reply to the server");
            }
        }
    }

    /// <summary>Checks a DMA_READ/DMA_WRITE request and finds the guest RAM it names: 0, or the errno to answer.</summary>
    private int ResolveDma(ReadOnlySpan<byte> payload, bool write, out vfio_user_dma_region_access access, out Span<byte> memory)
    {
        memory = default;
        if (!TryRead(payload, 0, out access) || access.count > ClientMaxDataXferSize
            || (write && (ulong)payload.Length != 16 + access.count))
            return Errno.EINVAL;
        var ram = _options.DmaMemory;
        if (ram is null)
            return Errno.EOPNOTSUPP;
        bool mapped = false;
        foreach (var m in _dmaMaps)
            mapped |= access.address >= m.Iova && access.address - m.Iova <= m.Size && access.count <= m.Size - (access.address - m.Iova)
                && (!write || m.Writable);
        if (!mapped || !ram.TryGetSpan(new GuestAddress(access.address), (int)access.count, out memory))
            return Errno.EFAULT;
        return 0;
    }

    private VfioException BrokenBySocket(SyscallException e, string waitingFor) => e.ErrorNumber switch
    {
        Errno.EAGAIN => Broken($"vfio-user server at {_path} did not answer {waitingFor} within {_options.ReplyTimeout.TotalSeconds:0.#} s"),
        Errno.EPIPE or Errno.ECONNRESET => Broken($"vfio-user server at {_path} closed the connection (while vmm waited for {waitingFor})"),
        _ => Broken($"vfio-user connection to {_path} failed: {e.Message}"),
    };

    /// <summary>Marks the connection unusable (every later call fails with the same message) and shuts the socket
    /// down; the message names the server and what happened.</summary>
    private VfioException Broken(string reason)
    {
        _broken ??= reason;
        _channel.Socket.Shutdown();
        return new VfioException(reason);
    }

    /// <summary>A region mmapped from the server's fd; the fd (kept open by the client) can be passed on for
    /// peer-to-peer DMA while the client lives.</summary>
    private sealed class Mapping(FileMapping mapping, int fd, long fileOffset) : IVfioMapping
    {
        public nint HostAddress => mapping.Address;
        public ulong Size => mapping.Size;
        public int FileDescriptor => fd;
        public long FileOffset => fileOffset;
        public void Dispose() => mapping.Dispose();
    }
}
