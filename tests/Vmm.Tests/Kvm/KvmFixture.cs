using System.Text;
using Iced.Intel;
using Vmm.Tests.TestKit;
using static Iced.Intel.AssemblerRegisters;

namespace Vmm.Tests.Kvm;

/// <summary>Builds the NativeAOT vmm, the C test guest and the Iced micro-guests, runs every KVM scenario
/// once (on this host's /dev/kvm, or in the nested-KVM VM) and keeps the results for the tests.</summary>
public sealed class KvmFixture
{
    public IReadOnlyDictionary<string, Repo.Result> Results { get; }

    public KvmFixture()
    {
        string vmm = PublishedVmm.Path;
        Repo.MustRun("make", "-s", "-C", Repo.PathTo("guest-images"));
        var files = new Dictionary<string, byte[]>
        {
            ["multiboot-test.elf"] = File.ReadAllBytes(Repo.PathTo("guest-images", "build", "multiboot-test.elf")),
            ["smp-test.elf"] = File.ReadAllBytes(Repo.PathTo("guest-images", "build", "smp-test.elf")),
            ["virtio-test.elf"] = File.ReadAllBytes(Repo.PathTo("guest-images", "build", "virtio-test.elf")),
            ["net-responder"] = File.ReadAllBytes(Repo.PathTo("guest-images", "build", "net-responder")),
            ["api-abuse"] = File.ReadAllBytes(Repo.PathTo("guest-images", "build", "api-abuse")),
            ["blk-image"] = File.ReadAllBytes(Repo.PathTo("guest-images", "build", "blk-image")),
            ["vsock-peer"] = File.ReadAllBytes(Repo.PathTo("guest-images", "build", "vsock-peer")),
            ["vsock-initramfs.cpio.gz"] = VsockInitramfs(),
            ["disk.img"] = VirtioTestDisk.Original(),
            ["module.txt"] = Encoding.ASCII.GetBytes("hello from module 0\n"),
            ["pio.bin"] = MicroGuests.PortIo(),
            ["mmio.elf"] = MicroGuests.Mmio64(),
            ["triple.bin"] = MicroGuests.TripleFault(),
            ["hlt.bin"] = MicroGuests.Halt(),
            ["loop.bin"] = MicroGuests.PortLoop(20_000),
            ["reset.bin"] = MicroGuests.Reset(),
            ["echo.bin"] = MicroGuests.Echo(),
            ["garbage.bin"] = Encoding.ASCII.GetBytes("this is not a kernel"),
            ["vmlinuz"] = File.ReadAllBytes(StockKernel()),
            ["initramfs.cpio.gz"] = BusyboxInitramfs(),
            ["virtio-initramfs.cpio.gz"] = VirtioInitramfs(),
            ["vfio-gpu-test.elf"] = File.ReadAllBytes(Repo.PathTo("guest-images", "build", "vfio-gpu-test.elf")),
            ["vfio-user-gpu"] = File.ReadAllBytes(Environment.GetEnvironmentVariable("VMM_TEST_GPU") ?? PublishTestGpu()),
            ["gpu-initramfs.cpio.gz"] = GpuInitramfs(),
            ["api-initramfs.cpio.gz"] = ApiInitramfs(),
            ["api-lifecycle.json"] = Encoding.UTF8.GetBytes(ApiScenario.LifecycleConfig),
            ["multiboot-config.json"] = Encoding.UTF8.GetBytes(ApiScenario.MultibootConfig),
            ["api-lifecycle.sh"] = Encoding.UTF8.GetBytes(ApiScenario.LifecycleScript),
            // The host's vhost-user back-ends (Debian qemu-system-common); the harness brings their libraries along.
            ["virtiofsd"] = File.ReadAllBytes(VhostUserBackendProcess.Virtiofsd),
            ["qemu-storage-daemon"] = File.ReadAllBytes(VhostUserBackendProcess.StorageDaemon),
            ["vhost-initramfs.cpio.gz"] = VhostUserInitramfs(),
            ["hotplug-initramfs.cpio.gz"] = BusyboxInitramfs(HotplugScenario.InitScript(), AddGuestModules),
            ["hotplug.sh"] = Encoding.UTF8.GetBytes(HotplugScenario.Script),
            ["all-initramfs.cpio.gz"] = BusyboxInitramfs(AllDevicesScenario.InitScript(), AddGuestModulesAndVsockPeer),
            ["all-devices.sh"] = Encoding.UTF8.GetBytes(AllDevicesScenario.Script),
        };
        Results = VmmRunner.RunAll(vmm, files, Selected(
        [
            new("demo", []),
            new("demo-2cpus", ["--cpus", "2", "--log-level", "info"]),
            new("demo-5g", ["--memory", "5G"]),
            new("too-many-cpus", ["--cpus", "100000"]),
            new("multiboot-test", ["run", "--kernel", "multiboot-test.elf", "--initrd", "module.txt", "--cmdline", "expect-module=hello expect-mem-mb=128"]),
            new("multiboot-test-mismatch", ["run", "--kernel", "multiboot-test.elf", "--initrd", "module.txt", "--cmdline", "expect-module=goodbye"]),
            new("smp-test", ["run", "--kernel", "smp-test.elf", "--cpus", "2", "--cmdline", "cpus=2"]),
            new("pio", ["run", "--kernel", "pio.bin"]),
            new("mmio", ["run", "--kernel", "mmio.elf", "--log-level", "debug"]),
            new("triple-fault", ["run", "--kernel", "triple.bin"]),
            new("hlt", ["run", "--kernel", "hlt.bin", "--no-irqchip"]),
            new("exit-loop", ["run", "--kernel", "loop.bin", "--stats"]),
            new("reset", ["run", "--kernel", "reset.bin", "--log-level", "info"]),
            new("echo", ["run", "--kernel", "echo.bin"], Stdin: "hello vmm\n"),
            new("bad-image", ["run", "--kernel", "garbage.bin"]),
            // Issue 12: the test hook makes vCPU 0 call socket() after its filter is in place.
            new("seccomp-violation", [], Shell: "VMM_TEST_SECCOMP_VIOLATION=vcpu ./vmm demo; echo \"@@STATUS $?\""),
            // Log mode: the demo's calls are all on the lists (no audit line); then, as a control that the kernel's audit
            // lines are readable here, the hook's socket() on vCPU 0 is let through and logged (syscall 41).
            new("seccomp-log", [], Shell: "./vmm demo --seccomp log --log-level info; echo \"@@STATUS $?\"; dmesg 2>/dev/null | grep 'type=1326' | grep -c 'comm=' | sed 's/^/@@AUDIT /'; " +
                "VMM_TEST_SECCOMP_VIOLATION=vcpu ./vmm demo --seccomp log; echo \"@@HOOK-STATUS $?\"; dmesg 2>/dev/null | grep 'type=1326' | grep -c ' syscall=41 ' | sed 's/^/@@AUDIT-SOCKET /'"),
            // A stock Debian kernel, no initramfs: it boots until it cannot mount a root file system, then
            // panic=-1 reboots through the i8042 (vmm exits 0).
            new("linux", ["run", "--kernel", "vmlinuz", "--memory", "256M", "--cpus", "2", "--cmdline", LinuxCommandLine, "--log-level", "info",
                "--disk", "path=disk.img,readonly=on", "--rng"]),
            // The virtio test guest (guest-images/virtio-test) on each device; the disk is a fresh copy per run.
            new("virtio-blk", [], Shell: "cp disk.img blk.img && ./vmm run --kernel virtio-test.elf --disk path=blk.img,serial=vmm-test-disk " +
                "--cmdline 'pci blk blk-id=vmm-test-disk' --log-level info --stats; rc=$?; echo; echo \"@@SHA256 $(sha256sum blk.img)\"; exit $rc"),
            new("virtio-blk-ro", [], Shell: "cp disk.img ro.img && ./vmm run --kernel virtio-test.elf --disk path=ro.img,readonly=on " +
                "--cmdline 'blk blk-ro'; rc=$?; echo; echo \"@@SHA256 $(sha256sum ro.img)\"; exit $rc"),
            new("virtio-rng", ["run", "--kernel", "virtio-test.elf", "--rng", "--cmdline", "rng"]),
            new("virtio-console", ["run", "--kernel", "virtio-test.elf", "--console", "virtio", "--cmdline", "console console-rx"], Stdin: "hello-from-host\n"),
            new("virtio-net", [], Shell: "chmod +x net-responder && unshare -n sh -c './net-responder tap0 120 >responder.out 2>&1 & " +
                "./vmm run --kernel virtio-test.elf --net tap=tap0,mac=52:54:00:12:34:56 --cmdline \"net mac=52:54:00:12:34:56\"; rc=$?; " +
                "wait; echo @@RESPONDER; cat responder.out; exit $rc'"),
            new("virtio-all", [], Shell: "cp disk.img all.img && ./vmm run --kernel virtio-test.elf --disk path=all.img,serial=vmm-test-disk " +
                "--disk path=disk.img,readonly=on --rng --console virtio --cmdline 'pci blk rng console'; rc=$?; echo; echo \"@@SHA256 $(sha256sum all.img)\"; exit $rc"),
            // Linux's own virtio-pci drivers (modules from the same Debian kernel) on vmm's devices.
            new("linux-virtio", [], Shell: "cp disk.img lx.img && chmod +x net-responder && unshare -n ./vmm run --kernel vmlinuz --initrd virtio-initramfs.cpio.gz " +
                "--memory 256M --cmdline 'console=ttyS0 panic=-1 rdinit=/init' --disk path=lx.img,serial=linux-disk --net tap=tap0,mac=52:54:00:12:34:56 " +
                "--rng --console virtio --log-level info; rc=$?; echo; echo \"@@SECTOR1000 $(dd if=lx.img bs=512 skip=1000 count=1 2>/dev/null | head -c 16)\"; exit $rc"),
            // The same with pci=nomsi: Linux falls back to INTx, routed by the ACPI _PRT to IOAPIC GSIs 16-19.
            new("linux-virtio-intx", [], Shell: "cp disk.img lx2.img && unshare -n ./vmm run --kernel vmlinuz --initrd virtio-initramfs.cpio.gz " +
                "--memory 256M --cmdline 'console=ttyS0 panic=-1 rdinit=/init pci=nomsi' --disk path=lx2.img,serial=linux-disk --net tap=tap0,mac=52:54:00:12:34:56 " +
                "--rng --console virtio --log-level info; rc=$?; echo; echo \"@@SECTOR1000 $(dd if=lx2.img bs=512 skip=1000 count=1 2>/dev/null | head -c 16)\"; exit $rc"),
            // virtio-vsock under Linux's own vsock transport: the host connects to a guest port through the hybrid
            // socket (CONNECT/OK), then the guest connects to host port 7000 (vmm -> v.sock_7000, served by
            // vsock-peer); 300000 bytes each way, echoed transformed, so credit updates happen both ways.
            new("linux-vsock", [], Shell: "chmod +x vsock-peer; (./vsock-peer host-serve v.sock_7000 >serve.out 2>&1 &); " +
                "(./vmm run --kernel vmlinuz --initrd vsock-initramfs.cpio.gz --memory 256M --cmdline 'console=ttyS0 panic=-1 rdinit=/init' " +
                "--vsock cid=3,socket=v.sock --log-level info; echo \"@@VMM $?\" >vmm.rc) & vp=$!; " +
                "./vsock-peer host-connect v.sock 5000 300000 >connect.out 2>&1; echo \"@@CONNECT $?\"; wait $vp; " +
                "n=0; while [ -e v.sock_7000 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done; " +
                "echo @@HOST; cat connect.out serve.out vmm.rc; [ -e v.sock ] && echo '@@SOCKET LEFT' || echo '@@SOCKET GONE'; " +
                "exit $(cut -d' ' -f2 vmm.rc)"),
            // Process-kill consistency (KvmCrashTests): vmm SIGKILLed three times in a guest's write-and-flush stream.
            new("blk-crash", [], Shell: CrashScenario.Script),
            new("virtio-bad-disk", ["run", "--kernel", "virtio-test.elf", "--disk", "path=no-such.img"]),
            // The vfio-user test GPU (tests/Vmm.TestGpu, its own process) passed through to the GPU test guest.
            new("vfio-user-gpu", [], Shell: GpuServers(1, "8G") + "./vmm run --kernel vfio-gpu-test.elf --device vfio-user=gpu1.sock " +
                "--log-level debug --stats; rc=$?; " + GpuReports(1)),
            // Two GPUs, the first with peer-to-peer DMA: it copies from and to the second one's BAR2 by guest address.
            new("vfio-user-gpu-p2p", [], Shell: GpuServers(2, "8G") + "./vmm run --kernel vfio-gpu-test.elf --device vfio-user=gpu1.sock,p2p=on " +
                "--device vfio-user=gpu2.sock --cmdline p2p --log-level info; rc=$?; " + GpuReports(2)),
            new("vfio-user-gpu-msi", [], Shell: GpuServers(1, "8G") + "./vmm run --kernel vfio-gpu-test.elf --device vfio-user=gpu1.sock " +
                "--cmdline irq=msi; rc=$?; " + GpuReports(1)),
            new("vfio-user-gpu-intx", [], Shell: GpuServers(1, "8G") + "./vmm run --kernel vfio-gpu-test.elf --device vfio-user=gpu1.sock " +
                "--cmdline irq=intx; rc=$?; " + GpuReports(1)),
            // Four GPUs with 128 GiB BAR2s each (sparse memfds), the way four A100 80 GB look: Linux must find all of them
            // inside the host bridge's 64-bit window and reach the last byte of the fourth BAR2.
            new("linux-4-gpus", [], Shell: GpuServers(4, "128G") + "./vmm run --kernel vmlinuz --initrd gpu-initramfs.cpio.gz --memory 256M " +
                "--cmdline 'console=ttyS0 panic=-1 rdinit=/init' --device vfio-user=gpu1.sock --device vfio-user=gpu2.sock " +
                "--device vfio-user=gpu3.sock --device vfio-user=gpu4.sock --log-level info; rc=$?; " + GpuReports(4)),
            new("vfio-user-no-server", ["run", "--kernel", "vfio-gpu-test.elf", "--device", "vfio-user=no-such.sock"]),
            new("vfio-no-device", ["run", "--kernel", "vfio-gpu-test.elf", "--device", "vfio=/sys/bus/pci/devices/0000:7f:1f.7"]),
            // A real PCI device of the (nested) host, which has no IOMMU and no VFIO.
            new("vfio-no-iommu", ["run", "--kernel", "vfio-gpu-test.elf", "--device", "vfio=/sys/bus/pci/devices/0000:00:01.0"]),
            // The control plane (tests/Vmm.Tests/Kvm/KvmApiTests.cs): the whole lifecycle of a Linux VM through the API,
            // and --config booting the same VM as the flags.
            new("api-lifecycle", [], Shell: "cp disk.img api.img && sh ./api-lifecycle.sh"),
            new("api-config-file", ["run", "--config", "multiboot-config.json"]),
            // The API controlling a VM booted from the command line (vm.reboot: a fresh VM); SIGTERM then stops it in order.
            new("api-run-sigterm", [], Shell: "./vmm run --kernel hlt.bin --api-socket run.sock --event-monitor path=run-events.json --log-level info & p=$!; n=0; while [ ! -S run.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; " +
                "sleep 1; ./vmm remote --api-socket run.sock info; echo \"@@INFO $?\"; " +
                "./vmm remote --api-socket run.sock reboot; echo \"@@REBOOT $?\"; ./vmm remote --api-socket run.sock info | grep -o '\"state\":\"[A-Za-z]*\"'; " +
                "kill -TERM $p; wait $p; rc=$?; " +
                "[ -e run.sock ] && echo '@@SOCKET LEFT' || echo '@@SOCKET GONE'; echo \"@@EVENTS $(tr -d ' \\n' <run-events.json)\"; exit $rc"),
            // vm.remove-device on a guest with no ACPI hotplug driver (hlt.bin halts): the eject never comes, so the
            // request times out with a line saying what the guest must run; the device stays, and SIGTERM still stops vmm.
            new("api-eject-timeout", [], Shell: "cp disk.img et.img; ./vmm run --kernel hlt.bin --api-socket et.sock --log-level info 2>vmm.err & p=$!; " +
                "n=0; while [ ! -S et.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; " +
                "./vmm remote --api-socket et.sock add-disk path=et.img,id=etdisk; echo \"@@ADD $?\"; " +
                "./vmm remote --api-socket et.sock remove-device etdisk; echo \"@@REMOVE $?\"; " +
                "./vmm remote --api-socket et.sock info; echo \"@@INFO $?\"; " +
                "kill -TERM $p; wait $p; echo \"@@EXIT $?\"; echo @@VMM-ERR; cat vmm.err"),
            // Linux's virtiofs and virtio-blk drivers on vhost-user devices served by the real back-ends (virtiofsd,
            // qemu-storage-daemon) next to vmm: the guest's kicks go to them through KVM ioeventfds, their completions
            // come back as MSI-X through the irqfds (tests/Vmm.Tests/Kvm/KvmVhostUserTests.cs).
            // 'quiet': every console byte is a UART exit, and under a loaded nested VM the boot log alone outlasted the
            // scenario timeout (measured: 72 s of guest time in 240 s).
            new("linux-virtiofs", [], Shell: "mkdir -p share && echo host-wrote-this > share/from-host.txt && chmod +x virtiofsd && " +
                "{ ./virtiofsd --socket-path=fs.sock -o source=$PWD/share -o cache=none -o sandbox=chroot >virtiofsd.out 2>&1 & } && " +
                "n=0; while [ ! -S fs.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; " +
                "./vmm run --kernel vmlinuz --initrd vhost-initramfs.cpio.gz --memory 256M --cmdline 'console=ttyS0 quiet panic=-1 rdinit=/init vmm.vhost=fs' " +
                "--fs tag=hostshare,socket=fs.sock --log-level info; rc=$?; echo; echo \"@@GUESTFILE $(cat share/from-guest.txt 2>&1)\"; " +
                "echo @@VIRTIOFSD; cat virtiofsd.out; exit $rc"),
            new("linux-vhost-user-blk", [], Shell: "cp disk.img vu.img && chmod +x qemu-storage-daemon && " +
                "{ ./qemu-storage-daemon --blockdev driver=file,node-name=f,filename=vu.img " +
                "--export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=blk.sock,writable=on >qsd.out 2>&1 & } && " +
                "n=0; while [ ! -S blk.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; " +
                "./vmm run --kernel vmlinuz --initrd vhost-initramfs.cpio.gz --memory 256M --cmdline 'console=ttyS0 quiet panic=-1 rdinit=/init vmm.vhost=blk' " +
                "--disk vhost_user=on,socket=blk.sock --log-level info; rc=$?; kill %1 2>/dev/null; echo; " +
                "echo \"@@SECTOR1000 $(dd if=vu.img bs=512 skip=1000 count=1 2>/dev/null | head -c 16)\"; echo @@QSD; cat qsd.out; exit $rc"),
            // PCI hotplug through the API and ACPI (KvmHotplugTests): a disk, a NIC and a test GPU added to a running
            // Linux that booted with no PCI devices, used by it, and removed again.
            new("linux-hotplug", [], Shell: "unshare -n sh ./hotplug.sh"),
            // Every device at once, cold-plugged, with the seccomp filters on (AllDevicesScenario, KvmSeccompTests).
            new("linux-all-devices", [], Shell: "unshare -n sh ./all-devices.sh"),
            // vmm jail (KvmJailTests): a Linux boot under the jailer with every restriction on, its process state read from
            // the nested host while the VM runs, and the jailed vmm's own attempts to reach host files (the probe hook).
            new("jail-linux", [], Shell: KvmJailTests.Script),
            // With a busybox initramfs whose /init powers off: ACPI S5 ends vmm with status 0.
            new("linux-initramfs", ["run", "--kernel", "vmlinuz", "--initrd", "initramfs.cpio.gz", "--memory", "256M",
                "--cpus", "2", "--cmdline", InitramfsCommandLine, "--log-level", "info"]),
        ]));
    }

    /// <summary>VMM_TEST_SCENARIOS=name,prefix*,... runs only those scenarios (while working on one; the tests of the
    /// others then fail for lack of a result). Unset: all.</summary>
    private static List<VmmScenario> Selected(List<VmmScenario> all)
    {
        string? only = Environment.GetEnvironmentVariable("VMM_TEST_SCENARIOS");
        if (string.IsNullOrEmpty(only))
            return all;
        var patterns = only.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        return all.Where(s => patterns.Any(p => p.EndsWith('*') ? s.Name.StartsWith(p[..^1], StringComparison.Ordinal) : s.Name == p)).ToList();
    }

    /// <summary>Starts <paramref name="count"/> test GPU servers (gpuN.sock, reports in gpuN.report) and waits for
    /// their sockets.</summary>
    private static string GpuServers(int count, string bar2Size) =>
        $"chmod +x vfio-user-gpu && for i in $(seq 1 {count}); do ./vfio-user-gpu --socket gpu$i.sock --bar2-size {bar2Size} " +
        "--report gpu$i.report >gpu$i.out 2>&1 & done; " +
        $"n=0; while [ $(ls gpu*.sock 2>/dev/null | wc -l) -lt {count} ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done; ";

    /// <summary>Waits for the servers (they exit when vmm disconnects) and prints their reports.</summary>
    private static string GpuReports(int count) =>
        $"wait; for i in $(seq 1 {count}); do echo \"@@REPORT $i\"; cat gpu$i.report; echo \"@@SERVER $i\"; cat gpu$i.out; done; exit $rc";

    /// <summary>A gzipped newc cpio with a static busybox at /bin/busybox, <paramref name="init"/> as /init, and
    /// whatever <paramref name="addFiles"/> puts under the root directory it is given.</summary>
    private static byte[] BusyboxInitramfs(string init, Action<string>? addFiles = null)
    {
        string dir = Directory.CreateTempSubdirectory("vmm-initramfs-").FullName;
        try
        {
            string root = Path.Combine(dir, "root");
            Directory.CreateDirectory(Path.Combine(root, "bin"));
            File.Copy("/bin/busybox", Path.Combine(root, "bin", "busybox"));
            addFiles?.Invoke(root);
            File.WriteAllText(Path.Combine(root, "init"), init);
            Repo.MustRun("chmod", "755", Path.Combine(root, "init"));
            Repo.MustRun("bash", "-c", $"cd '{root}' && find . | cpio -o -H newc --quiet | gzip -1 > '{dir}/initramfs.cpio.gz'");
            return File.ReadAllBytes(Path.Combine(dir, "initramfs.cpio.gz"));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    public const string GpuInitMarker = "vmm-linux-gpu:";

    /// <summary>A busybox initramfs whose /init lists the test GPUs Linux found (IDs and the resources it accepted for
    /// BAR0 and BAR2), enables each, writes and reads the first and last dword of its BAR2 through /dev/mem, prints
    /// what the kernel said about BARs and the host bridge windows, and powers off.</summary>
    private static byte[] GpuInitramfs()
    {
        string m = GpuInitMarker;
        return BusyboxInitramfs($$"""
                #!/bin/busybox sh
                B=/bin/busybox
                $B mkdir -p /proc /sys /dev
                $B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
                for d in /sys/bus/pci/devices/*; do
                  [ "$($B cat $d/vendor):$($B cat $d/device)" = "0x1b36:0x7001" ] || continue
                  n=$($B basename $d)
                  bar0=$($B sed -n 1p $d/resource); bar2=$($B sed -n 3p $d/resource)
                  echo "{{m}} gpu $n class $($B cat $d/class) bar0 $bar0 bar2 $bar2"
                  echo 1 > $d/enable
                  start=$(echo $bar2 | $B cut -d' ' -f1); end=$(echo $bar2 | $B cut -d' ' -f2)
                  last=$(( end - 3 ))
                  $B devmem $start 32 0x600d0001; $B devmem $(printf 0x%x $last) 32 0x600d0002
                  echo "{{m}} gpu $n bar2 first $($B devmem $start 32) last $($B devmem $(printf 0x%x $last) 32)"
                done
                $B dmesg | $B grep -iE 'BAR|root bus resource|PCI0|no space|failed to assign|can.t claim' | while read l; do echo "{{m}} dmesg $l"; done
                echo "{{m}} done"
                $B poweroff -f

                """);
    }

    /// <summary>Puts the modules tools/nested-kvm keeps for test guests (virtio, ACPI button, evdev: its
    /// virtio-modules/, with load-order) under /lib/modules of an initramfs root.</summary>
    private static void AddGuestModules(string root)
    {
        string modules = Path.Combine(Path.GetDirectoryName(StockKernel())!, "virtio-modules");
        Directory.CreateDirectory(Path.Combine(root, "lib", "modules"));
        foreach (var f in Directory.GetFiles(modules))
            File.Copy(f, Path.Combine(root, "lib", "modules", Path.GetFileName(f)));
    }

    /// <summary>Guest shell lines that write <paramref name="line"/> to /dev/hvc0 as one write, newline included:
    /// with output processing off (-opost), n_tty hands the whole line to the driver at once, where ONLCR would send
    /// the text and then "\r\n" separately. The port stays open throughout because hvc resets its termios on the last
    /// close.</summary>
    internal static string EchoToVirtioConsole(string line) => $"""
        exec 3<>/dev/hvc0
        $B stty -opost <&3
        echo "{line}" >&3
        exec 3>&-
        """;

    /// <summary>The guest's output with its one virtio-console line taken out: the serial stream as the guest wrote it.
    /// With `--console virtio` the console port shares the UART's sink. The UART's bytes leave as the guest's 8250
    /// driver drains its tty buffer, one THRE interrupt at a time, while a write to /dev/hvc0 is sent at once as one
    /// chain, which vmm puts in the sink whole. So a hvc0 line can land inside a serial line that the guest wrote before it.
    /// One CI run gave "eth0 up" + "…hello on hvc0\n" + " 52:54:…". Asserts that <paramref name="line"/>, written by
    /// <see cref="EchoToVirtioConsole"/>, arrived whole with its newline, exactly once.</summary>
    internal static string WithoutVirtioConsoleLine(string output, string line)
    {
        string whole = line + "\n";
        int at = output.IndexOf(whole, StringComparison.Ordinal);
        Assert.True(at >= 0 && output.IndexOf(whole, at + 1, StringComparison.Ordinal) < 0,
            $"the virtio console's line '{line}' should arrive whole, once\n{output}");
        return output.Remove(at, whole.Length);
    }

    /// <summary>The start of an /init that uses the kept modules (<see cref="AddGuestModules"/>): mounts proc, sysfs and
    /// devtmpfs, loads every module in load order (saying which failed, after <paramref name="marker"/>) and waits up
    /// to 10 s for /dev/vda (with <paramref name="waitForDisk"/>). $B is busybox.</summary>
    internal static string ModulesInitPrologue(string marker, bool waitForDisk = true) => $$"""
        #!/bin/busybox sh
        B=/bin/busybox
        $B mkdir -p /proc /sys /dev
        $B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
        for mod in $($B cat /lib/modules/load-order); do $B insmod /lib/modules/$mod.ko || echo "{{marker}} insmod $mod failed"; done
        {{(waitForDisk ? "n=0; while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do $B sleep 0.2; n=$((n+1)); done" : "")}}
        """;

    public const string ApiInitMarker = "vmm-api:";

    /// <summary>A busybox initramfs for the lifecycle scenario: loads the virtio, ACPI button and evdev modules, reads
    /// the disk (for vm.counters), prints a tick every 0.2 s (so a pause shows), waits for the power button's
    /// KEY_POWER event, reports any soft lockup the kernel logged and powers off.</summary>
    private static byte[] ApiInitramfs() => BusyboxInitramfs(ApiInitScript(), AddGuestModules);

    /// <summary>/init of <see cref="ApiInitramfs"/>.</summary>
    internal static string ApiInitScript()
    {
        string m = ApiInitMarker;
        return $$"""
                {{ModulesInitPrologue(m)}}
                $B dd if=/dev/vda of=/dev/null bs=4096 count=16 2>/dev/null && echo "{{m}} read the disk"
                ev=
                for i in /sys/class/input/input*; do
                  [ "$($B cat $i/name 2>/dev/null)" = "Power Button" ] && ev=$($B basename $($B ls -d $i/event* | $B head -n 1))
                done
                echo "{{m}} power button ${ev:-missing}"
                ( i=0; while true; do echo "{{m}} tick $i"; i=$((i+1)); $B sleep 0.2; done ) &
                echo "{{m}} ticking"
                $B dd if=/dev/input/$ev of=/dev/null bs=24 count=1 2>/dev/null
                echo "{{m}} power button pressed"
                $B dmesg | $B grep -iE 'soft lockup|hard lockup|watchdog: BUG' | while read l; do echo "{{m}} dmesg $l"; done
                echo "{{m}} powering off"
                $B poweroff -f

                """;
    }

    public const string LinuxCommandLine = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 vmm.test=linux-boot";
    public const string InitramfsCommandLine = "console=ttyS0 panic=-1 rdinit=/init vmm.test=initramfs";
    public const string InitramfsMarker = "vmm-initramfs: /init ran, powering off";

    /// <summary>/init (a busybox shell script that prints a marker and powers off) and a static busybox
    /// (Debian busybox-static), packed with cpio as the kernel wants it.</summary>
    private static byte[] BusyboxInitramfs() =>
        BusyboxInitramfs($"#!/bin/busybox sh\n/bin/busybox echo '{InitramfsMarker}'\n/bin/busybox poweroff -f\n");

    public const string VirtioInitMarker = "vmm-linux-virtio:";

    /// <summary>A busybox initramfs whose /init loads Linux's virtio-pci drivers (the modules tools/nested-kvm keeps
    /// from the same kernel package), exercises the disk, entropy, network and console devices, lists the
    /// virtio interrupts and powers off.</summary>
    private static byte[] VirtioInitramfs()
    {
        string m = VirtioInitMarker;
        return BusyboxInitramfs($$"""
                {{ModulesInitPrologue(m)}}
                echo "{{m}} vda $($B cat /sys/block/vda/size) sectors, serial $($B cat /sys/block/vda/serial)"
                echo "{{m}} sector 5: $($B dd if=/dev/vda bs=512 skip=5 count=1 2>/dev/null | $B od -An -tx1 | $B head -n 1)"
                echo "linux-wrote-this" | $B dd of=/dev/vda bs=512 seek=1000 conv=fsync 2>/dev/null && echo "{{m}} wrote sector 1000"
                echo "{{m}} rng $($B cat /sys/class/misc/hw_random/rng_current) $($B dd if=/dev/hwrng bs=16 count=1 2>/dev/null | $B od -An -tx1)"
                echo "{{m}} net $($B cat /sys/class/net/eth0/address)"
                $B ip link set eth0 up && echo "{{m}} eth0 up"
                {{EchoToVirtioConsole($"{m} hello on hvc0")}}
                $B grep virtio /proc/interrupts | while read l; do echo "{{m}} irq $l"; done
                echo "{{m}} done"
                $B poweroff -f

                """, AddGuestModules);
    }

    public const string VhostInitMarker = "vmm-vhost:";

    /// <summary>A busybox initramfs for the vhost-user scenarios: loads the kept modules (virtio, fuse, virtiofs), then
    /// with vmm.vhost=fs mounts the virtio-fs tag "hostshare", reads the host's file and writes one for the host to
    /// check; with vmm.vhost=blk reads /dev/vda and writes sector 1000. Lists the virtio interrupts, powers off.</summary>
    private static byte[] VhostUserInitramfs()
    {
        string m = VhostInitMarker;
        return BusyboxInitramfs($$"""
                {{ModulesInitPrologue(m, waitForDisk: false)}}
                $B mkdir -p /mnt
                case "$($B cat /proc/cmdline)" in
                *vmm.vhost=fs*)
                  $B mount -t virtiofs hostshare /mnt && echo "{{m}} mounted hostshare"
                  echo "{{m}} host file: $($B cat /mnt/from-host.txt)"
                  echo guest-wrote-this > /mnt/from-guest.txt && $B sync && echo "{{m}} wrote from-guest.txt"
                  echo "{{m}} ls: $($B ls /mnt | $B tr '\n' ' ')"
                  $B umount /mnt && echo "{{m}} unmounted"
                  ;;
                *vmm.vhost=blk*)
                  n=0; while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do $B sleep 0.2; n=$((n+1)); done
                  echo "{{m}} vda $($B cat /sys/block/vda/size) sectors"
                  echo "{{m}} sector 5: $($B dd if=/dev/vda bs=512 skip=5 count=1 2>/dev/null | $B od -An -tx1 | $B head -n 1)"
                  echo "linux-wrote-this" | $B dd of=/dev/vda bs=512 seek=1000 conv=fsync 2>/dev/null && echo "{{m}} wrote sector 1000"
                  ;;
                esac
                $B grep virtio /proc/interrupts | while read l; do echo "{{m}} irq $l"; done
                echo "{{m}} done"
                $B poweroff -f

                """, AddGuestModules);
    }

    public const string VsockInitMarker = "vmm-linux-vsock:";

    /// <summary>A busybox initramfs whose /init loads the kept modules (virtio-pci, vsock and its virtio transport),
    /// serves one host-initiated connection on vsock port 5000 with vsock-peer (echo, transformed), connects to host
    /// port 7000 and exchanges 300000 bytes, and powers off.</summary>
    private static byte[] VsockInitramfs()
    {
        string m = VsockInitMarker;
        return BusyboxInitramfs($$"""
                {{ModulesInitPrologue(m, waitForDisk: false)}}
                echo "{{m}} modules loaded, $($B ls /dev/vsock)"
                /bin/vsock-peer guest-serve 5000
                /bin/vsock-peer guest-connect 7000 300000
                echo "{{m}} done"
                $B poweroff -f

                """, AddGuestModulesAndVsockPeer);
    }

    /// <summary><see cref="AddGuestModules"/> and guest-images' vsock-peer at /bin/vsock-peer.</summary>
    private static void AddGuestModulesAndVsockPeer(string root)
    {
        AddGuestModules(root);
        File.Copy(Repo.PathTo("guest-images", "build", "vsock-peer"), Path.Combine(root, "bin", "vsock-peer"));
        Repo.MustRun("chmod", "755", Path.Combine(root, "bin", "vsock-peer"));
    }

    /// <summary>The Debian cloud kernel tools/nested-kvm fetches (apt-get download) and caches.</summary>
    public static string StockKernel()
    {
        Repo.MustRun(Repo.PathTo("tools", "nested-kvm", "run-in-vm.sh"), "--prepare");
        string cache = Environment.GetEnvironmentVariable("NESTED_KVM_CACHE")
            ?? Path.Combine(Environment.GetEnvironmentVariable("XDG_CACHE_HOME") ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache"), "vmm-nested-kvm");
        return Directory.GetFiles(cache, "vmlinuz", SearchOption.AllDirectories)
            .OrderByDescending(File.GetLastWriteTimeUtc).FirstOrDefault()
            ?? throw new InvalidOperationException($"no vmlinuz under {cache} after run-in-vm.sh --prepare");
    }

    private static string PublishTestGpu()
    {
        string output = Repo.PathTo("artifacts", "test-gpu");
        Repo.MustRun("dotnet", "publish", Repo.PathTo("tests", "Vmm.TestGpu"), "-c", "Release", "-o", output, "--nologo");
        return Path.Combine(output, "vfio-user-gpu");
    }
}

/// <summary>Tiny guests assembled with Iced for exit edge cases. Each exits through port 0xf4: 0 (status 1)
/// on success, a check number on failure.</summary>
public static class MicroGuests
{
    private static void Exit(Assembler a, uint value)
    {
        a.mov(dx, 0xF4);
        a.mov(eax, value);
        a.@out(dx, eax);
        a.hlt();
    }

    /// <summary>1/2/4-byte port I/O both ways, unclaimed ports, rep outsb to COM1, rep insb from the UART
    /// scratch register, and a final 2-byte write to the debug-exit port.</summary>
    public static byte[] PortIo()
    {
        const uint text = ImageBuilder.Guest32Data, buffer = ImageBuilder.Guest32Data + 0x100;
        byte[] message = Encoding.ASCII.GetBytes("rep-outsb-ok\n");
        var data = new byte[0x200];
        message.CopyTo(data, 0);
        return ImageBuilder.Guest32(a =>
        {
            var fails = Enumerable.Range(0, 6).Select(_ => a.CreateLabel()).ToArray();
            a.mov(dx, 0x3FF); a.mov(al, 0x5A); a.@out(dx, al);          // 1-byte out: UART scratch
            a.xor(eax, eax); a.@in(al, dx); a.cmp(al, 0x5A); a.jne(fails[1]); // 1-byte in
            a.mov(dx, 0x200); a.@in(ax, dx); a.cmp(ax, 0xFFFF); a.jne(fails[2]); // unclaimed 2-byte in: all ones
            a.@in(eax, dx); a.cmp(eax, -1); a.jne(fails[3]);               // unclaimed 4-byte in
            a.mov(dx, 0x3FF); a.@in(ax, dx); a.cmp(ax, 0xFF5A); a.jne(fails[4]); // byte register, wide read
            a.cld();
            a.mov(esi, text); a.mov(ecx, (uint)message.Length); a.mov(dx, 0x3F8); a.rep.outsb(); // string out
            a.mov(edi, buffer); a.mov(ecx, 4); a.mov(dx, 0x3FF); a.rep.insb(); // string in
            a.cmp(__dword_ptr[buffer], 0x5A5A5A5A); a.jne(fails[5]);
            a.mov(dx, 0xF4); a.mov(ax, 0x21); a.@out(dx, ax);              // 2-byte debug exit: status 0x43
            a.hlt();
            for (uint i = 1; i < fails.Length; i++)
            {
                a.Label(ref fails[i]);
                Exit(a, i);
            }
        }, data);
    }

    /// <summary>Long-mode MMIO reads and writes of 1, 2, 4 and 8 bytes to an unclaimed address in the MMIO hole, outside the PCI windows.</summary>
    public static byte[] Mmio64() => ImageBuilder.Guest64(a =>
    {
        var fail = a.CreateLabel();
        a.mov(rbx, 0xF000_0000UL); // in the hole, outside the PCI windows and ECAM
        a.mov(al, __byte_ptr[rbx]); a.cmp(al, 0xFF); a.jne(fail);
        a.mov(ax, __word_ptr[rbx]); a.cmp(ax, 0xFFFF); a.jne(fail);
        a.mov(eax, __dword_ptr[rbx]); a.cmp(eax, -1); a.jne(fail);
        a.mov(rax, __qword_ptr[rbx]); a.cmp(rax, -1); a.jne(fail);
        a.mov(__byte_ptr[rbx], 1); a.mov(__word_ptr[rbx], 2); a.mov(__dword_ptr[rbx], 3); a.mov(__qword_ptr[rbx], 4);
        Exit(a, 0);
        a.Label(ref fail);
        Exit(a, 9);
    });

    /// <summary>An empty IDT and an int3: #BP → #GP → #DF → triple fault.</summary>
    public static byte[] TripleFault() => ImageBuilder.Guest32(a =>
    {
        a.push(0); a.push(0);
        a.lidt(__[esp]);
        a.int3();
    });

    public static byte[] Halt() => ImageBuilder.Guest32(a => { a.cli(); a.hlt(); });

    /// <summary><paramref name="count"/> one-byte writes to the POST-code port, then exit 0.</summary>
    public static byte[] PortLoop(uint count) => ImageBuilder.Guest32(a =>
    {
        var loop = a.CreateLabel();
        a.mov(ecx, count);
        a.Label(ref loop);
        a.@out(0x80, al);
        a.dec(ecx); a.jnz(loop);
        Exit(a, 0);
    });

    /// <summary>The i8042 reset command.</summary>
    public static byte[] Reset() => ImageBuilder.Guest32(a =>
    {
        a.mov(al, 0xFE); a.@out(0x64, al);
        a.cli(); a.hlt();
    });

    /// <summary>Reads COM1 until a newline, echoing letters upper-cased; bounded so no input cannot hang it.</summary>
    public static byte[] Echo() => ImageBuilder.Guest32(a =>
    {
        var poll = a.CreateLabel(); var got = a.CreateLabel(); var send = a.CreateLabel(); var done = a.CreateLabel(); var timeout = a.CreateLabel();
        a.mov(edi, 2_000_000);
        a.Label(ref poll);
        a.dec(edi); a.jz(timeout);
        a.mov(dx, 0x3FD); a.@in(al, dx); a.test(al, 1); a.jz(poll);
        a.Label(ref got);
        a.mov(dx, 0x3F8); a.@in(al, dx);
        a.cmp(al, 0x0A); a.je(done);
        a.cmp(al, (byte)'a'); a.jb(send);
        a.cmp(al, (byte)'z'); a.ja(send);
        a.sub(al, 0x20);
        a.Label(ref send);
        a.@out(dx, al);
        a.jmp(poll);
        a.Label(ref done);
        a.mov(al, 0x0A); a.@out(dx, al);
        Exit(a, 0);
        a.Label(ref timeout);
        Exit(a, 5);
    });
}

[CollectionDefinition("kvm")]
public sealed class KvmCollection : ICollectionFixture<KvmFixture>;
