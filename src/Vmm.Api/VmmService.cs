using System.Reflection;
using Vmm.Boot;
using Vmm.Kvm;
using Vmm.Machine;

namespace Vmm.Api;

/// <summary>An API error: the HTTP status and Cloud Hypervisor's error body, outermost message first.</summary>
public sealed class ApiException(int status, params string[] messages) : Exception(string.Join(": ", messages))
{
    public int Status { get; } = status;
    public IReadOnlyList<string> Messages { get; } = messages;
}

/// <summary>The VMM process as the control plane sees it: at most one VM (its <see cref="VmConfig"/> and
/// <see cref="VmLifecycle"/>), and the process's own end (vmm.shutdown). The API handler, the command line and the
/// signal handlers all act through here. Status codes: what the state forbids is 405 (as CH's OpenAPI document
/// says for pause, shutdown, reboot and power-button), no VM is 404, a second vm.create is 409, a config vmm
/// cannot run is 400.</summary>
public sealed class VmmService : IDisposable
{
    private readonly Lock _lock = new();
    private readonly Log _log;
    private readonly IVmEventSink? _events;
    private readonly Func<VmConfig, ConsoleStreams> _consoleFor;
    private readonly ResetAction _onReset;
    private readonly Func<MachineConfig, MachineConfig> _adjust;
    private readonly TaskCompletionSource<int> _exit = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private VmConfig? _config;
    private VmLifecycle? _lifecycle;
    private ConsoleStreams? _console;

    /// <param name="consoleFor">Opens the console streams a config asks for (stdio, a file); called once per vm.create.</param>
    /// <param name="adjust">Applies the command line's machine options that have no place in VmConfig (--no-irqchip).</param>
    public VmmService(Log log, IVmEventSink? events, Func<VmConfig, ConsoleStreams> consoleFor, ResetAction onReset = ResetAction.Reboot,
        Func<MachineConfig, MachineConfig>? adjust = null, BootFile? builtInKernel = null)
    {
        _log = log;
        _events = events;
        _consoleFor = consoleFor;
        _onReset = onReset;
        _adjust = adjust ?? (c => c);
        BuiltInKernel = builtInKernel;
    }

    /// <summary>The demo guest's kernel, used instead of payload.kernel.</summary>
    public BootFile? BuiltInKernel { get; }

    public static string Version => typeof(VmmService).Assembly.GetName().Version?.ToString(3) ?? "0.0.0";

    public static string BuildVersion =>
        typeof(VmmService).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? Version;

    /// <summary>Completes with the process exit status once vmm.shutdown (or a signal) asked the process to end.</summary>
    public Task<int> ExitRequested => _exit.Task;

    public VmLifecycle? Lifecycle
    {
        get
        {
            lock (_lock)
                return _lifecycle;
        }
    }

    public VmmPingResponse Ping() => new()
    {
        BuildVersion = BuildVersion,
        Version = Version,
        Pid = Environment.ProcessId,
        Features = ["kvm"],
    };

    /// <summary>vm.create: validates and stores the config (the VM is built at vm.boot).</summary>
    public void Create(VmConfig config)
    {
        lock (_lock)
        {
            if (_config is not null)
                throw new ApiException(409, "Error from API", "The VM could not be created", "VM is already created");
            try
            {
                VmConfigMapper.Normalize(config);
            }
            catch (VmConfigException e)
            {
                throw new ApiException(400, ["Error from API", "The VM could not be created", .. e.Problems]);
            }
            ConsoleStreams console;
            try
            {
                console = _consoleFor(config);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or ConfigException)
            {
                throw new ApiException(400, "Error from API", "The VM could not be created", e.Message);
            }
            _config = config;
            _console = console;
            _lifecycle = new VmLifecycle(() => _adjust(VmConfigMapper.ToMachine(config, console, BuiltInKernel)), _log, _events, _onReset);
        }
    }

    public void Boot() => Act("The VM could not boot", l => l.Boot());

    public void Pause() => Act("The VM could not be paused", l => l.Pause());

    public void Resume() => Act("The VM could not resume", l => l.Resume());

    public void Shutdown() => Act("The VM could not shutdown", l => l.Shutdown());

    public void Reboot() => Act("The VM could not reboot", l => l.Reboot());

    public void PowerButton() => Act("Error triggering power button", l => l.PowerButton());

    /// <summary>vm.delete: stops the VM if it runs and forgets its config.</summary>
    public void Delete()
    {
        VmLifecycle? lifecycle;
        lock (_lock)
        {
            lifecycle = _lifecycle;
            _lifecycle = null;
            _config = null;
            CloseConsole();
        }
        if (lifecycle is null)
            return;
        lifecycle.Dispose();
        Emit("vm", "deleted");
    }

    /// <summary>vmm.shutdown or a signal: stops the VM, releases it and lets the process end with <paramref name="status"/>.</summary>
    public void ShutdownVmm(int status = 0)
    {
        Delete();
        Emit("vmm", "shutdown");
        _exit.TrySetResult(status);
    }

    // ------------------------------------------------------------------ hotplug

    /// <summary>vm.add-disk: a virtio-blk disk, hot-added to a running VM; the config keeps it (a reboot boots with it,
    /// vm.info shows it). Null when the VM is not running (added to the config only).</summary>
    public PciDeviceInfoResponse? AddDisk(DiskConfig d) => Add("The disk could not be added", "vm.add-disk", "disk", "_disk", d, d.Id, id => d.Id = id,
        VmConfigMapper.CheckDisk, (_, x) => VmConfigMapper.ToMachine(x), (c, x) => (c.Disks ??= []).Add(x));

    /// <summary>vm.add-net: hot-adds a virtio-net interface on a tap.</summary>
    public PciDeviceInfoResponse? AddNet(NetConfig n) => Add("The network device could not be added", "vm.add-net", "net", "_net", n, n.Id, id => n.Id = id,
        VmConfigMapper.CheckNet, (_, x) => VmConfigMapper.ToMachine(x), (c, x) => (c.Net ??= []).Add(x));

    /// <summary>vm.add-device: hot-adds a host PCI device through VFIO.</summary>
    public PciDeviceInfoResponse? AddDevice(DeviceConfig d) => Add("The device could not be added", "vm.add-device", "device", "_vfio", d, d.Id, id => d.Id = id,
        VmConfigMapper.CheckDevice, (c, x) => VmConfigMapper.ToMachine(x, VmConfigMapper.PeerToPeer(c)), (c, x) => (c.Devices ??= []).Add(x));

    /// <summary>vm.add-user-device: hot-adds a device served by a vfio-user server.</summary>
    public PciDeviceInfoResponse? AddUserDevice(UserDeviceConfig d) => Add("The user device could not be added", "vm.add-user-device", "user_device", "_vfio_user", d, d.Id,
        id => d.Id = id, VmConfigMapper.CheckUserDevice, (c, x) => VmConfigMapper.ToMachine(x, VmConfigMapper.PeerToPeer(c)), (c, x) => (c.UserDevices ??= []).Add(x));

    /// <summary>vm.add-fs: hot-adds a virtio-fs device served by a vhost-user back-end (virtiofsd) that is already
    /// listening on the socket.</summary>
    public PciDeviceInfoResponse? AddFs(FsConfig f) => Add("The fs device could not be added", "vm.add-fs", "fs", "_fs", f, f.Id, id => f.Id = id,
        VmConfigMapper.CheckFs, (_, x) => VmConfigMapper.ToMachine(x), (c, x) => (c.Fs ??= []).Add(x));

    /// <summary>vm.add-vsock: hot-adds the VM's vsock device (one per VM, as in CH: a second one is refused).</summary>
    public PciDeviceInfoResponse? AddVsock(VsockConfig v) => Add("The vsock device could not be added", "vm.add-vsock", "vsock", "_vsock", v, v.Id,
        id => v.Id = id, CheckOneVsock, (_, x) => VmConfigMapper.ToMachine(x), (c, x) => c.Vsock = x);

    private void CheckOneVsock(List<string> problems, string at, VsockConfig v)
    {
        VmConfigMapper.CheckVsock(problems, at, v);
        if (_config?.Vsock is { } present)
            problems.Add($"{at}: the VM has a vsock device already (\"{present.Id}\"); remove it first");
    }

    /// <summary>One vm.add-*: checks the body as vm.create checks that kind of entry, gives it an id when it has none
    /// (CH's style: prefix and the lowest number no device uses), refuses an id in use (409), and adds it to the config.
    /// A running VM gets it at once (hotplug; CH's answer: 200 with the device's id and PCI address); a VM not booted
    /// or shut down gets it at the next boot (null: CH's 204, "cold added"); a paused one refuses (405).</summary>
    private PciDeviceInfoResponse? Add<T>(string what, string endpoint, string at, string prefix, T body, string? givenId, Action<string> setId,
        Action<List<string>, string, T> check, Func<VmConfig, T, IPciDeviceConfig> toMachine, Action<VmConfig, T> store)
    {
        lock (_lock)
        {
            if (_config is null || _lifecycle is null)
                throw new ApiException(404, "Error from API", what, "VM is not created");
            var problems = new List<string>();
            check(problems, at, body);
            if (problems.Count > 0)
                throw new ApiException(400, ["Error from API", what, .. problems]);
            var ids = DeviceIds();
            string id = givenId ?? Enumerable.Range(0, int.MaxValue).Select(n => $"{prefix}{n}").First(n => !ids.Contains(n));
            if (ids.Contains(id))
                throw new ApiException(409, "Error from API", what, $"Identifier {id} is not unique");
            setId(id);
            PciDeviceInfoResponse? answer = null;
            if (_lifecycle.State is not (VmState.Created or VmState.Shutdown))
            {
                var info = Invoke(what, l => l.AddDevice(toMachine(_config, body), endpoint), _lifecycle);
                answer = new PciDeviceInfoResponse { Id = info.Id, Bdf = info.Bdf };
            }
            store(_config, body);
            return answer;
        }
    }

    /// <summary>vm.remove-device: on a running VM asks the guest to eject the device and waits (up to
    /// <paramref name="timeout"/>, by default 10 s) until it did; the device leaves the config too (on a VM not running,
    /// that is all). An unknown id is 404.</summary>
    public void RemoveDevice(string id, TimeSpan? timeout = null)
    {
        const string what = "The device could not be removed";
        var lifecycle = Lifecycle ?? throw new ApiException(404, "Error from API", what, "VM is not created");
        if (lifecycle.State is VmState.Created or VmState.Shutdown)
        {
            lock (_lock)
            {
                if (_config is null || !_config.RemoveDevice(id))
                    throw new ApiException(404, "Error from API", what, $"no device with id \"{id}\"");
            }
            return;
        }
        // Not under the service lock: the guest takes its time, and info must answer meanwhile.
        Invoke(what, l =>
        {
            l.RemoveDevice(id, timeout ?? DefaultEjectTimeout);
            return 0;
        }, lifecycle);
        lock (_lock)
        {
            if (_config is not null)
                _config.RemoveDevice(id);
        }
    }

    /// <summary>How long vm.remove-device waits for the guest's eject.</summary>
    public static readonly TimeSpan DefaultEjectTimeout = TimeSpan.FromSeconds(10);

    /// <summary>Every device id in use: the config's and those of the running machine (console, rng).</summary>
    private HashSet<string> DeviceIds()
    {
        var ids = new HashSet<string>(_config!.PluggableDeviceIds().Concat([_config.Rng?.Id, _config.Console?.Id]).OfType<string>());
        foreach (var d in _lifecycle?.Machine?.PciDevices ?? [])
            ids.Add(d.Id);
        return ids;
    }

    public VmInfo Info()
    {
        VmConfig config;
        VmLifecycle lifecycle;
        lock (_lock)
        {
            if (_config is null || _lifecycle is null)
                throw new ApiException(404, "Error from API", "The VM info is not available", "VM is not created");
            config = _config;
            lifecycle = _lifecycle;
        }
        var info = new VmInfo
        {
            Config = config,
            State = lifecycle.State.ToString(),
            MemoryActualSize = config.Memory!.Size,
        };
        var machine = lifecycle.Machine;
        if (machine is not null)
        {
            info.DeviceTree = [];
            foreach (var d in machine.PciDevices)
                info.DeviceTree[d.Id] = new DeviceNode { Id = d.Id, PciBdf = d.Bdf };
        }
        return info;
    }

    /// <summary>vm.counters: per device (CH's counter names) and per vCPU (exits by reason).</summary>
    public Dictionary<string, Dictionary<string, ulong>> Counters()
    {
        var machine = RunningMachine("The VM counters are not available");
        var result = new Dictionary<string, Dictionary<string, ulong>>();
        foreach (var d in machine.DeviceCounters())
            result[d.Id] = d.Values.ToDictionary(v => v.Key, v => v.Value);
        var stats = machine.VcpuStats;
        for (int i = 0; i < stats.Count; i++)
        {
            var s = stats[i];
            result[$"vcpu{i}"] = new()
            {
                ["exits"] = (ulong)s.Exits,
                ["io_exits"] = (ulong)s.PioExits,
                ["mmio_exits"] = (ulong)s.MmioExits,
                ["interrupted_runs"] = (ulong)s.InterruptedRuns,
            };
        }
        return result;
    }

    private VirtualMachine RunningMachine(string what)
    {
        var lifecycle = Lifecycle ?? throw new ApiException(404, "Error from API", what, "VM is not created");
        if (lifecycle.State is not (VmState.Running or VmState.Paused))
            throw new ApiException(405, "Error from API", what, $"VM is not running (it is {lifecycle.State})");
        return lifecycle.Machine ?? throw new ApiException(405, "Error from API", what, "VM is not running");
    }

    /// <summary>One lifecycle action with the errors translated: the state (405), the config (400), KVM or vmm (500).</summary>
    private void Act(string what, Action<VmLifecycle> action) => Invoke(what, l =>
    {
        action(l);
        return 0;
    });

    /// <summary><see cref="Act"/> with a result; an unknown device id is 404.</summary>
    private T Invoke<T>(string what, Func<VmLifecycle, T> action, VmLifecycle? lifecycle = null)
    {
        lifecycle ??= Lifecycle ?? throw new ApiException(404, "Error from API", what, "VM is not created");
        try
        {
            return action(lifecycle);
        }
        catch (KeyNotFoundException e)
        {
            throw new ApiException(404, "Error from API", what, e.Message);
        }
        catch (VmStateException e)
        {
            throw new ApiException(405, "Error from API", what, e.Message);
        }
        catch (Exception e) when (e is ConfigException or KernelImageException)
        {
            throw new ApiException(400, "Error from API", what, e.Message);
        }
        catch (TimeoutException e)
        {
            throw new ApiException(500, "Error from API", what, e.Message);
        }
        catch (Exception e) when (e is KvmUnavailableException or Interop.SyscallException)
        {
            throw new ApiException(500, "Error from API", what, e.Message);
        }
    }

    private void Emit(string source, string name)
    {
        try
        {
            _events?.Emit(source, name);
        }
        catch (Exception e)
        {
            _log.Warn($"event monitor: {e.Message}");
        }
    }

    private void CloseConsole()
    {
        // stdout and stdin are the process's; only a file opened for the VM is closed.
        if (_console?.Output is FileStream f)
            f.Dispose();
        _console = null;
    }

    public void Dispose() => Delete();
}
