namespace Vmm.Api.Http;

/// <summary>One parsed request. The server has checked the framing (request line, headers, Content-Length) before
/// the handler sees it; the target is not percent-decoded (the API's paths are plain ASCII).</summary>
public sealed class HttpRequest
{
    /// <summary>"GET", "PUT", ... as sent (methods are case-sensitive).</summary>
    public required string Method { get; init; }

    /// <summary>The target up to the first '?': "/api/v1/vm.info".</summary>
    public required string Path { get; init; }

    /// <summary>The text after the first '?', or null when the target has none.</summary>
    public string? Query { get; init; }

    /// <summary>"HTTP/1.1" or "HTTP/1.0".</summary>
    public string Version { get; init; } = "HTTP/1.1";

    /// <summary>The header fields in the order sent, names as sent, values without surrounding whitespace.</summary>
    public required IReadOnlyList<KeyValuePair<string, string>> Headers { get; init; }

    /// <summary>Exactly Content-Length bytes (empty without one).</summary>
    public ReadOnlyMemory<byte> Body { get; init; }

    /// <summary>The first header named <paramref name="name"/> (case-insensitive), or null.</summary>
    public string? Header(string name)
    {
        foreach (var (key, value) in Headers)
            if (string.Equals(key, name, StringComparison.OrdinalIgnoreCase))
                return value;
        return null;
    }
}
