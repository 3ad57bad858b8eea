using System.Buffers.Binary;
using System.Collections.Concurrent;
using Vmm.Devices.VhostUser;
using Vmm.Interop;
using static Vmm.Devices.VhostUser.VhostUserProtocol;

namespace Vmm.Tests.TestKit;

/// <summary>One request as the fake back-end received it (its fds are kept open until the back-end is disposed).</summary>
public sealed record VhostUserMessage(VhostUserRequest Request, uint Flags, byte[] Payload, int[] Fds)
{
    public ulong U64 => BinaryPrimitives.ReadUInt64LittleEndian(Payload);
    public uint Index => BinaryPrimitives.ReadUInt32LittleEndian(Payload);
    public uint Num => BinaryPrimitives.ReadUInt32LittleEndian(Payload.AsSpan(4));
    public bool NeedReply => (Flags & FlagNeedReply) != 0;
}

/// <summary>A vhost-user back-end in a thread, listening on a socket file: by default an honest one (it answers
/// GET_* from its properties and acks when asked); <see cref="Override"/> lets a test make it lie — write raw bytes,
/// go silent, or hang up — for one request. Every request is recorded.</summary>
public sealed class FakeVhostUserBackend : IDisposable
{
    private readonly UnixSocket _listener;
    private readonly Thread _thread;
    private UnixSocket? _peer;
    private readonly string _dir;

    public FakeVhostUserBackend()
    {
        _dir = Directory.CreateTempSubdirectory("vmm-vhost-fake-").FullName;
        Path = System.IO.Path.Combine(_dir, "backend.sock");
        _listener = UnixSocket.Listen(Path);
        _thread = new Thread(Serve) { Name = "fake vhost-user back-end", IsBackground = true };
        _thread.Start();
    }

    public string Path { get; }

    /// <summary>virtio features: VERSION_1, INDIRECT_DESC, EVENT_IDX, PROTOCOL_FEATURES, blk FLUSH (9), and bit 34
    /// (RING_PACKED), which the front-end must not pass on.</summary>
    public ulong Features { get; set; } = (1UL << 32) | (1UL << 28) | (1UL << 29) | (1UL << 30) | (1UL << 9) | (1UL << 34);

    /// <summary>MQ, LOG_SHMFD (1, must not be taken), REPLY_ACK, CONFIG.</summary>
    public ulong ProtocolFeatures { get; set; } = (1UL << ProtocolMq) | (1UL << 1) | (1UL << ProtocolReplyAck) | (1UL << ProtocolConfig);

    public ulong QueueNum { get; set; } = 4;

    public byte[] Config { get; set; } = new byte[256];

    public ConcurrentQueue<VhostUserMessage> Received { get; } = new();

    /// <summary>Called for every request before the honest answer; returns true when it replied (or did not,
    /// on purpose) itself. The socket lets it write anything.</summary>
    public Func<VhostUserMessage, UnixSocket, bool>? Override { get; set; }

    /// <summary>Set when the serving thread stopped on an error of its own.</summary>
    public Exception? Fault { get; private set; }

    /// <summary>The requests received so far, in order.</summary>
    public VhostUserRequest[] Requests => [.. Received.Select(m => m.Request)];

    public VhostUserMessage Last(VhostUserRequest request) => Received.Last(m => m.Request == request);

    private void Serve()
    {
        try
        {
            _peer = _listener.Accept();
            var header = new byte[HeaderSize];
            while (true)
            {
                var fds = new List<int>();
                if (!_peer.ReceiveExactly(header, fds))
                    return;
                var (request, flags, size) = ReadHeader(header);
                var payload = new byte[size];
                if (size > 0 && !_peer.ReceiveExactly(payload, fds))
                    return;
                var message = new VhostUserMessage(request, flags, payload, [.. fds]);
                Received.Enqueue(message);
                if (Override?.Invoke(message, _peer) == true)
                    continue;
                Answer(message);
            }
        }
        catch (Exception e) when (e is SyscallException or ObjectDisposedException)
        {
            // the test closed the socket
        }
        catch (Exception e)
        {
            Fault = e;
        }
    }

    private void Answer(VhostUserMessage m)
    {
        switch (m.Request)
        {
            case VhostUserRequest.GetFeatures:
                Reply(m.Request, U64(Features));
                break;
            case VhostUserRequest.GetProtocolFeatures:
                Reply(m.Request, U64(ProtocolFeatures));
                break;
            case VhostUserRequest.GetQueueNum:
                Reply(m.Request, U64(QueueNum));
                break;
            case VhostUserRequest.GetVringBase:
                Reply(m.Request, VringState(m.Index, 0));
                break;
            case VhostUserRequest.GetConfig:
            {
                uint offset = m.Index, size = m.Num;
                Reply(m.Request, VhostUserProtocol.Config(offset, 0, Config.AsSpan((int)offset, (int)size)));
                break;
            }
            default:
                if (m.NeedReply)
                    Reply(m.Request, U64(0));
                break;
        }
    }

    /// <summary>Writes a well-formed reply.</summary>
    public void Reply(VhostUserRequest request, byte[] payload) => SendRaw(_peer!, request, FlagVersion | FlagReply, payload);

    /// <summary>Writes any header (size as given, not as the payload has) and payload.</summary>
    public static void SendRaw(UnixSocket socket, VhostUserRequest request, uint flags, byte[] payload, uint? size = null, ReadOnlySpan<int> fds = default)
    {
        var header = new byte[HeaderSize];
        WriteHeader(header, request, flags, (int)(size ?? (uint)payload.Length));
        socket.Send(header, payload, default, fds);
    }

    private bool _disposed;

    /// <summary>Hangs up (a test may do this early to play a dying back-end); closes the received fds once.</summary>
    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        _peer?.Shutdown();
        if (Volatile.Read(ref _peer) is null)
        {
            // Wake the accept: a connection that closes at once ends the serving loop.
            try { UnixSocket.Connect(Path).Dispose(); } catch (SyscallException) { }
        }
        _listener.Dispose();
        _thread.Join(TimeSpan.FromSeconds(5));
        _peer?.Dispose();
        foreach (var m in Received)
            foreach (int fd in m.Fds)
                Sys.Close(fd);
        try { Directory.Delete(_dir, recursive: true); } catch (IOException) { }
    }
}
