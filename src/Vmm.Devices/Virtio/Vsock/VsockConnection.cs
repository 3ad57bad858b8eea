namespace Vmm.Devices.Virtio.Vsock;

/// <summary>Where a connection is in its life (all of it on the device's worker thread).</summary>
internal enum VsockState
{
    /// <summary>A host client connected to PATH; its "CONNECT port\n" line has not arrived yet.</summary>
    AwaitingConnect,
    /// <summary>REQUEST queued or sent to the guest; waiting for its RESPONSE (or RST).</summary>
    AwaitingResponse,
    Established,
    /// <summary>The host socket is closed; an RST for the guest is queued. Packets from the guest are ignored
    /// until it went out, then the connection is forgotten.</summary>
    Closing,
}

/// <summary>One stream between a guest port and a host Unix socket, with both directions' credit state
/// (virtio 1.2 §5.10.6.3). Guest-to-host bytes that the socket does not take at once wait in
/// <see cref="ToHost"/>, a ring as large as the buf_alloc we advertise, so a guest that keeps to its credit can
/// never overflow it. Host-to-guest bytes are not buffered: they are read from the socket straight into the
/// guest's receive buffers, never more than the guest's credit allows.</summary>
internal sealed class VsockConnection
{
    public int Fd = -1;
    public int Slot;
    public uint Generation;
    public VsockState State;
    public uint LocalPort, PeerPort; // host side, guest side
    public long StartedTicks;

    // Handshake line from a host client ("CONNECT 1234\n").
    public readonly byte[] Line = new byte[VirtioVsock.MaxConnectLine];
    public int LineLength;

    // Guest -> host.
    public byte[]? ToHost; // rented while the connection is open
    public int ToHostHead, ToHostCount;
    public byte[]? Prefix; // "OK <port>\n" for a host-initiated connection, written before any data
    public int PrefixOffset;
    public uint RxCnt; // bytes received from the guest
    public uint FwdCnt; // of them, bytes handed to the host socket (our fwd_cnt)
    public uint LastFwdCntSent; // the fwd_cnt the guest last heard from us

    // Host -> guest.
    public uint PeerBufAlloc, PeerFwdCnt; // the guest's last word on its credit
    public uint TxCnt; // bytes sent to the guest
    public bool CreditRequested;

    // Host socket.
    public bool HostReadable, HostEof, HostWriteShut;

    // SHUTDOWN flags the guest sent.
    public bool PeerShutReceive, PeerShutSend;

    // Packets waiting for a guest receive buffer (one of each at most: the flags cannot grow without bound).
    public bool PendingRequest, PendingResponse, PendingCreditUpdate, PendingShutdown, PendingReset;
    public bool InRxQueue;

    public ulong Key => VirtioVsock.KeyOf(LocalPort, PeerPort);

    /// <summary>How much more the guest may receive (its buf_alloc minus what is in flight to it).</summary>
    public uint PeerCredit
    {
        get
        {
            uint inFlight = TxCnt - PeerFwdCnt;
            return inFlight >= PeerBufAlloc ? 0 : PeerBufAlloc - inFlight;
        }
    }

    public bool CanReadHost => State == VsockState.Established && !HostEof && !PeerShutReceive;

    /// <summary>Something to put in a guest receive buffer.</summary>
    public bool WantsRx =>
        PendingRequest || PendingResponse || PendingReset || PendingCreditUpdate || PendingShutdown
        || (CanReadHost && HostReadable && (PeerCredit > 0 || !CreditRequested));
}
