using System.Text.Json;
using System.Text.RegularExpressions;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>The control plane on KVM: a stock Linux VM through its whole lifecycle by the API (ApiScenario), the same
/// VM from --config as from the flags, and SIGTERM stopping an API-controlled VM. Never skipped.</summary>
[Collection("kvm")]
public class KvmApiTests(KvmFixture kvm)
{
    private Repo.Result R(string name) => kvm.Results[name];

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    /// <summary>The `vmm remote` steps of the script in order: command, output, status.</summary>
    private static List<(string Command, string Output, int Status)> Steps(string stdout)
    {
        var steps = new List<(string, string, int)>();
        var m = Regex.Matches(stdout, @"^@@ (?<cmd>[^\n]*)\n(?<out>.*?)^@@rc (?<rc>\d+)$", RegexOptions.Multiline | RegexOptions.Singleline);
        foreach (Match x in m)
            steps.Add((x.Groups["cmd"].Value.Trim(), x.Groups["out"].Value, int.Parse(x.Groups["rc"].Value)));
        return steps;
    }

    private static string Marker(string stdout, string name) =>
        Regex.Match(stdout, $"^@@{name} ?(.*)$", RegexOptions.Multiline) is { Success: true } m ? m.Groups[1].Value.Trim()
            : throw new Xunit.Sdk.XunitException($"no @@{name} in the output:\n{stdout}");

    private static string Section(string stdout, string name, string next)
    {
        int a = stdout.IndexOf($"@@{name}\n", StringComparison.Ordinal);
        int b = next.Length == 0 ? stdout.Length : stdout.IndexOf($"@@{next}\n", StringComparison.Ordinal);
        return a < 0 || b < a ? "" : stdout[(a + name.Length + 3)..b];
    }

    private static string State(string infoJson) => JsonDocument.Parse(infoJson).RootElement.GetProperty("state").GetString()!;

    [Fact]
    public void A_Linux_VM_goes_through_create_boot_pause_resume_power_button_boot_delete_and_vmm_shutdown()
    {
        var r = R("api-lifecycle");
        string all = Show(r);
        var steps = Steps(r.Stdout);
        Assert.True(steps.Count == 19, $"{steps.Count} steps\n{all}");
        (string Output, int Status) Step(int i, string command)
        {
            Assert.True(steps[i].Command == command, $"step {i} is '{steps[i].Command}', expected '{command}'\n{all}");
            return (steps[i].Output, steps[i].Status);
        }
        var ping = Step(0, "ping");
        Assert.Equal(0, ping.Status);
        Assert.Contains("\"version\"", ping.Output);
        Api.ChSchema.AssertValid(ping.Output, "VmmPingResponse");
        Assert.Equal(1, Step(1, "info").Status);                      // no VM yet: 404
        Assert.Contains("VM is not created", steps[1].Output);
        Assert.Equal(0, Step(2, "create api-lifecycle.json").Status);
        Assert.Equal("Created", State(Step(3, "info").Output));
        Assert.Equal(1, Step(4, "pause").Status);                     // not running: 405
        Assert.Contains("HTTP 405", steps[4].Output);
        Assert.True(Step(5, "boot").Status == 0, all);
        Assert.Equal("Running", State(Step(6, "info").Output));
        Api.ChSchema.AssertValid(steps[6].Output, "VmInfo"); // with a device tree, against CH's OpenAPI document
        var info = JsonDocument.Parse(steps[6].Output).RootElement;
        Assert.Equal("0000:00:01.0", info.GetProperty("device_tree").GetProperty("_disk0").GetProperty("pci_bdf").GetString());
        Assert.Equal(0, Step(7, "pause").Status);

        // Paused: the guest's ticks stop; resumed, they go on.
        var paused = Marker(r.Stdout, "PAUSED").Split(' ');
        Assert.True(paused.Length == 2 && paused[0].Length > 0 && paused[0] == paused[1], $"ticks moved while paused: {string.Join(' ', paused)}\n{all}");
        Assert.Equal("Paused", State(Step(8, "info").Output));
        Assert.Equal(1, Step(9, "pause").Status);                     // already paused: 405
        Assert.Equal(0, Step(10, "resume").Status);
        int resumed = int.Parse(Marker(r.Stdout, "RESUMED"));
        Assert.True(resumed > int.Parse(paused[1]), $"ticks did not resume: {resumed}\n{all}");

        // 24 racing pause/resume/info requests later the VM still runs and ticks.
        Assert.Equal("\"state\":\"Running\"", Marker(r.Stdout, "RACED"));
        var race = Marker(r.Stdout, "AFTER-RACE").Split(' ').Select(int.Parse).ToArray();
        Assert.True(race[1] > race[0], $"ticks stopped after the race: {race[0]} {race[1]}\n{all}");

        // Hostile clients: every one answered with the error its request deserves, and the VM still runs and ticks.
        Assert.True(Marker(r.Stdout, "ABUSE-RC") == "0", all);
        foreach (var (abuse, status) in new[] { ("malformed-request-line", "400"), ("oversized-headers", "431"), ("oversized-body", "413"),
                     ("invalid-utf8", "400"), ("invalid-json", "400"), ("chunked", "501"), ("served-while-another-stalls", "200"),
                     ("stalled-client", "408"), ("concurrent-100", "100") })
            Assert.True(Regex.IsMatch(r.Stdout, $"^ABUSE {abuse} {status}$", RegexOptions.Multiline), $"{abuse}: expected {status}\n{all}");
        var afterAbuse = Marker(r.Stdout, "AFTER-ABUSE").Split(' ');
        Assert.True(afterAbuse[0] == "\"state\":\"Running\"" && int.Parse(afterAbuse[2]) > int.Parse(afterAbuse[1]), $"after the hostile clients: {string.Join(' ', afterAbuse)}\n{all}");

        var counters = JsonDocument.Parse(Step(11, "counters").Output).RootElement;
        Api.ChSchema.AssertValid(steps[11].Output, "VmCounters");
        Assert.True(counters.GetProperty("_disk0").GetProperty("read_ops").GetUInt64() > 0, all);
        Assert.True(counters.GetProperty("_disk0").GetProperty("read_bytes").GetUInt64() >= 16 * 4096, all);
        Assert.True(counters.GetProperty("vcpu0").GetProperty("exits").GetUInt64() > 0, all);
        Assert.True(counters.TryGetProperty("vcpu1", out _), all);

        // The power button: Linux's ACPI button driver sees it, /init powers off, the VM is Shutdown.
        Assert.Equal(0, Step(12, "power-button").Status);
        Assert.Equal("Shutdown", State(Step(13, "info").Output));
        string console = Section(r.Stdout, "CONSOLE", "EVENTS");
        Assert.Contains("vmm-api: power button event", console);
        Assert.Contains("vmm-api: power button pressed", console);
        Assert.Contains("reboot: Power down", console);
        Assert.DoesNotContain("vmm-api: dmesg", console); // no soft lockup after the 3 s pause (KVM_KVMCLOCK_CTRL)

        // Booted again from the same config, then deleted while it runs, then the process ends.
        Assert.Equal(0, Step(14, "boot").Status);
        Assert.Equal("Running", State(Step(15, "info").Output));
        Assert.Equal(2, Regex.Matches(console, "Linux version").Count);
        Assert.Equal(0, Step(16, "delete").Status);
        Assert.Equal(1, Step(17, "info").Status);
        Assert.Equal(0, Step(18, "shutdown-vmm").Status);
        Assert.True(Marker(r.Stdout, "VMM-EXIT") == "0", all);
        Assert.Equal("GONE", Marker(r.Stdout, "SOCKET"));
    }

    [Fact]
    public void The_event_monitor_reports_the_lifecycle_in_Cloud_Hypervisor_s_format()
    {
        var r = R("api-lifecycle");
        string events = Section(r.Stdout, "EVENTS", "VMM-STDERR");
        var parsed = events.Split("\n\n", StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(e => JsonDocument.Parse(e).RootElement).ToList();
        Assert.True(parsed.Count > 10, events);
        foreach (var e in parsed)
        {
            Assert.True(e.GetProperty("timestamp").GetProperty("secs").GetUInt64() < 3600);
            Assert.InRange(e.GetProperty("timestamp").GetProperty("nanos").GetUInt32(), 0u, 999_999_999u);
        }
        var names = parsed.Select(e => e.GetProperty("source").GetString() + "/" + e.GetProperty("event").GetString()).ToList();
        string[] expected = ["vmm/starting", "vm/booting", "vm/booted", "vm/pausing", "vm/paused", "vm/resuming", "vm/resumed", "vm/shutdown",
            "vm/booting", "vm/booted", "vm/shutdown", "vm/deleted", "vmm/shutdown"];
        // In this order (the race adds pause/resume pairs in between).
        int at = 0;
        foreach (var name in names)
        {
            if (at < expected.Length && name == expected[at])
                at++;
        }
        Assert.True(at == expected.Length, $"events out of order or missing at {expected.ElementAtOrDefault(at)}: {string.Join(", ", names)}");
        var guestOff = parsed.First(e => e.GetProperty("event").GetString() == "shutdown" && e.GetProperty("properties").ValueKind == JsonValueKind.Object);
        Assert.Equal("guest-poweroff", guestOff.GetProperty("properties").GetProperty("reason").GetString());
    }

    [Fact]
    public void A_config_file_boots_the_same_VM_as_the_flags()
    {
        var file = R("api-config-file");
        var flags = R("multiboot-test");
        Assert.True(file.ExitCode == 1, Show(file));
        Assert.Equal(flags.ExitCode, file.ExitCode);
        Assert.Equal(flags.Stdout, file.Stdout);
    }

    [Fact]
    public void The_API_controls_a_VM_booted_from_the_command_line_and_SIGTERM_stops_it_in_order()
    {
        var r = R("api-run-sigterm");
        Assert.True(r.ExitCode == 0, Show(r));
        Assert.Equal("0", Marker(r.Stdout, "INFO"));
        Assert.Contains("\"kernel\":\"hlt.bin\"", r.Stdout);
        Assert.Contains("\"state\":\"Running\"", r.Stdout);
        Assert.Equal("0", Marker(r.Stdout, "REBOOT"));
        string events = Marker(r.Stdout, "EVENTS");
        foreach (string e in new[] { "\"event\":\"booted\"", "\"event\":\"rebooting\"", "\"event\":\"rebooted\"" })
            Assert.Contains(e, events);
        Assert.True(events.IndexOf("\"event\":\"rebooting\"", StringComparison.Ordinal) < events.IndexOf("\"event\":\"rebooted\"", StringComparison.Ordinal), events);
        Assert.EndsWith("\"source\":\"vmm\",\"event\":\"shutdown\",\"properties\":null}", events); // SIGTERM: the orderly stop's last event
        Assert.Equal("GONE", Marker(r.Stdout, "SOCKET"));
        Assert.Contains("SIGTERM: stopping the VM", r.Stderr);
    }

    /// <summary>The eject timeout: hlt.bin runs no ACPI hotplug driver, so the guest never ejects the hot-added disk.</summary>
    [Fact]
    public void A_guest_that_never_ejects_gets_a_timeout_naming_what_it_must_run_and_the_device_stays()
    {
        var r = R("api-eject-timeout");
        string all = Show(r);
        Assert.True(Marker(r.Stdout, "ADD") == "0", all);
        Assert.True(r.Stdout.Contains("\"id\":\"etdisk\"", StringComparison.Ordinal), all);
        // 10 s (VmmService.DefaultEjectTimeout) without an eject: HTTP 500 and one line saying what the guest must run.
        Assert.True(Marker(r.Stdout, "REMOVE") == "1", all);
        // (vmm remote reports it on stderr; vmm's own log, in the output, says it too.)
        Assert.True(r.Stderr.Contains("vm.remove-device: HTTP 500", StringComparison.Ordinal), all);
        const string line = "the guest did not eject device etdisk within 10 s (it must run an ACPI PCI hotplug driver, such as Linux's acpiphp, and let go of the device)";
        Assert.True(r.Stderr.Contains(line, StringComparison.Ordinal) && r.Stdout.Contains(line, StringComparison.Ordinal), all);
        // The request stays (a late eject would still remove it): the disk is in vm.info's device tree and config.
        Assert.True(Marker(r.Stdout, "INFO") == "0", all);
        int info = r.Stdout.IndexOf("@@REMOVE", StringComparison.Ordinal);
        Assert.True(r.Stdout[info..].Contains("\"etdisk\":{", StringComparison.Ordinal), all);
        Assert.True(r.Stdout[info..].Contains("\"path\":\"et.img\"", StringComparison.Ordinal), all);
        // An eject still pending does not hold up the orderly stop.
        Assert.True(Marker(r.Stdout, "EXIT") == "0", all);
        Assert.True(r.Stdout.Contains("SIGTERM: stopping the VM", StringComparison.Ordinal), all);
    }
}
