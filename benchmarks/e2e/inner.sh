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
# vhost-user cases (CASES=vhost; needs io-bench, iobench.cpio.gz, vmlinuz, virtiofsd, qemu-storage-daemon): a stock
# Linux guest whose /init (iobench=fs|blk on its command line) runs io-bench — 4 KiB random reads with 1 and
# VH_THREADS threads, then sequential 1 MiB reads — on a virtio-fs mount (virtiofsd -o cache=none over
# /tmp/vh-share, a file of VH_MB MiB; a fresh virtiofsd per run, as it serves one frontend and exits) or on a
# vhost-user-blk disk (ONE qemu-storage-daemon for the whole run, both programs connect to it in turn; a raw image
# of VH_MB MiB in /tmp). vmm then QEMU (q35, guest RAM a shared memfd as vhost-user needs), same kernel, same
# initramfs, same backend binary. Lines: E2E case=vh-fs-vmm / vh-fs-qemu / vh-blk-vmm / vh-blk-qemu ... with
# rr1_ios= rr1_us= rrq_ios= rrq_us= seq_ios= seq_us= (from the guest's IOBENCH lines). VH_RR (random reads per
# measurement, default 2000), VH_THREADS (default 8), VH_SEQ_MIB (default 32), VH_MB (default 64).
# vsock cases (CASES=vsock; needs vsock-bench, vsockbench.cpio.gz, vmlinuz): the same Linux guest runs
# `vsock-bench serve` on port 5000; next to the VMM, vsock-bench times VS_COUNT round trips of 64 bytes and a
# VS_MIB MiB host->guest stream, then tells the guest to power off. vmm: hybrid vsock (--vsock, the Unix socket and
# its CONNECT handshake); QEMU: vhost-vsock-pci (the host kernel's vhost, /dev/vhost-vsock, AF_VSOCK to cid 3).
# Lines: E2E case=vs-vmm / vs-qemu ... with pp_count= pp_us= st_bytes= st_us=. VS_COUNT (default 2000), VS_MIB
# (default 64).
set -u
CASES=${CASES:-exit start linux}
LINUX_QEMU_MACHINES=${LINUX_QEMU_MACHINES-pc microvm}
LINUX_CMDLINE=${LINUX_CMDLINE:-console=ttyS0 panic=-1 rdinit=/init}
LINUX_TIMEOUT=${LINUX_TIMEOUT:-300}
INIT_MARKER='vmm-initramfs: /init ran, powering off'
has() { case " $CASES " in *" $1 "*) return 0 ;; esac; return 1; }
[ -e vmlinuz ] || CASES=$(echo " $CASES " | sed 's/ linux / /')
[ -e virtio-test.elf ] || CASES=$(echo " $CASES " | sed 's/ blk / /')
[ -e iobench.cpio.gz ] || CASES=$(echo " $CASES " | sed 's/ vhost / /')
[ -e vsockbench.cpio.gz ] || CASES=$(echo " $CASES " | sed 's/ vsock / /')
VS_COUNT=${VS_COUNT:-2000}
VS_MIB=${VS_MIB:-64}
VS_SOCK=/tmp/vs.sock
VH_RR=${VH_RR:-2000}
VH_THREADS=${VH_THREADS:-8}
VH_SEQ_MIB=${VH_SEQ_MIB:-32}
VH_MB=${VH_MB:-64}
VH_IMG=/tmp/vh-blk.img
VH_SHARE=/tmp/vh-share
VH_QSD_SOCK=/tmp/vh-qsd.sock
VH_FS_SOCK=/tmp/vh-fs.sock
VH_ARGS="iobench-rr=$VH_RR iobench-threads=$VH_THREADS iobench-seq=$VH_SEQ_MIB"
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

if has vhost; then
    mkdir -p $VH_SHARE
    head -c $((VH_MB << 20)) /dev/urandom >$VH_SHARE/data.bin
    cp $VH_SHARE/data.bin $VH_IMG
    chmod +x virtiofsd qemu-storage-daemon io-bench
    # One backend process for every vhost-user-blk run of both programs (read-only: the guest only reads).
    ./qemu-storage-daemon --blockdev driver=file,node-name=f0,filename=$VH_IMG \
        --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$VH_QSD_SOCK,writable=off \
        >/tmp/vh-qsd.log 2>&1 &
    VH_QSD_PID=$!
    n=0; while [ ! -S $VH_QSD_SOCK ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    [ -S $VH_QSD_SOCK ] || { echo "E2E-INFO vhost: qemu-storage-daemon did not start: $(cat /tmp/vh-qsd.log)"; CASES=$(echo " $CASES " | sed 's/ vhost / /'); }
    echo "E2E-INFO vhost: $VH_MB MiB random data (blk image and fs file) on $(awk '$2 == "/tmp" {print $3}' /proc/mounts); $(./qemu-storage-daemon --version | head -n1); virtiofsd -o cache=none; guest: $VH_ARGS"
fi
if has vsock; then
    chmod +x vsock-bench
    if [ -c /dev/vhost-vsock ]; then vs_qemu="/dev/vhost-vsock present"; else vs_qemu="no /dev/vhost-vsock: QEMU's vhost-vsock cannot run"; fi
    echo "E2E-INFO vsock: $VS_COUNT round trips of 64 bytes, $VS_MIB MiB stream host->guest; $vs_qemu"
fi
# One vsock case (a script, as runstat runs it): the VMM in the background, the host half of vsock-bench against it,
# then the guest is told to quit. Prints the VSOCKBENCH lines and the VMM's output; its status is the VMM's.
cat >vs-case.sh <<'CASE'
#!/bin/sh
target=$1
shift
"$@" >/tmp/vs-vmm.out 2>&1 &
vpid=$!
./vsock-bench pingpong "$target" 5000 "$VS_COUNT" 64
./vsock-bench stream "$target" 5000 "$VS_MIB"
./vsock-bench quit "$target" 5000
wait $vpid
vrc=$?
cat /tmp/vs-vmm.out
exit $vrc
CASE
chmod +x vs-case.sh
export VS_COUNT VS_MIB

# A fresh virtiofsd for one run (it serves one frontend, then exits).
vh_fs_start() {
    rm -f $VH_FS_SOCK
    # sandbox=chroot: the default (namespace) pivot_root()s, which fails on this VM's root, an initramfs.
    ./virtiofsd --socket-path=$VH_FS_SOCK -o source=$VH_SHARE -o cache=none -o sandbox=chroot >/tmp/vh-fs.log 2>&1 &
    VH_FS_PID=$!
    n=0; while [ ! -S $VH_FS_SOCK ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
}
vh_fs_stop() {
    kill $VH_FS_PID 2>/dev/null
    wait $VH_FS_PID 2>/dev/null
    [ "$ok" = 1 ] || { echo "virtiofsd's log:" >&2; head -c 2000 /tmp/vh-fs.log >&2; }
}

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
    elif [ "$check" = iobench ] || [ "$check" = vsockbench ]; then
        stat=$(./runstat -t "$LINUX_TIMEOUT" "$OUT" "$@")
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
    vsockbench) # the host half's VSOCKBENCH lines
        extra=$(awk '/^VSOCKBENCH /{ for (i = 2; i <= NF; i++) { split($i, p, "="); kv[p[1]] = p[2] }
                    if (kv["op"] == "pingpong") printf "pp_count=%s pp_us=%s ", kv["count"], kv["us"]
                    else printf "st_bytes=%s st_us=%s ", kv["bytes"], kv["us"] }' "$OUT")
        case $extra in *pp_us=*st_us=*) ;; *) ok=0 ;; esac
        ;;
    iobench) # the guest's IOBENCH lines: random reads with 1 and VH_THREADS threads, sequential reads
        extra=$(awk '/^IOBENCH /{ for (i = 2; i <= NF; i++) { split($i, p, "="); kv[p[1]] = p[2] }
                    k = kv["op"] == "seqread" ? "seq" : kv["threads"] == 1 ? "rr1" : "rrq"
                    printf "%s_ios=%s %s_us=%s ", k, kv["ios"], k, kv["us"]; if (kv["errors"] != 0) bad = 1 }
                    END { if (bad) printf "iobench_errors=1" }' "$OUT")
        case $extra in *seq_us=*) ;; *) ok=0 ;; esac
        case $extra in *iobench_errors*) ok=0 ;; esac
        grep -q 'vmm-iobench: done' "$OUT" || ok=0
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
    if has vhost; then
    vcmd="$LINUX_CMDLINE $VH_ARGS"
    qmem="-M q35 -accel kvm -m 256 -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem"
    qcom="-display none -vga none -nic none -serial stdio -no-reboot -kernel vmlinuz -initrd iobench.cpio.gz"
    vh_fs_start
    measure vh-fs-vmm "$r" 0 iobench ./vmm run --kernel vmlinuz --initrd iobench.cpio.gz --memory 256M \
        --fs "tag=bench,socket=$VH_FS_SOCK" --cmdline "$vcmd iobench=fs"
    vh_fs_stop
    if [ -n "$QEMU_MACHINES" ]; then
        vh_fs_start
        # shellcheck disable=SC2086 # word splitting of the option groups is wanted
        measure vh-fs-qemu "$r" 0 iobench "$QEMU" $qmem $qcom -append "$vcmd iobench=fs" \
            -chardev socket,id=fs0,path=$VH_FS_SOCK -device vhost-user-fs-pci,chardev=fs0,tag=bench
        vh_fs_stop
    fi
    measure vh-blk-vmm "$r" 0 iobench ./vmm run --kernel vmlinuz --initrd iobench.cpio.gz --memory 256M \
        --disk "vhost_user=on,socket=$VH_QSD_SOCK" --cmdline "$vcmd iobench=blk"
    # shellcheck disable=SC2086
    [ -n "$QEMU_MACHINES" ] && measure vh-blk-qemu "$r" 0 iobench "$QEMU" $qmem $qcom -append "$vcmd iobench=blk" \
        -chardev socket,id=blk0,path=$VH_QSD_SOCK -device vhost-user-blk-pci,chardev=blk0
    fi
    if has vsock; then
    measure vs-vmm "$r" 0 vsockbench ./vs-case.sh "unix:$VS_SOCK" ./vmm run --kernel vmlinuz --initrd vsockbench.cpio.gz \
        --memory 256M --vsock "cid=3,socket=$VS_SOCK" --cmdline "$LINUX_CMDLINE"
    rm -f $VS_SOCK
    # shellcheck disable=SC2086
    [ -n "$QEMU_MACHINES" ] && [ -c /dev/vhost-vsock ] && measure vs-qemu "$r" 0 vsockbench ./vs-case.sh vsock:3 "$QEMU" \
        -M q35 -accel kvm -m 256 -display none -vga none -nic none -serial stdio -no-reboot -kernel vmlinuz \
        -initrd vsockbench.cpio.gz -append "$LINUX_CMDLINE" -device vhost-vsock-pci,guest-cid=3
    fi
    r=$((r + 1))
done
[ -n "${VH_QSD_PID:-}" ] && kill "$VH_QSD_PID" 2>/dev/null
echo "E2E-DONE"
