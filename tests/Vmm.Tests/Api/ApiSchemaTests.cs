using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Vmm.Api;
using Vmm.Api.Http;
using Vmm.Cli;
using Vmm.Machine;

namespace Vmm.Tests.Api;

/// <summary>What vmm sends and accepts, checked against Cloud Hypervisor's own OpenAPI schemas (Fixtures/).</summary>
public sealed class ApiSchemaTests : IDisposable
{
    private readonly VmmService _service = new(new Log(LogLevel.Error, TextWriter.Null), null, _ => new ConsoleStreams(null, null),
        adjust: m => m with { KvmPath = "/nonexistent/kvm" });

    public void Dispose() => _service.Dispose();

    private static string Serialize(VmConfig c) => JsonSerializer.Serialize(c, ApiJsonContext.Default.VmConfig);

    private async Task<(int Status, string Body)> HandleAsync(string method, string endpoint, string? body = null)
    {
        var handler = new ApiHandler(_service, new Log(LogLevel.Error, TextWriter.Null));
        var response = await handler.HandleAsync(new HttpRequest
        {
            Method = method,
            Path = ApiHandler.Root + endpoint,
            Headers = [],
            Body = body is null ? ReadOnlyMemory<byte>.Empty : Encoding.UTF8.GetBytes(body),
        }, CancellationToken.None);
        return (response.Status, Encoding.UTF8.GetString(response.Body.Span));
    }

    [Fact]
    public async Task The_vmm_ping_body_is_a_valid_VmmPingResponse()
    {
        var (status, body) = await HandleAsync("GET", "vmm.ping");
        Assert.Equal(200, status);
        ChSchema.AssertValid(body, "VmmPingResponse");
        using var doc = JsonDocument.Parse(body);
        Assert.Equal(VmmService.Version, doc.RootElement.GetProperty("version").GetString());
    }

    [Fact]
    public async Task The_vm_info_body_of_a_created_VM_and_its_config_are_valid()
    {
        var (created, _) = await HandleAsync("PUT", "vm.create", """
            {"payload":{"kernel":"/nonexistent/vmlinux","cmdline":"console=ttyS0"},"cpus":{"boot_vcpus":2,"max_vcpus":2},
             "memory":{"size":268435456},"disks":[{"path":"/tmp/a.img"},{"path":"/tmp/b.img","readonly":true}],
             "net":[{"tap":"tap0","mac":"52:54:00:12:34:56"}],"rng":{"src":"/dev/urandom"},"console":{"mode":"Off"}}
            """);
        Assert.Equal(204, created);
        var (status, body) = await HandleAsync("GET", "vm.info");
        Assert.Equal(200, status);
        ChSchema.AssertValid(body, "VmInfo");
        var info = JsonNode.Parse(body)!;
        Assert.Equal("Created", (string?)info["state"]);
        Assert.Equal(268435456, (long?)info["memory_actual_size"]);
        ChSchema.AssertValid(info["config"]!.ToJsonString(), "VmConfig");
        ChSchema.AssertValid(info["config"]!["disks"]![1]!.ToJsonString(), "DiskConfig");
        ChSchema.AssertValid(info["config"]!["serial"]!.ToJsonString(), "SerialConfig");
    }

    [Fact]
    public void The_schema_would_catch_a_bad_vm_info()
    {
        // The check above can fail: the same body with a state CH does not have, or without its config, is refused.
        _service.Create(new VmConfig { Payload = new PayloadConfig { Kernel = "/k" } });
        var node = JsonNode.Parse(JsonSerializer.Serialize(_service.Info(), ApiJsonContext.Default.VmInfo))!;
        node["state"] = "Booting";
        Assert.Contains(ChSchema.Validate(node.ToJsonString(), "VmInfo"), e => e.StartsWith("/state: enum", StringComparison.Ordinal));
        node.AsObject().Remove("config");
        Assert.Contains(ChSchema.Validate(node.ToJsonString(), "VmInfo"), e => e.Contains("config"));
    }

    [Theory]
    [InlineData("GET", "vm.info", null, 404)]
    [InlineData("PUT", "vm.pause", null, 404)]
    [InlineData("PUT", "vm.create", "{\"payload\":", 400)]
    [InlineData("PUT", "vm.create", "{\"payload\":{},\"foo\":1}", 400)]
    [InlineData("PUT", "vm.create", "{\"payload\":{}}", 400)]
    [InlineData("GET", "vm.boot", null, 400)]
    [InlineData("PUT", "vm.snapshot", "{}", 501)]
    [InlineData("GET", "vm.nope", null, 404)]
    public async Task Error_bodies_are_JSON_arrays_of_strings(string method, string endpoint, string? body, int expected)
    {
        var (status, text) = await HandleAsync(method, endpoint, body);
        Assert.Equal(expected, status);
        using var doc = JsonDocument.Parse(text);
        Assert.Equal(JsonValueKind.Array, doc.RootElement.ValueKind);
        Assert.NotEqual(0, doc.RootElement.GetArrayLength());
        Assert.All(doc.RootElement.EnumerateArray(), e => Assert.Equal(JsonValueKind.String, e.ValueKind));
        Assert.All(doc.RootElement.EnumerateArray(), e => Assert.False(string.IsNullOrWhiteSpace(e.GetString())));
    }

    [Fact]
    public void A_VmConfig_built_from_a_rich_command_line_is_valid_before_and_after_Normalize()
    {
        var o = Options.Parse(["run", "--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd.img", "--cmdline", "console=hvc0 quiet",
            "--memory", "1G", "--cpus", "4", "--serial", "file:/tmp/console.log", "--console", "virtio", "--rng",
            "--disk", "path=/img/root.img,readonly=on,serial=ROOT1", "--disk", "path=/img/data.img,direct=on",
            "--net", "tap=tap0,mac=52:54:00:12:34:56", "--net", "tap=tap1",
            "--device", "vfio-user=/run/gpu.sock,p2p=on", "--device", "vfio=/sys/bus/pci/devices/0000:41:00.0"]);
        var config = CliVmConfig.From(o);
        ChSchema.AssertValid(Serialize(config), "VmConfig");
        VmConfigMapper.Normalize(config);
        string json = Serialize(config);
        ChSchema.AssertValid(json, "VmConfig");
        var node = JsonNode.Parse(json)!;
        Assert.Equal("File", (string?)node["console"]!["mode"]);
        Assert.Equal("/tmp/console.log", (string?)node["serial"]!["file"]);
        Assert.Equal("/run/gpu.sock", (string?)node["user_devices"]![0]!["socket"]);
        Assert.Equal("/sys/bus/pci/devices/0000:41:00.0", (string?)node["devices"]![0]!["path"]);
        Assert.True((bool?)node["platform"]!["vfio_p2p_dma"]);
        Assert.Equal(1L << 30, (long?)node["memory"]!["size"]);
        // And it reads back as the same config.
        Assert.Equal(json, Serialize(ApiHandler.ParseVmConfig(Encoding.UTF8.GetBytes(json))));
    }

    /// <summary>What Kata's generated Go client (openapi-generator, CH v51.1's document) sends: every field its
    /// constructors default, even those vmm does not implement, at their defaults.</summary>
    private const string KataConfig = """
        {
          "payload": {"kernel": "/opt/kata/share/kata-containers/vmlinux.container",
                      "cmdline": "root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4 panic=1 no_timer_check noreplace-smp quiet",
                      "initramfs": "/opt/kata/share/kata-containers/kata-initrd.img"},
          "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "nested": true},
          "memory": {"size": 2147483648, "mergeable": false, "hotplug_method": "Acpi", "shared": false, "hugepages": false,
                     "prefault": false, "reserve": false, "thp": true},
          "disks": [{"path": "/opt/kata/share/kata-containers/kata-containers.img", "readonly": true, "direct": false, "iommu": false,
                     "num_queues": 1, "queue_size": 128, "vhost_user": false, "backing_files": false, "sparse": true, "image_type": "Raw"}],
          "net": [{"tap": "tap0_kata", "ip": "192.168.249.1", "mask": "255.255.255.0", "mac": "02:42:ac:11:00:02", "iommu": false,
                   "num_queues": 2, "queue_size": 256, "vhost_user": false, "vhost_mode": "Client",
                   "offload_tso": true, "offload_ufo": true, "offload_csum": true}],
          "rng": {"src": "/dev/urandom", "iommu": false},
          "serial": {"mode": "Tty"},
          "console": {"mode": "Off", "iommu": false},
          "platform": {"tdx": false, "sev_snp": false, "iommufd": false, "vfio_p2p_dma": true},
          "iommu": false,
          "watchdog": false,
          "pvpanic": false,
          "landlock_enable": false
        }
        """;

    [Fact]
    public void A_Kata_style_config_with_every_default_is_valid_and_accepted()
    {
        ChSchema.AssertValid(KataConfig, "VmConfig");
        var config = ApiHandler.ParseVmConfig(Encoding.UTF8.GetBytes(KataConfig));
        VmConfigMapper.Normalize(config);
        Assert.Equal("_disk0", config.Disks![0].Id);
        Assert.Equal("_net1", config.Net![0].Id);
        Assert.Equal(MachineConfig.RngId, config.Rng!.Id);
        ChSchema.AssertValid(Serialize(config), "VmConfig");
        _service.Create(config);
        Assert.Equal("Created", _service.Info().State);
    }

    [Theory]
    [InlineData("memory", "hugepages", "true", "memory.hugepages")]
    [InlineData("memory", "hotplug_size", "1073741824", "memory.hotplug_size")]
    [InlineData("memory", "mergeable", "true", "memory.mergeable")]
    [InlineData("disks/0", "num_queues", "4", "disks[0].num_queues")]
    [InlineData("disks/0", "queue_size", "1024", "disks[0].queue_size")]
    [InlineData("disks/0", "sparse", "false", "disks[0].sparse")]
    [InlineData("disks/0", "image_type", "\"Qcow2\"", "disks[0].image_type")]
    [InlineData("disks/0", "lock_granularity", "\"Full\"", "disks[0].lock_granularity")]
    [InlineData("net/0", "num_queues", "4", "net[0].num_queues")]
    [InlineData("net/0", "offload_tso", "false", "net[0].offload_*")]
    [InlineData("net/0", "vhost_mode", "\"Server\"", "net[0].vhost_mode")]
    [InlineData("cpus", "kvm_hyperv", "true", "cpus.kvm_hyperv")]
    [InlineData("cpus", "max_vcpus", "4", "cpus.max_vcpus")]
    [InlineData("cpus", "topology", "{\"threads_per_core\":1,\"cores_per_die\":1,\"dies_per_package\":1,\"packages\":1}", "cpus.topology")]
    [InlineData("platform", "num_pci_segments", "2", "platform.num_pci_segments")]
    [InlineData("", "vsock", "{\"cid\":3,\"socket\":\"/run/kata/clh.sock\",\"iommu\":true}", "vsock.iommu")]
    [InlineData("", "fs", "[{\"tag\":\"kataShared\",\"socket\":\"/run/virtiofsd.sock\",\"num_queues\":1,\"queue_size\":1024,\"pci_segment\":1}]", "fs[0].pci_segment")]
    [InlineData("", "balloon", "{\"size\":0,\"free_page_reporting\":true}", "balloon")]
    [InlineData("", "iommu", "true", "iommu")]
    [InlineData("", "watchdog", "true", "watchdog")]
    [InlineData("console", "mode", "\"Pty\"", "console.mode")]
    [InlineData("serial", "mode", "\"Socket\"", "serial.mode")]
    public void A_schema_valid_config_asking_for_what_vmm_lacks_is_refused_naming_the_field(string at, string property, string value, string field)
    {
        var node = JsonNode.Parse(KataConfig)!;
        var parent = at.Length == 0 ? node : at.Split('/').Aggregate(node, (n, part) => int.TryParse(part, out int i) ? n[i]! : n[part]!);
        parent[property] = JsonNode.Parse(value);
        string json = node.ToJsonString();
        ChSchema.AssertValid(json, "VmConfig");
        var config = ApiHandler.ParseVmConfig(Encoding.UTF8.GetBytes(json));
        var e = Assert.Throws<VmConfigException>(() => VmConfigMapper.Normalize(config));
        // One problem, or (console.mode Pty next to serial.mode Tty) two, all about that field.
        Assert.NotEmpty(e.Problems);
        Assert.All(e.Problems, problem => Assert.StartsWith(field + ":", problem));
        Assert.Contains("not supported", e.Problems[0]);
    }
}
