using Vmm.Api;

namespace Vmm.Tests.Api;

public class ChSchemaTests
{
    [Fact]
    public void The_JSON_fixture_has_CH_paths_and_the_schemas_the_tests_use()
    {
        var doc = ChSchema.Document;
        Assert.StartsWith("3.", doc.GetProperty("openapi").GetString());
        Assert.Equal("Cloud Hypervisor API", doc.GetProperty("info").GetProperty("title").GetString());
        var paths = doc.GetProperty("paths").EnumerateObject().Select(p => p.Name).ToList();
        Assert.Equal(31, paths.Count);
        var schemas = doc.GetProperty("components").GetProperty("schemas");
        Assert.Equal(57, schemas.EnumerateObject().Count());
        foreach (string name in new[] { "VmmPingResponse", "VmInfo", "VmConfig", "VmState", "DiskConfig", "NetConfig", "MemoryConfig", "CpusConfig",
                     "RngConfig", "ConsoleConfig", "SerialConfig", "DeviceConfig", "UserDeviceConfig", "PlatformConfig", "VsockConfig", "VmCounters" })
            Assert.True(schemas.TryGetProperty(name, out _), $"schema {name} is missing");
    }

    [Fact]
    public void The_JSON_fixture_is_the_YAML_converted()
    {
        // Not a YAML parser: every path and every schema name of the JSON appears as a YAML key, and vice versa for
        // the top-level keys of the paths section (two-space indent, "/name:").
        string yaml = File.ReadAllText(ChSchema.FixturePath("cloud-hypervisor.yaml"));
        var yamlPaths = yaml.Split('\n').Where(l => l.StartsWith("  /", StringComparison.Ordinal) && l.TrimEnd().EndsWith(':'))
            .Select(l => l.Trim().TrimEnd(':')).ToHashSet();
        var jsonPaths = ChSchema.Document.GetProperty("paths").EnumerateObject().Select(p => p.Name).ToHashSet();
        Assert.Equal(yamlPaths.Order(), jsonPaths.Order());
        foreach (var schema in ChSchema.Document.GetProperty("components").GetProperty("schemas").EnumerateObject())
            Assert.Contains($"\n    {schema.Name}:", yaml);
        Assert.Contains("boot_vcpus", yaml);
    }

    [Fact]
    public void CH_paths_are_exactly_what_vmm_implements_plus_what_it_answers_501_for()
    {
        var paths = ChSchema.Document.GetProperty("paths").EnumerateObject().Select(p => p.Name.TrimStart('/')).Order();
        Assert.Equal(paths, ApiHandler.Implemented.Concat(ApiHandler.NotImplemented).Order());
        Assert.Empty(ApiHandler.Implemented.Intersect(ApiHandler.NotImplemented));
    }

    [Fact]
    public void The_validator_reports_violations_naming_where()
    {
        Assert.Empty(ChSchema.Validate("""{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1,"max_vcpus":1}}""", "VmConfig"));
        var errors = ChSchema.Validate("""{"payload":{},"cpus":{"boot_vcpus":0,"max_vcpus":1},"memory":{"size":"big"}}""", "VmConfig");
        Assert.Contains(errors, e => e.StartsWith("/cpus/boot_vcpus: minimum", StringComparison.Ordinal));
        Assert.Contains(errors, e => e.StartsWith("/memory/size: type", StringComparison.Ordinal));
        Assert.Contains(ChSchema.Validate("""{"cpus":{"boot_vcpus":1,"max_vcpus":1}}""", "VmConfig"), e => e.Contains("payload"));
        Assert.Throws<ArgumentException>(() => ChSchema.Validate("{}", "NoSuchSchema"));
    }
}
