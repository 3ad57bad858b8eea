using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>What the KVM tests do when the nested VM freezes as a whole (tools/nested-kvm stops it after a missed
/// heartbeat, status 123): the scenarios left run again in a fresh VM, the one that was running only once more.
/// A fake harness runs the scenario script on this machine and "stalls" when a scenario signals it.</summary>
public class NestedStallRetryTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmm-stall-retry-").FullName;

    private string Harness => Path.Combine(_dir, "fake-run-in-vm.sh");
    private string Files => Path.Combine(_dir, "files");
    private string StallLog => Path.Combine(_dir, "stalls.log");

    public NestedStallRetryTests()
    {
        Directory.CreateDirectory(Files);
        // Like run-in-vm.sh: --files DIR -- COMMAND, COMMAND's stdout is ours. SIGUSR1 from a scenario plays the VM
        // freezing: the whole "VM" (the scenario script's session) is killed and the harness exits 123.
        File.WriteAllText(Harness, """
            #!/bin/bash
            while [ "$1" != "--" ]; do [ "$1" = --files ] && dir=$2; shift; done; shift
            cd "$dir" || exit 125
            export HARNESS_PID=$$
            echo "harness run" >>runs
            # The trap before the scenario starts: a scenario that signals at once must not find USR1's default
            # action (death, not 123) — on a loaded machine it did.
            trap 'kill -9 -- -$vm; echo "fake: the guest stalled" >&2; exit 123' USR1
            setsid "$@" & vm=$!
            wait $vm
            """);
        File.SetUnixFileMode(Harness, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>A scenario that freezes the fake VM the first <paramref name="times"/> times it runs.</summary>
    private static VmmScenario Freezes(string name, int times) => new(name, [], Shell:
        $"n=$(cat {name}.count 2>/dev/null || echo 0); echo $((n + 1)) >{name}.count; " +
        $"if [ $n -lt {times} ]; then kill -USR1 $HARNESS_PID; sleep 30; fi; echo {name} ran; exit 3");

    private static VmmScenario Plain(string name) => new(name, [], Shell: $"echo {name} ran >>order; echo {name} ok");

    private int HarnessRuns => File.ReadAllLines(Path.Combine(Files, "runs")).Length;

    [Fact]
    public void Scenarios_left_by_a_frozen_VM_run_again_in_a_fresh_one_and_the_stall_is_logged()
    {
        var results = VmmRunner.RunNested(Files, [Plain("a"), Freezes("b", 1), Plain("c")], Harness, StallLog);

        Assert.Equal(2, HarnessRuns);
        Assert.Equal(["a ran", "c ran"], File.ReadAllLines(Path.Combine(Files, "order"))); // a is not run twice
        Assert.Equal((0, "a ok\n"), (results["a"].ExitCode, results["a"].Stdout));
        Assert.Equal((3, "b ran\n"), (results["b"].ExitCode, results["b"].Stdout)); // its own status, from the second VM
        Assert.Equal((0, "c ok\n"), (results["c"].ExitCode, results["c"].Stdout));
        string log = File.ReadAllText(StallLog);
        Assert.Contains("nested VM stalled in attempt 1 while scenario b ran; 1 scenarios done, 2 left\n    fake: the guest stalled\n", log);
    }

    [Fact]
    public void A_scenario_during_which_the_VM_keeps_freezing_fails_with_every_report_and_the_rest_still_run()
    {
        var results = VmmRunner.RunNested(Files, [Freezes("b", 100), Plain("c")], Harness, StallLog);

        Assert.Equal(VmmRunner.MaxStallsPerScenario + 1, HarnessRuns);
        Assert.Equal(VmmRunner.NestedStallExitCode, results["b"].ExitCode);
        Assert.Contains($"the nested VM stalled {VmmRunner.MaxStallsPerScenario} times while this scenario ran", results["b"].Stderr);
        Assert.Contains($"\n{VmmRunner.MaxStallsPerScenario}: the nested KVM harness failed with 123", results["b"].Stderr);
        Assert.Contains("fake: the guest stalled", results["b"].Stderr);
        Assert.Equal((0, "c ok\n"), (results["c"].ExitCode, results["c"].Stdout));
        Assert.Equal(VmmRunner.MaxStallsPerScenario, File.ReadAllLines(StallLog).Count(l => l.Contains("nested VM stalled in attempt")));
    }

    [Fact]
    public void Scenarios_the_VM_never_reached_fail_once_the_VM_froze_as_often_as_a_run_allows()
    {
        // Every scenario freezes the VM once: each is re-run and passes, until the run is out of VM boots.
        var scenarios = Enumerable.Range(0, VmmRunner.MaxNestedAttempts + 1).Select(i => Freezes($"s{i}", 1)).ToList();

        var results = VmmRunner.RunNested(Files, scenarios, Harness, StallLog);

        Assert.Equal(VmmRunner.MaxNestedAttempts, HarnessRuns);
        for (int i = 0; i < VmmRunner.MaxNestedAttempts - 1; i++)
            Assert.Equal((3, $"s{i} ran\n"), (results[$"s{i}"].ExitCode, results[$"s{i}"].Stdout));
        foreach (var name in new[] { $"s{VmmRunner.MaxNestedAttempts - 1}", $"s{VmmRunner.MaxNestedAttempts}" })
        {
            Assert.Equal(VmmRunner.NestedStallExitCode, results[name].ExitCode);
            Assert.Contains($"scenario {name} has no result: the nested KVM harness failed with 123", results[name].Stderr);
            Assert.Contains($"in attempt {VmmRunner.MaxNestedAttempts}, while scenario s{VmmRunner.MaxNestedAttempts - 1} ran", results[name].Stderr);
        }
    }

    [Fact]
    public void A_harness_that_fails_otherwise_is_not_retried_and_every_scenario_left_fails_with_its_output()
    {
        File.WriteAllText(Harness, "#!/bin/bash\necho 'harness run' >>\"$(dirname \"$0\")/files/runs\"; echo 'fake: timeout after 1200s' >&2; exit 124\n");

        var results = VmmRunner.RunNested(Files, [Plain("a"), Plain("b")], Harness, StallLog);

        Assert.Equal(1, HarnessRuns);
        foreach (var name in new[] { "a", "b" })
        {
            Assert.Equal(124, results[name].ExitCode);
            Assert.Contains($"scenario {name} has no result: the nested KVM harness failed with 124", results[name].Stderr);
            Assert.Contains("fake: timeout after 1200s", results[name].Stderr);
        }
        Assert.False(File.Exists(StallLog));
    }
}

/// <summary>tools/nested-kvm/run-in-vm.sh itself: a guest whose heartbeat stops is ended as stalled (status 123, with
/// QEMU's view of its vCPU), long before the run's timeout. One short QEMU/TCG boot, in a collection of its own that runs
/// after the parallel ones (so not next to the KVM tests' nested VM, and without building their fixture).</summary>
[Collection("nested-harness")]
public class NestedHarnessStallTests
{
    [Fact]
    public void A_guest_whose_heartbeat_stops_is_reported_as_stalled_with_its_registers_instead_of_running_into_the_timeout()
    {
        string dir = Directory.CreateTempSubdirectory("vmm-stall-").FullName;
        try
        {
            File.WriteAllText(Path.Combine(dir, "note"), "stall test\n");
            var r = Repo.Run(Repo.PathTo("tools", "nested-kvm", "run-in-vm.sh"),
                ["--timeout", "500", "--stall", "10", "--files", dir, "--", "sh", "-c",
                 "cat note; kill -STOP $(cat /run/nested-kvm-heartbeat.pid); sleep 1000"], timeout: TimeSpan.FromMinutes(9));

            string all = $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";
            Assert.True(r.ExitCode == VmmRunner.NestedStallExitCode, all);
            Assert.Equal("stall test\n", r.Stdout);
            Assert.Contains("run-in-vm.sh: error: the guest stalled: no heartbeat for 10s", r.Stderr);
            Assert.Contains("(it was running the command)", r.Stderr);
            Assert.Matches(@"RIP=[0-9a-f]{16} ", r.Stderr); // the monitor answered
            Assert.Contains("NESTED-KVM-READY", r.Stderr); // the console tail
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}

[CollectionDefinition("nested-harness", DisableParallelization = true)]
public sealed class NestedHarnessCollection;
