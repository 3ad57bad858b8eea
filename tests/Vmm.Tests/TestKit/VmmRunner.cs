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
                File.WriteAllBytes(Path.Combine(dir, name), content);
            return UseLocalKvm ? RunLocally(dir, scenarios) : RunNested(dir, scenarios);
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

    private static Dictionary<string, Repo.Result> RunNested(string dir, IReadOnlyList<VmmScenario> scenarios)
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
            script.Append($"{command} <{stdin} >out{i} 2>err{i} & pid=$!; watchdog {ScenarioTimeoutSeconds} $pid err{i}; rc=$?\n");
            script.Append($"echo \"@@SCENARIO {i} $rc\"; base64 -w0 out{i}; echo; base64 -w0 err{i}; echo\n");
            i++;
        }
        File.WriteAllText(Path.Combine(dir, "run-scenarios.sh"), script.ToString());
        File.SetUnixFileMode(Path.Combine(dir, "run-scenarios.sh"), UnixFileMode.UserRead | UnixFileMode.UserExecute | UnixFileMode.UserWrite);

        var harness = Repo.PathTo("tools", "nested-kvm", "run-in-vm.sh");
        var r = Repo.Run(harness, ["--timeout", "1200", "--files", dir, "--", "./run-scenarios.sh"], timeout: TimeSpan.FromMinutes(22));
        if (r.ExitCode != 0)
            throw new InvalidOperationException($"the nested KVM harness failed with {r.ExitCode} (125: harness failure, 124: timeout):\n{r.Stdout}\n{r.Stderr}");
        var lines = r.Stdout.Split('\n');
        var results = new Dictionary<string, Repo.Result>();
        for (int l = 0; l < lines.Length; l++)
        {
            var parts = lines[l].Trim().Split(' ');
            if (parts.Length != 3 || parts[0] != "@@SCENARIO")
                continue;
            var s = scenarios[int.Parse(parts[1])];
            string Decode(string b64) => Encoding.UTF8.GetString(Convert.FromBase64String(b64.Trim()));
            results[s.Name] = new Repo.Result(int.Parse(parts[2]), Decode(lines[l + 1]), Decode(lines[l + 2]));
        }
        foreach (var s in scenarios)
        {
            if (!results.ContainsKey(s.Name))
                throw new InvalidOperationException($"scenario {s.Name} produced no result in the nested VM:\n{r.Stdout}\n{r.Stderr}");
        }
        return results;
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
