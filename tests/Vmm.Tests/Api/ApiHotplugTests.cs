using System.Text;
using System.Text.Json;
using Vmm.Api;
using Vmm.Api.Http;
using Vmm.Boot;
using Vmm.Cli;
using Vmm.Machine;
using Vmm.Memory;
using Vmm.Tests.TestKit;
using static Vmm.Tests.TestKit.ApiTestHost;

namespace Vmm.Tests.Api;

/// <summary>The hotplug endpoints (vm.add-disk, vm.add-net, vm.add-device, vm.add-user-device, vm.remove-device) where no
/// VM runs: bodies checked as vm.create checks them, ids, the config, and the state rules; `vmm remote`'s ch-remote
/// syntax; the 64-bit window reservation. The running case (hotplug into a Linux guest) is KvmHotplugTests.</summary>
public sealed class ApiHotplugTests : IDisposable
{
    private readonly ApiTestHost _host = new("vmm-hotplug-");

    public void Dispose() => _host.Dispose();

    private void Create(string devices = "")
    {
        var r = _host.Client.Put("vm.create", ApiTestHost.Config(_host.KernelFile(), devices));
        Assert.True(r.Status == 204, r.Body);
    }

    private JsonElement Config() => JsonDocument.Parse(_host.Client.Get("vm.info").Body).RootElement.GetProperty("config");

    [Theory]
    [InlineData("vm.add-disk", """{"path":"/img"}""")]
    [InlineData("vm.add-net", """{"tap":"tap0"}""")]
    [InlineData("vm.add-device", """{"path":"/sys/bus/pci/devices/0000:01:00.0"}""")]
    [InlineData("vm.add-user-device", """{"socket":"/run/gpu.sock"}""")]
    [InlineData("vm.remove-device", """{"id":"_disk0"}""")]
    public void Before_vm_create_every_hotplug_endpoint_is_404(string endpoint, string body) =>
        AssertError(_host.Client.Put(endpoint, body), 404, "VM is not created");

    [Fact]
    public void On_a_VM_not_booted_a_device_joins_the_config_with_a_CH_style_id_and_answers_204()
    {
        Create(""","disks":[{"path":"/img/root"}]""");
        var r = _host.Client.Put("vm.add-disk", """{"path":"/img/data","readonly":true}""");
        Assert.True(r.Status == 204, r.Body); // CH's "cold added"
        Assert.Equal(204, _host.Client.Put("vm.add-net", """{"tap":"tap3","mac":"52:54:00:00:00:03"}""").Status);
        Assert.Equal(204, _host.Client.Put("vm.add-user-device", """{"socket":"/run/gpu.sock","id":"gpu"}""").Status);
        Assert.Equal(204, _host.Client.Put("vm.add-device", """{"path":"/sys/bus/pci/devices/0000:41:00.0"}""").Status);
        var config = Config();
        Assert.Equal(["_disk0", "_disk1"], config.GetProperty("disks").EnumerateArray().Select(d => d.GetProperty("id").GetString()));
        Assert.True(config.GetProperty("disks")[1].GetProperty("readonly").GetBoolean());
        Assert.Equal("_net0", config.GetProperty("net")[0].GetProperty("id").GetString());
        Assert.Equal("gpu", config.GetProperty("user_devices")[0].GetProperty("id").GetString());
        Assert.Equal("_vfio0", config.GetProperty("devices")[0].GetProperty("id").GetString());
        ChSchema.AssertValid(_host.Client.Get("vm.info").Body, "VmInfo");
    }

    [Fact]
    public void An_id_in_use_is_409_and_a_body_vmm_cannot_serve_is_400_naming_the_field()
    {
        Create(""","disks":[{"path":"/img/root","id":"root"}]""");
        AssertError(_host.Client.Put("vm.add-disk", """{"path":"/img/data","id":"root"}"""), 409, "Identifier root is not unique");
        AssertError(_host.Client.Put("vm.add-net", """{"tap":"tap0","id":"root"}"""), 409, "Identifier root is not unique");
        AssertError(_host.Client.Put("vm.add-disk", """{"path":"/img/data","vhost_user":true}"""), 400, "disk.vhost_socket: required with vhost_user: true");
        AssertError(_host.Client.Put("vm.add-disk", """{}"""), 400, "disk.path: required");
        AssertError(_host.Client.Put("vm.add-net", """{"tap":"a/b"}"""), 400, "net.tap");
        AssertError(_host.Client.Put("vm.add-disk", """{"path":"/img/data","colour":"red"}"""), 400, "Failed to deserialize JSON");
        AssertError(_host.Client.Put("vm.add-user-device", """{"id":"x"}"""), 400, "Failed to deserialize JSON"); // socket is required
        AssertError(_host.Client.Put("vm.remove-device", """{}"""), 400, "Failed to deserialize JSON");
        Assert.Single(Config().GetProperty("disks").EnumerateArray()); // nothing refused was added
    }

    [Fact]
    public void Remove_device_on_a_VM_not_booted_takes_it_out_of_the_config_and_an_unknown_id_is_404()
    {
        Create(""","disks":[{"path":"/img/root","id":"root"}],"user_devices":[{"socket":"/run/gpu.sock","id":"gpu"}]""");
        Assert.Equal(204, _host.Client.Put("vm.remove-device", """{"id":"gpu"}""").Status);
        Assert.False(Config().TryGetProperty("user_devices", out var u) && u.GetArrayLength() > 0);
        AssertError(_host.Client.Put("vm.remove-device", """{"id":"gpu"}"""), 404, "no device with id \"gpu\"");
        Assert.Equal("root", Config().GetProperty("disks")[0].GetProperty("id").GetString());
    }

    [Fact]
    public void The_lifecycle_allows_hotplug_only_while_Running()
    {
        var lifecycle = new VmLifecycle(() => throw new InvalidOperationException("not booted in this test"), new Log(LogLevel.Error, TextWriter.Null));
        var add = Assert.Throws<VmStateException>(() => lifecycle.AddDevice(new Vmm.Machine.DiskConfig("/img", Id: "d"), "vm.add-disk"));
        Assert.Equal("the VM is Created: vm.add-disk needs it Running", add.Message);
        var remove = Assert.Throws<VmStateException>(() => lifecycle.RemoveDevice("d", TimeSpan.FromSeconds(1)));
        Assert.Equal("the VM is Created: vm.remove-device needs it Running", remove.Message);
        lifecycle.Dispose();
        Assert.Equal("the VM was deleted", Assert.Throws<VmStateException>(() => lifecycle.AddDevice(new Vmm.Machine.DiskConfig("/img", Id: "d"))).Message);
    }

    [Fact]
    public void The_hotplug_endpoints_are_implemented()
    {
        foreach (string e in new[] { "vm.add-disk", "vm.add-net", "vm.add-device", "vm.add-user-device", "vm.add-fs", "vm.add-vsock", "vm.remove-device" })
        {
            Assert.Contains(e, ApiHandler.Implemented);
            Assert.DoesNotContain(e, ApiHandler.NotImplemented);
        }
    }

    [Fact]
    public void Fs_and_vsock_cold_add_with_CH_ids_one_vsock_only_and_leave_by_id()
    {
        Create(""","disks":[{"path":"/img/root"}]""");
        Assert.Equal(204, _host.Client.Put("vm.add-fs", """{"tag":"kataShared","socket":"/run/virtiofsd.sock"}""").Status);
        Assert.Equal(204, _host.Client.Put("vm.add-vsock", """{"cid":3,"socket":"/run/kata.sock"}""").Status);
        var config = Config();
        var fs = config.GetProperty("fs")[0];
        Assert.Equal(("_fs0", 1, 1024), (fs.GetProperty("id").GetString(), fs.GetProperty("num_queues").GetInt32(), fs.GetProperty("queue_size").GetInt32()));
        Assert.Equal(("_vsock0", 3L), (config.GetProperty("vsock").GetProperty("id").GetString(), config.GetProperty("vsock").GetProperty("cid").GetInt64()));
        ChSchema.AssertValid(_host.Client.Get("vm.info").Body, "VmInfo");
        AssertError(_host.Client.Put("vm.add-vsock", """{"cid":4,"socket":"/run/other.sock"}"""), 400, "vsock: the VM has a vsock device already (\"_vsock0\")");
        AssertError(_host.Client.Put("vm.add-vsock", """{"cid":2,"socket":"/run/v.sock"}"""), 400, "vsock.cid: 2 is not a guest cid");
        AssertError(_host.Client.Put("vm.add-fs", """{"tag":"","socket":"/s"}"""), 400, "fs.tag");
        AssertError(_host.Client.Put("vm.add-fs", """{"tag":"t","socket":"/s","id":"_vsock0"}"""), 409, "Identifier _vsock0 is not unique");
        Assert.Equal(204, _host.Client.Put("vm.remove-device", """{"id":"_vsock0"}""").Status);
        Assert.Equal(204, _host.Client.Put("vm.remove-device", """{"id":"_fs0"}""").Status);
        config = Config();
        Assert.False(config.TryGetProperty("vsock", out var v) && v.ValueKind != JsonValueKind.Null);
        Assert.Equal(0, config.TryGetProperty("fs", out var f) && f.ValueKind == JsonValueKind.Array ? f.GetArrayLength() : 0);
    }

    [Theory]
    [InlineData("add-disk", "path=/img/a.img,readonly=on,serial=S1,id=d", """{"path":"/img/a.img","readonly":true,"serial":"S1","id":"d"}""")]
    // The on/off words of the run options (--disk readonly=yes) work here too.
    [InlineData("add-disk", "path=/img/b.img,readonly=yes,direct=no", """{"path":"/img/b.img","readonly":true,"direct":false}""")]
    [InlineData("add-net", "tap=tap0,mac=52:54:00:12:34:57", """{"tap":"tap0","mac":"52:54:00:12:34:57"}""")]
    [InlineData("add-device", "path=/sys/bus/pci/devices/0000:01:00.0", """{"path":"/sys/bus/pci/devices/0000:01:00.0"}""")]
    [InlineData("add-user-device", "socket=gpu.sock,id=gpu", """{"socket":"gpu.sock","id":"gpu"}""")]
    [InlineData("add-fs", "tag=share,socket=/run/fs.sock,num_queues=1,queue_size=512", """{"tag":"share","socket":"/run/fs.sock","num_queues":1,"queue_size":512}""")]
    [InlineData("add-vsock", "cid=3,socket=/run/v.sock,id=vs", """{"cid":3,"socket":"/run/v.sock","id":"vs"}""")]
    public void Vmm_remote_turns_ch_remote_arguments_into_the_endpoints_body(string command, string argument, string json)
    {
        byte[] body = RemoteCommand.AddBody(command, argument, RemoteCommand.AddCommands[command].Keys);
        Assert.Equal(json, Encoding.UTF8.GetString(body));
        string schema = command switch
        {
            "add-disk" => "DiskConfig", "add-net" => "NetConfig", "add-device" => "DeviceConfig", "add-fs" => "FsConfig",
            "add-vsock" => "VsockConfig", _ => "UserDeviceConfig",
        };
        ChSchema.AssertValid(json, schema);
    }

    [Theory]
    [InlineData("add-disk", "path=/a,colour=red", "unknown key 'colour'")]
    [InlineData("add-disk", "path=/a,readonly=maybe", "readonly must be on or off")]
    [InlineData("add-net", "tap=a,tap=b", "'tap' given twice")]
    [InlineData("add-device", "/sys/bus/pci/devices/x", "is not key=value")]
    [InlineData("add-vsock", "cid=three,socket=/s", "cid must be a number, not 'three'")]
    public void Vmm_remote_refuses_bad_arguments(string command, string argument, string message) =>
        Assert.Contains(message, Assert.Throws<UsageException>(() => RemoteCommand.AddBody(command, argument, RemoteCommand.AddCommands[command].Keys)).Message);

    [Fact]
    public void Pci_segments_mmio64_aperture_weight_reserves_a_64_bit_window_of_that_many_times_64_GiB()
    {
        string kernel = Path.Combine(_host.Dir.FullName, "k");
        File.WriteAllBytes(kernel, [1]);
        var c = ApiHandler.ParseVmConfig(Encoding.UTF8.GetBytes($$"""{"payload":{"kernel":{{JsonSerializer.Serialize(kernel)}}},"pci_segments":[{"pci_segment":0,"mmio64_aperture_weight":4}]}"""));
        VmConfigMapper.Normalize(c);
        Assert.Equal(256 * MemoryLayout.GiB, VmConfigMapper.ToMachine(c, new ConsoleStreams(null, null)).Pci64MinimumSize);
        Assert.Equal((4 * MemoryLayout.GiB, 256 * MemoryLayout.GiB), MemoryLayout.Pci64Window(128 * MemoryLayout.MiB, [8 * MemoryLayout.GiB], 256 * MemoryLayout.GiB));
        // Grown past the minimum when the cold-plugged BARs need more.
        Assert.Equal((4 * MemoryLayout.GiB, 380 * MemoryLayout.GiB), MemoryLayout.Pci64Window(128 * MemoryLayout.MiB, [128 * MemoryLayout.GiB, 128 * MemoryLayout.GiB], 64 * MemoryLayout.GiB)); // to 384 GiB: the BARs at 128 and 256 GiB

        var bad = ApiHandler.ParseVmConfig(Encoding.UTF8.GetBytes($$"""{"payload":{"kernel":"k"},"pci_segments":[{"pci_segment":1,"mmio64_aperture_weight":0,"mmio32_aperture_weight":2}]}"""));
        var problems = Assert.Throws<VmConfigException>(() => VmConfigMapper.Normalize(bad)).Problems;
        Assert.Contains(problems, p => p.StartsWith("pci_segments[0].pci_segment: 1 is not supported", StringComparison.Ordinal));
        Assert.Contains(problems, p => p.StartsWith("pci_segments[0].mmio64_aperture_weight: 0 must be", StringComparison.Ordinal));
        Assert.Contains(problems, p => p.StartsWith("pci_segments[0].mmio32_aperture_weight: 2 is not supported", StringComparison.Ordinal));
        // PciSegmentConfig is typed: its required pci_segment and its known keys are checked as the body is read.
        foreach (string segment in new[] { """{"mmio64_aperture_weight":2}""", """{"pci_segment":0,"colour":"red"}""", """{"pci_segment":"0"}""" })
        {
            var e = Assert.Throws<VmConfigException>(() => ApiHandler.ParseVmConfig(Encoding.UTF8.GetBytes($$"""{"payload":{"kernel":"k"},"pci_segments":[{{segment}}]}""")));
            Assert.Contains(e.Problems, p => p.Contains("pci_segment", StringComparison.Ordinal) || p.Contains("colour", StringComparison.Ordinal));
        }
    }

    [Fact]
    public void The_pci_segment_option_sets_the_weight_in_the_VmConfig()
    {
        var o = Options.Parse(["run", "--kernel", "k", "--pci-segment", "pci_segment=0,mmio64_aperture_weight=4"]);
        var c = CliVmConfig.From(o);
        Assert.Equal(4, VmConfigMapper.Mmio64Weight(c));
        ChSchema.AssertValid(JsonSerializer.Serialize(c, ApiJsonContext.Default.VmConfig), "VmConfig");
        Assert.Contains("mmio64_aperture_weight=N", Assert.Throws<UsageException>(() => Options.Parse(["run", "--kernel", "k", "--pci-segment", "pci_segment=0"])).Message);
        Assert.Contains("pci_segment=0", Assert.Throws<UsageException>(() => Options.Parse(["run", "--kernel", "k", "--pci-segment", "pci_segment=1,mmio64_aperture_weight=2"])).Message);
    }
}
