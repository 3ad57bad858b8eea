using System.Text;

namespace Vmm.Tests.TestKit;

/// <summary>One invocation of the vmm binary in a KVM test.</summary>
/// <summary>One invocation of the vmm binary in a KVM test. With <paramref name="Shell"/> the scenario is that
/// <c>sh -c</c> command line instead (run in the same directory, where the vmm binary is ./vmm), for tests that
/// need a network namespace, a responder next to vmm or a look at a disk image afterwards.</summary>
public sealed record VmmScenario(string Name, IReadOnlyList<string> Args, string? Stdin = null, string? Shell = null);

/// <summary>Runs vmm scenarios against a real /dev/kvm: directly where this machine has one, otherwise
/// inside a QEMU/TCG Linux guest whose emulated AMD SVM gives it a real KVM (tools/nested-kvm). Either way
/// every scenario runs on KVM for real; all scenarios share one nested VM boot because a boot costs seconds.</summary>
public static class VmmRunner
{
    public static bool HostHasKvm
    {
        get
        {
            // A usable KVM, not merely a file of that name: open it and ask for the API version.
            try
            {
                using var kvm = Vmm.Kvm.KvmSystem.Open();
                return true;
            }
            catch (Vmm.Kvm.KvmUnavailableException)
            {
                return false;
            }
        }
    }

    /// <summary>Whether this CPU has hardware virtualization (vmx or svm in /proc/cpuinfo). Without it a local /dev/kvm
    /// is software virtualization (kvm-pvm): it runs our micro-guests, but emulates non-PVM guests at a few million
    /// instructions per second and cannot finish booting a stock Linux kernel (../shared/README.md §1).</summary>
    public static bool CpuHasHardwareVirtualization =>
        System.Text.RegularExpressions.Regex.IsMatch(File.ReadAllText("/proc/cpuinfo"), @"^flags\s*:.*\b(vmx|svm)\b", System.Text.RegularExpressions.RegexOptions.Multiline);

    /// <summary>Where the KVM tests run: the local /dev/kvm only where it can run the whole suite (a usable /dev/kvm on
    /// a CPU with vmx/svm), otherwise the nested-KVM VM. VMM_TEST_KVM=local or =nested overrides the choice
    /// (local without a usable /dev/kvm is an error, not a silent fallback).</summary>
    public static bool UseLocalKvm { get; } =
        DecideLocalKvm(Environment.GetEnvironmentVariable("VMM_TEST_KVM"), HostHasKvm, CpuHasHardwareVirtualization);

    /// <summary>The rule, apart from the machine it runs on (unit-tested for every kind of host).</summary>
    public static bool DecideLocalKvm(string? choice, bool hostHasKvm, bool hardwareVirtualization) => (choice ?? "auto") switch
    {
        "local" => hostHasKvm ? true : throw new InvalidOperationException("VMM_TEST_KVM=local, but this machine has no usable /dev/kvm"),
        "nested" => false,
        "auto" or "" => hostHasKvm && hardwareVirtualization,
        var other => throw new InvalidOperationException($"VMM_TEST_KVM={other}: use local, nested or auto"),
    };

    /// <summary>Whether the KVM the tests use is hardware-assisted: the nested VM's CPU has svm (QEMU -cpu max); a
    /// local /dev/kvm is used only when forced (VMM_TEST_KVM=local) or when the CPU has vmx/svm.</summary>
    public static bool GuestCpuHasHardwareVirtualization => !UseLocalKvm || CpuHasHardwareVirtualization;

    /// <summary>QEMU's accelerator for the cross-checks: KVM where it is hardware-assisted, else TCG (faster than a
    /// software-virtualization KVM, and the same everywhere).</summary>
    public static string QemuAccel => HostHasKvm && CpuHasHardwareVirtualization ? "kvm" : "tcg";

    /// <summary>"local /dev/kvm" or "nested KVM in QEMU/TCG".</summary>
    public static string Where => UseLocalKvm ? "local /dev/kvm" : "nested KVM in QEMU/TCG (tools/nested-kvm)";

    /// <summary>Runs every scenario with <paramref name="files"/> (name → content) and the vmm binary in its
    /// working directory.</summary>
    public static IReadOnlyDictionary<string, Repo.Result> RunAll(string vmmBinary, IReadOnlyDictionary<string, byte[]> files,
        IReadOnlyList<VmmScenario> scenarios)
    {
        string dir = Directory.CreateTempSubdirectory("vmm-kvm-tests-").FullName;
        try
        {
            File.Copy(vmmBinary, Path.Combine(dir, "vmm"));
            File.SetUnixFileMode(Path.Combine(dir, "vmm"), UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute | UnixFileMode.GroupRead | UnixFileMode.GroupExecute | UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
            foreach (var (name, content) in files)
            {
                File.WriteAllBytes(Path.Combine(dir, name), content);
                // ELF files executable: tools/nested-kvm copies the libraries of executables only (e.g. virtiofsd's).
                if (content.AsSpan().StartsWith((ReadOnlySpan<byte>)[0x7F, (byte)'E', (byte)'L', (byte)'F']))
                    File.SetUnixFileMode(Path.Combine(dir, name), File.GetUnixFileMode(Path.Combine(dir, name)) | UnixFileMode.UserExecute);
            }
            return UseLocalKvm ? RunLocally(dir, scenarios) : RunNested(dir, scenarios, Repo.PathTo("tools", "nested-kvm", "run-in-vm.sh"), StallLog);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static Dictionary<string, Repo.Result> RunLocally(string dir, IReadOnlyList<VmmScenario> scenarios)
    {
        var results = new Dictionary<string, Repo.Result>();
        foreach (var s in scenarios)
            results[s.Name] = s.Shell is null
                ? Repo.Run(Path.Combine(dir, "vmm"), s.Args, dir, TimeSpan.FromMinutes(5), s.Stdin ?? "")
                : Repo.Run("sh", ["-c", s.Shell], dir, TimeSpan.FromMinutes(5), s.Stdin ?? "");
        return results;
    }

    /// <summary>Exit status of tools/nested-kvm/run-in-vm.sh when the nested VM's kernel stopped (its heartbeat did).</summary>
    public const int NestedStallExitCode = 123;

    /// <summary>No heartbeat from the nested VM for this long means its kernel stopped (it writes one every 2 s).</summary>
    public const int NestedStallSeconds = 60;

    /// <summary>Nested VM boots per test run: the first, and a fresh one for what was left each time the VM stalled.</summary>
    public const int MaxNestedAttempts = 6;

    /// <summary>How often the nested VM may freeze while one scenario runs before that scenario fails.</summary>
    public const int MaxStallsPerScenario = 3;

    /// <summary>One line per nested-VM stall in this test run (test.sh prints them after the summary).</summary>
    public static string StallLog => Repo.PathTo("artifacts", "nested-kvm-stalls.log");

    /// <summary>Runs the scenarios (files and vmm in <paramref name="dir"/>) through <paramref name="harness"/>
    /// (run-in-vm.sh, or a fake in the tests of this logic), recording stalls in <paramref name="stallLog"/>.</summary>
    internal static Dictionary<string, Repo.Result> RunNested(string dir, IReadOnlyList<VmmScenario> scenarios, string harness, string stallLog)
    {
        // Under multi-threaded TCG the nested VM froze as a whole now and then (tools/nested-kvm/README.md: its vCPU halts
        // with the APIC timer pending and takes no interrupt), so even the per-scenario watchdog inside it never fired.
        // The harness now runs single-threaded TCG, which has not shown it; this stays as the safety net. The harness
        // ends a VM whose heartbeat stopped (status 123) and the scenarios without a result run again in a fresh VM;
        // the one that was running fails once the VM froze MaxStallsPerScenario times during it, with every report.
        // Nothing else is retried: a scenario that fails, hangs (its watchdog) or times out fails.
        var results = new Dictionary<string, Repo.Result>();
        var pending = scenarios.ToList();
        var stalledIn = new Dictionary<string, List<string>>();
        for (int attempt = 1; pending.Count > 0; attempt++)
        {
            var run = RunNestedOnce(dir, pending, harness, out string? inProgress);
            foreach (var (name, result) in run.Results)
                results[name] = result;
            pending = pending.Where(s => !results.ContainsKey(s.Name)).ToList();
            if (pending.Count == 0)
                break;
            // The harness's stderr is its own report (a scenario's output goes to files); its stdout holds only the
            // finished scenarios' encoded results.
            string report = $"the nested KVM harness failed with {run.ExitCode} (123: the nested VM stalled, 124: timeout, 125: harness failure) " +
                $"in attempt {attempt}{(inProgress is null ? "" : $", while scenario {inProgress} ran")}:\n{run.Stderr}";
            if (run.ExitCode == NestedStallExitCode)
            {
                Directory.CreateDirectory(Path.GetDirectoryName(stallLog)!);
                File.AppendAllText(stallLog, $"{DateTime.UtcNow:O} nested VM stalled in attempt {attempt}" +
                    $"{(inProgress is null ? " before any scenario ran" : $" while scenario {inProgress} ran")}; " +
                    $"{results.Count} scenarios done, {pending.Count} left\n" +
                    string.Concat(run.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => "    " + l + "\n")));
                if (inProgress is not null)
                {
                    var reports = stalledIn.TryGetValue(inProgress, out var earlier) ? earlier : stalledIn[inProgress] = [];
                    reports.Add(report);
                    if (reports.Count >= MaxStallsPerScenario)
                    {
                        results[inProgress] = new Repo.Result(NestedStallExitCode, "",
                            $"the nested VM stalled {reports.Count} times while this scenario ran:\n" + string.Join("\n", reports.Select((r, k) => $"{k + 1}: {r}")));
                        pending.RemoveAll(s => s.Name == inProgress);
                    }
                }
                if (attempt < MaxNestedAttempts)
                    continue;
            }
            foreach (var s in pending)
                results[s.Name] = new Repo.Result(run.ExitCode, "", $"scenario {s.Name} has no result: {report}");
            break;
        }
        return results;
    }

    /// <summary>One nested VM boot running <paramref name="scenarios"/> in order: the results it printed (all of them
    /// when it exits 0), and the scenario that had started without finishing when it ended.</summary>
    private static (Dictionary<string, Repo.Result> Results, int ExitCode, string Stderr) RunNestedOnce(
        string dir, IReadOnlyList<VmmScenario> scenarios, string harness, out string? inProgress)
    {
        // A shell script runs each scenario and prints its results base64-encoded between markers.
        var script = new StringBuilder("#!/bin/sh\n" + Watchdog);
        int i = 0;
        foreach (var s in scenarios)
        {
            string stdin = $"stdin{i}";
            File.WriteAllText(Path.Combine(dir, stdin), s.Stdin ?? "");
            string command = s.Shell is null ? "./vmm " + string.Join(' ', s.Args.Select(ShellQuote)) : "sh -c " + ShellQuote(s.Shell);
            // A hung scenario fails on its own (status 124, with its output so far and the state of vmm's threads),
            // instead of stalling the whole run.
            script.Append($"echo \"@@START {i}\"\n");
            script.Append($"{command} <{stdin} >out{i} 2>err{i} & pid=$!; watchdog {ScenarioTimeoutSeconds} $pid err{i}; rc=$?\n");
            script.Append($"echo \"@@SCENARIO {i} $rc\"; base64 -w0 out{i}; echo; base64 -w0 err{i}; echo; echo \"@@END {i}\"\n");
            i++;
        }
        File.WriteAllText(Path.Combine(dir, "run-scenarios.sh"), script.ToString());
        File.SetUnixFileMode(Path.Combine(dir, "run-scenarios.sh"), UnixFileMode.UserRead | UnixFileMode.UserExecute | UnixFileMode.UserWrite);

        var r = Repo.Run(harness, ["--timeout", "1200", "--stall", NestedStallSeconds.ToString(), "--files", dir, "--", "./run-scenarios.sh"],
            timeout: TimeSpan.FromMinutes(22));
        var lines = r.Stdout.Split('\n');
        var results = new Dictionary<string, Repo.Result>();
        inProgress = null;
        for (int l = 0; l < lines.Length; l++)
        {
            var parts = lines[l].Trim().Split(' ');
            if (parts.Length == 2 && parts[0] == "@@START")
            {
                inProgress = scenarios[int.Parse(parts[1])].Name;
                continue;
            }
            // A result counts only when complete (the VM may have stopped in the middle of printing it).
            if (parts.Length != 3 || parts[0] != "@@SCENARIO" || l + 3 >= lines.Length || lines[l + 3].Trim() != $"@@END {parts[1]}")
                continue;
            var s = scenarios[int.Parse(parts[1])];
            string Decode(string b64) => Encoding.UTF8.GetString(Convert.FromBase64String(b64.Trim()));
            results[s.Name] = new Repo.Result(int.Parse(parts[2]), Decode(lines[l + 1]), Decode(lines[l + 2]));
            inProgress = null;
        }
        if (r.ExitCode == 0)
        {
            foreach (var s in scenarios)
            {
                if (!results.ContainsKey(s.Name))
                    throw new InvalidOperationException($"scenario {s.Name} produced no result in the nested VM:\n{r.Stdout}\n{r.Stderr}");
            }
        }
        return (results, r.ExitCode, r.Stderr);
    }

    /// <summary>Shell function: waits up to $1 seconds (wall clock) for process $2; on timeout appends every vmm
    /// thread's name, state and kernel wait channel to file $3, kills the scenario and returns 124.</summary>
    private const string Watchdog = """
        watchdog() {
            start=$(date +%s)
            # (a finished child stays a zombie until waited for: kill -0 would still succeed)
            while grep -q '^State:[[:space:]]*[^Z]' /proc/$2/status 2>/dev/null; do
                if [ $(($(date +%s) - start)) -ge $1 ]; then
                    echo "scenario timed out; vmm threads:" >>$3
                    for d in /proc/[0-9]*; do
                        [ "$(cat $d/comm 2>/dev/null)" = vmm ] || continue
                        for t in $d/task/*; do echo "  $(cat $t/comm) $(grep '^State' $t/status) wchan=$(cat $t/wchan)" >>$3; done
                        kill -9 ${d#/proc/} 2>/dev/null
                    done
                    kill -9 $2 2>/dev/null; wait $2 2>/dev/null
                    return 124
                fi
                sleep 0.2
            done
            wait $2
        }

        """;

    /// <summary>Per scenario, inside the nested VM (the slowest runs, a Linux boot, take about a minute there).</summary>
    public const int ScenarioTimeoutSeconds = 240;

    private static string ShellQuote(string s) => "'" + s.Replace("'", "'\\''") + "'";
}
