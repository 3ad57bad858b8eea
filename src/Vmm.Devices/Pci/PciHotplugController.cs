using System.Buffers.Binary;

namespace Vmm.Devices.Pci;

/// <summary>The ACPI PCI hotplug registers of the root bus, as the DSDT's PCST region describes them (Cloud
/// Hypervisor's layout, four 32-bit registers, one bit per slot): PCIU (0) the slots that came up and PCID (4) the
/// slots the host wants removed, each cleared by the read that returns it (PCNT reads each once per event); B0EJ (8)
/// where _EJ0 writes the bit of a slot the guest has let go of; PSEG (12) the segment PCNT works on, always 0 here.
/// Every change pulses the Generic Event Device's interrupt (edge-triggered in the DSDT), so the guest runs PCNT.</summary>
public sealed class PciHotplugController(IInterruptLine ged, Action<int> eject) : IBusDevice
{
    public const ulong PciUp = 0, PciDown = 4, Eject = 8, Segment = 12;

    private readonly Lock _lock = new();
    private uint _up, _down;

    /// <summary>A device was added in <paramref name="slot"/>: the guest is told to check it.</summary>
    public void SignalUp(int slot) => Signal(slot, up: true);

    /// <summary>The host wants the device in <paramref name="slot"/> gone: the guest is asked to eject it.</summary>
    public void SignalDown(int slot) => Signal(slot, up: false);

    private void Signal(int slot, bool up)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(slot, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(slot, PciRootBus.SlotCount - 1);
        uint bit = 1u << slot;
        lock (_lock)
        {
            // The newer request wins: an add that follows a removal request of the same slot is a new device.
            if (up)
            {
                _up |= bit;
                _down &= ~bit;
            }
            else
            {
                _down |= bit;
                _up &= ~bit;
            }
        }
        ged.SetLevel(true);
        ged.SetLevel(false);
    }

    public void Read(ulong offset, Span<byte> data)
    {
        uint value = 0;
        ulong register = offset & ~3UL;
        // Only a whole aligned register read consumes the bits (the DSDT's field is DWordAcc); a narrower one peeks.
        bool whole = data.Length == 4 && (offset & 3) == 0;
        lock (_lock)
        {
            switch (register)
            {
                case PciUp:
                    value = _up;
                    if (whole)
                        _up = 0;
                    break;
                case PciDown:
                    value = _down;
                    if (whole)
                        _down = 0;
                    break;
            }
        }
        Span<byte> bytes = stackalloc byte[8];
        bytes.Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(bytes, value);
        int shift = (int)(offset & 3);
        data.Clear();
        bytes.Slice(shift, Math.Min(data.Length, 8 - shift)).CopyTo(data);
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        if (offset != Eject || data.Length != 4)
            return; // PSEG: one segment; PCIU/PCID are read-only
        uint bits = BinaryPrimitives.ReadUInt32LittleEndian(data) & ~1u; // slot 0 is the host bridge
        for (int slot = 1; slot < PciRootBus.SlotCount; slot++)
        {
            if ((bits & (1u << slot)) != 0)
                eject(slot);
        }
    }
}
