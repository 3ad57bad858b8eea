using Vmm.Interop;

namespace Vmm.Machine;

/// <summary>Per-vCPU CPUID from what KVM supports: the vCPU's APIC id and the topology (one package of
/// <c>count</c> single-threaded cores) in leaves 1, 4, 0xB and 0x1F, and the hypervisor bit. KVM's own
/// leaves (0x40000000: signature, kvmclock and other PV features) pass through as KVM offers them.</summary>
public static class CpuidTemplate
{
    /// <param name="physicalAddressBits">The guest-physical address width the machine needs (its highest MMIO
    /// window); CPUID 0x80000008 EAX[7:0] is raised to it when KVM offers less, so guests address large GPU BARs
    /// placed high (0 leaves the leaf as KVM reports it). The caller checks KVM can map that many bits.</param>
    public static kvm_cpuid_entry2[] ForVcpu(kvm_cpuid_entry2[] supported, int id, int count, int physicalAddressBits = 0)
    {
        var entries = (kvm_cpuid_entry2[])supported.Clone();
        uint coreBits = (uint)Math.Ceiling(Math.Log2(Math.Max(count, 1)));
        for (int i = 0; i < entries.Length; i++)
        {
            ref var e = ref entries[i];
            switch (e.function)
            {
                case 1:
                    // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                    e.ebx = (e.ebx & 0x0000FFFF) | ((uint)id << 24) | ((uint)Math.Min(count, 255) << 16);
                    e.ecx |= 1u << 31; // hypervisor present
                    if (count > 1)
                        e.edx |= 1u << 28; // HTT: the EBX[23:16] count is valid
                    break;
                case 4:
                    // Deterministic cache parameters: EAX[31:26] = cores per package - 1; each cache is per core.
                    if ((e.eax & 0x1F) != 0)
                        e.eax = (e.eax & 0x0000_3FFF) | ((uint)(Math.Min(count, 64) - 1) << 26);
                    break;
                case 0xB:
                case 0x1F:
                    // Extended topology: level 0 SMT (1 thread), level 1 core (count cores), then invalid.
                    e.edx = (uint)id; // x2APIC id
                    switch (e.index)
                    {
                        case 0: e.eax = 0; e.ebx = 1; e.ecx = 0 | (1 << 8); break;
                        case 1: e.eax = coreBits; e.ebx = (uint)count; e.ecx = 1 | (2 << 8); break;
                        default: e.eax = 0; e.ebx = 0; e.ecx = e.index; break;
                    }
                    break;
                case 0x8000_0008:
                    if ((e.eax & 0xFF) < physicalAddressBits)
                        e.eax = (e.eax & ~0xFFu) | (uint)physicalAddressBits;
                    break;
            }
        }
        return entries;
    }
}
