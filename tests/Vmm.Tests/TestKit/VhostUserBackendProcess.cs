using System.Diagnostics;
using System.Text;

namespace Vmm.Tests.TestKit;

/// <summary>A real vhost-user back-end process of this host (virtiofsd, qemu-storage-daemon) in a temporary
/// directory: started, awaited until its socket exists, killed on dispose. A missing binary fails the test with
/// the package to install — never a skip.</summary>
public sealed class VhostUserBackendProcess : IDisposable
{
    public const string Virtiofsd = "/usr/lib/qemu/virtiofsd";
    public const string StorageDaemon = "/usr/bin/qemu-storage-daemon";

    private readonly Process _process;
    private readonly StringBuilder _output = new();

    private VhostUserBackendProcess(string binary, string socketPath, IEnumerable<string> args)
    {
        if (!File.Exists(binary))
            Assert.Fail($"{binary} is missing: install the Debian package qemu-system-common (test.sh installs qemu-system-x86, which depends on it)");
        SocketPath = socketPath;
        var psi = new ProcessStartInfo(binary) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        _process = Process.Start(psi)!;
        _process.OutputDataReceived += (_, e) => { lock (_output) _output.AppendLine(e.Data); };
        _process.ErrorDataReceived += (_, e) => { lock (_output) _output.AppendLine(e.Data); };
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
        var sw = Stopwatch.StartNew();
        while (!File.Exists(socketPath))
        {
            if (_process.HasExited || sw.Elapsed > TimeSpan.FromSeconds(10))
                Assert.Fail($"{binary} did not create {socketPath} (exited: {_process.HasExited}); its output:\n{Output}");
            Thread.Sleep(10);
        }
    }

    public string SocketPath { get; }

    public string Output
    {
        get { lock (_output) return _output.ToString(); }
    }

    public bool HasExited => _process.HasExited;

    /// <summary>virtiofsd sharing <paramref name="sharedDir"/> (cache=none: every read reaches the host file).</summary>
    public static VhostUserBackendProcess StartVirtiofsd(string socketPath, string sharedDir) =>
        new(Virtiofsd, socketPath, [$"--socket-path={socketPath}", "-o", $"source={sharedDir}", "-o", "cache=none"]);

    /// <summary>qemu-storage-daemon exporting the raw image <paramref name="image"/> as a writable vhost-user-blk device.</summary>
    public static VhostUserBackendProcess StartStorageDaemon(string socketPath, string image) =>
        new(StorageDaemon, socketPath, ["--blockdev", $"driver=file,node-name=f,filename={image}",
            "--export", $"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socketPath},writable=on"]);

    public void Kill()
    {
        if (!_process.HasExited)
        {
            _process.Kill();
            _process.WaitForExit(5000);
        }
    }

    public void Dispose()
    {
        Kill();
        _process.Dispose();
    }
}
