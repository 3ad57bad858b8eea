namespace Vmm.Memory;

/// <summary>The x86 guest-physical address map every loader and device agrees on.
/// RAM runs from 0 to the 32-bit MMIO hole; whatever does not fit below the hole continues at 4 GiB.</summary>
public static class MemoryLayout
{
    public const ulong KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB;

    /// <summary>Conventional memory ends here (the EBDA/VGA/BIOS area follows up to 1 MiB).</summary>
    public const ulong LowMemoryEnd = 640 * KiB;

    /// <summary>Where the extended memory a kernel is loaded into starts.</summary>
    public const ulong HighMemoryStart = 1 * MiB;

    /// <summary>Start of the 32-bit MMIO hole (PCI BARs, IOAPIC at 0xFEC00000, LAPIC at 0xFEE00000, ...).
    /// 3 GiB leaves a 1 GiB window for 32-bit BARs, as QEMU's q35 and Cloud Hypervisor do.</summary>
    public const ulong MmioHoleStart = 3 * GiB;

    public const ulong MmioHoleEnd = 4 * GiB;

    /// <summary>The page KVM_SET_IDENTITY_MAP_ADDR needs and, after it, the three pages of KVM_SET_TSS_ADDR
    /// (Intel real-mode emulation), just below the BIOS flash area at the top of the hole, where no device
    /// lives (QEMU uses the same addresses).</summary>
    public const ulong IdentityMapAddress = 0xFEFF_C000;
    public const ulong TssAddress = 0xFEFF_D000;

    /// <summary>The PCI host bridge's 32-bit memory window: BARs that must stay below 4 GiB.</summary>
    public const ulong PciMmio32Start = 0xC000_0000;
    public const ulong PciMmio32Size = 512 * MiB;

    /// <summary>PCIe enhanced configuration (ECAM/MMCONFIG) for segment 0: 1 MiB per bus, 4 KiB per function.
    /// vmm has one root bus, so only bus 0 is decoded (ACPI MCFG says buses 0-0); the rest of the 256 MiB
    /// area up to 0xF0000000 stays free for more buses.</summary>
    public const ulong PciEcamBase = 0xE000_0000;
    public const ulong PciEcamBusCount = 1;
    public const ulong PciEcamSize = PciEcamBusCount * MiB;

    /// <summary>Alignment of the 64-bit PCI window above RAM (large BARs are naturally aligned inside it).</summary>
    public const ulong Pci64Alignment = 1 * GiB;

    /// <summary>The default size of the 64-bit PCI window.</summary>
    public const ulong Pci64DefaultSize = 64 * GiB;

    /// <summary>The 64-bit PCI memory window: above both RAM and the 4 GiB line, 1 GiB aligned.</summary>
    public static (ulong Start, ulong Size) Pci64Window(ulong ramSize, ulong size = Pci64DefaultSize) =>
        (Pci64WindowStart(ramSize), size);

    /// <summary>Where the 64-bit window starts: the first 1 GiB boundary above both RAM and 4 GiB.</summary>
    public static ulong Pci64WindowStart(ulong ramSize)
    {
        ulong top = MmioHoleEnd;
        foreach (var (start, length) in RamRanges(ramSize))
            top = Math.Max(top, start.Value + length);
        return (top + Pci64Alignment - 1) & ~(Pci64Alignment - 1);
    }

    /// <summary>The 64-bit window grown to hold <paramref name="barSizes"/> (powers of two) placed largest first, each
    /// naturally aligned, as <c>PciRootBus</c> places them: never smaller than <see cref="Pci64DefaultSize"/>, so
    /// guests keep room to move BARs, nor than <paramref name="minimumSize"/> (room kept for hot-added devices). Four 128 GiB GPU BARs above 128 MiB of RAM need [4 GiB, 640 GiB).
    /// Other VMMs use a fixed window here and the fourth large-BAR GPU does not fit.</summary>
    public static (ulong Start, ulong Size) Pci64Window(ulong ramSize, IEnumerable<ulong> barSizes, ulong minimumSize = Pci64DefaultSize)
    {
        ulong start = Pci64WindowStart(ramSize);
        ulong next = start;
        foreach (ulong size in barSizes.OrderByDescending(s => s))
        {
            if (size == 0 || (size & (size - 1)) != 0)
                throw new ArgumentException($"BAR size 0x{size:x} is not a power of two");
            ulong at = (next + size - 1) & ~(size - 1);
            if (at < next || at + size < at || at + size > MaxGuestPhysicalAddress)
                throw new ArgumentException($"BARs totalling more than the {PhysicalAddressBits(MaxGuestPhysicalAddress)}-bit guest physical address space");
            next = at + size;
        }
        ulong end = (next + Pci64Alignment - 1) & ~(Pci64Alignment - 1);
        return (start, Math.Max(Math.Max(Pci64DefaultSize, minimumSize), end - start));
    }

    /// <summary>The highest guest-physical address x86-64 can express (52 bits, the architectural MAXPHYADDR limit).</summary>
    public const ulong MaxGuestPhysicalAddress = 1UL << 52;

    /// <summary>The physical-address width (CPUID 0x80000008 EAX[7:0]) needed to address everything below
    /// <paramref name="end"/>.</summary>
    public static int PhysicalAddressBits(ulong end) => end <= 1 ? 1 : 64 - System.Numerics.BitOperations.LeadingZeroCount(end - 1);

    /// <summary>First IOAPIC input used for PCI INTx; 16-23 are free of ISA interrupts.</summary>
    public const uint PciIntxFirstGsi = 16;

    /// <summary>The IOAPIC input (GSI) of interrupt pin <paramref name="pin"/> (0 = INTA .. 3 = INTD) of the device in
    /// <paramref name="slot"/> of the root bus: the usual swizzle over four lines, GSIs 16-19, level-triggered
    /// and shared (the VMM ORs the devices on a line). The ACPI _PRT tells the guest the same; the guest programs the
    /// pins active-low as ACPI says for GSI entries, which KVM's IOAPIC does not model (a raised line is asserted).</summary>
    public static uint PciIntxGsi(int slot, int pin) => PciIntxFirstGsi + (uint)((slot + pin) & 3);

    /// <summary>The PCI hotplug register block (PCIU, PCID, B0EJ, PSEG: four 32-bit registers, as Cloud Hypervisor lays
    /// them out): in the hole, above the ECAM area's room for more buses and below the IOAPIC, where nothing decodes.</summary>
    public const ulong PciHotplugAddress = 0xFEB0_0000;
    public const ulong PciHotplugSize = 0x10;

    /// <summary>The IOAPIC input of the ACPI Generic Event Device (hotplug notifications): the first GSI above the
    /// four PCI INTx lines (16-19) and the ISA IRQs.</summary>
    public const uint GedGsi = 20;

    public const ulong IoApicAddress = 0xFEC0_0000;
    public const ulong LocalApicAddress = 0xFEE0_0000;

    /// <summary>The guest RAM ranges for <paramref name="ramSize"/> bytes of memory.</summary>
    public static IReadOnlyList<(GuestAddress Start, ulong Size)> RamRanges(ulong ramSize)
    {
        if (ramSize <= MmioHoleStart)
            return [(new GuestAddress(0), ramSize)];
        return [(new GuestAddress(0), MmioHoleStart), (new GuestAddress(MmioHoleEnd), ramSize - MmioHoleStart)];
    }
}
