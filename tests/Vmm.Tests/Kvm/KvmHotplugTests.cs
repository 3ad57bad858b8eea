using System.Buffers.Binary;
using System.Text.Json;
using System.Text.RegularExpressions;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>PCI hotplug end to end on KVM (HotplugScenario): a stock Linux that booted with no PCI devices gets a disk,
/// a NIC and a test GPU through vm.add-*, finds each through ACPI (GED interrupt, acpiphp), uses it, and lets each go
/// again on vm.remove-device. Never skipped.</summary>
[Collection("kvm")]
public class KvmHotplugTests(KvmFixture kvm)
{
    private const ulong GiB = 1UL << 30;
    private static readonly string M = HotplugScenario.Marker;

    private Repo.Result R => kvm.Results["linux-hotplug"];

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    private static List<(string Command, string Output, int Status)> Steps(string stdout) =>
        Regex.Matches(stdout, @"^@@ (?<cmd>[^\n]*)\n(?<out>.*?)^@@rc (?<rc>\d+)$", RegexOptions.Multiline | RegexOptions.Singleline)
            .Select(x => (x.Groups["cmd"].Value.Trim(), x.Groups["out"].Value, int.Parse(x.Groups["rc"].Value))).ToList();

    private static string Section(string stdout, string name)
    {
        int a = stdout.IndexOf($"@@{name}\n", StringComparison.Ordinal);
        if (a < 0)
            return "";
        int b = stdout.IndexOf("\n@@", a + name.Length + 3, StringComparison.Ordinal);
        return b < 0 ? stdout[(a + name.Length + 3)..] : stdout[(a + name.Length + 3)..(b + 1)];
    }

    [Fact]
    public void A_disk_a_NIC_and_a_GPU_are_hot_added_to_a_running_Linux_used_by_it_and_removed_again()
    {
        var r = R;
        string all = Show(r);
        var steps = Steps(r.Stdout);
        string[] expected =
        [
            "add-disk path=hp.img,serial=hotplug-disk,id=hpdisk", "add-net tap=tap0,mac=52:54:00:12:34:57", "add-user-device socket=gpu2.sock,id=biggpu",
            "add-user-device socket=gpu1.sock,id=gpu", "add-disk path=hp.img,id=hpdisk", "info", "remove-device hpdisk", "remove-device _net0",
            "remove-device gpu", "remove-device hpdisk", "info", "add-fs tag=badfs,socket=console.log,id=badfs",
            "add-user-device socket=share,id=badgpu", "add-fs tag=hpshare,socket=fs.sock,id=hpfs",
            "add-vsock cid=3,socket=vs.sock,id=hpvsock", "remove-device hpfs", "remove-device hpvsock", "shutdown-vmm",
        ];
        Assert.True(steps.Select(s => s.Command).SequenceEqual(expected), all);

        // vm.add-*: CH's PciDeviceInfo, slots in order from 1; a generated id when none was given.
        void Added(int step, string id, int slot)
        {
            Assert.True(steps[step].Status == 0, all);
            Api.ChSchema.AssertValid(steps[step].Output, "PciDeviceInfo");
            var info = JsonDocument.Parse(steps[step].Output).RootElement;
            Assert.Equal(id, info.GetProperty("id").GetString());
            Assert.Equal($"0000:00:{slot:x2}.0", info.GetProperty("bdf").GetString());
        }
        Added(0, "hpdisk", 1);
        Added(1, "_net0", 2);
        // A 128 GiB BAR does not fit the default 64 GiB window fixed at boot: a clear error saying how to make room.
        Assert.Equal(1, steps[2].Status);
        Assert.Contains("HTTP 400", steps[2].Output);
        Assert.Contains("does not fit in the 64-bit PCI window", steps[2].Output);
        Assert.Contains("mmio64_aperture_weight", steps[2].Output);
        Added(3, "gpu", 3); // the failed one left nothing behind: the next slot is 3
        Assert.Equal(1, steps[4].Status);
        Assert.Contains("HTTP 409", steps[4].Output);
        Assert.Contains("Identifier hpdisk is not unique", steps[4].Output);

        // vm.info lists the hot-added devices (device tree and config).
        var info = JsonDocument.Parse(steps[5].Output).RootElement;
        var tree = info.GetProperty("device_tree");
        Assert.Equal("0000:00:01.0", tree.GetProperty("hpdisk").GetProperty("pci_bdf").GetString());
        Assert.Equal("0000:00:02.0", tree.GetProperty("_net0").GetProperty("pci_bdf").GetString());
        Assert.Equal("0000:00:03.0", tree.GetProperty("gpu").GetProperty("pci_bdf").GetString());
        Assert.Equal("hp.img", info.GetProperty("config").GetProperty("disks")[0].GetProperty("path").GetString());
        Assert.Equal("gpu1.sock", info.GetProperty("config").GetProperty("user_devices")[0].GetProperty("socket").GetString());

        // vm.remove-device answers once the guest ejected the device; an unknown id is 404.
        for (int i = 6; i <= 8; i++)
            Assert.True(steps[i].Status == 0, $"step {i}\n{all}");
        Assert.Equal(1, steps[9].Status);
        Assert.Contains("HTTP 404", steps[9].Output);
        var after = JsonDocument.Parse(steps[10].Output).RootElement;
        Assert.Empty(after.GetProperty("device_tree").EnumerateObject());
        Assert.False(after.GetProperty("config").TryGetProperty("disks", out var disks) && disks.GetArrayLength() > 0, all);

        // A hot-added back-end socket gets cold plug's check: a regular file or a directory is named as such, at once.
        Assert.True(steps[11].Status == 1 && steps[12].Status == 1, all);
        Assert.Contains("HTTP 400", steps[11].Output);
        Assert.Contains("--fs tag=badfs,socket=console.log: is a regular file, not a socket", steps[11].Output);
        Assert.Contains("--device vfio-user=share: is a directory", steps[12].Output);

        // The guest: each device appeared (acpiphp on the GED event), worked, and went away.
        string console = Section(r.Stdout, "CONSOLE");
        void Has(string text, string what) => Assert.True(text.Contains(what, StringComparison.Ordinal), $"no \"{what}\" in:\n{all}");
        Has(console, $"{M} up blk 0000:00:01.0 0x1af4:0x1042 class 0x010000");
        Has(console, $"{M} vda serial hotplug-disk sector 1:  5b 5b 5b 5b"); // (1 & 0xFF) ^ 0x5A
        Has(console, $"{M} up net 0000:00:02.0 0x1af4:0x1041 class 0x020000");
        Has(console, $"{M} eth0 52:54:00:12:34:57");
        Has(console, $"{M} up gpu 0000:00:03.0 0x1b36:0x7001 class 0x030200");
        Assert.True(Regex.IsMatch(console, $@"{M} gpu bar2 0x[0-9a-f]+ 0x[0-9a-f]+ 0x[0-9a-f]+ first 0x600D0001 last 0x600D0002"), all);
        foreach (string gone in new[] { "gone blk", "gone net", "gone gpu", "vda gone", "eth0 gone", "done" })
            Has(console, $"{M} {gone}");
        Assert.False(console.Contains("still there", StringComparison.Ordinal) || console.Contains("missing", StringComparison.Ordinal), all);
        // vm.add-fs and vm.add-vsock: the same path (slots 1 and 2 again, freed by the removals); Linux's virtiofs
        // mounts the hot-added share (virtiofsd on the host serves it), its vsock transport binds the vsock device.
        Added(13, "hpfs", 1); // the refused adds above left nothing behind
        Added(14, "hpvsock", 2);
        Has(console, $"{M} up fs 0000:00:01.0 0x1af4:0x105a");
        Has(console, $"{M} fs read host-wrote-this");
        Has(console, $"{M} fs unmounted");
        Has(r.Stdout, "@@GUESTFILE hotplug-guest-wrote-this");
        Has(console, $"{M} up vsock 0000:00:02.0 0x1af4:0x1053");
        Has(console, $"{M} vsock driver vmw_vsock_virtio_transport");
        Assert.True(steps[15].Status == 0 && steps[16].Status == 0, all);
        Has(console, $"{M} gone fs");
        Has(console, $"{M} gone vsock");
        Has(r.Stdout, "@@VSOCKSOCKET gone"); // the removed vsock device closed and unlinked its socket
        Has(r.Stdout, "@@VMM-EXIT 0"); // the guest powered off after all that, and vmm.shutdown ended vmm
        Assert.True(steps[17].Status == 0, all);

        // vmm: each eject released the device; the event monitor told of each removal.
        string stderr = Section(r.Stdout, "VMM-STDERR");
        foreach (string id in new[] { "hpdisk", "_net0", "gpu", "hpfs", "hpvsock" })
        {
            Assert.True(Regex.IsMatch(stderr, $@"guest ejected .*\b{Regex.Escape(id)} at 0000:00:0"), $"no eject of {id}\n{all}");
            Assert.True(Regex.IsMatch(Section(r.Stdout, "EVENTS"), $"\"event\":\\s*\"device-removed\"[^}}]*\"id\":\\s*\"{id}\""), all);
        }
        Assert.False(stderr.Contains("failed", StringComparison.Ordinal), all);
        // The GPU's server saw the two dwords Linux wrote through /dev/mem in its BAR2, and was disconnected on removal.
        Assert.Equal(VfioGpuTestGuest.Bar2FnvOfFirstAndLastDword(8 * GiB), Report(Section(r.Stdout, "REPORT 1"))["bar2_fnv"]);
    }

    private static Dictionary<string, string> Report(string text) =>
        text.Split('\n').Select(l => l.Split('=', 2)).Where(p => p.Length == 2).ToDictionary(p => p[0].Trim(), p => p[1].Trim());
}
