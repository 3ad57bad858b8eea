using Vmm.Devices;

namespace Vmm.Tests.TestKit;

/// <summary>An interrupt line that remembers its level and every rising edge.</summary>
public sealed class RecordingInterruptLine : IInterruptLine
{
    public bool Level { get; private set; }
    public int RisingEdges { get; private set; }

    public void SetLevel(bool asserted)
    {
        if (asserted && !Level)
            RisingEdges++;
        Level = asserted;
    }
}

/// <summary>Records what devices ask of the machine.</summary>
public sealed class RecordingVmControl : IVmControl
{
    public List<string> Events { get; } = [];
    public uint? DebugExitValue { get; private set; }

    public void RequestDebugExit(uint value)
    {
        DebugExitValue = value;
        Events.Add($"debug-exit {value}");
    }

    public void RequestReset(string source) => Events.Add("reset: " + source);

    public void RequestPowerOff(string source) => Events.Add("poweroff: " + source);
}

/// <summary>A byte sink with a capacity: full means refused, as a console that fell behind.</summary>
public sealed class RecordingByteSink(int capacity = int.MaxValue) : Vmm.Devices.IByteSink
{
    private readonly List<Action> _spaceAvailable = [];
    private readonly object _lock = new();

    public List<byte> Bytes { get; } = [];
    public int Capacity { get; set; } = capacity;

    public bool TryWrite(byte value)
    {
        lock (_lock)
        {
            if (Bytes.Count >= Capacity)
                return false;
            Bytes.Add(value);
            return true;
        }
    }

    public void AddSpaceAvailableCallback(Action callback) => _spaceAvailable.Add(callback);

    /// <summary>Makes room for <paramref name="more"/> bytes and tells the devices.</summary>
    public void Drain(int more)
    {
        lock (_lock)
            Capacity = Bytes.Count + more;
        foreach (var callback in _spaceAvailable)
            callback();
    }

    public string Text
    {
        get
        {
            lock (_lock)
                return System.Text.Encoding.ASCII.GetString(Bytes.ToArray());
        }
    }
}
