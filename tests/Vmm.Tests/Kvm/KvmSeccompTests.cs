using System.Text.RegularExpressions;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>Issue 12, item 1: the seccomp filters on a real KVM (the hook that makes a vCPU misbehave, the log
/// mode, every thread of the hotplug scenario under a filter, and a Linux boot with every device at once). Never
/// skipped.</summary>
[Collection("kvm")]
public class KvmSeccompTests(KvmFixture kvm)
{
    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    [Fact]
    public void A_vCPU_thread_that_makes_a_forbidden_call_kills_vmm_with_SIGSYS_and_one_line_naming_thread_and_call()
    {
        var r = kvm.Results["seccomp-violation"];
        string all = Show(r);
        // The shell reports a death by signal 31 as 128 + 31.
        Assert.Contains("@@STATUS 159", r.Stdout);
        var lines = r.Stderr.Split('\n').Where(l => l.Contains("seccomp: thread")).ToList();
        Assert.True(lines.Count == 1, all);
        Assert.Equal("vmm: seccomp: thread 'vcpu0' (vCPU filter) made a forbidden system call: socket (41); the VM was stopped", lines[0]);
    }

    [Fact]
    public void Log_mode_lets_the_demo_through_and_the_kernel_logged_no_call_the_lists_miss()
    {
        var r = kvm.Results["seccomp-log"];
        string all = Show(r);
        Assert.Contains("@@STATUS 0", r.Stdout);
        Assert.Contains("vmm: seccomp: filters installed (log)", r.Stderr);
        // Every call the demo makes is on its thread's list: nothing for the kernel to log (audit type 1326).
        Assert.Contains("@@AUDIT 0", r.Stdout);
        // The control: with the hook, vCPU 0's socket() is let through (the demo still succeeds) and the kernel logged
        // it, so the zero above was read from a log that does record what log mode lets through.
        Assert.Contains("@@HOOK-STATUS 0", r.Stdout);
        Assert.Matches(@"@@AUDIT-SOCKET [1-9]", r.Stdout);
    }

    [Fact]
    public void Every_vmm_thread_of_the_all_devices_hotplug_scenario_runs_under_a_filter()
    {
        var r = kvm.Results["linux-hotplug"];
        string all = Show(r);
        var m = Regex.Match(r.Stdout, "@@THREADS\n(.*?)@@END-THREADS", RegexOptions.Singleline);
        Assert.True(m.Success, all);
        var threads = m.Groups[1].Value.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(l => l.Split('|')).ToList();
        Assert.True(threads.Count >= 5, all);
        // Seccomp: 2 = SECCOMP_MODE_FILTER; the process filter went to every thread (TSYNC) and each role thread
        // added its own. The role threads are there: vCPUs, device workers, the console, the event monitor.
        Assert.All(threads, t => Assert.True(t.Length == 3 && t[1] == "Seccomp:2", $"{string.Join('|', t)}\n{all}"));
        // Seccomp_filters: 2 = the process filter and the role's, each exactly once. The disk's and NIC's workers were
        // started by a vCPU (the guest driver's config write) through the spawner: under a vCPU's filters they would
        // have 3, and under the spawner's alone plus none of their own, 1.
        Assert.Contains(threads, t => t[0] == "vcpu0" && t[2] == "Seccomp_filters:2");
        Assert.Contains(threads, t => t[0].StartsWith("virtio-blk", StringComparison.Ordinal));
        Assert.Contains(threads, t => t[0].StartsWith("virtio-net", StringComparison.Ordinal));
        Assert.All(threads.Where(t => t[0] == "vcpu0" || t[0].StartsWith("virtio-blk", StringComparison.Ordinal)
                || t[0].StartsWith("virtio-net", StringComparison.Ordinal)),
            t => Assert.True(t[2] == "Seccomp_filters:2", $"{string.Join('|', t)}\n{all}"));
        Assert.Contains(threads, t => t[0] == "event-monitor");
        Assert.Contains(threads, t => t[0] == "serial-out");
        Assert.Contains("vmm: seccomp: filters installed (on)", r.Stdout);
        Assert.DoesNotContain("forbidden system call", r.Stdout);
    }

    [Fact]
    public void A_Linux_boot_with_every_device_at_once_passes_with_the_filters_on_and_every_thread_filtered()
    {
        var r = kvm.Results["linux-all-devices"];
        string all = Show(r);
        string M = AllDevicesScenario.Marker;
        // The virtio console's line goes to the serial file too (one console sink), whole; the rest is the serial stream.
        string stdout = KvmFixture.WithoutVirtioConsoleLine(r.Stdout, $"{M} hello on hvc0");
        Assert.Contains("@@VMM-EXIT 0", stdout);
        Assert.Contains("vmm: seccomp: filters installed (on)", stdout);
        Assert.DoesNotContain("forbidden system call", stdout);
        // The guest used each device (its console log is in the output).
        Assert.Matches($@"{M} disk vda \d+ sectors", stdout);
        Assert.Matches($@"{M} disk vdb \d+ sectors", stdout);
        Assert.Contains($"serial 'all-disk'", stdout);
        Assert.Contains($"{M} wrote vda", stdout);
        Assert.Contains($"{M} wrote vdb", stdout);
        Assert.Matches($@"{M} rng virtio_rng\.\d+ ( [0-9a-f]{{2}}){{16}}", stdout);
        Assert.Contains($"{M} eth0 up 52:54:00:12:34:56", stdout);
        Assert.Matches($@"{M} vsock-peer: guest-connect port 7000: sent 30000 received 30000 fnv [0-9a-f]+ ok", stdout);
        Assert.Contains($"{M} fs read host-wrote-this", stdout);
        Assert.Contains($"{M} fs written", stdout);
        Assert.Contains($"{M} gpu bar2 first 0x600D0001", stdout);
        Assert.Contains($"{M} done", stdout);
        // What the guest wrote reached the host: both disks (one through vmm, one through qemu-storage-daemon), the share.
        Assert.Matches(@"@@SECTOR1000-BLK linux-wrote-vd[ab]", r.Stdout);
        Assert.Matches(@"@@SECTOR1000-VHOST linux-wrote-vd[ab]", r.Stdout);
        Assert.Contains("@@GUESTFILE all-devices-guest-wrote-this", r.Stdout);
        // The API answered under the filters while the VM ran.
        Assert.Contains("@@INFO-RC 0", r.Stdout);
        Assert.Contains("\"state\":\"Running\"", r.Stdout);
        // Every thread, with every device active, in filter mode; the role threads are there.
        var m = Regex.Match(r.Stdout, "@@THREADS\n(.*?)@@END-THREADS", RegexOptions.Singleline);
        Assert.True(m.Success, all);
        var threads = m.Groups[1].Value.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.Split('|')).ToList();
        Assert.All(threads, t => Assert.True(t.Length == 3 && t[1] == "Seccomp:2", $"{string.Join('|', t)}\n{all}"));
        // The role threads carry their role's filter on top of the process filter (two in all): without it they would
        // still show mode 2, from the process filter alone.
        foreach (string name in new[] { "vcpu0", "vcpu1", "virtio-rng", "virtio-console", "virtio-vsock 3", "virtio-net tap0", "serial-out", "event-monitor" })
        {
            var thread = threads.FirstOrDefault(t => t[0] == name);
            Assert.True(thread is not null, $"no thread {name}\n{all}");
            Assert.True(thread[2] == "Seccomp_filters:2", $"{string.Join('|', thread)}\n{all}");
        }
        Assert.Contains(threads, t => t[0].StartsWith("virtio-blk ad", StringComparison.Ordinal) && t[2] == "Seccomp_filters:2");
        // Threads without a role (main, the runtime's, the thread pool's) have the process filter only.
        Assert.Contains(threads, t => t[2] == "Seccomp_filters:1");
    }
}
