using System.Text.Json;
using Json.Schema;

namespace Vmm.Tests.Api;

/// <summary>Cloud Hypervisor's OpenAPI document (Api/Fixtures/cloud-hypervisor.json, see the README there) as a JSON
/// Schema registry: <see cref="Validate"/> checks a JSON text against <c>#/components/schemas/NAME</c> and returns
/// one readable line per violation ("/config/cpus/boot_vcpus: minimum: 0 should be at least 1"), empty when valid.
/// The whole document is registered as a base document so its internal <c>#/components/schemas/...</c> references
/// resolve; CH's components use only plain 2020-12 keywords (no <c>nullable</c>), so no rewriting is needed.</summary>
public static class ChSchema
{
    private static readonly Uri BaseUri = new("https://vmm.invalid/cloud-hypervisor.json");
    private static readonly Lock Lock = new();
    private static readonly Dictionary<string, JsonSchema> Schemas = [];

    public static string FixturePath(string name) => Path.Combine(AppContext.BaseDirectory, "Api", "Fixtures", name);

    /// <summary>The document (parsed once).</summary>
    public static JsonElement Document { get; } = LoadDocument();

    private static readonly BuildOptions Build = CreateBuildOptions();

    private static JsonElement LoadDocument()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(FixturePath("cloud-hypervisor.json")));
        return doc.RootElement.Clone();
    }

    private static BuildOptions CreateBuildOptions()
    {
        var registry = new SchemaRegistry();
        registry.Register(BaseUri, new JsonElementBaseDocument(Document, BaseUri));
        return new BuildOptions { SchemaRegistry = registry };
    }

    private static JsonSchema SchemaFor(string name)
    {
        lock (Lock)
        {
            if (!Document.GetProperty("components").GetProperty("schemas").TryGetProperty(name, out _))
                throw new ArgumentException($"CH's document has no schema {name}", nameof(name));
            if (!Schemas.TryGetValue(name, out var schema))
                Schemas[name] = schema = JsonSchema.FromText($$"""{"$ref":"{{BaseUri}}#/components/schemas/{{name}}"}""", Build);
            return schema;
        }
    }

    /// <summary>The violations of <paramref name="json"/> against schema <paramref name="name"/>; empty when valid.</summary>
    public static IReadOnlyList<string> Validate(string json, string name)
    {
        var schema = SchemaFor(name);
        using var instance = JsonDocument.Parse(json);
        EvaluationResults result;
        lock (Lock) // evaluation shares the registry; tests run in parallel
            result = schema.Evaluate(instance.RootElement, new EvaluationOptions { OutputFormat = OutputFormat.List });
        if (result.IsValid)
            return [];
        var errors = new List<string>();
        foreach (var d in result.Details ?? [])
        {
            foreach (var (keyword, message) in d.Errors ?? new Dictionary<string, string>())
                errors.Add($"{(d.InstanceLocation.ToString() is { Length: > 0 } at ? at : "/")}: {keyword}: {message}");
        }
        if (errors.Count == 0)
            errors.Add("invalid (no details)");
        return errors;
    }

    /// <summary>Asserts that <paramref name="json"/> is a valid <paramref name="name"/>, listing the violations if not.</summary>
    public static void AssertValid(string json, string name)
    {
        var errors = Validate(json, name);
        Assert.True(errors.Count == 0, $"not a valid CH {name}:\n  {string.Join("\n  ", errors)}\n{json}");
    }
}
