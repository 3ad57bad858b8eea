using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using Vmm.Devices.Virtio;
using Vmm.Devices.Virtio.Net;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Virtio;

/// <summary>virtio-net against a real tap in a private network namespace: a raw AF_PACKET socket on the tap
/// plays the host network, hand-built rings in guest memory play the driver.</summary>
public sealed class VirtioNetTests
{
    private const ushort TestEtherType = 0x88B5; // IEEE local experimental: nothing else on the wire uses it
    private const int Hdr = TapDevice.VnetHeaderSize;
    private static readonly byte[] GuestMac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    private const ulong AllFeatures = (1UL << VirtioNet.F_MAC) | (1UL << VirtioNet.F_STATUS) | (1UL << VirtioNet.F_MRG_RXBUF)
                                      | (1UL << VirtioNet.F_CSUM) | (1UL << VirtioNet.F_GUEST_CSUM);

    /// <summary>A device on tap "vmmtest0" in its own namespace, its rings, and a packet socket on the tap.</summary>
    private sealed class Rig : IDisposable
    {
        public GuestMemory Memory { get; } = GuestMemory.Create(16 * MemoryLayout.MiB);
        public VirtioNet Net { get; }
        public PacketSocket Host { get; }
        public DriverQueue Rx { get; }
        public DriverQueue Tx { get; }
        public RecordingVirtioInterrupts Interrupts { get; } = new();

        public Rig(int? mtu = null, string tap = "vmmtest0")
        {
            (Net, Host) = NetNamespace.Run(() =>
            {
                var net = new VirtioNet(tap, GuestMac);
                return (net, new PacketSocket(net.TapName, mtu));
            });
            Rx = new DriverQueue(Memory, 0x10000, 64);
            Tx = new DriverQueue(Memory, 0x20000, 64);
        }

        public void Activate(ulong features = AllFeatures) =>
            Net.Activate(DriverQueue.Context(Memory, features, Interrupts, Rx, Tx));

        /// <summary>Posts <paramref name="count"/> one-buffer receive chains of <paramref name="size"/> bytes from
        /// 0x400000 on (at <paramref name="slot"/> * 64 KiB steps) and kicks.</summary>
        public void PostRx(int count, uint size, int slot = 0)
        {
            for (int i = 0; i < count; i++)
                Rx.AddChain((RxBuffer(slot + i), size, true));
            Rx.Kick.Signal();
        }

        public static ulong RxBuffer(int slot) => 0x400000UL + 0x10000UL * (ulong)slot;

        public void Dispose()
        {
            Net.Dispose();
            Host.Dispose();
            Rx.Dispose();
            Tx.Dispose();
            Memory.Dispose();
        }
    }

    private static byte[] Frame(string payload, int minLength = 60)
    {
        var body = Encoding.ASCII.GetBytes(payload);
        var frame = new byte[Math.Max(minLength, 14 + body.Length)];
        frame.AsSpan(0, 6).Fill(0xFF);
        GuestMac.CopyTo(frame, 6);
        BinaryPrimitives.WriteUInt16BigEndian(frame.AsSpan(12), TestEtherType);
        body.CopyTo(frame, 14);
        return frame;
    }

    private static bool IsTest(ReadOnlySpan<byte> frame) =>
        frame.Length >= 14 && BinaryPrimitives.ReadUInt16BigEndian(frame[12..]) == TestEtherType;

    /// <summary>The used entries' (head, length) that carry a test frame, scanning completions so far.</summary>
    private static List<(int Slot, uint Length)> TestFramesIn(Rig rig, int usedCount, uint bufferSize)
    {
        var found = new List<(int, uint)>();
        for (int i = 0; i < usedCount; i++)
        {
            var (id, len) = rig.Rx.Used(i);
            if (len < Hdr + 14)
                continue;
            var start = rig.Memory.GetSpan(new GuestAddress(Rig.RxBuffer((int)id)), (int)Math.Min(len, bufferSize));
            if (IsTest(start[Hdr..]))
                found.Add(((int)id, len));
        }
        return found;
    }

    [Fact]
    public void The_configuration_holds_the_mac_and_link_up()
    {
        using var rig = new Rig();
        Span<byte> config = stackalloc byte[8];
        rig.Net.ReadConfig(0, config);

        Assert.Equal(GuestMac, config[..6].ToArray());
        Assert.Equal(VirtioNet.S_LINK_UP, BinaryPrimitives.ReadUInt16LittleEndian(config[6..]));
        Assert.Equal(VirtioDeviceType.Net, rig.Net.Type);
        Assert.Equal(AllFeatures, rig.Net.DeviceFeatures);
    }

    [Fact]
    public void The_test_namespace_has_ipv6_off_and_the_host_keeps_its_setting()
    {
        const string sysctl = "/proc/sys/net/ipv6/conf/all/disable_ipv6";
        if (!File.Exists(sysctl))
            return; // no IPv6 in this kernel: nothing chatters anyway
        string host = File.ReadAllText(sysctl);

        Assert.Equal("1", NetNamespace.Run(() => File.ReadAllText(sysctl).Trim()));
        Assert.Equal(host, File.ReadAllText(sysctl));
    }

    [Fact]
    public void Without_a_mac_a_random_locally_administered_one_is_chosen()
    {
        using var net = NetNamespace.Run(() => new VirtioNet("vmmtest1"));

        Assert.Equal([0x52, 0x54, 0x00], net.Mac[..3]);
        Assert.Equal("vmmtest1", net.TapName);
    }

    [Fact]
    public void A_guest_frame_arrives_on_the_tap_with_the_same_bytes()
    {
        using var rig = new Rig();
        rig.Activate();
        var frame = Frame("hello from the guest");
        rig.Memory.Clear(new GuestAddress(0x100000), Hdr); // virtio_net_hdr_v1: no offload
        rig.Memory.Write(new GuestAddress(0x101000), frame);

        // Header and frame in separate descriptors, as Linux does without any_header_sg.
        rig.Tx.AddChain((0x100000, Hdr, false), (0x101000, (uint)frame.Length, false));
        rig.Tx.Kick.Signal();

        Assert.True(rig.Tx.WaitUsed(1));
        Assert.Equal(0u, rig.Tx.Used(0).Length);
        var seen = rig.Host.Receive(f => IsTest(f));
        Assert.NotNull(seen);
        Assert.Equal(frame, seen);
        Assert.Equal(1, rig.Net.TxPackets);
        Assert.True(rig.Interrupts.QueueInterrupts > 0);
    }

    [Fact]
    public void A_frame_sent_into_the_tap_lands_in_a_receive_buffer_after_a_12_byte_header_with_num_buffers_1()
    {
        using var rig = new Rig();
        rig.Activate();
        rig.PostRx(8, 2048);
        var frame = Frame("hello from the host");

        rig.Host.Send(frame);

        Assert.True(SpinWait.SpinUntil(() => TestFramesIn(rig, rig.Rx.UsedIndex, 2048).Count > 0, TimeSpan.FromSeconds(10)));
        var (slot, length) = TestFramesIn(rig, rig.Rx.UsedIndex, 2048)[0];
        Assert.Equal((uint)(Hdr + frame.Length), length);
        var buffer = rig.Memory.GetSpan(new GuestAddress(Rig.RxBuffer(slot)), (int)length);
        Assert.Equal(1, BinaryPrimitives.ReadUInt16LittleEndian(buffer[10..]));  // num_buffers
        Assert.Equal(0, buffer[1]);                                               // gso_type NONE
        Assert.Equal(frame, buffer[Hdr..].ToArray());
    }

    [Fact]
    public void With_mergeable_buffers_a_large_frame_spans_several_chains()
    {
        using var rig = new Rig(mtu: 9000);
        rig.Activate();
        rig.PostRx(8, 1536);
        var frame = Frame("jumbo", minLength: 4000);

        rig.Host.Send(frame);

        // 12 + 4000 bytes in 1536-byte buffers: three chains, the first says so.
        bool Arrived() => TestFramesIn(rig, rig.Rx.UsedIndex, 1536).Count > 0;
        Assert.True(SpinWait.SpinUntil(Arrived, TimeSpan.FromSeconds(10)));
        int first = Enumerable.Range(0, rig.Rx.UsedIndex).First(i =>
            rig.Rx.Used(i).Length > Hdr + 14 && IsTest(rig.Memory.GetSpan(new GuestAddress(Rig.RxBuffer((int)rig.Rx.Used(i).Id)), 1536)[Hdr..]));
        Assert.True(rig.Rx.WaitUsed(first + 3));
        var received = new List<byte>();
        for (int i = first; i < first + 3; i++)
        {
            var (id, len) = rig.Rx.Used(i);
            received.AddRange(rig.Memory.GetSpan(new GuestAddress(Rig.RxBuffer((int)id)), (int)len).ToArray());
        }
        Assert.Equal(3, BinaryPrimitives.ReadUInt16LittleEndian(received.ToArray().AsSpan(10)));
        Assert.Equal(frame, received.Skip(Hdr).ToArray());
    }

    [Fact]
    public void Without_mergeable_buffers_a_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_serves_the_next()
    {
        using var rig = new Rig();
        rig.Activate(AllFeatures & ~(1UL << VirtioNet.F_MRG_RXBUF));
        rig.PostRx(4, 200);

        rig.Host.Send(Frame("too big", minLength: 1000));
        Assert.True(SpinWait.SpinUntil(() => rig.Net.RxDropped >= 1, TimeSpan.FromSeconds(10)));
        var small = Frame("fits");
        rig.Host.Send(small);

        Assert.True(SpinWait.SpinUntil(() => TestFramesIn(rig, rig.Rx.UsedIndex, 200).Count > 0, TimeSpan.FromSeconds(10)));
        var (slot, length) = TestFramesIn(rig, rig.Rx.UsedIndex, 200)[0];
        Assert.Equal((uint)(Hdr + small.Length), length);
        Assert.Equal(small, rig.Memory.GetSpan(new GuestAddress(Rig.RxBuffer(slot) + Hdr), small.Length).ToArray());
        Assert.Equal(1, BinaryPrimitives.ReadUInt16LittleEndian(rig.Memory.GetSpan(new GuestAddress(Rig.RxBuffer(slot) + 10), 2)));
        Assert.Equal(0u, rig.Rx.Used(0).Id); // the first buffer was not used up by the dropped frame
    }

    [Fact]
    public void With_no_receive_buffers_frames_wait_and_arrive_after_the_driver_kicks()
    {
        using var rig = new Rig();
        rig.Activate();
        var frame = Frame("early bird");

        rig.Host.Send(frame);
        Thread.Sleep(300);
        Assert.Equal(0, rig.Rx.UsedIndex);
        Assert.Equal(0, rig.Net.RxDropped);

        rig.PostRx(8, 2048);

        Assert.True(SpinWait.SpinUntil(() => TestFramesIn(rig, rig.Rx.UsedIndex, 2048).Count > 0, TimeSpan.FromSeconds(10)));
        Assert.Equal(0, rig.Net.RxDropped);
    }

    /// <summary>utime + stime (clock ticks) of this process's thread named <paramref name="comm"/>.</summary>
    private static long ThreadCpuTicks(string comm)
    {
        foreach (var task in Directory.GetDirectories("/proc/self/task"))
        {
            try
            {
                if (File.ReadAllText(Path.Combine(task, "comm")).TrimEnd('\n') != comm)
                    continue;
                string stat = File.ReadAllText(Path.Combine(task, "stat"));
                var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' '); // fields[0] is stat field 3 (state)
                return long.Parse(fields[11], CultureInfo.InvariantCulture) + long.Parse(fields[12], CultureInfo.InvariantCulture);
            }
            catch (IOException)
            {
                // the thread exited while we looked
            }
        }
        throw new InvalidOperationException($"no thread named '{comm}'");
    }

    [Fact]
    public void A_waiting_frame_does_not_make_the_worker_spin()
    {
        using var rig = new Rig(tap: "vmmidle0");
        rig.Activate();
        rig.Host.Send(Frame("waits in the device"));
        rig.Host.Send(Frame("waits in the tap")); // keeps the tap readable
        Thread.Sleep(100);
        const string worker = "virtio-net vmmi"; // the thread name, cut to 15 bytes by the kernel

        long before = ThreadCpuTicks(worker);
        Thread.Sleep(1000);
        long used = ThreadCpuTicks(worker) - before;

        Assert.True(used <= 5, $"the worker used {used} ticks of CPU in 1 s while the frame waited for buffers");
        rig.PostRx(4, 2048);
        Assert.True(SpinWait.SpinUntil(() => TestFramesIn(rig, rig.Rx.UsedIndex, 2048).Count == 2, TimeSpan.FromSeconds(10)));
        Assert.Equal(0, rig.Net.RxDropped);
    }

    [Fact]
    public void Hostile_transmit_chains_are_completed_with_0_and_the_device_keeps_serving()
    {
        using var rig = new Rig();
        rig.Activate();

        // A descriptor that chains to itself.
        ushort loop = rig.Tx.Reserve(1);
        rig.Tx.WriteDescriptor(loop, 0x100000, 64, DriverQueue.FlagNext, loop);
        rig.Tx.Publish(loop);
        // A buffer far outside guest RAM.
        rig.Tx.AddChain((0xFFFF_0000_0000UL, 64, false));
        // A chain too short for the header.
        rig.Tx.AddChain((0x100000, 4, false));
        // And then an honest frame.
        var frame = Frame("still alive");
        rig.Memory.Clear(new GuestAddress(0x102000), Hdr);
        rig.Memory.Write(new GuestAddress(0x102000 + Hdr), frame);
        rig.Tx.AddChain((0x102000, (uint)(Hdr + frame.Length), false));
        rig.Tx.Kick.Signal();

        Assert.True(rig.Tx.WaitUsed(4));
        for (int i = 0; i < 4; i++)
            Assert.Equal(0u, rig.Tx.Used(i).Length);
        Assert.Equal(frame, rig.Host.Receive(f => IsTest(f)));
        Assert.Equal(2, rig.Net.BadChains);
        Assert.Equal(1, rig.Net.TxDropped);
        Assert.Equal(1, rig.Net.TxPackets);
        Assert.Empty(rig.Interrupts.NeedsResetReasons);
    }

    [Fact]
    public void A_corrupt_available_index_asks_for_a_reset()
    {
        using var rig = new Rig();
        rig.Activate();

        rig.Memory.Write(new GuestAddress(rig.Tx.AvailRing + 2), [0x00, 0x10]); // 4096 entries ahead of a 64-entry queue
        rig.Tx.Kick.Signal();

        Assert.True(SpinWait.SpinUntil(() => !rig.Interrupts.NeedsResetReasons.IsEmpty,
            TimeSpan.FromSeconds(10)));
        Assert.Contains("transmit queue", rig.Interrupts.NeedsResetReasons.First());
    }

    [Fact]
    public void The_device_can_be_reset_and_activated_again()
    {
        using var rig = new Rig();
        rig.Activate();
        rig.Net.Deactivate();
        rig.Activate();
        var frame = Frame("second life");
        rig.Memory.Clear(new GuestAddress(0x100000), Hdr);
        rig.Memory.Write(new GuestAddress(0x100000 + Hdr), frame);

        rig.Tx.AddChain((0x100000, (uint)(Hdr + frame.Length), false));
        rig.Tx.Kick.Signal();

        Assert.Equal(frame, rig.Host.Receive(f => IsTest(f)));
    }
}
