using Vmm.Devices.Vfio;
using Vmm.Devices.Vfio.Kernel;
using Vmm.Interop;

namespace Vmm.Tests.Devices.Vfio;

/// <summary>A fake /sys and /dev in a temp dir, with relative symlinks laid out like the real sysfs:
/// sys/devices/pci0000:00/BDF is the device, sys/bus/pci/devices/BDF links to it, and its driver, iommu_group and
/// subsystem links point back up into sys/bus and sys/kernel/iommu_groups.</summary>
internal sealed class FakeVfioHost : IDisposable
{
    public FakeVfioHost()
    {
        Root = Directory.CreateTempSubdirectory("vmm-vfio-host-").FullName;
        Sys = Path.Combine(Root, "sys");
        Dev = Path.Combine(Root, "dev");
        foreach (var d in new[] { "bus/pci/devices", "bus/pci/drivers", "bus/mdev/devices", "bus/mdev/drivers", "kernel/iommu_groups", "devices/pci0000:00" })
            Directory.CreateDirectory(Path.Combine(Sys, d));
        Directory.CreateDirectory(Dev);
    }

    public string Root { get; }
    public string Sys { get; }
    public string Dev { get; }

    /// <summary>A PCI function at sys/devices/pci0000:00/<paramref name="bdf"/>.</summary>
    public void AddPci(string bdf, string? driver, int? group, string? cdev = null)
    {
        string dir = Path.Combine(Sys, "devices/pci0000:00", bdf);
        Directory.CreateDirectory(dir);
        Link(Path.Combine(dir, "subsystem"), "../../../bus/pci");
        if (driver is not null)
        {
            Directory.CreateDirectory(Path.Combine(Sys, "bus/pci/drivers", driver));
            Link(Path.Combine(dir, "driver"), $"../../../bus/pci/drivers/{driver}");
        }
        if (group is int g)
        {
            Directory.CreateDirectory(Path.Combine(Sys, $"kernel/iommu_groups/{g}/devices"));
            Link(Path.Combine(dir, "iommu_group"), $"../../../kernel/iommu_groups/{g}");
            Link(Path.Combine(Sys, $"kernel/iommu_groups/{g}/devices", bdf), $"../../../../devices/pci0000:00/{bdf}");
        }
        if (cdev is not null)
            Directory.CreateDirectory(Path.Combine(dir, "vfio-dev", cdev));
        Link(Path.Combine(Sys, "bus/pci/devices", bdf), $"../../../devices/pci0000:00/{bdf}");
    }

    /// <summary>An mdev under a parent GPU (sys/devices/pci0000:00/0000:00:02.0/UUID), in its own IOMMU group.</summary>
    public void AddMdev(string uuid, string? driver, int group)
    {
        string dir = Path.Combine(Sys, "devices/pci0000:00/0000:00:02.0", uuid);
        Directory.CreateDirectory(dir);
        Link(Path.Combine(dir, "subsystem"), "../../../../bus/mdev");
        if (driver is not null)
        {
            Directory.CreateDirectory(Path.Combine(Sys, "bus/mdev/drivers", driver));
            Link(Path.Combine(dir, "driver"), $"../../../../bus/mdev/drivers/{driver}");
        }
        Directory.CreateDirectory(Path.Combine(Sys, $"kernel/iommu_groups/{group}/devices"));
        Link(Path.Combine(dir, "iommu_group"), $"../../../../kernel/iommu_groups/{group}");
        Link(Path.Combine(Sys, $"kernel/iommu_groups/{group}/devices", uuid), $"../../../../devices/pci0000:00/0000:00:02.0/{uuid}");
        Link(Path.Combine(Sys, "bus/mdev/devices", uuid), $"../../../devices/pci0000:00/0000:00:02.0/{uuid}");
    }

    /// <summary>Makes /dev entries (plain files stand in for the character devices).</summary>
    public void DevNodes(params string[] paths)
    {
        foreach (var p in paths)
        {
            string full = Path.Combine(Dev, p);
            Directory.CreateDirectory(Path.GetDirectoryName(full)!);
            File.WriteAllText(full, "");
        }
    }

    public VfioHost Host(bool preferIommufd = true, Func<string, int>? access = null) => new(Sys, Dev, preferIommufd, access);

    public VfioException Fails(string path, bool preferIommufd = true, Func<string, int>? access = null) =>
        Assert.Throws<VfioException>(() => Host(preferIommufd, access).Plan(path));

    private static void Link(string path, string target) => File.CreateSymbolicLink(path, target);

    public void Dispose() => Directory.Delete(Root, recursive: true);
}

public sealed class VfioHostTests : IDisposable
{
    private const string Gpu = "0000:01:00.0", GpuAudio = "0000:01:00.1";
    private const string GpuPath = "/sys/bus/pci/devices/0000:01:00.0";
    private const string MdevUuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    private readonly FakeVfioHost _host = new();

    public void Dispose() => _host.Dispose();

    // ---------------------------------------------------------------- plans

    [Fact]
    public void A_vfio_pci_device_with_a_cdev_and_dev_iommu_is_opened_through_iommufd()
    {
        _host.AddPci(Gpu, "vfio-pci", 12, cdev: "vfio3");
        _host.DevNodes("vfio/vfio", "vfio/12", "vfio/devices/vfio3", "iommu");

        var plan = _host.Host().Plan(GpuPath);

        Assert.Equal(VfioBackendKind.IommufdCdev, plan.Backend);
        Assert.Equal(Gpu, plan.DeviceName);
        Assert.Equal(VfioBus.Pci, plan.Bus);
        Assert.Equal("vfio-pci", plan.Driver);
        Assert.Equal(12, plan.IommuGroup);
        Assert.Equal(Path.Combine(_host.Dev, "vfio/devices/vfio3"), plan.CdevNode);
        Assert.Equal(Path.Combine(_host.Dev, "iommu"), plan.IommufdNode);
        Assert.Equal(Gpu, plan.Name);
    }

    [Fact]
    public void Without_dev_iommu_the_legacy_group_path_is_chosen()
    {
        _host.AddPci(Gpu, "vfio-pci", 12, cdev: "vfio3");
        _host.DevNodes("vfio/vfio", "vfio/12", "vfio/devices/vfio3");

        var plan = _host.Host().Plan(GpuPath);

        Assert.Equal(VfioBackendKind.LegacyGroup, plan.Backend);
        Assert.Equal(Path.Combine(_host.Dev, "vfio/12"), plan.GroupNode);
        Assert.Equal(Path.Combine(_host.Dev, "vfio/vfio"), plan.ContainerNode);
    }

    [Fact]
    public void Without_a_vfio_dev_entry_in_sysfs_the_legacy_group_path_is_chosen()
    {
        _host.AddPci(Gpu, "vfio-pci", 12);
        _host.DevNodes("vfio/vfio", "vfio/12", "iommu");

        Assert.Equal(VfioBackendKind.LegacyGroup, _host.Host().Plan(GpuPath).Backend);
    }

    [Fact]
    public void Preferring_the_legacy_path_takes_it_when_both_exist_and_the_cdev_when_only_it_exists()
    {
        _host.AddPci(Gpu, "vfio-pci", 12, cdev: "vfio0");
        _host.DevNodes("vfio/devices/vfio0", "iommu", "vfio/12");
        Assert.Equal(VfioBackendKind.IommufdCdev, _host.Host(preferIommufd: false).Plan(GpuPath).Backend); // no container

        _host.DevNodes("vfio/vfio");
        Assert.Equal(VfioBackendKind.LegacyGroup, _host.Host(preferIommufd: false).Plan(GpuPath).Backend);
    }

    [Fact]
    public void A_vfio_pci_variant_driver_is_accepted()
    {
        _host.AddPci(Gpu, "nvgrace_gpu_vfio_pci", 12);
        _host.DevNodes("vfio/vfio", "vfio/12");

        Assert.Equal("nvgrace_gpu_vfio_pci", _host.Host().Plan(GpuPath).Driver);
    }

    [Fact]
    public void A_bare_pci_address_and_a_path_under_the_sysfs_root_resolve_to_the_same_device()
    {
        _host.AddPci(Gpu, "vfio-pci", 12);
        _host.DevNodes("vfio/vfio", "vfio/12");

        var byAddress = _host.Host().Plan(Gpu);
        var byRootedPath = _host.Host().Plan(Path.Combine(_host.Sys, "bus/pci/devices", Gpu) + "/");

        Assert.Equal(GpuPath, byAddress.SysfsPath);
        Assert.Equal(GpuPath, byRootedPath.SysfsPath);
        Assert.Equal(12, byRootedPath.IommuGroup);
    }

    [Fact]
    public void An_mdev_is_planned_with_its_uuid_as_the_device_name_and_any_driver_its_parent_provides()
    {
        _host.AddMdev(MdevUuid, "nvidia-vgpu-vfio", 7);
        _host.DevNodes("vfio/vfio", "vfio/7");

        var plan = _host.Host().Plan("/sys/bus/mdev/devices/" + MdevUuid);
        var byUuid = _host.Host().Plan(MdevUuid);

        Assert.Equal(VfioBus.Mdev, plan.Bus);
        Assert.Equal(MdevUuid, plan.DeviceName);
        Assert.Equal("mdev " + MdevUuid, plan.Name);
        Assert.Equal("nvidia-vgpu-vfio", plan.Driver);
        Assert.Equal(7, plan.IommuGroup);
        Assert.Equal(VfioBackendKind.LegacyGroup, plan.Backend);
        Assert.Equal(plan, byUuid);
    }

    // ---------------------------------------------------------------- errors that say what to do

    [Fact]
    public void A_path_that_does_not_exist_says_which_paths_to_give()
    {
        var e = _host.Fails("/sys/bus/pci/devices/0000:09:00.0");

        Assert.Contains("/sys/bus/pci/devices/0000:09:00.0 does not exist", e.Message);
        Assert.Contains("lspci -D", e.Message);
        Assert.Contains("/sys/bus/mdev/devices/UUID", e.Message);
    }

    [Fact]
    public void A_device_on_another_bus_is_refused_naming_its_subsystem()
    {
        string usb = Path.Combine(_host.Sys, "devices/pci0000:00/usb1");
        Directory.CreateDirectory(usb);
        Directory.CreateDirectory(Path.Combine(_host.Sys, "bus/usb"));
        File.CreateSymbolicLink(Path.Combine(usb, "subsystem"), "../../../bus/usb");

        var e = _host.Fails("/sys/devices/pci0000:00/usb1");

        Assert.Contains("is not a PCI or mdev device (its subsystem is usb)", e.Message);
    }

    [Fact]
    public void A_word_that_is_neither_a_path_nor_an_address_is_refused()
    {
        var e = _host.Fails("gpu0");
        Assert.Contains("'gpu0' is neither a sysfs path nor a PCI address", e.Message);
    }

    [Fact]
    public void A_device_bound_to_another_driver_names_it_and_gives_the_rebind_commands()
    {
        _host.AddPci(Gpu, "nvidia", 12);
        Directory.CreateDirectory(Path.Combine(_host.Sys, "bus/pci/drivers/vfio-pci"));

        var e = _host.Fails(GpuPath);

        Assert.Contains("0000:01:00.0 is bound to nvidia, not vfio-pci", e.Message);
        Assert.Contains("echo 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind; " +
            "echo vfio-pci > /sys/bus/pci/devices/0000:01:00.0/driver_override; " +
            "echo 0000:01:00.0 > /sys/bus/pci/drivers_probe", e.Message);
        Assert.DoesNotContain("modprobe", e.Message);
    }

    [Fact]
    public void When_vfio_pci_is_not_loaded_the_rebind_commands_start_with_modprobe()
    {
        _host.AddPci(Gpu, "nvidia", 12);

        var e = _host.Fails(GpuPath);

        Assert.Contains("rebind it: modprobe vfio-pci; echo 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind;", e.Message);
    }

    [Fact]
    public void A_device_without_a_driver_gets_the_bind_commands_without_unbind()
    {
        _host.AddPci(Gpu, driver: null, 12);
        Directory.CreateDirectory(Path.Combine(_host.Sys, "bus/pci/drivers/vfio-pci"));

        var e = _host.Fails(GpuPath);

        Assert.Contains("0000:01:00.0 is not bound to any driver; bind it to vfio-pci: " +
            "echo vfio-pci > /sys/bus/pci/devices/0000:01:00.0/driver_override; echo 0000:01:00.0 > /sys/bus/pci/drivers_probe", e.Message);
        Assert.DoesNotContain("unbind", e.Message);
    }

    [Fact]
    public void Without_any_iommu_group_the_message_says_how_to_enable_the_iommu_and_load_vfio()
    {
        _host.AddPci(Gpu, "nvidia", group: null);

        var e = _host.Fails(GpuPath);

        Assert.Contains("0000:01:00.0 has no IOMMU group", e.Message);
        Assert.Contains("The IOMMU is off", e.Message);
        Assert.Contains("intel_iommu=on", e.Message);
        Assert.Contains("amd_iommu=on", e.Message);
        Assert.Contains("VT-d", e.Message);
        Assert.Contains("AMD-Vi", e.Message);
        Assert.Contains("/dev/vfio/vfio is missing): modprobe vfio-pci", e.Message);
    }

    [Fact]
    public void Without_an_iommu_group_but_with_vfio_loaded_only_the_iommu_advice_is_given()
    {
        _host.AddPci(GpuAudio, "vfio-pci", 3); // other devices have groups
        _host.AddPci(Gpu, "vfio-pci", group: null);
        _host.DevNodes("vfio/vfio");

        var e = _host.Fails(GpuPath);

        Assert.Contains("none covers this device", e.Message);
        Assert.Contains("intel_iommu=on", e.Message);
        Assert.DoesNotContain("modprobe", e.Message);
    }

    [Fact]
    public void A_group_that_is_not_viable_lists_the_devices_bound_to_other_drivers_and_how_to_rebind_them()
    {
        _host.AddPci(Gpu, "vfio-pci", 12);
        _host.AddPci(GpuAudio, "snd_hda_intel", 12);
        _host.AddPci("0000:01:00.2", "xhci_hcd", 12);
        _host.AddPci("0000:01:00.3", "pci-stub", 12);
        _host.AddPci("0000:01:00.4", driver: null, 12);
        _host.AddPci("0000:00:01.0", "pcieport", 12);
        _host.DevNodes("vfio/vfio", "vfio/12");

        var e = _host.Fails(GpuPath);

        Assert.Contains("IOMMU group 12 of 0000:01:00.0 is not viable", e.Message);
        Assert.Contains("0000:01:00.1 is bound to snd_hda_intel, 0000:01:00.2 is bound to xhci_hcd.", e.Message);
        Assert.Contains("echo 0000:01:00.1 > /sys/bus/pci/devices/0000:01:00.1/driver/unbind", e.Message);
        Assert.Contains("echo vfio-pci > /sys/bus/pci/devices/0000:01:00.2/driver_override", e.Message);
        Assert.Contains("or unbound", e.Message);
        Assert.DoesNotContain("0000:01:00.3", e.Message); // pci-stub is fine
        Assert.DoesNotContain("0000:01:00.4", e.Message); // unbound is fine
        Assert.DoesNotContain("0000:00:01.0", e.Message); // the bridge's pcieport is fine
    }

    [Fact]
    public void A_group_whose_other_devices_use_vfio_pci_pci_stub_or_nothing_is_viable()
    {
        _host.AddPci(Gpu, "vfio-pci", 12);
        _host.AddPci(GpuAudio, "vfio-pci", 12);
        _host.AddPci("0000:01:00.3", "pci-stub", 12);
        _host.DevNodes("vfio/vfio", "vfio/12");

        Assert.Equal(12, _host.Host().Plan(GpuPath).IommuGroup);
    }

    [Fact]
    public void An_mdev_without_a_driver_says_the_parent_provides_it()
    {
        _host.AddMdev(MdevUuid, driver: null, 7);

        var e = _host.Fails("/sys/bus/mdev/devices/" + MdevUuid);

        Assert.Contains($"mdev {MdevUuid} has no driver bound", e.Message);
        Assert.Contains("vfio_mdev", e.Message);
    }

    [Fact]
    public void A_missing_container_without_a_usable_cdev_says_to_load_vfio_or_iommufd()
    {
        _host.AddPci(Gpu, "vfio-pci", 12, cdev: "vfio3");
        _host.DevNodes("vfio/12", "vfio/devices/vfio3");

        var e = _host.Fails(GpuPath);

        Assert.Contains("/dev/vfio/vfio is missing", e.Message);
        Assert.Contains("/dev/iommu is missing: modprobe iommufd", e.Message);
        Assert.Contains("modprobe vfio-pci", e.Message);
        Assert.Contains("CONFIG_VFIO_CONTAINER", e.Message);
    }

    [Fact]
    public void A_missing_group_node_is_reported()
    {
        _host.AddPci(Gpu, "vfio-pci", 12);
        _host.DevNodes("vfio/vfio");

        var e = _host.Fails(GpuPath);

        Assert.Contains("its group node /dev/vfio/12 is missing", e.Message);
    }

    [Fact]
    public void Permission_denied_on_the_group_node_gives_the_chown_and_udev_hint()
    {
        _host.AddPci(Gpu, "vfio-pci", 12);
        _host.DevNodes("vfio/vfio", "vfio/12");
        string groupNode = Path.Combine(_host.Dev, "vfio/12");

        var e = _host.Fails(GpuPath, access: p => p == groupNode ? -Errno.EACCES : 0);

        Assert.Contains("open(/dev/vfio/12) failed: Permission denied (EACCES)", e.Message);
        Assert.Contains("chown $USER /dev/vfio/12", e.Message);
        Assert.Contains("udev rule", e.Message);
        Assert.Equal(Errno.EACCES, e.Errno);
    }

    [Fact]
    public void Permission_denied_on_the_cdev_names_the_cdev_node()
    {
        _host.AddPci(Gpu, "vfio-pci", 12, cdev: "vfio3");
        _host.DevNodes("vfio/vfio", "vfio/12", "vfio/devices/vfio3", "iommu");

        var e = _host.Fails(GpuPath, access: p => p.EndsWith("vfio3", StringComparison.Ordinal) ? -Errno.EACCES : 0);

        Assert.Contains("chown $USER /dev/vfio/devices/vfio3", e.Message);
    }

    // ---------------------------------------------------------------- RLIMIT_MEMLOCK

    [Fact]
    public void Memlock_below_guest_ram_says_needed_current_and_the_fixes()
    {
        string? message = VfioHost.MemlockProblem(needed: 8UL << 30, memlockLimit: 64 << 10, hasCapIpcLock: false);

        Assert.NotNull(message);
        Assert.Contains("needs to lock 8 GiB (8589934592 bytes) but RLIMIT_MEMLOCK is 64 KiB (65536 bytes)", message);
        Assert.Contains("ulimit -l 8388608", message);
        Assert.Contains("LimitMEMLOCK=infinity", message);
        Assert.Contains("CAP_IPC_LOCK", message);
    }

    [Theory]
    [InlineData(8UL << 30, 8UL << 30, false)]          // exactly enough
    [InlineData(8UL << 30, ulong.MaxValue, false)]     // RLIM_INFINITY
    [InlineData(8UL << 30, 64UL << 10, true)]          // CAP_IPC_LOCK ignores the limit
    public void Memlock_that_suffices_gives_no_message(ulong needed, ulong limit, bool capIpcLock) =>
        Assert.Null(VfioHost.MemlockProblem(needed, limit, capIpcLock));

    [Fact]
    public void The_real_memlock_check_accepts_pinning_nothing() => VfioHost.MemlockCheck(0);

    // ---------------------------------------------------------------- the opening step's errors on fake nodes

    [Fact]
    public void Opening_a_missing_container_names_the_node_and_errno()
    {
        var e = Assert.Throws<VfioException>(() => VfioContainer.Open(Path.Combine(_host.Dev, "vfio/vfio")));

        Assert.Contains("failed: No such file or directory (ENOENT)", e.Message);
        Assert.Equal(Errno.ENOENT, e.Errno);
    }

    [Fact]
    public void A_container_node_that_is_not_vfio_fails_at_GET_API_VERSION_with_ENOTTY()
    {
        _host.DevNodes("vfio/vfio");

        var e = Assert.Throws<VfioException>(() => VfioContainer.Open(Path.Combine(_host.Dev, "vfio/vfio")));

        Assert.Contains("VFIO_GET_API_VERSION failed: Inappropriate ioctl for device (ENOTTY)", e.Message);
    }

    [Fact]
    public void A_group_node_that_is_not_vfio_fails_at_GROUP_GET_STATUS_naming_the_group()
    {
        _host.DevNodes("vfio/12");

        var e = Assert.Throws<VfioException>(() => VfioGroup.Open(Path.Combine(_host.Dev, "vfio/12"), 12));

        Assert.StartsWith("IOMMU group 12: VFIO_GROUP_GET_STATUS", e.Message, StringComparison.Ordinal);
        Assert.Contains("(ENOTTY)", e.Message);
    }

    [Fact]
    public void An_iommu_node_that_is_not_iommufd_fails_at_IOAS_ALLOC()
    {
        _host.DevNodes("iommu");

        var e = Assert.Throws<VfioException>(() => Iommufd.Open(Path.Combine(_host.Dev, "iommu")));

        Assert.Contains("IOMMU_IOAS_ALLOC failed: Inappropriate ioctl for device (ENOTTY)", e.Message);
    }

    [Fact]
    public void A_cdev_opens_to_an_fd_without_any_ioctl_so_the_machine_can_give_it_to_KVM_before_binding()
    {
        _host.DevNodes("vfio/devices/vfio3");
        var cdev = VfioCdev.Open(Path.Combine(_host.Dev, "vfio/devices/vfio3"), Gpu);
        Assert.True(cdev.Fd >= 0);

        cdev.Dispose();

        Assert.Equal(-1, cdev.Fd);
        Assert.Throws<VfioException>(() => VfioCdev.Open(Path.Combine(_host.Dev, "vfio/devices/vfio4"), Gpu));
    }

    [Theory]
    [InlineData(Errno.EBUSY, "already open")]
    [InlineData(Errno.ENOENT, "does not exist")]
    [InlineData(Errno.EPERM, "udev rule")]
    public void Open_failures_carry_a_hint(int errno, string hint)
    {
        var e = VfioErrors.OpenFailed(Gpu, "/dev/vfio/12", errno);

        Assert.StartsWith("0000:01:00.0: open(/dev/vfio/12) failed: ", e.Message, StringComparison.Ordinal);
        Assert.Contains(hint, e.Message);
        Assert.Equal(errno, e.Errno);
    }
}
