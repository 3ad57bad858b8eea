#!/usr/bin/env bash
# run-in-vm.sh - run a command inside a QEMU/TCG Linux guest that has a working /dev/kvm.
#
# The CI/dev host has no /dev/kvm. QEMU's TCG emulates AMD SVM (incl. nested paging), so a
# Debian kernel booted under `qemu-system-x86_64 -accel tcg -cpu max` can load kvm_amd and
# offer /dev/kvm to our tests. See README.md in this directory.
#
# Usage:
#   run-in-vm.sh [options] --files DIR -- COMMAND [ARG...]
#   run-in-vm.sh --prepare                 # only fetch the kernel and build the cached initramfs
#
# Options:
#   --files DIR      copied to /work in the guest (COMMAND runs with cwd /work); required to run
#   --timeout SEC    wall-clock limit for the whole VM run (default 600)
#   --stall SEC      the guest writes a heartbeat every 2 s; none for SEC seconds (default 60, 0: off)
#                    means the guest kernel itself stopped: QEMU's registers are dumped, the run ends (123)
#   --mem MB         guest RAM (default 1024); the initramfs (incl. DIR) lives in it
#   --smp N          guest vCPUs (default 1; one TCG thread runs them all unless NESTED_KVM_TCG_THREAD=multi)
#   --env K=V        export K=V for COMMAND (repeatable)
#   --lib PATH       also copy host file PATH (+ its ldd deps) into the guest at the same path
#                    (for dlopen()ed libraries that ldd cannot see; repeatable)
#   --kvm-amd-params "npt=1 nested=0"   module parameters for kvm_amd (default: none)
#   --console        also copy the guest kernel console log to stderr after the run
#   --prepare        build the cache and exit
#
# Output: COMMAND's stdout -> this script's stdout, COMMAND's stderr -> this script's stderr
# (each via its own emulated serial port; the guest kernel log goes to a third one and is only
# shown on failure or with --console).
#
# Exit status: COMMAND's exit status; 124 if the timeout hit; 123 if the guest stalled (its
# heartbeat stopped: the whole guest kernel made no progress, see --stall); 125 on harness failure
# (qemu missing, kernel cannot be fetched, kvm_amd does not load / no /dev/kvm, guest died).
#
# Environment:
#   NESTED_KVM_CACHE       cache dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/vmm-nested-kvm)
#   NESTED_KVM_KERNEL_PKG  Debian kernel package (default: what linux-image-cloud-amd64 depends on)
#   NESTED_KVM_KERNEL_DEB  use this local kernel .deb instead of apt-get download
#   NESTED_KVM_CPU         QEMU -cpu value (default "max")
#   NESTED_KVM_TCG_THREAD  TCG threading: single (default: no whole-VM freezes in 50 nested Linux boots under
#                          load) or multi (MTTCG, QEMU's default: froze 3 times in 34; see README.md)
#   NESTED_KVM_QEMU        QEMU binary (default qemu-system-x86_64)
#   NESTED_KVM_KEEP=1      keep the per-run temp dir (logs, initrd) and print its path
set -euo pipefail

readonly HARNESS_FAIL=125
readonly TIMEOUT_RC=124
readonly STALL_RC=123
readonly BASE_FORMAT=2 # bump when the base initramfs layout changes (init script changes are hashed)
# Modules loaded in the guest (plus their deps): kvm_amd for /dev/kvm, tun for /dev/net/tun (virtio-net tests),
# vhost_vsock for /dev/vhost-vsock (QEMU's vhost-vsock-pci, the peer of the vsock benchmark).
readonly GUEST_MODULES="kvm_amd tun vhost_vsock"
# Modules kept in the cache for the guests the tests boot (not loaded here): Linux's virtio-pci drivers, and the
# ACPI button driver with evdev (a guest sees vm.power-button as a KEY_POWER input event), so a test initramfs can
# load them ($cache/<pkg>/virtio-modules/, deps first in load-order; the list itself in 'requested').
readonly VIRTIO_MODULES="virtio_pci virtio_blk virtio_net virtio_console virtio_rng button evdev vmw_vsock_virtio_transport virtiofs"

prog=${0##*/}
die() {
    echo "$prog: error: $*" >&2
    exit "$HARNESS_FAIL"
}
note() { echo "$prog: $*" >&2; }

timeout_s=600
stall_s=60
mem_mb=1024
smp=1
files_dir=
prepare_only=0
show_console=0
kvm_amd_params=
envs=()
extra_libs=()

while [ $# -gt 0 ]; do
    case $1 in
    --timeout) timeout_s=${2:?--timeout needs a value}; shift 2 ;;
    --stall) stall_s=${2:?--stall needs a value}; shift 2 ;;
    --mem) mem_mb=${2:?--mem needs a value}; shift 2 ;;
    --smp) smp=${2:?--smp needs a value}; shift 2 ;;
    --files) files_dir=${2:?--files needs a value}; shift 2 ;;
    --env) envs+=("${2:?--env needs K=V}"); shift 2 ;;
    --lib) extra_libs+=("${2:?--lib needs a path}"); shift 2 ;;
    --kvm-amd-params) kvm_amd_params=${2?}; shift 2 ;;
    --console) show_console=1; shift ;;
    --prepare) prepare_only=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "$prog: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

for v in "$timeout_s" "$stall_s" "$mem_mb" "$smp"; do
    case $v in '' | *[!0-9]*) echo "$prog: --timeout/--stall/--mem/--smp need positive integers" >&2; exit 2 ;; esac
done
for e in "${envs[@]+"${envs[@]}"}"; do
    case $e in [A-Za-z_]*=*) ;; *) echo "$prog: bad --env '$e' (want NAME=VALUE)" >&2; exit 2 ;; esac
    case ${e%%=*} in *[!A-Za-z0-9_]*) echo "$prog: bad --env name in '$e'" >&2; exit 2 ;; esac
done
if [ "$prepare_only" = 0 ]; then
    [ $# -gt 0 ] || { echo "$prog: no COMMAND given (usage: $prog [opts] --files DIR -- COMMAND...)" >&2; exit 2; }
    [ -n "$files_dir" ] || { echo "$prog: --files DIR is required" >&2; exit 2; }
    [ -d "$files_dir" ] || die "--files '$files_dir' is not a directory"
fi

qemu=${NESTED_KVM_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null 2>&1 || die "'$qemu' not found; run tools/nested-kvm/setup.sh (apt-get install qemu-system-x86)"
for t in cpio gzip flock timeout tail; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' not found; run tools/nested-kvm/setup.sh"
done

cache_root=${NESTED_KVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm-nested-kvm}
mkdir -p "$cache_root" || die "cannot create cache dir $cache_root"

# ---------------------------------------------------------------------------------------------
# Kernel package selection
# ---------------------------------------------------------------------------------------------
resolve_kernel_pkg() {
    if [ -n "${NESTED_KVM_KERNEL_PKG:-}" ]; then
        echo "$NESTED_KVM_KERNEL_PKG"
        return
    fi
    if [ -n "${NESTED_KVM_KERNEL_DEB:-}" ]; then
        basename "$NESTED_KVM_KERNEL_DEB" .deb | sed 's/_.*//'
        return
    fi
    # `apt-cache depends` costs ~1 s, so remember its answer for a day.
    local p='' memo=$cache_root/resolved-kernel-pkg
    if [ -f "$memo" ] && [ -n "$(find "$memo" -mmin -1440 2>/dev/null)" ]; then
        p=$(cat "$memo")
    fi
    if [ -z "$p" ]; then
        p=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }') || true
        [ -n "$p" ] && echo "$p" >"$memo"
    fi
    if [ -z "$p" ]; then
        # Offline / no apt lists: reuse the newest kernel that is already cached.
        local d
        for d in $(cd "$cache_root" && ls -1td linux-image-* 2>/dev/null); do
            [ -f "$cache_root/$d/base.cpio.gz" ] && { p=$d; break; }
        done
    fi
    [ -n "$p" ] || die "cannot resolve the kernel package: 'apt-cache depends linux-image-cloud-amd64' gave nothing (run apt-get update, or set NESTED_KVM_KERNEL_PKG / NESTED_KVM_KERNEL_DEB)"
    echo "$p"
}

# Print the modinfo "depends=" list of a .ko (no kmod needed).
ko_depends() {
    objcopy -O binary --only-section=.modinfo "$1" /dev/stdout 2>/dev/null | tr '\0' '\n' |
        sed -n 's/^depends=//p' | tr ',' ' '
}

# Find module NAME (kvm_amd / kvm-amd) under DIR; prints the path.
find_ko() {
    local dir=$1 name=$2 alt
    alt=$(echo "$name" | tr '_-' '-_')
    find "$dir" \( -name "$name.ko" -o -name "$name.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) -print -quit
}

# Copy module NAME and (first) its deps into OUT in load order; appends to OUT/load-order.
add_module() {
    local moddir=$1 out=$2 name=$3 path dep base
    name=$(echo "$name" | tr '-' '_')
    grep -qx "$name" "$out/.seen" 2>/dev/null && return 0
    echo "$name" >>"$out/.seen"
    path=$(find_ko "$moddir" "$name")
    [ -n "$path" ] || die "module $name not found in the kernel package"
    base=$(basename "$path")
    case $base in
    *.ko.xz) xz -dc "$path" >"$out/$name.ko" || die "cannot decompress $path (need xz-utils)" ;;
    *.ko.zst) zstd -qdc "$path" >"$out/$name.ko" || die "cannot decompress $path (need zstd)" ;;
    *.ko.gz) gzip -dc "$path" >"$out/$name.ko" || die "cannot decompress $path" ;;
    *.ko) cp "$path" "$out/$name.ko" ;;
    esac
    for dep in $(ko_depends "$out/$name.ko"); do
        add_module "$moddir" "$out" "$dep"
    done
    echo "$name" >>"$out/load-order"
}

init_script() {
    cat <<'INIT'
#!/bin/busybox sh
# nested-kvm guest init (generated by tools/nested-kvm/run-in-vm.sh)
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /etc
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd 2>/dev/null
[ -e /etc/passwd ] || echo 'root:x:0:0:root:/root:/bin/sh' >/etc/passwd
[ -e /etc/group ] || echo 'root:x:0:' >/etc/group
hostname nested-kvm
ip link set lo up 2>/dev/null

for t in /dev/ttyS1 /dev/ttyS2 /dev/ttyS3; do stty -F $t raw -echo 2>/dev/null; done
ctl() { echo "$1" >/dev/ttyS3; echo "$1"; }
finish() { sync; poweroff -f; reboot -f; }
fatal() {
    { echo "nested-kvm: $1"; dmesg | grep -iE 'kvm|svm' | tail -n 30; } >/dev/ttyS2
    ctl "NESTED-KVM-ERROR=$1"
    finish
}

KVM_AMD_PARAMS=
[ -f /nested-kvm/kvm-amd-params ] && KVM_AMD_PARAMS=$(cat /nested-kvm/kvm-amd-params)
for m in $(cat /lib/modules/nested-kvm/load-order); do
    p=
    [ "$m" = kvm_amd ] && p=$KVM_AMD_PARAMS
    insmod /lib/modules/nested-kvm/$m.ko $p || fatal "insmod $m failed"
done
i=0
while [ ! -c /dev/kvm ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -c /dev/kvm ] || fatal "/dev/kvm did not appear after loading kvm_amd"
# tun registers the misc device net/tun (10:200); devtmpfs normally creates the node itself.
if [ ! -c /dev/net/tun ]; then
    mkdir -p /dev/net && mknod -m 666 /dev/net/tun c 10 200 || fatal "cannot create /dev/net/tun"
fi
dmesg | grep -iE 'kvm|svm' | tail -n 20
for f in /sys/module/kvm_amd/parameters/npt /sys/module/kvm_amd/parameters/nested /sys/module/kvm_amd/parameters/avic; do
    [ -r $f ] && echo "nested-kvm: kvm_amd.${f##*/}=$(cat $f)"
done
ctl "NESTED-KVM-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
# Heartbeat for the host side: when these lines stop, the guest kernel itself has stopped (not just the command).
# (Its pid is in /run/nested-kvm-heartbeat.pid: a test stops it to check the host side's stall detection.)
( while :; do echo "NESTED-KVM-ALIVE uptime=$(cut -d' ' -f1 /proc/uptime)" >/dev/ttyS3; sleep 2; done ) </dev/null >/dev/null 2>&1 &
echo $! >/run/nested-kvm-heartbeat.pid

[ -f /nested-kvm/env ] && . /nested-kvm/env
cd /work
/bin/sh /nested-kvm/cmd </dev/null >/dev/ttyS1 2>/dev/ttyS2
rc=$?
ctl "NESTED-KVM-EXIT=$rc"
finish
INIT
}

# True when the cached module dir $1 holds every module of GUEST_MODULES (an older cache may lack tun).
modules_complete() {
    local m
    [ -f "$1/load-order" ] || return 1
    for m in $GUEST_MODULES; do grep -qx "$m" "$1/load-order" || return 1; done
    [ -f "$1/../virtio-modules/load-order" ] || return 1
    [ "$(cat "$1/../virtio-modules/requested" 2>/dev/null)" = "$VIRTIO_MODULES" ] || return 1
}

# Build (once) $cache/<pkg>/{vmlinuz,modules/,base.cpio.gz} for kernel package $1.
ensure_base() {
    local pkg=$1 dir=$cache_root/$1 stamp
    stamp="$BASE_FORMAT $(init_script | cksum | cut -d' ' -f1)"
    if [ -f "$dir/base.cpio.gz" ] && [ -f "$dir/vmlinuz" ] && [ "$(cat "$dir/format" 2>/dev/null)" = "$stamp" ] &&
        modules_complete "$dir/modules"; then
        return 0
    fi
    exec 9>"$cache_root/.lock"
    flock 9
    if [ -f "$dir/base.cpio.gz" ] && [ -f "$dir/vmlinuz" ] && [ "$(cat "$dir/format" 2>/dev/null)" = "$stamp" ] &&
        modules_complete "$dir/modules"; then
        flock -u 9
        return 0
    fi
    build_tmp=$(mktemp -d "$cache_root/.build.XXXXXX")
    local b=$build_tmp
    mkdir -p "$dir"

    # 1. Kernel + modules (kept, so an init-script change does not re-download).
    if [ ! -f "$dir/vmlinuz" ] || ! modules_complete "$dir/modules"; then
        command -v objcopy >/dev/null || die "objcopy not found (apt-get install binutils)"
        note "fetching kernel $pkg into $dir (one-time)"
        local deb
        if [ -n "${NESTED_KVM_KERNEL_DEB:-}" ]; then
            deb=$NESTED_KVM_KERNEL_DEB
        else
            (cd "$b" && apt-get download "$pkg") >"$b/apt.log" 2>&1 ||
                { cat "$b/apt.log" >&2; die "apt-get download $pkg failed (network? apt-get update? set NESTED_KVM_KERNEL_PKG/NESTED_KVM_KERNEL_DEB)"; }
            deb=$(ls "$b"/*.deb)
        fi
        mkdir -p "$b/x" "$b/modules"
        dpkg-deb -x "$deb" "$b/x" || die "dpkg-deb -x $deb failed"
        local vmlinuz moddir
        vmlinuz=$(ls "$b"/x/boot/vmlinuz-* 2>/dev/null | head -n1) || true
        moddir=$(ls -d "$b"/x/lib/modules/*/ "$b"/x/usr/lib/modules/*/ 2>/dev/null | head -n1) || true
        [ -n "$vmlinuz" ] && [ -n "$moddir" ] || die "$deb has no /boot/vmlinuz-* or lib/modules"
        local m
        for m in $GUEST_MODULES; do add_module "$moddir" "$b/modules" "$m"; done
        rm -f "$b/modules/.seen"
        mkdir -p "$b/virtio-modules"
        for m in $VIRTIO_MODULES; do add_module "$moddir" "$b/virtio-modules" "$m"; done
        rm -f "$b/virtio-modules/.seen"
        echo "$VIRTIO_MODULES" >"$b/virtio-modules/requested"
        rm -rf "$dir/virtio-modules"
        mv "$b/virtio-modules" "$dir/virtio-modules"
        basename "$deb" >"$b/modules/kernel-deb"
        rm -rf "$dir/modules" "$dir/format"
        cp "$vmlinuz" "$dir/vmlinuz"
        mv "$b/modules" "$dir/modules"
    fi

    # 2. Base initramfs: static busybox + /init + modules.
    mkdir -p "$b/root/bin" "$b/root/lib/modules"
    local bb=
    for c in /bin/busybox /usr/bin/busybox; do
        if [ -x "$c" ] && ! ldd "$c" >/dev/null 2>&1; then bb=$c; break; fi
    done
    if [ -z "$bb" ]; then
        (cd "$b" && apt-get download busybox-static) >>"$b/apt.log" 2>&1 ||
            die "no static busybox and 'apt-get download busybox-static' failed"
        mkdir -p "$b/bb" && dpkg-deb -x "$b"/busybox-static_*.deb "$b/bb"
        bb=$(ls "$b"/bb/bin/busybox "$b"/bb/usr/bin/busybox 2>/dev/null | head -n1) || true
        [ -n "$bb" ] || die "busybox-static package has no busybox binary"
    fi
    cp "$bb" "$b/root/bin/busybox"
    cp -r "$dir/modules" "$b/root/lib/modules/nested-kvm"
    init_script >"$b/root/init"
    chmod 755 "$b/root/init"
    mkdir -p "$b/root/proc" "$b/root/sys" "$b/root/dev" "$b/root/tmp" "$b/root/work" "$b/root/nested-kvm"
    (cd "$b/root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -6 >"$b/base.cpio.gz"
    mv "$b/base.cpio.gz" "$dir/base.cpio.gz"
    echo "$stamp" >"$dir/format"
    rm -rf "$b"
    build_tmp=
    flock -u 9
    note "base image ready: $(cat "$dir/modules/kernel-deb"), modules: $(tr '\n' ' ' <"$dir/modules/load-order")"
}

build_tmp=
run_dir=
cleanup() {
    local pids
    pids=$(jobs -p) || true
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    [ -n "$build_tmp" ] && rm -rf "$build_tmp"
    if [ -n "$run_dir" ]; then
        if [ "${NESTED_KVM_KEEP:-0}" = 1 ]; then note "kept $run_dir"; else rm -rf "$run_dir"; fi
    fi
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kernel_pkg=$(resolve_kernel_pkg)
ensure_base "$kernel_pkg"
base_dir=$cache_root/$kernel_pkg
[ "$prepare_only" = 1 ] && { echo "$base_dir"; exit 0; }

# ---------------------------------------------------------------------------------------------
# Per-run archive: DIR -> /work, shared libs, command, env
# ---------------------------------------------------------------------------------------------
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/nested-kvm.XXXXXX")
stage=$run_dir/stage
mkdir -p "$stage/nested-kvm"
# Hard-link when possible (same filesystem), else copy.
cp -al "$files_dir" "$stage/work" 2>/dev/null || { rm -rf "$stage/work"; cp -a "$files_dir" "$stage/work"; } ||
    die "cannot copy $files_dir"

is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }

# Copy a host file to the same absolute path inside the guest (dereferencing symlinks).
copy_host_file() {
    local f=$1
    [ -e "$stage$f" ] && return 0
    mkdir -p "$stage$(dirname "$f")"
    cp -L "$f" "$stage$f"
}

# Copy every library ldd reports for ELF file $1 (incl. the dynamic loader).
copy_ldd_deps() {
    local out line lib
    out=$(ldd "$1" 2>/dev/null) || return 0 # static, or not loadable on this host
    while IFS= read -r line; do
        case $line in
        *"=> not found"*) note "warning: $1: ${line%%=>*}not found by ldd on the host" ;;
        *"=> /"*) lib=${line#*=> }; lib=${lib%% (*}; copy_host_file "$lib" ;;
        [[:space:]]/*) lib=${line#"${line%%[![:space:]]*}"}; lib=${lib%% (*}; copy_host_file "$lib" ;;
        esac
    done <<<"$out"
}

while IFS= read -r -d '' f; do
    is_elf "$f" && copy_ldd_deps "$f"
done < <(find "$stage/work" -type f \( -perm -u+x -o -name '*.so' -o -name '*.so.*' \) -print0)
for l in "${extra_libs[@]+"${extra_libs[@]}"}"; do
    [ -e "$l" ] || die "--lib $l does not exist"
    case $l in /*) ;; *) die "--lib needs an absolute path: $l" ;; esac
    copy_host_file "$l"
    is_elf "$l" && copy_ldd_deps "$l"
done

sq() { local q="'\\''"; printf "'%s'" "${1//\'/$q}"; }
{
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(sq "$a")"; done
    printf '\n'
} >"$stage/nested-kvm/cmd"
{
    echo "export DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=1"
    for e in "${envs[@]+"${envs[@]}"}"; do echo "export ${e%%=*}=$(sq "${e#*=}")"; done
} >"$stage/nested-kvm/env"
printf '%s\n' "$kvm_amd_params" >"$stage/nested-kvm/kvm-amd-params"

# initrd = base.cpio.gz (4-byte padded) + uncompressed per-run cpio
initrd=$run_dir/initrd.img
cp "$base_dir/base.cpio.gz" "$initrd"
pad=$(($(stat -c %s "$initrd") % 4))
[ "$pad" = 0 ] || head -c $((4 - pad)) /dev/zero >>"$initrd"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >>"$initrd" ||
    die "building the per-run cpio failed"

# ---------------------------------------------------------------------------------------------
# Boot
# ---------------------------------------------------------------------------------------------
: >"$run_dir/console.log"
: >"$run_dir/stdout"
: >"$run_dir/stderr"
: >"$run_dir/ctl"
append="console=ttyS0 quiet panic=-1 oops=panic mitigations=off 8250.nr_uarts=4 tsc=reliable no_timer_check random.trust_cpu=on ${NESTED_KVM_APPEND:-}"
# QEMU's monitor on a pair of FIFOs (QEMU opens them read-write, so it never waits for us): a stalled guest's
# registers can be read from it.
mkfifo "$run_dir/monitor.in" "$run_dir/monitor.out" || die "mkfifo failed"
t_start=$(date +%s.%N)
timeout -k 5 "$timeout_s" "$qemu" \
    -accel "tcg,thread=${NESTED_KVM_TCG_THREAD:-single}" -M pc -cpu "${NESTED_KVM_CPU:-max}" -m "$mem_mb" -smp "$smp" \
    -nodefaults -no-user-config -display none -monitor "pipe:$run_dir/monitor" -pidfile "$run_dir/qemu.pid" -no-reboot \
    -kernel "$base_dir/vmlinuz" -initrd "$initrd" -append "$append" \
    -serial "file:$run_dir/console.log" -serial "file:$run_dir/stdout" \
    -serial "file:$run_dir/stderr" -serial "file:$run_dir/ctl" \
    </dev/null >"$run_dir/qemu.log" 2>&1 &
qpid=$!
tail -n +1 -s 0.1 -f --pid="$qpid" "$run_dir/stdout" &
tail_out=$!
tail -n +1 -s 0.1 -f --pid="$qpid" "$run_dir/stderr" >&2 &
tail_err=$!
# Wait for QEMU; meanwhile the guest's heartbeat (and every other control line) must keep arriving. A guest whose
# kernel stopped running is stopped after --stall seconds instead of sitting out the whole timeout. Seen with QEMU
# 7.2's multi-threaded TCG while the guest's KVM runs a nested guest, more often on a loaded host: the vCPU halted
# with IF=1 and the APIC timer's vector pending in IRR, and not even an NMI from the monitor gets through (so no
# watchdog inside the guest can fire either). Single-threaded TCG (the default above) has not shown it.
stalled=
ctl_size=0
SECONDS=0
last_change=0
while kill -0 "$qpid" 2>/dev/null; do
    sleep 0.5
    [ "$stall_s" -gt 0 ] || continue
    size=$(stat -c %s "$run_dir/ctl" 2>/dev/null) || size=0
    if [ "$size" != "$ctl_size" ]; then
        ctl_size=$size
        last_change=$SECONDS
    elif [ $((SECONDS - last_change)) -ge "$stall_s" ]; then
        stalled="no heartbeat for ${stall_s}s (after ${SECONDS}s of the run)"
        break
    fi
done
monitor_dump=
if [ -n "$stalled" ]; then
    # Ask the monitor where the (single) vCPU is. A monitor that does not answer means QEMU's main loop is stuck too.
    { echo "info registers"; echo "info lapic"; echo "info cpus"; } >"$run_dir/monitor.in" &
    monitor_dump=$(timeout 3 cat "$run_dir/monitor.out" 2>/dev/null | tr -d '\r' | grep -av '^(qemu)' || true)
    [ -n "$monitor_dump" ] || monitor_dump="(QEMU's monitor did not answer within 3 s: its main loop is stuck too)"
    qemu_pid=$(cat "$run_dir/qemu.pid" 2>/dev/null) || qemu_pid=
    [ -n "$qemu_pid" ] && kill -9 "$qemu_pid" 2>/dev/null
    kill "$qpid" 2>/dev/null
fi
set +e
wait "$qpid" 2>/dev/null
qrc=$?
wait "$tail_out" "$tail_err"
set -e
t_end=$(date +%s.%N)

console_tail() {
    echo "---- guest console (last 40 lines of $run_dir/console.log) ----" >&2
    tail -n 40 "$run_dir/console.log" | tr -d '\r' >&2
    if [ -s "$run_dir/qemu.log" ]; then
        echo "---- qemu output ----" >&2
        cat "$run_dir/qemu.log" >&2
    fi
}
[ "$show_console" = 1 ] && { echo "---- guest console ----" >&2; tr -d '\r' <"$run_dir/console.log" >&2; }

ready=$(grep -a '^NESTED-KVM-READY' "$run_dir/ctl" | tail -n1 | tr -d '\r') || true
exitline=$(grep -a '^NESTED-KVM-EXIT=' "$run_dir/ctl" | tail -n1 | tr -d '\r') || true
errline=$(grep -a '^NESTED-KVM-ERROR=' "$run_dir/ctl" | tail -n1 | tr -d '\r') || true
if [ "${NESTED_KVM_VERBOSE:-0}" = 1 ]; then
    note "qemu ran $(awk -v a="$t_start" -v b="$t_end" 'BEGIN { printf "%.2f", b - a }')s; guest reached the command at uptime ${ready#NESTED-KVM-READY uptime=}s"
fi

if [ -n "$exitline" ]; then
    rc=${exitline#NESTED-KVM-EXIT=}
    case $rc in '' | *[!0-9]*) die "garbled exit marker '$exitline'" ;; esac
    exit "$rc"
fi
if [ -n "$stalled" ]; then
    last_alive=$(grep -a '^NESTED-KVM-ALIVE' "$run_dir/ctl" | tail -n1 | tr -d '\r') || true
    echo "$prog: error: the guest stalled: $stalled; last heartbeat: ${last_alive:-none} ($([ -n "$ready" ] && echo "it was running the command" || echo "it never got ready"))" >&2
    echo "---- QEMU monitor: info registers, info lapic, info cpus ----" >&2
    echo "$monitor_dump" >&2
    console_tail
    exit "$STALL_RC"
fi
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    echo "$prog: error: timeout after ${timeout_s}s (guest $([ -n "$ready" ] && echo "was running the command" || echo "never got ready"))" >&2
    console_tail
    exit "$TIMEOUT_RC"
fi
if [ -n "$errline" ]; then
    echo "$prog: error: guest: ${errline#NESTED-KVM-ERROR=}" >&2
    console_tail
    exit "$HARNESS_FAIL"
fi
echo "$prog: error: VM ended without an exit marker (qemu exit status $qrc)" >&2
console_tail
exit "$HARNESS_FAIL"
