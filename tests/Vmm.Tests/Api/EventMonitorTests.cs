using System.Text.Json;
using Vmm.Api;
using Vmm.Machine;

namespace Vmm.Tests.Api;

public sealed class EventMonitorTests : IDisposable
{
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("vmm-events-");
    private readonly StringWriter _logText = new();

    public void Dispose() => _dir.Delete(recursive: true);

    private Log Log => new(LogLevel.Warn, _logText);

    [Fact]
    public void Events_are_pretty_JSON_objects_in_CH_form_separated_by_blank_lines()
    {
        string file = Path.Combine(_dir.FullName, "events");
        File.WriteAllText(file, new string('x', 1000)); // truncated, as CH does
        using (var monitor = EventMonitor.Open("path=" + file, Log))
        {
            monitor.Emit("vmm", "starting");
            monitor.Emit("vm", "device-removed", new Dictionary<string, string> { ["id"] = "_disk0", ["bdf"] = "0000:00:03.0" });
        }
        string text = File.ReadAllText(file);
        Assert.DoesNotContain("xxx", text);
        string[] parts = text.Split("\n\n");
        Assert.Equal(3, parts.Length);
        Assert.Equal("", parts[2]);
        Assert.StartsWith("{\n  \"timestamp\": {\n    \"secs\": 0,\n    \"nanos\": ", parts[0]);
        Assert.EndsWith("\n  \"source\": \"vmm\",\n  \"event\": \"starting\",\n  \"properties\": null\n}", parts[0]);
        using var second = JsonDocument.Parse(parts[1]);
        Assert.Equal("device-removed", second.RootElement.GetProperty("event").GetString());
        Assert.Equal("_disk0", second.RootElement.GetProperty("properties").GetProperty("id").GetString());
        Assert.Equal("0000:00:03.0", second.RootElement.GetProperty("properties").GetProperty("bdf").GetString());
        Assert.Equal("", _logText.ToString());
    }

    [Theory]
    [InlineData("fd=x", "fd must be a file descriptor number")]
    [InlineData("fd=-1", "fd must be a file descriptor number")]
    [InlineData("fd=987654", "fd 987654 is not open")]
    [InlineData("path=/nonexistent-dir/events", "directory /nonexistent-dir does not exist")]
    public void Bad_specs_are_refused_naming_the_problem(string spec, string message)
    {
        var e = Assert.Throws<ConfigException>(() => EventMonitor.Open(spec, Log));
        Assert.Contains(message, e.Message);
        Assert.StartsWith("--event-monitor", e.Message);
    }

    [Fact]
    public void A_directory_is_refused()
    {
        var e = Assert.Throws<ConfigException>(() => EventMonitor.Open("path=" + _dir.FullName, Log));
        Assert.Contains("is a directory", e.Message);
    }

    [Fact]
    public void The_service_emits_deleted_and_shutdown_as_CH_does()
    {
        var sink = new RecordingSink();
        using var service = new VmmService(new Log(LogLevel.Error, TextWriter.Null), sink, _ => new ConsoleStreams(null, null));
        service.Delete(); // nothing to delete: no event, as CH
        service.Create(new VmConfig { Payload = new PayloadConfig { Kernel = "/k" } });
        service.Delete();
        service.Create(new VmConfig { Payload = new PayloadConfig { Kernel = "/k" } });
        service.ShutdownVmm();
        Assert.Equal(["vm deleted", "vm deleted", "vmm shutdown"], sink.Events);
    }

    private sealed class RecordingSink : IVmEventSink
    {
        public List<string> Events { get; } = [];

        public void Emit(string source, string name, IReadOnlyDictionary<string, string>? properties = null)
        {
            lock (Events)
                Events.Add($"{source} {name}");
        }
    }
}
