using System.IO.Pipelines;

namespace Vmm.Devices.Legacy;

/// <summary>Connects a UART to host byte streams. Output: the UART writes into a <see cref="Pipe"/> whose
/// reader runs on a dedicated thread copying to the output stream, so a vCPU never waits on a slow
/// terminal or file (unless the pipe is more than <see cref="PauseThreshold"/> behind). Both pipe schedulers
/// are inline: waking the reader sets an event instead of queueing a thread-pool item, so the vCPU's
/// transmit path allocates nothing. Input: a thread reads the input stream and feeds the UART with flow
/// control.</summary>
public sealed class SerialConsole : IDisposable
{
    public const long PauseThreshold = 1 << 20;

    private readonly Pipe _pipe = new(new PipeOptions(
        pauseWriterThreshold: PauseThreshold, resumeWriterThreshold: PauseThreshold / 2,
        readerScheduler: PipeScheduler.Inline, writerScheduler: PipeScheduler.Inline, useSynchronizationContext: false));
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
            _outputThread.Start();
        }
    }

    /// <summary>What the UART transmits into.</summary>
    public PipeWriter Writer => _pipe.Writer;

    /// <summary>The console escape key, Ctrl-A, as in QEMU: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A.</summary>
    public const byte EscapeKey = 0x01;

    /// <summary>Starts feeding <paramref name="input"/> into <paramref name="uart"/> on a background thread.
    /// With <paramref name="onQuit"/>, the input is an interactive terminal: Ctrl-A x calls it.</summary>
    public void AttachInput(Stream input, Serial16550 uart, Action? onQuit = null)
    {
        _inputThread = new Thread(() => CopyInput(input, uart, onQuit)) { IsBackground = true, Name = "serial-in" };
        _inputThread.Start();
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

    /// <summary>True once the output stream failed (e.g. stdout closed); guest output is discarded from then on
    /// so the guest keeps running.</summary>
    public bool OutputFailed { get; private set; }

    private void CopyOutput()
    {
        var reader = _pipe.Reader;
        while (true)
        {
            ReadResult result = reader.ReadAsync().AsTask().GetAwaiter().GetResult();
            if (!OutputFailed && !result.Buffer.IsEmpty)
            {
                try
                {
                    foreach (var segment in result.Buffer)
                        _output!.Write(segment.Span);
                    _output!.Flush();
                }
                catch (Exception e) when (e is IOException or ObjectDisposedException or NotSupportedException)
                {
                    OutputFailed = true; // a closed pipe or full disk must not take the VM down
                }
            }
            reader.AdvanceTo(result.Buffer.End);
            if (result.IsCompleted)
                break;
        }
        reader.Complete();
    }

    private void CopyInput(Stream input, Serial16550 uart, Action? onQuit)
    {
        var raw = new byte[256];
        var buffer = new byte[512]; // an escape plus another key can become two bytes
        bool escapePending = false;
        try
        {
            while (!_stopping)
            {
                int n = input.Read(raw, 0, raw.Length);
                if (n <= 0)
                    return;
                raw.AsSpan(0, n).CopyTo(buffer);
                if (onQuit is not null)
                {
                    n = ApplyEscape(raw.AsSpan(0, n), buffer, ref escapePending, out bool quit);
                    if (quit)
                    {
                        uart.EnqueueInput(buffer.AsSpan(0, n));
                        onQuit();
                        return;
                    }
                }
                int done = 0;
                while (done < n && !_stopping)
                {
                    done += uart.EnqueueInput(buffer.AsSpan(done, n - done));
                    if (done < n)
                        Thread.Sleep(5); // the guest has not drained the queue yet
                }
            }
        }
        catch (IOException)
        {
            // stdin closed or unreadable: the guest simply gets no more input.
        }
        catch (ObjectDisposedException)
        {
        }
    }

    /// <summary>Flushes everything the guest wrote and stops the output thread.</summary>
    public void Dispose()
    {
        _stopping = true;
        _pipe.Writer.Complete();
        _outputThread?.Join();
    }
}
