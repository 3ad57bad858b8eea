namespace Vmm.Devices;

/// <summary>A device on the port-I/O or MMIO bus. <paramref name="offset"/> is relative to the start of the
/// range the device was registered at; <c>data.Length</c> is the access width (1, 2, 4 or 8 bytes). Both
/// calls run on vCPU threads, so they must not block for long and must not allocate. A device never
/// throws at the guest: misbehaviour is logged or turned into device state.</summary>
public interface IBusDevice
{
    void Read(ulong offset, Span<byte> data);

    void Write(ulong offset, ReadOnlySpan<byte> data);
}

/// <summary>An interrupt input a device drives (an ISA IRQ pin on the in-kernel PIC/IOAPIC). The level is
/// the device's "interrupt pending" state; edge-triggered inputs see its rising edges.</summary>
public interface IInterruptLine
{
    void SetLevel(bool asserted);
}

/// <summary>What a device may ask of the machine that owns it.</summary>
public interface IVmControl
{
    /// <summary>End the VM with a guest-requested exit status (isa-debug-exit).</summary>
    void RequestDebugExit(uint value);

    /// <summary>The guest asked for a reset (i8042 pulse, reset register).</summary>
    void RequestReset(string source);

    /// <summary>The guest asked to power off.</summary>
    void RequestPowerOff(string source);
}

/// <summary>A device that counts what it did (vm.counters): counter name → value, in Cloud Hypervisor's names.</summary>
public interface IDeviceCounters
{
    IReadOnlyList<KeyValuePair<string, ulong>> Counters();
}
