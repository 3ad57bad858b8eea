using Vmm.Cli;
using Vmm.Machine;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Cli;

public class CliTests
{
    [Fact]
    public void No_arguments_means_the_demo_guest()
    {
        var o = Options.Parse([]);
        Assert.True(o.Demo);
        Assert.Null(o.Kernel);
    }

    [Fact]
    public void Run_parses_every_option()
    {
        var o = Options.Parse(["run", "--kernel", "k.elf", "--initrd", "i.img", "--cmdline", "a b=c", "--memory", "2G",
            "--cpus", "3", "--serial", "file:/tmp/out", "--log-level", "debug", "--stats", "--no-irqchip"]);
        Assert.Equal(("k.elf", "i.img", "a b=c", 2UL << 30, 3), (o.Kernel, o.Initrd, o.Cmdline, o.Memory, o.Cpus));
        Assert.Equal((SerialMode.File, "/tmp/out", LogLevel.Debug), (o.Serial, o.SerialPath, o.LogLevel));
        Assert.True(o.Stats && o.NoIrqchip && !o.Demo);
    }

    [Fact]
    public void Options_accept_the_equals_form_and_imply_run_when_a_kernel_is_given()
    {
        var o = Options.Parse(["--kernel=k", "--memory=512M", "--serial=none"]);
        Assert.Equal(("k", 512UL << 20, SerialMode.None), (o.Kernel, o.Memory, o.Serial));
        Assert.True(Options.Parse(["--stats"]).Demo);
    }

    [Theory]
    [InlineData("128M", 128UL << 20)]
    [InlineData("128MiB", 128UL << 20)]
    [InlineData("2g", 2UL << 30)]
    [InlineData("1T", 1UL << 40)]
    [InlineData("65536K", 64UL << 20)]
    [InlineData("4194304", 4UL << 20)]
    public void Sizes_parse_with_binary_suffixes(string text, ulong bytes) => Assert.Equal(bytes, Options.ParseSize(text, "--memory"));

    [Theory]
    [InlineData(new[] { "run" }, "'run' needs --kernel PATH")]
    [InlineData(new[] { "run", "--kernel" }, "--kernel needs a value")]
    [InlineData(new[] { "--memory", "lots" }, "--memory must be a size such as 128M or 2G, not 'lots'")]
    [InlineData(new[] { "--memory", "99999999999T" }, "--memory 99999999999T is too large")]
    [InlineData(new[] { "--cpus", "0" }, "--cpus must be a whole number of at least 1, not '0'")]
    [InlineData(new[] { "--serial", "tcp:1" }, "--serial must be stdio, file:PATH or none")]
    [InlineData(new[] { "--log-level", "loud" }, "--log-level must be error, warn, info or debug")]
    [InlineData(new[] { "--frobnicate" }, "unknown option '--frobnicate'")]
    [InlineData(new[] { "boot" }, "unknown command 'boot'")]
    [InlineData(new[] { "--on-reboot", "halt" }, "--on-reboot must be exit or restart, not 'halt'")]
    [InlineData(new[] { "demo", "--kernel", "k" }, "'demo' boots the built-in guest")]
    [InlineData(new[] { "--device", "gpu" }, "--device: 'gpu' is not key=value")]
    [InlineData(new[] { "--device", "p2p=on" }, "--device needs exactly one of vfio=")]
    [InlineData(new[] { "--device", "vfio=/a,vfio-user=/b" }, "--device needs exactly one of vfio=")]
    [InlineData(new[] { "--device", "vfio=" }, "--device: vfio= needs a path")]
    [InlineData(new[] { "--device", "vfio=/a,p2p=maybe" }, "--device: p2p must be on or off")]
    [InlineData(new[] { "--fs", "socket=/s" }, "--fs needs tag=TAG")]
    [InlineData(new[] { "--fs", "tag=a" }, "--fs needs socket=PATH")]
    [InlineData(new[] { "--fs", "tag=a,socket=/s,queue_size=100" }, "--fs: queue_size must be a power of two, not 100")]
    [InlineData(new[] { "--fs", "tag=a,socket=/s,num_queues=0" }, "--fs: num_queues must be a number from 1 to 63, not '0'")]
    [InlineData(new[] { "--fs", "tag=0123456789012345678901234567890123456,socket=/s" }, "--fs: tag '0123456789012345678901234567890123456' is longer than 36 bytes")]
    [InlineData(new[] { "--disk", "vhost_user=on" }, "--disk vhost_user=on needs socket=PATH")]
    [InlineData(new[] { "--disk", "vhost_user=on,socket=/s,path=/i" }, "--disk: path does not go with vhost_user=on")]
    [InlineData(new[] { "--disk", "path=/i,socket=/s" }, "--disk: socket needs vhost_user=on")]
    [InlineData(new[] { "--vsock", "cid=3" }, "--vsock needs cid=N,socket=PATH")]
    [InlineData(new[] { "--vsock", "socket=/s" }, "--vsock needs cid=N,socket=PATH")]
    [InlineData(new[] { "--vsock", "cid=2,socket=/s" }, "--vsock: cid '2' must be a number from 3 to 4294967294")]
    [InlineData(new[] { "--vsock", "cid=x,socket=/s" }, "--vsock: cid 'x' must be a number")]
    [InlineData(new[] { "--vsock", "cid=3,socket=/s,port=1" }, "--vsock: unknown key 'port'")]
    [InlineData(new[] { "--vsock", "cid=3,socket=/s", "--vsock", "cid=4,socket=/t" }, "--vsock is given twice")]
    public void Bad_command_lines_name_the_option(string[] args, string message)
    {
        var e = Assert.Throws<UsageException>(() => Options.Parse(args));
        Assert.Contains(message, e.Message);
    }

    [Theory]
    [InlineData("--kernel")]
    [InlineData("--initrd")]
    [InlineData("--cmdline")]
    [InlineData("--memory")]
    [InlineData("--cpus")]
    [InlineData("--serial")]
    [InlineData("--log-level")]
    [InlineData("--stats")]
    [InlineData("--no-irqchip")]
    [InlineData("--on-reboot")]
    [InlineData("--device vfio=/sys/bus/pci/devices/")]
    [InlineData("--device vfio=/sys/bus/mdev/devices/")]
    [InlineData("--device vfio-user=")]
    [InlineData("p2p=on")]
    [InlineData("--fs tag=")]
    [InlineData("--disk vhost_user=on,socket=")]
    [InlineData("--vsock cid=N,socket=PATH")]
    [InlineData("--help")]
    public void Help_documents_every_option(string option) => Assert.Contains(option, Options.HelpText);

    [Fact]
    public void Help_documents_every_exit_status()
    {
        foreach (var f in typeof(ExitStatus).GetFields().Where(f => f.IsLiteral))
            Assert.Matches($@"\n\s+{(int)f.GetValue(null)!}\s", Options.HelpText);
    }

    [Theory]
    [InlineData(0u, 1)]
    [InlineData(1u, 3)]
    [InlineData(0x21u, 0x43)]
    [InlineData(0x80u, 1)] // the OS keeps 8 bits, as with QEMU
    public void Debug_exit_status_is_v_shifted_left_or_1(uint value, int status) => Assert.Equal(status, ExitStatus.FromDebugExit(value));

    private static (int Status, string Stderr) RunVmm(params string[] args)
    {
        var err = new StringWriter();
        var old = Console.Error;
        Console.SetError(err);
        try
        {
            return (Program.Main(args), err.ToString());
        }
        finally
        {
            Console.SetError(old);
        }
    }

    [Fact]
    public void A_missing_kernel_file_is_a_usage_error_not_a_crash()
    {
        var (status, stderr) = RunVmm("run", "--kernel", "/nonexistent/kernel.elf");
        Assert.Equal(ExitStatus.Usage, status);
        Assert.Equal("vmm: error: --kernel /nonexistent/kernel.elf: no such file\n", stderr);
    }

    /// <summary>Paths that are not regular files get one line at once: before, /dev/zero ran 9 s into an
    /// OutOfMemoryException (status 12), a FIFO hung forever, a directory printed .NET's "Access to the path … is
    /// denied".</summary>
    [Fact]
    public void A_path_that_is_not_a_regular_file_is_refused_at_once_in_one_line()
    {
        string dir = Directory.CreateTempSubdirectory("vmm-cli-").FullName;
        string fifo = Path.Combine(dir, "fifo");
        try
        {
            Repo.MustRun("mkfifo", fifo);
            var cases = new (string[] Args, string Line)[]
            {
                (["run", "--kernel", "/dev/zero"], "vmm: error: --kernel /dev/zero: is a character device, not a regular file\n"),
                (["run", "--kernel", fifo], $"vmm: error: --kernel {fifo}: is a FIFO, not a regular file\n"),
                (["run", "--kernel", dir], $"vmm: error: --kernel {dir}: is a directory\n"),
                (["run", "--kernel", "/nonexistent/k", "--initrd", "/dev/null"], "vmm: error: --kernel /nonexistent/k: no such file\n"),
                (["run", "--config", "/dev/zero"], "vmm: error: --config /dev/zero: is a character device, not a regular file\n"),
                (["run", "--config", fifo], $"vmm: error: --config {fifo}: is a FIFO, not a regular file\n"),
                (["run", "--config", dir], $"vmm: error: --config {dir}: is a directory\n"),
            };
            foreach (var (args, line) in cases)
            {
                var watch = System.Diagnostics.Stopwatch.StartNew();
                var (status, stderr) = RunVmm(args);
                Assert.Equal(ExitStatus.Usage, status);
                Assert.Equal(line, stderr);
                Assert.True(watch.Elapsed < TimeSpan.FromSeconds(5), $"{string.Join(' ', args)} took {watch.Elapsed}"); // no hang
            }
            string kernel = Path.Combine(dir, "kernel.elf");
            File.WriteAllBytes(kernel, ImageBuilder.Elf(false, 0x10_0000, [new ImageBuilder.Segment(0x10_0000, ImageBuilder.MultibootHeaderBytes())]));
            var (st, err) = RunVmm("run", "--kernel", kernel, "--initrd", "/dev/zero");
            Assert.Equal(ExitStatus.Usage, st);
            Assert.Equal("vmm: error: --initrd /dev/zero: is a character device, not a regular file\n", err);
            // --serial file: a FIFO nobody reads hung the start forever (SIGTERM did not end it), a directory printed .NET's
            // "Access to the path … is denied"; a Unix socket (open gives ENXIO as for a FIFO without a reader) read as
            // that FIFO.
            string socket = Path.Combine(dir, "serial.sock");
            using var listener = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix,
                System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
            listener.Bind(new System.Net.Sockets.UnixDomainSocketEndPoint(socket));
            listener.Listen();
            foreach (var (path, why) in new[]
            {
                (fifo, "is a FIFO nobody reads (start its reader first)"),
                (dir, "is a directory"),
                (socket, "is a socket, not a regular file, character device or FIFO"),
            })
            {
                var watch = System.Diagnostics.Stopwatch.StartNew();
                (st, err) = RunVmm("run", "--kernel", kernel, "--serial", $"file:{path}");
                Assert.Equal(ExitStatus.Usage, st);
                Assert.Equal($"vmm: error: --serial file:{path}: {why}\n", err);
                Assert.True(watch.Elapsed < TimeSpan.FromSeconds(5), $"--serial file:{path} took {watch.Elapsed}"); // no hang
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>Every socket path option on something that is not a usable socket path gets one line and status 2 at
    /// once, from a stat alone: before, a regular file or FIFO given to --fs, --disk vhost_user=on or --device
    /// vfio-user= read "connect failed: Connection refused", a directory "no such socket", and a socket in a missing
    /// directory bind's ENOENT on a temporary name. Measured in-process (after startup): well under 100 ms each.</summary>
    [Fact]
    public void A_socket_path_that_is_not_a_socket_is_refused_at_once_in_one_line()
    {
        string dir = Directory.CreateTempSubdirectory("vmm-cli-sock-").FullName;
        string file = Path.Combine(dir, "file"), fifo = Path.Combine(dir, "fifo"), sub = Path.Combine(dir, "sub");
        string missing = Path.Combine(dir, "missing.sock"), orphan = Path.Combine(dir, "no-dir", "x.sock");
        try
        {
            File.WriteAllText(file, "not a socket");
            Repo.MustRun("mkfifo", fifo);
            Directory.CreateDirectory(sub);
            string kernel = Path.Combine(dir, "kernel.elf");
            File.WriteAllBytes(kernel, ImageBuilder.Elf(false, 0x10_0000, [new ImageBuilder.Segment(0x10_0000, ImageBuilder.MultibootHeaderBytes())]));
            var cases = new (string[] Args, string Line)[]
            {
                (["--api-socket", file], $"--api-socket: {file}: exists and is not a socket (not replacing it)"),
                (["--api-socket", sub], $"--api-socket: {sub}: exists and is not a socket (not replacing it)"),
                (["--api-socket", orphan], $"--api-socket: {orphan}: directory {dir}/no-dir does not exist"),
                (["--vsock", $"cid=3,socket={file}"], $"--vsock socket={file}: vsock socket path '{file}' exists and is not a socket"),
                (["--vsock", $"cid=3,socket={sub}"], $"--vsock socket={sub}: vsock socket path '{sub}' is a directory"),
                (["--vsock", $"cid=3,socket={orphan}"], $"--vsock socket={orphan}: vsock socket path '{orphan}': directory {dir}/no-dir does not exist"),
                (["--fs", $"tag=a,socket={file}"], $"--fs tag=a,socket={file}: is a regular file, not a socket"),
                (["--fs", $"tag=a,socket={fifo}"], $"--fs tag=a,socket={fifo}: is a FIFO, not a socket"),
                (["--fs", $"tag=a,socket={sub}"], $"--fs tag=a,socket={sub}: is a directory"),
                (["--fs", $"tag=a,socket={missing}"], $"--fs tag=a,socket={missing}: no such socket (start virtiofsd --socket-path={missing} first)"),
                (["--disk", $"vhost_user=on,socket={file}"], $"--disk vhost_user=on,socket={file}: is a regular file, not a socket"),
                (["--disk", $"vhost_user=on,socket={fifo}"], $"--disk vhost_user=on,socket={fifo}: is a FIFO, not a socket"),
                (["--disk", $"vhost_user=on,socket={sub}"], $"--disk vhost_user=on,socket={sub}: is a directory"),
                (["--disk", $"vhost_user=on,socket={missing}"], $"--disk vhost_user=on,socket={missing}: no such socket (start the back-end first, " +
                    $"e.g. qemu-storage-daemon --export type=vhost-user-blk,addr.path={missing})"),
                (["--device", $"vfio-user={file}"], $"--device vfio-user={file}: is a regular file, not a socket"),
                (["--device", $"vfio-user={fifo}"], $"--device vfio-user={fifo}: is a FIFO, not a socket"),
                (["--device", $"vfio-user={missing}"], $"--device vfio-user={missing}: no such socket (start the vfio-user server first)"),
            };
            RunVmm("run", "--kernel", kernel, "--serial", "none", "--fs", $"tag=a,socket={file}"); // warm up: JIT, not the check
            var slowest = TimeSpan.Zero;
            foreach (var (args, line) in cases)
            {
                var watch = System.Diagnostics.Stopwatch.StartNew();
                var (status, stderr) = RunVmm(["run", "--kernel", kernel, "--serial", "none", .. args]);
                var took = watch.Elapsed;
                Assert.True(status == ExitStatus.Usage, $"{string.Join(' ', args)}: status {status}: {stderr}");
                Assert.Equal($"vmm: error: {line}\n", stderr);
                Assert.True(took < TimeSpan.FromSeconds(2), $"{string.Join(' ', args)} took {took}"); // no hang, no retry loop
                slowest = took > slowest ? took : slowest;
            }
            Console.WriteLine($"socket path refusals: slowest {slowest.TotalMilliseconds:F1} ms");
            Assert.False(File.Exists(orphan));
            Assert.Equal("not a socket", File.ReadAllText(file)); // nothing replaced
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>A bzImage cut to half its size: the setup header's syssize says how long the kernel must be, so it is
    /// refused as truncated (status 6) instead of booting into a triple fault (status 8).</summary>
    [Fact]
    public void A_truncated_bzImage_is_refused_before_the_guest_starts()
    {
        var image = File.ReadAllBytes(Vmm.Tests.Kvm.KvmFixture.StockKernel());
        string path = Path.Combine(Path.GetTempPath(), $"vmm-half-{Environment.ProcessId}.bzImage");
        try
        {
            File.WriteAllBytes(path, image[..(image.Length / 2)]);
            var (status, stderr) = RunVmm("run", "--kernel", path, "--serial", "none");
            Assert.Equal(ExitStatus.BadImage, status);
            Assert.Matches(@"^vmm: error: cannot boot: .*: truncated: syssize at offset 0x1f4 says the protected-mode kernel is \d+ bytes, the file holds \d+ after the \d+-byte setup code\n$", stderr);
            // The whole image passes the same check.
            Vmm.Boot.LinuxLoader.ParseHeader(image, "vmlinuz");
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void A_malformed_kernel_is_reported_before_KVM_is_touched()
    {
        var path = Path.GetTempFileName();
        try
        {
            var image = ImageBuilder.Elf(false, 0x10_0000, [new ImageBuilder.Segment(0x10_0000, ImageBuilder.MultibootHeaderBytes())]);
            image[0x60 + 8] ^= 0xFF; // break the multiboot checksum
            File.WriteAllBytes(path, image);
            var (status, stderr) = RunVmm("run", "--kernel", path, "--serial", "none");
            Assert.Equal(ExitStatus.BadImage, status);
            Assert.StartsWith("vmm: error: cannot boot: multiboot header at offset 0x60: checksum", stderr);
            Assert.DoesNotContain("   at ", stderr); // no stack trace
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void A_missing_dev_kvm_gets_one_line_with_the_remedy_and_status_4()
    {
        var config = new MachineConfig { Kernel = DemoGuest.Build(), KvmPath = "/nonexistent/kvm" };
        var e = Assert.Throws<Vmm.Kvm.KvmUnavailableException>(() => new VirtualMachine(config, new Log(LogLevel.Error, TextWriter.Null)));
        Assert.Equal("/nonexistent/kvm does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) and enable virtualization in the firmware, or run on a host that offers KVM", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void A_file_posing_as_dev_kvm_is_named_as_not_a_KVM_device()
    {
        var path = Path.GetTempFileName();
        try
        {
            var e = Assert.Throws<Vmm.Kvm.KvmUnavailableException>(() => Vmm.Kvm.KvmSystem.Open(path));
            Assert.Equal($"{path} is not a KVM device (KVM_GET_API_VERSION: Inappropriate ioctl for device (ENOTTY))", e.Message);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void Vsock_parses_CH_syntax_into_the_vm_config()
    {
        var o = Options.Parse(["--kernel", "k", "--vsock", "cid=42,socket=/run/v.sock"]);
        Assert.Equal(new VsockConfig(42, "/run/v.sock"), o.Vsock);
        var config = CliVmConfig.From(o);
        Assert.Equal((42L, "/run/v.sock"), (config.Vsock!.Cid, config.Vsock.Socket));
        Assert.Contains("--vsock", Assert.Throws<UsageException>(() => Options.Parse(["run", "--config", "vm.json", "--vsock", "cid=3,socket=/s"])).Message);
    }

    [Fact]
    public void Several_vCPUs_without_the_irqchip_are_refused_before_anything_starts()
    {
        var config = new MachineConfig { Kernel = DemoGuest.Build(), Cpus = 2, InKernelIrqchip = false };
        Assert.Contains("--cpus above 1 needs the in-kernel irqchip", Assert.Throws<ConfigException>(config.Validate).Message);
        var big = new MachineConfig { Kernel = DemoGuest.Build(), MemoryBytes = 8UL << 40 };
        Assert.Contains("beyond the 4 TiB vmm supports", Assert.Throws<ConfigException>(big.Validate).Message);
    }

    [Fact]
    public void On_reboot_is_parsed_and_an_API_only_vmm_is_recognised()
    {
        var restart = Options.Parse(["--kernel", "k", "--on-reboot", "restart"]);
        Assert.Equal(RebootAction.Restart, restart.OnReboot);
        Assert.True(restart.OnRebootGiven);
        Assert.Equal(RebootAction.Exit, Options.Parse(["--kernel", "k"]).OnReboot);
        Assert.True(Options.Parse(["--api-socket", "/run/x.sock"]).ApiOnly);
        Assert.False(Options.Parse(["--api-socket", "/run/x.sock"]).Demo);
        Assert.False(Options.Parse(["run", "--kernel", "k", "--api-socket", "path=/run/x.sock"]).ApiOnly);
        Assert.True(Options.Parse(["--stats"]).Demo);
    }

    [Fact]
    public void Config_file_and_API_options_are_checked_with_a_message_naming_the_option()
    {
        Assert.Contains("--config describes the whole VM: --kernel, --disk",
            Assert.Throws<UsageException>(() => Options.Parse(["run", "--config", "vm.json", "--kernel", "k", "--disk", "path=d"])).Message);
        Assert.Contains("--event-monitor must be path=FILE or fd=N",
            Assert.Throws<UsageException>(() => Options.Parse(["--api-socket", "s", "--event-monitor", "events.json"])).Message);
        Assert.Contains("--api-socket needs path=PATH, fd=N or a path",
            Assert.Throws<UsageException>(() => Options.Parse(["--api-socket", "path="])).Message);
        Assert.Contains("without --kernel", Assert.Throws<UsageException>(() => Options.Parse(["--api-socket", "s", "--disk", "path=d"])).Message);
        Assert.Contains("--config belongs to 'run'", Assert.Throws<UsageException>(() => Options.Parse(["demo", "--config", "vm.json"])).Message);
    }

    [Fact]
    public void A_config_file_that_is_missing_or_invalid_is_a_usage_error_naming_the_file_and_the_field()
    {
        var (status, stderr) = RunVmm("run", "--config", "/nonexistent/vm.json");
        Assert.Equal(ExitStatus.Usage, status);
        Assert.Equal("vmm: error: --config /nonexistent/vm.json: no such file\n", stderr);
        string path = Path.GetTempFileName();
        try
        {
            File.WriteAllText(path, """{"payload":{"kernel":"k"},"cpus":{"boot_vcpus":"two","max_vcpus":2}}""");
            (status, stderr) = RunVmm("run", "--config", path);
            Assert.Equal(ExitStatus.Usage, status);
            Assert.Contains($"--config {path}: ", stderr);
            Assert.Contains("$.cpus.boot_vcpus", stderr);
            File.WriteAllText(path, """{"payload":{"kernel":"k"},"memory":{"size":1048576,"hugepages":true}}""");
            (status, stderr) = RunVmm("run", "--config", path);
            Assert.Equal(ExitStatus.Usage, status);
            Assert.Contains("memory.hugepages: true is not supported", stderr);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void Vmm_remote_without_a_socket_or_a_command_is_a_usage_error()
    {
        Assert.Equal(ExitStatus.Usage, RunVmm("remote", "ping").Status);
        Assert.Equal(ExitStatus.Usage, RunVmm("remote", "--api-socket", "/tmp/none.sock").Status);
        var (status, stderr) = RunVmm("remote", "--api-socket", "/tmp/none.sock", "frobnicate");
        Assert.Equal(ExitStatus.Usage, status);
        Assert.Contains("unknown command 'frobnicate'", stderr);
        (status, stderr) = RunVmm("remote", "--api-socket", "/nonexistent/dir/x.sock", "ping");
        Assert.Equal(ExitStatus.VmmError, status);
        Assert.Contains("no vmm API answers there", stderr);
    }

    [Fact]
    public void Device_options_name_the_backend_path_and_peer_to_peer()
    {
        var o = Options.Parse(["run", "--kernel", "k", "--device", "vfio=/sys/bus/pci/devices/0000:41:00.0",
            "--device", "vfio-user=/run/gpu.sock,p2p=on"]);
        Assert.Equal([new PassthroughConfig(PassthroughKind.Vfio, "/sys/bus/pci/devices/0000:41:00.0"),
            new PassthroughConfig(PassthroughKind.VfioUser, "/run/gpu.sock", PeerToPeer: true)], o.Devices);
    }

    [Fact]
    public void Fs_and_vhost_user_disks_parse_in_cloud_hypervisors_forms_into_the_vm_config()
    {
        var o = Options.Parse(["run", "--kernel", "k", "--fs", "tag=shared,socket=/run/fs.sock,num_queues=2,queue_size=512",
            "--disk", "vhost_user=on,socket=/run/blk.sock,num_queues=2", "--disk", "path=/img"]);
        Assert.Equal([new FsConfig("shared", "/run/fs.sock", 2, 512)], o.Fs);
        Assert.Equal(new DiskConfig("") { VhostSocket = "/run/blk.sock", NumQueues = 2, QueueSize = 128 }, o.Disks[0]);
        Assert.Null(o.Disks[1].VhostSocket);
        var c = CliVmConfig.From(o);
        Assert.Equal(("shared", "/run/fs.sock", 2, 512), (c.Fs![0].Tag, c.Fs[0].Socket, c.Fs[0].NumQueues, c.Fs[0].QueueSize));
        Assert.Equal((true, "/run/blk.sock", null, 2), (c.Disks![0].VhostUser, c.Disks[0].VhostSocket, c.Disks[0].Path, c.Disks[0].NumQueues));
        Vmm.Api.VmConfigMapper.Normalize(c); // what the CLI builds passes the API's checks
        Assert.Equal(["_disk0", "_disk1"], c.Disks.Select(d => d.Id));
        Assert.Equal("_fs2", c.Fs[0].Id);
    }

    [Fact]
    public void Vhost_user_sockets_are_checked_before_anything_starts()
    {
        string dir = Directory.CreateTempSubdirectory("vmm-vhost-cfg-").FullName;
        try
        {
            string socket = Path.Combine(dir, "fs.sock");
            var config = new MachineConfig { Kernel = new Vmm.Boot.BootFile("k", []), Fs = [new FsConfig("shared", socket)] };
            var e = Assert.Throws<ConfigException>(config.Validate);
            Assert.Equal($"--fs tag=shared,socket={socket}: no such socket (start virtiofsd --socket-path={socket} first)", e.Message);
            config = new MachineConfig { Kernel = new Vmm.Boot.BootFile("k", []), Disks = [new DiskConfig("") { VhostSocket = socket }] };
            e = Assert.Throws<ConfigException>(config.Validate);
            Assert.StartsWith($"--disk vhost_user=on,socket={socket}: no such socket", e.Message);
            using var listening = Vmm.Interop.UnixSocket.Listen(socket);
            config.Validate();
            config = new MachineConfig
            {
                Kernel = new Vmm.Boot.BootFile("k", []),
                Disks = [new DiskConfig("") { VhostSocket = socket }],
                Fs = [new FsConfig("shared", socket)],
            };
            e = Assert.Throws<ConfigException>(config.Validate);
            Assert.Equal($"vhost-user socket {socket} is given 2 times; each back-end serves one device", e.Message);
            config = new MachineConfig { Kernel = new Vmm.Boot.BootFile("k", []), Fs = [new FsConfig("a", socket), new FsConfig("a", socket + "2")] };
            e = Assert.Throws<ConfigException>(config.Validate);
            Assert.Equal("--fs tag=a is given 2 times; the guest mounts a file system by its tag", e.Message);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void The_same_device_twice_is_a_configuration_error()
    {
        var config = new MachineConfig
        {
            Kernel = new Vmm.Boot.BootFile("k", []),
            Devices = [new(PassthroughKind.Vfio, "/sys/bus/pci/devices/0000:41:00.0"), new(PassthroughKind.Vfio, "/sys/bus/pci/devices/0000:41:00.0/")],
        };
        var e = Assert.Throws<ConfigException>(config.Validate);
        Assert.Contains("--device vfio=/sys/bus/pci/devices/0000:41:00.0 is given 2 times", e.Message);
    }
}
