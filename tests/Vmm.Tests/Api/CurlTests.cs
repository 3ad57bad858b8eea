using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using Tmds.Linux;
using Vmm.Cli;

namespace Vmm.Tests.Api;

/// <summary>The vmm process as a control plane meets it: `vmm --api-socket SOCK` (the vmm.dll of this build, run with
/// dotnet), driven by Debian's curl and by `vmm remote`. No VM boots here (that would use the host's /dev/kvm): the
/// configs given have a kernel file that does not exist, so vm.boot fails with 400 on every host.</summary>
public sealed class CurlTests : IDisposable
{
    private const string CurlPath = "/usr/bin/curl";
    private static readonly TimeSpan StartTimeout = TimeSpan.FromSeconds(20);

    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("vmm-curl-");
    private readonly List<Process> _processes = [];

    private string Sock => Path.Combine(_dir.FullName, "api.sock");

    private static string VmmDll
    {
        get
        {
            string dll = Path.Combine(AppContext.BaseDirectory, "vmm.dll");
            Assert.True(File.Exists(dll), $"{dll} is missing: build tests/Vmm.Tests (it references src/Vmm.Cli)");
            return dll;
        }
    }

    public void Dispose()
    {
        foreach (var p in _processes)
        {
            try
            {
                if (!p.HasExited)
                    p.Kill();
                p.WaitForExit(5000);
            }
            catch (InvalidOperationException)
            {
            }
            p.Dispose();
        }
        _dir.Delete(recursive: true);
    }

    /// <summary>A running `vmm --api-socket SOCK ARGS`, once its socket file exists (it appears once the API answers).</summary>
    private sealed class VmmProcess(Process process, StringBuilder stderr)
    {
        public Process Process { get; } = process;

        public string Stderr
        {
            get
            {
                lock (stderr)
                    return stderr.ToString();
            }
        }

        public int WaitForExit(TimeSpan timeout)
        {
            Assert.True(Process.WaitForExit(timeout), $"vmm did not exit within {timeout}; stderr: {Stderr}");
            Process.WaitForExit(); // the output readers are done too
            return Process.ExitCode;
        }
    }

    private VmmProcess StartVmm(string socket, params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = _dir.FullName,
        };
        foreach (string a in (string[])[VmmDll, "--api-socket", socket, .. args])
            psi.ArgumentList.Add(a);
        var stderr = new StringBuilder();
        var process = new Process { StartInfo = psi };
        process.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is not null)
                lock (stderr)
                    stderr.AppendLine(e.Data);
        };
        process.OutputDataReceived += (_, _) => { };
        Assert.True(process.Start());
        _processes.Add(process);
        process.BeginErrorReadLine();
        process.BeginOutputReadLine();
        var vmm = new VmmProcess(process, stderr);
        var clock = Stopwatch.StartNew();
        while (!(File.Exists(socket) && CanConnect(socket)))
        {
            Assert.False(process.HasExited, $"vmm exited with {(process.HasExited ? process.ExitCode : 0)} before serving {socket}: {vmm.Stderr}");
            Assert.True(clock.Elapsed < StartTimeout, $"vmm did not create {socket} within {StartTimeout}: {vmm.Stderr}");
            Thread.Sleep(10);
        }
        return vmm;
    }

    private static bool CanConnect(string path)
    {
        using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            s.Connect(new UnixDomainSocketEndPoint(path));
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    private static Vmm.Tests.TestKit.Repo.Result Run(string file, params string[] args) =>
        Vmm.Tests.TestKit.Repo.Run(file, args, timeout: TimeSpan.FromSeconds(30), stdin: "");

    /// <summary>curl's status code and body for one request.</summary>
    private static (int Status, string Body) Curl(string socket, string method, string endpoint, params string[] extra)
    {
        Assert.True(File.Exists(CurlPath), $"{CurlPath} is missing: install Debian's curl (apt-get install curl) to run these tests");
        var r = Run(CurlPath, ["-sS", "--max-time", "10", "--unix-socket", socket, "-X", method, "-w", "\n%{http_code}", .. extra,
            $"http://localhost/api/v1/{endpoint}"]);
        Assert.True(r.ExitCode == 0, $"curl {method} {endpoint} failed ({r.ExitCode}): {r.Stderr}");
        int nl = r.Stdout.LastIndexOf('\n');
        return (int.Parse(r.Stdout[(nl + 1)..]), r.Stdout[..nl]);
    }

    private string ConfigFile(string? kernel = null)
    {
        string path = Path.Combine(_dir.FullName, "vm.json");
        kernel ??= Path.Combine(_dir.FullName, "no-such-kernel");
        File.WriteAllText(path, $$"""
            {
              "payload": {"kernel": {{JsonSerializer.Serialize(kernel)}}},
              "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
              "memory": {"size": 67108864},
              "serial": {"mode": "Off"},
              "console": {"mode": "Off"}
            }
            """);
        return path;
    }

    private (int Status, string Body) Create(string socket) =>
        Curl(socket, "PUT", "vm.create", "-H", "Content-Type: application/json", "--data", "@" + ConfigFile());

    private static string[] Messages(string body) => JsonSerializer.Deserialize<string[]>(body)!;

    [Fact]
    public void Ping_answers_the_version_and_the_vmm_process_id()
    {
        var vmm = StartVmm(Sock);
        var (status, body) = Curl(Sock, "GET", "vmm.ping");
        Assert.Equal(200, status);
        ChSchema.AssertValid(body, "VmmPingResponse");
        using var doc = JsonDocument.Parse(body);
        Assert.Equal(vmm.Process.Id, doc.RootElement.GetProperty("pid").GetInt32());
        Assert.Equal(Vmm.Api.VmmService.Version, doc.RootElement.GetProperty("version").GetString());
    }

    [Fact]
    public void Create_with_a_data_file_is_204_and_info_then_says_Created()
    {
        StartVmm(Sock);
        Assert.Equal((204, ""), Create(Sock));
        var (status, body) = Curl(Sock, "GET", "vm.info");
        Assert.Equal(200, status);
        ChSchema.AssertValid(body, "VmInfo");
        Assert.Equal("Created", JsonDocument.Parse(body).RootElement.GetProperty("state").GetString());
    }

    [Fact]
    public void Pause_boot_an_unimplemented_endpoint_and_invalid_JSON_get_CH_status_codes()
    {
        StartVmm(Sock);
        Assert.Equal((204, ""), Create(Sock));
        var (status, body) = Curl(Sock, "PUT", "vm.pause");
        Assert.Equal(405, status);
        Assert.Contains(Messages(body), m => m.Contains("Created", StringComparison.Ordinal));

        (status, body) = Curl(Sock, "PUT", "vm.boot"); // the kernel file does not exist: the same 400 with or without KVM
        Assert.Equal(400, status);
        Assert.Contains(Messages(body), m => m.Contains("payload.kernel", StringComparison.Ordinal));

        (status, body) = Curl(Sock, "PUT", "vm.snapshot", "-H", "Content-Type: application/json", "--data", """{"destination_url":"file:///tmp/s"}""");
        Assert.Equal(501, status);
        Assert.Contains(Messages(body), m => m.Contains("vm.snapshot", StringComparison.Ordinal));

        (status, body) = Curl(Sock, "PUT", "vm.create", "-H", "Content-Type: application/json", "--data", """{"payload":""");
        Assert.Equal(400, status);
        Assert.Equal("Failed to deserialize JSON", Messages(body)[0]);

        Assert.Equal(200, Curl(Sock, "GET", "vm.info").Status); // still the first VM
    }

    [Fact]
    public void Every_endpoint_of_CH_s_document_answers_curl_with_its_status_and_body_form()
    {
        StartVmm(Sock);
        // Without a VM.
        foreach (var (method, name, status) in new[] { ("GET", "vm.info", 404), ("GET", "vm.counters", 404), ("PUT", "vm.boot", 404),
                     ("PUT", "vm.pause", 404), ("PUT", "vm.resume", 404), ("PUT", "vm.shutdown", 404), ("PUT", "vm.reboot", 404),
                     ("PUT", "vm.power-button", 404), ("PUT", "vm.delete", 204) })
        {
            var (got, body) = Curl(Sock, method, name);
            Assert.True(got == status, $"{method} {name} without a VM: {got} {body}");
            if (status >= 400)
                Assert.Contains("VM is not created", Messages(body));
        }
        Assert.Equal((204, ""), Create(Sock));
        // A created VM: what needs it running is 405 naming the state.
        foreach (var (method, name) in new[] { ("GET", "vm.counters"), ("PUT", "vm.pause"), ("PUT", "vm.resume"), ("PUT", "vm.shutdown"),
                     ("PUT", "vm.reboot"), ("PUT", "vm.power-button") })
        {
            var (got, body) = Curl(Sock, method, name);
            Assert.True(got == 405, $"{method} {name} on a created VM: {got} {body}");
            Assert.Contains(Messages(body), m => m.Contains("Created", StringComparison.Ordinal));
        }
        var info = Curl(Sock, "GET", "vm.info");
        Assert.Equal(200, info.Status);
        Assert.Equal("Created", JsonDocument.Parse(info.Body).RootElement.GetProperty("state").GetString());
        // Everything else in CH's document: 501 naming the endpoint, whatever the body.
        foreach (string name in Vmm.Api.ApiHandler.NotImplemented)
        {
            var (got, body) = Curl(Sock, "PUT", name, "-H", "Content-Type: application/json", "--data", "{}");
            Assert.True(got == 501, $"{name}: {got} {body}");
            Assert.Contains(Messages(body), m => m.Contains(name, StringComparison.Ordinal));
        }
        Assert.Equal(204, Curl(Sock, "PUT", "vm.delete").Status);
        Assert.Equal(404, Curl(Sock, "GET", "vm.info").Status);
        Assert.Equal((200, ""), Curl(Sock, "PUT", "vmm.shutdown"));
    }

    [Fact]
    public void Vmm_shutdown_is_200_and_the_process_exits_0_removing_its_socket()
    {
        var vmm = StartVmm(Sock);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(Sock));
        Assert.Equal(204, Create(Sock).Status);
        Assert.Equal((200, ""), Curl(Sock, "PUT", "vmm.shutdown"));
        Assert.Equal(0, vmm.WaitForExit(TimeSpan.FromSeconds(10)));
        Assert.False(File.Exists(Sock), "the socket file is left behind");
        Assert.Empty(_dir.GetFiles("api.sock*"));
    }

    [Fact]
    public void A_second_vmm_on_a_served_socket_exits_2_saying_another_process_serves_it()
    {
        StartVmm(Sock);
        var r = Run("dotnet", VmmDll, "--api-socket", Sock);
        Assert.Equal(ExitStatus.Usage, r.ExitCode);
        Assert.Contains($"{Sock}: another process is already serving this socket", r.Stderr);
        Assert.Equal(200, Curl(Sock, "GET", "vmm.ping").Status); // the first one still serves it
    }

    [Fact]
    public void A_stale_socket_file_is_replaced()
    {
        // Bound and closed without listening: what a vmm killed with SIGKILL leaves behind.
        using (var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            socket.Bind(new UnixDomainSocketEndPoint(Sock + ".bind"));
            File.Move(Sock + ".bind", Sock); // a .NET socket removes the path it bound when disposed: not this one
        }
        Assert.True(File.Exists(Sock));
        Assert.False(CanConnect(Sock));
        var vmm = StartVmm(Sock);
        var (status, body) = Curl(Sock, "GET", "vmm.ping");
        Assert.Equal(200, status);
        Assert.Equal(vmm.Process.Id, JsonDocument.Parse(body).RootElement.GetProperty("pid").GetInt32());
    }

    [Fact]
    public void SIGTERM_ends_vmm_with_status_0_and_removes_the_socket()
    {
        var vmm = StartVmm(Sock);
        Assert.Equal(204, Create(Sock).Status);
        Assert.Equal(0, LibC.kill(vmm.Process.Id, LibC.SIGTERM));
        Assert.Equal(0, vmm.WaitForExit(TimeSpan.FromSeconds(10)));
        Assert.False(File.Exists(Sock), "the socket file is left behind");
    }

    [Fact]
    public void Vmm_remote_prints_answers_on_stdout_errors_on_stderr_and_exits_0_1_or_12()
    {
        var vmm = StartVmm(Sock);
        var ping = Run("dotnet", VmmDll, "remote", "--api-socket", Sock, "ping");
        Assert.True(ping.ExitCode == 0, ping.Stderr);
        using (var doc = JsonDocument.Parse(ping.Stdout))
        {
            Assert.Equal(Vmm.Api.VmmService.Version, doc.RootElement.GetProperty("version").GetString());
            Assert.Equal(vmm.Process.Id, doc.RootElement.GetProperty("pid").GetInt32());
        }
        Assert.Equal("", ping.Stderr);

        var create = Run("dotnet", VmmDll, "remote", "--api-socket", Sock, "create", ConfigFile());
        Assert.True(create.ExitCode == 0, create.Stderr);

        var pause = Run("dotnet", VmmDll, "remote", "--api-socket", Sock, "pause");
        Assert.Equal(1, pause.ExitCode);
        Assert.Equal("", pause.Stdout);
        Assert.Contains("vm.pause: HTTP 405", pause.Stderr);
        Assert.Contains("The VM could not be paused", pause.Stderr);
        Assert.Contains("Created", pause.Stderr);

        var missing = Run("dotnet", VmmDll, "remote", "--api-socket", Path.Combine(_dir.FullName, "nobody.sock"), "ping");
        Assert.Equal(ExitStatus.VmmError, missing.ExitCode);
        Assert.Contains("no vmm API answers there", missing.Stderr);
    }

    private static List<JsonElement> ParseEvents(string text)
    {
        Assert.EndsWith("}\n\n", text);
        var events = new List<JsonElement>();
        foreach (string part in text.Split("\n\n", StringSplitOptions.RemoveEmptyEntries))
        {
            Assert.Contains("\n  \"source\": ", part); // pretty-printed, as CH's serde_json::to_string_pretty
            using var doc = JsonDocument.Parse(part);
            events.Add(doc.RootElement.Clone());
        }
        return events;
    }

    private static (string Source, string Event) Name(JsonElement e) => (e.GetProperty("source").GetString()!, e.GetProperty("event").GetString()!);

    [Fact]
    public void The_event_monitor_file_gets_CH_events_from_starting_to_shutdown()
    {
        string file = Path.Combine(_dir.FullName, "events.json");
        File.WriteAllText(file, "old content to be truncated");
        var vmm = StartVmm(Sock, "--event-monitor", $"path={file}");
        Assert.Equal(204, Create(Sock).Status);
        Assert.Equal(400, Curl(Sock, "PUT", "vm.boot").Status);
        Assert.Equal(200, Curl(Sock, "PUT", "vmm.shutdown").Status);
        Assert.Equal(0, vmm.WaitForExit(TimeSpan.FromSeconds(10)));

        var events = ParseEvents(File.ReadAllText(file));
        Assert.Equal([("vmm", "starting"), ("vm", "booting"), ("vm", "deleted"), ("vmm", "shutdown")], events.Select(Name));
        ulong last = 0;
        foreach (var e in events)
        {
            Assert.Equal(["timestamp", "source", "event", "properties"], e.EnumerateObject().Select(p => p.Name));
            var t = e.GetProperty("timestamp");
            Assert.Equal(["secs", "nanos"], t.EnumerateObject().Select(p => p.Name));
            Assert.InRange(t.GetProperty("nanos").GetUInt32(), 0u, 999_999_999u);
            ulong at = t.GetProperty("secs").GetUInt64() * 1_000_000_000 + t.GetProperty("nanos").GetUInt32();
            Assert.True(at >= last, "timestamps go forward");
            last = at;
            Assert.Equal(JsonValueKind.Null, e.GetProperty("properties").ValueKind);
        }
    }

    [Fact]
    public async Task An_event_monitor_FIFO_with_a_slow_reader_does_not_stop_the_API()
    {
        string fifo = Path.Combine(_dir.FullName, "events.fifo");
        var mk = Run("/usr/bin/mkfifo", fifo);
        Assert.True(mk.ExitCode == 0, mk.Stderr);
        var vmm = StartVmm(Sock, "--event-monitor", $"path={fifo}");
        // Nobody reads yet (the monitor's open of the FIFO waits for a reader): the API answers all the same.
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(204, Create(Sock).Status);
            Assert.Equal(204, Curl(Sock, "PUT", "vm.delete").Status);
        }
        Assert.Equal(200, Curl(Sock, "GET", "vmm.ping").Status);

        // Now a reader that takes a little at a time while the API goes on.
        var received = new MemoryStream();
        var reader = Task.Run(async () =>
        {
            await using var stream = new FileStream(fifo, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, 1);
            var buffer = new byte[64];
            int n;
            while ((n = await stream.ReadAsync(buffer)) > 0)
            {
                received.Write(buffer, 0, n);
                await Task.Delay(5);
            }
        });
        Assert.Equal(204, Create(Sock).Status);
        Assert.Equal(200, Curl(Sock, "GET", "vm.info").Status);
        Assert.Equal(200, Curl(Sock, "PUT", "vmm.shutdown").Status);
        Assert.Equal(0, vmm.WaitForExit(TimeSpan.FromSeconds(10)));
        await reader.WaitAsync(TimeSpan.FromSeconds(10));

        var events = ParseEvents(Encoding.UTF8.GetString(received.ToArray())).Select(Name).ToList();
        Assert.Equal(("vmm", "starting"), events[0]);
        Assert.Equal(("vmm", "shutdown"), events[^1]);
        Assert.Equal(4, events.Count(e => e == ("vm", "deleted")));
    }
}
