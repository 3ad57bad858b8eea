using Vmm.Tests.TestKit;

namespace Vmm.Tests.GuestImages;

/// <summary>The virtio test guest passes unchanged under QEMU's q35 machine with modern-only (disable-legacy=on)
/// virtio-pci devices, so it tests the virtio and PCI specs, not vmm's reading of them. The same guest, the
/// same arguments and the same disk image run under vmm in KvmVirtioTests.</summary>
// In the kvm collection: not in parallel with the nested KVM run, whose emulated CPU the QEMU runs would starve.
[Collection("kvm")]
public class QemuVirtioCrossCheckTests
{
    private static string Guest => Repo.PathTo("guest-images", "build", "virtio-test.elf");

    private static string[] Qemu(string append, params string[] devices) =>
    [
        "-M", "q35", "-accel", VmmRunner.QemuAccel, "-m", "128", "-display", "none", "-serial", "stdio",
        "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", Guest, "-append", append, .. devices,
    ];

    private static Repo.Result RunQemu(string append, params string[] devices)
    {
        Repo.MustRun("make", "-s", "-C", Repo.PathTo("guest-images"));
        return Repo.Run("qemu-system-x86_64", Qemu(append, devices), timeout: TimeSpan.FromMinutes(4));
    }

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    private static void AssertPassed(Repo.Result r, params string[] subtests)
    {
        Assert.True(r.ExitCode == 1, Show(r));
        foreach (var t in subtests)
            Assert.Contains("PASS: " + t, r.Stdout);
        Assert.DoesNotContain("FAIL", r.Stdout);
    }

    [Fact]
    public void Blk_subtest_passes_under_QEMU_q35_and_writes_the_same_bytes()
    {
        string image = Path.GetTempFileName();
        try
        {
            File.WriteAllBytes(image, VirtioTestDisk.Original());
            var r = RunQemu("pci blk blk-id=vmm-test-disk",
                "-drive", $"if=none,id=d0,file={image},format=raw,discard=unmap",
                "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,serial=vmm-test-disk");
            AssertPassed(r, "pci", "blk");
            // QEMU may or may not punch the discarded sectors: compare everything else.
            var actual = File.ReadAllBytes(image);
            var expected = VirtioTestDisk.AfterGuest(discardZeroes: false);
            actual.AsSpan(300 * 512, 8 * 512).CopyTo(expected.AsSpan(300 * 512));
            Assert.True(expected.AsSpan().SequenceEqual(actual), VirtioTestDisk.Diff(expected, actual));
        }
        finally
        {
            File.Delete(image);
        }
    }

    [Fact]
    public void Read_only_blk_subtest_passes_under_QEMU()
    {
        string image = Path.GetTempFileName();
        try
        {
            File.WriteAllBytes(image, VirtioTestDisk.Original());
            var r = RunQemu("blk blk-ro",
                "-drive", $"if=none,id=d0,file={image},format=raw,readonly=on",
                "-device", "virtio-blk-pci,drive=d0,disable-legacy=on");
            AssertPassed(r, "blk");
            Assert.True(VirtioTestDisk.Original().AsSpan().SequenceEqual(File.ReadAllBytes(image)));
        }
        finally
        {
            File.Delete(image);
        }
    }

    [Fact]
    public void Rng_subtest_passes_under_QEMU()
    {
        AssertPassed(RunQemu("rng", "-device", "virtio-rng-pci,disable-legacy=on"), "rng");
    }

    [Fact]
    public void Console_subtest_passes_under_QEMU()
    {
        string output = Path.GetTempFileName();
        try
        {
            var r = RunQemu("console", "-device", "virtio-serial-pci,disable-legacy=on",
                "-chardev", $"file,id=vc,path={output}", "-device", "virtconsole,chardev=vc");
            AssertPassed(r, "console");
            Assert.Contains("virtio-console: hello from the guest", File.ReadAllText(output));
        }
        finally
        {
            File.Delete(output);
        }
    }

    [Fact]
    public void Net_subtest_exchanges_frames_with_a_responder_on_the_tap_under_QEMU()
    {
        Repo.MustRun("make", "-s", "-C", Repo.PathTo("guest-images"));
        string qemu = string.Join(' ', Qemu("net mac=52:54:00:12:34:56",
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56").Select(a => "'" + a + "'"));
        string responder = Repo.PathTo("guest-images", "build", "net-responder");
        var r = Repo.Run("unshare", ["-n", "sh", "-c",
            $"'{responder}' tap0 120 > /tmp/vmm-qemu-responder.out 2>&1 & qemu-system-x86_64 {qemu}; rc=$?; wait; echo @@RESPONDER; cat /tmp/vmm-qemu-responder.out; exit $rc"],
            timeout: TimeSpan.FromMinutes(4));
        AssertPassed(r, "net");
        string answer = r.Stdout[r.Stdout.IndexOf("@@RESPONDER", StringComparison.Ordinal)..];
        Assert.Contains("from 52:54:00:12:34:56", answer);
    }
}
