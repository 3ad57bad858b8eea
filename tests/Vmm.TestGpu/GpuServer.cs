using Vmm.Interop;
using static Vmm.Interop.VfioConstants;
using static Vmm.Interop.VfioUser;

namespace Vmm.TestGpu;

/// <summary>The vfio-user side of the test GPU: one client, one message at a time. Every command is validated and a
/// bad one gets an error reply (counted in <see cref="Errors"/>); nothing a client sends ends the process except
/// closing the connection or a stream that cannot be resynchronized.</summary>
internal sealed class GpuServer : IClientDma, IDisposable
{
    /// <summary>What the server accepts in one message and announces: max_data_xfer_size of payload data plus headers.</summary>
    public const uint MaxDataXferSize = 1024 * 1024;
    public const int MaxMsgFds = 8;

    private readonly VfioUserChannel _channel;
    private readonly TestGpu _gpu;
    private uint _clientMaxXfer = DefaultMaxDataXferSize;
    private ushort _nextServerMsgId = 0x8000;

    public GpuServer(UnixSocket client, ulong bar2Size)
    {
        _channel = new VfioUserChannel(client, MaxDataXferSize + 4096);
        _gpu = new TestGpu(bar2Size, this);
    }

    public TestGpu Gpu => _gpu;
    public long Errors { get; private set; }

    /// <summary>Serves until the client disconnects. Returns false when the stream broke beyond repair.</summary>
    public bool Run()
    {
        Span<int> fds = stackalloc int[2];
        Span<bool> ready = stackalloc bool[2];
        Span<byte> counter = stackalloc byte[8];
        while (true)
        {
            fds[0] = _channel.Socket.Fd;
            fds[1] = _gpu.IntxUnmaskFd;
            int n = _gpu.IntxUnmaskFd >= 0 ? 2 : 1;
            EventFd.Poll(fds[..n], ready[..n], -1);
            if (n == 2 && ready[1])
            {
                if (Uio.Read(_gpu.IntxUnmaskFd, counter) == 8)
                    _gpu.UnmaskIntx();
            }
            if (!ready[0])
                continue;
            VfioUserMessage? message;
            try
            {
                message = _channel.Receive(discardOversized: true);
            }
            catch (VfioUserProtocolException e)
            {
                Errors++;
                Console.Error.WriteLine($"vfio-user-gpu: {e.Message}");
                if (!e.InSync)
                    return false;
                _channel.ReplyError(e.Header, Errno.E2BIG);
                continue;
            }
            catch (SyscallException e)
            {
                Errors++;
                Console.Error.WriteLine($"vfio-user-gpu: {e.Message}");
                return false;
            }
            if (message is null)
                return true;
            try
            {
                Handle(message);
            }
            catch (SyscallException e) when (e.ErrorNumber is Errno.EPIPE or Errno.ECONNRESET)
            {
                return true; // the client went away in the middle of an exchange
            }
            catch (Exception e) when (e is SyscallException or VfioUserProtocolException)
            {
                // The stream broke while the server talked to the client (a DMA_READ/WRITE exchange): no way to resync.
                Errors++;
                Console.Error.WriteLine($"vfio-user-gpu: {e.Message}");
                return false;
            }
            finally
            {
                message.CloseFds();
            }
        }
    }

    private void Handle(VfioUserMessage message)
    {
        var h = message.Header;
        if (!h.IsCommand)
        {
            // A reply nobody asked for (server → client requests wait for theirs inline): drop it.
            Errors++;
            Console.Error.WriteLine($"vfio-user-gpu: unexpected {(h.IsReply ? "reply" : "message type " + (h.flags & VFIO_USER_F_TYPE_MASK))} id {h.msg_id} for {CommandName(h.cmd)}");
            return;
        }
        int errno;
        byte[] reply = [];
        int replyFd = -1;
        try
        {
            errno = h.cmd switch
            {
                (ushort)VfioUserCommand.Version => Version(message.Payload, out reply),
                (ushort)VfioUserCommand.DmaMap => DmaMap(message, out reply),
                (ushort)VfioUserCommand.DmaUnmap => DmaUnmap(message.Payload, out reply),
                (ushort)VfioUserCommand.DeviceGetInfo => DeviceInfo(out reply),
                (ushort)VfioUserCommand.DeviceGetRegionInfo => RegionInfo(message.Payload, out reply, out replyFd),
                (ushort)VfioUserCommand.DeviceGetIrqInfo => IrqInfo(message.Payload, out reply),
                (ushort)VfioUserCommand.DeviceSetIrqs => SetIrqs(message),
                (ushort)VfioUserCommand.RegionRead => RegionRead(message.Payload, out reply),
                (ushort)VfioUserCommand.RegionWrite => RegionWrite(message.Payload, out reply),
                (ushort)VfioUserCommand.DeviceReset => Reset(),
                _ => Errno.EOPNOTSUPP,
            };
        }
        catch (Exception e) when (e is not SyscallException and not VfioUserProtocolException and not OutOfMemoryException)
        {
            // A bug or an input this server did not foresee: an error reply, never a crash.
            Console.Error.WriteLine($"vfio-user-gpu: {CommandName(h.cmd)}: {e.Message}");
            errno = Errno.EINVAL;
        }
        if (errno != 0)
        {
            Errors++;
            if (!h.NoReply)
                _channel.ReplyError(h, errno);
            return;
        }
        if (!h.NoReply)
            _channel.Reply(h, reply, replyFd >= 0 ? [replyFd] : default);
    }

    private int Version(byte[] payload, out byte[] reply)
    {
        reply = [];
        if (!TryParseVersion(payload, out var version, out string? error))
        {
            Console.Error.WriteLine($"vfio-user-gpu: VFIO_USER_VERSION: {error}");
            return Errno.EINVAL;
        }
        if (version.Major != Major)
            return Errno.EINVAL;
        _clientMaxXfer = Math.Min(version.MaxDataXferSize, MaxDataXferSize);
        reply = VersionPayload(MaxMsgFds, MaxDataXferSize);
        return 0;
    }

    private int DeviceInfo(out byte[] reply)
    {
        reply = ToBytes(new vfio_user_device_info
        {
            argsz = 16,
            flags = VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions = TestGpu.RegionCount,
            num_irqs = TestGpu.IrqIndexCount,
        });
        return 0;
    }

    private int RegionInfo(byte[] payload, out byte[] reply, out int fd)
    {
        reply = [];
        fd = -1;
        if (!TryRead(payload, 0, out vfio_region_info request) || request.index >= TestGpu.RegionCount)
            return Errno.EINVAL;
        var info = new vfio_region_info { argsz = 32, index = request.index };
        byte[] caps = [];
        switch (request.index)
        {
            case 0:
                info.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP | VFIO_REGION_INFO_FLAG_CAPS;
                info.size = TestGpu.Bar0Size;
                // Registers stay trapped; the SRAM behind them is mmappable (offset 0 in the fd = BAR0 offset 0).
                caps = new byte[32];
                Write(caps, new vfio_region_info_cap_sparse_mmap
                {
                    header = new vfio_info_cap_header { id = VFIO_REGION_INFO_CAP_SPARSE_MMAP, version = 1, next = 0 },
                    nr_areas = 1,
                });
                Write(caps.AsSpan(16), new vfio_region_sparse_mmap_area { offset = TestGpu.SramStart, size = TestGpu.Bar0Size - TestGpu.SramStart });
                fd = _gpu.Bar0Fd;
                break;
            case 2:
                info.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP;
                info.size = _gpu.Bar2Size;
                fd = _gpu.Bar2Fd;
                break;
            case 6:
                info.flags = VFIO_REGION_INFO_FLAG_READ;
                info.size = TestGpu.RomSize;
                break;
            case 7:
                info.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
                info.size = TestGpu.ConfigSize;
                break;
        }
        uint needed = (uint)(32 + caps.Length);
        info.argsz = needed;
        // Too little room for the capabilities: the struct alone, argsz saying how much to ask for (like the kernel).
        bool withCaps = caps.Length > 0 && request.argsz >= needed;
        if (withCaps)
            info.cap_offset = 32;
        reply = new byte[withCaps ? needed : 32];
        Write(reply, info);
        if (withCaps)
            caps.CopyTo(reply.AsSpan(32));
        return 0;
    }

    private int IrqInfo(byte[] payload, out byte[] reply)
    {
        reply = [];
        if (!TryRead(payload, 0, out vfio_irq_info request) || request.index >= TestGpu.IrqIndexCount)
            return Errno.EINVAL;
        int index = (int)request.index;
        reply = ToBytes(new vfio_irq_info { argsz = 16, flags = TestGpu.IrqFlags(index), index = request.index, count = TestGpu.IrqCount(index) });
        return 0;
    }

    private int SetIrqs(VfioUserMessage message)
    {
        if (!TryRead(message.Payload, 0, out vfio_irq_set set) || set.index >= TestGpu.IrqIndexCount)
            return Errno.EINVAL;
        int index = (int)set.index;
        uint data = set.flags & VFIO_IRQ_SET_DATA_TYPE_MASK, action = set.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if ((set.flags & ~(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK)) != 0
            || !IsSingleBit(data) || !IsSingleBit(action))
            return Errno.EINVAL;
        uint vectors = TestGpu.IrqCount(index);
        if (data == VFIO_IRQ_SET_DATA_NONE && action == VFIO_IRQ_SET_ACTION_TRIGGER && set.count == 0)
        {
            _gpu.DisableIrqs(index);
            return 0;
        }
        if (set.count == 0 || set.start >= vectors || set.count > vectors - set.start)
            return Errno.EINVAL;
        int start = (int)set.start, count = (int)set.count;
        if (data == VFIO_IRQ_SET_DATA_BOOL && message.Payload.Length < 20 + count)
            return Errno.EINVAL;
        bool Selected(int i) => data != VFIO_IRQ_SET_DATA_BOOL || message.Payload[20 + i] != 0;

        if (action == VFIO_IRQ_SET_ACTION_TRIGGER)
        {
            if (data == VFIO_IRQ_SET_DATA_EVENTFD)
            {
                if (message.Fds.Length != 0 && message.Fds.Length != count)
                    return Errno.EINVAL;
                var fds = new int[message.Fds.Length];
                for (int i = 0; i < fds.Length; i++)
                    fds[i] = message.TakeFd(i);
                _gpu.SetTriggerFds(index, start, count, fds);
                return 0;
            }
            for (int i = 0; i < count; i++)
            {
                if (Selected(i))
                    _gpu.TriggerVector(index, start + i);
            }
            return 0;
        }
        // Only INTx is maskable (IrqFlags): MASK/UNMASK on MSI or MSI-X is refused.
        if (index != 0)
            return Errno.EINVAL;
        if (action == VFIO_IRQ_SET_ACTION_UNMASK)
        {
            if (data == VFIO_IRQ_SET_DATA_EVENTFD)
            {
                if (message.Fds.Length > 1)
                    return Errno.EINVAL;
                _gpu.SetIntxUnmaskFd(message.TakeFd(0));
            }
            else if (Selected(0))
            {
                _gpu.UnmaskIntx();
            }
            return 0;
        }
        if (data == VFIO_IRQ_SET_DATA_EVENTFD)
            return Errno.EOPNOTSUPP; // a mask-notification eventfd: nothing here would ever signal it
        if (Selected(0))
            _gpu.MaskIntx();
        return 0;
    }

    private static bool IsSingleBit(uint v) => v != 0 && (v & (v - 1)) == 0;

    private int DmaMap(VfioUserMessage message, out byte[] reply)
    {
        reply = [];
        if (!TryRead(message.Payload, 0, out vfio_user_dma_map map) || message.Fds.Length > 1)
            return Errno.EINVAL;
        int fd = message.TakeFd(0);
        try
        {
            return _gpu.AddDmaMap(map.address, map.size, (map.flags & VFIO_USER_F_DMA_REGION_WRITE) != 0, fd, map.offset);
        }
        finally
        {
            Sys.Close(fd); // the mapping holds its own reference
        }
    }

    private int DmaUnmap(byte[] payload, out byte[] reply)
    {
        reply = [];
        if (!TryRead(payload, 0, out vfio_user_dma_unmap unmap))
            return Errno.EINVAL;
        int errno = _gpu.RemoveDmaMap(unmap.address, unmap.size);
        if (errno == 0)
            reply = payload.AsSpan(0, 24).ToArray(); // the spec: the reply carries the original entry
        return errno;
    }

    private int RegionRead(byte[] payload, out byte[] reply)
    {
        reply = [];
        if (!TryRead(payload, 0, out vfio_user_region_access access) || access.count > MaxDataXferSize)
            return Errno.EINVAL;
        var data = new byte[16 + access.count];
        Write(data, access);
        int errno = Access(access, data.AsSpan(16), write: false);
        if (errno == 0)
            reply = data;
        return errno;
    }

    private int RegionWrite(byte[] payload, out byte[] reply)
    {
        reply = [];
        if (!TryRead(payload, 0, out vfio_user_region_access access) || access.count > MaxDataXferSize
            || payload.Length != 16 + access.count)
            return Errno.EINVAL;
        int errno = Access(access, payload.AsSpan(16), write: true);
        if (errno == 0)
            reply = ToBytes(access);
        return errno;
    }

    /// <summary>One region access, bounds checked; a write's data is in <paramref name="data"/>, a read fills it.</summary>
    private int Access(vfio_user_region_access a, Span<byte> data, bool write)
    {
        ulong size = a.region switch
        {
            0 => TestGpu.Bar0Size,
            2 => _gpu.Bar2Size,
            6 => TestGpu.RomSize,
            7 => TestGpu.ConfigSize,
            _ => 0,
        };
        if (a.count == 0 || a.offset > size || a.count > size - a.offset)
            return Errno.EINVAL;
        int count = (int)a.count;
        switch (a.region)
        {
            case 0 when a.offset >= TestGpu.SramStart:
                Copy(_gpu.Bar0.GetSpan(a.offset, count), data, write);
                return 0;
            case 0:
                if (a.offset + a.count > TestGpu.SramStart)
                    return Errno.EINVAL; // one access does not straddle the registers and the SRAM
                if (!write)
                {
                    _gpu.ReadRegisters(a.offset, data);
                    return 0;
                }
                return _gpu.WriteRegisters(a.offset, data) ? 0 : Errno.EINVAL;
            case 2:
                Copy(_gpu.Bar2.GetSpan(a.offset, count), data, write);
                return 0;
            case 6:
                if (write)
                    return Errno.EINVAL;
                _gpu.ReadRom(a.offset, data);
                return 0;
            default: // 7
                if (write)
                    _gpu.WriteConfig(a.offset, data);
                else
                    _gpu.ReadConfig(a.offset, data);
                return 0;
        }
    }

    private static void Copy(Span<byte> memory, Span<byte> data, bool write)
    {
        if (write)
            data.CopyTo(memory);
        else
            memory.CopyTo(data);
    }

    private int Reset()
    {
        _gpu.Reset();
        return 0;
    }

    // ---- server → client DMA for maps without a file descriptor ----

    bool IClientDma.Read(ulong iova, Span<byte> destination)
    {
        for (int done = 0; done < destination.Length;)
        {
            int count = (int)Math.Min((uint)(destination.Length - done), _clientMaxXfer);
            var request = new vfio_user_dma_region_access { address = iova + (ulong)done, count = (uint)count };
            var reply = ClientRequest(VfioUserCommand.DmaRead, ToBytes(request));
            if (reply is null || reply.Length != 16 + count)
                return false;
            reply.AsSpan(16).CopyTo(destination[done..]);
            done += count;
        }
        return true;
    }

    bool IClientDma.Write(ulong iova, ReadOnlySpan<byte> source)
    {
        for (int done = 0; done < source.Length;)
        {
            int count = (int)Math.Min((uint)(source.Length - done), _clientMaxXfer);
            var payload = new byte[16 + count];
            Write(payload, new vfio_user_dma_region_access { address = iova + (ulong)done, count = (uint)count });
            source.Slice(done, count).CopyTo(payload.AsSpan(16));
            if (ClientRequest(VfioUserCommand.DmaWrite, payload) is null)
                return false;
            done += count;
        }
        return true;
    }

    /// <summary>A request to the client, answered before anything else (the client is waiting for our reply to the
    /// register write that started the DMA). Null when the client answered with an error or nonsense.</summary>
    private byte[]? ClientRequest(VfioUserCommand command, byte[] payload)
    {
        ushort id = _nextServerMsgId++;
        _channel.Send(id, (ushort)command, VFIO_USER_F_TYPE_COMMAND, 0, payload);
        var reply = _channel.Receive(discardOversized: false)
            ?? throw new SyscallException("recvmsg", Errno.ECONNRESET, "the client closed the connection during DMA");
        reply.CloseFds();
        if (!reply.Header.IsReply || reply.Header.msg_id != id || reply.Header.cmd != (ushort)command)
        {
            Errors++;
            Console.Error.WriteLine($"vfio-user-gpu: expected the reply to {CommandName((ushort)command)} id {id}, got id {reply.Header.msg_id} {CommandName(reply.Header.cmd)}");
            return null;
        }
        return reply.Header.IsError ? null : reply.Payload;
    }

    public void Dispose()
    {
        _gpu.Dispose();
        _channel.Dispose();
    }
}
