using System.Buffers.Binary;
using System.Text;
using Vmm.Devices.Virtio;
using Vmm.Interop;
using Vmm.Interop.Seccomp;
using Vmm.Memory;
using static Vmm.Devices.VhostUser.VhostUserProtocol;

namespace Vmm.Devices.VhostUser;

/// <summary>A virtio device whose queues another process serves over vhost-user: virtio-fs (virtiofsd) or
/// virtio-blk (qemu-storage-daemon). The transport, configuration space and feature negotiation stay here; at
/// DRIVER_OK the back-end gets guest RAM (the memfd), the rings (as addresses in our mapping), each queue's kick
/// eventfd (already a KVM ioeventfd, so guest notifications go straight to the back-end) and a call eventfd (with
/// MSI-X, the vector's irqfd, so completions go straight to the guest). No code of ours runs per request.
/// Without an irqfd (INTx, or a queue without a vector) a relay thread turns call signals into interrupts.
/// A back-end that fails, lies or goes away puts the device in DEVICE_NEEDS_RESET with a log line naming its
/// socket; the VM runs on. No exception leaves <see cref="Activate"/>, <see cref="Deactivate"/> or the config
/// accessors (they run on vCPU threads). There is no reconnection: a dead back-end stays dead.</summary>
public sealed class VhostUserDevice : VirtioDevice
{
    /// <summary>Transport bits a back-end may offer through us: device bits 0-23, INDIRECT_DESC, EVENT_IDX and
    /// VERSION_1. Not PROTOCOL_FEATURES (bit 30, a vhost-user bit), not NOTIFY_ON_EMPTY / ANY_LAYOUT (legacy),
    /// not ACCESS_PLATFORM or RING_PACKED (the transport supports neither).</summary>
    public const ulong ForwardableFeatures = 0xFF_FFFFUL | VirtioFeatures.TransportFeatures;

    public const int BlockConfigSize = 60; // struct virtio_blk_config up to write_zeroes_may_unmap + padding
    private const int BlockConfigNumQueues = 34;
    private const int BlockFeatureMq = 12;
    public const int FsTagSize = 36, FsConfigSize = 40;

    private readonly VhostUserConnection _connection;
    private readonly byte[] _config;
    private readonly bool _configFromBackend;
    private readonly ulong _backendFeatures;
    private readonly Lock _lock = new();
    private VirtioContext? _context;
    private Relay? _relay;
    private readonly List<int> _started = [];

    private VhostUserDevice(VirtioDeviceType type, string name, (byte, byte) pciClass, VhostUserConnection connection,
        int queueCount, ushort queueSize, Func<VhostUserDevice, byte[]> config, bool configFromBackend)
    {
        Type = type;
        Name = name;
        PciClass = pciClass;
        _connection = connection;
        QueueCount = queueCount;
        MaxQueueSize = queueSize;
        _configFromBackend = configFromBackend;
        try
        {
            _backendFeatures = connection.GetFeatures();
            if (!VirtioFeatures.Has(_backendFeatures, VirtioFeatures.Version1))
                throw new VhostUserException($"{connection.Name}: the back-end does not offer VIRTIO_F_VERSION_1 (features 0x{_backendFeatures:x})");
            if (VirtioFeatures.Has(_backendFeatures, FeatureProtocolFeatures))
            {
                ulong offered = connection.GetProtocolFeatures();
                ulong wanted = (1UL << ProtocolMq) | (1UL << ProtocolReplyAck) | (configFromBackend ? 1UL << ProtocolConfig : 0);
                connection.SetProtocolFeatures(offered & wanted);
                if (VirtioFeatures.Has(offered, ProtocolMq))
                {
                    ulong max = connection.GetQueueNum();
                    if ((ulong)queueCount > max)
                        throw new VhostUserException($"{connection.Name}: {queueCount} queues wanted, the back-end serves at most {max}");
                }
            }
            connection.SetOwner();
            _config = config(this);
        }
        catch
        {
            connection.Dispose();
            throw;
        }
    }

    /// <summary>virtio-fs (device type 26) served by virtiofsd at <paramref name="socketPath"/>: queue 0 is the
    /// high-priority queue, then <paramref name="requestQueues"/> request queues; the configuration (tag,
    /// num_request_queues) is ours.</summary>
    public static VhostUserDevice CreateFs(string socketPath, string tag, int requestQueues = 1, ushort queueSize = 1024,
        TimeSpan? replyTimeout = null)
    {
        int tagBytes = Encoding.UTF8.GetByteCount(tag);
        if (tagBytes is 0 or > FsTagSize)
            throw new ArgumentException($"a virtio-fs tag is 1 to {FsTagSize} bytes, '{tag}' has {tagBytes}", nameof(tag));
        if (requestQueues is < 1 or > 63)
            throw new ArgumentOutOfRangeException(nameof(requestQueues), $"1 to 63 request queues, not {requestQueues}");
        CheckQueueSize(queueSize);
        var connection = VhostUserConnection.Connect(socketPath, replyTimeout);
        return new VhostUserDevice(VirtioDeviceType.Fs, $"vhost-user-fs ({tag}, {socketPath})", (0x01, 0x80), connection,
            1 + requestQueues, queueSize, _ =>
            {
                var c = new byte[FsConfigSize];
                Encoding.UTF8.GetBytes(tag, c);
                BinaryPrimitives.WriteUInt32LittleEndian(c.AsSpan(FsTagSize), (uint)requestQueues);
                return c;
            }, configFromBackend: false);
    }

    /// <summary>virtio-blk (device type 2) served at <paramref name="socketPath"/> (qemu-storage-daemon's
    /// vhost-user-blk export): the configuration (capacity, limits, topology) comes from the back-end's GET_CONFIG,
    /// with num_queues set to what we expose.</summary>
    public static VhostUserDevice CreateBlock(string socketPath, int numQueues = 1, ushort queueSize = 128, TimeSpan? replyTimeout = null)
    {
        if (numQueues is < 1 or > 64)
            throw new ArgumentOutOfRangeException(nameof(numQueues), $"1 to 64 queues, not {numQueues}");
        CheckQueueSize(queueSize);
        var connection = VhostUserConnection.Connect(socketPath, replyTimeout);
        return new VhostUserDevice(VirtioDeviceType.Block, $"vhost-user-blk ({socketPath})", (0x01, 0x00), connection,
            numQueues, queueSize, device =>
            {
                if ((device._connection.ProtocolFeatures & (1UL << ProtocolConfig)) == 0)
                    throw new VhostUserException($"{socketPath}: the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG (a block device needs its configuration)");
                var c = device._connection.GetConfig(0, BlockConfigSize);
                bool mq = VirtioFeatures.Has(device._backendFeatures, BlockFeatureMq);
                if (!mq && numQueues > 1)
                    throw new VhostUserException($"{socketPath}: {numQueues} queues wanted, the back-end does not offer VIRTIO_BLK_F_MQ");
                if (mq)
                    BinaryPrimitives.WriteUInt16LittleEndian(c.AsSpan(BlockConfigNumQueues), (ushort)numQueues);
                return c;
            }, configFromBackend: true);
    }

    private static void CheckQueueSize(ushort size)
    {
        if (size == 0 || size > 32768 || (size & (size - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(size), $"the queue size must be a power of two up to 32768, not {size}");
    }

    public override VirtioDeviceType Type { get; }
    public override string Name { get; }
    public override (byte Class, byte SubClass) PciClass { get; }
    public override int QueueCount { get; }
    public override ushort MaxQueueSize { get; }
    public override bool SignalsVectorsDirectly => true;

    public string SocketPath => _connection.Name;

    /// <summary>The back-end's virtio features (GET_FEATURES), including PROTOCOL_FEATURES.</summary>
    public ulong BackendFeatures => _backendFeatures;

    /// <summary>Protocol features agreed with the back-end.</summary>
    public ulong ProtocolFeatures => _connection.ProtocolFeatures;

    public override ulong DeviceFeatures => _backendFeatures & ForwardableFeatures & 0xFF_FFFFUL;

    public override ulong OfferedFeatures => _backendFeatures & ForwardableFeatures;

    public override int ConfigSize => _config.Length;

    /// <summary>Why the back-end can no longer be used (it hung up, broke the protocol), or null.</summary>
    public string? Failure => _connection.Broken;

    public override void ReadConfig(int offset, Span<byte> data)
    {
        lock (_lock)
            _config.AsSpan(offset, data.Length).CopyTo(data);
    }

    /// <summary>Block devices forward writes (the writeback byte) with SET_CONFIG; a failure is logged.</summary>
    public override void WriteConfig(int offset, ReadOnlySpan<byte> data)
    {
        if (!_configFromBackend)
            return;
        lock (_lock)
        {
            try
            {
                _connection.SetConfig((uint)offset, data);
                data.CopyTo(_config.AsSpan(offset));
            }
            catch (VhostUserException e)
            {
                Log($"configuration write not forwarded: {e.Message}");
            }
        }
    }

    public override void Activate(VirtioContext context)
    {
        lock (_lock)
        {
            _context = context;
            try
            {
                Start(context);
            }
            catch (Exception e) when (e is VhostUserException or GuestMemoryException or ArgumentException)
            {
                Log($"cannot start: {e.Message}");
                StopRelay();
                context.NeedsReset($"vhost-user back-end {_connection.Name}: {e.Message}");
            }
        }
    }

    private void Start(VirtioContext context)
    {
        bool protocol = VirtioFeatures.Has(_backendFeatures, FeatureProtocolFeatures);
        _connection.SetFeatures((context.Features & OfferedFeatures) | (protocol ? 1UL << FeatureProtocolFeatures : 0));
        var memory = context.Memory;
        var regions = memory.Regions.Select(r =>
            new VhostUserMemoryRegion(r.Start.Value, r.Size, (ulong)r.HostAddress, (ulong)r.FileOffset)).ToArray();
        if (regions.Length > MaxMemoryRegions)
            throw new VhostUserException($"{_connection.Name}: guest RAM has {regions.Length} regions, a memory table at most {MaxMemoryRegions}");
        _connection.SetMemTable(regions, Enumerable.Repeat(memory.MemFd, regions.Length).ToArray());
        var relay = new Relay(this, context);
        _relay = relay;
        _started.Clear();
        for (int i = 0; i < context.Queues.Count; i++)
        {
            var q = context.Queues[i];
            if (!q.Enabled)
                continue; // the driver did not set this queue up: the back-end never hears of it
            uint index = (uint)i;
            _connection.SetVringNum(index, q.Size);
            _connection.SetVringBase(index, 0); // a fresh ring: DRIVER_OK follows a reset
            _connection.SetVringAddr(index, HostAddress(memory, q.DescriptorTable), HostAddress(memory, q.UsedRing),
                HostAddress(memory, q.AvailRing));
            // Call and err before kick: the kick starts the ring, and a completion must find its call fd in place.
            _connection.SetVringCall(index, context.QueueIrqFd(i) ?? relay.CallFd(i));
            _connection.SetVringErr(index, relay.ErrFd(i));
            _connection.SetVringKick(index, context.Kicks[i]);
            _started.Add(i);
            if (protocol)
                _connection.SetVringEnable(index, true); // with PROTOCOL_FEATURES rings start disabled
        }
        relay.Start();
    }

    /// <summary>The ring addresses in the address space of the memory table's userspace_addr: our mapping.</summary>
    private static ulong HostAddress(GuestMemory memory, ulong guestPhysical)
    {
        foreach (var r in memory.Regions)
        {
            if (r.Contains(new GuestAddress(guestPhysical)))
                return (ulong)r.HostAddress + (guestPhysical - r.Start.Value);
        }
        throw new GuestMemoryException(new GuestAddress(guestPhysical), 1, $"ring address 0x{guestPhysical:x} is outside guest RAM");
    }

    public override void Deactivate()
    {
        lock (_lock)
        {
            StopRelay();
            if (_connection.Broken is null)
            {
                bool protocol = VirtioFeatures.Has(_backendFeatures, FeatureProtocolFeatures);
                try
                {
                    foreach (int i in _started)
                    {
                        if (protocol)
                            _connection.SetVringEnable((uint)i, false);
                        // GET_VRING_BASE stops the ring: afterwards the back-end no longer touches it.
                        _connection.GetVringBase((uint)i);
                    }
                }
                catch (VhostUserException e)
                {
                    Log($"stopping the rings failed: {e.Message}");
                }
            }
            _started.Clear();
            _context = null;
        }
    }

    private void StopRelay()
    {
        _relay?.Dispose();
        _relay = null;
    }

    private void Log(string message) => Console.Error.WriteLine($"vmm: {Name}: {message}");

    /// <summary>Called by the relay when the back-end hung up.</summary>
    private void BackendGone(VirtioContext context)
    {
        string why = $"vhost-user back-end {_connection.Name} closed the connection";
        _connection.MarkBroken(why);
        Log("the back-end closed its socket; the device needs a reset (no reconnection)");
        context.NeedsReset(why);
    }

    public override void Dispose()
    {
        lock (_lock)
            StopRelay();
        _connection.Dispose();
        base.Dispose();
    }

    /// <summary>The device's one thread while active: turns call signals of queues without an irqfd into
    /// interrupts, err signals into DEVICE_NEEDS_RESET, and notices the back-end hanging up (POLLRDHUP on the
    /// socket: never POLLIN, which a reply for the vCPU thread would raise).</summary>
    private sealed class Relay : IDisposable
    {
        private readonly VhostUserDevice _device;
        private readonly VirtioContext _context;
        private readonly EventFd?[] _calls;
        private readonly EventFd[] _errs;
        private readonly EventFd _stop = new();
        private Thread? _thread;

        public Relay(VhostUserDevice device, VirtioContext context)
        {
            _device = device;
            _context = context;
            _calls = new EventFd?[context.Queues.Count];
            _errs = new EventFd[context.Queues.Count];
            for (int i = 0; i < _errs.Length; i++)
                _errs[i] = new EventFd();
        }

        public EventFd CallFd(int queue) => _calls[queue] ??= new EventFd();

        public EventFd ErrFd(int queue) => _errs[queue];

        public void Start()
        {
            _thread = new Thread(Loop) { Name = $"{_device.Name} relay", IsBackground = true };
            SeccompThreads.Start(_thread);
        }

        private void Loop()
        {
            Seccomp.Enter(SeccompRole.DeviceWorker);
            int queues = _calls.Length;
            // calls, errs, the socket, the stop eventfd
            var fds = new int[2 * queues + 2];
            var events = new short[fds.Length];
            var revents = new short[fds.Length];
            for (int i = 0; i < queues; i++)
            {
                fds[i] = _calls[i]?.Fd ?? -1;
                fds[queues + i] = _errs[i].Fd;
            }
            fds[^2] = _device._connection.Fd;
            fds[^1] = _stop.Fd;
            Array.Fill(events, PollSet.POLLIN);
            events[^2] = PollSet.POLLRDHUP;
            try
            {
                while (true)
                {
                    PollSet.Wait(fds, events, revents, -1);
                    if (revents[^1] != 0)
                        return;
                    for (int i = 0; i < queues; i++)
                    {
                        if (revents[i] != 0 && _calls[i]!.TryRead(out _))
                            _context.RaiseQueueInterrupt(i);
                        if (revents[queues + i] != 0 && _errs[i].TryRead(out _))
                        {
                            _device.Log($"the back-end reported an error on queue {i}");
                            _context.NeedsReset($"vhost-user back-end {_device._connection.Name} reported an error on queue {i}");
                        }
                    }
                    if (revents[^2] != 0)
                    {
                        _device.BackendGone(_context);
                        fds[^2] = -1; // reported once; keep relaying what is still in flight
                    }
                }
            }
            catch (Exception e)
            {
                _device.Log($"relay stopped: {e}");
            }
        }

        public void Dispose()
        {
            _stop.Signal();
            if (_thread is not null && Thread.CurrentThread != _thread)
                _thread.Join();
            _stop.Dispose();
            foreach (var c in _calls)
                c?.Dispose();
            foreach (var e in _errs)
                e.Dispose();
        }
    }
}
