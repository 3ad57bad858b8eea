namespace Vmm.Api.Http;

/// <summary>The API socket could not be created: the message names the path and the reason.</summary>
public sealed class ApiSocketException(string message) : Exception(message);
