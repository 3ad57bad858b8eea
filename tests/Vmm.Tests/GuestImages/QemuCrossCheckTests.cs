using Vmm.Tests.TestKit;

namespace Vmm.Tests.GuestImages;

/// <summary>The C test guest must pass unchanged under QEMU, so it tests the spec and not vmm's reading of
/// it. QEMU uses KVM where this host has it, TCG otherwise (the guest only needs what both provide).</summary>
// In the kvm collection: not in parallel with the nested KVM run, whose emulated CPU the QEMU runs would starve.
[Collection("kvm")]
public class QemuCrossCheckTests
{
    [Fact]
    public void Multiboot_test_guest_passes_under_QEMU()
    {
        Repo.MustRun("make", "-s", "-C", Repo.PathTo("guest-images"));
        string module = Path.GetTempFileName();
        File.WriteAllText(module, "hello world\n");
        try
        {
            var r = Repo.Run("qemu-system-x86_64",
            [
                "-accel", VmmRunner.QemuAccel, "-m", "128", "-display", "none", "-serial", "stdio", "-no-reboot",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                "-kernel", Repo.PathTo("guest-images", "build", "multiboot-test.elf"),
                "-append", "expect-module=hello expect-mem-mb=128", "-initrd", module,
            ], timeout: TimeSpan.FromMinutes(3));
            Assert.True(r.ExitCode == 1, $"exit {r.ExitCode}\n{r.Stdout}\n{r.Stderr}");
            Assert.Contains("PASS: irq4 rx-data interrupt", r.Stdout);
            Assert.Contains("PASS: all", r.Stdout);
            Assert.DoesNotContain("FAIL", r.Stdout);
        }
        finally
        {
            File.Delete(module);
        }
    }

    [Fact]
    public void SMP_test_guest_passes_under_QEMU_with_two_CPUs()
    {
        Repo.MustRun("make", "-s", "-C", Repo.PathTo("guest-images"));
        var r = Repo.Run("qemu-system-x86_64",
        [
            "-accel", VmmRunner.QemuAccel, "-smp", "2", "-m", "128", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", Repo.PathTo("guest-images", "build", "smp-test.elf"), "-append", "cpus=2",
        ], timeout: TimeSpan.FromMinutes(3));
        Assert.True(r.ExitCode == 1, $"exit {r.ExitCode}\n{r.Stdout}\n{r.Stderr}");
        Assert.Contains("PASS: ipi each ap -> bsp (vector 0x40)", r.Stdout);
        Assert.Contains("PASS: all", r.Stdout);
        Assert.DoesNotContain("FAIL", r.Stdout);
    }
}
