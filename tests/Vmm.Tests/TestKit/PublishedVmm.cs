namespace Vmm.Tests.TestKit;

/// <summary>The NativeAOT vmm (dotnet publish), built once per test run and shared by every fixture that needs the
/// native executable (the KVM scenarios, the jail): two publishes into one folder at once would collide.</summary>
public static class PublishedVmm
{
    private static readonly Lazy<string> s_path = new(() =>
    {
        if (Environment.GetEnvironmentVariable("VMM_BINARY") is { Length: > 0 } given)
            return given;
        string output = Repo.PathTo("artifacts", "test-vmm");
        Repo.MustRun("dotnet", "publish", Repo.PathTo("src", "Vmm.Cli"), "-c", "Release", "-o", output, "--nologo");
        return System.IO.Path.Combine(output, "vmm");
    }, LazyThreadSafetyMode.ExecutionAndPublication);

    public static string Path => s_path.Value;
}
