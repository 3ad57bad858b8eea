using Vmm.Interop;
using Vmm.Machine;

namespace Vmm.Tests.Machine;

public class CpuidTemplateTests
{
    private static readonly kvm_cpuid_entry2[] s_supported =
    [
        new() { function = 1, ebx = 0x0000_0800, ecx = 0, edx = 0 },
        new() { function = 4, index = 0, eax = 0x0000_0121 },
        new() { function = 4, index = 3, eax = 0x0000_0000 },
        new() { function = 0xB, index = 0 },
        new() { function = 0xB, index = 1 },
        new() { function = 0xB, index = 2 },
        new() { function = 0x4000_0000, eax = 0x4000_0001, ebx = 0x4b4d564b },
        new() { function = 0x8000_0008, eax = 0x0030_3028 }, // 40 physical, 48 linear bits, GuestPhysBits 48
    ];

    [Fact]
    public void The_physical_address_width_is_raised_to_cover_the_PCI_window_but_never_lowered()
    {
        Assert.Equal(0x0030_302Bu, CpuidTemplate.ForVcpu(s_supported, 0, 1, physicalAddressBits: 43)[7].eax);
        Assert.Equal(0x0030_3028u, CpuidTemplate.ForVcpu(s_supported, 0, 1, physicalAddressBits: 36)[7].eax);
        Assert.Equal(0x0030_3028u, CpuidTemplate.ForVcpu(s_supported, 0, 1)[7].eax);
    }

    [Fact]
    public void Each_vCPU_reports_its_APIC_id_and_the_package_size()
    {
        var e = CpuidTemplate.ForVcpu(s_supported, 3, 4);
        Assert.Equal(3u, e[0].ebx >> 24);
        Assert.Equal(4u, (e[0].ebx >> 16) & 0xFF);
        Assert.Equal(0x0800u, e[0].ebx & 0xFFFF);      // CLFLUSH size etc. kept
        Assert.NotEqual(0u, e[0].ecx & (1u << 31));   // hypervisor bit
        Assert.NotEqual(0u, e[0].edx & (1u << 28));   // HTT
    }

    [Fact]
    public void Topology_leaves_describe_one_package_of_single_threaded_cores()
    {
        var e = CpuidTemplate.ForVcpu(s_supported, 2, 3);
        Assert.Equal(2u, e[1].eax >> 26);             // leaf 4: cores per package - 1
        Assert.Equal(0x121u, e[1].eax & 0x3FFF);
        Assert.Equal(0u, e[2].eax);                   // the null cache level stays null
        Assert.Equal((0u, 1u, 0x100u, 2u), (e[3].eax, e[3].ebx, e[3].ecx, e[3].edx)); // SMT level
        Assert.Equal((2u, 3u, 0x201u, 2u), (e[4].eax, e[4].ebx, e[4].ecx, e[4].edx)); // core level, 2 id bits
        Assert.Equal((0u, 0u, 2u), (e[5].eax, e[5].ebx, e[5].ecx));                   // end of levels
    }

    [Fact]
    public void KVM_leaves_pass_through_and_the_input_is_not_modified()
    {
        var e = CpuidTemplate.ForVcpu(s_supported, 1, 2);
        Assert.Equal(s_supported[6].ebx, e[6].ebx);
        Assert.Equal(0x0000_0800u, s_supported[0].ebx);
    }
}
