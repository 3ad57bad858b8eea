using System.Text.Json;
using Vmm.Api;
using Vmm.Api.Http;
using Vmm.Machine;

namespace Vmm.Tests.TestKit;

/// <summary>The API end to end on a socket in a temporary directory: <see cref="ApiClient"/> → <see cref="HttpServer"/>
/// → <see cref="ApiHandler"/> → <see cref="VmmService"/>. KVM is forced missing (KvmPath), so vm.boot fails the same on
/// every host, with or without /dev/kvm.</summary>
public sealed class ApiTestHost : IDisposable
{
    public ApiTestHost(string prefix)
    {
        Dir = Directory.CreateTempSubdirectory(prefix);
        var log = new Log(LogLevel.Error, TextWriter.Null);
        Service = new VmmService(log, null, _ => new ConsoleStreams(null, null), adjust: m => m with { KvmPath = "/nonexistent/kvm" });
        Server = HttpServer.Listen(Path.Combine(Dir.FullName, "api.sock"), new ApiHandler(Service, log));
        Client = new ApiClient(Path.Combine(Dir.FullName, "api.sock"), TimeSpan.FromSeconds(10));
    }

    public DirectoryInfo Dir { get; }
    public VmmService Service { get; }
    public HttpServer Server { get; }
    public ApiClient Client { get; }

    /// <summary>A kernel that loads (a multiboot ELF) in the directory: vm.boot gets past the payload and fails only at
    /// /dev/kvm.</summary>
    public string KernelFile()
    {
        string path = Path.Combine(Dir.FullName, "kernel.elf");
        File.WriteAllBytes(path, ImageBuilder.Elf(false, 0x10_0000, [new ImageBuilder.Segment(0x10_0000, ImageBuilder.MultibootHeaderBytes())]));
        return path;
    }

    /// <summary>A vm.create body: that kernel, 64 MiB, and <paramref name="extra"/> (",\"disks\":[…]" and the like).</summary>
    public static string Config(string kernel, string extra = "") =>
        $$"""{"payload":{"kernel":{{JsonSerializer.Serialize(kernel)}}},"memory":{"size":67108864}{{extra}}}""";

    /// <summary>The messages of an error answer (CH's JSON array of strings).</summary>
    public static string[] Messages(ApiResponse r)
    {
        var messages = JsonSerializer.Deserialize<string[]>(r.Body);
        Assert.NotNull(messages);
        return messages;
    }

    public static void AssertError(ApiResponse r, int status, string contained)
    {
        Assert.True(r.Status == status, $"expected {status}, got {r.Status}: {r.Body}");
        Assert.Contains(Messages(r), m => m.Contains(contained, StringComparison.Ordinal));
    }

    public void Dispose()
    {
        Server.Dispose();
        Service.Dispose();
        Dir.Delete(recursive: true);
    }
}
