using System.Text.Json.Serialization;

var path = args[0];
if (File.Exists(path)) File.Delete(path);
var builder = WebApplication.CreateSlimBuilder(args.Skip(1).ToArray());
builder.Logging.ClearProviders();
builder.WebHost.ConfigureKestrel(o => o.ListenUnixSocket(path));
builder.Services.ConfigureHttpJsonOptions(o => o.SerializerOptions.TypeInfoResolverChain.Insert(0, AppJson.Default));
var app = builder.Build();
app.MapGet("/api/v1/vmm.ping", () => new VmmInfo("x", "0.1", Environment.ProcessId, Array.Empty<string>()));
await app.StartAsync();
Console.Out.Write("ready\n");
Console.Out.Flush();
var stdin = Console.OpenStandardInput();
var sbuf = new byte[256];
while (stdin.Read(sbuf, 0, sbuf.Length) > 0) { }
await app.StopAsync();
try { File.Delete(path); } catch { }

public sealed record VmmInfo(
    [property: JsonPropertyName("build_version")] string BuildVersion,
    [property: JsonPropertyName("version")] string Version,
    [property: JsonPropertyName("pid")] int Pid,
    [property: JsonPropertyName("features")] string[] Features);

[JsonSerializable(typeof(VmmInfo))]
internal partial class AppJson : JsonSerializerContext { }
