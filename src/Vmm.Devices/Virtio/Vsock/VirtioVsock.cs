using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;
using Vmm.Interop;
using Vmm.Memory;

namespace Vmm.Devices.Virtio.Vsock;

/// <summary>virtio-vsock (virtio 1.2 §5.10) with the host end on Unix sockets, the "hybrid vsock" of Firecracker and
/// Cloud Hypervisor (no vhost-vsock in the host kernel). Queues: rx (0, device to guest), tx (1), event (2, unused:
/// the device never migrates, so it never sends TRANSPORT_RESET). Configuration: guest_cid (le64). Stream sockets
/// only (no SEQPACKET).
/// Host-initiated: a client connects to <see cref="SocketPath"/> and writes "CONNECT port\n"; the device sends the
/// guest a REQUEST from (cid 2, a local port from 2^30 up) and, on the guest's RESPONSE, writes "OK localport\n" to
/// the client; from then on the socket carries the stream. The guest's RST closes the client's socket.
/// Guest-initiated: a REQUEST to (cid 2, port P) connects to "PATH_P"; RESPONSE if that works, RST if not.
/// Flow control follows §5.10.6.3 both ways: the device never sends the guest more than its buf_alloc minus what
/// is in flight, advertises <see cref="BufferSize"/> itself (and resets a guest that overruns it), tells the guest
/// about freed space (CREDIT_UPDATE) once its view of our credit drops under half, answers CREDIT_REQUEST.
/// Limits: <see cref="MaxConnections"/> connections; per connection at most <see cref="BufferSize"/> bytes buffered
/// towards the host socket (a pooled array, rented while the connection lives) and nothing towards the guest; a
/// client has <see cref="HandshakeTimeout"/> to send its CONNECT line and the guest as long to answer a REQUEST.
/// One peer that misbehaves (garbage instead of CONNECT, never reads, vanishes) costs only its own connection.
/// Served by one <see cref="VirtioWorker"/> thread that also waits on an epoll set of the sockets.</summary>
public sealed class VirtioVsock : VirtioDevice
{
    public const ulong HostCid = 2;
    public const int RxQueue = 0, TxQueue = 1, EventQueue = 2;

    /// <summary>Connections open at once (host- and guest-initiated together); more are refused (a host client is
    /// closed, a guest REQUEST answered with RST).</summary>
    public const int MaxConnections = 64;

    /// <summary>The buf_alloc we advertise per connection: guest bytes not yet taken by the host socket.</summary>
    public const int BufferSize = 64 * 1024;

    /// <summary>The longest payload the device puts into one packet for the guest (Linux's own
    /// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE) and accepts from it.</summary>
    public const int MaxPayload = 64 * 1024;

    /// <summary>"CONNECT 4294967295\n" is 19 bytes; a longer line is garbage.</summary>
    public const int MaxConnectLine = 32;

    public static readonly TimeSpan HandshakeTimeout = TimeSpan.FromSeconds(5);

    /// <summary>First local port for host-initiated connections (Firecracker's choice: clear of the small ports a
    /// guest connects to).</summary>
    public const uint FirstLocalPort = 1u << 30;

    private const int ListenerTag = 0;
    private const int EpollFd = 0, MoreFd = 1;
    private const int RxBudget = 256;
    private const int MaxOrphanResets = 64;

    private readonly string _path;
    private readonly byte[] _config = new byte[8];
    private readonly UnixSocket _listener;
    private readonly Epoll _epoll = new();
    private readonly EventFd _more = new();
    private readonly Action<int> _onQueue, _onFd;

    private readonly VsockConnection?[] _slots = new VsockConnection?[MaxConnections];
    private readonly Dictionary<ulong, VsockConnection> _byKey = new(MaxConnections);
    private readonly Queue<VsockConnection> _rxQueue = new(MaxConnections);
    private readonly (ulong Tag, uint Events)[] _events = new (ulong, uint)[64];
    private readonly VirtqDescriptor[] _held;
    private int _connectionCount;
    private uint _nextLocalPort = FirstLocalPort;
    private uint _generation;

    // RSTs for packets that belong to no connection: (guest port, host port). Bounded; when full, dropped (the
    // guest's own timeout ends such a connection attempt).
    private readonly (uint GuestPort, uint HostPort)[] _orphanResets = new (uint, uint)[MaxOrphanResets];
    private int _orphanHead, _orphanCount;

    // A receive chain popped before anything was ready to fill it.
    private bool _holding;
    private ushort _heldHead;
    private int _heldCount;
    private long _heldCapacity;

    private VirtioContext? _context;
    private bool _rxStopped, _txStopped;
    private long _rxPackets, _txPackets, _dropped, _resetsSent, _badChains, _rxBytes, _txBytes;

    /// <summary>Listens on <paramref name="socketPath"/> at once (a stale socket file there is replaced; a live one
    /// is an error), so host clients can connect before the guest is up: they wait in the backlog.</summary>
    public VirtioVsock(ulong guestCid, string socketPath)
    {
        if (guestCid < 3 || guestCid > uint.MaxValue - 1)
            throw new ArgumentOutOfRangeException(nameof(guestCid), $"guest cid {guestCid} is reserved or out of range (3..4294967294)");
        _path = socketPath;
        CheckPathFree(socketPath);
        GuestCid = guestCid;
        BinaryPrimitives.WriteUInt64LittleEndian(_config, guestCid);
        _listener = NonBlockingSocket.Listen(socketPath, backlog: 16);
        if (_epoll.Add(_listener.Fd, Epoll.In | Epoll.EdgeTriggered, ListenerTag) < 0)
            throw new InvalidOperationException("epoll_ctl on the vsock listener failed");
        _held = new VirtqDescriptor[MaxQueueSize];
        _onQueue = OnQueue;
        _onFd = OnFd;
    }

    public ulong GuestCid { get; }
    public string SocketPath => _path;

    public override VirtioDeviceType Type => VirtioDeviceType.Vsock;
    public override string Name => $"virtio-vsock (cid {GuestCid}, {_path})";
    public override (byte Class, byte SubClass) PciClass => (0x07, 0x80); // communication controller, other
    public override ulong DeviceFeatures => 0; // no SEQPACKET
    public override int QueueCount => 3;
    public override int ConfigSize => _config.Length;

    /// <summary>Packets put into guest receive buffers / taken from the transmit queue.</summary>
    public long RxPackets => Volatile.Read(ref _rxPackets);
    public long TxPackets => Volatile.Read(ref _txPackets);
    /// <summary>Guest packets dropped without an answer (short, longer than their buffers, wrong cid).</summary>
    public long DroppedPackets => Volatile.Read(ref _dropped);
    public long ResetsSent => Volatile.Read(ref _resetsSent);
    public long BadChains => Volatile.Read(ref _badChains);
    /// <summary>Payload bytes to the guest / from the guest.</summary>
    public long RxBytes => Volatile.Read(ref _rxBytes);
    public long TxBytes => Volatile.Read(ref _txBytes);
    /// <summary>Open connections (worker's view; for tests).</summary>
    public int ConnectionCount => Volatile.Read(ref _connectionCount);

    /// <summary>Managed bytes the worker allocated since activation (connections allocate; packets should not).</summary>
    public long WorkerAllocatedBytes => Worker?.AllocatedBytes ?? 0;

    public override void ReadConfig(int offset, Span<byte> data) => _config.AsSpan(offset, data.Length).CopyTo(data);

    public override void Activate(VirtioContext context)
    {
        _context = context;
        _rxStopped = _txStopped = _holding = false;
        Worker = new VirtioWorker($"virtio-vsock {GuestCid}", context.Kicks, _onQueue, [_epoll.Fd, _more.Fd], _onFd);
    }

    public override void Deactivate()
    {
        Worker?.Dispose();
        Worker = null;
        _context = null;
        _holding = false;
        // A reset guest has no sockets left: every host peer sees its connection closed.
        for (int i = 0; i < _slots.Length; i++)
        {
            if (_slots[i] is { } c)
                Forget(c);
        }
        _rxQueue.Clear();
        _orphanCount = 0;
    }

    public override void Dispose()
    {
        Deactivate();
        _listener.Dispose();
        try
        {
            File.Delete(_path);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
        _epoll.Dispose();
        _more.Dispose();
        base.Dispose();
    }

    /// <summary>The longest socket path: PATH_port (up to 11 more bytes) must still fit a Unix socket address (108).</summary>
    public const int MaxSocketPath = 100;

    /// <summary>A socket file nobody listens on is left over from a dead VMM and may be replaced; anything else
    /// at the path is someone else's.</summary>
    public static void CheckPathFree(string path)
    {
        if (Encoding.UTF8.GetByteCount(path) is 0 or > MaxSocketPath)
            throw new ArgumentException($"vsock socket path '{path}' must be 1 to {MaxSocketPath} bytes long");
        if (Directory.Exists(path))
            throw new ArgumentException($"vsock socket path '{path}' is a directory");
        if (!File.Exists(path))
        {
            if (HostFile.NoDirectoryFor(path) is string why)
                throw new ArgumentException($"vsock socket path '{path}': {why}");
            return;
        }
        if (SocketFile.Stat(path, out _) != SocketFile.Kind.Socket)
            throw new ArgumentException($"vsock socket path '{path}' exists and is not a socket");
        int fd = NonBlockingSocket.Connect(path);
        if (fd >= 0)
        {
            Sys.Close(fd);
            throw new ArgumentException($"vsock socket path '{path}' is in use (something listens on it)");
        }
        if (fd == -111 /* ECONNREFUSED: a stale socket */ || fd == -Errno.ENOENT)
            return;
        throw new ArgumentException($"vsock socket path '{path}' exists and is not a usable socket ({Errno.Describe(-fd)})");
    }

    private void OnQueue(int queue)
    {
        if (queue == TxQueue)
            ServeTx();
        // Rx: new buffers; event queue: nothing to send. Either way, whatever waits for buffers may go now.
        ServeRx();
    }

    private void OnFd(int fd)
    {
        if (fd == MoreFd)
            _more.TryRead(out _);
        else if (fd == EpollFd)
            ServeSockets();
        ServeRx();
    }

    internal static ulong KeyOf(uint localPort, uint peerPort) => ((ulong)localPort << 32) | peerPort;

    // ---------------------------------------------------------------- host sockets

    private void ServeSockets()
    {
        int n = _epoll.Wait(_events);
        for (int i = 0; i < n; i++)
        {
            var (tag, events) = _events[i];
            if (tag == ListenerTag)
            {
                AcceptAll();
                continue;
            }
            int slot = (int)(tag & 0xFFFF) - 1;
            uint generation = (uint)(tag >> 32);
            if (slot < 0 || slot >= _slots.Length || _slots[slot] is not { } c || c.Generation != generation)
                continue; // closed earlier in this batch
            OnSocketEvent(c, events);
        }
        if (n == _events.Length)
            _more.Signal(); // more may be ready: come back after the queues had their turn
    }

    private void AcceptAll()
    {
        while (true)
        {
            int fd = NonBlockingSocket.Accept(_listener.Fd);
            if (fd < 0)
                return; // EAGAIN (or a client that left already)
            if (_connectionCount == MaxConnections)
                ExpireHandshakes();
            if (_connectionCount == MaxConnections)
            {
                Sys.Close(fd); // the client sees its connection closed before any "OK"
                continue;
            }
            var c = NewConnection(fd);
            c.State = VsockState.AwaitingConnect;
        }
    }

    /// <summary>Ends handshakes older than <see cref="HandshakeTimeout"/> (a client that never sent its line, a guest
    /// that never answered): only when a slot is needed, so an idle device has no timer.</summary>
    private void ExpireHandshakes()
    {
        long limit = Stopwatch.GetTimestamp() - (long)(HandshakeTimeout.TotalSeconds * Stopwatch.Frequency);
        for (int i = 0; i < _slots.Length; i++)
        {
            if (_slots[i] is { State: VsockState.AwaitingConnect or VsockState.AwaitingResponse } c && c.StartedTicks < limit)
                Reset(c);
        }
    }

    private VsockConnection NewConnection(int fd)
    {
        int slot = Array.IndexOf(_slots, null);
        var c = new VsockConnection
        {
            Fd = fd,
            Slot = slot,
            Generation = ++_generation,
            StartedTicks = Stopwatch.GetTimestamp(),
        };
        _slots[slot] = c;
        _connectionCount++;
        _epoll.Add(fd, Epoll.In | Epoll.Out | Epoll.RdHup | Epoll.EdgeTriggered, ((ulong)c.Generation << 32) | (uint)(slot + 1));
        return c;
    }

    private void OnSocketEvent(VsockConnection c, uint events)
    {
        // Hup/Err: the peer is gone both ways. RdHup alone is a half-close (shutdown(SHUT_WR)): the peer still
        // reads, and with edge triggering every later event (e.g. writable again) carries it too.
        bool hangup = (events & (Epoll.Hup | Epoll.Err)) != 0;
        switch (c.State)
        {
            case VsockState.AwaitingConnect:
                ReadConnectLine(c);
                break;
            case VsockState.AwaitingResponse:
                if (hangup)
                    Reset(c); // the client gave up; the guest may have accepted already
                else if ((events & Epoll.In) != 0)
                    c.HostReadable = true; // read once established
                break;
            case VsockState.Established:
                if ((events & (Epoll.In | Epoll.Hup | Epoll.Err | Epoll.RdHup)) != 0)
                    c.HostReadable = true; // the read finds the data, the end of stream or the error
                if ((events & (Epoll.Out | Epoll.Hup | Epoll.Err)) != 0)
                    FlushToHost(c);
                if (hangup && !c.CanReadHost && c.State == VsockState.Established)
                    Reset(c); // nobody will read what is left: the peer is gone
                Schedule(c);
                break;
        }
    }

    /// <summary>Reads the client's line a byte at a time (only during the handshake), so that nothing after the
    /// newline is taken from the socket before the guest accepted.</summary>
    private void ReadConnectLine(VsockConnection c)
    {
        Span<byte> b = stackalloc byte[1];
        while (true)
        {
            long n = NonBlockingSocket.Receive(c.Fd, b);
            if (n == -Errno.EAGAIN)
                return;
            if (n <= 0 || c.LineLength == MaxConnectLine)
            {
                Forget(c); // end of stream, an error or a line too long: no guest is involved yet
                return;
            }
            if (b[0] != (byte)'\n')
            {
                c.Line[c.LineLength++] = b[0];
                continue;
            }
            if (!TryParseConnect(c.Line.AsSpan(0, c.LineLength), out uint port))
            {
                Forget(c);
                return;
            }
            c.PeerPort = port;
            c.LocalPort = AllocateLocalPort(port);
            c.State = VsockState.AwaitingResponse;
            c.PendingRequest = true;
            c.StartedTicks = Stopwatch.GetTimestamp();
            _byKey[c.Key] = c;
            Schedule(c);
            return;
        }
    }

    /// <summary>"CONNECT &lt;decimal port&gt;", nothing else.</summary>
    public static bool TryParseConnect(ReadOnlySpan<byte> line, out uint port)
    {
        port = 0;
        ReadOnlySpan<byte> prefix = "CONNECT "u8;
        if (!line.StartsWith(prefix))
            return false;
        var digits = line[prefix.Length..];
        if (digits.Length is 0 or > 10)
            return false;
        ulong value = 0;
        foreach (byte d in digits)
        {
            if (d is < (byte)'0' or > (byte)'9')
                return false;
            value = value * 10 + (ulong)(d - '0');
        }
        if (value > uint.MaxValue)
            return false;
        port = (uint)value;
        return true;
    }

    private uint AllocateLocalPort(uint peerPort)
    {
        while (true)
        {
            uint port = _nextLocalPort++;
            if (_nextLocalPort == 0)
                _nextLocalPort = FirstLocalPort;
            if (!_byKey.ContainsKey(KeyOf(port, peerPort)))
                return port;
        }
    }

    /// <summary>Writes what waits for the host socket ("OK port\n", then buffered guest bytes) until it is empty or
    /// the socket is full; a socket that fails resets the connection.</summary>
    private void FlushToHost(VsockConnection c)
    {
        if (c.Fd < 0)
            return;
        if (c.Prefix is { } prefix)
        {
            long n = NonBlockingSocket.Send(c.Fd, prefix.AsSpan(c.PrefixOffset));
            if (n == -Errno.EAGAIN)
                return;
            if (n < 0)
            {
                Reset(c);
                return;
            }
            c.PrefixOffset += (int)n;
            if (c.PrefixOffset < prefix.Length)
                return;
            c.Prefix = null;
        }
        var ring = c.ToHost;
        while (ring is not null && c.ToHostCount > 0)
        {
            int run = Math.Min(c.ToHostCount, ring.Length - c.ToHostHead);
            long n = NonBlockingSocket.Send(c.Fd, ring.AsSpan(c.ToHostHead, run));
            if (n == -Errno.EAGAIN)
                return;
            if (n < 0)
            {
                Reset(c);
                return;
            }
            c.ToHostHead = (c.ToHostHead + (int)n) % ring.Length;
            c.ToHostCount -= (int)n;
            Forwarded(c, (uint)n);
        }
        AfterDrained(c);
    }

    /// <summary><paramref name="n"/> guest bytes reached the host socket: our fwd_cnt grows; once the guest's view
    /// of our free space is under half the buffer, it hears about the new space.</summary>
    private void Forwarded(VsockConnection c, uint n)
    {
        c.FwdCnt += n;
        uint guestSeesFree = BufferSize - (c.RxCnt - c.LastFwdCntSent);
        if (c.FwdCnt != c.LastFwdCntSent && guestSeesFree < BufferSize / 2)
        {
            c.PendingCreditUpdate = true;
            Schedule(c);
        }
    }

    /// <summary>Acts on the guest's SHUTDOWN once everything it sent before reached the socket.</summary>
    private void AfterDrained(VsockConnection c)
    {
        if (c.State != VsockState.Established || c.ToHostCount > 0 || c.Prefix is not null)
            return;
        if (c.PeerShutSend && c.PeerShutReceive)
        {
            Reset(c); // both directions closed: the RST completes the clean disconnect (§5.10.6.6)
            return;
        }
        if (c.PeerShutSend && !c.HostWriteShut)
        {
            c.HostWriteShut = true;
            NonBlockingSocket.Shutdown(c.Fd, NonBlockingSocket.ShutWrite); // the host reader sees end of stream
        }
    }

    // ---------------------------------------------------------------- guest -> device (tx queue)

    private void ServeTx()
    {
        var context = _context!;
        var queue = context.Queues[TxQueue];
        bool completed = false;
        Span<byte> raw = stackalloc byte[VsockHeader.Size];
        while (context.TryPop(TxQueue, ref _txStopped, "virtio-vsock transmit queue", out var result, out var chain))
        {
            if (result == PopResult.BadChain)
                _badChains++;
            else
                HandleTx(context.Memory, chain, raw);
            queue.Complete(chain.Head, 0);
            completed = true;
        }
        if (completed)
            context.NotifyUsed(TxQueue);
    }

    private void HandleTx(GuestMemory memory, DescriptorChain chain, Span<byte> raw)
    {
        long total = 0;
        foreach (var d in chain.Readable)
            total += d.Length;
        if (total < VsockHeader.Size || !Gather(memory, chain.Readable, 0, raw))
        {
            _dropped++; // not even a header: nobody to answer
            return;
        }
        var h = VsockHeader.Read(raw);
        if (h.SrcCid != GuestCid || h.DstCid != HostCid)
        {
            _dropped++; // spoofed source or meant for a cid this device does not reach
            return;
        }
        if (h.Len > total - VsockHeader.Size || h.Len > MaxPayload || (h.Op != VsockHeader.OpRw && h.Len != 0))
        {
            _dropped++; // the header promises more payload than the buffers hold, or payload on a control packet
            return;
        }
        _txPackets++;
        if (h.Type != VsockHeader.TypeStream)
        {
            if (h.Op != VsockHeader.OpRst)
                OrphanReset(h.SrcPort, h.DstPort);
            return;
        }
        _byKey.TryGetValue(KeyOf(h.DstPort, h.SrcPort), out var c);
        if (h.Op == VsockHeader.OpRequest)
        {
            if (c is null)
                GuestConnect(h);
            else
                OrphanReset(h.SrcPort, h.DstPort); // a second REQUEST for a live connection
            return;
        }
        if (c is null)
        {
            if (h.Op != VsockHeader.OpRst) // never answer an RST with an RST
                OrphanReset(h.SrcPort, h.DstPort);
            return;
        }
        if (c.State == VsockState.Closing)
            return; // our RST is on its way
        UpdatePeerCredit(c, h);
        switch (h.Op)
        {
            case VsockHeader.OpResponse:
                if (c.State != VsockState.AwaitingResponse || c.PendingRequest)
                {
                    Reset(c);
                    break;
                }
                c.State = VsockState.Established;
                c.ToHost = ArrayPool<byte>.Shared.Rent(BufferSize);
                c.Prefix = Encoding.ASCII.GetBytes($"OK {c.LocalPort}\n");
                FlushToHost(c);
                // The client may have written right behind its CONNECT line: that edge was consumed then.
                c.HostReadable = true;
                Schedule(c);
                break;
            case VsockHeader.OpRst:
                Forget(c); // the guest closed it: the host peer sees its socket closed
                break;
            case VsockHeader.OpShutdown:
                if (c.State != VsockState.Established)
                {
                    Reset(c);
                    break;
                }
                c.PeerShutReceive |= (h.Flags & VsockHeader.ShutdownReceive) != 0;
                c.PeerShutSend |= (h.Flags & VsockHeader.ShutdownSend) != 0;
                AfterDrained(c);
                break;
            case VsockHeader.OpRw:
                if (c.State != VsockState.Established || c.PeerShutSend || c.RxCnt - c.FwdCnt + h.Len > BufferSize)
                {
                    Reset(c); // data before the handshake, after SHUTDOWN(send), or beyond the credit we gave
                    break;
                }
                ToHost(memory, c, chain.Readable, h.Len);
                break;
            case VsockHeader.OpCreditUpdate:
                break; // UpdatePeerCredit did it
            case VsockHeader.OpCreditRequest:
                c.PendingCreditUpdate = true;
                Schedule(c);
                break;
            default:
                Reset(c); // no such operation
                break;
        }
    }

    private void UpdatePeerCredit(VsockConnection c, in VsockHeader h)
    {
        c.PeerBufAlloc = h.BufAlloc;
        c.PeerFwdCnt = h.FwdCnt;
        if (c.PeerCredit > 0)
            c.CreditRequested = false;
        if (c.HostReadable)
            Schedule(c);
    }

    /// <summary>Copies <paramref name="target"/>.Length bytes from <paramref name="offset"/> on in the buffers.</summary>
    private static bool Gather(GuestMemory memory, ReadOnlySpan<VirtqDescriptor> buffers, long offset, Span<byte> target)
    {
        int done = 0;
        foreach (var d in buffers)
        {
            if (done == target.Length)
                break;
            if (offset >= d.Length)
            {
                offset -= d.Length;
                continue;
            }
            int n = (int)Math.Min(d.Length - offset, target.Length - done);
            if (!memory.TryGetSpan(new GuestAddress(d.Address + (ulong)offset), n, out var s))
                return false;
            s.CopyTo(target[done..]);
            done += n;
            offset = 0;
        }
        return done == target.Length;
    }

    /// <summary>Guest payload to the host socket: straight from guest memory while nothing is buffered, the rest
    /// into the connection's ring (which the credit check keeps from overflowing).</summary>
    private void ToHost(GuestMemory memory, VsockConnection c, ReadOnlySpan<VirtqDescriptor> buffers, uint length)
    {
        c.RxCnt += length;
        _txBytes += length;
        long offset = VsockHeader.Size;
        uint left = length;
        var ring = c.ToHost!;
        foreach (var d in buffers)
        {
            if (left == 0)
                break;
            if (offset >= d.Length)
            {
                offset -= d.Length;
                continue;
            }
            int n = (int)Math.Min(d.Length - offset, left);
            if (!memory.TryGetSpan(new GuestAddress(d.Address + (ulong)offset), n, out var data))
                break;
            offset = 0;
            left -= (uint)n;
            if (c.ToHostCount == 0 && c.Prefix is null && !c.HostWriteShut)
            {
                long sent = NonBlockingSocket.Send(c.Fd, data);
                if (sent < 0 && sent != -Errno.EAGAIN)
                {
                    Reset(c); // the host peer is gone
                    return;
                }
                if (sent > 0)
                {
                    data = data[(int)sent..];
                    Forwarded(c, (uint)sent);
                }
            }
            int tail = (c.ToHostHead + c.ToHostCount) % ring.Length;
            int first = Math.Min(data.Length, ring.Length - tail);
            data[..first].CopyTo(ring.AsSpan(tail));
            data[first..].CopyTo(ring);
            c.ToHostCount += data.Length;
        }
    }

    /// <summary>A guest REQUEST to host port P: connect to PATH_P.</summary>
    private void GuestConnect(in VsockHeader h)
    {
        if (_connectionCount == MaxConnections)
            ExpireHandshakes();
        if (_connectionCount == MaxConnections)
        {
            OrphanReset(h.SrcPort, h.DstPort);
            return;
        }
        int fd = NonBlockingSocket.Connect(string.Concat(_path, "_", h.DstPort.ToString(System.Globalization.CultureInfo.InvariantCulture)));
        if (fd < 0)
        {
            OrphanReset(h.SrcPort, h.DstPort); // nobody listens there
            return;
        }
        var c = NewConnection(fd);
        c.State = VsockState.Established;
        c.LocalPort = h.DstPort;
        c.PeerPort = h.SrcPort;
        c.PeerBufAlloc = h.BufAlloc;
        c.PeerFwdCnt = h.FwdCnt;
        c.ToHost = ArrayPool<byte>.Shared.Rent(BufferSize);
        c.PendingResponse = true;
        _byKey[c.Key] = c;
        Schedule(c);
    }

    // ---------------------------------------------------------------- connection teardown

    /// <summary>Closes the host socket and sends the guest an RST; the connection is forgotten once it went out.</summary>
    private void Reset(VsockConnection c)
    {
        if (c.State == VsockState.AwaitingConnect || (c.State == VsockState.AwaitingResponse && c.PendingRequest))
        {
            Forget(c); // the guest never heard of it
            return;
        }
        CloseHost(c);
        c.State = VsockState.Closing;
        c.PendingReset = true;
        Schedule(c);
    }

    /// <summary>Closes the host socket and forgets the connection (no packet to the guest).</summary>
    private void Forget(VsockConnection c)
    {
        CloseHost(c);
        if (_byKey.TryGetValue(c.Key, out var known) && known == c)
            _byKey.Remove(c.Key);
        if (_slots[c.Slot] == c)
        {
            _slots[c.Slot] = null;
            _connectionCount--;
        }
        c.PendingRequest = c.PendingResponse = c.PendingCreditUpdate = c.PendingShutdown = c.PendingReset = false;
        c.HostReadable = false;
        c.State = VsockState.Closing;
    }

    private void CloseHost(VsockConnection c)
    {
        if (c.Fd >= 0)
        {
            _epoll.Remove(c.Fd);
            Sys.Close(c.Fd);
            c.Fd = -1;
        }
        if (c.ToHost is { } ring)
        {
            ArrayPool<byte>.Shared.Return(ring);
            c.ToHost = null;
        }
        c.ToHostCount = 0;
        c.Prefix = null;
        c.HostReadable = false;
    }

    private void OrphanReset(uint guestPort, uint hostPort)
    {
        if (_orphanCount == MaxOrphanResets)
            return;
        _orphanResets[(_orphanHead + _orphanCount) % MaxOrphanResets] = (guestPort, hostPort);
        _orphanCount++;
    }

    private void Schedule(VsockConnection c)
    {
        if (!c.InRxQueue && c.WantsRx)
        {
            c.InRxQueue = true;
            _rxQueue.Enqueue(c);
        }
    }

    // ---------------------------------------------------------------- device -> guest (rx queue)

    private void ServeRx()
    {
        var context = _context;
        if (context is null)
            return;
        var queue = context.Queues[RxQueue];
        int delivered = 0, idle = 0;
        while (!_rxStopped && (_orphanCount > 0 || _rxQueue.Count > 0))
        {
            if (delivered == RxBudget)
            {
                _more.Signal(); // let the tx queue and the sockets have a turn; we come back
                break;
            }
            if (!_holding && !PopRxChain(context, queue))
                break;
            uint written = _orphanCount > 0 ? EmitOrphanReset(context.Memory) : EmitNext(context.Memory);
            if (written == 0)
            {
                // That connection had nothing after all; the chain stays held. Once every queued connection had
                // its turn without a packet (e.g. data but a buffer with no room past the header), stop.
                if (++idle > _rxQueue.Count + 1)
                    break;
                continue;
            }
            idle = 0;
            queue.Complete(_heldHead, written);
            _holding = false;
            delivered++;
            _rxPackets++;
        }
        if (delivered > 0)
            context.NotifyUsed(RxQueue);
    }

    private bool PopRxChain(VirtioContext context, SplitQueue queue)
    {
        while (true)
        {
            if (!context.TryPop(RxQueue, ref _rxStopped, "virtio-vsock receive queue", out var result, out var chain))
                return false; // empty: the packet waits, the driver's kick brings us back
            long capacity = 0;
            bool mapped = true;
            foreach (var d in chain.Writable)
            {
                capacity += d.Length;
                mapped &= context.Memory.TryGetSpan(new GuestAddress(d.Address), (int)d.Length, out _);
            }
            if (result == PopResult.BadChain || chain.ReadableCount > 0 || capacity < VsockHeader.Size || !mapped)
            {
                _badChains++; // a receive buffer must be writable and hold at least a header
                queue.Complete(chain.Head, 0);
                context.NotifyUsed(RxQueue);
                continue;
            }
            chain.Writable.CopyTo(_held);
            _heldCount = chain.Writable.Length;
            _heldCapacity = capacity;
            _heldHead = chain.Head;
            _holding = true;
            return true;
        }
    }

    private uint EmitOrphanReset(GuestMemory memory)
    {
        var (guestPort, hostPort) = _orphanResets[_orphanHead];
        _orphanHead = (_orphanHead + 1) % MaxOrphanResets;
        _orphanCount--;
        _resetsSent++;
        return WriteHeader(memory, new VsockHeader
        {
            SrcCid = HostCid, DstCid = GuestCid, SrcPort = hostPort, DstPort = guestPort,
            Type = VsockHeader.TypeStream, Op = VsockHeader.OpRst,
        });
    }

    /// <summary>The next packet of the next connection in line (round robin): control packets first, then data,
    /// then SHUTDOWN and RST, so neither overtakes data sent before it. 0 when it had nothing.</summary>
    private uint EmitNext(GuestMemory memory)
    {
        var c = _rxQueue.Dequeue();
        c.InRxQueue = false;
        uint written = EmitFor(memory, c);
        Schedule(c); // more to say: back in line behind the others
        return written;
    }

    private uint EmitFor(GuestMemory memory, VsockConnection c)
    {
        if (c.PendingRequest)
        {
            c.PendingRequest = false;
            return Control(memory, c, VsockHeader.OpRequest);
        }
        if (c.PendingResponse)
        {
            c.PendingResponse = false;
            return Control(memory, c, VsockHeader.OpResponse);
        }
        if (c.PendingReset)
        {
            uint n = Control(memory, c, VsockHeader.OpRst);
            _resetsSent++;
            Forget(c);
            return n;
        }
        if (c.CanReadHost && c.HostReadable)
        {
            uint credit = c.PeerCredit;
            if (credit == 0)
            {
                if (!c.CreditRequested)
                {
                    c.CreditRequested = true; // ask once; the guest's next packet carries its credit anyway
                    return Control(memory, c, VsockHeader.OpCreditRequest);
                }
            }
            else if (_heldCapacity == VsockHeader.Size)
            {
                // No room for data in this buffer: spend it on our credit (harmless), so the next one gets the data.
                return Control(memory, c, VsockHeader.OpCreditUpdate);
            }
            else
            {
                uint n = ReadHost(memory, c, Math.Min(credit, MaxPayload));
                if (n > 0)
                    return n;
            }
        }
        if (c.PendingCreditUpdate)
            return Control(memory, c, VsockHeader.OpCreditUpdate);
        if (c.PendingShutdown)
        {
            c.PendingShutdown = false;
            return Control(memory, c, VsockHeader.OpShutdown, VsockHeader.ShutdownSend);
        }
        return 0;
    }

    private uint Control(GuestMemory memory, VsockConnection c, ushort op, uint flags = 0) =>
        WriteHeader(memory, Header(c, op, 0, flags));

    private VsockHeader Header(VsockConnection c, ushort op, uint length, uint flags)
    {
        // Every packet tells the guest our credit, so a separate CREDIT_UPDATE is not needed after it.
        c.LastFwdCntSent = c.FwdCnt;
        c.PendingCreditUpdate = false;
        return new VsockHeader
        {
            SrcCid = HostCid, DstCid = GuestCid, SrcPort = c.LocalPort, DstPort = c.PeerPort, Len = length,
            Type = VsockHeader.TypeStream, Op = op, Flags = flags, BufAlloc = BufferSize, FwdCnt = c.FwdCnt,
        };
    }

    private uint WriteHeader(GuestMemory memory, in VsockHeader h)
    {
        Span<byte> raw = stackalloc byte[VsockHeader.Size];
        h.Write(raw);
        Scatter(memory, raw, 0);
        return VsockHeader.Size;
    }

    /// <summary>Copies <paramref name="data"/> into the held chain's buffers from <paramref name="offset"/> on.</summary>
    private void Scatter(GuestMemory memory, ReadOnlySpan<byte> data, long offset)
    {
        for (int i = 0; i < _heldCount && data.Length > 0; i++)
        {
            var d = _held[i];
            if (offset >= d.Length)
            {
                offset -= d.Length;
                continue;
            }
            int n = (int)Math.Min(d.Length - offset, data.Length);
            if (memory.TryGetSpan(new GuestAddress(d.Address + (ulong)offset), n, out var target))
                data[..n].CopyTo(target);
            data = data[n..];
            offset = 0;
        }
    }

    /// <summary>Reads up to <paramref name="max"/> bytes from the host socket straight into the held chain behind
    /// the header, then writes the RW header. 0 when the socket had nothing (or ended: a SHUTDOWN is queued; or
    /// failed: an RST is queued).</summary>
    private uint ReadHost(GuestMemory memory, VsockConnection c, uint max)
    {
        long offset = VsockHeader.Size;
        uint got = 0;
        for (int i = 0; i < _heldCount && got < max; i++)
        {
            var d = _held[i];
            if (offset >= d.Length)
            {
                offset -= d.Length;
                continue;
            }
            int want = (int)Math.Min(d.Length - offset, max - got);
            if (!memory.TryGetSpan(new GuestAddress(d.Address + (ulong)offset), want, out var target))
                break;
            offset = 0;
            long n = NonBlockingSocket.Receive(c.Fd, target);
            if (n > 0)
            {
                got += (uint)n;
                if (n < want)
                    break; // the socket is empty for now; the next read says EAGAIN
                continue;
            }
            if (n == -Errno.EAGAIN)
                c.HostReadable = false; // edge-triggered: the next event sets it again
            else if (n == 0)
            {
                c.HostEof = true; // the host peer will send no more
                c.PendingShutdown = true;
            }
            else
                Reset(c);
            break;
        }
        if (got == 0)
            return 0;
        c.TxCnt += got;
        _rxBytes += got;
        var h = Header(c, VsockHeader.OpRw, got, 0);
        Span<byte> raw = stackalloc byte[VsockHeader.Size];
        h.Write(raw);
        Scatter(memory, raw, 0);
        return VsockHeader.Size + got;
    }
}
