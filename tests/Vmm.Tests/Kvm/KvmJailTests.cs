using System.Text.RegularExpressions;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>`vmm jail` on real KVM (the nested VM runs as root, has cgroup v2 and landlock in its LSM list): a stock
/// Linux boots in the jail, the jailed vmm runs as uid/gid 1000 with no capabilities, no_new_privs, its own
/// namespaces and cgroup, sees only the jail's files, and cannot open the host files it was not given.</summary>
[Collection("kvm")]
public class KvmJailTests(KvmFixture kvm)
{
    /// <summary>The scenario: mounts cgroup2 (and securityfs, to print the LSM list), starts the jailed VM with an API
    /// socket, reads the jailed vmm's /proc status, cgroup, namespaces and root from outside while the guest boots, pings
    /// the API through the socket the jail made, waits for the guest's power-off, then SIGTERMs the jailer (forwarded).</summary>
    public const string Script =
        "mkdir -p /sys/fs/cgroup; grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup; " +
        "mount -t securityfs none /sys/kernel/security 2>/dev/null; echo \"@@LSM $(cat /sys/kernel/security/lsm)\"; " +
        "echo host-secret > secret.txt; mkdir -p jail-api && chown 1000:1000 jail-api; " +
        "VMM_TEST_JAIL_PROBE=$PWD/secret.txt,/proc/1/root$PWD/secret.txt,/dev/mem,/vm/vmlinuz,+/run/vmm/sock1/landlock-probe " +
        "./vmm jail --id jail-test --uid 1000 --gid 1000 --new-netns --cgroup pids.max=64 --cgroup memory.max=512M --cgroup 'cpu.max=max 100000' " +
        "-- run --kernel vmlinuz --initrd initramfs.cpio.gz --memory 256M --cmdline '" + KvmFixture.InitramfsCommandLine + "' " +
        "--api-socket jail-api/api.sock --log-level info >jail.out 2>jail.err & jp=$!; " +
        "n=0; while [ ! -S jail-api/api.sock ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done; " +
        "echo \"@@SOCKET $([ -S jail-api/api.sock ] && echo yes || echo no)\"; pid=$(cat /srv/jailer/vmm/jail-test/root/vmm.pid); " +
        "grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/$pid/status | sed 's/^/@@STATUS /'; " +
        "echo \"@@CGROUP $(cat /proc/$pid/cgroup)\"; d=/sys/fs/cgroup/vmm/jail-test; echo \"@@LIMITS $(cat $d/pids.max) $(cat $d/memory.max) $(cat $d/cpu.max)\"; " +
        "for ns in mnt pid net ipc uts; do [ \"$(readlink /proc/$pid/ns/$ns)\" != \"$(readlink /proc/self/ns/$ns)\" ] && echo \"@@NS $ns own\" || echo \"@@NS $ns shared\"; done; " +
        "echo \"@@ROOT $(ls /proc/$pid/root/ | tr '\\n' ' ')\"; echo \"@@DEV $(ls /proc/$pid/root/dev | tr '\\n' ' ')\"; " +
        "./vmm remote --api-socket jail-api/api.sock ping; echo \"@@PING $?\"; " +
        "n=0; while ! grep -q '" + KvmFixture.InitramfsMarker + "' jail.out && [ $n -lt 2000 ]; do sleep 0.1; n=$((n+1)); done; sleep 0.5; " +
        "kill -TERM $jp; wait $jp; rc=$?; " +
        "[ -e jail-api/api.sock ] && echo '@@SOCKET LEFT' || echo '@@SOCKET GONE'; [ -d $d ] && echo '@@CGROUP LEFT' || echo '@@CGROUP GONE'; " +
        "echo @@OUT; cat jail.out; cat jail.err >&2; exit $rc";

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    [Fact]
    public void A_jailed_Linux_boots_and_the_jailed_vmm_runs_unprivileged_in_its_own_namespaces_and_cgroup()
    {
        var r = kvm.Results["jail-linux"];
        Assert.True(r.ExitCode == 0, Show(r)); // SIGTERM forwarded: the jailed vmm stopped in order
        Assert.Contains(KvmFixture.InitramfsMarker, r.Stdout); // the guest's serial output: it booted to its /init
        Assert.Contains("@@SOCKET yes", r.Stdout);
        Assert.Contains("@@PING 0", r.Stdout); // the API answers through the socket made inside the jail
        Assert.Matches(@"@@STATUS Uid:\s+1000\s+1000\s+1000\s+1000\n", r.Stdout);
        Assert.Matches(@"@@STATUS Gid:\s+1000\s+1000\s+1000\s+1000\n", r.Stdout);
        Assert.Matches(@"@@STATUS Groups:\s*\n", r.Stdout);
        foreach (string set in new[] { "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb" })
            Assert.Matches($@"@@STATUS {set}:\s+0000000000000000\n", r.Stdout);
        Assert.Matches(@"@@STATUS NoNewPrivs:\s+1\n", r.Stdout);
        Assert.Contains("@@CGROUP 0::/vmm/jail-test\n", r.Stdout);
        Assert.Contains("@@LIMITS 64 536870912 max 100000\n", r.Stdout);
        foreach (string ns in new[] { "mnt", "pid", "net", "ipc", "uts" })
            Assert.Contains($"@@NS {ns} own", r.Stdout);
        // The jail's root holds the executable, its libraries, the VM's files, the devices, /proc and the socket directory.
        string root = Regex.Match(r.Stdout, "@@ROOT (.*)\n").Groups[1].Value;
        Assert.Equal(["dev", "lib", "lib64", "proc", "run", "vm", "vmm", "vmm.pid"], root.Split(' ', StringSplitOptions.RemoveEmptyEntries).Where(e => e != "usr").Order());
        Assert.Equal(["kvm", "null", "urandom"], Regex.Match(r.Stdout, "@@DEV (.*)\n").Groups[1].Value.Split(' ', StringSplitOptions.RemoveEmptyEntries).Order());
        Assert.Contains("@@SOCKET GONE", r.Stdout);
        Assert.Contains("@@CGROUP GONE", r.Stdout);
    }

    [Fact]
    public void The_jailed_vmm_cannot_open_host_files_it_was_not_given_and_landlock_denies_what_file_modes_allow()
    {
        var r = kvm.Results["jail-linux"];
        Assert.Matches(@"vmm: jail probe: open /\S*/secret\.txt: No such file or directory \(ENOENT\)", r.Stderr);
        Assert.Matches(@"vmm: jail probe: open /proc/1/root/\S*/secret\.txt: No such file or directory \(ENOENT\)", r.Stderr);
        Assert.Contains("vmm: jail probe: open /dev/mem: No such file or directory (ENOENT)", r.Stderr);
        Assert.Contains("vmm: jail probe: open /vm/vmlinuz: opened", r.Stderr); // what it was given, it can open
        // The socket directory belongs to uid 1000, so only landlock (which allows sockets there, no regular files) says no.
        Assert.Contains("landlock", r.Stdout.Split('\n').First(l => l.StartsWith("@@LSM", StringComparison.Ordinal)));
        Assert.Contains("vmm: jail probe: create /run/vmm/sock1/landlock-probe: Permission denied (EACCES)", r.Stderr);
        Assert.DoesNotContain("landlock is not available", r.Stderr);
    }
}
