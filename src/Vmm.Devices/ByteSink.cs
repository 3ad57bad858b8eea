namespace Vmm.Devices;

/// <summary>Where a character device's output goes. <see cref="TryWrite(byte)"/> never blocks: when the sink is
/// full it returns false and later calls the space-available callbacks, so the device can hold the byte and
/// apply back-pressure to the guest (a UART keeps THR busy) instead of stalling a vCPU thread.
/// Several devices may share one sink (the UART and a virtio console on the same terminal).</summary>
public interface IByteSink
{
    /// <summary>Queues one byte; false when full. Called on vCPU threads: must not block or allocate.</summary>
    bool TryWrite(byte value);

    /// <summary>Queues as much of <paramref name="data"/> as fits and returns how many bytes that was (0 when
    /// full: the space-available callbacks run later). Must not block or allocate.</summary>
    int TryWrite(ReadOnlySpan<byte> data)
    {
        int n = 0;
        while (n < data.Length && TryWrite(data[n]))
            n++;
        return n;
    }

    /// <summary>Registers a callback run (on the sink's own thread) after a full sink made room. Every registered
    /// writer is called each time, so a writer that was refused must retry and may be refused again.</summary>
    void AddSpaceAvailableCallback(Action callback);
}

/// <summary>A device that takes console input (keyboard bytes from the host terminal).</summary>
public interface IConsoleInput
{
    /// <summary>Queues received bytes; returns how many were taken. The caller offers the rest again later
    /// (flow control instead of overrun). Called on the console's input thread.</summary>
    int EnqueueInput(ReadOnlySpan<byte> data);
}
