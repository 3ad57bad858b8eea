namespace Vmm.Tests.Kvm;

/// <summary>The PCI hotplug scenario (KvmHotplugTests): a stock Linux booted with no PCI devices and an API socket; the
/// script (run with sh in the scenario directory, inside `unshare -n` for the tap) hot-adds a disk, a NIC and a test GPU
/// through `vmm remote`, waits for the guest's /init to report each, then removes them. Markers: <c>@@ CMD</c> before
/// each `vmm remote` command, then its output and <c>@@rc N</c> (as ApiScenario's).</summary>
public static class HotplugScenario
{
    public const string Marker = "vmm-hotplug:";

    public const string Script = """
        S=hp.sock
        chmod +x vfio-user-gpu
        # gpu1: an 8 GiB BAR2 (fits the default 64 GiB window); gpu2: 128 GiB (does not: a clear error).
        ./vfio-user-gpu --socket gpu1.sock --bar2-size 8G --report gpu1.report >gpu1.out 2>&1 &
        ./vfio-user-gpu --socket gpu2.sock --bar2-size 128G --report gpu2.report >gpu2.out 2>&1 &
        n=0; while [ $(ls gpu*.sock 2>/dev/null | wc -l) -lt 2 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
        cp disk.img hp.img
        # The virtio-fs back-end for vm.add-fs (sandbox=chroot: pivot_root fails on this VM's initramfs root).
        mkdir -p share && echo host-wrote-this > share/from-host.txt && chmod +x virtiofsd
        ./virtiofsd --socket-path=fs.sock -o source=$PWD/share -o cache=none -o sandbox=chroot >virtiofsd.out 2>&1 &
        ./vmm run --kernel vmlinuz --initrd hotplug-initramfs.cpio.gz --memory 256M --cmdline 'console=ttyS0 panic=-1 rdinit=/init' \
          --serial file:console.log --api-socket $S --event-monitor path=events.json --log-level info 2>vmm.err &
        VPID=$!
        r() { echo "@@ $*"; ./vmm remote --api-socket $S "$@" 2>&1; echo "@@rc $?"; }
        # Waits up to $2 seconds for a console line matching $1.
        wait_for() { n=0; while ! grep -q "$1" console.log 2>/dev/null && [ $n -lt $(($2 * 5)) ]; do sleep 0.2; n=$((n+1)); done; }
        wait_for 'vmm-hotplug: ready' 180
        r add-disk path=hp.img,serial=hotplug-disk,id=hpdisk
        wait_for 'vmm-hotplug: up blk' 60
        r add-net tap=tap0,mac=52:54:00:12:34:57
        wait_for 'vmm-hotplug: up net' 60
        r add-user-device socket=gpu2.sock,id=biggpu
        r add-user-device socket=gpu1.sock,id=gpu
        wait_for 'vmm-hotplug: gpu bar2' 60
        # seccomp (default on): every thread of vmm, with its filter mode (2 = filter) and how many filters it has (the
        # process filter, plus its role's), while the disk, NIC and GPU are in.
        echo "@@THREADS"; for t in /proc/$VPID/task/*; do echo "$(cat $t/comm)|$(grep Seccomp: $t/status | tr -d '\t ')|$(grep Seccomp_filters: $t/status | tr -d '\t ')"; done; echo "@@END-THREADS"
        r add-disk path=hp.img,id=hpdisk
        r info
        r remove-device hpdisk
        r remove-device _net0
        r remove-device gpu
        r remove-device hpdisk
        r info
        # A back-end "socket" that is a regular file or a directory: one line saying so, as at boot (not "Connection refused").
        r add-fs tag=badfs,socket=console.log,id=badfs
        r add-user-device socket=share,id=badgpu
        # The vhost-user and vsock devices take the same path: the slots the others left.
        r add-fs tag=hpshare,socket=fs.sock,id=hpfs
        wait_for 'vmm-hotplug: fs done' 60
        r add-vsock cid=3,socket=vs.sock,id=hpvsock
        wait_for 'vmm-hotplug: vsock driver' 60
        r remove-device hpfs
        r remove-device hpvsock
        wait_for 'vmm-hotplug: done' 60
        # The guest powers off; with an API socket the process stays until vmm.shutdown.
        n=0; while ! ./vmm remote --api-socket $S info 2>/dev/null | grep -q '"state":"Shutdown"' && [ $n -lt 150 ]; do sleep 0.2; n=$((n+1)); done
        r shutdown-vmm
        wait $VPID
        echo "@@VMM-EXIT $?"
        wait
        echo "@@SECTOR1 $(dd if=hp.img bs=512 skip=1 count=1 2>/dev/null | head -c 16)"
        echo "@@GUESTFILE $(cat share/from-guest.txt 2>&1)"
        echo "@@VSOCKSOCKET $([ -e vs.sock ] && echo left || echo gone)"
        echo "@@CONSOLE"; cat console.log
        echo "@@EVENTS"; cat events.json
        echo "@@VMM-STDERR"; cat vmm.err
        for i in 1 2; do echo "@@REPORT $i"; cat gpu$i.report; echo "@@SERVER $i"; cat gpu$i.out; done
        """;

    /// <summary>/init: loads the virtio modules, says it is ready, and for each device the host adds (virtio-blk
    /// 1af4:1042, virtio-net 1af4:1041, the test GPU 1b36:7001) waits until it is in /sys/bus/pci/devices, prints its
    /// address, ids and class, and uses it: reads sector 1 of the disk and writes sector 2, reads the NIC's MAC, writes
    /// the first and last dword of the GPU's BAR2 through /dev/mem. Then waits until all three are gone and powers
    /// off.</summary>
    internal static string InitScript()
    {
        string m = Marker;
        return $$"""
            #!/bin/busybox sh
            B=/bin/busybox
            $B mkdir -p /proc /sys /dev
            $B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
            for mod in $($B cat /lib/modules/load-order); do $B insmod /lib/modules/$mod.ko 2>/dev/null || echo "{{m}} insmod $mod failed"; done
            # find ID: the sysfs directory of the PCI device with vendor:device ID, if any.
            find() { for d in /sys/bus/pci/devices/*; do [ "$($B cat $d/vendor):$($B cat $d/device)" = "$1" ] && { echo $d; return 0; }; done; return 1; }
            # up NAME ID: waits up to 60 s for the device, then prints what lspci would.
            up() {
              n=0; while ! find $2 >/dev/null && [ $n -lt 300 ]; do $B sleep 0.2; n=$((n+1)); done
              d=$(find $2) || { echo "{{m}} missing $1"; return 1; }
              echo "{{m}} up $1 $($B basename $d) $($B cat $d/vendor):$($B cat $d/device) class $($B cat $d/class)"
            }
            echo "{{m}} ready"
            if up blk 0x1af4:0x1042; then
              n=0; while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do $B sleep 0.2; n=$((n+1)); done
              echo "{{m}} vda serial $($B cat /sys/block/vda/serial) sector 1: $($B dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | $B od -An -tx1 | $B head -n 1)"
            fi
            if up net 0x1af4:0x1041; then
              n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do $B sleep 0.2; n=$((n+1)); done
              echo "{{m}} eth0 $($B cat /sys/class/net/eth0/address)"
            fi
            if up gpu 0x1b36:0x7001; then
              d=$(find 0x1b36:0x7001)
              bar2=$($B sed -n 3p $d/resource)
              echo 1 > $d/enable
              start=$(echo $bar2 | $B cut -d' ' -f1); end=$(echo $bar2 | $B cut -d' ' -f2)
              last=$(( end - 3 ))
              $B devmem $start 32 0x600d0001; $B devmem $($B printf 0x%x $last) 32 0x600d0002
              echo "{{m}} gpu bar2 $bar2 first $($B devmem $start 32) last $($B devmem $($B printf 0x%x $last) 32)"
            fi
            for dev in blk:0x1af4:0x1042 net:0x1af4:0x1041 gpu:0x1b36:0x7001; do
              name=${dev%%:*}; id=${dev#*:}
              n=0; while find $id >/dev/null && [ $n -lt 300 ]; do $B sleep 0.2; n=$((n+1)); done
              find $id >/dev/null && echo "{{m}} still there $name" || echo "{{m}} gone $name"
            done
            [ -b /dev/vda ] && echo "{{m}} vda still there" || echo "{{m}} vda gone"
            [ -e /sys/class/net/eth0 ] && echo "{{m}} eth0 still there" || echo "{{m}} eth0 gone"
            # Then a virtio-fs share (1af4:105a) and a vsock device (1af4:1053), each in the slot the others left.
            if up fs 0x1af4:0x105a; then
              $B mkdir -p /mnt
              n=0; until $B mount -t virtiofs hpshare /mnt 2>/dev/null || [ $n -ge 25 ]; do $B sleep 0.2; n=$((n+1)); done
              echo "{{m}} fs read $($B cat /mnt/from-host.txt)"
              echo hotplug-guest-wrote-this > /mnt/from-guest.txt && $B sync
              $B umount /mnt && echo "{{m}} fs unmounted"
            fi
            echo "{{m}} fs done"
            if up vsock 0x1af4:0x1053; then
              d=$(find 0x1af4:0x1053)
              n=0; while ! $B ls $d/virtio*/driver >/dev/null 2>&1 && [ $n -lt 50 ]; do $B sleep 0.2; n=$((n+1)); done
              echo "{{m}} vsock driver $($B basename $($B readlink $d/virtio*/driver))"
            fi
            for dev in fs:0x1af4:0x105a vsock:0x1af4:0x1053; do
              name=${dev%%:*}; id=${dev#*:}
              n=0; while find $id >/dev/null && [ $n -lt 300 ]; do $B sleep 0.2; n=$((n+1)); done
              find $id >/dev/null && echo "{{m}} still there $name" || echo "{{m}} gone $name"
            done
            $B dmesg | $B grep -iE 'acpiphp|pci 0000:00:0|GED|evged|hotplug|BAR|no space|failed' | while read l; do echo "{{m}} dmesg $l"; done
            echo "{{m}} done"
            $B poweroff -f

            """;
    }
}
