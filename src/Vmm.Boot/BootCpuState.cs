namespace Vmm.Boot;

/// <summary>A segment register as the CPU caches it (base, limit, attributes), independent of KVM's types.</summary>
public readonly record struct X86Segment(ulong Base, uint Limit, ushort Selector, byte Type, bool CodeOrData,
    byte Dpl, bool Present, bool DefaultBig, bool LongMode, bool Granularity)
{
    /// <summary>Flat 4 GiB 32-bit code, execute/read, accessed.</summary>
    public static X86Segment FlatCode32(ushort selector) => new(0, 0xFFFFFFFF, selector, 0xB, true, 0, true, true, false, true);

    /// <summary>64-bit code, execute/read, accessed.</summary>
    public static X86Segment Code64(ushort selector) => new(0, 0xFFFFFFFF, selector, 0xB, true, 0, true, false, true, true);

    /// <summary>Flat 4 GiB data, read/write, accessed.</summary>
    public static X86Segment FlatData(ushort selector) => new(0, 0xFFFFFFFF, selector, 0x3, true, 0, true, true, false, true);

    /// <summary>The 8-byte GDT descriptor for this segment.</summary>
    public ulong ToDescriptor()
    {
        uint limit = Granularity ? Limit >> 12 : Limit;
        ulong d = limit & 0xFFFFUL;
        d |= (Base & 0xFFFFFFUL) << 16;
        d |= (ulong)(Type & 0xF) << 40;
        d |= (CodeOrData ? 1UL : 0) << 44;
        d |= (ulong)(Dpl & 3) << 45;
        d |= (Present ? 1UL : 0) << 47;
        d |= (ulong)((limit >> 16) & 0xF) << 48;
        d |= (LongMode ? 1UL : 0) << 53;
        d |= (DefaultBig ? 1UL : 0) << 54;
        d |= (Granularity ? 1UL : 0) << 55;
        d |= ((Base >> 24) & 0xFF) << 56;
        return d;
    }
}

public enum CpuMode
{
    /// <summary>32-bit protected mode, paging off (the multiboot entry state).</summary>
    Protected32,

    /// <summary>64-bit long mode on identity-mapped page tables.</summary>
    Long64,
}

/// <summary>The register state the boot CPU starts in, as a loader defines it.</summary>
public sealed record BootCpuState
{
    public required CpuMode Mode { get; init; }
    public required ulong Rip { get; init; }
    public ulong Rsp { get; init; }
    public ulong Rax { get; init; }
    public ulong Rbx { get; init; }
    public ulong Rsi { get; init; }
    public ulong Rdi { get; init; }
    /// <summary>Bit 1 is reserved and always set; interrupts start disabled.</summary>
    public ulong Rflags { get; init; } = 0x2;
    public required X86Segment Code { get; init; }
    public required X86Segment Data { get; init; }
    public required ulong GdtBase { get; init; }
    public required ushort GdtLimit { get; init; }
    public ulong Cr0 { get; init; }
    public ulong Cr3 { get; init; }
    public ulong Cr4 { get; init; }
    public ulong Efer { get; init; }
}
