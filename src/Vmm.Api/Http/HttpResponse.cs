using System.Buffers;
using System.Text.Json;

namespace Vmm.Api.Http;

/// <summary>A response for <see cref="HttpServer"/> to send. The server adds Content-Length, Server and Connection.</summary>
public sealed class HttpResponse
{
    public int Status { get; }

    /// <summary>The Content-Type sent with the body; application/octet-stream when a body comes without one.</summary>
    public string? ContentType { get; }

    public ReadOnlyMemory<byte> Body { get; }

    /// <summary>Runs once the response has been written to the client (vmm.shutdown ends the process only then).</summary>
    public Action? AfterSent { get; init; }

    public HttpResponse(int status, ReadOnlyMemory<byte> body = default, string? contentType = null)
    {
        // 1xx are not final responses (the server sends 100 Continue itself); 204 has no body by definition.
        if (status < 200 || status > 599)
            throw new ArgumentOutOfRangeException(nameof(status), status, "a final HTTP status is 200-599");
        if (status == 204 && !body.IsEmpty)
            throw new ArgumentException("a 204 response has no body", nameof(body));
        if (contentType is not null && !IsFieldValue(contentType))
            throw new ArgumentException($"Content-Type '{contentType}' is empty or contains control characters", nameof(contentType));
        Status = status;
        Body = body;
        ContentType = body.IsEmpty ? contentType : contentType ?? "application/octet-stream";
    }

    public static HttpResponse Json(int status, ReadOnlyMemory<byte> utf8Json) => new(status, utf8Json, "application/json");

    public static HttpResponse NoContent() => new(204);

    /// <summary>Cloud Hypervisor's error form: a JSON array of messages, the outermost first
    /// (<c>["Error from API", "The VM could not boot", ...]</c>).</summary>
    public static HttpResponse Error(int status, params string[] messages)
    {
        var buffer = new ArrayBufferWriter<byte>(64);
        using (var writer = new Utf8JsonWriter(buffer))
        {
            writer.WriteStartArray();
            foreach (string message in messages)
                writer.WriteStringValue(message);
            writer.WriteEndArray();
        }
        return Json(status, buffer.WrittenMemory);
    }

    /// <summary>The standard reason phrase (RFC 9110 section 15), or "" for a code without one here (the status line
    /// then ends in "CODE ", which RFC 9112 allows).</summary>
    public static string ReasonPhrase(int status) => status switch
    {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    };

    private static bool IsFieldValue(string value)
    {
        if (value.Length == 0)
            return false;
        foreach (char c in value)
            if (c is < ' ' or > '~')
                return false;
        return true;
    }
}
