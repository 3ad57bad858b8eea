#!/usr/bin/env bash
# vmm with and without --api-socket, side by side on this machine's /dev/kvm (any KVM that runs the micro-guest,
# kvm-pvm included): time from exec to the guest's serial line and peak RSS, interleaved rounds, medians.
#   benchmarks/api-server/vmm-api-cost.sh [ROUNDS]   (default 21)
# Needs benchmarks/e2e/build/{vmm/vmm,files/hello.bin,files/runstat} (benchmarks/e2e/run.sh builds them).
# The API run stays up after the guest ends (the API controls it): runstat kills it after 2 s; its line and RSS count.
set -euo pipefail
cd "$(dirname "$0")/../e2e/build"
rounds=${1:-21}
vmm=$PWD/vmm/vmm
[ -x "$vmm" ] && [ -f files/hello.bin ] && [ -x files/runstat ] || { echo "run benchmarks/e2e/run.sh first" >&2; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq 0 "$rounds"); do
    for c in plain api; do
        args=(run --kernel files/hello.bin)
        [ $c = api ] && args+=(--api-socket "$out/api.sock")
        line=$(files/runstat -t 2 -m 'hello from' "$out/$c.out" "$vmm" "${args[@]}")
        [ "$r" = 0 ] && continue # warm-up
        echo "$c $line"
    done
done | awk '{ c = $1; for (i = 2; i <= NF; i++) { split($i, kv, "="); v[c, kv[1], ++n[c, kv[1]]] = kv[2] } }
    function med(c, k,   m, i, j, t, a) { m = n[c, k]; for (i = 1; i <= m; i++) a[i] = v[c, k, i]
        for (i = 2; i <= m; i++) for (j = i; j > 1 && a[j] < a[j-1]; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
        return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2 }
    END {
        printf "| case | guest line ms (median) | max RSS MiB (median) | rounds |\n|---|---|---|---|\n"
        for (k = 1; k <= 2; k++) { c = k == 1 ? "plain" : "api"
            printf "| %s | %.1f | %.1f | %d |\n", c == "plain" ? "vmm run" : "vmm run --api-socket", med(c, "mark1_ns") / 1e6, med(c, "maxrss_kb") / 1024, n[c, "mark1_ns"] }
        printf "\nWith the API: guest line %+.1f ms, peak RSS %+.1f MiB (difference of medians)\n",
            (med("api", "mark1_ns") - med("plain", "mark1_ns")) / 1e6, (med("api", "maxrss_kb") - med("plain", "maxrss_kb")) / 1024 }'
