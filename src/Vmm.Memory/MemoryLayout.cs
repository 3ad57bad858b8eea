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
