namespace Vmm.Api.Http;

/// <summary>What one client may cost the server. The API's requests are small JSON documents, so the caps are
/// tight; Firecracker's and Cloud Hypervisor's micro_http likewise cap a request's size. The timeouts keep a client
/// that sends half a request (slowloris) from holding a connection slot for ever.</summary>
public sealed record HttpServerLimits
{
    /// <summary>Longest request line (without its CRLF); beyond it: 414.</summary>
    public int MaxRequestLineBytes { get; init; } = 8 * 1024;

    /// <summary>All header lines together, their CRLFs included; beyond it: 431.</summary>
    public int MaxHeaderBytes { get; init; } = 16 * 1024;

    /// <summary>Most header fields in one request; beyond it: 431.</summary>
    public int MaxHeaders { get; init; } = 64;

    /// <summary>Largest Content-Length accepted; beyond it: 413, answered without reading the body.</summary>
    public int MaxBodyBytes { get; init; } = 1024 * 1024;

    /// <summary>The whole head (request line and headers) must arrive within this, counted from the connection's
    /// accept for its first request and from the first byte for later ones; else 408.</summary>
    public TimeSpan HeaderTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>The whole body must arrive within this after the head; else 408.</summary>
    public TimeSpan BodyTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>A keep-alive connection with no request for this long is closed (silently, as RFC 9112 allows).</summary>
    public TimeSpan IdleTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>A response the client does not read within this is abandoned and the connection closed.</summary>
    public TimeSpan WriteTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Connections served at once; one more is accepted, answered 503 and closed.</summary>
    public int MaxConnections { get; init; } = 256;

    internal void Validate()
    {
        Positive(MaxRequestLineBytes, nameof(MaxRequestLineBytes));
        Positive(MaxHeaderBytes, nameof(MaxHeaderBytes));
        Positive(MaxHeaders, nameof(MaxHeaders));
        if (MaxBodyBytes < 0)
            throw new ArgumentOutOfRangeException(nameof(MaxBodyBytes), MaxBodyBytes, "must not be negative");
        Positive(MaxConnections, nameof(MaxConnections));
        Timeout(HeaderTimeout, nameof(HeaderTimeout));
        Timeout(BodyTimeout, nameof(BodyTimeout));
        Timeout(IdleTimeout, nameof(IdleTimeout));
        Timeout(WriteTimeout, nameof(WriteTimeout));
    }

    private static void Positive(int value, string name)
    {
        if (value <= 0)
            throw new ArgumentOutOfRangeException(name, value, "must be positive");
    }

    private static void Timeout(TimeSpan value, string name)
    {
        // CancelAfter takes up to int.MaxValue milliseconds, or Infinite.
        if (value != System.Threading.Timeout.InfiniteTimeSpan && (value <= TimeSpan.Zero || value.TotalMilliseconds > int.MaxValue))
            throw new ArgumentOutOfRangeException(name, value, "must be positive (or Timeout.InfiniteTimeSpan)");
    }
}
