#!/bin/sh
# inner.sh - the measurement half of benchmarks/e2e/run.sh; runs INSIDE the nested-KVM guest
# (tools/nested-kvm/run-in-vm.sh), in the directory that run.sh staged:
#   vmm  kvm_exit_floor  runstat  pio-loop.bin  mmio-loop.bin  hello.bin  qemu/bin/qemu-system-x86_64 (optional)
#   vmlinuz  initramfs.cpio.gz (for the linux cases)
#
# Every case runs once per round, rounds interleave the cases (so a slow patch of the emulating host hits all
# of them alike), round 0 is a warm-up. One line per measurement on stdout, all starting with "E2E ":
#   E2E case=<name> round=<r> ok=<0|1> wall_ns=.. user_ns=.. sys_ns=.. maxrss_kb=.. rc=<rc> [per-exit fields]
# wall_ns .. maxrss_kb are the whole process's, from runstat (fork -> reaped, rusage of the child).
# Per-exit fields (exit-loop cases only), as the program itself reports them:
#   exits= wall_ns_per_exit= user_ns_per_exit= sys_ns_per_exit=
# Linux-boot cases (linux-*) add, from runstat -m: first_byte_ns= (first output byte), linux_ns= (the line
# with "Linux version") and init_ns= (the line /init prints before `poweroff -f`), all from fork.
# Environment: ROUNDS (measured rounds, default 7), EXITS (default 20000; must match the guests' loop count),
# QEMU_MACHINES (default "microvm pc"; empty to skip QEMU), CASES (default "exit start linux": which groups
# run; linux only where vmlinuz is staged), LINUX_QEMU_MACHINES (default "pc microvm"), LINUX_CMDLINE,
# LINUX_TIMEOUT (seconds per Linux run, default 300).
# virtio-blk cases (CASES=blk; needs virtio-test.elf): every round runs, for each bench case of the
# virtio-test guest (`bench bench-case=C`, C in BLK_CASES; "none" = boot, PCI, device setup and TSC
# calibration only, the exit baseline), vmm then QEMU (q35) on the same raw image in /tmp (tmpfs), made
# once with BLK_IMG_MB MiB of zeros (allocated, not sparse). Lines: E2E case=blk-vmm-C / blk-qemu-C ... with
# bench_us= bench_ios= bench_bs= bench_errors= (from the guest's BENCH line) and, for vmm, exits= pio= mmio=
# (--stats). BLK_IOS (random I/Os per case, default 500), BLK_QD (default 16), BLK_MIB (sequential MiB,
# default 16), BLK_TIMEOUT (seconds per run, default 300), BLK_QEMU_DRIVE (extra -drive options, default
# "cache=writeback,aio=threads": like vmm, buffered pread/pwrite on worker threads). Where the kernel has
# tracefs hist triggers, every blk run also gets the exits KVM itself saw (in-kernel ones included, for both
# programs): kx= (all) kx_npf= (nested page faults: MMIO, LAPIC) kx_io= kx_hlt= kx_intr= (SVM exit codes).
set -u
CASES=${CASES:-exit start linux}
LINUX_QEMU_MACHINES=${LINUX_QEMU_MACHINES-pc microvm}
LINUX_CMDLINE=${LINUX_CMDLINE:-console=ttyS0 panic=-1 rdinit=/init}
LINUX_TIMEOUT=${LINUX_TIMEOUT:-300}
INIT_MARKER='vmm-initramfs: /init ran, powering off'
has() { case " $CASES " in *" $1 "*) return 0 ;; esac; return 1; }
[ -e vmlinuz ] || CASES=$(echo " $CASES " | sed 's/ linux / /')
[ -e virtio-test.elf ] || CASES=$(echo " $CASES " | sed 's/ blk / /')
BLK_CASES=${BLK_CASES:-none randread4k-qd1 randread4k-qd16 randwrite4k-qd1 randwrite4k-qd16 seqwrite1m seqread1m}
BLK_IOS=${BLK_IOS:-500}
BLK_QD=${BLK_QD:-16}
BLK_MIB=${BLK_MIB:-16}
BLK_IMG_MB=${BLK_IMG_MB:-64}
BLK_TIMEOUT=${BLK_TIMEOUT:-300}
BLK_QEMU_DRIVE=${BLK_QEMU_DRIVE-cache=writeback,aio=threads}
BLK_IMG=/tmp/bench.img
ROUNDS=${ROUNDS:-7}
EXITS=${EXITS:-20000}
QEMU_MACHINES=${QEMU_MACHINES-microvm pc}
QEMU=./qemu/bin/qemu-system-x86_64
HELLO='hello from a multiboot micro-guest'
OUT=/tmp/e2e-out

echo "E2E-INFO kernel=$(uname -r) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')\" ncpu=$(grep -c ^processor /proc/cpuinfo)"
for p in npt nested avic; do
    [ -r /sys/module/kvm_amd/parameters/$p ] && echo "E2E-INFO kvm_amd.$p=$(cat /sys/module/kvm_amd/parameters/$p)"
done
if [ -n "$QEMU_MACHINES" ]; then
    if [ -x "$QEMU" ]; then
        echo "E2E-INFO qemu=\"$($QEMU --version 2>&1 | head -n1)\""
    else
        echo "E2E-INFO qemu=missing"
        QEMU_MACHINES=
    fi
fi

if has blk; then
    dd if=/dev/zero of=$BLK_IMG bs=1048576 count="$BLK_IMG_MB" 2>/dev/null
    echo "E2E-INFO blk: image $BLK_IMG ${BLK_IMG_MB} MiB of zeros on $(awk '$2 == "/tmp" {print $3}' /proc/mounts); guest args: bench bench-ios=$BLK_IOS bench-qd=$BLK_QD bench-mib=$BLK_MIB; qemu -drive ...,$BLK_QEMU_DRIVE"
fi

# In-kernel exit counts: a hist trigger on kvm:kvm_exit keyed by exit reason, cleared before each blk run.
KX=/sys/kernel/tracing/events/kvm/kvm_exit
kx_on=0
if has blk; then
    [ -e /sys/kernel/tracing/events ] || mount -t tracefs none /sys/kernel/tracing 2>/dev/null
    echo 'hist:keys=exit_reason' >"$KX/trigger" 2>/dev/null && kx_on=1
    echo "E2E-INFO blk: kvm_exit hist trigger $([ $kx_on = 1 ] && echo on || echo unavailable)"
fi
kx_clear() { [ $kx_on = 1 ] && echo 'hist:keys=exit_reason:clear' >>"$KX/trigger"; }
kx_read() { # SVM exit codes: 0x400 npf, 0x7b io, 0x78 hlt, 0x60 interrupt
    [ $kx_on = 1 ] && awk '/exit_reason:/ { gsub(/[{}]/, ""); n[$2] += $4; t += $4 }
        END { printf "kx=%d kx_npf=%d kx_io=%d kx_hlt=%d kx_intr=%d", t, n[1024], n[123], n[120], n[96] }' "$KX/hist"
}

# measure CASE ROUND EXPECTED_RC CHECK COMMAND... ; CHECK: floor | vmmstats | hello | linux | blk | blkvmm
measure() {
    name=$1 round=$2 want=$3 check=$4
    shift 4
    if [ "$check" = blk ] || [ "$check" = blkvmm ]; then
        kx_clear
        stat=$(./runstat -t "$BLK_TIMEOUT" "$OUT" "$@")
        kx=$(kx_read)
    elif [ "$check" = hellomark ]; then
        stat=$(./runstat -t 3 -m "$HELLO" "$OUT" "$@")
        check=hello
    elif [ "$check" = linux ]; then
        stat=$(./runstat -t "$LINUX_TIMEOUT" -m 'Linux version' -m "$INIT_MARKER" "$OUT" "$@" |
            sed 's/mark1_ns=/linux_ns=/; s/mark2_ns=/init_ns=/')
    else
        stat=$(./runstat "$OUT" "$@")
    fi
    rc=$(echo "$stat" | sed -n 's/^rc=\([0-9]*\).*/\1/p')
    ok=1
    [ "$rc" = "$want" ] || ok=0
    extra=
    case $check in
    floor)
        line=$(grep '^mode=' "$OUT" | tail -n1)
        extra=$(echo "$line" | sed -n 's/.*\(exits=[0-9]*\) \(wall_ns_per_exit=[0-9]*\) \(user_ns_per_exit=[0-9]*\) \(sys_ns_per_exit=[0-9]*\).*/\1 \2 \3 \4/p')
        ;;
    vmmstats)
        line=$(grep 'vmm: stats: vcpu0:' "$OUT" | tail -n1)
        extra=$(echo "$line" | sed -n 's/.*\(exits=[0-9]*\).*\(wall_ns_per_exit=[0-9]*\) \(user_ns_per_exit=[0-9]*\) \(sys_ns_per_exit=[0-9]*\).*/\1 \2 \3 \4/p')
        ;;
    hello)
        grep -q "$HELLO" "$OUT" || ok=0
        ;;
    blk|blkvmm) # the guest's BENCH line (none for bench-case=none), then vmm's exit counts
        line=$(grep '^BENCH ' "$OUT" | tail -n1)
        extra=$(echo "$line" | sed -n 's/.* bs=\([0-9]*\) ios=\([0-9]*\) us=\([0-9]*\) .*errors=\([0-9]*\).*/bench_bs=\1 bench_ios=\2 bench_us=\3 bench_errors=\4/p')
        case $name in *-none) ;; *) case $extra in *bench_errors=0) ;; *) ok=0 ;; esac ;; esac
        grep -q '^PASS: all' "$OUT" || ok=0
        if [ "$check" = blkvmm ]; then
            ex=$(grep 'vmm: stats: vcpu0:' "$OUT" | tail -n1 | sed -n 's/.*\(exits=[0-9]*\) \(pio=[0-9]*\) \(mmio=[0-9]*\).*/\1 \2 \3/p')
            [ -n "$ex" ] || ok=0
            extra="$extra $ex"
        fi
        extra="$extra $kx"
        ;;
    linux) # linux_ns=-1 (no "Linux version" line) is what `quiet` gives; the summary leaves -1 out
        case $stat in *init_ns=-1*) ok=0 ;; esac
        ;;
    esac
    case $check in floor|vmmstats) [ -n "$extra" ] || ok=0 ;; esac
    echo "E2E case=$name round=$round ok=$ok ${stat#rc=*[0-9] } rc=$rc $extra"
    if [ "$ok" != 1 ]; then
        echo "E2E-FAIL case=$name round=$round: output follows" >&2
        head -c 4000 "$OUT" >&2
    fi
}

r=0
while [ $r -le "$ROUNDS" ]; do
    # vmm creates the in-kernel irqchip + PIT by default, the floor does not: each is also run the other way.
    if has exit; then
    measure floor-pio "$r" 0 floor ./kvm_exit_floor pio "$EXITS" prot32
    measure vmm-pio "$r" 1 vmmstats ./vmm run --kernel pio-loop.bin --stats
    measure floor-pio-irqchip "$r" 0 floor ./kvm_exit_floor pio "$EXITS" prot32 irqchip
    measure vmm-pio-noirqchip "$r" 1 vmmstats ./vmm run --kernel pio-loop.bin --stats --no-irqchip
    measure floor-mmio "$r" 0 floor ./kvm_exit_floor mmio "$EXITS" prot32
    measure vmm-mmio "$r" 1 vmmstats ./vmm run --kernel mmio-loop.bin --stats
    measure floor-mmio-irqchip "$r" 0 floor ./kvm_exit_floor mmio "$EXITS" prot32 irqchip
    measure vmm-mmio-noirqchip "$r" 1 vmmstats ./vmm run --kernel mmio-loop.bin --stats --no-irqchip
    fi
    if has start; then
    measure start-vmm "$r" 1 hello ./vmm run --kernel hello.bin
    for m in $QEMU_MACHINES; do
        measure "start-qemu-$m" "$r" 1 hello "$QEMU" -M "$m" -accel kvm -m 128 -display none -serial stdio \
            -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel hello.bin
    done
    fi
    if has api; then
    # The control plane's cost: the same guest without and with the API socket (the API run waits for vmm.shutdown
    # and is killed after 3 s; its guest line and peak RSS are what count).
    measure api-vmm "$r" 1 hellomark ./vmm run --kernel hello.bin
    measure api-vmm-api "$r" 137 hellomark ./vmm run --kernel hello.bin --api-socket api.sock
    fi
    if has linux; then
    # A stock Debian kernel + a busybox initramfs whose /init prints INIT_MARKER and runs `poweroff -f`
    # (ACPI S5); both programs exit 0.
    measure linux-vmm "$r" 0 linux ./vmm run --kernel vmlinuz --initrd initramfs.cpio.gz --memory 256M \
        --cmdline "$LINUX_CMDLINE"
    [ -n "$QEMU_MACHINES" ] && for m in $LINUX_QEMU_MACHINES; do
        measure "linux-qemu-$m" "$r" 0 linux "$QEMU" -M "$m" -accel kvm -m 256 -display none -serial stdio \
            -no-reboot -kernel vmlinuz -initrd initramfs.cpio.gz -append "$LINUX_CMDLINE"
    done
    fi
    if has blk; then
    for c in $BLK_CASES; do
        args="bench bench-ios=$BLK_IOS bench-qd=$BLK_QD bench-mib=$BLK_MIB bench-case=$c"
        measure "blk-vmm-$c" "$r" 1 blkvmm ./vmm run --kernel virtio-test.elf --memory 128M \
            --disk "path=$BLK_IMG" --stats --cmdline "$args"
        [ -n "$QEMU_MACHINES" ] &&
            measure "blk-qemu-$c" "$r" 1 blk "$QEMU" -M q35 -accel kvm -m 128 -display none -vga none -nic none \
                -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel virtio-test.elf \
                -append "$args" -drive "if=none,id=d0,file=$BLK_IMG,format=raw${BLK_QEMU_DRIVE:+,$BLK_QEMU_DRIVE}" \
                -device virtio-blk-pci,drive=d0,disable-legacy=on
    done
    fi
    r=$((r + 1))
done
echo "E2E-DONE"
