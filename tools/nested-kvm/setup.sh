#!/usr/bin/env bash
# setup.sh - install what tools/nested-kvm/run-in-vm.sh needs (Debian/Ubuntu, idempotent) and
# pre-build its cached kernel + initramfs.
#
# Usage: tools/nested-kvm/setup.sh [--no-prepare]
#   --no-prepare   only install packages; do not fetch the kernel / build the cache now
#
# Packages: qemu-system-x86 (TCG emulator with SVM), busybox-static (guest userland), cpio,
# binutils (objcopy, to read module dependencies), xz-utils + zstd (compressed .ko files on
# newer kernels), util-linux (flock), gcc + libc6-dev (to build benchmarks/e2e/kvm_exit_floor.c).
set -euo pipefail

prepare=1
for a in "$@"; do
    case $a in
    --no-prepare) prepare=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$a'" >&2; exit 2 ;;
    esac
done

pkgs=(qemu-system-x86 busybox-static cpio binutils xz-utils zstd util-linux gcc libc6-dev)

missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    sudo=
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "setup.sh: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
        sudo=sudo
    fi
    echo "setup.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "setup.sh: packages already installed" >&2
fi

if [ "$prepare" = 1 ]; then
    "$(dirname "$0")/run-in-vm.sh" --prepare
fi
