using Vmm.Tests.TestKit;

namespace Vmm.Tests.Cli;

/// <summary>The native vmm's jailer on this host, as root, without KVM: it builds the jail, enters it, drops its
/// privileges and execve's `vmm run`, which probes the host files (VMM_TEST_JAIL_PROBE) and then refuses the
/// kernel it was given (not a kernel: status 6), before it needs /dev/kvm. The bad-input statuses are checked on the same binary.</summary>
public sealed class JailHostTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmm-jail-test-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static Repo.Result Jail(string baseDir, string[] jailArgs, string[] vmArgs, string? probe = null)
    {
        var env = new Dictionary<string, string>();
        if (probe is not null)
            env["VMM_TEST_JAIL_PROBE"] = probe;
        return Repo.Run(PublishedVmm.Path, ["jail", "--chroot-base-dir", baseDir, .. jailArgs, "--", "run", .. vmArgs], baseDir,
            TimeSpan.FromMinutes(1), "", env);
    }

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    [Fact]
    public void The_jailed_vmm_sees_only_its_files_and_runs_as_the_given_user()
    {
        Assert.True(Vmm.Interop.JailCalls.EffectiveUid == 0, "this test builds a real jail: it runs as root (as CI does)");
        File.WriteAllText(Path.Combine(_dir, "kernel.bin"), "not really a kernel");
        File.WriteAllText(Path.Combine(_dir, "secret.txt"), "host secret");
        Directory.CreateDirectory(Path.Combine(_dir, "api"));
        Repo.MustRun("chown", "4321:4321", Path.Combine(_dir, "api"));
        var r = Jail(_dir, ["--id", "host-test", "--uid", "4321", "--gid", "4321"],
            ["--kernel", "kernel.bin", "--api-socket", "api/api.sock"],
            probe: $"{_dir}/secret.txt,/etc/hostname,/vm/kernel.bin,/proc/1/root/etc/hostname,+/run/vmm/sock1/probe,+/vm/new");
        // vmm itself, inside the jail, read the kernel it was given and refused it as any vmm would (status 6).
        Assert.True(r.ExitCode == 6, Show(r));
        Assert.Contains("vmm: error: cannot boot: /vm/kernel.bin: not a kernel vmm can boot", r.Stderr);
        Assert.Contains($"vmm: jail probe: open {_dir}/secret.txt: No such file or directory (ENOENT)", r.Stderr);
        Assert.Contains("vmm: jail probe: open /etc/hostname: No such file or directory (ENOENT)", r.Stderr);
        Assert.Contains("vmm: jail probe: open /proc/1/root/etc/hostname: No such file or directory (ENOENT)", r.Stderr);
        Assert.Contains("vmm: jail probe: open /vm/kernel.bin: opened", r.Stderr);
        Assert.Contains("vmm: jail probe: create /vm/new: Permission denied (EACCES)", r.Stderr);
        // landlock, where this kernel has it, also refuses a regular file in the socket directory uid 4321 owns.
        bool landlock = Vmm.Interop.JailCalls.LandlockAbiVersion() > 0;
        Assert.Contains($"vmm: jail probe: create /run/vmm/sock1/probe: {(landlock ? "Permission denied (EACCES)" : "opened")}", r.Stderr);
        Assert.Equal(!landlock, r.Stderr.Contains("vmm: jail: landlock is not available"));
        // The jail root: the executable (a copy) and what the VM was given; the pid file is gone after the exit.
        string root = Path.Combine(_dir, "vmm", "host-test", "root");
        Assert.True(File.Exists(Path.Combine(root, "vmm")));
        Assert.Equal(new FileInfo(PublishedVmm.Path).Length, new FileInfo(Path.Combine(root, "vmm")).Length);
        Assert.True(File.Exists(Path.Combine(root, "vm", "kernel.bin")));
        Assert.False(File.Exists(Path.Combine(root, "vmm.pid")));
    }

    [Fact]
    public void A_descriptor_the_caller_left_open_does_not_cross_into_the_jail()
    {
        File.WriteAllText(Path.Combine(_dir, "kernel.bin"), "not really a kernel");
        File.WriteAllText(Path.Combine(_dir, "secret.txt"), "host secret");
        // fd 100 is open on a host file when the jailer starts; /proc/self/fd/100 would reopen it from inside the jail.
        var r = Repo.Run("bash", ["-c", $"exec 100<'{_dir}/secret.txt'; exec '{PublishedVmm.Path}' jail --chroot-base-dir '{_dir}' --id fd-test " +
            "--uid 4321 --gid 4321 -- run --kernel kernel.bin"], _dir, TimeSpan.FromMinutes(1), "",
            new Dictionary<string, string> { ["VMM_TEST_JAIL_PROBE"] = "/proc/self/fd/100" });
        Assert.True(r.ExitCode == 6, Show(r));
        Assert.Contains("vmm: jail probe: open /proc/self/fd/100: No such file or directory (ENOENT)", r.Stderr);
    }

    [Fact]
    public void The_jail_needs_the_native_executable_and_says_so()
    {
        // The Debug build runs on the .NET runtime, which a jail does not hold.
        string debugVmm = Repo.PathTo("src", "Vmm.Cli", "bin", "Debug", "net10.0", "vmm");
        var r = Repo.Run(debugVmm, ["jail", "--id", "a", "--uid", "1", "--gid", "1", "--", "run", "--kernel", "k"], timeout: TimeSpan.FromMinutes(1));
        Assert.True(r.ExitCode == 2, Show(r));
        Assert.Equal("vmm: error: jail: needs the native vmm executable (dotnet publish src/Vmm.Cli -c Release): this vmm runs on the .NET runtime, which a jail does not hold\n", r.Stderr);
        var help = Repo.Run(debugVmm, ["jail", "--help"], timeout: TimeSpan.FromMinutes(1));
        Assert.True(help.ExitCode == 0, Show(help));
        Assert.Contains("--chroot-base-dir DIR", help.Stdout);
    }

    [Fact]
    public void Bad_jail_input_is_one_line_and_status_2()
    {
        File.WriteAllText(Path.Combine(_dir, "k"), "kernel");
        File.WriteAllText(Path.Combine(_dir, "disk.img"), "disk");
        foreach (var (jail, vm, message) in new (string[], string[], string)[]
        {
            (["--uid", "1", "--gid", "1"], ["--kernel", "k"], "vmm: error: jail: --id ID is required"),
            (["--id", "x", "--uid", "1", "--gid", "1"], ["--kernel", "missing"], $"vmm: error: jail: --kernel {_dir}/missing: no such file"),
            (["--id", "x", "--uid", "1", "--gid", "1"], ["--kernel", "k", "--disk", "path=disk.img"],
                $"vmm: error: jail: --disk {_dir}/disk.img: uid 1 gid 1 may not write it (owner 0:0, mode 644); chown or chmod it, or give readonly=on"),
            (["--id", "x", "--uid", "1", "--gid", "1"], ["--kernel", "k", "--api-socket", "/no/such/dir/api.sock"],
                "vmm: error: jail: --api-socket /no/such/dir: no such directory"),
            (["--id", "x", "--uid", "1", "--gid", "1", "--exec-file", "k"], ["--kernel", "k"], "vmm: error: jail: --exec-file"),
        })
        {
            var r = Jail(_dir, jail, vm);
            Assert.True(r.ExitCode == 2, Show(r));
            Assert.StartsWith(message, r.Stderr);
            Assert.Single(r.Stderr.TrimEnd('\n').Split('\n'));
        }
    }
}
