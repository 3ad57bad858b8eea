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
