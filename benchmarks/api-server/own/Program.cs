using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;

var path = args[0];
if (File.Exists(path)) File.Delete(path);
var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
listener.Bind(new UnixDomainSocketEndPoint(path));
listener.Listen(16);
_ = AcceptLoop(listener);
Console.Out.Write("ready\n");
Console.Out.Flush();
var stdin = Console.OpenStandardInput();
var sbuf = new byte[256];
while (stdin.Read(sbuf, 0, sbuf.Length) > 0) { }
listener.Dispose();
try { File.Delete(path); } catch { }
return 0;

static async Task AcceptLoop(Socket l)
{
    while (true)
    {
        Socket c;
        try { c = await l.AcceptAsync(); } catch { return; }
        _ = Serve(c);
    }
}

static async Task Serve(Socket c)
{
    var buf = new byte[8192];
    int filled = 0;
    try
    {
        while (true)
        {
            int end;
            while ((end = buf.AsSpan(0, filled).IndexOf("\r\n\r\n"u8)) < 0)
            {
                if (filled == buf.Length) { await Send(c, 431, "Request Header Fields Too Large", "{}"u8.ToArray(), false); return; }
                int n = await c.ReceiveAsync(buf.AsMemory(filled), SocketFlags.None);
                if (n == 0) return;
                filled += n;
            }
            int headLen = end + 4;
            var head = Encoding.ASCII.GetString(buf, 0, end);
            var firstLine = head.AsSpan(0, head.IndexOf('\r') is var i && i >= 0 ? i : head.Length);
            // no request bodies expected for GET; discard head
            Buffer.BlockCopy(buf, headLen, buf, 0, filled - headLen);
            filled -= headLen;
            bool keepAlive = head.IndexOf("Connection: close", StringComparison.OrdinalIgnoreCase) < 0;
            if (firstLine.StartsWith("GET /api/v1/vmm.ping "))
            {
                var body = JsonSerializer.SerializeToUtf8Bytes(
                    new VmmInfo("x", "0.1", Environment.ProcessId, Array.Empty<string>()), AppJson.Default.VmmInfo);
                await Send(c, 200, "OK", body, keepAlive);
            }
            else
            {
                await Send(c, 404, "Not Found", "{\"error\":\"not found\"}"u8.ToArray(), keepAlive);
            }
            if (!keepAlive) return;
        }
    }
    catch (SocketException) { }
    finally { c.Dispose(); }
}

static async Task Send(Socket c, int code, string reason, byte[] body, bool keepAlive)
{
    var hdr = Encoding.ASCII.GetBytes(
        $"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {body.Length}\r\nConnection: {(keepAlive ? "keep-alive" : "close")}\r\n\r\n");
    var all = new byte[hdr.Length + body.Length];
    hdr.CopyTo(all, 0);
    body.CopyTo(all, hdr.Length);
    int off = 0;
    while (off < all.Length) off += await c.SendAsync(all.AsMemory(off), SocketFlags.None);
}

public sealed record VmmInfo(
    [property: JsonPropertyName("build_version")] string BuildVersion,
    [property: JsonPropertyName("version")] string Version,
    [property: JsonPropertyName("pid")] int Pid,
    [property: JsonPropertyName("features")] string[] Features);

[JsonSerializable(typeof(VmmInfo))]
internal partial class AppJson : JsonSerializerContext { }
