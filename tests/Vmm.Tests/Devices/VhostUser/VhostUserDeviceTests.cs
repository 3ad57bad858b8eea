using System.Buffers.Binary;
using System.Diagnostics;
using Vmm.Devices.VhostUser;
using Vmm.Devices.Virtio;
using Vmm.Interop;
using Vmm.Memory;
using Vmm.Tests.TestKit;
using static Vmm.Devices.VhostUser.VhostUserProtocol;

namespace Vmm.Tests.Devices.VhostUser;

/// <summary>The vhost-user device against the fake back-end: the handshake, what DRIVER_OK sends (memory table
/// with the memfd, rings as our virtual addresses, kick/call/err fds), the INTx relay, the irqfd path, the stop
/// on reset, and a back-end that dies or refuses — which ends in DEVICE_NEEDS_RESET, never an exception.</summary>
public sealed class VhostUserDeviceTests : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromMilliseconds(500);
    private readonly FakeVhostUserBackend _backend = new();
    private readonly GuestMemory _memory = GuestMemory.Create(16 << 20);

    public VhostUserDeviceTests()
    {
        BinaryPrimitives.WriteUInt64LittleEndian(_backend.Config, 2048); // capacity: 1 MiB
        _backend.Config[34] = 1;
    }

    public void Dispose()
    {
        _backend.Dispose();
        _memory.Dispose();
        Assert.Null(_backend.Fault);
    }

    private static void WaitUntil(Func<bool> condition, string what)
    {
        var sw = Stopwatch.StartNew();
        while (!condition())
        {
            if (sw.Elapsed > TimeSpan.FromSeconds(5))
                throw new TimeoutException(what);
            Thread.Sleep(2);
        }
    }

    private static unsafe void SignalFd(int fd)
    {
        ulong one = 1;
        Assert.Equal(8, (long)Tmds.Linux.LibC.write(fd, &one, 8));
    }

    private static string FdTarget(int fd) => new FileInfo($"/proc/self/fd/{fd}").LinkTarget ?? "";

    [Fact]
    public void Block_handshake_takes_only_the_protocol_features_it_uses_and_forwards_the_config()
    {
        using var device = VhostUserDevice.CreateBlock(_backend.Path, replyTimeout: Timeout);
        Assert.Equal(new[] { VhostUserRequest.GetFeatures, VhostUserRequest.GetProtocolFeatures, VhostUserRequest.SetProtocolFeatures,
            VhostUserRequest.GetQueueNum, VhostUserRequest.SetOwner, VhostUserRequest.GetConfig }, _backend.Requests);
        Assert.Equal((1UL << ProtocolMq) | (1UL << ProtocolReplyAck) | (1UL << ProtocolConfig),
            _backend.Last(VhostUserRequest.SetProtocolFeatures).U64); // not LOG_SHMFD
        Assert.Equal(VirtioDeviceType.Block, device.Type);
        Assert.Equal(VhostUserDevice.BlockConfigSize, device.ConfigSize);
        var config = new byte[8];
        device.ReadConfig(0, config);
        Assert.Equal(2048UL, BinaryPrimitives.ReadUInt64LittleEndian(config));
        // PROTOCOL_FEATURES (30) and RING_PACKED (34) are the back-end's, not the driver's.
        Assert.Equal((1UL << 32) | (1UL << 28) | (1UL << 29) | (1UL << 9), device.OfferedFeatures);
        Assert.Equal(1UL << 9, device.DeviceFeatures);
        Assert.True(device.SignalsVectorsDirectly);
    }

    [Fact]
    public void Activation_shares_guest_ram_and_the_rings_then_the_reset_stops_them()
    {
        using var device = VhostUserDevice.CreateBlock(_backend.Path, replyTimeout: Timeout);
        using var queue = new DriverQueue(_memory, 0x10000, 128, maxSize: 128);
        var interrupts = new RecordingVirtioInterrupts();
        ulong driverFeatures = (1UL << 32) | (1UL << 29) | (1UL << 9);
        device.Activate(DriverQueue.Context(_memory, driverFeatures, interrupts, queue));
        Assert.Empty(interrupts.NeedsResetReasons);

        var sequence = _backend.Requests.SkipWhile(r => r != VhostUserRequest.SetFeatures).ToArray();
        Assert.Equal(new[] { VhostUserRequest.SetFeatures, VhostUserRequest.SetMemTable, VhostUserRequest.SetVringNum,
            VhostUserRequest.SetVringBase, VhostUserRequest.SetVringAddr, VhostUserRequest.SetVringCall, VhostUserRequest.SetVringErr,
            VhostUserRequest.SetVringKick, VhostUserRequest.SetVringEnable }, sequence);
        // REPLY_ACK was agreed: every command asks for its ack.
        Assert.All(_backend.Received.Where(m => m.Request is VhostUserRequest.SetFeatures or VhostUserRequest.SetMemTable
            or VhostUserRequest.SetVringKick), m => Assert.True(m.NeedReply));
        Assert.Equal(driverFeatures | (1UL << FeatureProtocolFeatures), _backend.Last(VhostUserRequest.SetFeatures).U64);

        var table = _backend.Last(VhostUserRequest.SetMemTable);
        var regions = ParseMemoryTable(table.Payload);
        Assert.Equal(_memory.Regions.Count, regions.Length);
        Assert.Equal(regions.Length, table.Fds.Length);
        for (int i = 0; i < regions.Length; i++)
        {
            var r = _memory.Regions[i];
            Assert.Equal(new VhostUserMemoryRegion(r.Start.Value, r.Size, (ulong)r.HostAddress, (ulong)r.FileOffset), regions[i]);
            Assert.StartsWith("/memfd:vmm-guest-ram", FdTarget(table.Fds[i]));
        }

        var addr = _backend.Last(VhostUserRequest.SetVringAddr).Payload;
        ulong hva = (ulong)_memory.Regions[0].HostAddress;
        Assert.Equal(hva + queue.DescriptorTable, BinaryPrimitives.ReadUInt64LittleEndian(addr.AsSpan(8)));
        Assert.Equal(hva + queue.UsedRing, BinaryPrimitives.ReadUInt64LittleEndian(addr.AsSpan(16)));
        Assert.Equal(hva + queue.AvailRing, BinaryPrimitives.ReadUInt64LittleEndian(addr.AsSpan(24)));
        Assert.Equal(128u, _backend.Last(VhostUserRequest.SetVringNum).Num);
        Assert.Equal(0u, _backend.Last(VhostUserRequest.SetVringBase).Num);
        Assert.Equal(1u, _backend.Last(VhostUserRequest.SetVringEnable).Num);

        // The kick fd is the queue's own (the KVM ioeventfd in a VM).
        var kick = _backend.Last(VhostUserRequest.SetVringKick);
        Assert.Equal(0UL, kick.U64);
        SignalFd(kick.Fds[0]);
        Assert.True(queue.Kick.TryRead(out _));

        // No irqfd (INTx): the relay turns a call signal into a queue interrupt.
        var call = _backend.Last(VhostUserRequest.SetVringCall);
        Assert.Single(call.Fds);
        SignalFd(call.Fds[0]);
        WaitUntil(() => interrupts.QueueInterrupts == 1, "the relay never raised the queue interrupt");

        // The back-end reporting a broken ring asks the driver for a reset.
        SignalFd(_backend.Last(VhostUserRequest.SetVringErr).Fds[0]);
        WaitUntil(() => !interrupts.NeedsResetReasons.IsEmpty, "the err fd went unnoticed");
        Assert.Equal($"vhost-user back-end {_backend.Path} reported an error on queue 0", interrupts.NeedsResetReasons.Single());

        device.Deactivate();
        var stop = _backend.Requests.SkipWhile(r => r != VhostUserRequest.SetVringErr).Skip(3).ToArray();
        Assert.Equal(new[] { VhostUserRequest.SetVringEnable, VhostUserRequest.GetVringBase }, stop);
        Assert.Equal(0u, _backend.Last(VhostUserRequest.SetVringEnable).Num);
    }

    [Fact]
    public void A_config_write_while_active_goes_to_the_back_end_and_its_reply_is_no_hang_up()
    {
        using var device = VhostUserDevice.CreateBlock(_backend.Path, replyTimeout: Timeout);
        using var queue = new DriverQueue(_memory, 0x10000, 128, maxSize: 128);
        var interrupts = new RecordingVirtioInterrupts();
        device.Activate(DriverQueue.Context(_memory, 1UL << 32, interrupts, queue));
        device.WriteConfig(32, [1]); // writeback
        var set = _backend.Last(VhostUserRequest.SetConfig);
        Assert.Equal(new byte[] { 32, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1 }, set.Payload);
        Assert.True(set.NeedReply);
        var config = new byte[1];
        device.ReadConfig(32, config);
        Assert.Equal(1, config[0]);
        // The relay watches the socket for hang-ups only: a reply arriving for this thread is none.
        Thread.Sleep(100);
        Assert.Empty(interrupts.NeedsResetReasons);
        Assert.Null(device.Failure);
        device.Deactivate();
    }

    private sealed class IrqfdInterrupts : IVirtioInterrupts
    {
        public EventFd Irqfd { get; } = new();
        public int Relayed;
        public void QueueInterrupt(SplitQueue queue) => Interlocked.Increment(ref Relayed);
        public void ConfigInterrupt() { }
        public void NeedsReset(string why) { }
        public EventFd? QueueIrqFd(SplitQueue queue) => Irqfd;
    }

    [Fact]
    public void With_an_irqfd_the_back_end_signals_it_directly()
    {
        using var device = VhostUserDevice.CreateBlock(_backend.Path, replyTimeout: Timeout);
        using var queue = new DriverQueue(_memory, 0x10000, 128, maxSize: 128);
        var interrupts = new IrqfdInterrupts();
        device.Activate(DriverQueue.Context(_memory, 1UL << 32, interrupts, queue));
        var call = _backend.Last(VhostUserRequest.SetVringCall);
        SignalFd(call.Fds[0]);
        Assert.True(interrupts.Irqfd.TryRead(out ulong n)); // the very eventfd KVM would turn into the MSI
        Assert.Equal(1UL, n);
        Thread.Sleep(50);
        Assert.Equal(0, Volatile.Read(ref interrupts.Relayed)); // and no code of ours ran for it
        device.Deactivate();
        interrupts.Irqfd.Dispose();
    }

    [Fact]
    public void The_transport_offers_the_forwardable_features_and_hands_out_the_vectors_irqfd()
    {
        using var device = VhostUserDevice.CreateBlock(_backend.Path, replyTimeout: Timeout);
        var msi = new RecordingMsiController();
        using var function = new VirtioPciFunction(device, _memory, msi, ioEvents: null);
        Assert.True(function.Msix.Passthrough); // masked vectors detached, routes set on unmask
        function.BarWrite(VirtioPciFunction.BarIndex, 0x00, [1, 0, 0, 0]); // device_feature_select = 1
        var high = new byte[4];
        function.BarRead(VirtioPciFunction.BarIndex, 0x04, high);
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(high)); // VERSION_1 only: not RING_PACKED (bit 34)
        function.BarWrite(VirtioPciFunction.BarIndex, 0x00, [0, 0, 0, 0]);
        var low = new byte[4];
        function.BarRead(VirtioPciFunction.BarIndex, 0x04, low);
        Assert.Equal((1u << 28) | (1u << 29) | (1u << 9), BinaryPrimitives.ReadUInt32LittleEndian(low)); // not bit 30

        var queue = function.Queues[0];
        queue.MsixVector = 1;
        Assert.Null(function.QueueIrqFd(queue)); // MSI-X off: INTx, relayed
        int control = function.Msix.CapabilityOffset + 2;
        function.ConfigWrite(control, [0, 0x80]); // MSI-X enable
        Assert.Same(msi.Vectors[1].EventFd, function.QueueIrqFd(queue));
        queue.MsixVector = VirtioPciFunction.NoVector;
        Assert.Null(function.QueueIrqFd(queue));
        // vmm's own interrupts on such a function signal the vector's eventfd even while the vector is masked: its
        // irqfd is detached then, so the signal waits in the eventfd until the unmask re-attaches it.
        function.BarWrite(VirtioPciFunction.BarIndex, 0x10, [0, 0]); // config_msix_vector = 0
        Assert.True(function.Msix.IsVectorMasked(0));
        function.ConfigInterrupt();
        Assert.Contains("trigger 0", msi.Log);
    }

    [Fact]
    public void A_back_end_that_dies_while_active_puts_the_device_in_needs_reset()
    {
        using var device = VhostUserDevice.CreateBlock(_backend.Path, replyTimeout: Timeout);
        using var queue = new DriverQueue(_memory, 0x10000, 128, maxSize: 128);
        var interrupts = new RecordingVirtioInterrupts();
        device.Activate(DriverQueue.Context(_memory, 1UL << 32, interrupts, queue));
        Assert.Empty(interrupts.NeedsResetReasons);
        _backend.Dispose(); // the back-end process goes away
        WaitUntil(() => !interrupts.NeedsResetReasons.IsEmpty, "the hang-up went unnoticed");
        Assert.Equal($"vhost-user back-end {_backend.Path} closed the connection", interrupts.NeedsResetReasons.Single());
        Assert.NotNull(device.Failure);
        // The driver's reset and a new DRIVER_OK neither throw nor hang: the device just needs a reset again.
        var sw = Stopwatch.StartNew();
        device.Deactivate();
        device.Activate(DriverQueue.Context(_memory, 1UL << 32, interrupts, queue));
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(1));
        Assert.Equal(2, interrupts.NeedsResetReasons.Count);
        Assert.Contains("the connection broke earlier", interrupts.NeedsResetReasons.Last());
    }

    [Fact]
    public void A_back_end_that_refuses_the_memory_table_fails_the_activation_not_the_vcpu()
    {
        using var device = VhostUserDevice.CreateBlock(_backend.Path, replyTimeout: Timeout);
        _backend.Override = (m, s) =>
        {
            if (m.Request != VhostUserRequest.SetMemTable)
                return false;
            FakeVhostUserBackend.SendRaw(s, m.Request, FlagVersion | FlagReply, U64(1));
            return true;
        };
        using var queue = new DriverQueue(_memory, 0x10000, 128, maxSize: 128);
        var interrupts = new RecordingVirtioInterrupts();
        device.Activate(DriverQueue.Context(_memory, 1UL << 32, interrupts, queue));
        Assert.Equal($"vhost-user back-end {_backend.Path}: {_backend.Path}: the back-end rejected VHOST_USER_SET_MEM_TABLE (status 1)",
            interrupts.NeedsResetReasons.Single());
        Assert.DoesNotContain(VhostUserRequest.SetVringKick, _backend.Requests);
        device.Deactivate(); // no ring was started: nothing to stop
        Assert.DoesNotContain(VhostUserRequest.GetVringBase, _backend.Requests);
    }

    [Fact]
    public void Fs_has_its_own_config_and_one_queue_more_than_request_queues()
    {
        _backend.ProtocolFeatures = (1UL << ProtocolMq) | (1UL << ProtocolReplyAck); // virtiofsd offers no CONFIG
        using var device = VhostUserDevice.CreateFs(_backend.Path, "myfs", requestQueues: 1, queueSize: 256, replyTimeout: Timeout);
        Assert.Equal(VirtioDeviceType.Fs, device.Type);
        Assert.Equal(2, device.QueueCount);
        Assert.Equal((ushort)256, device.MaxQueueSize);
        Assert.DoesNotContain(VhostUserRequest.GetConfig, _backend.Requests);
        var config = new byte[VhostUserDevice.FsConfigSize];
        device.ReadConfig(0, config);
        Assert.Equal("myfs"u8.ToArray(), config[..4]);
        Assert.All(config[4..36], b => Assert.Equal(0, b));
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(config.AsSpan(36)));
        device.WriteConfig(0, [1, 2]); // read-only for the driver
        device.ReadConfig(0, config);
        Assert.Equal((byte)'m', config[0]);
    }

    [Fact]
    public void Back_ends_that_cannot_serve_the_device_are_refused_at_connect()
    {
        _backend.QueueNum = 2;
        var e = Assert.Throws<VhostUserException>(() => VhostUserDevice.CreateFs(_backend.Path, "fs", requestQueues: 2, replyTimeout: Timeout));
        Assert.Equal($"{_backend.Path}: 3 queues wanted, the back-end serves at most 2", e.Message);

        using var noConfig = new FakeVhostUserBackend { ProtocolFeatures = 1UL << ProtocolReplyAck };
        e = Assert.Throws<VhostUserException>(() => VhostUserDevice.CreateBlock(noConfig.Path, replyTimeout: Timeout));
        Assert.Equal($"{noConfig.Path}: the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG (a block device needs its configuration)", e.Message);

        using var legacy = new FakeVhostUserBackend { Features = 1UL << 30 };
        e = Assert.Throws<VhostUserException>(() => VhostUserDevice.CreateFs(legacy.Path, "fs", replyTimeout: Timeout));
        Assert.Equal($"{legacy.Path}: the back-end does not offer VIRTIO_F_VERSION_1 (features 0x40000000)", e.Message);

        Assert.Throws<ArgumentException>(() => VhostUserDevice.CreateFs(_backend.Path, new string('x', 37)));
    }
}
