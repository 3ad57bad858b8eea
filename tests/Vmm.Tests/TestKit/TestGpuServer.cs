using System.Diagnostics;

namespace Vmm.Tests.TestKit;

/// <summary>The vfio-user test GPU (tests/Vmm.TestGpu, docs/test-gpu.md) running as its own process on a socket in a
/// temporary directory. Vmm.Tests references the project, so its build puts vfio-user-gpu.dll next to the tests;
/// the server's own bin folders are the fallback.</summary>
public sealed class TestGpuServer : IDisposable
{
    private readonly Process _process;
    private readonly string _dir;
    private readonly Task<string> _stdout, _stderr;

    private TestGpuServer(Process process, string dir, string socketPath, string reportPath)
    {
        _process = process;
        _dir = dir;
        SocketPath = socketPath;
        ReportPath = reportPath;
        _stdout = process.StandardOutput.ReadToEndAsync();
        _stderr = process.StandardError.ReadToEndAsync();
    }

    public string SocketPath { get; }
    public string ReportPath { get; }
    public Process Process => _process;

    /// <summary>vfio-user-gpu.dll of the current build, or the native binary named by VMM_TEST_GPU (to run these
    /// tests against the NativeAOT publish output).</summary>
    public static string ServerDll { get; } = FindServer();

    private static string FindServer()
    {
        if (Environment.GetEnvironmentVariable("VMM_TEST_GPU") is { Length: > 0 } native)
            return File.Exists(native) ? native : throw new InvalidOperationException($"VMM_TEST_GPU={native} does not exist");
        string next = Path.Combine(AppContext.BaseDirectory, "vfio-user-gpu.dll");
        if (File.Exists(next) && File.Exists(Path.ChangeExtension(next, ".runtimeconfig.json")))
            return next;
        foreach (string config in new[] { "Debug", "Release" })
        {
            string built = Repo.PathTo("tests", "Vmm.TestGpu", "bin", config, "net10.0", "vfio-user-gpu.dll");
            if (File.Exists(built))
                return built;
        }
        throw new InvalidOperationException($"vfio-user-gpu.dll is neither in {AppContext.BaseDirectory} nor under tests/Vmm.TestGpu/bin: build tests/Vmm.Tests (it references Vmm.TestGpu)");
    }

    /// <summary>Starts the server and waits until its socket exists.</summary>
    public static TestGpuServer Start(string? bar2Size = null)
    {
        string dir = Directory.CreateTempSubdirectory("vfio-user-").FullName;
        string socket = Path.Combine(dir, "gpu.sock"), report = Path.Combine(dir, "report.txt");
        bool native = !ServerDll.EndsWith(".dll", StringComparison.Ordinal);
        var psi = new ProcessStartInfo(native ? ServerDll : "dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        if (!native)
            psi.ArgumentList.Add(ServerDll);
        foreach (string a in new[] { "--socket", socket, "--report", report })
            psi.ArgumentList.Add(a);
        if (bar2Size is not null)
        {
            psi.ArgumentList.Add("--bar2-size");
            psi.ArgumentList.Add(bar2Size);
        }
        var server = new TestGpuServer(Process.Start(psi)!, dir, socket, report);
        var clock = Stopwatch.StartNew();
        while (!File.Exists(socket))
        {
            if (server._process.HasExited || clock.Elapsed > TimeSpan.FromSeconds(30))
            {
                string output = server.Output();
                server.Dispose();
                throw new InvalidOperationException($"vfio-user-gpu did not create {socket}: {output}");
            }
            Thread.Sleep(10);
        }
        return server;
    }

    /// <summary>Waits for the server to exit (after the client disconnected) and parses its --report file.</summary>
    public Dictionary<string, string> WaitForReport()
    {
        if (!_process.WaitForExit(TimeSpan.FromSeconds(30)))
            throw new TimeoutException("vfio-user-gpu did not exit after its client disconnected: " + Output());
        Assert.True(_process.ExitCode == 0, $"vfio-user-gpu exited with {_process.ExitCode}: {Output()}");
        return File.ReadAllLines(ReportPath)
            .Select(l => l.Split('=', 2))
            .ToDictionary(p => p[0], p => p.Length > 1 ? p[1] : "");
    }

    /// <summary>stdout and stderr so far (complete once the process exited).</summary>
    public string Output() => _process.HasExited ? $"{_stdout.Result}\n{_stderr.Result}" : "(still running)";

    public void Dispose()
    {
        try
        {
            if (!_process.HasExited)
                _process.Kill();
            _process.WaitForExit(5000);
        }
        catch (InvalidOperationException)
        {
        }
        _process.Dispose();
        Directory.Delete(_dir, recursive: true);
    }
}
