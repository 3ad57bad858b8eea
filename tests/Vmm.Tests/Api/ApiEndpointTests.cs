using System.Text;
using System.Text.Json;
using Vmm.Api;
using Vmm.Api.Http;
using Vmm.Machine;
using Vmm.Tests.TestKit;
using static Vmm.Tests.TestKit.ApiTestHost;

namespace Vmm.Tests.Api;

/// <summary>Every endpoint and status of the API, end to end: <see cref="ApiClient"/> → <see cref="HttpServer"/> on a
/// socket → <see cref="ApiHandler"/> → <see cref="VmmService"/>. KVM is forced missing (KvmPath), so vm.boot fails the
/// same on every host, with or without /dev/kvm.</summary>
public sealed class ApiEndpointTests : IDisposable
{
    private readonly ApiTestHost _host = new("vmm-api-");

    public void Dispose() => _host.Dispose();

    private void Create(string? body = null)
    {
        var r = _host.Client.Put("vm.create", body ?? Config(_host.KernelFile()));
        Assert.True(r.Status == 204, $"vm.create: {r.Status} {r.Body}");
        Assert.Equal("", r.Body);
    }

    [Fact]
    public void Ping_answers_the_version_and_this_process_id()
    {
        var r = _host.Client.Get("vmm.ping");
        Assert.Equal(200, r.Status);
        var ping = JsonSerializer.Deserialize(r.Body, ApiJsonContext.Default.VmmPingResponse)!;
        Assert.Equal(VmmService.Version, ping.Version);
        Assert.Equal(Environment.ProcessId, ping.Pid);
        Assert.Contains("kvm", ping.Features);
    }

    [Fact]
    public void Vm_info_before_create_is_404()
    {
        AssertError(_host.Client.Get("vm.info"), 404, "VM is not created");
        Assert.Equal(["Error from API", "The VM info is not available", "VM is not created"], Messages(_host.Client.Get("vm.info")));
    }

    [Fact]
    public void Vm_create_is_204_and_vm_info_then_shows_the_created_VM_with_CH_style_ids()
    {
        Create(Config(_host.KernelFile(), ""","disks":[{"path":"/tmp/a.img"},{"path":"/tmp/b.img","id":"data"}],"net":[{"tap":"tap0"}],"rng":{"src":"/dev/urandom"}"""));
        var r = _host.Client.Get("vm.info");
        Assert.Equal(200, r.Status);
        var info = JsonSerializer.Deserialize(r.Body, ApiJsonContext.Default.VmInfo)!;
        Assert.Equal("Created", info.State);
        Assert.Equal(["_disk0", "data"], info.Config.Disks!.Select(d => d.Id));
        Assert.Equal("_net1", info.Config.Net![0].Id);
        Assert.Equal(MachineConfig.RngId, info.Config.Rng!.Id);
        Assert.Equal(67108864, info.MemoryActualSize);
        Assert.Null(info.DeviceTree);
        ChSchema.AssertValid(r.Body, "VmInfo");
    }

    [Fact]
    public void A_second_vm_create_is_409_and_keeps_the_first_config()
    {
        Create();
        AssertError(_host.Client.Put("vm.create", Config("/other/kernel")), 409, "VM is already created");
        Assert.Contains("kernel.elf", _host.Client.Get("vm.info").Body);
    }

    [Theory]
    [InlineData("PUT", "vm.pause", "vm.pause needs it Running")]
    [InlineData("PUT", "vm.resume", "vm.resume needs it Paused")]
    [InlineData("PUT", "vm.shutdown", "vm.shutdown needs it Running or Paused")]
    [InlineData("PUT", "vm.reboot", "vm.reboot needs it Running or Paused")]
    [InlineData("PUT", "vm.power-button", "vm.power-button needs it Running")]
    [InlineData("GET", "vm.counters", "it is Created")]
    public void Actions_a_created_VM_cannot_take_are_405_naming_the_state(string method, string endpoint, string message)
    {
        Create();
        var r = _host.Client.Send(method, endpoint, null);
        AssertError(r, 405, message);
        Assert.Contains(Messages(r), m => m.Contains("Created", StringComparison.Ordinal));
        Assert.Equal("Error from API", Messages(r)[0]);
        Assert.Contains("\"state\":\"Created\"", _host.Client.Get("vm.info").Body);
    }

    [Theory]
    [InlineData("PUT", "vm.boot")]
    [InlineData("PUT", "vm.pause")]
    [InlineData("PUT", "vm.resume")]
    [InlineData("PUT", "vm.shutdown")]
    [InlineData("PUT", "vm.reboot")]
    [InlineData("PUT", "vm.power-button")]
    [InlineData("GET", "vm.counters")]
    public void Actions_without_a_VM_are_404(string method, string endpoint) =>
        AssertError(_host.Client.Send(method, endpoint, null), 404, "VM is not created");

    [Fact]
    public void Vm_boot_without_KVM_is_500_naming_KVM_and_the_VM_stays_created()
    {
        Create();
        var r = _host.Client.Put("vm.boot");
        AssertError(r, 500, "/nonexistent/kvm does not exist");
        Assert.Equal(["Error from API", "The VM could not boot"], Messages(r)[..2]);
        Assert.Contains(Messages(r), m => m.Contains("KVM", StringComparison.Ordinal));
        Assert.Contains("\"state\":\"Created\"", _host.Client.Get("vm.info").Body);
        Assert.Equal(500, _host.Client.Put("vm.boot").Status); // and it can be tried again
    }

    [Fact]
    public void Vm_boot_with_a_missing_kernel_file_is_400_naming_payload_kernel()
    {
        string missing = Path.Combine(_host.Dir.FullName, "no-such-kernel");
        Create(Config(missing));
        var r = _host.Client.Put("vm.boot");
        AssertError(r, 400, $"payload.kernel {missing}: no such file");
        Assert.Contains("\"state\":\"Created\"", _host.Client.Get("vm.info").Body);
    }

    [Fact]
    public void Vm_delete_is_204_and_vm_info_is_then_404_and_a_new_create_works()
    {
        Assert.Equal(204, _host.Client.Put("vm.delete").Status); // nothing to delete: still 204, as CH
        Create();
        var r = _host.Client.Put("vm.delete");
        Assert.Equal(204, r.Status);
        Assert.Equal("", r.Body);
        Assert.Equal(404, _host.Client.Get("vm.info").Status);
        Create();
        Assert.Equal(200, _host.Client.Get("vm.info").Status);
    }

    [Fact]
    public void Every_endpoint_vmm_does_not_implement_is_501_naming_itself()
    {
        Assert.NotEmpty(ApiHandler.NotImplemented);
        foreach (string endpoint in ApiHandler.NotImplemented)
        {
            var r = _host.Client.Put(endpoint, "{}");
            AssertError(r, 501, $"{endpoint} is not implemented");
        }
        AssertError(_host.Client.Get("vm.resize"), 501, "vm.resize is not implemented");
    }

    [Fact]
    public void An_unknown_path_is_404()
    {
        AssertError(_host.Client.Get("vm.frobnicate"), 404, "/api/v1/vm.frobnicate: no such endpoint");
        AssertError(_host.Client.Put("vmm.nmi"), 404, "no such endpoint"); // the v51.1 document's misnamed path
        AssertError(_host.Client.Get(""), 404, "no such endpoint");
    }

    [Theory]
    [InlineData("GET", "vm.boot", "vm.boot takes PUT, not GET")]
    [InlineData("GET", "vm.create", "vm.create takes PUT, not GET")]
    [InlineData("GET", "vmm.shutdown", "vmm.shutdown takes PUT, not GET")]
    [InlineData("PUT", "vm.info", "vm.info takes GET, not PUT")]
    [InlineData("PUT", "vmm.ping", "vmm.ping takes GET, not PUT")]
    [InlineData("POST", "vm.boot", "vm.boot takes PUT, not POST")]
    public void The_wrong_method_is_400(string method, string endpoint, string message) =>
        AssertError(_host.Client.Send(method, endpoint, null), 400, message);

    [Fact]
    public void A_body_on_a_bodiless_action_is_400_and_vm_create_without_one_too()
    {
        Create();
        AssertError(_host.Client.Put("vm.boot", "{}"), 400, "vm.boot takes no body");
        AssertError(_host.Client.Put("vm.delete", "{}"), 400, "vm.delete takes no body");
        Assert.Equal(200, _host.Client.Get("vm.info").Status); // not deleted
        AssertError(_host.Client.Put("vm.create"), 400, "vm.create needs a JSON body");
    }

    [Theory]
    [InlineData("{\"payload\":{\"kernel\":\"/k\"},", "Path: $")]
    [InlineData("{\"payload\":{\"kernel\":\"/k\"}} trailing", "LineNumber: 0")]
    [InlineData("[1,2]", "Vmm.Api.VmConfig")]
    [InlineData("null", "the body is null")]
    [InlineData("{\"payload\":{\"kernel\":\"/k\"},\"cpus\":{\"boot_vcpus\":\"two\",\"max_vcpus\":1}}", "$.cpus.boot_vcpus")]
    [InlineData("{\"payload\":{\"kernel\":\"/k\"},\"memory\":{\"size\":1.5}}", "$.memory.size")]
    [InlineData("{\"cpus\":{\"boot_vcpus\":1,\"max_vcpus\":1}}", "'payload'")]
    [InlineData("{\"payload\":{\"kernel\":\"/k\"},\"cpus\":{\"boot_vcpus\":1}}", "'max_vcpus'")]
    [InlineData("{\"payload\":{\"kernel\":\"/k\"},\"foo\":1}", "'foo'")]
    [InlineData("{\"payload\":{\"kernel\":\"/k\"},\"disks\":[{\"path\":\"/d\",\"bar\":true}]}", "'bar'")]
    [InlineData("{\"payload\":{\"kernel\":\"/k\"},\"Payload\":{}}", "'Payload'")]
    public void A_body_that_is_not_a_VmConfig_is_400_naming_the_problem(string body, string named)
    {
        var r = _host.Client.Put("vm.create", body);
        AssertError(r, 400, named);
        Assert.Equal("Failed to deserialize JSON", Messages(r)[0]);
        Assert.Equal(404, _host.Client.Get("vm.info").Status);
    }

    [Fact]
    public void A_property_outside_the_schema_names_its_type_and_where_it_is()
    {
        var r = _host.Client.Put("vm.create", """{"payload":{"kernel":"/k"},"disks":[{"path":"/a"},{"path":"/b","bar":1}]}""");
        AssertError(r, 400, "Vmm.Api.DiskConfig");
        AssertError(r, 400, "Path: $.disks[1]");
        r = _host.Client.Put("vm.create", """{"payload":{"kernel":"/k","bzimage":"/b"}}""");
        AssertError(r, 400, "Vmm.Api.PayloadConfig");
        AssertError(r, 400, "Path: $.payload");
        AssertError(_host.Client.Put("vm.create", """{"payload":{"kernel":"/k"},"foo":1}"""), 400, "Path: $");
    }

    [Fact]
    public void Invalid_UTF_8_in_the_body_is_400_naming_where()
    {
        byte[] body = [.. "{\"payload\":{\"kernel\":\"/k"u8, 0xFF, 0xFE, .. "\"}}"u8];
        var r = _host.Client.Send("PUT", "vm.create", body);
        AssertError(r, 400, "$.payload.kernel");
        Assert.Equal(404, _host.Client.Get("vm.info").Status);
    }

    [Fact]
    public void A_config_vmm_cannot_run_is_400_naming_the_field()
    {
        var r = _host.Client.Put("vm.create", """{"payload":{"kernel":"/k"},"memory":{"size":67108864,"hugepages":true}}""");
        AssertError(r, 400, "memory.hugepages: true is not supported");
        Assert.Equal(["Error from API", "The VM could not be created"], Messages(r)[..2]);
        Assert.Equal(404, _host.Client.Get("vm.info").Status);
    }

    [Fact]
    public async Task Vmm_shutdown_is_200_and_asks_the_process_to_end()
    {
        Create();
        Assert.False(_host.Service.ExitRequested.IsCompleted);
        var r = _host.Client.Put("vmm.shutdown");
        Assert.Equal(200, r.Status);
        Assert.Equal("", r.Body);
        Assert.Equal(0, await _host.Service.ExitRequested.WaitAsync(TimeSpan.FromSeconds(5)));
        Assert.Null(_host.Service.Lifecycle); // the VM went with it
    }

    [Fact]
    public async Task Fifty_racing_requests_all_get_a_well_formed_answer_and_the_server_still_answers()
    {
        string config = Config(_host.KernelFile());
        string[] endpoints = ["vm.info", "vm.create", "vm.delete", "vm.pause"];
        // ApiClient blocks: each request on a thread of its own, not 50 thread-pool threads (the server and the tests
        // running alongside need the pool).
        using var go = new ManualResetEventSlim();
        var requests = Enumerable.Range(0, 50).Select(i => Task.Factory.StartNew(() =>
        {
            string endpoint = endpoints[i % endpoints.Length];
            go.Wait();
            var r = endpoint == "vm.info" ? _host.Client.Get(endpoint) : _host.Client.Put(endpoint, endpoint == "vm.create" ? config : null);
            return (Endpoint: endpoint, Response: r);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToList();
        go.Set();
        var answers = await Task.WhenAll(requests).WaitAsync(TimeSpan.FromSeconds(20));
        foreach (var (endpoint, r) in answers)
        {
            int[] allowed = endpoint switch
            {
                "vm.info" => [200, 404],
                "vm.create" => [204, 409],
                "vm.delete" => [204],
                _ => [404, 405],
            };
            Assert.True(allowed.Contains(r.Status), $"{endpoint}: {r.Status} {r.Body}");
            if (r.Status is 200)
                Assert.Equal(JsonValueKind.Object, JsonDocument.Parse(r.Body).RootElement.ValueKind);
            else if (r.Status >= 400)
                Assert.NotEmpty(Messages(r));
            else
                Assert.Equal("", r.Body);
        }
        Assert.Contains(answers, a => a.Endpoint == "vm.create" && a.Response.Status == 204);
        Assert.Equal(200, _host.Client.Get("vmm.ping").Status);
        var info = _host.Client.Get("vm.info");
        Assert.True(info.Status is 200 or 404, info.Body);
        Assert.Equal(204, _host.Client.Put("vm.delete").Status);
        Create();
    }
}
