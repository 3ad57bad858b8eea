using Vmm.Interop;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Abi;

/// <summary>Checks the C# declarations of the VFIO and iommufd uapi (src/Vmm.Interop/Vfio.cs) and the KVM device
/// API (checked with the rest of kvm.h by <see cref="KvmAbiTests"/>, asserted present here) with compiled C probes.
/// <list type="bullet">
/// <item>classic VFIO structs and constants: the installed &lt;linux/vfio.h&gt; (6.1 headers);</item>
/// <item>the device-cdev ioctls (bind/attach, Linux 6.6+): uapi/linux/vfio_device_cdev.h, a verbatim excerpt of a
/// current vfio.h that includes the installed one for the rest;</item>
/// <item>iommufd: uapi/linux/iommufd.h, vendored from Linux 6.7 (the installed headers have none).</item>
/// </list></summary>
public sealed class VfioAbiTests
{
    private static string VendoredUapi => Repo.PathTo("tests", "Vmm.Tests", "Abi", "uapi");

    private static readonly Type[] ClassicVfioStructs =
    [
        typeof(vfio_info_cap_header), typeof(vfio_group_status), typeof(vfio_device_info), typeof(vfio_region_info),
        typeof(vfio_region_sparse_mmap_area), typeof(vfio_region_info_cap_sparse_mmap), typeof(vfio_irq_info),
        typeof(vfio_irq_set), typeof(vfio_iommu_type1_info), typeof(vfio_iommu_type1_dma_map),
        typeof(vfio_iommu_type1_dma_unmap),
    ];

    private static readonly Type[] CdevStructs = [typeof(vfio_device_bind_iommufd), typeof(vfio_device_attach_iommufd_pt)];

    private static readonly Type[] IommufdStructs =
    [
        typeof(iommu_destroy), typeof(iommu_ioas_alloc), typeof(iommu_iova_range), typeof(iommu_ioas_iova_ranges),
        typeof(iommu_ioas_map), typeof(iommu_ioas_unmap),
    ];

    [Fact]
    public void Every_vfio_and_iommu_struct_in_the_interop_layer_is_checked_here()
    {
        var declared = typeof(VfioConstants).Assembly.GetTypes()
            // Nested VfioUser.vfio_user_* structs exist only in the vfio-user spec: VfioUserAbiTests checks their sizes.
            .Where(t => t.IsValueType && !t.IsEnum && !t.IsNested && t.Namespace == typeof(VfioConstants).Namespace
                        && (t.Name.StartsWith("vfio_", StringComparison.Ordinal) || t.Name.StartsWith("iommu_", StringComparison.Ordinal)))
            .Select(t => t.Name).Order(StringComparer.Ordinal).ToList();
        var checkedHere = ClassicVfioStructs.Concat(CdevStructs).Concat(IommufdStructs).Select(t => t.Name).Order(StringComparer.Ordinal).ToList();

        Assert.Equal(declared, checkedHere);
    }

    [Fact]
    public void Classic_vfio_structs_match_the_installed_linux_vfio_h()
    {
        var mismatches = AbiProbe.CompareStructs(ClassicVfioStructs.Select(t => new StructSpec(t, t.Name)).ToList(), "linux/vfio.h");

        Assert.True(mismatches.Count == 0, "mismatches with <linux/vfio.h>:\n  " + string.Join("\n  ", mismatches));
    }

    [Fact]
    public void Vfio_cdev_structs_match_the_vendored_current_vfio_h_excerpt()
    {
        var mismatches = AbiProbe.CompareStructs(CdevStructs.Select(t => new StructSpec(t, t.Name)).ToList(),
            "linux/vfio_device_cdev.h", VendoredUapi);

        Assert.True(mismatches.Count == 0, "mismatches with the vendored vfio.h excerpt:\n  " + string.Join("\n  ", mismatches));
    }

    [Fact]
    public void Every_VfioConstants_value_equals_its_header_macro()
    {
        // The excerpt includes the installed <linux/vfio.h> first, so this checks the classic and the cdev constants.
        var mismatches = AbiProbe.CompareConstants(typeof(VfioConstants), "linux/vfio_device_cdev.h", VendoredUapi);

        Assert.True(mismatches.Count == 0, "mismatches with <linux/vfio.h> + the cdev excerpt:\n  " + string.Join("\n  ", mismatches));
    }

    [Fact]
    public void Iommufd_structs_match_the_vendored_linux_iommufd_h()
    {
        var mismatches = AbiProbe.CompareStructs(IommufdStructs.Select(t => new StructSpec(t, t.Name)).ToList(),
            "linux/iommufd.h", VendoredUapi);

        Assert.True(mismatches.Count == 0, "mismatches with the vendored <linux/iommufd.h>:\n  " + string.Join("\n  ", mismatches));
    }

    [Fact]
    public void Every_IommufdConstants_value_equals_its_header_macro_or_enumerator()
    {
        var enumerators = new HashSet<string>(StringComparer.Ordinal)
        {
            nameof(IommufdConstants.IOMMU_IOAS_MAP_FIXED_IOVA), nameof(IommufdConstants.IOMMU_IOAS_MAP_WRITEABLE),
            nameof(IommufdConstants.IOMMU_IOAS_MAP_READABLE),
        };

        var mismatches = AbiProbe.CompareConstants(typeof(IommufdConstants), "linux/iommufd.h", VendoredUapi, enumerators);

        Assert.True(mismatches.Count == 0, "mismatches with the vendored <linux/iommufd.h>:\n  " + string.Join("\n  ", mismatches));
    }

    [Fact]
    public void The_vendored_iommufd_header_keeps_its_license_line_and_is_found_first()
    {
        string text = File.ReadAllText(Path.Combine(VendoredUapi, "linux", "iommufd.h"));
        Assert.StartsWith("/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */", text, StringComparison.Ordinal);
        // A wrong value proves the probe really compiled against the vendored header (no such header is installed).
        var mismatches = AbiProbe.CompareConstants(typeof(WrongIommufd), "linux/iommufd.h", VendoredUapi);
        Assert.Equal(["IOMMU_IOAS_MAP: C 0x3B85, C# 0x3B86"], mismatches);
    }

    private static class WrongIommufd
    {
        public const uint IOMMU_IOAS_MAP = 0x3B86; // really 0x3B85
    }

    [Fact]
    public void The_kvm_vfio_device_api_is_declared_where_KvmAbiTests_checks_it()
    {
        // KvmAbiTests compares every kvm_* struct and KvmConstants value with <linux/kvm.h>; this pins that the VFIO
        // device API is among them with the values the uapi documents.
        Assert.Equal(4u, KvmConstants.KVM_DEV_TYPE_VFIO);
        Assert.Equal(1u, KvmConstants.KVM_DEV_VFIO_GROUP);
        Assert.Equal(1ul, KvmConstants.KVM_DEV_VFIO_GROUP_ADD);
        Assert.Equal(2ul, KvmConstants.KVM_DEV_VFIO_GROUP_DEL);
        var mismatches = AbiProbe.CompareStructs([new StructSpec(typeof(kvm_create_device), "kvm_create_device"),
            new StructSpec(typeof(kvm_device_attr), "kvm_device_attr")]);
        Assert.Empty(mismatches);
    }
}
