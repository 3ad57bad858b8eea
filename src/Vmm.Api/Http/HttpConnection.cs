using System.Net.Sockets;
using System.Text;

namespace Vmm.Api.Http;

/// <summary>One client connection: read a request, call the handler, write the response, repeat while keep-alive.
/// Protocol errors are answered (HttpServer's table of statuses) and end the connection, since after a framing error
/// nobody knows where the next request would start.</summary>
internal sealed class HttpConnection
{
    private const int InitialBufferBytes = 4096;

    // After an error response the server shuts its side and reads what the client still sends, for a moment, before
    // closing: closing an AF_UNIX socket with unread data makes the client's next read fail with ECONNRESET.
    private static readonly TimeSpan LingerTime = TimeSpan.FromMilliseconds(500);
    private const int LingerBytes = 1024 * 1024;

    private readonly HttpServer _server;
    private readonly HttpServerLimits _limits;
    private readonly Socket _socket;
    private readonly IHttpHandler _handler;
    private readonly CancellationToken _shutdown;
    private readonly int _capacity;
    private CancellationTokenSource _timer; // the current read phase's deadline, linked to the server's shutdown
    // Writes have their own deadline, not linked to the shutdown: a response the handler produced is still sent
    // when the server stops meanwhile (vmm.shutdown answers, then the server goes); the server's dispose closes
    // the socket if that takes too long.
    private CancellationTokenSource _writeTimer = new();
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private string _phase = "request head";
    private TimeSpan _phaseTimeout;
    private byte[] _buffer;
    private int _start, _end; // unconsumed received bytes: _buffer[_start.._end)
    private int _closed;

    public HttpConnection(HttpServer server, Socket socket, IHttpHandler handler, CancellationToken shutdown)
    {
        _server = server;
        _limits = server.Limits;
        _socket = socket;
        _handler = handler;
        _shutdown = shutdown;
        // One line at a time is kept: the longest allowed line, its CRLF, and a little room.
        _capacity = Math.Max(_limits.MaxRequestLineBytes, _limits.MaxHeaderBytes) + 16;
        _buffer = new byte[Math.Min(InitialBufferBytes, _capacity)];
        _timer = CancellationTokenSource.CreateLinkedTokenSource(shutdown);
        // The first request's head counts from the accept: a client that connects and sends nothing costs a slot
        // for HeaderTimeout, not IdleTimeout.
        Arm(_limits.HeaderTimeout, "request head");
    }

    /// <summary>The connection whose handler call the current async flow is in (a handler that disposes the server
    /// must not wait for itself).</summary>
    public static readonly AsyncLocal<HttpConnection?> Current = new();

    public HttpServer Server => _server;

    /// <summary>Completes once the connection's loop has ended and its socket is closed.</summary>
    public Task Completion => _completion.Task;

    /// <summary>Closes the socket (from the connection's own loop, or from the server's dispose).</summary>
    public void Close()
    {
        if (Interlocked.Exchange(ref _closed, 1) == 0)
            _socket.Dispose();
    }

    /// <summary>Closes the socket and completes <see cref="Completion"/> (the end of the connection's task).</summary>
    public void Finish()
    {
        Close();
        _completion.TrySetResult();
    }

    /// <summary>Serves requests until the client closes, an error, a timeout, or the server's shutdown. Never throws.</summary>
    public async Task RunAsync()
    {
        try
        {
            await ServeAsync().ConfigureAwait(false);
        }
        catch (Exception) when (_shutdown.IsCancellationRequested)
        {
        }
        catch (ClientGoneException e)
        {
            if (!e.Quiet)
                _server.Log(e.Message); // the one line for a client that went away
        }
        catch (Exception e)
        {
            _server.Log($"connection failed: {e.GetType().Name}: {e.Message}");
        }
        finally
        {
            _timer.Dispose();
            _writeTimer.Dispose();
        }
    }

    /// <summary>Answers 503 without reading a request (the server is at MaxConnections). Never throws.</summary>
    public async Task RefuseAsync(string message)
    {
        try
        {
            await FailAsync(503, message).ConfigureAwait(false);
        }
        catch (Exception)
        {
            // Refused anyway; nothing to tell.
        }
        finally
        {
            _timer.Dispose();
            _writeTimer.Dispose();
        }
    }

    private async Task ServeAsync()
    {
        for (bool first = true; ; first = false)
        {
            if (!first)
            {
                if (_start == _end)
                {
                    Arm(_limits.IdleTimeout, "next request");
                    // Closed or idle between requests: the normal end of a keep-alive connection, said silently
                    // (RFC 9112 section 9.8 lets a server close an idle connection at any time).
                    _start = _end = 0;
                    int n = await ReceiveAsync(_buffer).ConfigureAwait(false);
                    if (n <= 0)
                        return;
                    _end = n;
                }
                Arm(_limits.HeaderTimeout, "request head");
            }

            HttpRequest request;
            bool keepAlive;
            try
            {
                (request, keepAlive) = await ReadRequestAsync(first).ConfigureAwait(false);
            }
            catch (HttpErrorException e)
            {
                await FailAsync(e.Status, e.Message).ConfigureAwait(false);
                return;
            }

            Disarm();
            HttpResponse response = await CallHandlerAsync(request).ConfigureAwait(false);
            keepAlive &= !_shutdown.IsCancellationRequested;
            await WriteAsync(response, keepAlive, request.Version == "HTTP/1.1", request.Method == "HEAD").ConfigureAwait(false);
            response.AfterSent?.Invoke();
            if (!keepAlive)
            {
                await LingerAsync().ConfigureAwait(false);
                return;
            }
        }
    }

    private async ValueTask<(HttpRequest Request, bool KeepAlive)> ReadRequestAsync(bool first)
    {
        // The request line.
        var (start, length, _) = await ReadLineAsync(_limits.MaxRequestLineBytes, first).ConfigureAwait(false)
            ?? throw new HttpErrorException(414, $"request line longer than {_limits.MaxRequestLineBytes} bytes");
        var (method, target, version) = ParseRequestLine(_buffer.AsSpan(start, length));

        // The header fields, up to the empty line.
        var headers = new List<KeyValuePair<string, string>>();
        int headerBytes = 0;
        while (true)
        {
            var line = await ReadLineAsync(_limits.MaxHeaderBytes - headerBytes, false).ConfigureAwait(false)
                ?? throw new HttpErrorException(431, $"header section longer than {_limits.MaxHeaderBytes} bytes");
            if (line.Length == 0)
                break;
            headerBytes += line.Consumed;
            if (headerBytes > _limits.MaxHeaderBytes)
                throw new HttpErrorException(431, $"header section longer than {_limits.MaxHeaderBytes} bytes");
            if (headers.Count == _limits.MaxHeaders)
                throw new HttpErrorException(431, $"more than {_limits.MaxHeaders} header fields");
            headers.Add(ParseHeaderLine(_buffer.AsSpan(line.Start, line.Length)));
        }

        // What the headers mean for the framing and the connection.
        long? contentLength = null;
        bool close = false, keepAliveAsked = false, expectContinue = false;
        foreach (var (name, value) in headers)
        {
            if (name.Equals("Transfer-Encoding", StringComparison.OrdinalIgnoreCase))
                throw new HttpErrorException(501, "Transfer-Encoding is not supported: send Content-Length");
            if (name.Equals("Content-Length", StringComparison.OrdinalIgnoreCase))
            {
                long parsed = ParseContentLength(value);
                if (contentLength is { } earlier && earlier != parsed)
                    throw new HttpErrorException(400, "conflicting Content-Length values");
                contentLength = parsed;
            }
            else if (name.Equals("Connection", StringComparison.OrdinalIgnoreCase))
            {
                foreach (string option in value.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
                {
                    close |= option.Equals("close", StringComparison.OrdinalIgnoreCase);
                    keepAliveAsked |= option.Equals("keep-alive", StringComparison.OrdinalIgnoreCase);
                }
            }
            else if (name.Equals("Expect", StringComparison.OrdinalIgnoreCase))
            {
                if (!value.Equals("100-continue", StringComparison.OrdinalIgnoreCase))
                    throw new HttpErrorException(417, $"unsupported expectation '{Shorten(value)}'");
                expectContinue = true;
            }
        }
        bool http11 = version == "HTTP/1.1";
        bool keepAlive = http11 ? !close : keepAliveAsked && !close;
        long bodyLength = contentLength ?? 0;
        if (bodyLength > _limits.MaxBodyBytes)
            throw new HttpErrorException(413, $"request body of {(bodyLength == long.MaxValue ? "too many" : bodyLength.ToString())} bytes exceeds the limit of {_limits.MaxBodyBytes} bytes");

        byte[] body = await ReadBodyAsync((int)bodyLength, expectContinue && http11).ConfigureAwait(false);
        int question = target.IndexOf('?');
        var request = new HttpRequest
        {
            Method = method,
            Path = question < 0 ? target : target[..question],
            Query = question < 0 ? null : target[(question + 1)..],
            Version = version,
            Headers = headers,
            Body = body,
        };
        return (request, keepAlive);
    }

    private async ValueTask<byte[]> ReadBodyAsync(int length, bool expectContinue)
    {
        if (length == 0)
            return [];
        byte[] body = new byte[length];
        int have = Math.Min(length, _end - _start);
        _buffer.AsSpan(_start, have).CopyTo(body);
        _start += have;
        if (have < length)
        {
            // The client waits for this before sending the body (RFC 9110 section 10.1.1); it would give up
            // waiting after a while, but the answer is known now.
            if (expectContinue)
                await SendAsync("HTTP/1.1 100 Continue\r\n\r\n"u8.ToArray()).ConfigureAwait(false);
            Arm(_limits.BodyTimeout, "request body");
            while (have < length)
            {
                int n = await ReceiveAsync(body.AsMemory(have)).ConfigureAwait(false);
                if (n == 0)
                    throw new ClientGoneException("client closed the connection mid-request");
                if (n < 0)
                    throw new HttpErrorException(408, $"request body not received within {Describe(_phaseTimeout)}");
                have += n;
            }
        }
        return body;
    }

    /// <summary>The next line (without its CRLF or LF) as a range of <see cref="_buffer"/>, valid until the next
    /// read, and the bytes it took with its line end; <see cref="_start"/> moves past it. Null when the line is
    /// longer than <paramref name="maxLength"/>.</summary>
    private async ValueTask<(int Start, int Length, int Consumed)?> ReadLineAsync(int maxLength, bool mayCloseCleanly)
    {
        int scanned = 0;
        while (true)
        {
            int lf = _buffer.AsSpan(_start + scanned, _end - _start - scanned).IndexOf((byte)'\n');
            if (lf >= 0)
            {
                int start = _start, end = _start + scanned + lf;
                int length = end - start;
                if (length > 0 && _buffer[end - 1] == '\r')
                    length--;
                if (length > maxLength)
                    return null;
                _start = end + 1;
                return (start, length, end + 1 - start);
            }
            scanned = _end - _start;
            if (scanned > maxLength + 1) // + 1: a trailing CR whose LF is still to come
                return null;
            // (scanned stays valid: FillAsync moves the unconsumed bytes and _start together.)
            await FillAsync(mayCloseCleanly && _start == _end).ConfigureAwait(false);
        }
    }

    /// <summary>Receives more bytes after <see cref="_end"/>, making room first.</summary>
    private async ValueTask FillAsync(bool nothingYet)
    {
        if (_start == _end)
            _start = _end = 0;
        if (_end == _buffer.Length)
        {
            if (_start > 0)
            {
                Buffer.BlockCopy(_buffer, _start, _buffer, 0, _end - _start);
                _end -= _start;
                _start = 0;
            }
            else if (_buffer.Length < _capacity)
            {
                Array.Resize(ref _buffer, Math.Min(_capacity, _buffer.Length * 2));
            }
            else
            {
                // Unreachable: ReadLineAsync's limit is below the capacity.
                throw new HttpErrorException(431, "request head too large");
            }
        }
        int n = await ReceiveAsync(_buffer.AsMemory(_end)).ConfigureAwait(false);
        if (n == 0)
            throw nothingYet ? new ClientGoneException(null) : new ClientGoneException("client closed the connection mid-request");
        if (n < 0)
            throw new HttpErrorException(408, $"{_phase} not received within {Describe(_phaseTimeout)}");
        _end += n;
    }

    /// <summary>Bytes received (0: the client closed or reset the connection; -1: the phase's deadline passed).
    /// Throws OperationCanceledException only for the server's shutdown.</summary>
    private async ValueTask<int> ReceiveAsync(Memory<byte> into)
    {
        try
        {
            return await _socket.ReceiveAsync(into, SocketFlags.None, _timer.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!_shutdown.IsCancellationRequested)
        {
            return -1;
        }
        catch (SocketException) when (!_shutdown.IsCancellationRequested)
        {
            return 0;
        }
    }

    private async ValueTask<HttpResponse> CallHandlerAsync(HttpRequest request)
    {
        Current.Value = this;
        try
        {
            HttpResponse? response = await _handler.HandleAsync(request, _shutdown).ConfigureAwait(false);
            return response ?? HttpResponse.Error(500, "internal error: the handler returned no response");
        }
        catch (Exception) when (_shutdown.IsCancellationRequested)
        {
            throw;
        }
        catch (Exception e)
        {
            _server.Log($"{request.Method} {request.Path}: handler failed: {e}");
            return HttpResponse.Error(500, "internal error: " + e.Message);
        }
        finally
        {
            Current.Value = null;
        }
    }

    /// <summary>Answers an error and closes (after lingering). Never throws for the client's sake.</summary>
    private async Task FailAsync(int status, string message)
    {
        _server.Log($"{status} {HttpResponse.ReasonPhrase(status)}: {message}");
        try
        {
            await WriteAsync(HttpResponse.Error(status, message), keepAlive: false, http11: true, headOnly: false).ConfigureAwait(false);
        }
        catch (ClientGoneException)
        {
            return;
        }
        await LingerAsync().ConfigureAwait(false);
    }

    private async ValueTask WriteAsync(HttpResponse response, bool keepAlive, bool http11, bool headOnly)
    {
        var head = new StringBuilder(160)
            .Append("HTTP/1.1 ").Append(response.Status).Append(' ').Append(HttpResponse.ReasonPhrase(response.Status)).Append("\r\n")
            .Append("Server: vmm\r\n");
        if (response.ContentType is { } type)
            head.Append("Content-Type: ").Append(type).Append("\r\n");
        head.Append("Content-Length: ").Append(response.Body.Length).Append("\r\n");
        if (!keepAlive)
            head.Append("Connection: close\r\n");
        else if (!http11)
            head.Append("Connection: keep-alive\r\n");
        head.Append("\r\n");

        string text = head.ToString(); // ASCII: the Content-Type was checked by HttpResponse
        int headBytes = Encoding.ASCII.GetByteCount(text);
        byte[] bytes = new byte[headBytes + (headOnly ? 0 : response.Body.Length)];
        Encoding.ASCII.GetBytes(text, bytes);
        if (!headOnly)
            response.Body.Span.CopyTo(bytes.AsSpan(headBytes));
        await SendAsync(bytes).ConfigureAwait(false);
    }

    private async ValueTask SendAsync(ReadOnlyMemory<byte> data)
    {
        if (!_writeTimer.TryReset())
        {
            _writeTimer.Dispose();
            _writeTimer = new CancellationTokenSource();
        }
        _writeTimer.CancelAfter(_limits.WriteTimeout);
        for (int sent = 0; sent < data.Length;)
        {
            try
            {
                sent += await _socket.SendAsync(data[sent..], SocketFlags.None, _writeTimer.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                throw new ClientGoneException($"client did not read the response within {Describe(_limits.WriteTimeout)}");
            }
            catch (SocketException e) when (!_shutdown.IsCancellationRequested)
            {
                throw new ClientGoneException($"client went away before the response was sent ({e.SocketErrorCode})");
            }
        }
        _writeTimer.TryReset();
    }

    private async ValueTask LingerAsync()
    {
        try
        {
            _socket.Shutdown(SocketShutdown.Send);
        }
        catch (SocketException)
        {
            return;
        }
        Arm(LingerTime, "linger");
        for (int drained = 0; drained < LingerBytes;)
        {
            int n = await ReceiveAsync(_buffer).ConfigureAwait(false);
            if (n <= 0)
                return;
            drained += n;
        }
    }

    /// <summary>Starts the deadline of the next phase (head, body, response, idle).</summary>
    private void Arm(TimeSpan timeout, string phase)
    {
        _phase = phase;
        _phaseTimeout = timeout;
        if (!_timer.TryReset())
        {
            // The last deadline fired (a 408 is then still to be sent) or the server stops.
            if (_shutdown.IsCancellationRequested)
                return;
            _timer.Dispose();
            _timer = CancellationTokenSource.CreateLinkedTokenSource(_shutdown);
        }
        _timer.CancelAfter(timeout);
    }

    private void Disarm()
    {
        if (!_timer.TryReset() && !_shutdown.IsCancellationRequested)
        {
            _timer.Dispose();
            _timer = CancellationTokenSource.CreateLinkedTokenSource(_shutdown);
        }
    }

    private static (string Method, string Target, string Version) ParseRequestLine(ReadOnlySpan<byte> line)
    {
        for (int i = 0; i < line.Length; i++)
        {
            byte b = line[i];
            if (b is < 0x20 or >= 0x7F)
                throw new HttpErrorException(400, $"malformed request line: byte 0x{b:x2} at offset {i} (only printable ASCII is allowed)");
        }
        int first = line.IndexOf((byte)' ');
        int second = first < 0 ? -1 : line[(first + 1)..].IndexOf((byte)' ');
        if (first <= 0 || second <= 0 || line[(first + 1 + second + 1)..].IndexOf((byte)' ') >= 0)
            throw new HttpErrorException(400, "malformed request line: expected 'METHOD SP TARGET SP HTTP/1.1'");
        var method = line[..first];
        var target = line.Slice(first + 1, second);
        var version = line[(first + 1 + second + 1)..];
        if (!IsToken(method))
            throw new HttpErrorException(400, "malformed request line: the method is not a token");
        if (target[0] != '/')
            throw new HttpErrorException(400, "malformed request line: the target must start with '/'");
        if (version.SequenceEqual("HTTP/1.1"u8) || version.SequenceEqual("HTTP/1.0"u8))
            return (Encoding.ASCII.GetString(method), Encoding.ASCII.GetString(target), Encoding.ASCII.GetString(version));
        if (version.Length == 8 && version.StartsWith("HTTP/"u8) && char.IsAsciiDigit((char)version[5]) && version[6] == '.' && char.IsAsciiDigit((char)version[7]))
            throw new HttpErrorException(505, $"{Encoding.ASCII.GetString(version)} is not supported: use HTTP/1.1");
        throw new HttpErrorException(400, "malformed request line: the version is not HTTP/1.x");
    }

    private static KeyValuePair<string, string> ParseHeaderLine(ReadOnlySpan<byte> line)
    {
        if (line[0] is (byte)' ' or (byte)'\t')
            throw new HttpErrorException(400, "malformed header line: obsolete line folding is not supported");
        int colon = line.IndexOf((byte)':');
        if (colon < 0)
            throw new HttpErrorException(400, "malformed header line: no colon");
        var name = line[..colon];
        if (name.Length == 0)
            throw new HttpErrorException(400, "malformed header line: empty field name");
        if (name[^1] is (byte)' ' or (byte)'\t')
            throw new HttpErrorException(400, "malformed header line: whitespace before the colon");
        if (!IsToken(name))
            throw new HttpErrorException(400, "malformed header line: the field name is not a token");
        var value = line[(colon + 1)..].Trim(" \t"u8);
        foreach (byte b in value)
        {
            if (b is (< 0x20 and not (byte)'\t') or 0x7F)
                throw new HttpErrorException(400, $"malformed header line: control byte 0x{b:x2} in the value of {Encoding.ASCII.GetString(name)}");
        }
        // obs-text (0x80-0xFF) is kept byte for byte.
        return new(Encoding.ASCII.GetString(name), Encoding.Latin1.GetString(value));
    }

    private static long ParseContentLength(string value)
    {
        if (value.Length == 0)
            throw new HttpErrorException(400, "invalid Content-Length: empty");
        long result = 0;
        foreach (char c in value)
        {
            if (!char.IsAsciiDigit(c))
                throw new HttpErrorException(400, $"invalid Content-Length '{Shorten(value)}': not a decimal number");
            // Saturates: anything this large is over the limit anyway.
            result = result > (long.MaxValue - 9) / 10 ? long.MaxValue : result * 10 + (c - '0');
        }
        return result;
    }

    // RFC 9110 section 5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
    private static bool IsToken(ReadOnlySpan<byte> text)
    {
        if (text.IsEmpty)
            return false;
        foreach (byte b in text)
        {
            bool ok = b is (>= (byte)'a' and <= (byte)'z') or (>= (byte)'A' and <= (byte)'Z') or (>= (byte)'0' and <= (byte)'9')
                or (byte)'!' or (byte)'#' or (byte)'$' or (byte)'%' or (byte)'&' or (byte)'\'' or (byte)'*' or (byte)'+'
                or (byte)'-' or (byte)'.' or (byte)'^' or (byte)'_' or (byte)'`' or (byte)'|' or (byte)'~';
            if (!ok)
                return false;
        }
        return true;
    }

    private static string Shorten(string value) => value.Length <= 40 ? value : value[..40] + "...";

    private static string Describe(TimeSpan timeout) =>
        timeout.TotalSeconds >= 1 ? $"{timeout.TotalSeconds:0.###} s" : $"{timeout.TotalMilliseconds:0} ms";
}

/// <summary>A request the server refuses: answered with <see cref="Status"/> and the message, then closed.</summary>
internal sealed class HttpErrorException(int status, string message) : Exception(message)
{
    public int Status { get; } = status;
}

/// <summary>The client went away (or stopped reading); the message, if any, is logged.</summary>
internal sealed class ClientGoneException(string? message) : Exception(message ?? "")
{
    public bool Quiet { get; } = message is null;
}
