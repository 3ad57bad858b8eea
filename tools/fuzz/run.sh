#!/usr/bin/env bash
# Runs vmm's fuzz targets under AFL++ (SharpFuzz instruments the vmm assemblies; tools/fuzz/README.md).
#   tools/fuzz/run.sh --list               the targets
#   tools/fuzz/run.sh TARGET SECONDS       build, then fuzz TARGET for SECONDS seconds
#   tools/fuzz/run.sh --all SECONDS        build once, then every target for SECONDS seconds each, one after another
# Starts from the committed corpus (tools/fuzz/corpus/TARGET plus tools/fuzz/regressions/TARGET); findings go to
# artifacts/fuzz/out/TARGET (VMM_FUZZ_OUT overrides; the instrumented build goes to VMM_FUZZ_BIN, default
# artifacts/fuzz/bin). Exit status 1 (and the paths of the inputs) when AFL found a
# crash or a hang, 2 for bad usage or a missing tool. Needs afl-fuzz (Debian: apt-get install afl++) and root for the
# virtio-net target (a tap in a private network namespace).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
bin=${VMM_FUZZ_BIN:-$root/artifacts/fuzz/bin}
out_root=${VMM_FUZZ_OUT:-$root/artifacts/fuzz/out}
# The assemblies whose branches AFL sees: everything that parses guest or client input. Not Vmm.Interop (syscall
# wrappers) and not Vmm.Fuzz itself (the harness).
instrument=(Vmm.Memory Vmm.Devices Vmm.Boot Vmm.Api)

die() { echo "run.sh: $*" >&2; exit 2; }

build() {
    echo "run.sh: building and instrumenting (${instrument[*]})" >&2
    # A fresh directory every time: an assembly instrumented twice is refused, and publish would skip copying over a
    # newer (already instrumented) file.
    rm -rf "$bin"
    dotnet publish tools/fuzz/Vmm.Fuzz -c Release -o "$bin" --nologo -v quiet >/dev/null \
        || die "dotnet publish tools/fuzz/Vmm.Fuzz failed (run it by hand to see why)"
    dotnet tool restore >/dev/null || die "dotnet tool restore failed (.config/dotnet-tools.json: SharpFuzz.CommandLine)"
    for a in "${instrument[@]}"; do
        dotnet sharpfuzz "$bin/$a.dll" >/dev/null || die "sharpfuzz could not instrument $a.dll"
    done
}

targets() { dotnet "$bin/Vmm.Fuzz.dll" --list | awk '{print $1}'; }

# fuzz TARGET SECONDS: one afl-fuzz run; prints one summary line; returns 1 on a crash or hang.
fuzz() {
    local target=$1 seconds=$2
    local out=$out_root/$target in=$out_root/.in/$target
    [ -d "tools/fuzz/corpus/$target" ] || die "no corpus for '$target' (tools/fuzz/corpus/$target)"
    rm -rf "$out" "$in"
    mkdir -p "$in" "$(dirname "$out")"
    cp tools/fuzz/corpus/"$target"/* "$in"/
    if [ -d "tools/fuzz/regressions/$target" ]; then
        for f in tools/fuzz/regressions/"$target"/*; do cp "$f" "$in/regression-$(basename "$f")"; done
    fi
    # -t: a hang is an input that takes 5 s (the device targets give up after 2 s themselves and crash with a
    # message instead); -m none: the CLR reserves far more address space than AFL's default limit.
    # AFL_SKIP_BIN_CHECK: the target is `dotnet`, instrumented by SharpFuzz, not afl-cc. AFL_NO_AFFINITY: the CPUs
    # are shared. -V: stop after SECONDS; `timeout` is the backstop (calibration of a slow seed is not counted).
    local rc=0
    AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_BIN_CHECK=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1 \
    AFL_FAST_CAL=1 \
        timeout --kill-after=10 $((seconds + 120)) \
        afl-fuzz -i "$in" -o "$out" -t 5000 -m none -V "$seconds" -- dotnet "$bin/Vmm.Fuzz.dll" "$target" \
        >"$out.log" 2>&1 || rc=$?
    local stats=$out/default/fuzzer_stats
    if [ ! -f "$stats" ]; then
        echo "run.sh: $target: afl-fuzz did not start (exit $rc); the end of $out.log:" >&2
        tail -n 25 "$out.log" | sed 's/^/  /' >&2
        return 1
    fi
    stat() { awk -F': *' -v k="$1" '$1 ~ "^"k" *$" {print $2}' "$stats"; }
    local crashes hangs
    crashes=$(find "$out/default/crashes" -name 'id:*' 2>/dev/null | sort)
    hangs=$(find "$out/default/hangs" -name 'id:*' 2>/dev/null | sort)
    printf '%-18s %6s s  %10s execs  %9s execs/s  %5s paths  %s crashes  %s hangs\n' "$target" "$(stat run_time)" \
        "$(stat execs_done)" "$(stat execs_per_sec)" "$(stat corpus_count)" "$(stat saved_crashes)" "$(stat saved_hangs)"
    if [ -n "$crashes$hangs" ]; then
        echo "run.sh: $target: AFL found $(echo "$crashes" | grep -c . || true) crashing and $(echo "$hangs" | grep -c . || true) hanging input(s):" >&2
        for f in $crashes $hangs; do echo "  $f" >&2; done
        echo "run.sh: reproduce one (with its stack trace): dotnet $bin/Vmm.Fuzz.dll $target FILE" >&2
        return 1
    fi
    # A run that executed nothing, or saw no coverage (instrumentation missing: AFL_SKIP_BIN_CHECK hides that), tested
    # nothing and must not pass as "no findings".
    if [ "$(stat execs_done)" = 0 ] || [ "$(stat bitmap_cvg)" = "0.00%" ]; then
        echo "run.sh: $target: afl-fuzz ran $(stat execs_done) inputs with $(stat bitmap_cvg) coverage: not fuzzed (is the build instrumented?)" >&2
        return 1
    fi
    if [ "$rc" -ne 0 ]; then
        echo "run.sh: $target: afl-fuzz exited with status $rc; the end of $out.log:" >&2
        tail -n 25 "$out.log" | sed 's/^/  /' >&2
        return 1
    fi
}

case "${1:-}" in
    --list)
        [ -f "$bin/Vmm.Fuzz.dll" ] || build
        dotnet "$bin/Vmm.Fuzz.dll" --list
        exit 0 ;;
    ""|-h|--help)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        exit 2 ;;
esac
[ $# -eq 2 ] || die "usage: tools/fuzz/run.sh TARGET SECONDS | --all SECONDS | --list"
[[ "$2" =~ ^[1-9][0-9]*$ ]] || die "SECONDS must be a positive number, not '$2'"
command -v afl-fuzz >/dev/null || die "afl-fuzz not found: install AFL++ (Debian/Ubuntu: apt-get install afl++)"
build
if [ "$1" = --all ]; then
    failed=()
    for t in $(targets); do fuzz "$t" "$2" || failed+=("$t"); done
    if [ ${#failed[@]} -gt 0 ]; then
        echo "run.sh: findings in: ${failed[*]} (inputs under $out_root/TARGET/default/{crashes,hangs})" >&2
        exit 1
    fi
    exit 0
fi
targets | grep -qx -- "$1" || die "no fuzz target '$1' (tools/fuzz/run.sh --list)"
fuzz "$1" "$2"
