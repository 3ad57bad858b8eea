using System.Diagnostics;
using BenchmarkDotNet.Attributes;
using Vmm.Devices.Vfio.User;

namespace Vmm.Benchmarks;

/// <summary>A trapped 4-byte register access of a passed-through vfio-user device, as a vCPU thread makes it when
/// the guest touches a BAR page that is not mmapped: one <see cref="VfioUserClient.ReadRegion"/> or
/// <see cref="VfioUserClient.WriteRegion"/> of BAR0's SCRATCH register (offset 8) on the vfio-user test GPU
/// (tests/Vmm.TestGpu, docs/test-gpu.md), a separate process on an AF_UNIX socket. One operation is one full round
/// trip: request out, the server wakes, answers, the client wakes and checks the reply. Must allocate 0 B.</summary>
[MemoryDiagnoser]
public class VfioUserRegionBenchmarks
{
    private const int Bar0 = 0;
    private const ulong RegScratch = 0x08;

    private Process _server = null!;
    private string _dir = null!;
    private VfioUserClient _client = null!;
    private readonly byte[] _value = new byte[4];

    [GlobalSetup]
    public void Setup()
    {
        _dir = Directory.CreateTempSubdirectory("vfio-user-bench-").FullName;
        string socket = Path.Combine(_dir, "gpu.sock");
        string server = FindServer();
        bool native = !server.EndsWith(".dll", StringComparison.Ordinal);
        var psi = new ProcessStartInfo(native ? server : "dotnet") { UseShellExecute = false };
        if (!native)
            psi.ArgumentList.Add(server);
        foreach (string a in new[] { "--socket", socket, "--report", Path.Combine(_dir, "report.txt") })
            psi.ArgumentList.Add(a);
        _server = Process.Start(psi) ?? throw new InvalidOperationException("cannot start " + server);
        var clock = Stopwatch.StartNew();
        while (!File.Exists(socket))
        {
            if (_server.HasExited || clock.Elapsed > TimeSpan.FromSeconds(30))
                throw new InvalidOperationException($"the test GPU ({server}) did not create {socket}");
            Thread.Sleep(10);
        }
        _client = VfioUserClient.Connect(socket);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _client.Dispose(); // the server exits when its client goes
        if (!_server.WaitForExit(5000))
            _server.Kill();
        _server.Dispose();
        Directory.Delete(_dir, recursive: true);
    }

    /// <summary>A guest's 4-byte read of a trapped register.</summary>
    [Benchmark(Baseline = true)]
    public byte ReadRegister()
    {
        _client.ReadRegion(Bar0, RegScratch, _value);
        return _value[0];
    }

    /// <summary>A guest's 4-byte write of a trapped register (the server acknowledges it).</summary>
    [Benchmark]
    public void WriteRegister() => _client.WriteRegion(Bar0, RegScratch, _value);

    /// <summary>vfio-user-gpu: VMM_TEST_GPU (a NativeAOT binary), next to this assembly (the project references
    /// Vmm.TestGpu), or the server's own build output.</summary>
    private static string FindServer()
    {
        if (Environment.GetEnvironmentVariable("VMM_TEST_GPU") is { Length: > 0 } native)
            return native;
        string next = Path.Combine(AppContext.BaseDirectory, "vfio-user-gpu.dll");
        if (File.Exists(next))
            return next;
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            foreach (string config in new[] { "Release", "Debug" })
            {
                string built = Path.Combine(dir.FullName, "tests", "Vmm.TestGpu", "bin", config, "net10.0", "vfio-user-gpu.dll");
                if (File.Exists(built))
                    return built;
            }
        }
        throw new InvalidOperationException("vfio-user-gpu.dll not found: build benchmarks/Vmm.Benchmarks (it references tests/Vmm.TestGpu) or set VMM_TEST_GPU");
    }
}
