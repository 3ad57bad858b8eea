using System.Text.RegularExpressions;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>Process-kill consistency and image locking on a real KVM (<see cref="CrashScenario"/>): vmm SIGKILLed in
/// the middle of a guest's write-and-flush stream loses no write the guest saw completed before its last reported
/// flush, changes nothing outside the written sectors, and leaves no lock behind; a second vmm cannot open the image a
/// running one writes.
/// <para>What this shows: writes reach the image in the guest's order, no write completes to the guest before its
/// pwrite, no sector outside the written ones changes, the locks go with the process, a second writer is refused.
/// What it does not: a power loss. A SIGKILL leaves the host's page cache intact, so the image is read back through
/// it, and a vmm whose FLUSH were a no-op would pass too; that FLUSH's fdatasync reaches the disk is not
/// observed.</para></summary>
[Collection("kvm")]
public class KvmCrashTests(KvmFixture kvm)
{
    private Repo.Result R => kvm.Results["blk-crash"];

    private string Show() => $"exit {R.ExitCode}\n--- stdout\n{R.Stdout}\n--- stderr\n{R.Stderr}";

    private Match Marker(string pattern)
    {
        var m = Regex.Match(R.Stdout, pattern, RegexOptions.Multiline);
        Assert.True(m.Success, $"no line matching {pattern}\n{Show()}");
        return m;
    }

    [Fact]
    public void Process_kill_consistency_a_SIGKILLed_vmm_loses_no_flushed_write_and_changes_nothing_outside_the_written_sectors()
    {
        for (int i = 1; i <= CrashScenario.Rounds; i++)
        {
            var killed = Marker($@"^@@KILLED {i} (\d+) (\d+)$");
            Assert.True(killed.Groups[1].Value == "137", $"round {i}: vmm did not die of SIGKILL (it ran to its end?)\n{Show()}");
            Assert.True(int.Parse(killed.Groups[2].Value) >= 4 * i, $"round {i}: too few flushes before the kill\n{Show()}");
            var check = Marker($@"^@@CHECK {i} (\d+) (\d+)$");
            Assert.True(check.Groups[1].Value == "0", $"round {i}: the image is inconsistent\n{Show()}");
            Assert.True(int.Parse(check.Groups[2].Value) > i * 1000, $"round {i}: no flushed generation of this round\n{Show()}");
        }
        // Each round's check and the final run's.
        Assert.True(CrashScenario.Rounds + 1 == Regex.Matches(R.Stdout, "^blk-image: crash.img: 8192 sectors; stream generations .*: consistent$",
            RegexOptions.Multiline).Count, Show());
    }

    [Fact]
    public void The_killed_vmm_left_no_lock_and_a_clean_run_makes_every_generation_durable()
    {
        // Rounds 2 and 3 started at once on the image the killed vmm had held writable.
        for (int i = 2; i <= CrashScenario.Rounds; i++)
            Assert.True(int.Parse(Marker($@"^@@KILLED {i} (\d+) (\d+)$").Groups[2].Value) > 0, Show());
        Assert.DoesNotContain("is locked", R.Stdout.Split("@@KILLED 1 ")[^1]); // only the second vmm of round 1 was refused
        Assert.True(Marker(@"^@@FINAL (\d+)$").Groups[1].Value == "1", Show()); // debug-exit 0: every subtest passed
        Assert.Contains("PASS: blk-stream every generation written and flushed", R.Stdout);
        Assert.True(Marker(@"^@@FINALCHECK (\d+)$").Groups[1].Value == "0", Show());
        Assert.Contains("stream generations 9003..9003, 0 sectors newer than the flushed 9003", R.Stdout);
    }

    [Fact]
    public void A_second_vmm_is_refused_the_image_a_running_one_writes_and_is_told_who_holds_it()
    {
        var refused = Marker(@"^@@REFUSED (\d+) pid (\d+)$");
        Assert.True(refused.Groups[1].Value == "2", Show()); // configuration error
        Assert.Contains($"--disk path=crash.img: crash.img: is locked for writing by pid {refused.Groups[2].Value} (vmm): " +
            "another VM (or QEMU) uses this image; two VMs must not write one image", R.Stdout);
    }
}
