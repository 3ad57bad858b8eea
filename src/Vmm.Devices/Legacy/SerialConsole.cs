using System.Buffers;
using System.IO.Pipelines;
using Vmm.Interop.Seccomp;

namespace Vmm.Devices.Legacy;

/// <summary>Connects a UART to host byte streams.
/// Output: the UART puts bytes into a fixed ring buffer (no allocation, no blocking on the vCPU thread); a
/// dedicated thread copies them to the output stream. When the stream falls a whole buffer behind,
/// <see cref="TryWrite"/> refuses and the UART keeps THR full, so the guest waits for THRE as it would on
/// a real slow line — back-pressure without stalling KVM_RUN. (System.IO.Pipelines was measured here first:
/// its ArrayPool-backed segments allocate on the writing thread under sustained output.)
/// Several writers may share the output (the UART and a virtio console): each registers a space-available callback.
/// Input: a thread reads the input stream through a <see cref="PipeReader"/> and hands the input device (the UART
/// or a virtio console) what its queue accepts; the rest stays in the pipe (examined, not consumed) until the
/// guest drains the queue.</summary>
public sealed class SerialConsole : IByteSink, IDisposable
{
    public const int BufferSize = 1 << 20;

    /// <summary>The console escape key, Ctrl-A, as in QEMU: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A.</summary>
    public const byte EscapeKey = 0x01;

    private readonly byte[] _ring = new byte[BufferSize];
    private readonly object _lock = new(); // Monitor: the output thread waits on it
    private int _head, _count;
    private bool _refused;      // a writer was turned away: tell it when there is room
    private bool _completed;
    private Action[] _spaceAvailable = []; // copy-on-write: the output thread reads it without the lock
    private readonly Stream? _output;
    private readonly Thread? _outputThread;
    private Thread? _inputThread;
    private volatile bool _stopping;

    /// <param name="output">Where guest output goes; null discards it.</param>
    public SerialConsole(Stream? output)
    {
        _output = output;
        if (output is not null)
        {
            _outputThread = new Thread(CopyOutput) { IsBackground = true, Name = "serial-out" };
            SeccompThreads.Start(_outputThread);
        }
    }

    /// <summary>True once the output stream failed (e.g. stdout closed); guest output is discarded from then on
    /// so the guest keeps running.</summary>
    public bool OutputFailed { get; private set; }

    public void AddSpaceAvailableCallback(Action callback)
    {
        lock (_lock)
            _spaceAvailable = [.. _spaceAvailable, callback];
    }

    public bool TryWrite(byte value)
    {
        if (_output is null || OutputFailed)
            return true; // discarded
        lock (_lock)
        {
            if (_count == _ring.Length || _completed)
            {
                _refused = true;
                return false;
            }
            _ring[(_head + _count) % _ring.Length] = value;
            if (_count++ == 0)
                Monitor.Pulse(_lock); // the output thread waits only when the ring is empty
            return true;
        }
    }

    public int TryWrite(ReadOnlySpan<byte> data)
    {
        if (_output is null || OutputFailed)
            return data.Length; // discarded
        lock (_lock)
        {
            int n = Math.Min(data.Length, _completed ? 0 : _ring.Length - _count);
            if (n < data.Length)
                _refused = true;
            if (n == 0)
                return 0;
            int tail = (_head + _count) % _ring.Length;
            int first = Math.Min(n, _ring.Length - tail);
            data[..first].CopyTo(_ring.AsSpan(tail));
            data[first..n].CopyTo(_ring);
            if (_count == 0)
                Monitor.Pulse(_lock);
            _count += n;
            return n;
        }
    }

    private void CopyOutput()
    {
        Seccomp.Enter(SeccompRole.Console);
        var chunk = new byte[64 * 1024];
        while (true)
        {
            int n;
            lock (_lock)
            {
                while (_count == 0 && !_completed)
                    Monitor.Wait(_lock);
                if (_count == 0)
                    return; // completed and drained
                n = Math.Min(_count, Math.Min(chunk.Length, _ring.Length - _head));
                _ring.AsSpan(_head, n).CopyTo(chunk);
            }
            if (!OutputFailed)
            {
                try
                {
                    _output!.Write(chunk, 0, n);
                    _output.Flush();
                }
                catch (Exception e) when (e is IOException or ObjectDisposedException or NotSupportedException)
                {
                    OutputFailed = true; // a closed pipe or a full disk must not take the VM down
                }
            }
            bool notify;
            lock (_lock)
            {
                _head = (_head + n) % _ring.Length;
                _count -= n;
                notify = _refused;
                _refused = false;
            }
            if (notify)
            {
                foreach (var callback in Volatile.Read(ref _spaceAvailable))
                    callback();
            }
        }
    }

    /// <summary>Starts feeding <paramref name="input"/> into <paramref name="target"/> (the UART or a virtio
    /// console) on a background thread. With <paramref name="onQuit"/>, the input is an interactive terminal:
    /// Ctrl-A x calls it.</summary>
    public void AttachInput(Stream input, IConsoleInput target, Action? onQuit = null)
    {
        _inputThread = new Thread(() => CopyInput(input, target, onQuit)) { IsBackground = true, Name = "serial-in" };
        SeccompThreads.Start(_inputThread);
    }

    /// <summary>Applies the Ctrl-A escape to <paramref name="input"/>, writing the bytes meant for the guest to
    /// <paramref name="output"/> (at least twice as long) and returning their count. <paramref name="escapePending"/>
    /// carries a Ctrl-A from one read to the next.</summary>
    public static int ApplyEscape(ReadOnlySpan<byte> input, Span<byte> output, ref bool escapePending, out bool quit)
    {
        quit = false;
        int n = 0;
        foreach (byte b in input)
        {
            if (escapePending)
            {
                escapePending = false;
                if (b == (byte)'x' || b == (byte)'X')
                {
                    quit = true;
                    return n;
                }
                output[n++] = EscapeKey;
                if (b != EscapeKey)
                    output[n++] = b;
            }
            else if (b == EscapeKey)
            {
                escapePending = true;
            }
            else
            {
                output[n++] = b;
            }
        }
        return n;
    }

    private void CopyInput(Stream input, IConsoleInput target, Action? onQuit)
    {
        Seccomp.Enter(SeccompRole.Console);
        var reader = PipeReader.Create(new SynchronousReads(input), new StreamPipeReaderOptions(bufferSize: 4096, leaveOpen: true));
        var translated = new byte[2 * 4096];
        bool escapePending = false;
        try
        {
            while (!_stopping)
            {
                ReadResult result = reader.ReadAsync().AsTask().GetAwaiter().GetResult();
                var buffer = result.Buffer;
                // Hand over at most one segment at a time; what the device's queue does not take stays unconsumed.
                var first = buffer.First.Span;
                int taken;
                if (onQuit is null)
                {
                    taken = first.IsEmpty ? 0 : target.EnqueueInput(first);
                }
                else
                {
                    // Terminal input arrives a few keys at a time; escape-translate the whole segment, then wait
                    // for the device to take all of it before reading on.
                    int n = ApplyEscape(first, translated, ref escapePending, out bool quit);
                    int done = 0;
                    while (done < n && !_stopping)
                    {
                        done += target.EnqueueInput(translated.AsSpan(done, n - done));
                        if (done < n)
                            Thread.Sleep(5);
                    }
                    if (quit)
                    {
                        if (!_stopping)
                            onQuit();
                        return;
                    }
                    taken = first.Length;
                }
                // Consumed = examined: the rest is offered again at once, not only when more input arrives.
                reader.AdvanceTo(buffer.GetPosition(taken));
                if (result.IsCompleted && taken == buffer.Length)
                    return; // end of input
                if (taken < first.Length)
                    Thread.Sleep(5); // the guest has not drained the device's queue yet
            }
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException)
        {
            // stdin closed or unreadable: the guest simply gets no more input.
        }
        finally
        {
            reader.Complete();
        }
    }

    /// <summary>Stops handing input to the guest (the input thread may stay blocked in a read; it exits on
    /// its next wake-up without touching the VM).</summary>
    public void StopInput() => _stopping = true;

    /// <summary>Writes out everything the guest sent and stops the output thread.</summary>
    public void Dispose()
    {
        _stopping = true;
        lock (_lock)
        {
            _completed = true;
            Monitor.PulseAll(_lock);
        }
        _outputThread?.Join();
    }

    /// <summary>Reads on the calling thread: Stream's default ReadAsync (stdin's console stream, a pipe) runs the read
    /// on the thread pool, which may have to start a worker — and the input thread's seccomp filter refuses that, so
    /// the read would wait for a worker (see <see cref="SeccompThreads.Post"/>). The input thread only waits for input anyway.</summary>
    private sealed class SynchronousReads(Stream inner) : Stream
    {
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => inner.Read(buffer, offset, count);
        public override int Read(Span<byte> buffer) => inner.Read(buffer);
        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) =>
            ValueTask.FromResult(inner.Read(buffer.Span));
        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            Task.FromResult(inner.Read(buffer, offset, count));
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }
}
