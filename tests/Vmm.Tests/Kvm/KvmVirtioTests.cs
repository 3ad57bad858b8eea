using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>The virtio test guest (guest-images/virtio-test: its own PCI enumeration and virtio-pci driver)
/// against vmm's devices on a real KVM. The same guest passes under QEMU (QemuVirtioCrossCheckTests).</summary>
[Collection("kvm")]
public class KvmVirtioTests(KvmFixture kvm)
{
    private Repo.Result R(string name) => kvm.Results[name];

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    private static void AssertPassed(Repo.Result r, params string[] subtests)
    {
        Assert.True(r.ExitCode == 1, Show(r)); // debug-exit 0: every requested subtest passed
        foreach (var t in subtests)
            Assert.Contains("PASS: " + t, r.Stdout);
        Assert.DoesNotContain("FAIL", r.Stdout);
    }

    private static string ImageHash(Repo.Result r)
    {
        var line = r.Stdout.Split('\n').LastOrDefault(l => l.StartsWith("@@SHA256 "));
        Assert.True(line is not null, Show(r));
        return line!["@@SHA256 ".Length..].Split(' ')[0];
    }

    [Fact]
    public void Guest_enumerates_PCI_and_reads_writes_flushes_and_identifies_a_virtio_blk_disk()
    {
        var r = R("virtio-blk");
        AssertPassed(r, "pci", "blk");
        // What reached the image file: the guest's writes, zeroes and discards, nothing else.
        var expected = VirtioTestDisk.AfterGuest();
        Assert.True(VirtioTestDisk.Sha256(expected) == ImageHash(r), "image after the guest differs from the expected bytes\n" + Show(r));
        // Notifications went through ioeventfds and interrupts through irqfds: the exits are config/BAR accesses only.
        Assert.Contains("vcpu0: exits=", r.Stderr);
    }

    [Fact]
    public void A_read_only_disk_rejects_writes_and_the_image_stays_unchanged()
    {
        var r = R("virtio-blk-ro");
        AssertPassed(r, "blk");
        Assert.Equal(VirtioTestDisk.Sha256(VirtioTestDisk.Original()), ImageHash(r));
    }

    [Fact]
    public void Virtio_rng_delivers_random_bytes()
    {
        var r = R("virtio-rng");
        AssertPassed(r, "rng");
    }

    [Fact]
    public void Virtio_console_carries_output_to_the_console_and_input_to_the_guest()
    {
        var r = R("virtio-console");
        AssertPassed(r, "console");
        Assert.Contains("virtio-console: hello from the guest", r.Stdout);
        Assert.Contains("virtio-console: got hello-from-host", r.Stdout);
    }

    [Fact]
    public void Virtio_net_frames_cross_the_tap_both_ways()
    {
        var r = R("virtio-net");
        AssertPassed(r, "net");
        string responder = r.Stdout[(r.Stdout.IndexOf("@@RESPONDER", StringComparison.Ordinal) + 1)..];
        Assert.Contains("from 52:54:00:12:34:56", responder);
        Assert.Contains("ping", responder);
    }

    [Fact]
    public void All_devices_at_once_each_in_its_own_slot()
    {
        var r = R("virtio-all");
        AssertPassed(r, "pci", "blk", "rng", "console");
        Assert.Equal(VirtioTestDisk.Sha256(VirtioTestDisk.AfterGuest()), ImageHash(r));
    }

    [Fact]
    public void Linux_virtio_drivers_use_the_disk_entropy_network_and_console_devices_through_MSI_X()
    {
        var r = R("linux-virtio");
        const string m = KvmFixture.VirtioInitMarker;
        // The virtio console shares the UART's sink; its line arrives whole, the rest is the serial stream.
        string stdout = KvmFixture.WithoutVirtioConsoleLine(r.Stdout, $"{m} hello on hvc0");
        Assert.Contains("virtio_blk virtio0: [vda] 8192 512-byte logical blocks", r.Stdout);
        Assert.Contains($"{m} vda 8192 sectors, serial linux-disk", stdout);
        Assert.Contains($"{m} sector 5:  5f 5f 5f 5f", stdout);       // (5 & 0xFF) ^ 0x5A
        Assert.Contains($"{m} wrote sector 1000", stdout);
        Assert.Contains("@@SECTOR1000 linux-wrote-this", r.Stdout);     // reached the image file
        Assert.Contains($"{m} rng virtio_rng.0 ", stdout);
        Assert.Contains($"{m} net 52:54:00:12:34:56", stdout);
        Assert.Contains($"{m} eth0 up", stdout);
        // Linux took MSI-X for every device, and the disk's request interrupts arrived (through irqfd).
        Assert.Matches(@"irq \d+:\s+[1-9]\d*\s+PCI-MSI[^\n]*virtio0-req\.0", r.Stdout);
        Assert.Contains("virtio1-input.0", r.Stdout);
        Assert.Contains($"{m} done", stdout);
        Assert.True(r.ExitCode == 0, Show(r)); // poweroff -f: ACPI S5
    }

    [Fact]
    public void Without_MSI_Linux_virtio_drivers_run_on_INTx_through_the_PRT_and_the_IOAPIC()
    {
        var r = R("linux-virtio-intx");
        const string m = KvmFixture.VirtioInitMarker;
        // The virtio console shares the UART's sink; its line arrives whole, the rest is the serial stream.
        string stdout = KvmFixture.WithoutVirtioConsoleLine(r.Stdout, $"{m} hello on hvc0");
        Assert.Contains($"{m} sector 5:  5f 5f 5f 5f", stdout);
        Assert.Contains("@@SECTOR1000 linux-wrote-this", r.Stdout);
        Assert.Contains($"{m} rng virtio_rng.0 ", stdout);
        // Slot 1 (the disk), INTA -> GSI 17 by the swizzle; level-triggered on the IOAPIC, and it fired.
        Assert.Matches(@"irq 17:\s+[1-9]\d*\s+IO-APIC\s+17-fasteoi[^\n]*virtio0", r.Stdout);
        Assert.DoesNotContain("PCI-MSI", r.Stdout);
        Assert.Contains($"{m} done", stdout);
        Assert.True(r.ExitCode == 0, Show(r));
    }

    [Fact]
    public void A_missing_disk_image_is_a_clear_configuration_error()
    {
        var r = R("virtio-bad-disk");
        Assert.True(r.ExitCode == 2, Show(r));
        Assert.Contains("no-such.img", r.Stderr);
    }
}
