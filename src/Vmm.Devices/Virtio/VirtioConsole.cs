using System.Buffers.Binary;
using Vmm.Interop;

namespace Vmm.Devices.Virtio;

/// <summary>virtio-console (virtio 1.2 §5.3) with one port and no MULTIPORT: receiveq0 (queue 0) carries input
/// to the guest, transmitq0 (queue 1) its output. Offers SIZE (cols/rows in the configuration).
/// Output goes to an <see cref="IByteSink"/> (the same console as the UART): when the sink is full the rest of
/// the chain is held and written when the sink calls back — nothing dropped, and the worker never blocks.
/// Input (<see cref="EnqueueInput"/>, e.g. from <see cref="Legacy.SerialConsole.AttachInput"/>) is buffered
/// until the guest posts receive buffers. Served by one <see cref="VirtioWorker"/> thread, allocation-free.</summary>
public sealed class VirtioConsole : VirtioDevice, IConsoleInput
{
    public const int F_SIZE = 0;
    public const int ReceiveQueue = 0, TransmitQueue = 1;
    public const int InputCapacity = 4096;

    private const int InputFd = 0, OutputSpaceFd = 1;

    private readonly IByteSink? _output;
    private readonly byte[] _config = new byte[8]; // cols le16, rows le16, max_nr_ports le32
    private readonly EventFd _inputReady = new();
    private readonly EventFd _outputSpace = new();
    private readonly Action<int> _onQueue, _onFd;

    // Input ring, shared with the console's input thread.
    private readonly object _inputLock = new();
    private readonly byte[] _input = new byte[InputCapacity];
    private int _inputHead, _inputCount;

    // A transmit chain the sink could not take whole: its readable buffers and where writing stopped.
    private readonly VirtqDescriptor[] _txBuffers;
    private bool _txHolding;
    private ushort _txHead;
    private int _txCount, _txIndex;
    private uint _txOffset;

    private VirtioContext? _context;
    private bool _rxStopped, _txStopped;
    private long _bytesTransmitted, _bytesReceived, _badChains;

    /// <param name="output">Where the guest's output goes; null discards it.</param>
    public VirtioConsole(IByteSink? output, ushort cols = 80, ushort rows = 25)
    {
        _output = output;
        BinaryPrimitives.WriteUInt16LittleEndian(_config, cols);
        BinaryPrimitives.WriteUInt16LittleEndian(_config.AsSpan(2), rows);
        BinaryPrimitives.WriteUInt32LittleEndian(_config.AsSpan(4), 1);
        _txBuffers = new VirtqDescriptor[MaxQueueSize];
        _onQueue = OnQueue;
        _onFd = OnFd;
        output?.AddSpaceAvailableCallback(() => _outputSpace.Signal()); // on the sink's thread: only wake the worker
    }

    public override VirtioDeviceType Type => VirtioDeviceType.Console;
    public override string Name => "virtio-console";
    public override (byte Class, byte SubClass) PciClass => (0x07, 0x80); // simple communication controller, other
    public override ulong DeviceFeatures => 1UL << F_SIZE;
    public override int QueueCount => 2;
    public override int ConfigSize => _config.Length;

    public long BytesTransmitted => Volatile.Read(ref _bytesTransmitted);
    public long BytesReceived => Volatile.Read(ref _bytesReceived);
    public long BadChains => Volatile.Read(ref _badChains);

    public override void ReadConfig(int offset, Span<byte> data) => _config.AsSpan(offset, data.Length).CopyTo(data);

    public override void Activate(VirtioContext context)
    {
        _context = context;
        _rxStopped = _txStopped = _txHolding = false;
        Worker = new VirtioWorker("virtio-console", context.Kicks, _onQueue, [_inputReady.Fd, _outputSpace.Fd], _onFd);
    }

    public override void Deactivate()
    {
        Worker?.Dispose();
        Worker = null;
        _context = null;
        _txHolding = false; // the driver reclaims every buffer on reset
    }

    public override void Dispose()
    {
        Deactivate();
        _inputReady.Dispose();
        _outputSpace.Dispose();
        base.Dispose();
    }

    /// <summary>Queues input for the guest; returns how many bytes fit (the rest is offered again later).</summary>
    public int EnqueueInput(ReadOnlySpan<byte> data)
    {
        int n;
        lock (_inputLock)
        {
            n = Math.Min(data.Length, InputCapacity - _inputCount);
            int tail = (_inputHead + _inputCount) % InputCapacity;
            int first = Math.Min(n, InputCapacity - tail);
            data[..first].CopyTo(_input.AsSpan(tail));
            data[first..n].CopyTo(_input);
            _inputCount += n;
        }
        if (n > 0)
            _inputReady.Signal();
        return n;
    }

    private void OnQueue(int queue)
    {
        if (queue == ReceiveQueue)
            ServeInput();
        else if (queue == TransmitQueue)
            ServeOutput();
    }

    private void OnFd(int fd)
    {
        if (fd == InputFd)
        {
            _inputReady.TryRead(out _);
            ServeInput();
        }
        else if (fd == OutputSpaceFd)
        {
            _outputSpace.TryRead(out _);
            ServeOutput();
        }
    }

    // ---------------------------------------------------------------- guest output

    private void ServeOutput()
    {
        var context = _context!;
        var queue = context.Queues[TransmitQueue];
        bool completed = false;
        while (!_txStopped)
        {
            if (!_txHolding)
            {
                if (!context.TryPop(TransmitQueue, ref _txStopped, "virtio-console transmit queue", out var result, out var chain))
                    break;
                if (result == PopResult.BadChain)
                {
                    _badChains++;
                    queue.Complete(chain.Head, 0);
                    completed = true;
                    continue;
                }
                // Writable buffers in a transmit chain are ignored; the readable ones are the output.
                chain.Readable.CopyTo(_txBuffers);
                _txHead = chain.Head;
                _txCount = chain.ReadableCount;
                _txIndex = 0;
                _txOffset = 0;
                _txHolding = true;
            }
            if (!WriteHeld(context))
                break; // the sink is full: its callback resumes us
            _txHolding = false;
            queue.Complete(_txHead, 0);
            completed = true;
        }
        if (completed)
            context.NotifyUsed(TransmitQueue);
    }

    /// <summary>Writes the rest of the held chain to the sink; false when the sink filled up first.</summary>
    private bool WriteHeld(VirtioContext context)
    {
        for (; _txIndex < _txCount; _txIndex++, _txOffset = 0)
        {
            var d = _txBuffers[_txIndex];
            while (_txOffset < d.Length)
            {
                int length = (int)(d.Length - _txOffset);
                if (!context.Memory.TryGetSpan(new Memory.GuestAddress(d.Address + _txOffset), length, out var data))
                    break; // cannot happen: the queue checked the buffer
                int n = _output is null ? length : _output.TryWrite(data);
                _txOffset += (uint)n;
                _bytesTransmitted += n;
                if (n < length)
                    return false;
            }
        }
        return true;
    }

    // ---------------------------------------------------------------- guest input

    private void ServeInput()
    {
        var context = _context!;
        var queue = context.Queues[ReceiveQueue];
        bool completed = false;
        while (!_rxStopped && Volatile.Read(ref _inputCount) > 0)
        {
            if (!context.TryPop(ReceiveQueue, ref _rxStopped, "virtio-console receive queue", out var result, out var chain))
                break; // empty: the input waits for buffers, the driver's kick brings us back
            completed = true;
            if (result == PopResult.BadChain || chain.ReadableCount > 0)
            {
                _badChains++;
                queue.Complete(chain.Head, 0);
                continue;
            }
            uint written = 0;
            lock (_inputLock)
            {
                foreach (var d in chain.Writable)
                {
                    int n = (int)Math.Min(d.Length, (uint)_inputCount);
                    if (n == 0 || !context.Memory.TryGetSpan(new Memory.GuestAddress(d.Address), n, out var target))
                        break;
                    int first = Math.Min(n, InputCapacity - _inputHead);
                    _input.AsSpan(_inputHead, first).CopyTo(target);
                    _input.AsSpan(0, n - first).CopyTo(target[first..]);
                    _inputHead = (_inputHead + n) % InputCapacity;
                    _inputCount -= n;
                    written += (uint)n;
                }
            }
            _bytesReceived += written;
            queue.Complete(chain.Head, written);
        }
        if (completed)
            context.NotifyUsed(ReceiveQueue);
    }
}
