namespace Vmm.Machine;

/// <summary>The VM's state as the control plane reports it (Cloud Hypervisor's VmState names).</summary>
public enum VmState
{
    /// <summary>Configured (vm.create), not running: never booted.</summary>
    Created,
    Running,
    Paused,
    /// <summary>Ran and ended: vm.shutdown, or the guest powered off, reset or crashed. vm.boot boots it again.</summary>
    Shutdown,
}

/// <summary>An action the VM's current state does not allow (vm.pause on a VM that is not running, ...).</summary>
public sealed class VmStateException(string message) : Exception(message);

/// <summary>Receives lifecycle events (the event monitor): <paramref name="source"/> "vmm" or "vm", the event name in
/// Cloud Hypervisor's words, and optional string properties.</summary>
public interface IVmEventSink
{
    void Emit(string source, string name, IReadOnlyDictionary<string, string>? properties = null);
}

/// <summary>What a guest reset does to the VM.</summary>
public enum ResetAction
{
    /// <summary>The VM ends (state Shutdown); `vmm run` then exits with status 0.</summary>
    Shutdown,
    /// <summary>A fresh VM boots from the same config (RAM is not kept).</summary>
    Reboot,
}

/// <summary>The one state machine of a VM: Created → Running ⇄ Paused → Shutdown (→ Running again by vm.boot). Every
/// transition, from the API, from a signal or from the guest itself, goes through here under one lock, so a request
/// racing a state change sees either the old state or the new one, never half of it. Transitions that wait (pause
/// waits until every vCPU is parked, shutdown joins the vCPU threads) do so with a timeout; reads of the state
/// (<see cref="State"/>) never wait.</summary>
public sealed class VmLifecycle : IDisposable
{
    /// <summary>How long pause waits for the vCPUs and device workers to stop.</summary>
    public static readonly TimeSpan DefaultPauseTimeout = TimeSpan.FromSeconds(5);

    private readonly Lock _lock = new();
    private readonly Log _log;
    private readonly IVmEventSink? _events;
    private readonly Func<MachineConfig> _configure;
    private VirtualMachine? _vm;
    private volatile VmState _state = VmState.Created;
    private VmOutcome? _lastOutcome;
    private TaskCompletionSource<VmOutcome> _ended = NewEnded();
    private bool _disposed;

    /// <param name="configure">Builds the machine's config at every boot (it reads the kernel and initrd files then,
    /// so a boot after a shutdown boots what is on disk now).</param>
    public VmLifecycle(Func<MachineConfig> configure, Log log, IVmEventSink? events = null, ResetAction onReset = ResetAction.Shutdown)
    {
        _configure = configure;
        _log = log;
        _events = events;
        OnReset = onReset;
    }

    /// <summary>The config of the current or last boot.</summary>
    public MachineConfig? Config { get; private set; }

    public ResetAction OnReset { get; }

    public VmState State => _state;

    /// <summary>How the last run ended (null while it runs or before the first boot).</summary>
    public VmOutcome? LastOutcome
    {
        get
        {
            lock (_lock)
                return _lastOutcome;
        }
    }

    /// <summary>Completes when the current (or next) run ends without a reboot following it: the outcome `vmm run`
    /// reports. A new boot after that arms a new one.</summary>
    public Task<VmOutcome> Ended
    {
        get
        {
            lock (_lock)
                return _ended.Task;
        }
    }

    /// <summary>The last run's per-vCPU statistics (--stats), once it ended.</summary>
    public string? LastStats { get; private set; }

    /// <summary>The running machine (for info and counters), or null.</summary>
    public VirtualMachine? Machine
    {
        get
        {
            lock (_lock)
                return _vm;
        }
    }

    /// <summary>Builds the VM from <see cref="Config"/> and starts it. Allowed in Created and Shutdown. A config the
    /// machine refuses (a missing disk, no KVM, a bad kernel) throws that error and leaves the state as it was.</summary>
    public void Boot()
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_state is not (VmState.Created or VmState.Shutdown))
                throw new VmStateException($"the VM is {_state}: vm.boot needs it Created or Shutdown");
            BootLocked("booting", "booted");
        }
    }

    private void BootLocked(string before, string after)
    {
        Emit("vm", before);
        var config = _configure();
        var vm = new VirtualMachine(config, _log);
        Config = config;
        _vm = vm;
        _lastOutcome = null;
        if (_ended.Task.IsCompleted)
            _ended = NewEnded();
        vm.Ended.ContinueWith(t => OnGuestEnded(vm, t.Result), TaskContinuationOptions.ExecuteSynchronously);
        vm.DeviceRemoved += info => Emit("vm", "device-removed", new Dictionary<string, string> { ["id"] = info.Id, ["bdf"] = info.Bdf });
        vm.Start();
        _state = VmState.Running;
        Emit("vm", after);
    }

    /// <summary>Kicks every vCPU out of the guest and parks it, stops the device workers from taking new requests and
    /// tells the guest clock. Running → Paused.</summary>
    public void Pause(TimeSpan? timeout = null)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_state != VmState.Running)
                throw new VmStateException($"the VM is {_state}: vm.pause needs it Running");
            Emit("vm", "pausing");
            _vm!.Pause(timeout ?? DefaultPauseTimeout);
            _state = VmState.Paused;
            Emit("vm", "paused");
        }
    }

    /// <summary>Paused → Running, where it stopped.</summary>
    public void Resume()
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_state != VmState.Paused)
                throw new VmStateException($"the VM is {_state}: vm.resume needs it Paused");
            Emit("vm", "resuming");
            _vm!.Resume();
            _state = VmState.Running;
            Emit("vm", "resumed");
        }
    }

    /// <summary>Stops the VM and releases everything it holds (vCPUs joined, devices closed, DMA unmapped). Running or
    /// Paused → Shutdown.</summary>
    public void Shutdown(string why = "vm.shutdown")
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_state is not (VmState.Running or VmState.Paused))
                throw new VmStateException($"the VM is {_state}: vm.shutdown needs it Running or Paused");
            StopLocked(why);
            Emit("vm", "shutdown");
        }
    }

    /// <summary>Shutdown, then boot from the same config. Running or Paused → Running.</summary>
    public void Reboot()
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_state is not (VmState.Running or VmState.Paused))
                throw new VmStateException($"the VM is {_state}: vm.reboot needs it Running or Paused");
            Emit("vm", "rebooting");
            StopLocked("vm.reboot", endRun: false);
            BootLocked("booting", "rebooted");
        }
    }

    /// <summary>Presses the ACPI power button; an ACPI guest then powers off by itself (→ Shutdown).</summary>
    public void PowerButton()
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_state != VmState.Running)
                throw new VmStateException($"the VM is {_state}: vm.power-button needs it Running");
            _vm!.PressPowerButton();
        }
    }

    /// <summary>Hot-adds a device (vm.add-*): only while Running, since the guest must run to take it (acpiphp on the GED
    /// interrupt), and a device added while paused would run while the others are stopped.</summary>
    public PciDeviceInfo AddDevice(IPciDeviceConfig config, string endpoint = "vm.add-device")
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_state != VmState.Running)
                throw new VmStateException($"the VM is {_state}: {endpoint} needs it Running");
            return _vm!.AddDevice(config);
        }
    }

    /// <summary>vm.remove-device: asks the guest to eject device <paramref name="id"/> and waits (outside the state lock,
    /// so info and pause answer meanwhile) until it did and the device's resources are released. Only while Running.
    /// A guest that does not eject within <paramref name="timeout"/> is a <see cref="TimeoutException"/> (the request
    /// stays: a late eject still removes the device).</summary>
    public void RemoveDevice(string id, TimeSpan timeout)
    {
        Task ejected;
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_state != VmState.Running)
                throw new VmStateException($"the VM is {_state}: vm.remove-device needs it Running");
            ejected = _vm!.RequestDeviceRemoval(id);
        }
        try
        {
            if (!ejected.Wait(timeout))
                throw new TimeoutException($"the guest did not eject device {id} within {timeout.TotalSeconds:0.#} s " +
                    "(it must run an ACPI PCI hotplug driver, such as Linux's acpiphp, and let go of the device)");
        }
        catch (AggregateException e) when (e.InnerException is InvalidOperationException inner)
        {
            throw new VmStateException(inner.Message);
        }
    }

    /// <summary>Stops the VM if it runs (vm.delete, vmm.shutdown, a signal): never throws for the state.</summary>
    public void StopIfRunning(string why)
    {
        lock (_lock)
        {
            if (_state is VmState.Running or VmState.Paused)
            {
                StopLocked(why);
                Emit("vm", "shutdown");
            }
        }
    }

    /// <summary>Stops and releases the machine. With <paramref name="endRun"/> the run's outcome is published.</summary>
    private void StopLocked(string why, bool endRun = true)
    {
        var vm = _vm!;
        _vm = null;
        vm.Stop($"stopped by {why}");
        vm.Dispose(); // vCPUs joined, devices closed, DMA unmapped, memory released
        LastStats = vm.DescribeStats();
        var outcome = vm.Ended.Result;
        _lastOutcome = outcome;
        _state = VmState.Shutdown;
        if (endRun)
            _ended.TrySetResult(outcome);
    }

    /// <summary>The guest (or a vCPU error) ended a run: release it; a reset reboots it when so configured.</summary>
    private void OnGuestEnded(VirtualMachine vm, VmOutcome outcome)
    {
        // Runs off the vCPU thread (Ended continues asynchronously): releasing joins the vCPU threads.
        {
            lock (_lock)
            {
                if (!ReferenceEquals(_vm, vm))
                    return; // the host stopped it (vm.shutdown, reboot) and has handled it
                _vm = null;
                vm.Dispose();
                LastStats = vm.DescribeStats();
                _lastOutcome = outcome;
                _state = VmState.Shutdown;
                _log.Info(outcome.Message);
                if (outcome.Kind == VmExitKind.Reset && OnReset == ResetAction.Reboot && !_disposed)
                {
                    try
                    {
                        Emit("vm", "rebooting", new Dictionary<string, string> { ["reason"] = outcome.Message });
                        BootLocked("booting", "rebooted");
                        return;
                    }
                    catch (Exception e)
                    {
                        _log.Error($"reboot after a guest reset failed: {e.Message}");
                        _lastOutcome = new VmOutcome(VmExitKind.VmmError, $"reboot after a guest reset failed: {e.Message}");
                    }
                }
                Emit("vm", "shutdown", new Dictionary<string, string> { ["reason"] = DescribeEnd(outcome) });
                _ended.TrySetResult(_lastOutcome!);
            }
        }
    }

    private static string DescribeEnd(VmOutcome o) => o.Kind switch
    {
        VmExitKind.PowerOff => "guest-poweroff",
        VmExitKind.Reset => "guest-reset",
        VmExitKind.DebugExit => "guest-debug-exit",
        VmExitKind.GuestCrash => "guest-crash",
        VmExitKind.Halted => "guest-halted",
        VmExitKind.VmmError => "vmm-error",
        _ => "stopped",
    };

    private void Emit(string source, string name, IReadOnlyDictionary<string, string>? properties = null)
    {
        try
        {
            _events?.Emit(source, name, properties);
        }
        catch (Exception e)
        {
            _log.Warn($"event monitor: {e.Message}");
        }
    }

    private void ThrowIfDisposed()
    {
        if (_disposed)
            throw new VmStateException("the VM was deleted");
    }

    private static TaskCompletionSource<VmOutcome> NewEnded() => new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>vm.delete: stops the VM if it runs and releases it for good.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
                return;
            if (_state is VmState.Running or VmState.Paused)
            {
                StopLocked("vm.delete");
                Emit("vm", "shutdown");
            }
            _disposed = true;
        }
    }
}
