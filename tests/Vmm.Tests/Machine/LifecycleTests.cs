using Vmm.Boot;
using Vmm.Kvm;
using Vmm.Machine;

namespace Vmm.Tests.Machine;

public class ResourceStackTests
{
    [Fact]
    public void Resources_are_released_last_first_and_a_failing_release_does_not_stop_the_rest()
    {
        var log = new StringWriter();
        var order = new List<string>();
        var stack = new ResourceStack(new Log(LogLevel.Warn, log));
        stack.Push("memory", () => order.Add("memory"));
        stack.Push("devices", () => throw new IOException("device gone"));
        stack.Push("vcpus", () => order.Add("vcpus"));
        Assert.Equal(3, stack.Count);
        stack.Dispose();
        Assert.Equal(["vcpus", "memory"], order);
        Assert.Contains("releasing devices failed: device gone", log.ToString());
        stack.Dispose(); // twice: nothing more
        Assert.Equal(2, order.Count);
        Assert.Throws<ObjectDisposedException>(() => stack.Push("late", () => { }));
    }
}

/// <summary>The state machine's refusals, without KVM (KvmPath points nowhere, so a boot fails the same on every host);
/// the transitions themselves run on KVM in KvmApiTests.</summary>
public class VmLifecycleTests
{
    private static VmLifecycle Lifecycle(List<string> events, string kvmPath = "/nonexistent/kvm") =>
        new(() => new MachineConfig { Kernel = DemoGuest.Build(), KvmPath = kvmPath }, new Log(LogLevel.Error, TextWriter.Null), new Sink(events));

    private sealed class Sink(List<string> events) : IVmEventSink
    {
        public void Emit(string source, string name, IReadOnlyDictionary<string, string>? properties = null) => events.Add($"{source}/{name}");
    }

    [Fact]
    public void A_new_VM_is_Created_and_refuses_every_action_but_boot_naming_its_state()
    {
        var events = new List<string>();
        using var vm = Lifecycle(events);
        Assert.Equal(VmState.Created, vm.State);
        foreach (var (action, name) in new (Action, string)[] { (() => vm.Pause(), "vm.pause"), (vm.Resume, "vm.resume"),
                     (() => vm.Shutdown(), "vm.shutdown"), (vm.Reboot, "vm.reboot"), (vm.PowerButton, "vm.power-button") })
        {
            var e = Assert.Throws<VmStateException>(action);
            Assert.Contains("the VM is Created", e.Message);
            Assert.Contains(name, e.Message);
        }
        Assert.Empty(events);
    }

    [Fact]
    public void A_boot_that_fails_leaves_the_VM_Created_and_says_why()
    {
        var events = new List<string>();
        using var vm = Lifecycle(events);
        var e = Assert.Throws<KvmUnavailableException>(vm.Boot);
        Assert.Contains("/nonexistent/kvm", e.Message);
        Assert.Equal(VmState.Created, vm.State);
        Assert.Null(vm.Machine);
        Assert.Equal(["vm/booting"], events); // no "booted"
    }

    [Fact]
    public void A_deleted_VM_refuses_everything()
    {
        var vm = Lifecycle([]);
        vm.Dispose();
        Assert.Contains("deleted", Assert.Throws<VmStateException>(vm.Boot).Message);
        vm.StopIfRunning("test"); // no VM running: nothing to do, no error
    }
}

public class KvmChoiceTests
{
    [Theory]
    [InlineData(null, false, false, false)] // no /dev/kvm (a PVM guest kernel): nested
    [InlineData(null, true, false, false)]  // kvm-pvm: software virtualization cannot boot a stock kernel: nested
    [InlineData(null, true, true, true)]    // hardware-assisted: local
    [InlineData("auto", true, true, true)]
    [InlineData("nested", true, true, false)]
    [InlineData("local", true, false, true)] // forced onto kvm-pvm
    public void The_KVM_tests_use_the_local_dev_kvm_only_where_it_can_run_the_whole_suite(string? choice, bool hostHasKvm, bool hardware, bool local) =>
        Assert.Equal(local, Vmm.Tests.TestKit.VmmRunner.DecideLocalKvm(choice, hostHasKvm, hardware));

    [Fact]
    public void Forcing_the_local_KVM_where_there_is_none_or_a_bad_choice_is_an_error_not_a_fallback()
    {
        Assert.Contains("no usable /dev/kvm", Assert.Throws<InvalidOperationException>(() => Vmm.Tests.TestKit.VmmRunner.DecideLocalKvm("local", false, false)).Message);
        Assert.Contains("use local, nested or auto", Assert.Throws<InvalidOperationException>(() => Vmm.Tests.TestKit.VmmRunner.DecideLocalKvm("yes", true, true)).Message);
    }
}

public class GuestInitScriptTests
{
    [Fact]
    public void The_lifecycle_scenario_s_init_starts_with_its_shebang_and_the_module_prologue()
    {
        string init = Vmm.Tests.Kvm.KvmFixture.ApiInitScript();
        Assert.StartsWith("#!/bin/busybox sh\nB=/bin/busybox\n$B mkdir -p /proc /sys /dev\n", init);
        Assert.Contains("\nfor mod in $($B cat /lib/modules/load-order); do $B insmod /lib/modules/$mod.ko || echo \"vmm-api: insmod $mod failed\"; done\n", init);
        Assert.Contains("\n$B dd if=/dev/vda of=/dev/null bs=4096 count=16", init); // the prologue's last line ended with a newline
        Assert.EndsWith("$B poweroff -f\n", init);
        Assert.DoesNotContain("\n    ", init); // no stray indentation from the composition (the loop body has two spaces)
    }
}
