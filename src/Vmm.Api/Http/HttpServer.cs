using Vmm.Interop;
using System.Collections.Concurrent;
using System.Net.Sockets;

namespace Vmm.Api.Http;

/// <summary>A small strict HTTP/1.1 server on a unix socket, for the Cloud-Hypervisor-compatible REST API. One async
/// loop per connection (no thread per connection), requests on a connection answered in order, keep-alive by default.
/// Anything it does not understand is refused with a 4xx/5xx and the connection closed: the API needs only
/// Content-Length bodies, so a request that could be framed two ways (chunked, two lengths) is never guessed at.</summary>
public sealed class HttpServer : IAsyncDisposable, IDisposable
{
    private readonly Socket _listener;
    private readonly IHttpHandler _handler;
    private readonly Action<string>? _log;
    private readonly (ulong Device, ulong Inode)? _file; // the socket file this server created (removed on dispose)
    private readonly CancellationTokenSource _stop = new();
    private readonly ConcurrentDictionary<HttpConnection, byte> _connections = new();
    private readonly object _disposeLock = new();
    private Task _acceptLoop = Task.CompletedTask;
    private Task? _disposal;
    private int _served;   // connections counted against MaxConnections

    // How long dispose lets connections finish a response already being produced before it closes their sockets.
    private static readonly TimeSpan ShutdownGrace = TimeSpan.FromSeconds(1);

    internal HttpServerLimits Limits { get; }

    /// <summary>The socket file's path (for <see cref="FromListeningFd"/>: the bound path if it has one).</summary>
    public string? Path { get; }

    private HttpServer(Socket listener, string? path, (ulong, ulong)? file, IHttpHandler handler, HttpServerLimits limits, Action<string>? log)
    {
        _listener = listener;
        Path = path;
        _file = file;
        _handler = handler;
        Limits = limits;
        _log = log;
    }

    /// <summary>Serves on a new socket file at <paramref name="path"/> (mode 0600). A stale socket file (nobody
    /// accepts on it) is replaced; a live one, or anything that is not a socket, is an
    /// <see cref="ApiSocketException"/>. The file appears only once connections are accepted.</summary>
    public static HttpServer Listen(string path, IHttpHandler handler, HttpServerLimits? limits = null, Action<string>? log = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(handler);
        limits ??= new HttpServerLimits();
        limits.Validate();
        if (SocketFile.ByteCount(path) > SocketFile.MaxPathBytes)
            throw new ApiSocketException($"{path}: a unix socket path is at most {SocketFile.MaxPathBytes} bytes");

        RemoveStale(path, probe: true);
        // Bound under a temporary name and renamed once it accepts, so whoever waits for the file can connect at
        // once; chmod before listen, so the socket never accepts anyone while it still has umask's mode.
        string temporary = path + ".tmp-" + Environment.ProcessId;
        string bound = SocketFile.ByteCount(temporary) <= SocketFile.MaxPathBytes ? temporary : path;
        if (bound != path)
            RemoveStale(bound, probe: false);

        Socket listener = Bind(bound);
        HttpServer? server = null;
        try
        {
            if (!OperatingSystem.IsLinux())
                throw new PlatformNotSupportedException("vmm runs on Linux");
            File.SetUnixFileMode(bound, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            listener.Listen(Backlog(limits));
            Stat(bound, out var identity);
            server = new HttpServer(listener, path, identity, handler, limits, log);
            server.Start();
            if (bound != path)
                File.Move(bound, path, overwrite: true);
            return server;
        }
        catch (Exception e)
        {
            if (server is not null)
                server.Dispose(); // removes the file (under either name) as it is ours
            else
                listener.Dispose();
            TryDelete(bound);
            if (e is ApiSocketException)
                throw;
            throw new ApiSocketException($"{path}: cannot listen: {e.Message}");
        }
    }

    /// <summary>Serves on an already bound AF_UNIX socket (Cloud Hypervisor's <c>--api-socket fd=N</c>); the server
    /// owns the descriptor from now on, and removes no file on dispose.</summary>
    public static HttpServer FromListeningFd(int fd, IHttpHandler handler, HttpServerLimits? limits = null, Action<string>? log = null)
    {
        ArgumentNullException.ThrowIfNull(handler);
        limits ??= new HttpServerLimits();
        limits.Validate();
        Socket listener;
        try
        {
            listener = new Socket(new SafeSocketHandle(fd, ownsHandle: true));
        }
        catch (Exception e)
        {
            throw new ApiSocketException($"fd {fd}: not a usable socket: {e.Message}");
        }
        try
        {
            if (listener.AddressFamily != AddressFamily.Unix || listener.SocketType != SocketType.Stream)
                throw new ApiSocketException($"fd {fd}: not an AF_UNIX stream socket ({listener.AddressFamily}, {listener.SocketType})");
            // listen() on a listening socket only updates its backlog, so it is called either way.
            listener.Listen(Backlog(limits));
            string? path = (listener.LocalEndPoint as UnixDomainSocketEndPoint)?.ToString();
            var server = new HttpServer(listener, string.IsNullOrEmpty(path) ? null : path, null, handler, limits, log);
            server.Start();
            return server;
        }
        catch (Exception e)
        {
            listener.Dispose();
            if (e is ApiSocketException)
                throw;
            throw new ApiSocketException($"fd {fd}: cannot listen: {e.Message}");
        }
    }

    // Room for every allowed connection plus those that will be refused with 503; the kernel caps it at somaxconn.
    private static int Backlog(HttpServerLimits limits) => Math.Max(128, Math.Min(limits.MaxConnections * 2, 4096));

    private static void RemoveStale(string path, bool probe)
    {
        switch (Stat(path, out _))
        {
            case SocketFile.Kind.Missing:
                if (HostFile.NoDirectoryFor(path) is string why)
                    throw new ApiSocketException($"{path}: {why}");
                return;
            case SocketFile.Kind.Other:
                throw new ApiSocketException($"{path}: exists and is not a socket (not replacing it)");
        }
        if (probe && IsLive(path))
            throw new ApiSocketException($"{path}: another process is already serving this socket");
        TryDelete(path);
    }

    private static bool IsLive(string path)
    {
        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        // Non-blocking: a live server with a full backlog answers EAGAIN at once instead of blocking us.
        probe.Blocking = false;
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
            return true;
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.WouldBlock or SocketError.TryAgain or SocketError.InProgress)
        {
            return true;
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionRefused)
        {
            return false;
        }
        catch (SocketException e)
        {
            throw new ApiSocketException($"{path}: cannot tell whether another process serves this socket: {e.Message}");
        }
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    private void Start() => _acceptLoop = Task.Run(AcceptLoopAsync);

    private async Task AcceptLoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await _listener.AcceptAsync(_stop.Token).ConfigureAwait(false);
            }
            catch (Exception) when (_stop.IsCancellationRequested)
            {
                break;
            }
            catch (ObjectDisposedException)
            {
                break;
            }
            catch (Exception e)
            {
                // EMFILE and the like: keep serving those already connected and try again shortly.
                Log($"accept failed: {e.Message}");
                try
                {
                    await Task.Delay(100, _stop.Token).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    break;
                }
                continue;
            }
            try
            {
                bool refuse = Interlocked.Increment(ref _served) > Limits.MaxConnections;
                if (refuse)
                    Interlocked.Decrement(ref _served);
                var connection = new HttpConnection(this, client, _handler, _stop.Token);
                _connections.TryAdd(connection, 0);
                // On the thread pool, so that a request already buffered never runs the handler on this loop.
                _ = Task.Run(() => RunConnectionAsync(connection, refuse));
            }
            catch (Exception e)
            {
                Log($"cannot start a connection: {e.Message}");
                client.Dispose();
            }
        }
    }

    private async Task RunConnectionAsync(HttpConnection connection, bool refuse)
    {
        try
        {
            if (refuse)
                await connection.RefuseAsync($"too many connections (at most {Limits.MaxConnections})").ConfigureAwait(false);
            else
                await connection.RunAsync().ConfigureAwait(false);
        }
        catch (Exception e)
        {
            Log($"connection failed: {e.Message}"); // RunAsync catches everything; this is a last line of defence
        }
        finally
        {
            connection.Finish();
            _connections.TryRemove(connection, out _);
            if (!refuse)
                Interlocked.Decrement(ref _served);
        }
    }

    internal void Log(string message)
    {
        if (_log is null || _stop.IsCancellationRequested)
            return;
        try
        {
            _log("api: " + message);
        }
        catch (Exception)
        {
            // A broken logger must not take the server down.
        }
    }

    /// <summary>Stops accepting, ends every connection, removes the socket file if it is still this server's (same
    /// inode), and waits for every loop to end. Handlers' tokens are cancelled; a response a handler still returns
    /// is sent (with Connection: close) if that takes under a second, then every socket is closed. Called from
    /// within a handler, it does not wait for that handler's own connection.</summary>
    /// <summary>SocketFile's calls, with their failures as <see cref="ApiSocketException"/>s (a start-up error).</summary>
    private static SocketFile.Kind Stat(string path, out (ulong Device, ulong Inode) identity)
    {
        try
        {
            return SocketFile.Stat(path, out identity);
        }
        catch (SyscallException e)
        {
            throw new ApiSocketException($"{path}: cannot stat: {Errno.Describe(e.ErrorNumber)}");
        }
    }

    private static Socket Bind(string path)
    {
        try
        {
            return new Socket(new SafeSocketHandle(SocketFile.Bind(path), ownsHandle: true));
        }
        catch (ArgumentException e)
        {
            throw new ApiSocketException(e.Message.Split(" (Parameter")[0]);
        }
        catch (SyscallException e)
        {
            throw new ApiSocketException($"{path}: cannot {e.Call}: {Errno.Describe(e.ErrorNumber)}");
        }
    }

    public ValueTask DisposeAsync()
    {
        lock (_disposeLock)
            _disposal ??= DisposeCoreAsync(HttpConnection.Current.Value);
        return new ValueTask(_disposal);
    }

    public void Dispose() => DisposeAsync().AsTask().GetAwaiter().GetResult();

    private async Task DisposeCoreAsync(HttpConnection? caller)
    {
        _stop.Cancel(); // idle and reading connections end at once; handlers see their token cancelled
        _listener.Dispose();
        if (_file is { } ours && Path is not null)
        {
            foreach (string name in new[] { Path, Path + ".tmp-" + Environment.ProcessId })
            {
                try
                {
                    if (Stat(name, out var identity) == SocketFile.Kind.Socket && identity == ours)
                        TryDelete(name);
                }
                catch (ApiSocketException)
                {
                }
            }
        }
        await _acceptLoop.ConfigureAwait(false); // after it, no connection is added
        var connections = _connections.Keys.Where(c => c != caller).ToArray();
        var all = Task.WhenAll(connections.Select(c => c.Completion));
        if (await Task.WhenAny(all, Task.Delay(ShutdownGrace)).ConfigureAwait(false) != all)
            foreach (var connection in connections)
                connection.Close(); // a response still being written to a client that does not read
        await all.ConfigureAwait(false);
    }
}
