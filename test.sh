#!/usr/bin/env bash
# Runs vmm's whole test suite on a fresh Debian/Ubuntu machine with the .NET 10 SDK: installs what the
# tests need (gcc and make for the C test guests and the ABI probe, QEMU for the cross-check, iasl for
# the ACPI tables, AFL++ for the fuzz targets), then
# runs every test, then (a full run, no extra arguments) every fuzz target under afl-fuzz for a few seconds.
# KVM tests run for real: on this machine's /dev/kvm when it has one, otherwise inside
# a QEMU/TCG Linux guest whose emulated AMD SVM provides KVM (tools/nested-kvm). They are never skipped.
# Extra arguments go to 'dotnet test' (e.g. --filter FullyQualifiedName~Serial).
set -euo pipefail
cd "$(dirname "$0")"

need=()
for p in gcc libc6-dev make binutils qemu-system-x86 acpica-tools curl afl++; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    echo "test.sh: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Where the KVM tests run (the same rule as tests/Vmm.Tests/TestKit/VmmRunner.cs): the local /dev/kvm only if it
# can run the whole suite — usable (a character device we can open read-write; '<>' alone would create a plain file)
# and hardware-assisted (vmx/svm). A software-virtualization KVM (kvm-pvm) cannot boot a stock Linux kernel, so the
# tests then use the nested-KVM QEMU guest (tools/nested-kvm). VMM_TEST_KVM=local|nested overrides.
if [ -c /dev/kvm ] && ( : <>/dev/kvm ) 2>/dev/null; then
    if grep -qwE 'vmx|svm' /proc/cpuinfo; then kvm_here="hardware-assisted"; else kvm_here="software virtualization (no vmx/svm)"; fi
else
    kvm_here=""
fi
case "${VMM_TEST_KVM:-auto}" in
    local) where="the local /dev/kvm (VMM_TEST_KVM=local${kvm_here:+; it is $kvm_here})" ;;
    nested) where="a nested-KVM QEMU guest (VMM_TEST_KVM=nested)" ;;
    *) if [ "$kvm_here" = hardware-assisted ]; then where="the local /dev/kvm (hardware-assisted)"
       elif [ -n "$kvm_here" ]; then where="a nested-KVM QEMU guest (tools/nested-kvm): this /dev/kvm is $kvm_here and cannot boot a stock Linux kernel"
       else where="a nested-KVM QEMU guest (tools/nested-kvm): no usable /dev/kvm here"; fi ;;
esac
echo "test.sh: KVM tests run on $where" >&2
# Always: it also fetches the stock Debian kernel the Linux boot test uses.
tools/nested-kvm/setup.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
stalls=artifacts/nested-kvm-stalls.log # written by the KVM tests when the nested VM froze and scenarios ran again
rm -f "$stalls"
set +e
dotnet test Vmm.sln --nologo "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ -s "$stalls" ]; then
    echo "test.sh: the nested-KVM VM froze $(grep -c "nested VM stalled" "$stalls") time(s) in this run; the scenarios it left ran again in a fresh VM:"
    sed 's/^/  /' "$stalls"
fi
# Fuzzing: every target under afl-fuzz on SharpFuzz-instrumented assemblies, VMM_FUZZ_SECONDS (default 5) each, one
# after another (tools/fuzz/README.md). Here and not in a test: it needs a separately published and instrumented build,
# and afl-fuzz wants a core to itself, not one shared with the test run. The corpus replay runs in the tests above.
# Only on a full run: with a --filter (or other dotnet test arguments) the caller wants that subset, fast.
if [ $# -eq 0 ]; then
    fuzz_start=$(date +%s)
    set +e
    tools/fuzz/run.sh --all "${VMM_FUZZ_SECONDS:-5}"
    fuzz_rc=$?
    set -e
    echo "vmm fuzz: every target $((${VMM_FUZZ_SECONDS:-5})) s under afl-fuzz, $(( $(date +%s) - fuzz_start )) s in all: $([ $fuzz_rc -eq 0 ] && echo "no findings" || echo "FINDINGS (exit $fuzz_rc)")"
    [ "$rc" -ne 0 ] || rc=$fuzz_rc
fi
# One plain summary line over all test assemblies, last (CI's log ends with it).
awk '/(Passed|Failed)! +- Failed: /{gsub(",", ""); for (i = 1; i <= NF; i++) { if ($i == "Failed:") f += $(i+1); if ($i == "Passed:") p += $(i+1); if ($i == "Skipped:") s += $(i+1) } }
     END { printf "vmm tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$rc"
