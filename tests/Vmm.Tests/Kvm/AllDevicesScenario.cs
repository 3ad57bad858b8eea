namespace Vmm.Tests.Kvm;

/// <summary>Issue 12's acceptance scenario: one stock Linux boot with every device vmm has — virtio-blk, vhost-user-blk
/// (qemu-storage-daemon), virtio-net (a tap), virtio-rng, virtio-console, virtio-vsock, virtio-fs (virtiofsd), a
/// vfio-user GPU, the API socket, the event monitor, the serial console on 2 vCPUs — all cold-plugged, with the seccomp
/// filters on (the default). The guest's /init uses each device once; while it waits, the script reads every vmm
/// thread's seccomp mode from /proc and asks the API for the VM's info (KvmSeccompTests). Run with sh in the scenario
/// directory, inside `unshare -n` for the tap.</summary>
public static class AllDevicesScenario
{
    public const string Marker = "vmm-all:";

    public const string Script = """
        chmod +x vfio-user-gpu virtiofsd qemu-storage-daemon vsock-peer
        cp disk.img ad.img && cp disk.img vu.img
        mkdir -p share && echo host-wrote-this > share/from-host.txt
        ./vfio-user-gpu --socket gpu1.sock --bar2-size 8G --report gpu1.report >gpu1.out 2>&1 &
        ./virtiofsd --socket-path=fs.sock -o source=$PWD/share -o cache=none -o sandbox=chroot >virtiofsd.out 2>&1 &
        ./qemu-storage-daemon --blockdev driver=file,node-name=f,filename=vu.img \
          --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=blk.sock,writable=on >qsd.out 2>&1 &
        QSD=$!
        ./vsock-peer host-serve v.sock_7000 >serve.out 2>&1 &
        n=0; while { [ ! -S gpu1.sock ] || [ ! -S fs.sock ] || [ ! -S blk.sock ]; } && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
        ./vmm run --kernel vmlinuz --initrd all-initramfs.cpio.gz --memory 256M --cpus 2 --cmdline 'console=ttyS0 quiet panic=-1 rdinit=/init' \
          --disk path=ad.img,serial=all-disk --disk vhost_user=on,socket=blk.sock --net tap=tap0,mac=52:54:00:12:34:56 \
          --rng --console virtio --vsock cid=3,socket=v.sock --fs tag=hostshare,socket=fs.sock --device vfio-user=gpu1.sock \
          --serial file:console.log --api-socket all.sock --event-monitor path=events.json --log-level info >vmm.out 2>vmm.err &
        VPID=$!
        # Waits up to $2 seconds for a console line matching $1.
        wait_for() { n=0; while ! grep -q "$1" console.log 2>/dev/null && [ $n -lt $(($2 * 5)) ]; do sleep 0.2; n=$((n+1)); done; }
        wait_for 'vmm-all: snapshot' 240
        # Every thread of vmm with its seccomp mode (2 = filter) and how many filters it has (the process filter, plus its
        # role's) while every device is in use.
        echo "@@THREADS"; for t in /proc/$VPID/task/*; do echo "$(cat $t/comm)|$(grep Seccomp: $t/status | tr -d '\t ')|$(grep Seccomp_filters: $t/status | tr -d '\t ')"; done; echo "@@END-THREADS"
        ./vmm remote --api-socket all.sock info >info.json 2>&1; echo "@@INFO-RC $?"
        wait_for 'vmm-all: done' 60
        # The guest powers off; with an API socket the process stays until vmm.shutdown.
        n=0; while ! ./vmm remote --api-socket all.sock info 2>/dev/null | grep -q '"state":"Shutdown"' && [ $n -lt 150 ]; do sleep 0.2; n=$((n+1)); done
        ./vmm remote --api-socket all.sock shutdown-vmm >/dev/null 2>&1
        wait $VPID
        echo "@@VMM-EXIT $?"
        kill $QSD $(jobs -p) 2>/dev/null
        echo "@@SECTOR1000-BLK $(dd if=ad.img bs=512 skip=1000 count=1 2>/dev/null | head -c 16)"
        echo "@@SECTOR1000-VHOST $(dd if=vu.img bs=512 skip=1000 count=1 2>/dev/null | head -c 16)"
        echo "@@GUESTFILE $(cat share/from-guest.txt 2>&1)"
        echo "@@INFO"; cat info.json; echo
        echo "@@SERVE"; cat serve.out
        echo "@@VMM-OUT"; cat vmm.out
        echo "@@VMM-ERR"; cat vmm.err; echo "@@END-VMM-ERR"
        echo "@@CONSOLE"; cat console.log
        echo "@@GPU"; cat gpu1.report gpu1.out
        """;

    /// <summary>/init: loads the kept modules, then uses every device once — both disks (size, serial, a write of
    /// sector 1000), entropy, the NIC, the virtio console, a vsock connection to host port 7000, the virtio-fs share
    /// (read the host's file, write one), the test GPU's BAR2 through /dev/mem — says "snapshot", waits 4 s for the host
    /// to look at vmm's threads, and powers off.</summary>
    internal static string InitScript()
    {
        string m = Marker;
        return $$"""
            {{KvmFixture.ModulesInitPrologue(m)}}
            $B mkdir -p /mnt
            for b in /sys/block/vd*; do
              d=$($B basename $b)
              echo "{{m}} disk $d $($B cat $b/size) sectors serial '$($B cat $b/serial 2>/dev/null)'"
              echo "linux-wrote-$d" | $B dd of=/dev/$d bs=512 seek=1000 conv=fsync 2>/dev/null && echo "{{m}} wrote $d"
            done
            echo "{{m}} rng $($B cat /sys/class/misc/hw_random/rng_current) $($B dd if=/dev/hwrng bs=16 count=1 2>/dev/null | $B od -An -tx1)"
            # virtio_net may register eth0 a little after insmod returns (one CI run found none yet): wait up to 10 s.
            n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do $B sleep 0.2; n=$((n+1)); done
            $B ip link set eth0 up && echo "{{m}} eth0 up $($B cat /sys/class/net/eth0/address)" || echo "{{m}} eth0 failed: $($B ls /sys/class/net | $B tr '\n' ' ')"
            {{KvmFixture.EchoToVirtioConsole($"{m} hello on hvc0")}}
            /bin/vsock-peer guest-connect 7000 30000 | while read l; do echo "{{m}} $l"; done
            $B mount -t virtiofs hostshare /mnt && echo "{{m}} fs read $($B cat /mnt/from-host.txt)"
            echo all-devices-guest-wrote-this > /mnt/from-guest.txt && $B sync && $B umount /mnt && echo "{{m}} fs written"
            for d in /sys/bus/pci/devices/*; do
              [ "$($B cat $d/vendor):$($B cat $d/device)" = "0x1b36:0x7001" ] || continue
              bar2=$($B sed -n 3p $d/resource); start=$(echo $bar2 | $B cut -d' ' -f1)
              echo 1 > $d/enable
              $B devmem $start 32 0x600d0001
              echo "{{m}} gpu bar2 first $($B devmem $start 32)"
            done
            echo "{{m}} virtio irqs $($B grep -c virtio /proc/interrupts)"
            echo "{{m}} snapshot"
            $B sleep 4
            echo "{{m}} done"
            $B poweroff -f

            """;
    }
}
