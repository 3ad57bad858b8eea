using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using Vmm.Interop;
using Vmm.Memory;

namespace Vmm.Devices.Virtio.Net;

/// <summary>virtio-net (virtio 1.2 §5.1) backed by a host tap: one receive queue (0) and one transmit queue (1),
/// no control queue, no multiqueue. Offers MAC, STATUS (link always up), MRG_RXBUF, CSUM and GUEST_CSUM; no
/// segmentation offloads. With VERSION_1 every frame carries the 12-byte virtio_net_hdr_v1, the header the tap
/// uses with TUNSETVNETHDRSZ 12, so frames pass between ring and tap without conversion.
/// TX: the chain's readable buffers are written to the tap with one writev (the header from a private copy, so
/// the guest cannot change it after it was checked). RX: a frame is read from the tap into a reused buffer,
/// then copied into one receive chain (or, with MRG_RXBUF, as many as it needs; num_buffers says how many).
/// With no receive buffer posted, the frame waits and the tap is not read until the driver kicks queue 0:
/// nothing is dropped, nothing spins. Frames that cannot fit the guest's buffers are dropped and counted.
/// Served by one <see cref="VirtioWorker"/> thread; allocation-free once active.</summary>
public sealed class VirtioNet : VirtioDevice, IDeviceCounters
{
    // Feature bits (§5.1.3).
    public const int F_CSUM = 0, F_GUEST_CSUM = 1, F_MAC = 5, F_MRG_RXBUF = 15, F_STATUS = 16;
    public const ushort S_LINK_UP = 1;

    // virtio_net_hdr_v1 (§5.1.6).
    public const byte HDR_F_NEEDS_CSUM = 1;
    public const byte HDR_GSO_NONE = 0;
    private const int HeaderSize = TapDevice.VnetHeaderSize;
    private const int NumBuffersOffset = 10;

    public const int ReceiveQueue = 0, TransmitQueue = 1;

    /// <summary>The largest frame read from the tap (header + 64 KiB; no GSO is enabled, so the tap's MTU bounds
    /// it) — a longer read would be truncated by the kernel.</summary>
    public const int MaxPacket = HeaderSize + 65536 + 64;

    private readonly TapDevice _tap;
    private readonly byte[] _config = new byte[8]; // mac[6], status le16
    private readonly byte[] _packet = new byte[MaxPacket];
    private readonly byte[] _txHeader = GC.AllocateArray<byte>(HeaderSize, pinned: true);
    private readonly nint _txHeaderAddress;
    private readonly IoVec[] _txVectors;
    private readonly Action<int> _onQueue, _onTap;
    private readonly Func<int, bool> _pollTap;

    // RX chains popped and held until they can take the pending frame (only with MRG_RXBUF can there be several).
    private readonly (ushort Head, int First, int Count, long Capacity)[] _held;
    private readonly VirtqDescriptor[] _heldBuffers;
    private int _heldCount, _heldBufferCount;
    private long _heldCapacity;
    private int _pendingLength; // > 0: _packet holds a frame waiting for receive buffers

    private VirtioContext? _context;
    private bool _mergeable, _guestCsum, _rxStopped, _txStopped;
    private long _rxPackets, _rxDropped, _txPackets, _txDropped, _badChains, _rxBytes, _txBytes;

    /// <summary>Opens (or creates) tap <paramref name="tapName"/>; <paramref name="mac"/> null: a random locally
    /// administered 52:54:00:xx:xx:xx.</summary>
    public VirtioNet(string tapName, byte[]? mac = null) : this(new TapDevice(tapName), mac)
    {
    }

    /// <summary>Uses (and owns) an opened tap.</summary>
    public VirtioNet(TapDevice tap, byte[]? mac = null)
    {
        _tap = tap;
        Mac = mac is null ? RandomMac() : ValidateMac(mac);
        Mac.CopyTo(_config, 0);
        BinaryPrimitives.WriteUInt16LittleEndian(_config.AsSpan(6), S_LINK_UP);
        _txHeaderAddress = Marshal.UnsafeAddrOfPinnedArrayElement(_txHeader, 0);
        _txVectors = new IoVec[MaxQueueSize + 1];
        _held = new (ushort, int, int, long)[MaxQueueSize];
        _heldBuffers = new VirtqDescriptor[MaxQueueSize];
        _onQueue = OnQueue;
        _onTap = _ => ServeReceive();
        _pollTap = _ => !_rxStopped && _pendingLength == 0;
    }

    public byte[] Mac { get; }
    public string TapName => _tap.Name;

    public override VirtioDeviceType Type => VirtioDeviceType.Net;
    public override string Name => $"virtio-net ({_tap.Name})";
    public override (byte Class, byte SubClass) PciClass => (0x02, 0x00); // network, ethernet

    public override ulong DeviceFeatures =>
        (1UL << F_CSUM) | (1UL << F_GUEST_CSUM) | (1UL << F_MAC) | (1UL << F_MRG_RXBUF) | (1UL << F_STATUS);

    public override int QueueCount => 2;
    public override int ConfigSize => _config.Length;

    /// <summary>Frames delivered to the guest / dropped on the way (too big for the posted buffers, tap errors).</summary>
    public long RxPackets => Volatile.Read(ref _rxPackets);
    public long RxDropped => Volatile.Read(ref _rxDropped);
    /// <summary>Frames written to the tap / dropped (malformed, GSO not offered, tap refused).</summary>
    public long TxPackets => Volatile.Read(ref _txPackets);
    public long TxDropped => Volatile.Read(ref _txDropped);
    /// <summary>Chains the queue rejected (loops, addresses outside RAM, ...) or that had the wrong shape.</summary>
    public long BadChains => Volatile.Read(ref _badChains);

    /// <summary>vm.counters, in Cloud Hypervisor's names: frame bytes without the virtio-net header.</summary>
    public IReadOnlyList<KeyValuePair<string, ulong>> Counters() =>
    [
        new("rx_bytes", (ulong)Volatile.Read(ref _rxBytes)),
        new("rx_frames", (ulong)Volatile.Read(ref _rxPackets)),
        new("tx_bytes", (ulong)Volatile.Read(ref _txBytes)),
        new("tx_frames", (ulong)Volatile.Read(ref _txPackets)),
    ];

    public override void ReadConfig(int offset, Span<byte> data) => _config.AsSpan(offset, data.Length).CopyTo(data);

    public override void Activate(VirtioContext context)
    {
        _context = context;
        _mergeable = context.Negotiated(F_MRG_RXBUF);
        _guestCsum = context.Negotiated(F_GUEST_CSUM);
        _rxStopped = _txStopped = false;
        _pendingLength = 0;
        ReleaseHeld();
        try
        {
            // Without GUEST_CSUM the guest must get complete checksums: let the host compute them.
            _tap.SetOffload(_guestCsum);
        }
        catch (TapException e)
        {
            context.NeedsReset(e.Message);
            return;
        }
        Worker = new VirtioWorker($"virtio-net {_tap.Name}", context.Kicks, _onQueue, [_tap.Fd], _onTap,
            pollExtraFd: _pollTap);
    }

    public override void Deactivate()
    {
        Worker?.Dispose();
        Worker = null;
        _context = null;
        _pendingLength = 0;
        ReleaseHeld();
    }

    public override void Dispose()
    {
        Deactivate();
        _tap.Dispose();
        base.Dispose();
    }

    private void OnQueue(int queue)
    {
        if (queue == ReceiveQueue)
            ServeReceive();
        else if (queue == TransmitQueue)
            ServeTransmit();
    }

    // ---------------------------------------------------------------- transmit

    private void ServeTransmit()
    {
        var context = _context!;
        var queue = context.Queues[TransmitQueue];
        bool completed = false;
        while (context.TryPop(TransmitQueue, ref _txStopped, "virtio-net transmit queue", out var result, out var chain))
        {
            if (result == PopResult.BadChain)
                _badChains++;
            else if (Transmit(context.Memory, chain))
                _txPackets++;
            else
                _txDropped++;
            queue.Complete(chain.Head, 0); // the device writes nothing into a transmit buffer
            completed = true;
        }
        if (completed)
            context.NotifyUsed(TransmitQueue);
    }

    /// <summary>Writes one frame (header + data from the readable buffers) to the tap.</summary>
    private bool Transmit(GuestMemory memory, DescriptorChain chain)
    {
        // The header, copied out and checked: what the tap sees is what was checked.
        int got = 0;
        int vectors = 1;
        long total = 0;
        foreach (var d in chain.Readable)
        {
            total += d.Length;
            uint skip = 0;
            if (got < HeaderSize)
            {
                skip = (uint)Math.Min(HeaderSize - got, d.Length);
                if (!memory.TryGetSpan(new GuestAddress(d.Address), (int)skip, out var h))
                    return false;
                h.CopyTo(_txHeader.AsSpan(got));
                got += (int)skip;
            }
            if (d.Length > skip)
            {
                if (HostAddress(memory, d.Address + skip) is not nint host)
                    return false;
                _txVectors[vectors++] = new IoVec(host, d.Length - skip);
            }
        }
        if (got < HeaderSize || total > MaxPacket)
            return false; // no room for even a header, or more than any frame can be
        if (_txHeader[1] != HDR_GSO_NONE)
            return false; // no HOST_TSO*/UFO offered: a GSO frame breaks the negotiation
        BinaryPrimitives.WriteUInt16LittleEndian(_txHeader.AsSpan(NumBuffersOffset), 0);
        _txVectors[0] = new IoVec(_txHeaderAddress, HeaderSize);
        long n = Uio.Writev(_tap.Fd, _txVectors.AsSpan(0, vectors));
        if (n != total)
            return false;
        _txBytes += n - HeaderSize;
        return true;
    }

    /// <summary>The host address of a guest address the queue already checked to lie in RAM.</summary>
    private static nint? HostAddress(GuestMemory memory, ulong address)
    {
        var regions = memory.Regions;
        for (int i = 0; i < regions.Count; i++) // no foreach: an interface enumerator allocates per packet
        {
            var r = regions[i];
            if (r.Contains(new GuestAddress(address)))
                return r.HostAddress + (nint)(address - r.Start.Value);
        }
        return null;
    }

    // ---------------------------------------------------------------- receive

    /// <summary>Frames per call before the worker polls again (so a flood on the tap cannot starve transmit).</summary>
    private const int ReceiveBudget = 64;

    private void ServeReceive()
    {
        var context = _context!;
        int delivered = 0;
        while (!_rxStopped && delivered < ReceiveBudget)
        {
            if (_pendingLength == 0)
            {
                long n = Uio.Read(_tap.Fd, _packet);
                if (n == -Errno.EINTR)
                    continue;
                if (n < 0)
                    break; // EAGAIN: nothing more; anything else (the tap went down): poll says when to retry
                if (n < HeaderSize)
                {
                    _rxDropped++;
                    continue;
                }
                _pendingLength = (int)n;
            }
            var outcome = Deliver(context);
            if (outcome == RxOutcome.NoBuffers)
                break; // the frame waits; the tap is not polled until the driver posts buffers
            delivered++;
        }
        if (delivered > 0)
            context.NotifyUsed(ReceiveQueue);
    }

    private enum RxOutcome { Delivered, Dropped, NoBuffers }

    private RxOutcome Deliver(VirtioContext context)
    {
        var queue = context.Queues[ReceiveQueue];
        Span<byte> header = _packet.AsSpan(0, HeaderSize);
        if (header[1] != HDR_GSO_NONE)
            return Drop(); // the tap has no GSO offload enabled; never hand the guest what it did not negotiate
        if (!_guestCsum)
            header[0] = 0; // §5.1.6.4.1: without GUEST_CSUM, flags must be zero (no DATA_VALID either)
        int length = _pendingLength;
        while (_heldCapacity < length)
        {
            if (_heldCount > 0 && !_mergeable)
                return Drop(); // one chain per frame, and it is too small (the chain stays for the next frame)
            if (_heldCount == queue.Size)
                return Drop(); // every buffer of the ring would not hold it
            if (!context.TryPop(ReceiveQueue, ref _rxStopped, "virtio-net receive queue", out var result, out var chain))
                return RxOutcome.NoBuffers;
            long capacity = 0;
            foreach (var d in chain.Writable)
                capacity += d.Length;
            if (result == PopResult.BadChain || chain.ReadableCount > 0 || capacity < HeaderSize)
            {
                // A receive buffer must be device-writable and hold at least the header (§5.1.6.3.1).
                _badChains++;
                queue.Complete(chain.Head, 0);
                context.NotifyUsed(ReceiveQueue);
                continue;
            }
            _held[_heldCount++] = (chain.Head, _heldBufferCount, chain.Writable.Length, capacity);
            chain.Writable.CopyTo(_heldBuffers.AsSpan(_heldBufferCount));
            _heldBufferCount += chain.Writable.Length;
            _heldCapacity += capacity;
        }

        // Every held chain takes part: more were popped only while the frame did not fit.
        BinaryPrimitives.WriteUInt16LittleEndian(_packet.AsSpan(NumBuffersOffset), (ushort)_heldCount);
        var memory = context.Memory;
        int done = 0;
        for (int c = 0; c < _heldCount; c++)
        {
            var (head, first, count, _) = _held[c];
            uint written = 0;
            for (int i = first; i < first + count && done < length; i++)
            {
                var d = _heldBuffers[i];
                int n = (int)Math.Min(d.Length, (uint)(length - done));
                if (n > 0 && memory.TryGetSpan(new GuestAddress(d.Address), n, out var target))
                    _packet.AsSpan(done, n).CopyTo(target);
                done += n;
                written += (uint)n;
            }
            queue.Complete(head, written);
        }
        _heldCount = _heldBufferCount = 0;
        _heldCapacity = 0;
        _pendingLength = 0;
        _rxPackets++;
        _rxBytes += length - HeaderSize;
        return RxOutcome.Delivered;
    }

    private RxOutcome Drop()
    {
        _pendingLength = 0;
        _rxDropped++;
        return RxOutcome.Dropped;
    }

    /// <summary>Forgets held chains (on reset: the driver reclaims every buffer anyway).</summary>
    private void ReleaseHeld()
    {
        _heldCount = _heldBufferCount = 0;
        _heldCapacity = 0;
    }

    // ---------------------------------------------------------------- MAC

    private static byte[] RandomMac()
    {
        var mac = new byte[] { 0x52, 0x54, 0x00, 0, 0, 0 }; // the QEMU/KVM locally administered prefix
        RandomNumberGenerator.Fill(mac.AsSpan(3));
        return mac;
    }

    private static byte[] ValidateMac(byte[] mac)
    {
        if (mac.Length != 6)
            throw new ArgumentException($"a MAC address has 6 bytes, not {mac.Length}", nameof(mac));
        if ((mac[0] & 1) != 0)
            throw new ArgumentException($"{FormatMac(mac)} is a multicast address", nameof(mac));
        if (mac.AsSpan().IndexOfAnyExcept((byte)0) < 0)
            throw new ArgumentException("00:00:00:00:00:00 is not a usable MAC address", nameof(mac));
        return (byte[])mac.Clone();
    }

    public static string FormatMac(ReadOnlySpan<byte> mac) => string.Join(':', mac.ToArray().Select(b => b.ToString("x2")));

    /// <summary>Parses "52:54:00:12:34:56".</summary>
    public static byte[] ParseMac(string text)
    {
        var parts = text.Split(':');
        var mac = new byte[6];
        if (parts.Length != 6 || !parts.All(p => p.Length == 2 && Uri.IsHexDigit(p[0]) && Uri.IsHexDigit(p[1])))
            throw new FormatException($"'{text}' is not a MAC address (xx:xx:xx:xx:xx:xx)");
        for (int i = 0; i < 6; i++)
            mac[i] = Convert.ToByte(parts[i], 16);
        return mac;
    }
}
