#!/bin/sh
# Cross-checks build/virtio-test.elf under QEMU (q35, every virtio device modern-only).
# Usage (from guest-images/): virtio-test/qemu-check.sh [ACCEL]    ACCEL: kvm or tcg (default tcg)
# Needs root for the net run (unshare -n, tap).  Exits 0 iff every run gave the expected result.
set -u
ACCEL=${1:-tcg}
QEMU=${QEMU:-qemu-system-x86_64}
B=build
T=$(mktemp -d /tmp/virtio-check.XXXXXX)
fails=0
Q="$QEMU -M q35 -accel $ACCEL -m 128 -display none -serial stdio -no-reboot -nic none \
   -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel $B/virtio-test.elf"

# run NAME EXPECTED_STATUS QEMU-ARGS...: runs QEMU, saves the output to $T/NAME.log
run() {
    name=$1 want=$2
    shift 2
    timeout 300 "$@" > "$T/$name.log" 2>&1 < /dev/null
    rc=$?
    grep -E '^(PASS|FAIL)' "$T/$name.log" | sed "s/^/  [$name] /"
    if [ "$rc" -eq "$want" ]; then echo "ok: $name (exit status $rc)"; else echo "FAILED: $name (exit status $rc, want $want; log $T/$name.log)"; fails=$((fails + 1)); fi
}
expect() { # expect NAME WHAT COMMAND...
    name=$1 what=$2
    shift 2
    if "$@"; then echo "ok: $name: $what"; else echo "FAILED: $name: $what"; fails=$((fails + 1)); fi
}

# pci + blk (read/write/flush/get-id/write-zeroes/discard/past-end); QEMU 7.2 offers DISCARD and
# WRITE_ZEROES on a raw file by default.
$B/blk-image create $T/disk.img > /dev/null
run blk 1 $Q -append "pci blk blk-id=vmm-test-disk" \
    -drive if=none,id=d0,file=$T/disk.img,format=raw \
    -device virtio-blk-pci,drive=d0,disable-legacy=on,serial=vmm-test-disk
expect blk "image: 100..131 written, 200..207 zero, rest unchanged" $B/blk-image check $T/disk.img written zeroes

# blk without EVENT_IDX and indirect descriptors
$B/blk-image create $T/disk.img > /dev/null
run blk-plain-ring 1 $Q -append "blk no-event-idx no-indirect" \
    -drive if=none,id=d0,file=$T/disk.img,format=raw -device virtio-blk-pci,drive=d0,disable-legacy=on
expect blk-plain-ring "image" $B/blk-image check $T/disk.img written zeroes

# read-only
$B/blk-image create $T/disk.img > /dev/null
run blk-ro 1 $Q -append "blk-ro blk-id=ro-disk" \
    -drive if=none,id=d0,file=$T/disk.img,format=raw,readonly=on \
    -device virtio-blk-pci,drive=d0,disable-legacy=on,serial=ro-disk
expect blk-ro "image unchanged" $B/blk-image check $T/disk.img

# rng
run rng 1 $Q -append "rng" -device virtio-rng-pci,disable-legacy=on

# console: transmit only (file chardev), then receive + echo (pipe chardev: $T/vc.in / $T/vc.out FIFOs)
run console 1 $Q -append "console" -device virtio-serial-pci,disable-legacy=on \
    -chardev file,id=vc,path=$T/vc-file.out -device virtconsole,chardev=vc
expect console "hello line on the host" grep -qx 'virtio-console: hello from the guest' $T/vc-file.out
mkfifo $T/vc.in $T/vc.out
cat $T/vc.out > $T/vc.log &
printf 'line from the host\n' > $T/vc.in &
run console-rx 1 $Q -append "console console-rx" -device virtio-serial-pci,disable-legacy=on \
    -chardev pipe,id=vc,path=$T/vc -device virtconsole,chardev=vc
sleep 1
expect console-rx "echo on the host" grep -qx 'virtio-console: got line from the host' $T/vc.log

# net: responder and QEMU in a fresh network namespace; the tap is tap0.
NET="-netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
     -device virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56"
netrun() { # netrun NAME APPEND [NETDEV-OPTIONS]
    name=$1 append=$2 extra=${3:-}
    unshare -n sh -c "$B/net-responder tap0 60 > $T/$name-responder.log 2>&1 & rp=\$!
        $Q -append '$append' \
          -netdev tap,id=n0,ifname=tap0,script=no,downscript=no$extra \
          -device virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56 > $T/$name.log 2>&1 < /dev/null
        echo \$? > $T/$name.rc; wait \$rp; echo \$? > $T/$name-responder.rc"
    grep -E '^(PASS|FAIL)' "$T/$name.log" | sed "s/^/  [$name] /"
    sed "s/^/  [$name] /" $T/$name-responder.log
    expect $name "guest exit status 1" test "$(cat $T/$name.rc)" = 1
    expect $name "responder exit status 0" test "$(cat $T/$name-responder.rc)" = 0
}
netrun net "net mac=52:54:00:12:34:56"
expect net "responder verified the checksum" grep -q 'csum-ok' $T/net-responder.log
netrun net-no-vnet-hdr "net mac=52:54:00:12:34:56 no-event-idx" ",vnet_hdr=off"

# everything at once
$B/blk-image create $T/disk.img > /dev/null
unshare -n sh -c "$B/net-responder tap0 60 > $T/all-responder.log 2>&1 & rp=\$!
    $Q -append 'all mac=52:54:00:12:34:56 blk-id=vmm-test-disk' \
      -drive if=none,id=d0,file=$T/disk.img,format=raw \
      -device virtio-blk-pci,drive=d0,disable-legacy=on,serial=vmm-test-disk \
      -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
      -device virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56 \
      -device virtio-rng-pci,disable-legacy=on \
      -device virtio-serial-pci,disable-legacy=on -chardev file,id=vc,path=$T/vc-all.out \
      -device virtconsole,chardev=vc > $T/all.log 2>&1 < /dev/null
    echo \$? > $T/all.rc; wait \$rp; echo \$? > $T/all-responder.rc"
grep -E '^(PASS|FAIL)' "$T/all.log" | sed "s/^/  [all] /"
expect all "guest exit status 1" test "$(cat $T/all.rc)" = 1
expect all "responder exit status 0" test "$(cat $T/all-responder.rc)" = 0
expect all "image" $B/blk-image check $T/disk.img written zeroes
expect all "console hello" grep -qx 'virtio-console: hello from the guest' $T/vc-all.out

# no virtio-blk present: the blk subtest must fail cleanly (status 3)
run missing-device 3 $Q -append "blk"

if [ $fails -eq 0 ]; then echo "qemu-check-virtio: all runs as expected"; rm -rf "$T"; else echo "qemu-check-virtio: $fails failed (logs in $T)"; fi
test $fails -eq 0
