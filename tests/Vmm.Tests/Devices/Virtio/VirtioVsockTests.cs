using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using Vmm.Devices.Virtio;
using Vmm.Devices.Virtio.Vsock;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Virtio;

/// <summary>virtio-vsock with real Unix sockets on the host side and hand-built rings playing the guest driver
/// (receive buffers shaped as Linux 6.1 posts them: a 44-byte header buffer and a 4 KiB data buffer).</summary>
public sealed class VirtioVsockTests
{
    private const ulong GuestCid = 42;
    private const int H = VsockHeader.Size;

    private sealed class Rig : IDisposable
    {
        private readonly Dictionary<uint, ulong> _rxBase = [];
        private int _rxSlot, _rxSeen, _txCount, _txSlot;

        public GuestMemory Memory { get; } = GuestMemory.Create(16 * MemoryLayout.MiB);
        public DriverQueue Rx { get; }
        public DriverQueue Tx { get; }
        public DriverQueue Ev { get; }
        public RecordingVirtioInterrupts Interrupts { get; } = new();
        public VirtioVsock Vsock { get; }
        public string Path { get; }

        public Rig(bool activate = true)
        {
            Path = $"/tmp/vsk-{Guid.NewGuid():N}"[..20] + ".sock";
            Vsock = new VirtioVsock(GuestCid, Path);
            Rx = new DriverQueue(Memory, 0x10000, 64);
            Tx = new DriverQueue(Memory, 0x20000, 64);
            Ev = new DriverQueue(Memory, 0x30000, 64);
            if (activate)
                Vsock.Activate(DriverQueue.Context(Memory, 0, Interrupts, Rx, Tx, Ev));
        }

        /// <summary>Posts <paramref name="count"/> receive chains (header buffer + 4 KiB data buffer) and kicks.</summary>
        public void PostRx(int count = 8)
        {
            for (int i = 0; i < count; i++)
            {
                ulong b = 0x100000UL + 0x2000UL * (ulong)(_rxSlot++ % 256);
                ushort head = Rx.AddChain((b, H, true), (b + 0x100, 4096, true));
                _rxBase[head] = b;
            }
            Rx.Kick.Signal();
        }

        /// <summary>Posts one receive chain of a single buffer of <paramref name="size"/> bytes and kicks.</summary>
        public void PostOneRx(uint size)
        {
            ulong b = 0x100000UL + 0x2000UL * (ulong)(_rxSlot++ % 256);
            ushort head = Rx.AddChain((b, size, true));
            _rxBase[head] = b - 0x100 + H; // data follows the header in the same buffer
            _rxWhole[head] = b;
            Rx.Kick.Signal();
        }

        private readonly Dictionary<uint, ulong> _rxWhole = [];

        /// <summary>The next packet the device put in a receive buffer.</summary>
        public (VsockHeader Header, byte[] Data) NextRx(int timeoutMs = 10_000)
        {
            Assert.True(Rx.WaitUsed(_rxSeen + 1, TimeSpan.FromMilliseconds(timeoutMs)), $"no receive packet #{_rxSeen + 1}");
            var (id, len) = Rx.Used(_rxSeen++);
            Assert.True(len >= H, $"used length {len}");
            ulong b = _rxBase[id];
            var header = VsockHeader.Read(Memory.GetSpan(new GuestAddress(_rxWhole.Remove(id, out ulong whole) ? whole : b), H));
            Assert.Equal(header.Len, len - H);
            return (header, Memory.GetSpan(new GuestAddress(b + 0x100), (int)header.Len).ToArray());
        }

        public bool RxIdle(int ms = 300)
        {
            Thread.Sleep(ms);
            return Rx.UsedIndex == _rxSeen;
        }

        /// <summary>Sends one guest packet (header buffer + payload buffer) and waits until the device took it.</summary>
        public void SendRaw(ReadOnlySpan<byte> header, ReadOnlySpan<byte> payload = default)
        {
            ulong b = 0x800000UL + 0x20000UL * (ulong)(_txSlot++ % 32);
            Memory.Write(new GuestAddress(b), header);
            if (payload.Length > 0)
            {
                Memory.Write(new GuestAddress(b + 0x1000), payload);
                Tx.AddChain((b, (uint)header.Length, false), (b + 0x1000, (uint)payload.Length, false));
            }
            else
                Tx.AddChain((b, (uint)header.Length, false));
            Tx.Kick.Signal();
            Assert.True(Tx.WaitUsed(++_txCount), "the device did not complete a transmit chain");
        }

        public void Send(ushort op, uint srcPort, uint dstPort, byte[]? data = null, uint flags = 0, uint bufAlloc = 65536,
            uint fwdCnt = 0, ushort type = VsockHeader.TypeStream, ulong srcCid = GuestCid, ulong dstCid = VirtioVsock.HostCid,
            uint? len = null)
        {
            var raw = new byte[H];
            new VsockHeader
            {
                SrcCid = srcCid, DstCid = dstCid, SrcPort = srcPort, DstPort = dstPort, Len = len ?? (uint)(data?.Length ?? 0),
                Type = type, Op = op, Flags = flags, BufAlloc = bufAlloc, FwdCnt = fwdCnt,
            }.Write(raw);
            SendRaw(raw, data);
        }

        /// <summary>A host client through PATH with "CONNECT port"; returns it and the guest's view of the REQUEST.</summary>
        public (Socket Client, VsockHeader Request) HostConnect(uint guestPort)
        {
            var client = Client(Path);
            client.Send(Encoding.ASCII.GetBytes($"CONNECT {guestPort}\n"));
            var (request, _) = NextRx();
            Assert.Equal(VsockHeader.OpRequest, request.Op);
            return (client, request);
        }

        /// <summary>A host-initiated connection the guest accepted with <paramref name="bufAlloc"/>; the client has read "OK".</summary>
        public (Socket Client, uint HostPort) Established(uint guestPort, uint bufAlloc = 65536)
        {
            var (client, request) = HostConnect(guestPort);
            Send(VsockHeader.OpResponse, guestPort, request.SrcPort, bufAlloc: bufAlloc);
            Assert.Equal($"OK {request.SrcPort}\n", ReadLine(client));
            return (client, request.SrcPort);
        }

        public void Dispose()
        {
            Vsock.Dispose();
            Rx.Dispose();
            Tx.Dispose();
            Ev.Dispose();
            Memory.Dispose();
        }
    }

    private static Socket Client(string path)
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { ReceiveTimeout = 10_000 };
        s.Connect(new UnixDomainSocketEndPoint(path));
        return s;
    }

    private static string ReadLine(Socket s)
    {
        var line = new StringBuilder();
        var b = new byte[1];
        while (s.Receive(b) == 1 && b[0] != '\n')
            line.Append((char)b[0]);
        return line.Append('\n').ToString();
    }

    private static byte[] ReadExactly(Socket s, int count)
    {
        var data = new byte[count];
        int got = 0;
        while (got < count)
        {
            int n = s.Receive(data, got, count - got, SocketFlags.None);
            Assert.True(n > 0, $"end of stream after {got} of {count} bytes");
            got += n;
        }
        return data;
    }

    /// <summary>True when the peer closed the socket (a read sees end of stream or a reset).</summary>
    private static bool ClosedByPeer(Socket s)
    {
        try
        {
            return s.Receive(new byte[16]) == 0;
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
            return true;
        }
    }

    private static byte[] Pattern(int length, int seed = 0) => [.. Enumerable.Range(seed, length).Select(i => (byte)(i * 7 + 3))];

    [Fact]
    public void The_configuration_holds_the_guest_cid_and_the_device_listens_on_the_path()
    {
        using var rig = new Rig(activate: false);
        Span<byte> config = stackalloc byte[8];
        rig.Vsock.ReadConfig(0, config);

        Assert.Equal(GuestCid, BinaryPrimitives.ReadUInt64LittleEndian(config));
        Assert.Equal(VirtioDeviceType.Vsock, rig.Vsock.Type);
        Assert.Equal(3, rig.Vsock.QueueCount);
        Assert.Equal(Vmm.Interop.SocketFile.Kind.Socket, Vmm.Interop.SocketFile.Stat(rig.Path, out _));
    }

    [Fact]
    public void Dispose_removes_the_socket_and_a_live_path_or_a_reserved_cid_is_refused()
    {
        string path;
        using (var rig = new Rig(activate: false))
        {
            path = rig.Path;
            var e = Assert.Throws<ArgumentException>(() => new VirtioVsock(GuestCid + 1, rig.Path));
            Assert.Contains("in use", e.Message);
        }
        Assert.False(File.Exists(path));
        Assert.Throws<ArgumentOutOfRangeException>(() => new VirtioVsock(2, path));
        File.WriteAllText(path, "not a socket");
        try
        {
            Assert.Contains("not a socket", Assert.Throws<ArgumentException>(() => new VirtioVsock(GuestCid, path)).Message);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void A_host_client_connects_to_a_guest_port_and_bytes_flow_both_ways()
    {
        using var rig = new Rig();
        rig.PostRx();
        var (client, request) = rig.HostConnect(1234);
        using var _ = client;

        Assert.Equal(VirtioVsock.HostCid, request.SrcCid);
        Assert.Equal(GuestCid, request.DstCid);
        Assert.Equal(1234u, request.DstPort);
        Assert.True(request.SrcPort >= VirtioVsock.FirstLocalPort);
        Assert.Equal((uint)VirtioVsock.BufferSize, request.BufAlloc);
        Assert.Equal(VsockHeader.TypeStream, request.Type);

        rig.Send(VsockHeader.OpResponse, 1234, request.SrcPort, bufAlloc: 8192);
        Assert.Equal($"OK {request.SrcPort}\n", ReadLine(client));

        client.Send("hello guest"u8);
        var (rw, data) = rig.NextRx();
        Assert.Equal(VsockHeader.OpRw, rw.Op);
        Assert.Equal((request.SrcPort, 1234u), (rw.SrcPort, rw.DstPort));
        Assert.Equal("hello guest", Encoding.ASCII.GetString(data));

        rig.Send(VsockHeader.OpRw, 1234, request.SrcPort, "hello host"u8.ToArray());
        Assert.Equal("hello host", Encoding.ASCII.GetString(ReadExactly(client, 10)));
        Assert.Equal(1, rig.Vsock.ConnectionCount);
    }

    [Fact]
    public void Bytes_a_client_sends_right_behind_its_connect_line_reach_the_guest_after_the_handshake()
    {
        using var rig = new Rig();
        rig.PostRx();
        using var client = Client(rig.Path);
        client.Send("CONNECT 1250\nearly bird"u8);
        var (request, _) = rig.NextRx();
        Assert.Equal((VsockHeader.OpRequest, 1250u), (request.Op, request.DstPort));
        Assert.True(rig.RxIdle(), "data before the guest accepted");

        rig.Send(VsockHeader.OpResponse, 1250, request.SrcPort);
        Assert.Equal($"OK {request.SrcPort}\n", ReadLine(client));
        var (rw, data) = rig.NextRx();
        Assert.Equal((VsockHeader.OpRw, "early bird"), (rw.Op, Encoding.ASCII.GetString(data)));
    }

    [Fact]
    public void A_guest_connects_to_PATH_port_and_bytes_flow_both_ways()
    {
        using var rig = new Rig();
        using var listener = Vmm.Interop.UnixSocket.Listen(rig.Path + "_5000", 4);
        rig.PostRx();

        rig.Send(VsockHeader.OpRequest, 777, 5000, bufAlloc: 4096);
        var (response, _) = rig.NextRx();
        Assert.Equal(VsockHeader.OpResponse, response.Op);
        Assert.Equal((5000u, 777u), (response.SrcPort, response.DstPort));
        using var host = listener.Accept();

        rig.Send(VsockHeader.OpRw, 777, 5000, "ping"u8.ToArray());
        var got = new byte[4];
        Assert.True(host.ReceiveExactly(got, []));
        Assert.Equal("ping", Encoding.ASCII.GetString(got));

        host.Send("pong!"u8);
        var (rw, data) = rig.NextRx();
        Assert.Equal(VsockHeader.OpRw, rw.Op);
        Assert.Equal("pong!", Encoding.ASCII.GetString(data));
    }

    [Fact]
    public void A_guest_connect_to_a_port_nobody_serves_is_answered_with_rst()
    {
        using var rig = new Rig();
        rig.PostRx();

        rig.Send(VsockHeader.OpRequest, 778, 5001);
        var (rst, _) = rig.NextRx();

        Assert.Equal(VsockHeader.OpRst, rst.Op);
        Assert.Equal((5001u, 778u, GuestCid), (rst.SrcPort, rst.DstPort, rst.DstCid));
        Assert.Equal(0, rig.Vsock.ConnectionCount);
    }

    [Fact]
    public void A_packet_for_an_unknown_connection_gets_rst_but_an_rst_gets_no_answer()
    {
        using var rig = new Rig();
        rig.PostRx();

        rig.Send(VsockHeader.OpRw, 9, 10, "x"u8.ToArray());
        Assert.Equal(VsockHeader.OpRst, rig.NextRx().Header.Op);
        rig.Send(VsockHeader.OpCreditUpdate, 9, 10);
        Assert.Equal(VsockHeader.OpRst, rig.NextRx().Header.Op);
        rig.Send(VsockHeader.OpRst, 9, 10);
        Assert.True(rig.RxIdle());
    }

    [Fact]
    public void Host_data_waits_for_guest_credit_and_flows_after_a_credit_update()
    {
        using var rig = new Rig();
        rig.PostRx(16);
        var (client, port) = rig.Established(1300, bufAlloc: 1000);
        using var _ = client;
        var sent = Pattern(2500);
        client.Send(sent);

        var received = new List<byte>();
        while (received.Count < 1000)
        {
            var (h, data) = rig.NextRx();
            Assert.Equal(VsockHeader.OpRw, h.Op);
            received.AddRange(data);
        }
        Assert.Equal(1000, received.Count); // never more than the guest's buf_alloc
        var (ask, _) = rig.NextRx();
        Assert.Equal(VsockHeader.OpCreditRequest, ask.Op);
        Assert.True(rig.RxIdle(), "more data although the guest gave no credit");

        rig.Send(VsockHeader.OpCreditUpdate, 1300, port, bufAlloc: 1000, fwdCnt: 1000);
        while (received.Count < 2000)
            received.AddRange(rig.NextRx().Data);
        Assert.Equal(2000, received.Count);
        rig.Send(VsockHeader.OpCreditUpdate, 1300, port, bufAlloc: 2000, fwdCnt: 1500); // more room, and some freed
        while (received.Count < 2500)
            received.AddRange(rig.NextRx().Data);
        Assert.Equal(sent, received.ToArray());
    }

    [Fact]
    public void The_device_tells_the_guest_about_freed_space_and_answers_credit_request()
    {
        using var rig = new Rig();
        rig.PostRx(8);
        var (client, port) = rig.Established(1400);
        using var _ = client;

        rig.Send(VsockHeader.OpRw, 1400, port, Pattern(40_000));
        Assert.Equal(Pattern(40_000), ReadExactly(client, 40_000));
        var (update, _) = rig.NextRx();
        Assert.Equal(VsockHeader.OpCreditUpdate, update.Op);
        Assert.Equal(40_000u, update.FwdCnt);
        Assert.Equal((uint)VirtioVsock.BufferSize, update.BufAlloc);

        rig.Send(VsockHeader.OpCreditRequest, 1400, port);
        var (answer, _) = rig.NextRx();
        Assert.Equal(VsockHeader.OpCreditUpdate, answer.Op);
        Assert.Equal(40_000u, answer.FwdCnt);
    }

    [Fact]
    public void Guest_data_beyond_the_credit_it_was_given_resets_the_connection()
    {
        using var rig = new Rig();
        rig.PostRx(8);
        var (client, port) = rig.Established(1500);
        using var _ = client;
        // The client does not read: the socket buffer fills, then our 64 KiB, then the guest is over its credit.
        client.ReceiveBufferSize = 4096;
        var chunk = Pattern(60_000);
        for (int i = 0; i < 20 && rig.Vsock.ConnectionCount == 1; i++)
            rig.Send(VsockHeader.OpRw, 1500, port, chunk, fwdCnt: 0);

        var packets = new List<VsockHeader>();
        while (packets.Count == 0 || packets[^1].Op != VsockHeader.OpRst)
            packets.Add(rig.NextRx().Header);
        Assert.Equal(VsockHeader.OpRst, packets[^1].Op);
        Assert.True(ClosedByPeerAfterDraining(client));
    }

    private static bool ClosedByPeerAfterDraining(Socket s)
    {
        var buffer = new byte[65536];
        try
        {
            while (true)
            {
                if (s.Receive(buffer) == 0)
                    return true;
            }
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
            return true;
        }
    }

    [Fact]
    public void Shutdown_half_closes_each_way_and_both_directions_end_with_rst()
    {
        using var rig = new Rig();
        rig.PostRx(8);
        var (client, port) = rig.Established(1600);
        using var _ = client;

        rig.Send(VsockHeader.OpRw, 1600, port, "last words"u8.ToArray());
        rig.Send(VsockHeader.OpShutdown, 1600, port, flags: VsockHeader.ShutdownSend);
        Assert.Equal("last words", Encoding.ASCII.GetString(ReadExactly(client, 10)));
        Assert.Equal(0, client.Receive(new byte[4])); // end of stream for the host reader

        client.Send("still listening"u8); // the guest only stopped sending
        Assert.Equal("still listening", Encoding.ASCII.GetString(rig.NextRx().Data));

        client.Shutdown(SocketShutdown.Send);
        var (shutdown, _) = rig.NextRx();
        Assert.Equal(VsockHeader.OpShutdown, shutdown.Op);
        Assert.Equal(VsockHeader.ShutdownSend, shutdown.Flags);

        rig.Send(VsockHeader.OpShutdown, 1600, port, flags: VsockHeader.ShutdownReceive | VsockHeader.ShutdownSend);
        Assert.Equal(VsockHeader.OpRst, rig.NextRx().Header.Op);
        Assert.Equal(0, rig.Vsock.ConnectionCount);
    }

    [Fact]
    public void A_host_half_close_lets_the_guest_go_on_sending_through_a_full_socket()
    {
        using var rig = new Rig();
        rig.PostRx(8);
        var (client, port) = rig.Established(1650);
        using var _ = client;
        client.Shutdown(SocketShutdown.Send);
        var (shutdown, _) = rig.NextRx();
        Assert.Equal((VsockHeader.OpShutdown, VsockHeader.ShutdownSend), (shutdown.Op, shutdown.Flags));

        // More than the socket buffers hold: the device waits for "writable" events, which carry RDHUP from now on.
        var expected = new List<byte>();
        byte[]? got = null;
        var reader = new Thread(() =>
        {
            try
            {
                got = ReadExactly(client, 300_000);
            }
            catch (Exception)
            {
                // got stays null: the assertion below reports it (an exception here would end the test host)
            }
        });
        reader.Start();
        uint credit = 0;
        for (int i = 0; i < 10; i++)
        {
            var chunk = Pattern(30_000, i);
            expected.AddRange(chunk);
            // Keep to the credit: wait for the device's fwd_cnt before overrunning its 64 KiB.
            while (30_000u * (uint)(i + 1) - credit > VirtioVsock.BufferSize)
            {
                var (update, _) = rig.NextRx();
                Assert.Equal(VsockHeader.OpCreditUpdate, update.Op);
                credit = update.FwdCnt;
                rig.PostRx(1);
            }
            rig.Send(VsockHeader.OpRw, 1650, port, chunk);
        }
        Assert.True(reader.Join(20_000), "the host reader is still waiting");
        Assert.Equal(expected.ToArray(), got);
        Assert.Equal(0, rig.Vsock.ResetsSent);
    }

    [Fact]
    public void Receive_buffers_with_no_room_past_the_header_still_move_things_along()
    {
        using var rig = new Rig();
        rig.PostOneRx(H); // room for a header only: the REQUEST fits
        var (client, request) = rig.HostConnect(1660);
        using var _ = client;
        rig.Send(VsockHeader.OpResponse, 1660, request.SrcPort);
        Assert.Equal($"OK {request.SrcPort}\n", ReadLine(client));
        client.Send("data"u8);
        rig.PostOneRx(H);
        var (update, _) = rig.NextRx(); // the data cannot fit: the buffer carries our credit instead
        Assert.Equal(VsockHeader.OpCreditUpdate, update.Op);
        rig.PostOneRx(4096); // one buffer, header and data together
        var (rw, data) = rig.NextRx();
        Assert.Equal((VsockHeader.OpRw, "data"), (rw.Op, Encoding.ASCII.GetString(data)));
    }

    [Fact]
    public void A_guest_rst_closes_the_host_socket()
    {
        using var rig = new Rig();
        rig.PostRx(4);
        var (client, port) = rig.Established(1700);
        using var _ = client;

        rig.Send(VsockHeader.OpRst, 1700, port);

        Assert.True(ClosedByPeer(client));
        Assert.True(rig.RxIdle());
        Assert.Equal(0, rig.Vsock.ConnectionCount);
    }

    [Fact]
    public void A_guest_that_refuses_a_host_connect_closes_the_client()
    {
        using var rig = new Rig();
        rig.PostRx(4);
        var (client, request) = rig.HostConnect(1800);
        using var _ = client;

        rig.Send(VsockHeader.OpRst, 1800, request.SrcPort);

        Assert.True(ClosedByPeer(client));
    }

    [Fact]
    public void Misbehaving_and_vanishing_host_clients_do_not_disturb_another_connection()
    {
        using var rig = new Rig();
        rig.PostRx(32);
        var (good, goodPort) = rig.Established(2000);
        using var _ = good;

        using var garbage = Client(rig.Path);
        garbage.Send("GET / HTTP/1.0\n"u8);
        Assert.True(ClosedByPeer(garbage));
        using var endless = Client(rig.Path);
        endless.Send(Encoding.ASCII.GetBytes(new string('9', 100))); // no newline, ever: too long
        Assert.True(ClosedByPeer(endless));
        using var silent = Client(rig.Path); // sends nothing and stays

        var (vanishing, vanishingPort) = rig.Established(2001);
        vanishing.Send("partial"u8);
        Assert.Equal("partial", Encoding.ASCII.GetString(rig.NextRx().Data));
        vanishing.Dispose(); // mid-stream
        var (eof, _) = rig.NextRx();
        Assert.Equal((VsockHeader.OpShutdown, vanishingPort), (eof.Op, eof.SrcPort));
        rig.Send(VsockHeader.OpRw, 2001, vanishingPort, "anyone?"u8.ToArray());
        var (rst, _) = rig.NextRx();
        Assert.Equal((VsockHeader.OpRst, vanishingPort), (rst.Op, rst.SrcPort));

        rig.Send(VsockHeader.OpRw, 2000, goodPort, "still here"u8.ToArray());
        Assert.Equal("still here", Encoding.ASCII.GetString(ReadExactly(good, 10)));
        good.Send("me too"u8);
        var (rw, data) = rig.NextRx();
        Assert.Equal((VsockHeader.OpRw, goodPort, "me too"), (rw.Op, rw.SrcPort, Encoding.ASCII.GetString(data)));
    }

    [Fact]
    public void Malformed_guest_packets_are_dropped_or_reset_and_the_device_goes_on()
    {
        using var rig = new Rig();
        rig.PostRx(16);

        rig.SendRaw(new byte[20]); // shorter than a header
        rig.Send(VsockHeader.OpRw, 1, 2, "abc"u8.ToArray(), len: 5000); // len past the buffers
        rig.Send(VsockHeader.OpRequest, 1, 2, srcCid: GuestCid + 1); // spoofed source
        rig.Send(VsockHeader.OpRequest, 1, 2, dstCid: 7); // not the host
        rig.Send(VsockHeader.OpResponse, 1, 2, "xy"u8.ToArray()); // payload on a control packet
        Assert.Equal(5, rig.Vsock.DroppedPackets);
        Assert.True(rig.RxIdle());

        rig.Send(VsockHeader.OpRequest, 3, 4, type: 2); // SEQPACKET was not offered
        Assert.Equal(VsockHeader.OpRst, rig.NextRx().Header.Op);

        var (client, port) = rig.Established(2100);
        using var _ = client;
        rig.Send(99, 2100, port); // no such operation
        var (rst, _) = rig.NextRx();
        Assert.Equal((VsockHeader.OpRst, port), (rst.Op, rst.SrcPort));
        Assert.True(ClosedByPeer(client));
        Assert.Empty(rig.Interrupts.NeedsResetReasons);

        var (again, _) = rig.Established(2101); // still serving
        again.Dispose();
    }

    [Fact]
    public void Connections_beyond_the_limit_are_refused_each_way()
    {
        using var rig = new Rig();
        rig.PostRx(16);
        var waiting = new List<Socket>();
        try
        {
            for (int i = 0; i < VirtioVsock.MaxConnections; i++)
                waiting.Add(Client(rig.Path)); // handshakes younger than the timeout are kept
            SpinWait.SpinUntil(() => rig.Vsock.ConnectionCount == VirtioVsock.MaxConnections, 10_000);
            Assert.Equal(VirtioVsock.MaxConnections, rig.Vsock.ConnectionCount);

            using var extra = Client(rig.Path);
            Assert.True(ClosedByPeer(extra));
            using var listener = Vmm.Interop.UnixSocket.Listen(rig.Path + "_6000", 4);
            rig.Send(VsockHeader.OpRequest, 5, 6000);
            Assert.Equal(VsockHeader.OpRst, rig.NextRx().Header.Op);
        }
        finally
        {
            foreach (var s in waiting)
                s.Dispose();
        }
    }

    [Fact]
    public void Steady_state_packets_allocate_nothing_on_the_worker()
    {
        using var rig = new Rig();
        rig.PostRx(1);
        var (client, port) = rig.Established(2200);
        using var _ = client;
        var payload = Pattern(1000);
        uint consumed = 0; // the guest's fwd_cnt: it reads everything at once
        void RoundTrip()
        {
            rig.PostRx(1);
            client.Send(payload);
            Assert.Equal(1000, rig.NextRx().Data.Length);
            consumed += 1000;
            rig.Send(VsockHeader.OpRw, 2200, port, payload, fwdCnt: consumed);
            ReadExactly(client, 1000);
        }
        for (int i = 0; i < 20; i++)
            RoundTrip(); // warm-up: pooled arrays, JIT, queue capacity
        Thread.Sleep(50);
        long before = rig.Vsock.WorkerAllocatedBytes;
        for (int i = 0; i < 50; i++)
            RoundTrip();
        Thread.Sleep(50);

        Assert.Equal(before, rig.Vsock.WorkerAllocatedBytes);
    }

    [Fact]
    public void Connect_lines_are_parsed_strictly()
    {
        Assert.True(VirtioVsock.TryParseConnect("CONNECT 52"u8, out uint port));
        Assert.Equal(52u, port);
        Assert.True(VirtioVsock.TryParseConnect("CONNECT 4294967295"u8, out port));
        Assert.Equal(uint.MaxValue, port);
        Assert.False(VirtioVsock.TryParseConnect("CONNECT 4294967296"u8, out _));
        Assert.False(VirtioVsock.TryParseConnect("CONNECT "u8, out _));
        Assert.False(VirtioVsock.TryParseConnect("CONNECT -1"u8, out _));
        Assert.False(VirtioVsock.TryParseConnect("connect 52"u8, out _));
        Assert.False(VirtioVsock.TryParseConnect("CONNECT 52 "u8, out _));
    }
}
