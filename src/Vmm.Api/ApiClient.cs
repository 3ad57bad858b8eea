using System.Net.Sockets;
using System.Text;

namespace Vmm.Api;

/// <summary>A response of the API: status and body (UTF-8 JSON, or empty).</summary>
public sealed record ApiResponse(int Status, string Body)
{
    public bool Ok => Status is >= 200 and < 300;
}

/// <summary>A minimal client of vmm's (and Cloud Hypervisor's) API on a Unix socket: one request per connection,
/// Content-Length framing, as ch-remote does. Used by `vmm remote` and the tests.</summary>
public sealed class ApiClient(string socketPath, TimeSpan? timeout = null)
{
    private readonly TimeSpan _timeout = timeout ?? TimeSpan.FromSeconds(30);

    public ApiResponse Get(string endpoint) => Send("GET", endpoint, null);

    public ApiResponse Put(string endpoint, string? jsonBody = null) => Send("PUT", endpoint, jsonBody is null ? null : Encoding.UTF8.GetBytes(jsonBody));

    public ApiResponse Send(string method, string endpoint, byte[]? body)
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.ReceiveTimeout = socket.SendTimeout = (int)_timeout.TotalMilliseconds;
        socket.Connect(new UnixDomainSocketEndPoint(socketPath));
        var head = new StringBuilder($"{method} {ApiHandler.Root}{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n");
        if (body is not null)
            head.Append($"Content-Type: application/json\r\nContent-Length: {body.Length}\r\n");
        head.Append("\r\n");
        socket.Send(Encoding.ASCII.GetBytes(head.ToString()));
        if (body is not null)
            socket.Send(body);
        var received = new MemoryStream();
        var buffer = new byte[16 * 1024];
        int headEnd = -1;
        long contentLength = -1;
        while (true)
        {
            int n = socket.Receive(buffer);
            if (n <= 0)
                break;
            received.Write(buffer, 0, n);
            var bytes = received.GetBuffer().AsSpan(0, (int)received.Length);
            if (headEnd < 0)
            {
                headEnd = bytes.IndexOf("\r\n\r\n"u8);
                if (headEnd >= 0)
                    contentLength = ContentLength(Encoding.ASCII.GetString(bytes[..headEnd]));
            }
            if (headEnd >= 0 && contentLength >= 0 && received.Length >= headEnd + 4 + contentLength)
                break;
        }
        var all = received.ToArray();
        if (headEnd < 0)
            throw new IOException($"{socketPath}: the connection closed before a complete response ({all.Length} bytes)");
        string statusLine = Encoding.ASCII.GetString(all, 0, Math.Max(0, Array.IndexOf(all, (byte)'\r')));
        string[] parts = statusLine.Split(' ', 3);
        if (parts.Length < 2 || !int.TryParse(parts[1], out int status))
            throw new IOException($"{socketPath}: malformed status line '{statusLine}'");
        int bodyStart = headEnd + 4;
        int bodyLength = contentLength >= 0 ? (int)Math.Min(contentLength, all.Length - bodyStart) : all.Length - bodyStart;
        return new ApiResponse(status, Encoding.UTF8.GetString(all, bodyStart, bodyLength));
    }

    private static long ContentLength(string head)
    {
        foreach (var line in head.Split("\r\n"))
        {
            int colon = line.IndexOf(':');
            if (colon > 0 && line[..colon].Trim().Equals("Content-Length", StringComparison.OrdinalIgnoreCase) && long.TryParse(line[(colon + 1)..].Trim(), out long n))
                return n;
        }
        return -1;
    }
}
