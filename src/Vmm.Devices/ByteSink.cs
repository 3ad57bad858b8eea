namespace Vmm.Devices;

/// <summary>Where a character device's output goes. <see cref="TryWrite"/> never blocks: when the sink is
/// full it returns false and later calls the space-available callback, so the device can hold the byte and
/// apply back-pressure to the guest (a UART keeps THR busy) instead of stalling a vCPU thread.</summary>
public interface IByteSink
{
    /// <summary>Queues one byte; false when full. Called on vCPU threads: must not block or allocate.</summary>
    bool TryWrite(byte value);

    /// <summary>Registers the callback run (on the sink's own thread) after a full sink made room.</summary>
    void SetSpaceAvailableCallback(Action callback);
}
