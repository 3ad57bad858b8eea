using Vmm.Cli;
using Vmm.Cli.Jail;

namespace Vmm.Tests.Cli;

/// <summary>`vmm jail`: option parsing, the jail plan (what goes into the jail and how the VM options are rewritten),
/// the cgroup v2 lookup — all without KVM or privileges. The jail itself is built by JailHostTests (this host, as
/// root) and the KVM scenario "jail-linux" (a jailed Linux boot in the nested VM).</summary>
public class JailTests
{
    private static readonly string[] Run = ["run", "--kernel", "k"];

    private static JailOptions Parse(params string[] args) => JailOptions.Parse(args);

    [Fact]
    public void Every_jail_option_parses_with_Firecrackers_names()
    {
        var o = Parse("--id", "vm-1", "--uid", "1000", "--gid=100", "--exec-file", "/usr/bin/vmm", "--chroot-base-dir", "/tmp/j",
            "--netns", "/var/run/netns/a", "--parent-cgroup", "tenants/a", "--cgroup", "cpu.max=50000 100000", "--cgroup", "pids.max=64",
            "--resource-limit", "no-file=1024", "--resource-limit=fsize=1000000", "--", "run", "--kernel", "k", "--memory", "1G");
        Assert.Equal(("vm-1", 1000u, 100u, "/usr/bin/vmm", "/tmp/j", "/var/run/netns/a", "tenants/a"),
            (o.Id, o.Uid, o.Gid, o.ExecFile, o.ChrootBase, o.NetNs, o.ParentCgroup));
        Assert.Equal([new("cpu.max", "50000 100000"), new KeyValuePair<string, string>("pids.max", "64")], o.Cgroups);
        Assert.Equal((1024UL, 1000000UL), (o.ResourceLimits["no-file"], o.ResourceLimits["fsize"]));
        Assert.Equal(["run", "--kernel", "k", "--memory", "1G"], o.VmArgs);
        Assert.Equal("/tmp/j/vmm/vm-1/root", o.RootDir);
        Assert.Equal(["cpu", "pids"], Cgroup.Controllers(o));
    }

    [Fact]
    public void Defaults_are_Firecrackers()
    {
        var o = Parse(["--id", "a", "--uid", "1", "--gid", "2", "--", .. Run]);
        Assert.Equal(("/srv/jailer", "vmm", null, false), (o.ChrootBase, o.ParentCgroup, o.ExecFile, o.NewNetNs));
        Assert.Equal("/srv/jailer/vmm/a/root", o.RootDir);
        Assert.Empty(o.Cgroups);
        Assert.Equal(2048UL, JailOptions.DefaultNoFile);
    }

    [Theory]
    [InlineData(new[] { "--uid", "1", "--gid", "1", "--", "run", "--kernel", "k" }, "jail: --id ID is required")]
    [InlineData(new[] { "--id", "a/b", "--uid", "1", "--gid", "1", "--", "run", "--kernel", "k" }, "jail: --id 'a/b' must be 1 to 64 letters, digits or '-'")]
    [InlineData(new[] { "--id", "a", "--gid", "1", "--", "run", "--kernel", "k" }, "jail: --uid and --gid are required")]
    [InlineData(new[] { "--id", "a", "--uid", "root", "--gid", "1", "--", "run", "--kernel", "k" }, "jail: --uid must be a number (a user id), not 'root'")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "-1", "--", "run", "--kernel", "k" }, "jail: --gid must be a number (a group id), not '-1'")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1" }, "jail: the VM's options follow '--'")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--", "demo" }, "jail: the VM's options after '--' start with 'run'")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--bogus", "--", "run" }, "jail: unknown option '--bogus'")]
    [InlineData(new[] { "--id", "a", "--id", "b", "--uid", "1", "--gid", "1", "--", "run" }, "jail: --id is given twice")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--netns", "/x", "--new-netns", "--", "run" }, "jail: --netns joins a network namespace and --new-netns makes one")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--cgroup", "cpu", "--", "run" }, "jail: --cgroup must be FILE=VALUE")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--cgroup", "../x.max=1", "--", "run" }, "jail: --cgroup must be FILE=VALUE")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--cgroup", "memory.max=", "--", "run" }, "jail: --cgroup memory.max needs a value on one line")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--cgroup", "cgroup.procs=1", "--", "run" }, "jail: --cgroup cgroup.procs: the cgroup.* files are the jailer's to write")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--resource-limit", "nproc=1", "--", "run" }, "jail: --resource-limit must be fsize=BYTES or no-file=N")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--resource-limit", "no-file=0", "--", "run" }, "jail: --resource-limit no-file needs a whole number of at least 1, not '0'")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--parent-cgroup", "../up", "--", "run" }, "jail: --parent-cgroup '../up' must be a relative path")]
    [InlineData(new[] { "--id", "a", "--uid", "1", "--gid", "1", "--parent-cgroup", "/abs", "--", "run" }, "jail: --parent-cgroup '/abs' must be a relative path")]
    [InlineData(new[] { "--id", "a", "--gid", "1", "--uid" }, "jail: --uid needs a value")]
    public void Bad_jail_options_are_one_clear_line(string[] args, string message)
    {
        var e = Assert.Throws<UsageException>(() => JailOptions.Parse(args));
        Assert.StartsWith(message, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    private static JailPlan Plan(params string[] vmArgs) =>
        JailPlan.Build(vmArgs, "/host/dir", ["/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"], p => p == "/dev/kvm");

    [Fact]
    public void Files_are_bound_under_vm_and_the_options_rewritten_to_them()
    {
        var plan = Plan("run", "--kernel", "vmlinuz", "--initrd=/boot/initrd.img", "--cmdline", "console=ttyS0 a=b",
            "--disk", "path=disk.img,serial=d1", "--disk", "path=/other/disk.img,readonly=on", "--disk", "vhost_user=on,socket=/run/qsd.sock",
            "--fs", "tag=share,socket=fs.sock", "--device", "vfio-user=/run/gpu.sock", "--serial", "file:serial.log",
            "--api-socket", "/run/api/vm.sock", "--vsock", "cid=3,socket=/run/api/v.sock", "--event-monitor", "path=/var/log/ev.json",
            "--memory", "1G", "--rng", "--log-level", "info");
        Assert.Equal(["run", "--kernel=/vm/vmlinuz", "--initrd=/vm/initrd.img", "--cmdline=console=ttyS0 a=b",
            "--disk=path=/vm/disk.img,serial=d1", "--disk=path=/vm/disk-2.img,readonly=on", "--disk=vhost_user=on,socket=/vm/qsd.sock",
            "--fs=tag=share,socket=/vm/fs.sock", "--device=vfio-user=/vm/gpu.sock", "--serial=file:/vm/serial.log",
            "--api-socket=/run/vmm/sock1/vm.sock", "--vsock=cid=3,socket=/run/vmm/sock1/v.sock", "--event-monitor=path=/vm/ev.json",
            "--memory=1G", "--rng", "--log-level=info"], plan.RunArgs);
        JailBind Bind(string host) => plan.Binds.Single(b => b.HostPath == host);
        Assert.Equal(("/vm/vmlinuz", true, JailRights.Read), (Bind("/host/dir/vmlinuz").JailPath, Bind("/host/dir/vmlinuz").ReadOnly, Bind("/host/dir/vmlinuz").Rights));
        Assert.Equal((false, JailRights.Read | JailRights.Write), (Bind("/host/dir/disk.img").ReadOnly, Bind("/host/dir/disk.img").Rights));
        Assert.True(Bind("/other/disk.img").ReadOnly);
        var api = Bind("/run/api");
        Assert.Equal(("/run/vmm/sock1", true, false, JailRights.Read | JailRights.MakeSocket), (api.JailPath, api.IsDirectory, api.ReadOnly, api.Rights));
        Assert.Equal(["/host/dir/serial.log", "/var/log/ev.json"], plan.CreateIfMissing);
        // The libraries at their own paths, read-only and executable; the devices the VM needs and no more.
        Assert.Equal(("/lib64/ld-linux-x86-64.so.2", true, JailRights.Read | JailRights.Execute),
            (Bind("/lib64/ld-linux-x86-64.so.2").JailPath, Bind("/lib64/ld-linux-x86-64.so.2").ReadOnly, Bind("/lib64/ld-linux-x86-64.so.2").Rights));
        Assert.Equal(["/dev/null", "/dev/urandom", "/dev/kvm"], plan.Devices.Select(d => d.JailPath));
        Assert.Null(plan.MemlockBytes); // no kernel VFIO: RLIMIT_MEMLOCK is left as it is
        // The rewritten command line is one 'vmm run' accepts.
        var vm = Options.Parse([.. plan.RunArgs]);
        Assert.Equal(("/vm/vmlinuz", "/vm/initrd.img", "console=ttyS0 a=b", 3), (vm.Kernel, vm.Initrd, vm.Cmdline, vm.Disks.Count));
    }

    /// <summary>The plan rewrites what Options.Parse took, so it cannot disagree with the parser over which flags take
    /// a value: a flag without one, next to flags whose value looks like a flag or a path, each keeps its own.</summary>
    [Fact]
    public void Flags_without_a_value_and_values_that_look_like_flags_are_split_as_vmm_run_splits_them()
    {
        var plan = Plan("run", "--no-irqchip", "--kernel", "vmlinuz", "--stats", "--cmdline", "--rng", "--rng",
            "--seccomp=log", "--on-reboot", "exit", "--serial", "file:s.log");
        Assert.Equal(["run", "--no-irqchip", "--kernel=/vm/vmlinuz", "--stats", "--cmdline=--rng", "--rng", "--seccomp=log",
            "--on-reboot=exit", "--serial=file:/vm/s.log"], plan.RunArgs);
        var vm = Options.Parse([.. plan.RunArgs]);
        Assert.Equal(("--rng", true, true, true), (vm.Cmdline, vm.Rng, vm.Stats, vm.NoIrqchip));
    }

    [Fact]
    public void The_same_file_twice_is_one_bind_with_the_wider_rights()
    {
        var plan = Plan("run", "--kernel", "/a/disk.img", "--disk", "path=/a/disk.img");
        var b = Assert.Single(plan.Binds, b => b.HostPath == "/a/disk.img");
        Assert.Equal(("/vm/disk.img", false, JailRights.Read | JailRights.Write), (b.JailPath, b.ReadOnly, b.Rights));
        Assert.Equal(["run", "--kernel=/vm/disk.img", "--disk=path=/vm/disk.img"], plan.RunArgs);
    }

    /// <summary>readonly= takes the words `vmm run` takes (on/true/yes, off/false/no): the bind is read-only exactly
    /// when the disk is.</summary>
    [Theory]
    [InlineData("on", true)]
    [InlineData("true", true)]
    [InlineData("yes", true)]
    [InlineData("off", false)]
    [InlineData("no", false)]
    public void A_disk_is_bound_read_only_when_vmm_run_opens_it_read_only(string word, bool readOnly)
    {
        var plan = Plan("run", "--kernel", "k", "--disk", $"path=/a/disk.img,readonly={word}");
        var b = Assert.Single(plan.Binds, b => b.HostPath == "/a/disk.img");
        Assert.Equal((readOnly, readOnly ? JailRights.Read : JailRights.Read | JailRights.Write), (b.ReadOnly, b.Rights));
    }

    [Fact]
    public void A_tap_brings_dev_net_tun_and_no_kvm_node_is_made_where_the_host_has_none()
    {
        var plan = JailPlan.Build(["run", "--kernel", "k", "--net", "tap=tap0"], "/", [], _ => false);
        Assert.Equal(["/dev/null", "/dev/urandom", "/dev/net/tun"], plan.Devices.Select(d => d.JailPath));
        Assert.Equal([false, false, true], plan.Devices.Select(d => !d.Shared));
    }

    [Fact]
    public void Kernel_VFIO_raises_memlock_to_the_guest_RAM_and_brings_sysfs()
    {
        var plan = Plan("run", "--kernel", "k", "--memory", "2G", "--device", "vfio=/sys/bus/pci/devices/0000:01:00.0");
        Assert.Equal(2UL << 30, plan.MemlockBytes);
        Assert.Contains(plan.Binds, b => b.HostPath == "/sys" && b.JailPath == "/sys" && b.ReadOnly);
        Assert.Contains("--device=vfio=/sys/bus/pci/devices/0000:01:00.0", plan.RunArgs);
        Assert.Null(Plan("run", "--kernel", "k", "--device", "vfio-user=/g.sock").MemlockBytes); // vfio-user pins nothing
    }

    [Theory]
    [InlineData(new[] { "run", "--config", "vm.json" }, "jail: --config is not supported in the jail yet")]
    [InlineData(new[] { "run", "--kernel", "k", "--frob" }, "unknown option '--frob'")]
    [InlineData(new[] { "run", "--kernel", "a\nb" }, "jail: --kernel: a path with a newline or tab cannot be jailed")]
    public void VM_options_the_jail_cannot_take_are_one_clear_line(string[] vmArgs, string message)
    {
        var e = Assert.Throws<UsageException>(() => Plan(vmArgs));
        Assert.StartsWith(message, e.Message);
    }

    [Fact]
    public void Api_socket_fd_and_event_monitor_fd_pass_through_unchanged()
    {
        var plan = Plan("run", "--kernel", "k", "--api-socket", "fd=3", "--event-monitor", "fd=4");
        Assert.Equal(["run", "--kernel=/vm/k", "--api-socket=fd=3", "--event-monitor=fd=4"], plan.RunArgs);
        Assert.Equal([3, 4], plan.InheritedFds); // kept open across execve; every other inherited descriptor is closed
    }

    [Fact]
    public void The_cgroup_v2_hierarchy_is_found_in_mountinfo()
    {
        string[] hybrid =
        [
            "25 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
            "30 25 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755",
            "31 30 0:27 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu",
            "40 30 0:35 / /sys/fs/cgroup/unified rw shared:19 - cgroup2 cgroup2 rw",
        ];
        Assert.Equal("/sys/fs/cgroup/unified", Cgroup.Hierarchy(hybrid));
        Assert.Equal("/sys/fs/cgroup", Cgroup.Hierarchy(["28 22 0:24 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate"]));
        Assert.Equal("/mnt/my cgroup", Cgroup.Hierarchy(["28 22 0:24 / /mnt/my\\040cgroup rw - cgroup2 none rw"]));
        Assert.Null(Cgroup.Hierarchy(hybrid[..3]));
    }

    [Fact]
    public void The_ELF_interpreter_of_a_dynamic_executable_is_found()
    {
        Assert.Equal("/lib64/ld-linux-x86-64.so.2", Jailer.ElfInterpreter("/bin/sh"));
        string notElf = Path.GetTempFileName();
        try
        {
            File.WriteAllText(notElf, "#!/bin/sh\n" + new string('x', 100));
            Assert.StartsWith("jail: --exec-file", Assert.Throws<UsageException>(() => Jailer.ElfInterpreter(notElf)).Message);
        }
        finally
        {
            File.Delete(notElf);
        }
    }

    [Fact]
    public void Landlock_handles_every_right_of_the_kernels_ABI()
    {
        Assert.Equal(0x1FFFUL, Vmm.Interop.JailCalls.LandlockFsRights(1));
        Assert.Equal(0x3FFFUL, Vmm.Interop.JailCalls.LandlockFsRights(2));
        Assert.Equal(0x7FFFUL, Vmm.Interop.JailCalls.LandlockFsRights(4));
        Assert.Equal(0xFFFFUL, Vmm.Interop.JailCalls.LandlockFsRights(6));
    }
}
