namespace Vmm.Api.Http;

/// <summary>Answers requests. Called concurrently from different connections (one request at a time per
/// connection): the handler does its own locking. An exception becomes a 500 and the connection goes on.
/// <paramref name="cancellation"/> fires when the server is disposed.</summary>
public interface IHttpHandler
{
    ValueTask<HttpResponse> HandleAsync(HttpRequest request, CancellationToken cancellation);
}
