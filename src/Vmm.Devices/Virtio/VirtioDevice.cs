using Vmm.Interop;
using Vmm.Interop.Seccomp;
using Vmm.Memory;

namespace Vmm.Devices.Virtio;

/// <summary>Virtio device types (virtio 1.2 §5); the PCI device ID is 0x1040 + type.</summary>
public enum VirtioDeviceType : ushort
{
    Net = 1,
    Block = 2,
    Console = 3,
    Entropy = 4,
    Fs = 26,
    Vsock = 19,
}

/// <summary>Feature bits and status values shared by every virtio device.</summary>
public static class VirtioFeatures
{
    public const int RingIndirectDesc = 28;
    public const int RingEventIdx = 29;
    public const int Version1 = 32;

    public const ulong TransportFeatures = (1UL << RingIndirectDesc) | (1UL << RingEventIdx) | (1UL << Version1);

    public const byte StatusAcknowledge = 1, StatusDriver = 2, StatusDriverOk = 4, StatusFeaturesOk = 8,
        StatusNeedsReset = 64, StatusFailed = 128;

    public static bool Has(ulong features, int bit) => (features & (1UL << bit)) != 0;
}

/// <summary>A virtio device model (the part behind the transport): its features, configuration space and the
/// request processing on its queues. It processes requests on its own thread(s), never on a vCPU thread.</summary>
public abstract class VirtioDevice : IDisposable
{
    public abstract VirtioDeviceType Type { get; }

    /// <summary>For logs: "virtio-blk (disk.img)".</summary>
    public abstract string Name { get; }

    /// <summary>PCI class, subclass of the function.</summary>
    public abstract (byte Class, byte SubClass) PciClass { get; }

    /// <summary>Device-specific feature bits offered (the transport adds VERSION_1, INDIRECT_DESC, EVENT_IDX).</summary>
    public abstract ulong DeviceFeatures { get; }

    /// <summary>Everything the transport offers the driver: the device's bits plus the transport's. A device whose
    /// rings another process serves (vhost-user) offers only the transport bits that process supports.</summary>
    public virtual ulong OfferedFeatures => DeviceFeatures | VirtioFeatures.TransportFeatures;

    /// <summary>True when something outside this process signals the queues' MSI-X eventfds (a vhost-user back-end
    /// writes the irqfds itself): the transport then keeps every vector's route current and detaches masked
    /// vectors' eventfds, as for a passed-through device, so such signals are never lost or delivered masked.</summary>
    public virtual bool SignalsVectorsDirectly => false;

    public abstract int QueueCount { get; }

    public virtual ushort MaxQueueSize => 256;

    /// <summary>Bytes of device-specific configuration space.</summary>
    public abstract int ConfigSize { get; }

    /// <summary>Reads device configuration (offset + length within <see cref="ConfigSize"/>; the transport checks).</summary>
    public abstract void ReadConfig(int offset, Span<byte> data);

    public virtual void WriteConfig(int offset, ReadOnlySpan<byte> data) { }

    /// <summary>The driver set DRIVER_OK: start serving <paramref name="context"/>'s queues.</summary>
    public abstract void Activate(VirtioContext context);

    /// <summary>The driver reset the device: stop serving, drop in-flight state. Returns when no thread of the
    /// device touches guest memory any more.</summary>
    public abstract void Deactivate();

    public virtual void Dispose() => GC.SuppressFinalize(this);

    /// <summary>The thread serving the queues while the device is active (set by <see cref="Activate"/>).</summary>
    protected VirtioWorker? Worker { get; set; }

    /// <summary>What stopped the active worker, if a device callback threw (a VMM bug: the guest's requests go
    /// unanswered). The fuzz targets check it after every input.</summary>
    public Exception? WorkerFault => Worker?.Fault;

    /// <summary>Stops taking new requests (vm.pause): the request being served completes, notifications wait in
    /// their eventfds. Throws <see cref="TimeoutException"/> if the worker does not stop within
    /// <paramref name="timeout"/> (a request stuck in the host kernel).</summary>
    public void Pause(TimeSpan timeout) => Worker?.Pause(timeout);

    /// <summary>Serves again whatever arrived while paused.</summary>
    public void Resume() => Worker?.Resume();
}

/// <summary>What an active device gets from its transport: guest memory, the negotiated features, the queues,
/// their kick eventfds, and the ways to interrupt the driver.</summary>
public sealed class VirtioContext(GuestMemory memory, ulong features, SplitQueue[] queues, EventFd[] kicks, IVirtioInterrupts interrupts)
{
    public GuestMemory Memory { get; } = memory;
    public ulong Features { get; } = features;
    public IReadOnlyList<SplitQueue> Queues { get; } = queues;

    /// <summary>Signalled (through KVM ioeventfds, or by the transport) when the driver notifies queue i.</summary>
    public IReadOnlyList<EventFd> Kicks { get; } = kicks;

    public bool Negotiated(int bit) => VirtioFeatures.Has(Features, bit);

    /// <summary>The eventfd that is queue <paramref name="queue"/>'s interrupt in the kernel (its MSI-X vector's
    /// irqfd), or null when there is none (INTx, no vector, or a transport without irqfds).</summary>
    public EventFd? QueueIrqFd(int queue) => interrupts.QueueIrqFd(Queues[queue]);

    /// <summary>Interrupts the driver for queue <paramref name="queue"/> unconditionally: for rings another process
    /// serves, which already decided (EVENT_IDX, NO_INTERRUPT) that the driver wants one.</summary>
    public void RaiseQueueInterrupt(int queue) => interrupts.QueueInterrupt(Queues[queue]);

    /// <summary>Interrupts the driver for queue <paramref name="queue"/> if it asked for one.</summary>
    public void NotifyUsed(int queue)
    {
        if (Queues[queue].ShouldInterrupt())
            interrupts.QueueInterrupt(Queues[queue]);
    }

    /// <summary>Serves queue <paramref name="queue"/> until it is empty: each valid chain goes to
    /// <paramref name="handle"/>, which returns the bytes it wrote into device-writable buffers; a bad chain is
    /// returned with 0 bytes untouched; a corrupt ring asks for a reset. Then interrupts the driver if it wants.
    /// For devices that complete every request at once (block, entropy).</summary>
    public void ServeQueue(int queue, ChainHandler handle)
    {
        var q = Queues[queue];
        while (true)
        {
            var result = q.Pop(out var chain);
            if (result == PopResult.Empty)
                break;
            if (result == PopResult.Broken)
            {
                // The queue disabled itself: later kicks find it empty until the driver resets the device.
                NeedsReset(q.LastError);
                break;
            }
            uint used = result == PopResult.Chain ? handle(Memory, chain) : 0;
            q.Complete(chain.Head, used);
        }
        NotifyUsed(queue);
    }

    /// <summary>The device configuration changed (e.g. link status).</summary>
    public void NotifyConfigChange() => interrupts.ConfigInterrupt();

    /// <summary>Something the driver did makes the device unusable until reset (DEVICE_NEEDS_RESET).</summary>
    public void NeedsReset(string why) => interrupts.NeedsReset(why);

    /// <summary>The next chain of queue <paramref name="queue"/>, for a device's own serving loop: false when the queue
    /// is empty or stopped, or broken — then <paramref name="stopped"/> is set and the driver is asked to reset, the
    /// reason naming <paramref name="what"/> (e.g. "virtio-net transmit queue"); later kicks find it stopped until the
    /// reset. A malformed chain comes back as <see cref="PopResult.BadChain"/>, to be completed with 0 bytes.</summary>
    public bool TryPop(int queue, ref bool stopped, string what, out PopResult result, out DescriptorChain chain)
    {
        chain = default;
        result = PopResult.Empty;
        if (stopped)
            return false;
        var q = Queues[queue];
        result = q.Pop(out chain);
        if (result == PopResult.Broken)
        {
            stopped = true;
            NeedsReset(what + ": " + q.LastError);
            return false;
        }
        return result != PopResult.Empty;
    }
}

/// <summary>Serves one request of a queue; returns the bytes written into its device-writable buffers.</summary>
public delegate uint ChainHandler(GuestMemory memory, DescriptorChain chain);

/// <summary>How a device reaches its driver; implemented by the transport.</summary>
public interface IVirtioInterrupts
{
    void QueueInterrupt(SplitQueue queue);
    void ConfigInterrupt();
    void NeedsReset(string why);

    /// <summary>The irqfd behind <paramref name="queue"/>'s interrupt, if signalling it is the interrupt.</summary>
    EventFd? QueueIrqFd(SplitQueue queue) => null;
}

/// <summary>A device thread: waits on the queues' kick eventfds (and any extra fds, e.g. a tap), and calls the
/// device for each. Stopped and joined by <see cref="Dispose"/>.</summary>
public sealed class VirtioWorker : IDisposable
{
    private readonly EventFd _stop = new();
    private readonly EventFd _wake = new();
    private readonly object _pauseLock = new();
    private bool _pauseRequested, _parked;
    private readonly IReadOnlyList<EventFd> _kicks;
    private readonly int[] _extraFds;
    private readonly Action<int> _onQueue;
    private readonly Action<int>? _onFd;
    private readonly Thread _thread;
    private readonly Func<int>? _timeoutMs;
    private readonly Func<int, bool>? _pollExtraFd;

    /// <summary>Calls <paramref name="onQueue"/>(i) when kick i fires (and once for every queue at start),
    /// <paramref name="onFd"/>(j) when extra fd j is readable. With <paramref name="pollExtraFd"/>, extra fd j is
    /// polled only while it returns true (asked before every wait): e.g. a tap is not read while the guest has
    /// posted no receive buffers, and a level-triggered readable fd must not make the loop spin.</summary>
    public VirtioWorker(string name, IReadOnlyList<EventFd> kicks, Action<int> onQueue, int[]? extraFds = null,
        Action<int>? onFd = null, Func<int>? timeoutMs = null, Func<int, bool>? pollExtraFd = null)
    {
        _kicks = kicks;
        _extraFds = extraFds ?? [];
        _onQueue = onQueue;
        _onFd = onFd;
        _timeoutMs = timeoutMs;
        _pollExtraFd = pollExtraFd;
        _thread = new Thread(Loop) { Name = name, IsBackground = true };
        SeccompThreads.Start(_thread);
    }

    private long _allocatedBytes;

    /// <summary>Managed bytes this worker thread allocated in its callbacks since it started (the steady state
    /// should add nothing; tests check that).</summary>
    public long AllocatedBytes => Volatile.Read(ref _allocatedBytes);

    /// <summary>Set when a device callback threw: the device stopped serving (a VMM bug; the VM goes on).</summary>
    public Exception? Fault { get; private set; }

    private void Loop()
    {
        Seccomp.Enter(SeccompRole.DeviceWorker); // before the first queue is read
        int n = _kicks.Count + _extraFds.Length + 2;
        var fds = new int[n];
        var ready = new bool[n];
        for (int i = 0; i < _kicks.Count; i++)
            fds[i] = _kicks[i].Fd;
        _extraFds.CopyTo(fds, _kicks.Count);
        fds[^2] = _wake.Fd;
        fds[^1] = _stop.Fd;
        long startBytes = GC.GetAllocatedBytesForCurrentThread();
        try
        {
            for (int i = 0; i < _kicks.Count; i++)
                _onQueue(i); // requests queued before activation
            while (true)
            {
                Volatile.Write(ref _allocatedBytes, GC.GetAllocatedBytesForCurrentThread() - startBytes);
                if (_pollExtraFd is not null)
                {
                    for (int j = 0; j < _extraFds.Length; j++)
                        fds[_kicks.Count + j] = _pollExtraFd(j) ? _extraFds[j] : -1; // poll(2) skips negative fds
                }
                EventFd.Poll(fds, ready, _timeoutMs?.Invoke() ?? -1);
                if (ready[^1])
                    return;
                if (ready[^2])
                {
                    _wake.TryRead(out _);
                    if (!ParkWhilePaused())
                        return;
                    continue; // poll again: what arrived while paused is still signalled
                }
                for (int i = 0; i < _kicks.Count; i++)
                {
                    if (ready[i] && _kicks[i].TryRead(out _))
                        _onQueue(i);
                }
                for (int j = 0; j < _extraFds.Length; j++)
                {
                    if (ready[_kicks.Count + j])
                        _onFd?.Invoke(j);
                }
            }
        }
        catch (Exception e)
        {
            Fault = e;
            Console.Error.WriteLine($"vmm: {_thread.Name} stopped: {e}");
        }
    }

    /// <summary>Between requests only: the loop parks at the top, so whatever it was serving has completed.</summary>
    public void Pause(TimeSpan timeout)
    {
        lock (_pauseLock)
        {
            _pauseRequested = true;
            _wake.Signal();
            if (Thread.CurrentThread == _thread)
                return;
            var deadline = DateTime.UtcNow + timeout;
            while (!_parked && _thread.IsAlive)
            {
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero || !Monitor.Wait(_pauseLock, left))
                {
                    if (_parked || !_thread.IsAlive)
                        break;
                    _pauseRequested = false;
                    throw new TimeoutException($"{_thread.Name} did not finish its request within {timeout.TotalSeconds:0.#} s");
                }
            }
        }
    }

    public void Resume()
    {
        lock (_pauseLock)
        {
            _pauseRequested = false;
            Monitor.PulseAll(_pauseLock);
        }
    }

    /// <summary>Worker side of <see cref="Pause"/>; false when the worker is being stopped.</summary>
    private bool ParkWhilePaused()
    {
        lock (_pauseLock)
        {
            while (_pauseRequested && !_stopping)
            {
                _parked = true;
                Monitor.PulseAll(_pauseLock);
                Monitor.Wait(_pauseLock);
            }
            _parked = false;
            return !_stopping;
        }
    }

    private bool _stopping;

    public void Dispose()
    {
        lock (_pauseLock)
        {
            _stopping = true;
            Monitor.PulseAll(_pauseLock);
        }
        _stop.Signal();
        if (Thread.CurrentThread != _thread)
            _thread.Join();
        _stop.Dispose();
        _wake.Dispose();
    }
}
