using System.Buffers.Binary;
using Vmm.Devices.Pci;

namespace Vmm.Devices.Vfio;

/// <summary>One capability in a device's configuration space: <paramref name="Extended"/> ones live from 0x100 and
/// have a 16-bit ID and a version.</summary>
public readonly record struct PciCapabilityEntry(bool Extended, int Offset, ushort Id, byte Version = 0);

/// <summary>Walks the capability lists of a device's configuration space (a snapshot, so a device cannot change it
/// under the walk). Device contents are untrusted: a pointer outside its area, unaligned, or back to a capability
/// already seen ends the walk there, with a message naming the problem.</summary>
public static class PciCapabilityWalker
{
    /// <summary>Extended capability IDs (PCIe 6.0 §7.9).</summary>
    public const ushort ExtAer = 0x01, ExtAri = 0x0E, ExtAts = 0x0F, ExtSriov = 0x10, ExtMriov = 0x11,
        ExtResizableBar = 0x15, ExtVfResizableBar = 0x24;

    public const byte CapPowerManagement = 0x01;

    /// <summary>The legacy list from the pointer at 0x34 (only when the status register says there is one).</summary>
    public static List<PciCapabilityEntry> Legacy(ReadOnlySpan<byte> config, Action<string>? problem)
    {
        var list = new List<PciCapabilityEntry>();
        ushort status = BinaryPrimitives.ReadUInt16LittleEndian(config[PciConfigSpace.Status..]);
        if ((status & PciConfigSpace.StatusCapabilities) == 0)
            return list;
        var seen = new bool[PciConfigSpace.LegacySize];
        // A config region may be shorter than 256 bytes (a vfio-user server declares its size; 64 is the minimum
        // vmm takes): a capability must lie inside it. Found by the pci-vfio fuzz target.
        int end = Math.Min(config.Length, PciConfigSpace.LegacySize);
        int at = config[PciConfigSpace.CapabilitiesPointer];
        while (at != 0)
        {
            // The low two bits of a capability pointer are reserved (PCI 3.0 §6.7): a set one is a broken chain.
            if (at < 0x40 || at > end - 4 || (at & 3) != 0)
            {
                problem?.Invoke($"capability pointer 0x{at:x2} is outside 0x40-0x{end - 4:X2} or unaligned; the capability list ends before it");
                break;
            }
            if (seen[at])
            {
                problem?.Invoke($"capability list loops back to 0x{at:x2}; it ends there");
                break;
            }
            seen[at] = true;
            list.Add(new PciCapabilityEntry(false, at, config[at]));
            at = config[at + 1];
        }
        return list;
    }

    /// <summary>The extended list from 0x100 (only for a 4 KiB configuration space). A header of 0 or all-ones
    /// means none; a header with ID 0 is a placeholder whose next pointer still counts.</summary>
    public static List<PciCapabilityEntry> Extended(ReadOnlySpan<byte> config, Action<string>? problem)
    {
        var list = new List<PciCapabilityEntry>();
        if (config.Length < PciConfigSpace.Size)
            return list;
        var seen = new bool[(PciConfigSpace.Size - PciConfigSpace.LegacySize) / 4];
        int at = PciConfigSpace.LegacySize;
        while (at != 0)
        {
            if (at < PciConfigSpace.LegacySize || at > PciConfigSpace.Size - 4 || (at & 3) != 0)
            {
                problem?.Invoke($"extended capability pointer 0x{at:x3} is outside 0x100-0xFFC or unaligned; the list ends before it");
                break;
            }
            int slot = (at - PciConfigSpace.LegacySize) / 4;
            if (seen[slot])
            {
                problem?.Invoke($"extended capability list loops back to 0x{at:x3}; it ends there");
                break;
            }
            seen[slot] = true;
            uint header = BinaryPrimitives.ReadUInt32LittleEndian(config[at..]);
            if (header is 0 or 0xFFFF_FFFF)
                break;
            list.Add(new PciCapabilityEntry(true, at, (ushort)header, (byte)((header >> 16) & 0xF)));
            at = (int)(header >> 20);
        }
        return list;
    }
}
