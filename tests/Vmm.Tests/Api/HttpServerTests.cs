using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using Tmds.Linux;
using Vmm.Api.Http;

namespace Vmm.Tests.Api;

public sealed class HttpServerTests : IDisposable
{
    // Generous enough for a cold start on a loaded machine (the head timeout runs from the accept, and the first
    // request of a test run waits for the JIT).
    private static readonly HttpServerLimits Fast = new()
    {
        HeaderTimeout = TimeSpan.FromSeconds(3),
        BodyTimeout = TimeSpan.FromSeconds(3),
        IdleTimeout = TimeSpan.FromSeconds(5),
    };

    // For the tests of the timeouts themselves.
    private static readonly HttpServerLimits Stalling = Fast with
    {
        HeaderTimeout = TimeSpan.FromMilliseconds(300),
        BodyTimeout = TimeSpan.FromMilliseconds(300),
    };

    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("vmm-http-");
    private readonly ConcurrentQueue<string> _log = new();
    private readonly RecordingHandler _handler = new();

    private string SocketPath => Path.Combine(_dir.FullName, "api.sock");

    public void Dispose()
    {
        try
        {
            _dir.Delete(recursive: true);
        }
        catch (IOException)
        {
        }
    }

    private HttpServer Start(HttpServerLimits? limits = null, IHttpHandler? handler = null) =>
        HttpServer.Listen(SocketPath, handler ?? _handler, limits ?? Fast, _log.Enqueue);

    // ---- requests that are served ----

    [Fact]
    public async Task A_GET_is_answered_and_the_connection_stays_open_for_a_second_request()
    {
        await using var server = Start();
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("GET /api/v1/vm.info?x=1?y HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
        var first = await client.ReadResponseAsync();
        await client.SendAsync("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n");
        var second = await client.ReadResponseAsync();

        Assert.Equal("HTTP/1.1 200 OK", first.StatusLine);
        Assert.Equal("GET /api/v1/vm.info x=1?y 0", first.Text);
        Assert.Equal("vmm", first.Headers["Server"]);
        Assert.Equal("text/plain", first.Headers["Content-Type"]);
        Assert.Equal(first.Body.Length.ToString(), first.Headers["Content-Length"]);
        Assert.False(first.Headers.ContainsKey("Connection"));
        Assert.Equal("GET /api/v1/vmm.ping - 0", second.Text);
        Assert.Equal(2, _handler.Calls);
        Assert.Equal("localhost", _handler.Requests.First().Header("HOST"));
        Assert.Equal("Accept", _handler.Requests.First().Headers[1].Key);
    }

    [Fact]
    public async Task A_PUT_body_is_delivered_exactly_even_when_it_arrives_in_pieces()
    {
        await using var server = Start();
        using var client = await RawClient.ConnectAsync(SocketPath);
        byte[] body = [.. "{\"a\":\r\n"u8, 0, 0xFF, .. "\"b\"}"u8];
        await client.SendAsync($"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {body.Length}\r\n\r\n");
        await client.SendAsync(body[..3]);
        await Task.Delay(20);
        // The rest of the body and a whole second request in one write (pipelined).
        await client.SendAsync([.. body[3..], .. "PUT /api/v1/vm.boot HTTP/1.1\r\n\r\n"u8]);
        var first = await client.ReadResponseAsync();
        var second = await client.ReadResponseAsync();

        Assert.Equal($"PUT /api/v1/vm.create - {body.Length}", first.Text);
        Assert.Equal("PUT /api/v1/vm.boot - 0", second.Text);
        Assert.Equal(body, _handler.Requests.First().Body.ToArray());
        Assert.True(_handler.Requests.Last().Body.IsEmpty);
    }

    [Fact]
    public async Task Connection_close_is_honoured()
    {
        await using var server = Start();
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("GET /a HTTP/1.1\r\nConnection: close\r\n\r\n");
        var response = await client.ReadResponseAsync();
        Assert.Equal(200, response.Status);
        Assert.Equal("close", response.Headers["Connection"]);
        Assert.True(await client.ReadsEndAsync());
    }

    [Fact]
    public async Task HTTP_1_0_closes_unless_keep_alive_is_asked_for()
    {
        await using var server = Start();
        using (var client = await RawClient.ConnectAsync(SocketPath))
        {
            await client.SendAsync("GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
            var response = await client.ReadResponseAsync();
            Assert.Equal("keep-alive", response.Headers["Connection"]);
            await client.SendAsync("GET /b HTTP/1.0\r\n\r\n");
            response = await client.ReadResponseAsync();
            Assert.Equal("close", response.Headers["Connection"]);
            Assert.Equal("GET /b - 0", response.Text);
            Assert.True(await client.ReadsEndAsync());
        }
        Assert.Equal("HTTP/1.0", _handler.Requests.Last().Version);
    }

    [Fact]
    public async Task Bare_LF_line_ends_are_accepted()
    {
        await using var server = Start();
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("PUT /lf HTTP/1.1\nContent-Length: 2\n\nok");
        var response = await client.ReadResponseAsync();
        Assert.Equal("PUT /lf - 2", response.Text);
    }

    [Fact]
    public async Task A_204_has_Content_Length_0_and_no_Content_Type()
    {
        await using var server = Start(handler: new FuncHandler(_ => HttpResponse.NoContent()));
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("PUT /api/v1/vm.boot HTTP/1.1\r\n\r\n");
        var response = await client.ReadResponseAsync();
        Assert.Equal("HTTP/1.1 204 No Content", response.StatusLine);
        Assert.Equal("0", response.Headers["Content-Length"]);
        Assert.False(response.Headers.ContainsKey("Content-Type"));
        Assert.Equal("vmm", response.Headers["Server"]);
    }

    [Fact]
    public async Task A_HEAD_response_has_the_length_but_no_body()
    {
        await using var server = Start();
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("HEAD /h HTTP/1.1\r\nConnection: close\r\n\r\n");
        var response = await client.ReadResponseAsync(interim: true);
        Assert.Equal("HTTP/1.1 200 OK", response.StatusLine);
        Assert.Equal("HEAD /h - 0".Length.ToString(), response.Headers["Content-Length"]);
        Assert.True(await client.ReadsEndAsync());
    }

    [Fact]
    public async Task Expect_100_continue_gets_Continue_before_the_body_is_sent()
    {
        await using var server = Start();
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("PUT /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        var interim = await client.ReadResponseAsync(interim: true);
        Assert.Equal("HTTP/1.1 100 Continue", interim.StatusLine);
        await client.SendAsync("abc");
        var response = await client.ReadResponseAsync();
        Assert.Equal("PUT /e - 3", response.Text);
    }

    // ---- requests that are refused ----

    [Theory]
    [InlineData("GET  /x HTTP/1.1")]
    [InlineData("GET /x  HTTP/1.1")]
    [InlineData("GET /x")]
    [InlineData("GET /x HTTP/1.1 extra")]
    [InlineData(" GET /x HTTP/1.1")]
    [InlineData("G(T /x HTTP/1.1")]
    [InlineData("GET x HTTP/1.1")]
    [InlineData("GET http://localhost/x HTTP/1.1")]
    [InlineData("GET /x HTTX/1.1")]
    [InlineData("GET /\u00e9 HTTP/1.1")]
    [InlineData("GET /\u0001 HTTP/1.1")]
    [InlineData("GET /x\tHTTP/1.1")]
    [InlineData("GET /x\rHTTP/1.1")]
    [InlineData("GET /x HTTP/1.1\r\r")]
    [InlineData("")]
    public async Task Malformed_request_lines_get_400(string line)
    {
        var response = await RefusedAsync(line + "\r\n\r\n");
        Assert.Equal(400, response.Status);
        Assert.StartsWith("malformed request line", response.Errors.Single());
    }

    [Fact]
    public async Task An_unsupported_version_gets_505()
    {
        var response = await RefusedAsync("GET /x HTTP/2.0\r\n\r\n");
        Assert.Equal("HTTP/1.1 505 HTTP Version Not Supported", response.StatusLine);
        Assert.Contains("HTTP/2.0", response.Errors.Single());
    }

    [Fact]
    public async Task A_request_line_over_the_limit_gets_414_even_before_it_ends()
    {
        var response = await RefusedAsync("GET /" + new string('a', 200), Fast with { MaxRequestLineBytes = 100 });
        Assert.Equal("HTTP/1.1 414 URI Too Long", response.StatusLine);
        Assert.Contains("100 bytes", response.Errors.Single());
    }

    [Fact]
    public async Task A_request_line_at_the_limit_is_served()
    {
        await using var server = Start(Fast with { MaxRequestLineBytes = 100 });
        using var client = await RawClient.ConnectAsync(SocketPath);
        string line = "GET /" + new string('a', 100 - "GET / HTTP/1.1".Length) + " HTTP/1.1";
        Assert.Equal(100, line.Length);
        await client.SendAsync(line + "\r\n\r\n");
        Assert.Equal(200, (await client.ReadResponseAsync()).Status);
    }

    [Fact]
    public async Task A_header_section_over_the_limit_gets_431()
    {
        var limits = Fast with { MaxHeaderBytes = 200 };
        var response = await RefusedAsync("GET /x HTTP/1.1\r\nA: " + new string('v', 100) + "\r\nB: " + new string('v', 100) + "\r\n\r\n", limits);
        Assert.Equal("HTTP/1.1 431 Request Header Fields Too Large", response.StatusLine);
        Assert.Contains("header section longer than 200 bytes", response.Errors.Single());

        // Exactly at the limit is fine: "A: " + 195 + CRLF = 200 bytes.
        await using var server = Start(limits);
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("GET /x HTTP/1.1\r\nA: " + new string('v', 195) + "\r\n\r\n");
        Assert.Equal(200, (await client.ReadResponseAsync()).Status);
    }

    [Fact]
    public async Task The_header_limit_holds_when_the_head_arrives_in_pieces()
    {
        // 4 KiB reads: the line buffer is compacted and grown while the headers arrive; the count stays exact.
        var limits = Fast with { MaxHeaderBytes = 10_000 };
        string header = "X-Pad: " + new string('p', 991) + "\r\n"; // 1000 bytes
        await using var server = Start(limits);
        using (var client = await RawClient.ConnectAsync(SocketPath))
        {
            await client.SendAsync("GET /x HTTP/1.1\r\n");
            for (int i = 0; i < 10; i++)
            {
                await client.SendAsync(header[..300]);
                await Task.Delay(2);
                await client.SendAsync(header[300..]);
            }
            await client.SendAsync("\r\n");
            Assert.Equal(200, (await client.ReadResponseAsync()).Status);
        }
        using (var client = await RawClient.ConnectAsync(SocketPath))
        {
            await client.SendAsync("GET /x HTTP/1.1\r\n");
            for (int i = 0; i < 10; i++)
                await client.SendAsync(header);
            await client.SendAsync("A: b\r\n\r\n");
            Assert.Equal(431, (await client.ReadResponseAsync()).Status);
        }
    }

    [Fact]
    public async Task Too_many_header_fields_get_431()
    {
        var headers = string.Concat(Enumerable.Range(0, 5).Select(i => $"H{i}: v\r\n"));
        var response = await RefusedAsync("GET /x HTTP/1.1\r\n" + headers + "\r\n", Fast with { MaxHeaders = 4 });
        Assert.Equal(431, response.Status);
        Assert.Equal("more than 4 header fields", response.Errors.Single());
    }

    [Theory]
    [InlineData("NoColon", "no colon")]
    [InlineData("Name : v", "whitespace before the colon")]
    [InlineData("Na me: v", "not a token")]
    [InlineData("N(x): v", "not a token")]
    [InlineData(": v", "empty field name")]
    [InlineData("A: b\r\n folded", "obsolete line folding")]
    [InlineData("A: b\u0001c", "control byte 0x01")]
    [InlineData("A: b\rc", "control byte 0x0d")]
    public async Task Malformed_header_lines_get_400(string header, string problem)
    {
        var response = await RefusedAsync("GET /x HTTP/1.1\r\n" + header + "\r\n\r\n");
        Assert.Equal(400, response.Status);
        Assert.StartsWith("malformed header line", response.Errors.Single());
        Assert.Contains(problem, response.Errors.Single());
    }

    [Fact]
    public async Task Transfer_Encoding_gets_501()
    {
        var response = await RefusedAsync("PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        Assert.Equal("HTTP/1.1 501 Not Implemented", response.StatusLine);
        Assert.Equal("Transfer-Encoding is not supported: send Content-Length", response.Errors.Single());
    }

    [Theory]
    [InlineData("Content-Length: abc", "not a decimal number")]
    [InlineData("Content-Length: -1", "not a decimal number")]
    [InlineData("Content-Length: 1, 1", "not a decimal number")]
    [InlineData("Content-Length:", "empty")]
    [InlineData("Content-Length: 1\r\nContent-Length: 2", "conflicting Content-Length values")]
    public async Task A_bad_Content_Length_gets_400(string headers, string problem)
    {
        var response = await RefusedAsync("PUT /x HTTP/1.1\r\n" + headers + "\r\n\r\nab");
        Assert.Equal(400, response.Status);
        Assert.Contains(problem, response.Errors.Single());
    }

    [Fact]
    public async Task Two_equal_Content_Lengths_are_accepted()
    {
        await using var server = Start();
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("PUT /x HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 02\r\n\r\nab");
        Assert.Equal("PUT /x - 2", (await client.ReadResponseAsync()).Text);
    }

    [Fact]
    public async Task A_body_over_the_limit_gets_413_without_being_read()
    {
        // No body is sent: the answer must come from the head alone.
        var response = await RefusedAsync("PUT /x HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", Fast with { MaxBodyBytes = 1000 });
        Assert.Equal("HTTP/1.1 413 Content Too Large", response.StatusLine);
        Assert.Equal("request body of 1001 bytes exceeds the limit of 1000 bytes", response.Errors.Single());
        var huge = await RefusedAsync("PUT /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
        Assert.Equal(413, huge.Status);
    }

    [Fact]
    public async Task An_unknown_expectation_gets_417()
    {
        var response = await RefusedAsync("PUT /x HTTP/1.1\r\nExpect: magic\r\nContent-Length: 1\r\n\r\n");
        Assert.Equal("HTTP/1.1 417 Expectation Failed", response.StatusLine);
    }

    // ---- timeouts, stalls, and clients that go away ----

    [Fact]
    public async Task A_stalled_half_request_gets_408_and_other_clients_are_still_served()
    {
        await using var server = Start(Stalling);
        using (var other = await RawClient.ConnectAsync(SocketPath))
        {
            // A first request warms the JIT, so that the second is served well within the stalled client's 300 ms.
            await other.SendAsync("GET /warm HTTP/1.1\r\n\r\n");
            Assert.Equal(200, (await other.ReadResponseAsync()).Status);
        }
        using var stalled = await RawClient.ConnectAsync(SocketPath);
        await stalled.SendAsync("GET /x HTTP/1.1\r\nHost: loc");
        using (var other = await RawClient.ConnectAsync(SocketPath))
        {
            await other.SendAsync("GET /other HTTP/1.1\r\n\r\n");
            Assert.Equal("GET /other - 0", (await other.ReadResponseAsync()).Text);
        }
        // Served while the stalled client still waits: its 408 has not come yet.
        Assert.Equal(0, stalled.Available);
        var response = await stalled.ReadResponseAsync();
        Assert.Equal("HTTP/1.1 408 Request Timeout", response.StatusLine);
        Assert.Equal("request head not received within 300 ms", response.Errors.Single());
        Assert.True(await stalled.ReadsEndAsync());
        Assert.Equal(2, _handler.Calls);
    }

    [Fact]
    public async Task A_connection_that_sends_nothing_gets_408_after_the_header_timeout()
    {
        await using var server = Start(Stalling);
        using var client = await RawClient.ConnectAsync(SocketPath);
        var clock = Stopwatch.StartNew();
        var response = await client.ReadResponseAsync();
        Assert.Equal(408, response.Status);
        Assert.InRange(clock.ElapsedMilliseconds, 200, 1500);
    }

    [Fact]
    public async Task A_stalled_body_gets_408()
    {
        var response = await RefusedAsync("PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", Stalling);
        Assert.Equal(408, response.Status);
        Assert.Equal("request body not received within 300 ms", response.Errors.Single());
    }

    [Fact]
    public async Task An_idle_keep_alive_connection_is_closed_silently()
    {
        await using var server = Start(Stalling with { IdleTimeout = TimeSpan.FromMilliseconds(200) });
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("GET /x HTTP/1.1\r\n\r\n");
        Assert.Equal(200, (await client.ReadResponseAsync()).Status);
        var clock = Stopwatch.StartNew();
        Assert.True(await client.ReadsEndAsync()); // no 408: nothing at all, then the end
        Assert.InRange(clock.ElapsedMilliseconds, 100, 1500);
    }

    [Fact]
    public async Task A_client_closing_mid_request_is_logged_once_and_the_server_goes_on()
    {
        await using var server = Start();
        using (var client = await RawClient.ConnectAsync(SocketPath))
            await client.SendAsync("PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
        using (var client = await RawClient.ConnectAsync(SocketPath))
            await client.SendAsync("GET /x HTTP/1.1\r\nHo");
        using var next = await RawClient.ConnectAsync(SocketPath);
        await next.SendAsync("GET /next HTTP/1.1\r\n\r\n");
        Assert.Equal("GET /next - 0", (await next.ReadResponseAsync()).Text);
        await WaitUntilAsync(() => _log.Count >= 2);
        Assert.Equal(2, _log.Count(line => line.Contains("mid-request")));
        Assert.Equal(2, _log.Count);
        Assert.Equal(1, _handler.Calls);
    }

    // ---- the handler ----

    [Fact]
    public async Task A_handler_exception_becomes_500_and_the_next_request_is_served()
    {
        var handler = new FuncHandler(r => r.Path == "/boom"
            ? throw new InvalidOperationException("the \"VM\" is on fire")
            : HttpResponse.Json(200, "{}"u8.ToArray()));
        await using var server = Start(handler: handler);
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("GET /boom HTTP/1.1\r\n\r\n");
        var failed = await client.ReadResponseAsync();
        await client.SendAsync("GET /fine HTTP/1.1\r\n\r\n");
        var fine = await client.ReadResponseAsync();

        Assert.Equal("HTTP/1.1 500 Internal Server Error", failed.StatusLine);
        Assert.Equal("application/json", failed.Headers["Content-Type"]);
        Assert.Equal("internal error: the \"VM\" is on fire", failed.Errors.Single());
        Assert.Equal(200, fine.Status);
        Assert.Equal("{}", fine.Text);
        Assert.Contains(_log, line => line.Contains("on fire"));
    }

    [Fact]
    public async Task A_hundred_concurrent_connections_are_all_answered()
    {
        int inside = 0, most = 0;
        var handler = new AsyncHandler(async r =>
        {
            int now = Interlocked.Increment(ref inside);
            int seen;
            while ((seen = Volatile.Read(ref most)) < now && Interlocked.CompareExchange(ref most, now, seen) != seen)
            {
            }
            await Task.Delay(100);
            Interlocked.Decrement(ref inside);
            return new HttpResponse(200, Encoding.ASCII.GetBytes(r.Path), "text/plain");
        });
        await using var server = Start(handler: handler);
        var clients = await Task.WhenAll(Enumerable.Range(0, 100).Select(_ => RawClient.ConnectAsync(SocketPath)));
        try
        {
            var clock = Stopwatch.StartNew();
            var answers = await Task.WhenAll(clients.Select(async (client, i) =>
            {
                await client.SendAsync($"GET /client/{i} HTTP/1.1\r\n\r\n");
                return (await client.ReadResponseAsync()).Text;
            }));
            Assert.Equal(Enumerable.Range(0, 100).Select(i => $"/client/{i}"), answers);
            Assert.True(most >= 10, $"at most {most} handler calls ran at once");
            Assert.True(clock.ElapsedMilliseconds < 3000, $"100 requests of 100 ms took {clock.ElapsedMilliseconds} ms");
        }
        finally
        {
            foreach (var client in clients)
                client.Dispose();
        }
    }

    [Fact]
    public async Task A_connection_beyond_MaxConnections_gets_503_and_a_freed_slot_is_reused()
    {
        await using var server = Start(Fast with { MaxConnections = 1, HeaderTimeout = TimeSpan.FromSeconds(5) });
        var holder = await RawClient.ConnectAsync(SocketPath);
        await holder.SendAsync("GET /hold HTTP/1.1\r\n\r\n");
        Assert.Equal(200, (await holder.ReadResponseAsync()).Status);

        using (var refused = await RawClient.ConnectAsync(SocketPath))
        {
            var response = await refused.ReadResponseAsync();
            Assert.Equal("HTTP/1.1 503 Service Unavailable", response.StatusLine);
            Assert.Equal("too many connections (at most 1)", response.Errors.Single());
            Assert.True(await refused.ReadsEndAsync());
        }

        holder.Dispose();
        await WaitUntilAsync(() => false, TimeSpan.FromMilliseconds(100));
        using var next = await RawClient.ConnectAsync(SocketPath);
        await next.SendAsync("GET /next HTTP/1.1\r\n\r\n");
        Assert.Equal(200, (await next.ReadResponseAsync()).Status);
    }

    // ---- the socket file ----

    [Fact]
    public async Task The_socket_file_has_mode_0600_and_no_temporary_file_is_left()
    {
        await using var server = Start();
        Assert.Equal(SocketPath, server.Path);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(SocketPath));
        Assert.Equal(["api.sock"], _dir.GetFileSystemInfos().Select(f => f.Name));
    }

    [Fact]
    public async Task A_stale_socket_file_is_replaced()
    {
        MakeStaleSocket(SocketPath);
        Assert.True(File.Exists(SocketPath));
        await using var server = Start();
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("GET /x HTTP/1.1\r\n\r\n");
        Assert.Equal(200, (await client.ReadResponseAsync()).Status);
    }

    [Fact]
    public async Task A_live_socket_is_not_taken_over()
    {
        await using var first = Start();
        var e = Assert.Throws<ApiSocketException>(() => Start());
        Assert.Equal($"{SocketPath}: another process is already serving this socket", e.Message);
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("GET /still HTTP/1.1\r\n\r\n");
        Assert.Equal(200, (await client.ReadResponseAsync()).Status);
    }

    [Fact]
    public void A_regular_file_at_the_path_is_refused_and_left_alone()
    {
        File.WriteAllText(SocketPath, "keep me");
        var e = Assert.Throws<ApiSocketException>(() => Start());
        Assert.Contains("is not a socket", e.Message);
        Assert.StartsWith(SocketPath, e.Message);
        Assert.Equal("keep me", File.ReadAllText(SocketPath));
        Assert.Equal(["api.sock"], _dir.GetFileSystemInfos().Select(f => f.Name));
    }

    [Fact]
    public async Task A_path_too_long_for_a_temporary_name_is_bound_directly()
    {
        string path = Path.Combine(_dir.FullName, new string('s', 105 - _dir.FullName.Length - 1));
        Assert.Equal(105, path.Length); // path + ".tmp-PID" would not fit sun_path's 107 bytes
        var server = HttpServer.Listen(path, _handler, Fast);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(path));
        using (var client = await RawClient.ConnectAsync(path))
        {
            await client.SendAsync("GET /long HTTP/1.1\r\n\r\n");
            Assert.Equal(200, (await client.ReadResponseAsync()).Status);
        }
        await server.DisposeAsync();
        Assert.False(File.Exists(path));
    }

    [Fact]
    public void A_path_longer_than_sun_path_is_an_ApiSocketException()
    {
        string path = Path.Combine(_dir.FullName, new string('s', 120));
        var e = Assert.Throws<ApiSocketException>(() => HttpServer.Listen(path, _handler, Fast));
        Assert.Equal($"{path}: a unix socket path is at most 107 bytes", e.Message);
    }

    [Fact]
    public void A_missing_directory_is_an_ApiSocketException()
    {
        string path = Path.Combine(_dir.FullName, "no", "api.sock");
        var e = Assert.Throws<ApiSocketException>(() => HttpServer.Listen(path, _handler, Fast));
        Assert.StartsWith(path, e.Message);
    }

    [Fact]
    public async Task Dispose_removes_the_socket_file_but_not_a_newer_servers_file()
    {
        var server = Start();
        await server.DisposeAsync();
        Assert.False(File.Exists(SocketPath));
        await server.DisposeAsync(); // twice is fine

        var old = Start();
        File.Delete(SocketPath);
        await using var newer = Start();
        old.Dispose();
        Assert.True(File.Exists(SocketPath));
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("GET /x HTTP/1.1\r\n\r\n");
        Assert.Equal(200, (await client.ReadResponseAsync()).Status);
    }

    [Fact]
    public async Task Dispose_closes_open_connections_and_cancels_handlers()
    {
        var entered = new TaskCompletionSource();
        var handler = new AsyncHandler(async r =>
        {
            entered.TrySetResult();
            await Task.Delay(Timeout.Infinite, r.Cancellation);
            return HttpResponse.NoContent();
        });
        var server = Start(handler: handler);
        using var idle = await RawClient.ConnectAsync(SocketPath);
        using var busy = await RawClient.ConnectAsync(SocketPath);
        await busy.SendAsync("GET /wait HTTP/1.1\r\n\r\n");
        await entered.Task.WaitAsync(TimeSpan.FromSeconds(2));
        var clock = Stopwatch.StartNew();
        await server.DisposeAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(2));
        Assert.True(clock.ElapsedMilliseconds < 1000);
        Assert.True(await idle.ReadsEndAsync());
        Assert.True(await busy.ReadsEndAsync());
    }

    [Fact]
    public async Task A_response_returned_after_dispose_began_is_still_sent()
    {
        var entered = new TaskCompletionSource();
        var handler = new AsyncHandler(async r =>
        {
            entered.TrySetResult();
            await Task.Delay(Timeout.Infinite, r.Cancellation).ContinueWith(_ => { }, TaskScheduler.Default);
            return new HttpResponse(200, "bye"u8.ToArray(), "text/plain");
        });
        var server = Start(handler: handler);
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("GET /wait HTTP/1.1\r\n\r\n");
        await entered.Task.WaitAsync(TimeSpan.FromSeconds(2));
        await server.DisposeAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(2));
        var response = await client.ReadResponseAsync();
        Assert.Equal("bye", response.Text);
        Assert.Equal("close", response.Headers["Connection"]);
        Assert.True(await client.ReadsEndAsync());
    }

    [Fact]
    public async Task A_handler_may_dispose_its_own_server()
    {
        HttpServer? server = null;
        var handler = new AsyncHandler(async r =>
        {
            await server!.DisposeAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(2));
            return HttpResponse.NoContent();
        });
        server = Start(handler: handler);
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync("PUT /api/v1/vmm.shutdown HTTP/1.1\r\n\r\n");
        var response = await client.ReadResponseAsync();
        Assert.Equal(204, response.Status);
        Assert.Equal("close", response.Headers["Connection"]);
        Assert.True(await client.ReadsEndAsync());
        Assert.False(File.Exists(SocketPath));
    }

    [Fact]
    public async Task FromListeningFd_serves_an_inherited_socket_and_leaves_its_file()
    {
        int fd = BindRaw(SocketPath);
        await using (var server = HttpServer.FromListeningFd(fd, _handler, Fast))
        {
            Assert.Equal(SocketPath, server.Path);
            using var client = await RawClient.ConnectAsync(SocketPath);
            await client.SendAsync("GET /fd HTTP/1.1\r\n\r\n");
            Assert.Equal("GET /fd - 0", (await client.ReadResponseAsync()).Text);
        }
        Assert.True(File.Exists(SocketPath));
    }

    [Fact]
    public async Task Curl_talks_to_the_server()
    {
        const string curl = "/usr/bin/curl";
        Assert.True(File.Exists(curl), "curl is missing: install it (apt-get install curl) to run this test");
        await using var server = Start();
        var start = new ProcessStartInfo(curl, ["-sS", "-i", "--max-time", "5", "--unix-socket", SocketPath,
            "-X", "PUT", "-H", "Content-Type: application/json", "-d", "{\"cpus\":2}", "http://localhost/api/v1/x?q=1"])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        using var process = Process.Start(start)!;
        string output = await process.StandardOutput.ReadToEndAsync();
        string errors = await process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync();
        Assert.True(process.ExitCode == 0, $"curl failed ({process.ExitCode}): {errors}");
        Assert.StartsWith("HTTP/1.1 200 OK\r\n", output);
        Assert.EndsWith("\r\n\r\nPUT /api/v1/x q=1 10", output);
        Assert.Equal("{\"cpus\":2}"u8.ToArray(), _handler.Requests.Single().Body.ToArray());
    }

    // ---- responses ----

    [Fact]
    public void Error_bodies_are_JSON_arrays_of_the_messages_outermost_first()
    {
        var response = HttpResponse.Error(409, "outer \"quoted\"\n", "inner \\ \u0001 é");
        Assert.Equal("application/json", response.ContentType);
        Assert.Equal(409, response.Status);
        var messages = JsonSerializer.Deserialize<string[]>(response.Body.Span)!;
        Assert.Equal(["outer \"quoted\"\n", "inner \\ \u0001 é"], messages);
        Assert.Equal("[]", Encoding.UTF8.GetString(HttpResponse.Error(500).Body.Span));
    }

    [Fact]
    public void Responses_are_checked_when_built()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new HttpResponse(100));
        Assert.Throws<ArgumentException>(() => new HttpResponse(204, new byte[1]));
        Assert.Throws<ArgumentException>(() => new HttpResponse(200, new byte[1], "text/plain\r\nX-Injected: 1"));
        Assert.Equal("application/octet-stream", new HttpResponse(200, new byte[1]).ContentType);
        Assert.Null(HttpResponse.NoContent().ContentType);
        foreach (int status in new[] { 200, 204, 400, 404, 405, 408, 409, 413, 414, 415, 431, 500, 501, 503, 505 })
            Assert.NotEqual("", HttpResponse.ReasonPhrase(status));
    }

    // ---- helpers ----

    /// <summary>Sends <paramref name="request"/> to a fresh server and reads the refusal; the connection must then
    /// end, and the handler must not have been called.</summary>
    private async Task<RawResponse> RefusedAsync(string request, HttpServerLimits? limits = null)
    {
        await using var server = Start(limits);
        using var client = await RawClient.ConnectAsync(SocketPath);
        await client.SendAsync(Encoding.Latin1.GetBytes(request));
        var response = await client.ReadResponseAsync();
        Assert.Equal("close", response.Headers["Connection"]);
        Assert.Equal("application/json", response.Headers["Content-Type"]);
        Assert.True(await client.ReadsEndAsync(), "the connection stays open after an error");
        Assert.Equal(0, _handler.Calls);
        return response;
    }

    private static async Task WaitUntilAsync(Func<bool> condition, TimeSpan? timeout = null)
    {
        var clock = Stopwatch.StartNew();
        while (!condition() && clock.Elapsed < (timeout ?? TimeSpan.FromSeconds(2)))
            await Task.Delay(10);
    }

    /// <summary>A socket file nobody listens on: bound, then the socket closed (a crashed server's leftover).
    /// Bound under another name and renamed, because a .NET socket deletes the file it bound when disposed.</summary>
    private static void MakeStaleSocket(string path)
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.Bind(new UnixDomainSocketEndPoint(path + ".bind"));
        File.Move(path + ".bind", path);
    }

    /// <summary>An AF_UNIX socket bound to <paramref name="path"/> but not listening, as a parent process would pass it.</summary>
    private static unsafe int BindRaw(string path)
    {
        int fd = LibC.socket(LibC.AF_UNIX, LibC.SOCK_STREAM | LibC.SOCK_CLOEXEC, 0);
        Assert.True(fd >= 0);
        var address = new sockaddr_un { sun_family = LibC.AF_UNIX };
        byte[] name = Encoding.UTF8.GetBytes(path + "\0");
        name.CopyTo(new Span<byte>((byte*)&address + 2, 108));
        Assert.Equal(0, LibC.bind(fd, (sockaddr*)&address, (uint)sizeof(sockaddr_un)));
        return fd;
    }

    private sealed class RecordingHandler : IHttpHandler
    {
        private int _calls;
        public ConcurrentQueue<HttpRequest> Requests { get; } = new();
        public int Calls => Volatile.Read(ref _calls);

        public ValueTask<HttpResponse> HandleAsync(HttpRequest request, CancellationToken cancellation)
        {
            Interlocked.Increment(ref _calls);
            Requests.Enqueue(request);
            string text = $"{request.Method} {request.Path} {request.Query ?? "-"} {request.Body.Length}";
            return ValueTask.FromResult(new HttpResponse(200, Encoding.ASCII.GetBytes(text), "text/plain"));
        }
    }

    private sealed class FuncHandler(Func<HttpRequest, HttpResponse> answer) : IHttpHandler
    {
        public ValueTask<HttpResponse> HandleAsync(HttpRequest request, CancellationToken cancellation) =>
            ValueTask.FromResult(answer(request));
    }

    private sealed record Call(HttpRequest Request, CancellationToken Cancellation)
    {
        public string Path => Request.Path;
    }

    private sealed class AsyncHandler(Func<Call, Task<HttpResponse>> answer) : IHttpHandler
    {
        public async ValueTask<HttpResponse> HandleAsync(HttpRequest request, CancellationToken cancellation) =>
            await answer(new Call(request, cancellation));
    }

    private sealed record RawResponse(string StatusLine, Dictionary<string, string> Headers, byte[] Body)
    {
        public int Status => int.Parse(StatusLine.Split(' ')[1]);
        public string Text => Encoding.UTF8.GetString(Body);
        public string[] Errors => JsonSerializer.Deserialize<string[]>(Body) ?? [];
    }

    /// <summary>A raw client: exact bytes out, responses parsed by hand (so malformed requests can be sent).</summary>
    private sealed class RawClient : IDisposable
    {
        private static readonly TimeSpan ReadTimeout = TimeSpan.FromSeconds(3);
        private readonly Socket _socket;
        private readonly List<byte> _pending = [];

        private RawClient(Socket socket) => _socket = socket;

        public static async Task<RawClient> ConnectAsync(string path)
        {
            var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await socket.ConnectAsync(new UnixDomainSocketEndPoint(path));
            return new RawClient(socket);
        }

        public Task SendAsync(string text) => SendAsync(Encoding.Latin1.GetBytes(text));

        public async Task SendAsync(byte[] bytes)
        {
            for (int sent = 0; sent < bytes.Length;)
                sent += await _socket.SendAsync(bytes.AsMemory(sent), SocketFlags.None);
        }

        /// <summary>The next response; with <paramref name="interim"/> the head only (100 Continue, HEAD).</summary>
        public async Task<RawResponse> ReadResponseAsync(bool interim = false)
        {
            int end;
            while ((end = IndexOf("\r\n\r\n"u8)) < 0)
                if (!await ReceiveAsync())
                    throw new IOException($"connection ended after {_pending.Count} bytes of a response head");
            string[] lines = Encoding.ASCII.GetString([.. _pending.Take(end)]).Split("\r\n");
            _pending.RemoveRange(0, end + 4);
            var headers = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
            foreach (string line in lines.Skip(1))
            {
                int colon = line.IndexOf(':');
                Assert.True(headers.TryAdd(line[..colon], line[(colon + 1)..].Trim()), $"header sent twice: {line}");
            }
            if (interim)
                return new RawResponse(lines[0], headers, []);
            Assert.True(headers.ContainsKey("Content-Length"), "a response without Content-Length");
            int length = int.Parse(headers["Content-Length"]);
            while (_pending.Count < length)
                if (!await ReceiveAsync())
                    throw new IOException($"connection ended after {_pending.Count} of {length} body bytes");
            byte[] body = [.. _pending.Take(length)];
            _pending.RemoveRange(0, length);
            return new RawResponse(lines[0], headers, body);
        }

        /// <summary>True when the server ends the connection (with nothing more sent).</summary>
        public async Task<bool> ReadsEndAsync() => _pending.Count == 0 && !await ReceiveAsync();

        private async Task<bool> ReceiveAsync()
        {
            byte[] buffer = new byte[4096];
            using var timeout = new CancellationTokenSource(ReadTimeout);
            int n = await _socket.ReceiveAsync(buffer, SocketFlags.None, timeout.Token);
            _pending.AddRange(buffer.AsSpan(0, n));
            return n > 0;
        }

        private int IndexOf(ReadOnlySpan<byte> pattern) =>
            System.Runtime.InteropServices.CollectionsMarshal.AsSpan(_pending).IndexOf(pattern);

        /// <summary>Bytes the server sent that nobody has read yet.</summary>
        public int Available => _pending.Count + _socket.Available;

        public void Dispose() => _socket.Dispose();
    }
}
