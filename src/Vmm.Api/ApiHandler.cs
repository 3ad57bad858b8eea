using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Vmm.Api.Http;
using Vmm.Machine;

namespace Vmm.Api;

/// <summary>Cloud Hypervisor's REST API under <c>/api/v1/</c>: the endpoints of CH's OpenAPI document with CH's
/// names, methods, bodies and error form (a JSON array of strings, outermost first). Endpoints of the document that
/// vmm does not implement answer 501 naming themselves; other paths 404. Handlers run on the server's threads; the
/// lifecycle actions they call lock the VM's state machine, never a vCPU.</summary>
public sealed class ApiHandler(VmmService service, Log log) : IHttpHandler
{
    public const string Root = "/api/v1/";

    private enum Method { Get, Put }

    private static readonly Dictionary<string, (Method Method, bool Body)> s_implemented = new()
    {
        ["vmm.ping"] = (Method.Get, false),
        ["vmm.shutdown"] = (Method.Put, false),
        ["vm.create"] = (Method.Put, true),
        ["vm.boot"] = (Method.Put, false),
        ["vm.shutdown"] = (Method.Put, false),
        ["vm.reboot"] = (Method.Put, false),
        ["vm.pause"] = (Method.Put, false),
        ["vm.resume"] = (Method.Put, false),
        ["vm.power-button"] = (Method.Put, false),
        ["vm.delete"] = (Method.Put, false),
        ["vm.info"] = (Method.Get, false),
        ["vm.counters"] = (Method.Get, false),
        ["vm.add-disk"] = (Method.Put, true),
        ["vm.add-net"] = (Method.Put, true),
        ["vm.add-device"] = (Method.Put, true),
        ["vm.add-user-device"] = (Method.Put, true),
        ["vm.add-fs"] = (Method.Put, true),
        ["vm.add-vsock"] = (Method.Put, true),
        ["vm.remove-device"] = (Method.Put, true),
    };

    /// <summary>The rest of CH's document (cloud-hypervisor.yaml): known, not implemented yet.</summary>
    public static readonly IReadOnlyList<string> NotImplemented =
    [
        "vm.nmi", "vm.resize", "vm.resize-disk", "vm.resize-zone",
        "vm.add-generic-vhost-user", "vm.add-pmem", "vm.add-vdpa", "vm.snapshot",
        "vm.coredump", "vm.restore", "vm.receive-migration", "vm.send-migration",
    ];

    public static IEnumerable<string> Implemented => s_implemented.Keys;

    public ValueTask<HttpResponse> HandleAsync(HttpRequest request, CancellationToken cancellation) =>
        ValueTask.FromResult(Handle(request));

    private HttpResponse Handle(HttpRequest request)
    {
        if (!request.Path.StartsWith(Root, StringComparison.Ordinal))
            return HttpResponse.Error(404, "Not Found", $"{request.Path}: the API lives under {Root}");
        string name = request.Path[Root.Length..];
        if (!s_implemented.TryGetValue(name, out var route))
        {
            if (NotImplemented.Contains(name))
                return HttpResponse.Error(501, "Not Implemented", $"{name} is not implemented by vmm {VmmService.Version}");
            return HttpResponse.Error(404, "Not Found", $"{request.Path}: no such endpoint");
        }
        string expected = route.Method == Method.Get ? "GET" : "PUT";
        if (request.Method != expected)
            return HttpResponse.Error(400, "Bad Request", $"{name} takes {expected}, not {request.Method}");
        if (!route.Body && request.Body.Length > 0)
            return HttpResponse.Error(400, "Bad Request", $"{name} takes no body");
        if (route.Body && request.Body.Length == 0)
            return HttpResponse.Error(400, "Bad Request", $"{name} needs a JSON body");
        try
        {
            return name switch
            {
                "vmm.ping" => Json(200, service.Ping(), ApiJsonContext.Default.VmmPingResponse),
                "vmm.shutdown" => VmmShutdown(),
                "vm.create" => Create(request.Body),
                "vm.boot" => Done(service.Boot),
                "vm.shutdown" => Done(service.Shutdown),
                "vm.reboot" => Done(service.Reboot),
                "vm.pause" => Done(service.Pause),
                "vm.resume" => Done(service.Resume),
                "vm.power-button" => Done(service.PowerButton),
                "vm.delete" => Done(service.Delete),
                "vm.info" => Json(200, service.Info(), ApiJsonContext.Default.VmInfo),
                "vm.counters" => Json(200, service.Counters(), ApiJsonContext.Default.DictionaryStringDictionaryStringUInt64),
                "vm.add-disk" => Added(request.Body, ApiJsonContext.Default.DiskConfig, service.AddDisk),
                "vm.add-net" => Added(request.Body, ApiJsonContext.Default.NetConfig, service.AddNet),
                "vm.add-device" => Added(request.Body, ApiJsonContext.Default.DeviceConfig, service.AddDevice),
                "vm.add-user-device" => Added(request.Body, ApiJsonContext.Default.UserDeviceConfig, service.AddUserDevice),
                "vm.add-fs" => Added(request.Body, ApiJsonContext.Default.FsConfig, service.AddFs),
                "vm.add-vsock" => Added(request.Body, ApiJsonContext.Default.VsockConfig, service.AddVsock),
                "vm.remove-device" => RemoveDevice(request.Body),
                _ => HttpResponse.Error(500, "internal error", $"{name} has no handler"),
            };
        }
        catch (ApiException e)
        {
            if (e.Status >= 500)
                log.Warn($"API {name}: {e.Message}");
            return HttpResponse.Error(e.Status, [.. e.Messages]);
        }
    }

    private HttpResponse Create(ReadOnlyMemory<byte> body)
    {
        VmConfig config;
        try
        {
            config = ParseVmConfig(body.Span);
        }
        catch (VmConfigException e)
        {
            return HttpResponse.Error(400, ["Failed to deserialize JSON", .. e.Problems]);
        }
        service.Create(config);
        return HttpResponse.NoContent();
    }

    /// <summary>Parses a VmConfig (vm.create's body, `vmm run --config`): malformed JSON, invalid UTF-8, a wrong type,
    /// a missing required field and a property outside CH's schema each give one message naming where.</summary>
    public static VmConfig ParseVmConfig(ReadOnlySpan<byte> json) => Parse(json, ApiJsonContext.Default.VmConfig);

    /// <summary>Parses a body of CH's schema (<see cref="ParseVmConfig"/>'s rules) as <typeparamref name="T"/>.</summary>
    public static T Parse<T>(ReadOnlySpan<byte> json, JsonTypeInfo<T> type) where T : class
    {
        try
        {
            return JsonSerializer.Deserialize(json, type)
                ?? throw new VmConfigException([$"the body is null, not a {typeof(T).Name} object"]);
        }
        catch (JsonException e)
        {
            // System.Text.Json appends "Path: $.x | LineNumber: ..." to its own messages but not to those with a fixed
            // text (a property outside the schema names itself and its type only): add where it is for those too.
            string message = e.Path is { Length: > 0 } path && !e.Message.Contains("Path: ", StringComparison.Ordinal)
                ? $"{e.Message} Path: {path}"
                : e.Message;
            throw new VmConfigException([message]);
        }
        catch (Exception e) when (e is InvalidOperationException or ArgumentException or FormatException)
        {
            throw new VmConfigException([e.Message]); // e.g. invalid UTF-8 inside a string
        }
    }

    /// <summary>A vm.add-* call: the body parsed as CH's config object of that kind, then CH's answer, 200 with
    /// PciDeviceInfo (the id and the PCI address) for a hotplug, 204 for a device added to the config only.</summary>
    private static HttpResponse Added<T>(ReadOnlyMemory<byte> body, JsonTypeInfo<T> type, Func<T, PciDeviceInfoResponse?> add) where T : class
    {
        T config;
        try
        {
            config = Parse(body.Span, type);
        }
        catch (VmConfigException e)
        {
            return HttpResponse.Error(400, ["Failed to deserialize JSON", .. e.Problems]);
        }
        // 204: added to the config of a VM not running (CH's "cold added").
        return add(config) is { } info ? Json(200, info, ApiJsonContext.Default.PciDeviceInfoResponse) : HttpResponse.NoContent();
    }

    private HttpResponse RemoveDevice(ReadOnlyMemory<byte> body)
    {
        VmRemoveDevice request;
        try
        {
            request = Parse(body.Span, ApiJsonContext.Default.VmRemoveDevice);
        }
        catch (VmConfigException e)
        {
            return HttpResponse.Error(400, ["Failed to deserialize JSON", .. e.Problems]);
        }
        service.RemoveDevice(request.Id!);
        return HttpResponse.NoContent();
    }

    private HttpResponse VmmShutdown()
    {
        // CH answers 200 without a body; the process ends once the answer is out.
        service.Delete();
        return new HttpResponse(200) { AfterSent = () => service.ShutdownVmm() };
    }

    private static HttpResponse Done(Action action)
    {
        action();
        return HttpResponse.NoContent();
    }

    private static HttpResponse Json<T>(int status, T value, JsonTypeInfo<T> type) =>
        HttpResponse.Json(status, JsonSerializer.SerializeToUtf8Bytes(value, type));
}
