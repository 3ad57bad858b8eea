using System.Buffers.Binary;
using System.Diagnostics;
using Vmm.Devices.VhostUser;
using Vmm.Interop;
using Vmm.Tests.TestKit;
using static Vmm.Devices.VhostUser.VhostUserProtocol;

namespace Vmm.Tests.Devices.VhostUser;

/// <summary>The front-end against a fake back-end: every message's encoding, and every way a back-end can lie —
/// each must end in a precise <see cref="VhostUserException"/> within the reply timeout, never a hang.</summary>
public sealed class VhostUserConnectionTests : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromMilliseconds(300);
    private readonly FakeVhostUserBackend _backend = new();
    private readonly VhostUserConnection _connection;

    public VhostUserConnectionTests() => _connection = VhostUserConnection.Connect(_backend.Path, Timeout);

    public void Dispose()
    {
        _connection.Dispose();
        _backend.Dispose();
        Assert.Null(_backend.Fault);
    }

    private VhostUserMessage WaitFor(VhostUserRequest request)
    {
        var sw = Stopwatch.StartNew();
        while (sw.Elapsed < TimeSpan.FromSeconds(5))
        {
            if (_backend.Received.LastOrDefault(m => m.Request == request) is { } m)
                return m;
            Thread.Sleep(2);
        }
        throw new TimeoutException($"{request} never arrived");
    }

    [Fact]
    public void Header_names_and_layout_follow_the_spec()
    {
        Assert.Equal("VHOST_USER_GET_VRING_BASE", VhostUserProtocol.Name(VhostUserRequest.GetVringBase));
        Assert.Equal("VHOST_USER_SET_MEM_TABLE", VhostUserProtocol.Name(VhostUserRequest.SetMemTable));
        Assert.Equal("vhost-user request 99", VhostUserProtocol.Name((VhostUserRequest)99));
        var h = new byte[HeaderSize];
        WriteHeader(h, VhostUserRequest.SetVringAddr, FlagVersion | FlagNeedReply, 40);
        Assert.Equal(new byte[] { 9, 0, 0, 0, 9, 0, 0, 0, 40, 0, 0, 0 }, h);
        var addr = VringAddr(3, 0, 0x1000, 0x2000, 0x3000, 0);
        Assert.Equal(3u, BinaryPrimitives.ReadUInt32LittleEndian(addr));
        Assert.Equal(0x1000UL, BinaryPrimitives.ReadUInt64LittleEndian(addr.AsSpan(8)));  // descriptor
        Assert.Equal(0x2000UL, BinaryPrimitives.ReadUInt64LittleEndian(addr.AsSpan(16))); // used
        Assert.Equal(0x3000UL, BinaryPrimitives.ReadUInt64LittleEndian(addr.AsSpan(24))); // available
        var table = MemoryTable([new(0, 0x1000, 0x7f00_0000_0000, 0), new(0x1_0000_0000, 0x2000, 0x7f00_1000_0000, 0x1000)]);
        Assert.Equal(8 + 64, table.Length);
        Assert.Equal(2u, BinaryPrimitives.ReadUInt32LittleEndian(table));
        Assert.Equal(new VhostUserMemoryRegion(0x1_0000_0000, 0x2000, 0x7f00_1000_0000, 0x1000), ParseMemoryTable(table)[1]);
        Assert.Throws<ArgumentException>(() => MemoryTable(new VhostUserMemoryRegion[9]));
    }

    [Fact]
    public void Every_request_is_encoded_as_the_spec_says()
    {
        Assert.Equal(_backend.Features, _connection.GetFeatures());
        Assert.Equal(_backend.ProtocolFeatures, _connection.GetProtocolFeatures());
        Assert.Equal(4UL, _connection.GetQueueNum());
        _connection.SetFeatures(0x1_0000_0001);
        _connection.SetOwner();
        _connection.SetVringNum(1, 256);
        _connection.SetVringBase(1, 7);
        _connection.SetVringAddr(1, 0xA000, 0xB000, 0xC000);
        using var kick = new EventFd();
        _connection.SetVringKick(1, kick);
        _connection.SetVringCall(1, null);
        _connection.SetVringEnable(1, true);
        Assert.Equal(0u, _connection.GetVringBase(1));
        _backend.Config[4] = 0xAB;
        Assert.Equal(new byte[] { 0xAB, 0 }, _connection.GetConfig(4, 2));
        _connection.SetConfig(32, [1]);
        _connection.ResetDevice();
        WaitFor(VhostUserRequest.ResetDevice);

        var m = _backend.Received.ToArray();
        Assert.All(m, x => Assert.Equal(FlagVersion, x.Flags)); // no REPLY_ACK negotiated: nothing asks for acks
        Assert.Equal(0x1_0000_0001UL, _backend.Last(VhostUserRequest.SetFeatures).U64);
        Assert.Empty(_backend.Last(VhostUserRequest.SetOwner).Payload);
        var num = _backend.Last(VhostUserRequest.SetVringNum);
        Assert.Equal((1u, 256u), (num.Index, num.Num));
        Assert.Equal(7u, _backend.Last(VhostUserRequest.SetVringBase).Num);
        var addr = _backend.Last(VhostUserRequest.SetVringAddr).Payload;
        Assert.Equal(VringAddrSize, addr.Length);
        Assert.Equal(0xB000UL, BinaryPrimitives.ReadUInt64LittleEndian(addr.AsSpan(16)));
        var k = _backend.Last(VhostUserRequest.SetVringKick);
        Assert.Equal(1UL, k.U64); // index 1, an fd follows
        Assert.Single(k.Fds);
        var call = _backend.Last(VhostUserRequest.SetVringCall);
        Assert.Equal(1UL | VringNoFd, call.U64);
        Assert.Empty(call.Fds);
        Assert.Equal(1u, _backend.Last(VhostUserRequest.SetVringEnable).Num);
        var setConfig = _backend.Last(VhostUserRequest.SetConfig).Payload;
        Assert.Equal(new byte[] { 32, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1 }, setConfig);

        // The kick fd the back-end got is our eventfd: a signal through it is ours to read.
        ulong one = 1;
        unsafe { Assert.Equal(8, (int)Tmds.Linux.LibC.write(k.Fds[0], &one, 8)); }
        Assert.True(kick.TryRead(out ulong v));
        Assert.Equal(1UL, v);
    }

    [Fact]
    public void With_reply_ack_commands_ask_for_and_check_an_ack()
    {
        _connection.SetProtocolFeatures(1UL << ProtocolReplyAck);
        _connection.SetOwner();
        Assert.True(_backend.Last(VhostUserRequest.SetOwner).NeedReply);
        Assert.False(_backend.Last(VhostUserRequest.SetProtocolFeatures).NeedReply); // REPLY_ACK starts after it
        _backend.Override = (m, s) =>
        {
            if (m.Request != VhostUserRequest.SetVringNum || m.Num != 256)
                return false;
            FakeVhostUserBackend.SendRaw(s, m.Request, FlagVersion | FlagReply, U64(22));
            return true;
        };
        var e = Assert.Throws<VhostUserException>(() => _connection.SetVringNum(0, 256));
        Assert.Equal($"{_backend.Path}: the back-end rejected VHOST_USER_SET_VRING_NUM (status 22)", e.Message);
        // A refusal is an answer: the stream is still in step.
        _connection.SetVringNum(0, 128);
        Assert.Null(_connection.Broken);
    }

    /// <summary>Makes the back-end answer GET_FEATURES with <paramref name="lie"/> instead of the truth.</summary>
    private void LieAboutFeatures(Action<UnixSocket> lie) => _backend.Override = (m, s) =>
    {
        if (m.Request != VhostUserRequest.GetFeatures)
            return false;
        lie(s);
        return true;
    };

    private VhostUserException FailsFast(Action call)
    {
        var sw = Stopwatch.StartNew();
        var e = Assert.Throws<VhostUserException>(call);
        Assert.True(sw.Elapsed < Timeout + TimeSpan.FromSeconds(2), $"took {sw.Elapsed}");
        // Once out of step, the connection refuses everything else at once, naming the first failure.
        var again = Assert.Throws<VhostUserException>(() => _connection.SetOwner());
        Assert.Contains("the connection broke earlier", again.Message);
        Assert.Contains(e.Message, again.Message);
        return e;
    }

    [Fact]
    public void A_reply_for_another_request_is_refused()
    {
        LieAboutFeatures(s => FakeVhostUserBackend.SendRaw(s, VhostUserRequest.GetProtocolFeatures, FlagVersion | FlagReply, U64(1)));
        var e = FailsFast(() => _connection.GetFeatures());
        Assert.Equal($"{_backend.Path}: the reply to VHOST_USER_GET_FEATURES is for VHOST_USER_GET_PROTOCOL_FEATURES", e.Message);
    }

    [Fact]
    public void A_reply_with_an_unknown_request_is_refused()
    {
        LieAboutFeatures(s => FakeVhostUserBackend.SendRaw(s, (VhostUserRequest)77, FlagVersion | FlagReply, U64(1)));
        var e = FailsFast(() => _connection.GetFeatures());
        Assert.Equal($"{_backend.Path}: the reply to VHOST_USER_GET_FEATURES is for vhost-user request 77", e.Message);
    }

    [Fact]
    public void A_reply_of_the_wrong_size_is_refused()
    {
        LieAboutFeatures(s => FakeVhostUserBackend.SendRaw(s, VhostUserRequest.GetFeatures, FlagVersion | FlagReply, new byte[4]));
        var e = FailsFast(() => _connection.GetFeatures());
        Assert.Equal($"{_backend.Path}: the reply to VHOST_USER_GET_FEATURES has 4 bytes of payload, not 8", e.Message);
    }

    [Fact]
    public void An_oversized_reply_is_refused_without_reading_it()
    {
        // The header claims 1 GiB; the front-end must not allocate or wait for it.
        LieAboutFeatures(s => FakeVhostUserBackend.SendRaw(s, VhostUserRequest.GetFeatures, FlagVersion | FlagReply, U64(0), size: 1u << 30));
        var e = FailsFast(() => _connection.GetFeatures());
        Assert.Equal($"{_backend.Path}: the reply to VHOST_USER_GET_FEATURES announces 1073741824 bytes (at most 4096)", e.Message);
    }

    [Fact]
    public void A_reply_without_the_reply_flag_or_with_another_version_is_refused()
    {
        LieAboutFeatures(s => FakeVhostUserBackend.SendRaw(s, VhostUserRequest.GetFeatures, FlagVersion, U64(0)));
        var e = FailsFast(() => _connection.GetFeatures());
        Assert.Equal($"{_backend.Path}: the reply to VHOST_USER_GET_FEATURES lacks the reply flag (flags 0x1)", e.Message);

        using var backend = new FakeVhostUserBackend();
        using var connection = VhostUserConnection.Connect(backend.Path, Timeout);
        backend.Override = (m, s) =>
        {
            FakeVhostUserBackend.SendRaw(s, m.Request, 2 | FlagReply, U64(0));
            return true;
        };
        e = Assert.Throws<VhostUserException>(() => connection.GetQueueNum());
        Assert.Equal($"{backend.Path}: the reply to VHOST_USER_GET_QUEUE_NUM has protocol version 2, not 1 (flags 0x6)", e.Message);
    }

    [Fact]
    public unsafe void A_reply_carrying_descriptors_is_refused_and_they_are_closed()
    {
        // The stray fd is a pipe's write end: once every copy of it is closed, the read end reports end of file.
        int* pipe = stackalloc int[2];
        Assert.Equal(0, Tmds.Linux.LibC.pipe(pipe));
        int readEnd = pipe[0], writeEnd = pipe[1];
        LieAboutFeatures(s =>
        {
            FakeVhostUserBackend.SendRaw(s, VhostUserRequest.GetFeatures, FlagVersion | FlagReply, U64(0), fds: [writeEnd]);
            Sys.Close(writeEnd); // the back-end's copy; the one in flight is the front-end's
        });
        try
        {
            var e = FailsFast(() => _connection.GetFeatures());
            Assert.Equal($"{_backend.Path}: the reply to VHOST_USER_GET_FEATURES carries 1 file descriptor(s); none belong there", e.Message);
            short[] revents = [0];
            PollSet.Wait([readEnd], [PollSet.POLLIN], revents, 2000);
            Assert.True((revents[0] & PollSet.POLLHUP) != 0, "the received descriptor was not closed");
        }
        finally
        {
            Sys.Close(readEnd);
        }
    }

    [Fact]
    public void A_silent_back_end_times_out()
    {
        LieAboutFeatures(_ => { });
        var e = FailsFast(() => _connection.GetFeatures());
        Assert.Equal($"{_backend.Path}: no reply to VHOST_USER_GET_FEATURES within 0.3 s", e.Message);
    }

    [Fact]
    public void A_back_end_that_hangs_up_instead_of_replying_is_reported()
    {
        LieAboutFeatures(s => s.Shutdown());
        var e = FailsFast(() => _connection.GetFeatures());
        Assert.Equal($"{_backend.Path}: the back-end closed the connection instead of replying to VHOST_USER_GET_FEATURES", e.Message);
    }

    [Fact]
    public void A_back_end_that_hangs_up_in_the_middle_of_a_reply_is_reported()
    {
        // The header promises 8 bytes; 3 arrive, then the socket closes.
        LieAboutFeatures(s =>
        {
            var header = new byte[HeaderSize];
            WriteHeader(header, VhostUserRequest.GetFeatures, FlagVersion | FlagReply, 8);
            s.Send(header, new byte[3], default);
            s.Shutdown();
        });
        var e = FailsFast(() => _connection.GetFeatures());
        Assert.Equal($"{_backend.Path}: the back-end closed the connection in the middle of its reply to VHOST_USER_GET_FEATURES", e.Message);
    }

    [Fact]
    public void Sending_to_a_closed_socket_is_reported()
    {
        LieAboutFeatures(s => s.Shutdown());
        Assert.Throws<VhostUserException>(() => _connection.GetFeatures());
        using var backend = new FakeVhostUserBackend();
        using var connection = VhostUserConnection.Connect(backend.Path, Timeout);
        backend.Override = (m, s) => { s.Shutdown(); return true; };
        connection.SetOwner(); // no reply expected: this one goes out before the back-end hangs up
        var sw = Stopwatch.StartNew();
        VhostUserException? e = null;
        while (e is null && sw.Elapsed < TimeSpan.FromSeconds(5))
        {
            try { connection.SetOwner(); Thread.Sleep(5); }
            catch (VhostUserException x) { e = x; }
        }
        Assert.NotNull(e);
        Assert.Equal($"{backend.Path}: the back-end closed the connection (sending VHOST_USER_SET_OWNER)", e!.Message);
    }

    [Fact]
    public void Refused_and_inconsistent_config_replies_are_reported()
    {
        _backend.Override = (m, s) =>
        {
            if (m.Request != VhostUserRequest.GetConfig)
                return false;
            // libvhost-user answers a failed GET_CONFIG with an empty payload.
            FakeVhostUserBackend.SendRaw(s, m.Request, FlagVersion | FlagReply, []);
            return true;
        };
        var e = Assert.Throws<VhostUserException>(() => _connection.GetConfig(0, 60));
        Assert.Equal($"{_backend.Path}: the back-end refused VHOST_USER_GET_CONFIG (60 bytes at 0)", e.Message);

        using var backend = new FakeVhostUserBackend();
        using var connection = VhostUserConnection.Connect(backend.Path, Timeout);
        backend.Override = (m, s) =>
        {
            if (m.Request != VhostUserRequest.GetConfig)
                return false;
            FakeVhostUserBackend.SendRaw(s, m.Request, FlagVersion | FlagReply, VhostUserProtocol.Config(8, 0, new byte[60]));
            return true;
        };
        e = Assert.Throws<VhostUserException>(() => connection.GetConfig(0, 60));
        Assert.Equal($"{backend.Path}: VHOST_USER_GET_CONFIG asked for 60 bytes at 0, the reply says 60 at 8", e.Message);
    }

    [Fact]
    public void A_vring_base_for_another_ring_is_refused()
    {
        _backend.Override = (m, s) =>
        {
            if (m.Request != VhostUserRequest.GetVringBase)
                return false;
            FakeVhostUserBackend.SendRaw(s, m.Request, FlagVersion | FlagReply, VringState(m.Index + 1, 5));
            return true;
        };
        var e = FailsFast(() => _connection.GetVringBase(0));
        Assert.Equal($"{_backend.Path}: VHOST_USER_GET_VRING_BASE for ring 0 answered for ring 1", e.Message);
    }

    [Fact]
    public void A_missing_socket_is_a_clear_error()
    {
        string path = Path.Combine(Path.GetTempPath(), $"vmm-no-such-{Guid.NewGuid():N}.sock");
        var e = Assert.Throws<VhostUserException>(() => VhostUserConnection.Connect(path));
        Assert.StartsWith($"vhost-user socket {path}: cannot connect: connect failed: ", e.Message);
        Assert.Contains("ENOENT", e.Message);
    }
}
