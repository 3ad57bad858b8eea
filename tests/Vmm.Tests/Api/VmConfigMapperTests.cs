using System.Text;
using Vmm.Api;
using Vmm.Boot;
using Vmm.Machine;

namespace Vmm.Tests.Api;

public sealed class VmConfigMapperTests : IDisposable
{
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("vmm-mapper-");

    public void Dispose() => _dir.Delete(recursive: true);

    private static string Q(string s) => System.Text.Json.JsonSerializer.Serialize(s);

    private static VmConfig Parse(string json) => ApiHandler.ParseVmConfig(Encoding.UTF8.GetBytes(json));

    private static VmConfig Normalized(string json)
    {
        var c = Parse(json);
        VmConfigMapper.Normalize(c);
        return c;
    }

    private static IReadOnlyList<string> Problems(string json) =>
        Assert.Throws<VmConfigException>(() => VmConfigMapper.Normalize(Parse(json))).Problems;

    [Fact]
    public void Ids_are_assigned_CH_style_with_one_counter_over_all_devices()
    {
        var c = Normalized("""
            {"payload":{"kernel":"/k"},
             "disks":[{"path":"/a"},{"path":"/b","id":"data"},{"path":"/c"}],
             "net":[{"tap":"tap0"},{"tap":"tap1","id":"uplink"}],
             "devices":[{"path":"/sys/bus/pci/devices/0000:41:00.0"}],
             "user_devices":[{"socket":"/run/gpu.sock"}],
             "rng":{"src":"/dev/urandom"}}
            """);
        Assert.Equal(["_disk0", "data", "_disk1"], c.Disks!.Select(d => d.Id));
        Assert.Equal(["_net2", "uplink"], c.Net!.Select(n => n.Id));
        Assert.Equal("_vfio3", c.Devices![0].Id);
        Assert.Equal("_vfio_user4", c.UserDevices![0].Id);
        Assert.Equal(MachineConfig.RngId, c.Rng!.Id);
        Assert.Equal(MachineConfig.ConsoleId, c.Console!.Id);
    }

    [Fact]
    public void A_generated_id_goes_around_the_ids_the_config_gives_as_CH_does()
    {
        var c = Normalized("""
            {"payload":{"kernel":"/k"},
             "disks":[{"path":"/a"},{"path":"/b","id":"_disk0"},{"path":"/c","id":"_disk2"}],
             "net":[{"tap":"tap0"}]}
            """);
        Assert.Equal(["_disk1", "_disk0", "_disk2"], c.Disks!.Select(d => d.Id));
        Assert.Equal("_net2", c.Net![0].Id); // one counter: _disk0 was skipped, _disk1 taken
    }

    [Fact]
    public void Normalize_fills_in_the_defaults_vmm_runs_with()
    {
        var c = Normalized("""{"payload":{"kernel":"/k"},"disks":[{"path":"/a"}]}""");
        Assert.Equal((1, 1), (c.Cpus!.BootVcpus, c.Cpus.MaxVcpus));
        Assert.Equal((long)MachineConfig.DefaultMemory, c.Memory!.Size);
        Assert.True(c.Memory.Shared); // guest RAM is a shared memfd
        Assert.Equal((false, false), (c.Disks![0].Readonly, c.Disks[0].Direct));
        Assert.Equal(("Null", "Tty"), (c.Serial!.Mode, c.Console!.Mode));
        Assert.Null(c.Rng);
        // Idempotent: a normalized config (what vm.info shows) normalizes to itself.
        var again = Parse(System.Text.Json.JsonSerializer.Serialize(c, ApiJsonContext.Default.VmConfig));
        VmConfigMapper.Normalize(again);
        Assert.Equal(System.Text.Json.JsonSerializer.Serialize(c, ApiJsonContext.Default.VmConfig),
            System.Text.Json.JsonSerializer.Serialize(again, ApiJsonContext.Default.VmConfig));
    }

    [Theory]
    [InlineData("""{"disks":[{"path":"/a","id":"d"},{"path":"/b","id":"d"}]}""", "disks[1].id: \"d\" is used by another device")]
    [InlineData("""{"disks":[{"path":"/a","id":"x"}],"net":[{"tap":"tap0","id":"x"}]}""", "net[0].id: \"x\" is used by another device")]
    [InlineData("""{"disks":[{"path":"/a","id":"g"}],"devices":[{"path":"/sys/bus/pci/devices/0000:41:00.0","id":"g"}]}""", "devices[0].id: \"g\" is used by another device")]
    [InlineData("""{"user_devices":[{"socket":"/a","id":"g"},{"socket":"/b","id":"g"}]}""", "user_devices[1].id: \"g\" is used by another device")]
    public void A_duplicate_device_id_is_refused_naming_the_second(string devices, string problem)
    {
        string json = "{\"payload\":{\"kernel\":\"/k\"}," + devices[1..];
        Assert.Contains(problem, Problems(json));
    }

    [Theory]
    [InlineData(null, null, "Null", "Tty")]
    [InlineData("""{"mode":"Tty"}""", """{"mode":"Tty"}""", "Tty", "Tty")]
    [InlineData("""{"mode":"Tty"}""", """{"mode":"Off"}""", "Tty", "Off")]
    [InlineData("""{"mode":"Off"}""", """{"mode":"Tty"}""", "Off", "Tty")]
    [InlineData("""{"mode":"Null"}""", """{"mode":"File","file":"/tmp/c"}""", "Null", "File")]
    [InlineData("""{"mode":"File","file":"/tmp/c"}""", """{"mode":"File","file":"/tmp/c"}""", "File", "File")]
    [InlineData("""{"mode":"File","file":"/tmp/c"}""", """{"mode":"Null"}""", "File", "Null")]
    [InlineData("""{"mode":"Off"}""", """{"mode":"Off"}""", "Off", "Off")]
    public void Console_and_serial_modes_vmm_can_serve_are_accepted(string? serial, string? console, string serialMode, string consoleMode)
    {
        var c = Normalized($$"""{"payload":{"kernel":"/k"}{{(serial is null ? "" : ",\"serial\":" + serial)}}{{(console is null ? "" : ",\"console\":" + console)}}}""");
        Assert.Equal((serialMode, consoleMode), (c.Serial!.Mode, c.Console!.Mode));
        Assert.Equal(consoleMode == "Off" ? null : MachineConfig.ConsoleId, c.Console.Id);
    }

    [Theory]
    [InlineData("""{"mode":"Tty"}""", """{"mode":"File","file":"/tmp/c"}""", "console.mode: File with serial.mode Tty")]
    [InlineData("""{"mode":"File","file":"/tmp/a"}""", """{"mode":"File","file":"/tmp/b"}""", "console.file: vmm sends the UART and the virtio console to one file")]
    [InlineData("""{"mode":"File"}""", """{"mode":"Off"}""", "serial.file: required with mode File")]
    [InlineData("""{"mode":"Tty","file":"/tmp/a"}""", """{"mode":"Off"}""", "serial.file: not supported")]
    [InlineData("""{"mode":"Pty"}""", """{"mode":"Off"}""", "serial.mode: Pty is not supported")]
    [InlineData("""{"mode":"Off"}""", """{"mode":"Socket","socket":"/tmp/s"}""", "console.mode: Socket is not supported")]
    [InlineData("""{"mode":"Off"}""", """{"mode":"Serial"}""", "console.mode: \"Serial\" is not one of Off, Pty, Tty, File, Socket, Null")]
    [InlineData("""{"mode":"Off"}""", """{"mode":"Tty","iommu":true}""", "console.iommu: true is not supported")]
    public void Console_and_serial_combinations_vmm_cannot_serve_are_refused(string serial, string console, string problem)
    {
        var problems = Problems($$"""{"payload":{"kernel":"/k"},"serial":{{serial}},"console":{{console}}}""");
        Assert.Contains(problems, p => p.StartsWith(problem, StringComparison.Ordinal));
    }

    [Fact]
    public void Every_problem_is_listed_at_once()
    {
        var problems = Problems("""{"payload":{"firmware":"/fw"},"cpus":{"boot_vcpus":0,"max_vcpus":2},"memory":{"size":0},"disks":[{}],"net":[{"tap":"a/b","mac":"01:00:00:00:00:01"}],"rng":{"src":"/dev/hwrng"}}""");
        foreach (string field in new[] { "payload.firmware", "payload.kernel", "cpus.boot_vcpus", "cpus.max_vcpus", "memory.size", "disks[0].path", "net[0].tap", "net[0].mac", "rng.src" })
            Assert.Contains(problems, p => p.StartsWith(field + ":", StringComparison.Ordinal));
    }

    [Fact]
    public void ToMachine_maps_payload_disks_nets_devices_and_singletons()
    {
        string kernel = Path.Combine(_dir.FullName, "vmlinux"), initrd = Path.Combine(_dir.FullName, "initrd");
        File.WriteAllBytes(kernel, [1, 2, 3]);
        File.WriteAllBytes(initrd, [4, 5]);
        var c = Normalized($$$"""
            {"payload":{"kernel":{{{Q(kernel)}}},"initramfs":{{{Q(initrd)}}},"cmdline":"console=hvc0"},
             "cpus":{"boot_vcpus":3,"max_vcpus":3},"memory":{"size":536870912},
             "disks":[{"path":"/img/root","readonly":true,"serial":"ROOT"},{"path":"/img/data","direct":true,"id":"data"}],
             "net":[{"tap":"tap0","mac":"52:54:00:12:34:56"},{"tap":"tap1"}],
             "devices":[{"path":"/sys/bus/pci/devices/0000:41:00.0"}],
             "user_devices":[{"socket":"/run/gpu.sock","id":"gpu"}],
             "rng":{"src":"/dev/random"},"serial":{"mode":"Off"},"console":{"mode":"Null"}}
            """);
        var output = new MemoryStream();
        var m = VmConfigMapper.ToMachine(c, new ConsoleStreams(output, null, InteractiveTerminal: true));
        Assert.Equal(kernel, m.Kernel.Name);
        Assert.Equal([1, 2, 3], m.Kernel.Contents);
        Assert.Equal(initrd, m.Module!.Name);
        Assert.Equal([4, 5], m.Module.Contents);
        Assert.Equal(("console=hvc0", 3, 512UL << 20), (m.Arguments, m.Cpus, m.MemoryBytes));
        Assert.Same(output, m.SerialOutput);
        Assert.Null(m.SerialInput);
        Assert.True(m.ConsoleEscape);
        Assert.Equal([new Vmm.Machine.DiskConfig("/img/root", true, false, "ROOT", "_disk0"), new Vmm.Machine.DiskConfig("/img/data", false, true, null, "data")], m.Disks);
        Assert.Equal(("tap0", "_net1"), (m.Nets[0].Tap, m.Nets[0].Id));
        Assert.Equal(new byte[] { 0x52, 0x54, 0, 0x12, 0x34, 0x56 }, m.Nets[0].Mac);
        Assert.Equal(("tap1", null, "_net2"), (m.Nets[1].Tap, m.Nets[1].Mac, m.Nets[1].Id));
        Assert.Equal([new PassthroughConfig(PassthroughKind.Vfio, "/sys/bus/pci/devices/0000:41:00.0", true, "_vfio3"),
            new PassthroughConfig(PassthroughKind.VfioUser, "/run/gpu.sock", true, "gpu")], m.Devices);
        Assert.True(m.VirtioConsole); // Null is a console port whose output is discarded; only Off removes it
        Assert.True(m.VirtioRng);
        // Every check passes but the last one, made on the host: there is no vfio-user server at /run/gpu.sock here.
        Assert.Equal("--device vfio-user=/run/gpu.sock: no such socket (start the vfio-user server first)",
            Assert.Throws<ConfigException>(m.Validate).Message);
    }

    [Fact]
    public void Fs_and_vhost_user_disks_are_mapped_with_defaults_and_ids()
    {
        string kernel = Path.Combine(_dir.FullName, "vmlinux");
        File.WriteAllBytes(kernel, [1]);
        var c = Normalized($$$"""
            {"payload":{"kernel":{{{Q(kernel)}}}},
             "disks":[{"vhost_user":true,"vhost_socket":"/run/blk.sock","num_queues":2,"queue_size":256},{"path":"/img"}],
             "fs":[{"tag":"kataShared","socket":"/run/fs.sock","num_queues":1,"queue_size":1024},{"tag":"two","socket":"/run/fs2.sock","id":"share2"}]}
            """);
        Assert.Equal(["_disk0", "_disk1"], c.Disks!.Select(d => d.Id));
        Assert.Equal(["_fs2", "share2"], c.Fs!.Select(f => f.Id));
        Assert.Equal((1, 1024), (c.Fs![1].NumQueues, c.Fs[1].QueueSize)); // CH's defaults filled in
        // What vm.info will show is still CH's schema (fs entries need num_queues and queue_size there).
        ChSchema.AssertValid(System.Text.Json.JsonSerializer.Serialize(c, ApiJsonContext.Default.VmConfig), "VmConfig");
        var m = VmConfigMapper.ToMachine(c, new ConsoleStreams(null, null));
        Assert.Equal(new Vmm.Machine.DiskConfig("", false, false, null, "_disk0") { VhostSocket = "/run/blk.sock", NumQueues = 2, QueueSize = 256 }, m.Disks[0]);
        Assert.Equal(new Vmm.Machine.DiskConfig("/img", Id: "_disk1"), m.Disks[1]);
        Assert.Equal([new Vmm.Machine.FsConfig("kataShared", "/run/fs.sock", 1, 1024, "_fs2"), new Vmm.Machine.FsConfig("two", "/run/fs2.sock", 1, 1024, "share2")], m.Fs);
        Assert.True(m.HasPciDevices);
    }

    [Fact]
    public void Fs_and_vhost_user_disk_fields_vmm_cannot_serve_are_refused_naming_the_field()
    {
        var problems = Problems("""
            {"payload":{"kernel":"/k"},
             "disks":[{"vhost_user":true,"path":"/img","readonly":true},{"path":"/img2","vhost_socket":"/s"},{"vhost_user":true,"vhost_socket":"/s","queue_size":100,"num_queues":0}],
             "fs":[{"tag":"0123456789012345678901234567890123456","socket":""},{"tag":"ok","socket":"/f","queue_size":3000,"num_queues":64}]}
            """);
        Assert.Equal([
            "disks[0].vhost_socket: required with vhost_user: true (the back-end's socket)",
            "disks[0].path: not supported: a vhost-user disk's image belongs to its back-end",
            "disks[0].readonly: true is not supported: the vhost-user back-end decides (e.g. qemu-storage-daemon's writable=off)",
            "disks[1].vhost_socket: not supported: only with vhost_user: true",
            "disks[2].num_queues: 0 is not supported (1 to 64)",
            "disks[2].queue_size: 100 is not supported (a power of two up to 32768)",
            "fs[0].tag: \"0123456789012345678901234567890123456\" must be 1 to 36 bytes (the virtio-fs tag field)",
            "fs[0].socket: required (virtiofsd's --socket-path)",
            "fs[1].num_queues: 64 is not supported (1 to 63 request queues)",
            "fs[1].queue_size: 3000 is not supported (a power of two up to 32768)"], problems);
    }

    [Fact]
    public void Vsock_takes_CH_shape_gets_a_CH_style_id_and_reaches_the_machine()
    {
        string kernel = Path.Combine(_dir.FullName, "vmlinux");
        File.WriteAllBytes(kernel, [1]);
        var c = Normalized($$$"""
            {"payload":{"kernel":{{{Q(kernel)}}} },"disks":[{"path":"/a"}],"vsock":{"cid":42,"socket":"/run/v.sock"}}
            """);
        Assert.Equal("_vsock1", c.Vsock!.Id);
        var m = VmConfigMapper.ToMachine(c, new ConsoleStreams(null, null));
        Assert.Equal(new Vmm.Machine.VsockConfig(42, "/run/v.sock", "_vsock1"), m.Vsock);
        Assert.True(m.HasPciDevices);
        m.Validate();
        var named = Normalized("""{"payload":{"kernel":"/k"},"vsock":{"cid":3,"socket":"/s","id":"vs"}}""");
        Assert.Equal("vs", named.Vsock!.Id);
    }

    [Theory]
    [InlineData("""{"cid":2,"socket":"/s"}""", "vsock.cid: 2 is not a guest cid")]
    [InlineData("""{"cid":4294967295,"socket":"/s"}""", "vsock.cid: 4294967295 is not a guest cid")]
    [InlineData("""{"cid":3,"socket":""}""", "vsock.socket: required")]
    [InlineData("""{"cid":3,"socket":"/s","iommu":true}""", "vsock.iommu: true is not supported")]
    [InlineData("""{"cid":3,"socket":"/s","pci_segment":1}""", "vsock.pci_segment: 1 is not supported")]
    [InlineData("""{"cid":3,"socket":"/s","id":"_disk0"}""", "vsock.id: \"_disk0\" is used by another device")]
    public void A_vsock_vmm_cannot_serve_is_refused_naming_the_field(string vsock, string problem)
    {
        var problems = Problems($$"""{"payload":{"kernel":"/k"},"disks":[{"path":"/a","id":"_disk0"}],"vsock":{{vsock}}}""");
        Assert.Contains(problems, p => p.StartsWith(problem, StringComparison.Ordinal));
    }

    [Fact]
    public void A_vsock_socket_path_too_long_or_a_reserved_cid_is_one_config_error()
    {
        var tooLong = new MachineConfig { Kernel = new BootFile("k", [1]), Vsock = new Vmm.Machine.VsockConfig(3, "/" + new string('x', 120)) };
        string message = Assert.Throws<ConfigException>(tooLong.Validate).Message;
        Assert.StartsWith("--vsock socket=/xxx", message);
        Assert.Contains($"must be 1 to {Vmm.Machine.VsockConfig.MaxSocketPath} bytes long", message);
        var reserved = new MachineConfig { Kernel = new BootFile("k", [1]), Vsock = new Vmm.Machine.VsockConfig(1, "/s") };
        Assert.Equal("--vsock cid=1: the guest cid must be 3 to 4294967294 (0-2 are reserved: hypervisor, local, host)",
            Assert.Throws<ConfigException>(reserved.Validate).Message);
    }

    [Fact]
    public void ToMachine_follows_platform_vfio_p2p_dma_and_console_Off()
    {
        string kernel = Path.Combine(_dir.FullName, "vmlinux");
        File.WriteAllBytes(kernel, [1]);
        var c = Normalized($$$"""
            {"payload":{"kernel":{{{Q(kernel)}}} },"platform":{"vfio_p2p_dma":false},
             "user_devices":[{"socket":"/run/gpu.sock"}],"console":{"mode":"Off"}}
            """);
        var m = VmConfigMapper.ToMachine(c, new ConsoleStreams(null, null));
        Assert.False(Assert.Single(m.Devices).PeerToPeer);
        Assert.False(m.VirtioConsole);
        Assert.False(m.VirtioRng);
        Assert.Null(m.Module);
        Assert.Equal("", m.Arguments);
        Assert.Empty(m.Disks);
        Assert.Empty(m.Nets);
    }

    [Fact]
    public void ToMachine_names_a_missing_payload_file_and_a_built_in_kernel_replaces_payload_kernel()
    {
        string missing = Path.Combine(_dir.FullName, "none");
        var c = Normalized($$$"""{"payload":{"kernel":{{{Q(missing)}}} }}""");
        var e = Assert.Throws<ConfigException>(() => VmConfigMapper.ToMachine(c, new ConsoleStreams(null, null)));
        Assert.Equal($"payload.kernel {missing}: no such file", e.Message);

        var builtIn = new BootFile("vmm-demo", [9]);
        Assert.Same(builtIn, VmConfigMapper.ToMachine(c, new ConsoleStreams(null, null), builtIn).Kernel);

        c.Payload!.Initramfs = Path.Combine(_dir.FullName, "no-dir", "initrd");
        e = Assert.Throws<ConfigException>(() => VmConfigMapper.ToMachine(c, new ConsoleStreams(null, null), builtIn));
        Assert.StartsWith("payload.initramfs ", e.Message);
        Assert.EndsWith(": no such file", e.Message);
    }

    [Theory]
    [InlineData("52:54:00:12:34:56", true)]
    [InlineData("02:42:AC:11:00:02", true)]
    [InlineData("01:00:5e:00:00:01", false)] // multicast
    [InlineData("52:54:00:12:34", false)]
    [InlineData("52:54:00:12:34:5g", false)]
    [InlineData("525400123456", false)]
    public void MAC_addresses_must_be_six_hex_bytes_and_unicast(string mac, bool valid) =>
        Assert.Equal(valid, VmConfigMapper.ParseMac(mac) is not null);
}
