using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>Linux's own virtio drivers on vhost-user devices, with the real back-ends of this host (virtiofsd,
/// qemu-storage-daemon) running next to vmm on KVM: the guest mounts a virtio-fs share and uses a vhost-user-blk
/// disk; the host side checks what arrived. Per request no vmm code runs: kicks are KVM ioeventfds read by the
/// back-end, completions MSI-X irqfds it writes.</summary>
[Collection("kvm")]
public class KvmVhostUserTests(KvmFixture kvm)
{
    private Repo.Result R(string name) => kvm.Results[name];

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    [Fact]
    public void Linux_mounts_a_virtiofs_share_reads_a_host_file_and_writes_one_the_host_sees()
    {
        var r = R("linux-virtiofs");
        const string m = KvmFixture.VhostInitMarker;
        Assert.True(r.Stdout.Contains($"{m} mounted hostshare"), Show(r));
        Assert.Contains($"{m} host file: host-wrote-this", r.Stdout);
        Assert.Contains($"{m} wrote from-guest.txt", r.Stdout);
        Assert.Contains("@@GUESTFILE guest-wrote-this", r.Stdout); // reached the host's directory through virtiofsd
        Assert.Contains($"{m} unmounted", r.Stdout);
        // The request queue's completions arrived as MSI-X (the back-end signals the vector's irqfd itself).
        Assert.Matches(@"irq \d+:\s+[1-9]\d*\s+PCI-MSI[^\n]*virtio0-requests", r.Stdout);
        Assert.Contains("vhost-user-fs (hostshare, fs.sock): back-end features", r.Stderr);
        Assert.DoesNotContain("needs a reset", r.Stderr);
        Assert.Contains($"{m} done", r.Stdout);
        Assert.True(r.ExitCode == 0, Show(r)); // poweroff -f: ACPI S5
    }

    [Fact]
    public void Linux_reads_and_writes_a_vhost_user_blk_disk_served_by_qemu_storage_daemon()
    {
        var r = R("linux-vhost-user-blk");
        const string m = KvmFixture.VhostInitMarker;
        Assert.True(r.Stdout.Contains($"{m} vda 8192 sectors"), Show(r)); // capacity from the back-end's GET_CONFIG
        Assert.Contains($"{m} sector 5:  5f 5f 5f 5f", r.Stdout);         // (5 & 0xFF) ^ 0x5A, as VirtioTestDisk writes it
        Assert.Contains($"{m} wrote sector 1000", r.Stdout);
        Assert.Contains("@@SECTOR1000 linux-wrote-this", r.Stdout);       // reached the image through the back-end
        Assert.Matches(@"irq \d+:\s+[1-9]\d*\s+PCI-MSI[^\n]*virtio0-req\.0", r.Stdout);
        Assert.Contains("vhost-user-blk (blk.sock): back-end features", r.Stderr);
        Assert.DoesNotContain("needs a reset", r.Stderr);
        Assert.Contains($"{m} done", r.Stdout);
        Assert.True(r.ExitCode == 0, Show(r));
    }
}
