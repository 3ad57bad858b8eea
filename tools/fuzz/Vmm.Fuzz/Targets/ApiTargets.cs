using System.Collections.Concurrent;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using Vmm.Api;
using Vmm.Api.Http;

namespace Vmm.Fuzz;

/// <summary>VmConfig JSON as vm.create and `--config` take it: parsed, then normalized and checked (VmConfigMapper),
/// then written back as vm.info does and parsed again. Invariants: bad input is refused with
/// <see cref="VmConfigException"/> (every problem one line) and nothing else; a config vmm accepted survives the round
/// trip through its own JSON.</summary>
public sealed class VmConfigTarget : IFuzzTarget
{
    public void Run(ReadOnlySpan<byte> input) => Check(input);

    /// <summary>Also the HTTP target's vm.create handler.</summary>
    public static VmConfig? Check(ReadOnlySpan<byte> input)
    {
        VmConfig config;
        try
        {
            config = ApiHandler.ParseVmConfig(input);
            VmConfigMapper.Normalize(config);
            VmConfigMapper.Mmio64Weight(config, []);
        }
        catch (VmConfigException e)
        {
            FuzzTargets.Explain(e.Message);
            if (e.Problems.Count == 0)
                throw new FuzzInvariantException("a VmConfigException that names no problem");
            return null;
        }
        byte[] json = JsonSerializer.SerializeToUtf8Bytes(config, ApiJsonContext.Default.VmConfig);
        try
        {
            var again = ApiHandler.ParseVmConfig(json);
            VmConfigMapper.Normalize(again);
        }
        catch (VmConfigException e)
        {
            throw new FuzzInvariantException($"an accepted VmConfig does not survive its own JSON: {string.Join("; ", e.Problems)}\n{Encoding.UTF8.GetString(json)}");
        }
        return config;
    }

    public void Dispose() { }
}

/// <summary>The API's HTTP/1.1 server on a Unix socket, as `--api-socket` runs it (short timeouts): the input is sent
/// as one client's byte stream, the client's side is shut, and the answer read to the end. The handler parses
/// vm.create bodies as VmConfig (<see cref="VmConfigTarget.Check"/>) and answers everything else with 200.
/// Invariants: the server answers or closes within 5 s; no connection ends with an exception the server did not
/// expect (HttpServer logs those as "connection failed"); every answer starts with a status line.</summary>
public sealed class HttpTarget : IFuzzTarget
{
    private readonly string _path = Path.Combine(Path.GetTempPath(), $"vmm-fuzz-http-{Environment.ProcessId}.sock");
    private readonly ConcurrentQueue<string> _log = new();
    private readonly HttpServer _server;
    private readonly byte[] _response = new byte[1 << 20];

    public HttpTarget()
    {
        var limits = new HttpServerLimits
        {
            MaxBodyBytes = 64 * 1024,
            HeaderTimeout = TimeSpan.FromSeconds(2),
            BodyTimeout = TimeSpan.FromSeconds(2),
            IdleTimeout = TimeSpan.FromSeconds(2),
            WriteTimeout = TimeSpan.FromSeconds(2),
        };
        _server = HttpServer.Listen(_path, new Handler(), limits, _log.Enqueue);
    }

    public void Run(ReadOnlySpan<byte> input)
    {
        using var client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        client.Connect(new UnixDomainSocketEndPoint(_path));
        client.ReceiveTimeout = 5000;
        client.SendTimeout = 5000;
        try
        {
            client.Send(input);
            client.Shutdown(SocketShutdown.Send);
        }
        catch (SocketException)
        {
            // The server answered an error and closed before taking everything: the answer is still there to read.
        }
        int got = 0;
        try
        {
            while (got < _response.Length)
            {
                int n = client.Receive(_response.AsSpan(got));
                if (n == 0)
                    break;
                got += n;
            }
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.TimedOut || e.SocketErrorCode == SocketError.WouldBlock)
        {
            throw new FuzzInvariantException("the API server neither answered nor closed within 5 s");
        }
        catch (SocketException)
        {
            // ECONNRESET after the server closed with bytes unread: what it sent is gone, nothing to check.
            got = 0;
        }
        if (got > 0 && !_response.AsSpan(0, got).StartsWith("HTTP/1.1 "u8))
            throw new FuzzInvariantException($"an answer that is not HTTP: '{Encoding.ASCII.GetString(_response, 0, Math.Min(got, 80))}'");
        while (_log.TryDequeue(out var line))
        {
            if (line.Contains("connection failed", StringComparison.Ordinal) || line.Contains("cannot start", StringComparison.Ordinal))
                throw new FuzzInvariantException("the API server " + line);
        }
    }

    private sealed class Handler : IHttpHandler
    {
        public ValueTask<HttpResponse> HandleAsync(HttpRequest request, CancellationToken cancellation)
        {
            if (request.Method == "PUT" && request.Path == ApiHandler.Root + "vm.create")
            {
                return ValueTask.FromResult(VmConfigTarget.Check(request.Body.Span) is null
                    ? HttpResponse.Error(400, "Failed to deserialize JSON")
                    : HttpResponse.NoContent());
            }
            string echo = $"{request.Method} {request.Path}?{request.Query} {request.Headers.Count} headers, {request.Body.Length} bytes, type {request.Header("Content-Type")}";
            return ValueTask.FromResult(HttpResponse.Json(200, Encoding.UTF8.GetBytes("\"" + JsonEncodedText.Encode(echo) + "\"")));
        }
    }

    public void Dispose() => _server.Dispose();
}
