using System.Buffers.Binary;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>Device passthrough on a real KVM: the vfio-user test GPU (tests/Vmm.TestGpu, its own process, a small
/// GPU per docs/test-gpu.md) attached with --device vfio-user=, driven by the GPU test guest
/// (guest-images/vfio-gpu-test) and by stock Linux with four GPUs of 128 GiB BARs.</summary>
[Collection("kvm")]
public class KvmVfioTests(KvmFixture kvm)
{
    private const ulong GiB = 1UL << 30;

    private Repo.Result R(string name) => kvm.Results[name];

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    /// <summary>The key=value report of test GPU server <paramref name="index"/> (printed after "@@REPORT index").</summary>
    private static Dictionary<string, string> Report(Repo.Result r, int index)
    {
        string marker = $"@@REPORT {index}\n";
        int at = r.Stdout.IndexOf(marker, StringComparison.Ordinal);
        Assert.True(at >= 0, "no server report\n" + Show(r));
        var report = new Dictionary<string, string>();
        foreach (string line in r.Stdout[(at + marker.Length)..].Split('\n'))
        {
            if (line.StartsWith("@@", StringComparison.Ordinal))
                break;
            int eq = line.IndexOf('=');
            if (eq > 0)
                report[line[..eq]] = line[(eq + 1)..].Trim();
        }
        return report;
    }

    private static void AssertGuestPassed(Repo.Result r, string interrupt)
    {
        Assert.True(r.ExitCode == 1, Show(r)); // debug-exit 0: every step passed
        foreach (string step in new[] { "find", "class", "bars", "enable", "paging", "regs", "sram", "bar2", interrupt,
                     "dma-fill", "dma-copy", "dma-from-bar2", "dma-to-bar2", "dma-errors", "interrupts", "all" })
            Assert.Contains($"vfio-gpu: {step} ok", r.Stdout);
        Assert.DoesNotContain("FAIL", r.Stdout);
        var report = Report(r, 1);
        // Seven DMA commands completed (nine with MSI-X: the msix-mask step's two FILLs) and six were refused
        // (unmapped IOVAs, bad lengths, bad command, bus master off).
        Assert.Equal((interrupt == "msix" ? "9" : "7", "6"), (report["dma_ops"], report["errors"]));
        // The guest's BAR2 writes (through KVM memory slots) and the DMA engine's COPY_TO_BAR2 landed in the server's
        // memfd, at the offsets the guest used: 8 GiB of BAR2, so the last block is 8 GiB - 64 in.
        Assert.Equal(VfioGpuTestGuest.Bar2Fnv(8 * GiB, (offset, length) => VfioGpuTestGuest.ExpectedBar2(8 * GiB, offset, length, fullFlow: true)),
            report["bar2_fnv"]);
    }

    [Fact]
    public void The_test_GPU_works_end_to_end_with_MSI_X()
    {
        var r = R("vfio-user-gpu");
        AssertGuestPassed(r, "msix");
        // vmm placed the 8 GiB BAR2 above RAM, naturally aligned, and mapped it (and BAR0's SRAM) as KVM memory slots.
        Assert.Contains("BAR2 0x200000000 (0x200000000)", r.Stderr);
        Assert.Contains("vfio-gpu: bar2 mem64 0x200000000 size 0x200000000 prefetchable", r.Stdout);
        Assert.Contains("BAR2+0x0: KVM slot", r.Stderr);
        Assert.Contains("DMA maps guest RAM 0x0+0x8000000 at the same IOVA", r.Stderr);
        // Masking a passed-through vector (its entry, then the whole function) holds the device's signal back as a
        // PBA bit, and unmasking delivers it exactly once: vmm's emulated table over KVM irqfds (MsixTable passthrough).
        Assert.Contains("vfio-gpu: msix-mask ok", r.Stdout);
        Assert.Contains("vfio-gpu: entry mask (entry 3 vector control bit 0): FILL done, IRQ_COUNT 6 -> 7, no interrupt in 20 ms, PBA 0x8", r.Stdout);
        Assert.Contains("vfio-gpu: function mask (control bit 14): unmasked, 1 interrupt on vector 0x63, PBA 0x0", r.Stdout);
        Assert.Contains("interrupts on vector 0x63: 9", r.Stdout);
    }

    [Fact]
    public void With_p2p_on_one_GPU_DMAs_from_and_to_the_other_GPUs_BAR_by_guest_physical_address()
    {
        var r = R("vfio-user-gpu-p2p");
        Assert.True(r.ExitCode == 1, Show(r));
        Assert.Contains("vfio-gpu: p2p ok", r.Stdout);
        Assert.Contains("vfio-gpu: all ok", r.Stdout);
        Assert.DoesNotContain("FAIL", r.Stdout);
        Assert.DoesNotContain("warning", r.Stderr); // teardown unmaps the peer BARs before any server disconnects
        var (gpu1, gpu2) = (Report(r, 1), Report(r, 2));
        // GPU1 ran the usual nine DMA commands plus the two peer copies; GPU2 only served its BAR2 as memory.
        Assert.Equal(("11", "6", "0"), (gpu1["dma_ops"], gpu1["errors"], gpu2["dma_ops"]));
        // GPU1's copy into GPU2's BAR2 (by IOVA = its guest address) is in GPU2's memfd, next to the guest's own writes.
        Assert.Equal(VfioGpuTestGuest.Bar2Fnv(8 * GiB, (offset, length) => VfioGpuTestGuest.ExpectedPeerBar2(8 * GiB, offset, length)),
            gpu2["bar2_fnv"]);
    }

    [Fact]
    public void The_test_GPU_works_with_MSI()
    {
        var r = R("vfio-user-gpu-msi");
        AssertGuestPassed(r, "msi");
        Assert.Contains("interrupts on vector 0x70: 7", r.Stdout);
    }

    [Fact]
    public void The_test_GPU_works_with_INTx_through_an_irqfd_and_resamplefd()
    {
        var r = R("vfio-user-gpu-intx");
        AssertGuestPassed(r, "intx");
        // Slot 1, INTA: IOAPIC input 17 as the _PRT swizzle says; every completion arrived (level re-armed at EOI).
        Assert.Contains("ioapic input 17", r.Stdout);
        Assert.Contains("interrupts on vector 0x71: 7", r.Stdout);
    }

    [Fact]
    public void Linux_finds_four_GPUs_with_128_GiB_BARs_in_the_grown_64_bit_window_and_reaches_the_last_byte_of_each()
    {
        var r = R("linux-4-gpus");
        Assert.True(r.ExitCode == 0, Show(r));
        string m = KvmFixture.GpuInitMarker;
        // The window vmm grew (and described in the DSDT _CRS) is the one Linux uses.
        Assert.Contains("64-bit PCI window grown to 0x100000000-0x9fffffffff", r.Stderr);
        Assert.Contains("root bus resource [mem 0x100000000-0x9fffffffff window]", r.Stdout);
        Assert.DoesNotContain("no space", r.Stdout);
        Assert.DoesNotContain("failed to assign", r.Stdout);
        for (int i = 1; i <= 4; i++)
        {
            // 128 GiB-aligned, one after the other from 128 GiB: the fourth ends at 640 GiB (40-bit addresses).
            ulong start = (ulong)i * 128 * GiB;
            string bar2 = $"0x{start:x16} 0x{start + 128 * GiB - 1:x16}";
            Assert.Contains($"{m} gpu 0000:00:0{i}.0 class 0x030200 bar0 ", r.Stdout);
            Assert.Contains($"bar2 {bar2} ", r.Stdout);
            Assert.Contains($"BAR 2 [mem 0x{start:x}-0x{start + 128 * GiB - 1:x} 64bit pref]", r.Stdout);
            Assert.Contains($"{m} gpu 0000:00:0{i}.0 bar2 first 0x600D0001 last 0x600D0002", r.Stdout);
            // ... and the two dwords Linux wrote through /dev/mem are in that server's memfd.
            Assert.Equal(VfioGpuTestGuest.Bar2FnvOfFirstAndLastDword(128 * GiB), Report(r, i)["bar2_fnv"]);
        }
        Assert.Contains($"{m} done", r.Stdout);
    }

    [Fact]
    public void A_missing_vfio_user_server_is_a_configuration_error_naming_the_socket()
    {
        var r = R("vfio-user-no-server");
        Assert.True(r.ExitCode == 2, Show(r));
        Assert.Contains("--device vfio-user=no-such.sock: no such socket (start the vfio-user server first)", r.Stderr);
    }

    [Fact]
    public void A_missing_host_device_is_a_configuration_error_that_says_how_to_name_one()
    {
        var r = R("vfio-no-device");
        Assert.True(r.ExitCode == 2, Show(r));
        Assert.Contains("--device vfio=/sys/bus/pci/devices/0000:7f:1f.7: /sys/bus/pci/devices/0000:7f:1f.7 does not exist", r.Stderr);
        Assert.Contains("lspci -D", r.Stderr);
    }

    [Fact]
    public void A_host_without_an_IOMMU_is_explained_with_what_to_enable()
    {
        var r = R("vfio-no-iommu");
        Assert.True(r.ExitCode == 2, Show(r));
        Assert.Contains("0000:00:01.0 has no IOMMU group, so VFIO cannot isolate its DMA", r.Stderr);
        Assert.Contains("intel_iommu=on", r.Stderr);
        Assert.Contains("modprobe vfio-pci", r.Stderr);
    }
}
