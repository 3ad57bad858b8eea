using Vmm.Machine;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>The vmm binary booting real guests on KVM (see <see cref="VmmRunner"/> for where KVM comes from).
/// Never skipped: without any KVM these tests fail.</summary>
[Collection("kvm")]
public class KvmBootTests(KvmFixture kvm, Xunit.Abstractions.ITestOutputHelper output)
{
    private Repo.Result R(string name) => kvm.Results[name];

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    [Fact]
    public void Demo_guest_prints_its_banner_and_machine_facts_and_vmm_exits_0()
    {
        var r = R("demo");
        Assert.True(r.ExitCode == 0, Show(r));
        Assert.Contains(DemoGuest.Banner, r.Stdout);
        Assert.Contains("cpu vendor: ", r.Stdout);
        Assert.Contains("memory: 128 MiB", r.Stdout);
        Assert.Contains("command line: vmm-demo", r.Stdout);
        Assert.Contains("boot loader: vmm", r.Stdout);
        Assert.Contains("pit: channel 0 is counting", r.Stdout);
        Assert.EndsWith(DemoGuest.Goodbye + "\n", r.Stdout);
    }

    [Fact]
    public void Demo_boots_with_two_vCPUs_and_the_idle_AP_is_torn_down()
    {
        var r = R("demo-2cpus");
        Assert.True(r.ExitCode == 0, Show(r));
        Assert.Contains(DemoGuest.Goodbye, r.Stdout);
    }

    [Fact]
    public void Memory_above_4_GiB_is_mapped_and_the_guest_sees_RAM_up_to_the_MMIO_hole()
    {
        var r = R("demo-5g");
        Assert.True(r.ExitCode == 0, Show(r));
        Assert.Contains("memory: 3072 MiB", r.Stdout);
    }

    [Fact]
    public void More_vCPUs_than_KVM_allows_is_a_clear_usage_error()
    {
        var r = R("too-many-cpus");
        Assert.True(r.ExitCode == 2, Show(r));
        Assert.Contains("--cpus 100000 is more than this KVM allows", r.Stderr);
    }

    [Fact]
    public void C_multiboot_guest_passes_every_check_incl_UART_interrupts_command_line_and_module()
    {
        var r = R("multiboot-test");
        Assert.True(r.ExitCode == 1, Show(r)); // debug-exit 0 → (0 << 1) | 1
        Assert.Contains("cmdline: multiboot-test.elf expect-module=hello expect-mem-mb=128", r.Stdout);
        Assert.Contains("module0: hello from module 0", r.Stdout);
        Assert.Contains("PASS: irq4 thr-empty interrupt", r.Stdout);
        Assert.Contains("PASS: irq4 rx-data interrupt", r.Stdout);
        Assert.Contains("PASS: all", r.Stdout);
        Assert.DoesNotContain("FAIL", r.Stdout);
    }

    [Fact]
    public void C_multiboot_guest_failure_reaches_the_exit_status()
    {
        var r = R("multiboot-test-mismatch");
        Assert.True(r.ExitCode == 3, Show(r)); // debug-exit 1
        Assert.Contains("FAIL: module0 content matches expect-module", r.Stdout);
    }

    [Fact]
    public void Port_IO_of_every_width_and_string_IO_work()
    {
        var r = R("pio");
        Assert.True(r.ExitCode == 0x43, Show(r)); // 2-byte debug-exit of 0x21
        Assert.Equal("rep-outsb-ok\n", r.Stdout);
    }

    [Fact]
    public void MMIO_of_every_width_reaches_the_bus_and_unclaimed_reads_are_all_ones()
    {
        var r = R("mmio");
        Assert.True(r.ExitCode == 1, Show(r));
        Assert.Contains("MMIO bus: 4 unclaimed reads, 4 unclaimed writes: 0xf0000000×8", r.Stderr);
    }

    [Fact]
    public void Triple_fault_ends_the_VM_with_a_crash_report_and_the_faulting_instruction()
    {
        var r = R("triple-fault");
        Assert.True(r.ExitCode == 8, Show(r));
        Assert.Contains("vCPU 0 triple-faulted (KVM_EXIT_SHUTDOWN)", r.Stderr);
        Assert.Contains("idt=", r.Stderr);
        if (r.Stderr.Contains("KVM reset this vCPU on the shutdown"))
        {
            // AMD (and the nested SVM used here): KVM hands back the reset state, and the report says so.
            Assert.Contains("rip=000000000000fff0", r.Stderr);
        }
        else
        {
            // Intel keeps the faulting state: the report shows the int3 that started the cascade.
            Assert.True(r.Stderr.Contains("32-bit protected mode"), Show(r));
            Assert.Matches(@"=> [0-9a-f]+: cc\s+int3", r.Stderr);
        }
    }

    [Fact]
    public void HLT_without_an_irqchip_ends_the_VM_with_a_diagnostic()
    {
        var r = R("hlt");
        Assert.True(r.ExitCode == 10, Show(r));
        Assert.Contains("executed HLT", r.Stderr);
        Assert.Contains("rip=", r.Stderr);
    }

    [Fact]
    public void Twenty_thousand_port_exits_allocate_zero_bytes_on_the_vCPU_thread()
    {
        var r = R("exit-loop");
        Assert.True(r.ExitCode == 1, Show(r));
        var m = System.Text.RegularExpressions.Regex.Match(r.Stderr, @"vcpu0: exits=(\d+) pio=(\d+) .*exit_allocated_bytes=(\d+)");
        Assert.True(m.Success, Show(r));
        Assert.True(long.Parse(m.Groups[2].Value) >= 20_000, Show(r));
        Assert.Equal("0", m.Groups[3].Value);
    }

    [Fact]
    public void I8042_reset_ends_the_VM_with_status_0()
    {
        var r = R("reset");
        Assert.True(r.ExitCode == 0, Show(r));
        Assert.Contains("guest requested a reset (i8042 reset line)", r.Stderr);
    }

    [Fact]
    public void Stdin_reaches_the_guest_through_the_UART()
    {
        var r = R("echo");
        Assert.True(r.ExitCode == 1, Show(r));
        Assert.Equal("HELLO VMM\n", r.Stdout);
    }

    [Fact]
    public void A_file_that_is_not_a_kernel_is_refused_with_status_6()
    {
        var r = R("bad-image");
        Assert.True(r.ExitCode == 6, Show(r));
        Assert.Contains("cannot boot: garbage.bin: not a kernel vmm can boot", r.Stderr);
    }

    [Fact]
    public void A_stock_Debian_kernel_boots_with_our_command_line_and_e820_map_until_it_needs_a_root_fs()
    {
        var r = R("linux");
        Assert.True(r.ExitCode == 0, Show(r)); // panic=-1 reboots through the i8042
        Assert.Contains("Linux version 6.", r.Stdout);
        Assert.Contains("Command line: " + KvmFixture.LinuxCommandLine + "\r\n", r.Stdout); // exactly ours
        Assert.Contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable", r.Stdout);
        Assert.Contains("BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved", r.Stdout);
        Assert.Contains("BIOS-e820: [mem 0x00000000000f0000-0x00000000000fffff] reserved", r.Stdout);
        Assert.Contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable", r.Stdout);
        Assert.Contains("Memory: ", r.Stdout);
        Assert.Contains("ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A", r.Stdout);
        Assert.Contains("VFS: Unable to mount root fs", r.Stdout);
        // ACPI: our tables, SMP from the MADT, S5 from the DSDT, COM1 from PnP, the PM timer.
        Assert.Contains("ACPI: RSDP 0x00000000000E0000 000024 (v02 VMMCS )", r.Stdout);
        foreach (var table in new[] { "XSDT", "FACP", "DSDT", "FACS", "APIC" })
            Assert.Contains($"ACPI: {table} 0x00000000000E", r.Stdout);
        Assert.Contains("ACPI: PM-Timer IO Port: 0x608", r.Stdout);
        // MSRs as firmware leaves them: MTRRs enabled (write-back default), so PAT stays on.
        Assert.DoesNotContain("MTRRs all blank", r.Stdout);
        Assert.Contains("x86/PAT: Configuration [0-7]: WB  WC", r.Stdout);
        Assert.Contains("smpboot: Allowing 2 CPUs", r.Stdout);
        Assert.Contains("smp: Brought up 1 node, 2 CPUs", r.Stdout);
        Assert.Contains("ACPI: PM: (supports S0 S5)", r.Stdout);
        Assert.Contains("pnp: PnP ACPI: found 2 devices", r.Stdout); // COM1 and the ECAM reservation (PNP0C02)
        // PCI: ECAM from the MCFG, reserved by the motherboard resources; the root bridge from the DSDT with
        // our windows; the virtio functions with the BARs vmm placed, found by Linux's own enumeration.
        Assert.Contains("PCI: MMCONFIG for domain 0000 [bus 00-00] at [mem 0xe0000000-0xe00fffff] (base 0xe0000000)", r.Stdout);
        Assert.Contains("ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00])", r.Stdout);
        Assert.Contains("pci_bus 0000:00: root bus resource [mem 0xc0000000-0xdfffffff window]", r.Stdout);
        Assert.Contains("pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000", r.Stdout);
        Assert.Contains("pci 0000:00:01.0: [1af4:1042] type 00 class 0x010000", r.Stdout);
        Assert.Contains("pci 0000:00:01.0: BAR 0 [mem 0xc0000000-0xc0007fff]", r.Stdout);
        Assert.Contains("pci 0000:00:02.0: [1af4:1044]", r.Stdout);
        Assert.Contains("guest requested a reset (ACPI reset register)", r.Stderr);
        // The CMOS clock answers with the host's date (UTC): Linux sets its clock from it.
        // (the run may have started before midnight UTC)
        Assert.True(new[] { DateTime.UtcNow, DateTime.UtcNow.AddDays(-1) }.Any(d => r.Stdout.Contains($"rtc_cmos rtc_cmos: setting system clock to {d:yyyy-MM-dd}")), Show(r));
    }

    [Fact]
    public void Linux_with_two_vCPUs_runs_the_initramfs_and_powers_off_through_ACPI_S5()
    {
        var r = R("linux-initramfs");
        // What a stock kernel prints before it needs instructions a software-virtualization (PVM) host cannot run.
        Assert.Contains("Command line: " + KvmFixture.InitramfsCommandLine + "\r\n", r.Stdout);
        Assert.Contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable", r.Stdout);
        Assert.Contains("ACPI: RSDP 0x00000000000E0000", r.Stdout);
        Assert.Contains("smpboot: Allowing 2 CPUs", r.Stdout);
        Assert.Contains("Memory: ", r.Stdout);
        if (!VmmRunner.GuestCpuHasHardwareVirtualization)
        {
            output.WriteLine("the KVM here runs without vmx/svm: asserted the early boot markers only, not the initramfs and power-off");
            return;
        }
        // Hardware-assisted KVM (here: nested SVM): the whole boot.
        Assert.True(r.ExitCode == 0, Show(r));
        Assert.Contains("smp: Brought up 1 node, 2 CPUs", r.Stdout);
        Assert.Contains(KvmFixture.InitramfsMarker, r.Stdout);
        Assert.Contains("reboot: Power down", r.Stdout);
        Assert.Contains("guest powered off (ACPI S5 (PM1a_CNT SLP_EN))", r.Stderr);
    }

    [Fact]
    public void SMP_guest_starts_its_AP_with_INIT_SIPI_exchanges_IPIs_and_reads_timers_RTC_and_ACPI()
    {
        var r = R("smp-test");
        Assert.True(r.ExitCode == 1, Show(r));
        foreach (var check in new[] { "aps checked in", "ap apic ids are 1..N-1", "ipi bsp -> each ap (vector 0x40)",
                     "ipi each ap -> bsp (vector 0x40)", "pit irq0 via 8259 (vector 0x20)", "lapic timer periodic (vector 0x41)",
                     "rtc year >= 2024", "acpi facp pm_tmr_blk set", "acpi pm timer runs at 3.579545 MHz +-10%", "all" })
            Assert.Contains("PASS: " + check + "\n", r.Stdout);
        Assert.DoesNotContain("FAIL", r.Stdout);
        Assert.Contains("acpi: rsdp at 0xe0000 rev 2", r.Stdout);
    }
}
