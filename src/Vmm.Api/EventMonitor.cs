using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.Json;
using Microsoft.Win32.SafeHandles;
using Vmm.Interop.Seccomp;
using Vmm.Machine;

namespace Vmm.Api;

/// <summary>`--event-monitor path=FILE|fd=N`: every lifecycle event as Cloud Hypervisor writes it — a pretty-printed
/// JSON object {timestamp {secs, nanos} since the monitor started, source, event, properties} followed by a blank line.
/// Events go through a bounded queue to a writer thread, so a slow reader (or a FIFO nobody reads) never blocks the
/// VM or the API: past <see cref="QueueLimit"/> waiting events new ones are dropped and counted, and the writer says
/// so once.</summary>
public sealed class EventMonitor : IVmEventSink, IDisposable
{
    public const int QueueLimit = 4096;

    private readonly BlockingCollection<byte[]> _queue = new(QueueLimit);
    private readonly Func<Stream> _open;
    private readonly Log _log;
    private readonly Thread _writer;
    private readonly long _start = Stopwatch.GetTimestamp();
    private long _dropped;

    private EventMonitor(Func<Stream> open, Log log)
    {
        _open = open;
        _log = log;
        _writer = new Thread(WriteLoop) { Name = "event-monitor", IsBackground = true };
        SeccompThreads.Start(_writer);
    }

    /// <summary>Parses CH's forms: <c>path=FILE</c> (created or truncated) or <c>fd=N</c> (an open file, pipe or FIFO).</summary>
    public static EventMonitor Open(string spec, Log log)
    {
        if (spec.StartsWith("fd=", StringComparison.Ordinal))
        {
            if (!int.TryParse(spec.AsSpan(3), out int fd) || fd < 0)
                throw new ConfigException($"--event-monitor {spec}: fd must be a file descriptor number");
            if (!File.Exists($"/proc/self/fd/{fd}"))
                throw new ConfigException($"--event-monitor {spec}: fd {fd} is not open");
            return new EventMonitor(() => new FileStream(new SafeFileHandle(fd, ownsHandle: true), FileAccess.Write, 1), log);
        }
        string path = spec.StartsWith("path=", StringComparison.Ordinal) ? spec[5..] : spec;
        if (path.Length == 0)
            throw new ConfigException("--event-monitor: path or fd required (path=FILE or fd=N)");
        string? dir = Path.GetDirectoryName(Path.GetFullPath(path));
        if (dir is not null && !Directory.Exists(dir))
            throw new ConfigException($"--event-monitor {spec}: directory {dir} does not exist");
        if (Directory.Exists(path))
            throw new ConfigException($"--event-monitor {spec}: {path} is a directory");
        // Opened on the writer thread: opening a FIFO for writing waits for a reader, and nobody else may wait for it.
        return new EventMonitor(() => new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.ReadWrite, 1), log);
    }

    /// <summary>Events not written because the queue was full.</summary>
    public long Dropped => Interlocked.Read(ref _dropped);

    public void Emit(string source, string name, IReadOnlyDictionary<string, string>? properties = null)
    {
        var elapsed = Stopwatch.GetElapsedTime(_start);
        var buffer = new System.Buffers.ArrayBufferWriter<byte>(256);
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true }))
        {
            w.WriteStartObject();
            w.WriteStartObject("timestamp");
            w.WriteNumber("secs", (ulong)(elapsed.Ticks / TimeSpan.TicksPerSecond));
            w.WriteNumber("nanos", (uint)(elapsed.Ticks % TimeSpan.TicksPerSecond * 100));
            w.WriteEndObject();
            w.WriteString("source", source);
            w.WriteString("event", name);
            if (properties is null)
                w.WriteNull("properties");
            else
            {
                w.WriteStartObject("properties");
                foreach (var (k, v) in properties)
                    w.WriteString(k, v);
                w.WriteEndObject();
            }
            w.WriteEndObject();
        }
        System.Buffers.BuffersExtensions.Write(buffer, "\n\n"u8);
        if (!_queue.IsAddingCompleted && !_queue.TryAdd(buffer.WrittenSpan.ToArray()))
            Interlocked.Increment(ref _dropped);
    }

    private void WriteLoop()
    {
        Stream? stream = null;
        bool warnedDrop = false;
        try
        {
            stream = _open();
            Seccomp.Enter(SeccompRole.Api); // the file is open: from here on only writes
            foreach (var e in _queue.GetConsumingEnumerable())
            {
                stream.Write(e);
                stream.Flush();
                if (!warnedDrop && Dropped > 0)
                {
                    warnedDrop = true;
                    _log.Warn($"event monitor: the reader is too slow; {Dropped} events were dropped");
                }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _log.Warn($"event monitor: {e.Message}; no more events are written");
            while (_queue.TryTake(out _))
            {
            }
        }
        finally
        {
            stream?.Dispose();
        }
    }

    /// <summary>Writes what is queued (waiting at most a second for a reader) and closes the file.</summary>
    public void Dispose()
    {
        _queue.CompleteAdding();
        _writer.Join(TimeSpan.FromSeconds(1));
    }
}
