#!/usr/bin/env bash
# run.sh - end-to-end comparison of vmm against the bare-C KVM floor and QEMU, on real KVM.
#
# Builds vmm (NativeAOT), kvm_exit_floor and runstat (static C), the micro-guests (pio-loop.bin,
# mmio-loop.bin, hello.bin from `Vmm.Benchmarks make-guests`) and stages a copy of the host's QEMU with the
# firmware it needs, then runs inner.sh in ONE tools/nested-kvm/run-in-vm.sh boot, so every number comes
# from the same VM, interleaved round by round. Prints a summary (medians over the measured rounds) and
# the vmm/floor ratios; raw lines and the summary are kept in benchmarks/e2e/build/.
#
# Usage:
#   benchmarks/e2e/run.sh                      # build everything, measure, summarise
#   benchmarks/e2e/run.sh --linux              # only the Linux-boot cases (vmm vs QEMU), still one nested VM run
#   benchmarks/e2e/run.sh --api                # only vmm with and without --api-socket (start-up, peak RSS)
#   benchmarks/e2e/run.sh --blk                # only the virtio-blk cases (vmm vs QEMU q35, the virtio-test guest's
#                                              # `bench` subtest on a raw image in the nested VM's tmpfs)
#   benchmarks/e2e/run.sh --vhost              # only the vhost-user cases: virtio-fs (virtiofsd) and vhost-user-blk
#                                              # (qemu-storage-daemon) under vmm and QEMU q35, the same stock Linux guest
#                                              # running io-bench (4 KiB random reads, 1 MiB sequential reads)
#   benchmarks/e2e/run.sh --vsock              # only the vsock cases: round trips and a stream host->guest, vmm's hybrid
#                                              # vsock against QEMU's vhost-vsock-pci (the nested VM's /dev/vhost-vsock)
#   benchmarks/e2e/run.sh --summarize RAWFILE  # summarise a kept raw file again
# Environment:
#   ROUNDS=7            measured rounds (plus one warm-up round)
#   QEMU_MACHINES="microvm pc"   QEMU machine types for the start-up comparison ("" to skip QEMU)
#   E2E_SKIP_PUBLISH=1  reuse benchmarks/e2e/build/vmm/vmm instead of publishing again
#   E2E_TIMEOUT=1500    seconds for the whole nested VM run
#   LINUX_QEMU_MACHINES="pc microvm"  QEMU machine types for the Linux-boot comparison
#   LINUX_CMDLINE="console=ttyS0 panic=-1 rdinit=/init"  kernel command line for both programs
#   E2E_CASES="exit start linux"  case groups (blk: see --blk); --linux / --blk pick one group
#   BLK_IOS=500 BLK_QD=16 BLK_MIB=16 BLK_IMG_MB=64  virtio-blk: random 4 KiB I/Os per case, deep queue depth,
#                       sequential MiB per case, image size; BLK_QEMU_DRIVE="cache=writeback,aio=threads"
# The Linux-boot cases boot tools/nested-kvm's cached Debian kernel (run-in-vm.sh --prepare) with a busybox
# initramfs whose /init prints a line and runs `poweroff -f`.
#
# The nested VM runs KVM on QEMU/TCG-emulated AMD SVM: absolute times are 30-50x those of hardware KVM
# and only the ratios between programs measured in the same run mean anything (see benchmarks/README.md).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=$here/build
exits=20000

summarize() {
    local raw=$1
    awk -v exits="$exits" '
    function median(key,   n, i, j, t, a) {
        n = cnt[key]
        if (n == 0) return ""
        for (i = 1; i <= n; i++) a[i] = val[key, i]
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
        lo[key] = a[1]; hi[key] = a[n]
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function add(key, v) { cnt[key]++; val[key, cnt[key]] = v }
    function ms(x) { return x == "" ? "n/a" : sprintf("%.0f", x / 1e6) }
    function f(x, d) { return x == "" ? "n/a" : sprintf("%." d "f", x) }
    function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "n/a" : sprintf("%.2f", a / b) }
    /^E2E-INFO / { sub(/^E2E-INFO /, ""); info[++ninfo] = $0; next }
    /^E2E case=/ {
        delete kv
        for (i = 2; i <= NF; i++) { split($i, p, "="); kv[p[1]] = p[2] }
        c = kv["case"]
        if (!(c in seen)) { seen[c] = 1; order[++ncase] = c }
        if (kv["round"] == 0) { warm[c]++; next }
        if (kv["ok"] != 1) { bad[c]++; next }
        good[c]++
        for (k in kv) if (k != "case" && k != "round" && k != "ok" && k != "rc" && kv[k] != -1) add(c SUBSEP k, kv[k])
        for (k in kv) R[c, kv["round"], k] = kv[k]
        if (kv["round"] > maxround) maxround = kv["round"]
    }
    END {
        for (i = 1; i <= ninfo; i++) print "- " info[i]
        print ""
        if (good["floor-pio"] + 0 > 0) {
        print "Exit cost, medians over " (good["floor-pio"] + 0) " measured rounds (min-max in brackets); per-exit figures as each program reports them:"
        print ""
        print "| case | wall ns/exit | user ns/exit | sys ns/exit | process wall ms | max RSS MiB | failed runs |"
        print "|---|---|---|---|---|---|---|"
        for (i = 1; i <= ncase; i++) {
            c = order[i]
            if (c ~ /^(start|linux)-/) continue
            w = median(c SUBSEP "wall_ns_per_exit"); wl = lo[c SUBSEP "wall_ns_per_exit"]; wh = hi[c SUBSEP "wall_ns_per_exit"]
            u = median(c SUBSEP "user_ns_per_exit"); ul = lo[c SUBSEP "user_ns_per_exit"]; uh = hi[c SUBSEP "user_ns_per_exit"]
            s = median(c SUBSEP "sys_ns_per_exit")
            pw = median(c SUBSEP "wall_ns"); rss = median(c SUBSEP "maxrss_kb")
            W[c] = w; U[c] = u; S[c] = s
            printf "| %s | %s [%s-%s] | %s [%s-%s] | %s | %s | %s | %d |\n", c, f(w, 0), f(wl, 0), f(wh, 0), f(u, 0), f(ul, 0), f(uh, 0), f(s, 0), f(pw / 1e6, 0), f(rss / 1024, 1), bad[c]
        }
        print ""
        print "Ratios per exit. \"of medians\": median(vmm) / median(floor); \"paired\": the median [min-max] of the"
        print "per-round ratios (each vmm run against the floor run of the same round, seconds apart):"
        print ""
        print "| ratio | wall, of medians | wall, paired | user CPU, of medians | user CPU, paired | sys CPU, of medians |"
        print "|---|---|---|---|---|---|"
        np = split("vmm-pio/floor-pio vmm-pio/floor-pio-irqchip vmm-pio-noirqchip/floor-pio vmm-mmio/floor-mmio vmm-mmio/floor-mmio-irqchip vmm-mmio-noirqchip/floor-mmio", pairs, " ")
        for (i = 1; i <= np; i++) {
            split(pairs[i], pr, "/")
            if (!((pr[1] in seen) && (pr[2] in seen))) continue
            for (r = 1; r <= maxround; r++) {
                if (((pr[1], r, "wall_ns_per_exit") in R) && ((pr[2], r, "wall_ns_per_exit") in R) && R[pr[2], r, "wall_ns_per_exit"] > 0 && R[pr[2], r, "user_ns_per_exit"] > 0) {
                    add(pairs[i] SUBSEP "w", R[pr[1], r, "wall_ns_per_exit"] / R[pr[2], r, "wall_ns_per_exit"])
                    add(pairs[i] SUBSEP "u", R[pr[1], r, "user_ns_per_exit"] / R[pr[2], r, "user_ns_per_exit"])
                }
            }
            pw = median(pairs[i] SUBSEP "w"); pwl = lo[pairs[i] SUBSEP "w"]; pwh = hi[pairs[i] SUBSEP "w"]
            pu = median(pairs[i] SUBSEP "u"); pul = lo[pairs[i] SUBSEP "u"]; puh = hi[pairs[i] SUBSEP "u"]
            printf "| %s / %s | %s | %s [%s-%s] | %s | %s [%s-%s] | %s |\n", pr[1], pr[2], ratio(W[pr[1]], W[pr[2]]), f(pw, 2), f(pwl, 2), f(pwh, 2), ratio(U[pr[1]], U[pr[2]]), f(pu, 2), f(pul, 2), f(puh, 2), ratio(S[pr[1]], S[pr[2]])
        }
        }
        if (good["start-vmm"] + 0 > 0) {
        print ""
        print "Start-up: process start -> guest printed its line and exited via port 0xf4 -> process reaped (runstat), medians [min-max]:"
        print ""
        print "| case | wall ms | user ms | sys ms | max RSS MiB | failed runs |"
        print "|---|---|---|---|---|---|"
        for (i = 1; i <= ncase; i++) {
            c = order[i]
            if (c !~ /^start-/) continue
            w = median(c SUBSEP "wall_ns"); wl = lo[c SUBSEP "wall_ns"]; wh = hi[c SUBSEP "wall_ns"]
            u = median(c SUBSEP "user_ns"); s = median(c SUBSEP "sys_ns")
            r = median(c SUBSEP "maxrss_kb"); rl = lo[c SUBSEP "maxrss_kb"]; rh = hi[c SUBSEP "maxrss_kb"]
            SW[c] = w; SR[c] = r
            printf "| %s | %s [%s-%s] | %s | %s | %s [%s-%s] | %d |\n", c, f(w / 1e6, 0), f(wl / 1e6, 0), f(wh / 1e6, 0), f(u / 1e6, 0), f(s / 1e6, 0), f(r / 1024, 1), f(rl / 1024, 1), f(rh / 1024, 1), bad[c]
        }
        for (i = 1; i <= ncase; i++) {
            c = order[i]
            if (c ~ /^start-qemu/ && ("start-vmm" in SW))
                printf "\n%s / start-vmm: wall %s, max RSS %s", c, ratio(SW[c], SW["start-vmm"]), ratio(SR[c], SR["start-vmm"])
        }
        print ""
        }
        if (("blk-vmm-none" in seen) || ("blk-qemu-none" in seen)) {
        print ""
        print "virtio-blk, the virtio-test guest'"'"'s bench subtest (one process per case and round; rates from the guest'"'"'s"
        print "RDTSC), medians [min-max] over the measured rounds; 4 KiB cases in IOPS, 1 MiB cases in MiB/s. vmm exits"
        print "per I/O = (vmm exits in the run - median exits of the bench-case=none run) / I/Os, from --stats:"
        print ""
        print "| case | vmm | QEMU | vmm/QEMU, of medians | vmm/QEMU, paired | vmm exits/IO (pio, mmio) | failed runs vmm/QEMU |"
        print "|---|---|---|---|---|---|---|"
        bx = median("blk-vmm-none" SUBSEP "exits"); bp = median("blk-vmm-none" SUBSEP "pio"); bm = median("blk-vmm-none" SUBSEP "mmio")
        for (i = 1; i <= ncase; i++) {
            c = order[i]
            if (c !~ /^blk-vmm-/ || c == "blk-vmm-none") continue
            n = substr(c, 9); q = "blk-qemu-" n
            for (r = 1; r <= maxround; r++) for (k = 1; k <= 2; k++) {
                pc = k == 1 ? c : q
                if (((pc, r, "bench_us") in R) && R[pc, r, "bench_us"] > 0 && R[pc, r, "ok"] == 1) {
                    rt = R[pc, r, "bench_ios"] * 1e6 / R[pc, r, "bench_us"]
                    if (R[pc, r, "bench_bs"] >= 1048576) rt = rt * R[pc, r, "bench_bs"] / 1048576
                    add(pc SUBSEP "rate", rt); RT[pc, r] = rt
                }
            }
            for (r = 1; r <= maxround; r++)
                if (((c, r) in RT) && ((q, r) in RT) && RT[q, r] > 0) add(n SUBSEP "pr", RT[c, r] / RT[q, r])
            v = median(c SUBSEP "rate"); vl = lo[c SUBSEP "rate"]; vh = hi[c SUBSEP "rate"]
            w = median(q SUBSEP "rate"); wl = lo[q SUBSEP "rate"]; wh = hi[q SUBSEP "rate"]
            bpr = median(n SUBSEP "pr"); bprl = lo[n SUBSEP "pr"]; bprh = hi[n SUBSEP "pr"]
            ios = median(c SUBSEP "bench_ios"); x = median(c SUBSEP "exits"); xp = median(c SUBSEP "pio"); xm = median(c SUBSEP "mmio")
            epi = (x == "" || bx == "" || ios == "") ? "n/a" : sprintf("%.2f (%.2f, %.2f)", (x - bx) / ios, (xp - bp) / ios, (xm - bm) / ios)
            d = n ~ /1m$/ ? 1 : 0
            printf "| %s | %s [%s-%s] | %s [%s-%s] | %s | %s [%s-%s] | %s | %d/%d |\n", n, f(v, d), f(vl, d), f(vh, d), f(w, d), f(wl, d), f(wh, d), ratio(v, w), f(bpr, 2), f(bprl, 2), f(bprh, 2), epi, bad[c] + 0, bad[q] + 0
        }
        if (median("blk-qemu-none" SUBSEP "kx") != "" || median("blk-vmm-none" SUBSEP "kx") != "") {
        print ""
        print "Exits KVM saw (kvm:kvm_exit hist trigger, in-kernel ones included) per I/O, minus the bench-case=none run,"
        print "medians: all (npf = nested page faults, i.e. MMIO and xAPIC accesses; io; hlt; intr = host interrupts):"
        print ""
        print "| case | vmm: all (npf, io, hlt, intr) | QEMU: all (npf, io, hlt, intr) |"
        print "|---|---|---|"
        nk = split("kx kx_npf kx_io kx_hlt kx_intr", kk, " ")
        for (i = 1; i <= ncase; i++) {
            c = order[i]
            if (c !~ /^blk-vmm-/ || c == "blk-vmm-none") continue
            n = substr(c, 9); line = "| " n
            for (k = 1; k <= 2; k++) {
                pc = k == 1 ? c : "blk-qemu-" n; b = k == 1 ? "blk-vmm-none" : "blk-qemu-none"; ios = median(pc SUBSEP "bench_ios")
                cell = ""
                for (j = 1; j <= nk; j++) {
                    x = median(pc SUBSEP kk[j]); y = median(b SUBSEP kk[j])
                    v = (x == "" || y == "" || ios == "" || ios == 0) ? "n/a" : sprintf("%.2f", (x - y) / ios)
                    cell = cell (j == 1 ? v " (" : j < nk ? v ", " : v ")")
                }
                line = line " | " cell
            }
            print line " |"
        }
        bq = median("blk-qemu-none" SUBSEP "kx"); bv = median("blk-vmm-none" SUBSEP "kx")
        printf "\nKVM exits of the bench-case=none run: vmm %s, QEMU %s\n", bv == "" ? "n/a" : bv, bq == "" ? "n/a" : bq
        }
        if (bx != "") printf "\nvmm exits of the bench-case=none run (boot, PCI enumeration, device setup, TSC calibration): %d (pio %d, mmio %d)\n", bx, bp, bm
        if (("blk-vmm-none" in seen) && ("blk-qemu-none" in seen))
            printf "Process wall time of the bench-case=none run, ms: vmm %s, QEMU %s\n", ms(median("blk-vmm-none" SUBSEP "wall_ns")), ms(median("blk-qemu-none" SUBSEP "wall_ns"))
        }
        if ("api-vmm" in seen) {
        print ""
        print "The control plane: `vmm run --kernel hello.bin` without and with `--api-socket` (runstat -m: process start ->"
        print "the guest'"'"'s line; the API run is killed after 3 s, as it waits for vmm.shutdown), medians [min-max]:"
        print ""
        print "| case | first byte ms | guest line ms | max RSS MiB | failed runs |"
        print "|---|---|---|---|---|"
        for (i = 1; i <= ncase; i++) {
            c = order[i]
            if (c !~ /^api-/) continue
            fb = median(c SUBSEP "first_byte_ns"); m = median(c SUBSEP "mark1_ns"); ml = lo[c SUBSEP "mark1_ns"]; mh = hi[c SUBSEP "mark1_ns"]
            r = median(c SUBSEP "maxrss_kb"); rl = lo[c SUBSEP "maxrss_kb"]; rh = hi[c SUBSEP "maxrss_kb"]
            A[c, "m"] = m; A[c, "r"] = r
            printf "| %s | %s | %s [%s-%s] | %s [%s-%s] | %d |\n", c, f(fb / 1e6, 1), f(m / 1e6, 1), f(ml / 1e6, 1), f(mh / 1e6, 1), f(r / 1024, 1), f(rl / 1024, 1), f(rh / 1024, 1), bad[c]
        }
        if (("api-vmm-api" in seen))
            printf "\nWith the API: guest line %+.1f ms, max RSS %+.1f MiB (difference of medians)\n", (A["api-vmm-api", "m"] - A["api-vmm", "m"]) / 1e6, (A["api-vmm-api", "r"] - A["api-vmm", "r"]) / 1024
        }
        if (("vh-fs-vmm" in seen) || ("vh-blk-vmm" in seen)) {
        print ""
        print "vhost-user: io-bench in the same stock Linux guest, the same backend binary, vmm and QEMU q35 alternating;"
        print "IOPS (4 KiB random reads; 1 thread, then the VH_THREADS threads) and MiB/s (1 MiB sequential reads),"
        print "medians [min-max]; ratio = vmm / QEMU of medians, paired = median of the per-round ratios:"
        print ""
        print "| device | metric | vmm | QEMU | ratio | paired |"
        print "|---|---|---|---|---|---|"
        nm = split("rr1 rrq seq", mk, " ")
        for (d = 1; d <= 2; d++) {
            dev = d == 1 ? "fs" : "blk"; v = "vh-" dev "-vmm"; q = "vh-" dev "-qemu"
            if (!(v in seen)) continue
            for (j = 1; j <= nm; j++) {
                m = mk[j]
                for (r = 1; r <= maxround; r++) for (k = 1; k <= 2; k++) {
                    pc = k == 1 ? v : q
                    if (((pc, r, m "_us") in R) && R[pc, r, m "_us"] > 0 && R[pc, r, "ok"] == 1) {
                        rt = R[pc, r, m "_ios"] * 1e6 / R[pc, r, m "_us"]
                        add(pc SUBSEP m "rate", rt); VR[pc, r, m] = rt
                    }
                }
                for (r = 1; r <= maxround; r++)
                    if (((v, r, m) in VR) && ((q, r, m) in VR) && VR[q, r, m] > 0) add(dev m SUBSEP "pr", VR[v, r, m] / VR[q, r, m])
                a = median(v SUBSEP m "rate"); al = lo[v SUBSEP m "rate"]; ah = hi[v SUBSEP m "rate"]
                b = median(q SUBSEP m "rate"); bl = lo[q SUBSEP m "rate"]; bh = hi[q SUBSEP m "rate"]
                vpr = median(dev m SUBSEP "pr")
                label = m == "rr1" ? "4 KiB randread IOPS, 1 thread" : m == "rrq" ? "4 KiB randread IOPS, threads" : "seqread MiB/s"
                printf "| %s | %s | %s [%s-%s] | %s [%s-%s] | %s | %s |\n", dev == "fs" ? "virtio-fs" : "vhost-user-blk", label, f(a, 0), f(al, 0), f(ah, 0), f(b, 0), f(bl, 0), f(bh, 0), ratio(a, b), f(vpr, 2)
            }
            printf "| %s | failed runs (vmm, QEMU) | %d | %d | | |\n", dev == "fs" ? "virtio-fs" : "vhost-user-blk", bad[v] + 0, bad[q] + 0
        }
        }
        if ("vs-vmm" in seen) {
        print ""
        print "vsock: the same Linux guest serving vsock-bench; vmm hybrid vsock (Unix socket + CONNECT) vs QEMU vhost-vsock-pci"
        print "(kernel vhost, AF_VSOCK), alternating; medians [min-max]; ratio = vmm / QEMU, paired = median of the per-round ratios:"
        print ""
        print "| metric | vmm | QEMU | ratio | paired |"
        print "|---|---|---|---|---|"
        for (j = 1; j <= 2; j++) {
            m = j == 1 ? "rtt" : "mibs"
            for (r = 1; r <= maxround; r++) for (k = 1; k <= 2; k++) {
                pc = k == 1 ? "vs-vmm" : "vs-qemu"
                if (!((pc, r, "ok") in R) || R[pc, r, "ok"] != 1) continue
                if (m == "rtt" && R[pc, r, "pp_count"] > 0) { x = R[pc, r, "pp_us"] / R[pc, r, "pp_count"]; add(pc SUBSEP m, x); VS[pc, r, m] = x }
                if (m == "mibs" && R[pc, r, "st_us"] > 0) { x = R[pc, r, "st_bytes"] / 1048576 * 1e6 / R[pc, r, "st_us"]; add(pc SUBSEP m, x); VS[pc, r, m] = x }
            }
            for (r = 1; r <= maxround; r++)
                if ((("vs-vmm", r, m) in VS) && (("vs-qemu", r, m) in VS) && VS["vs-qemu", r, m] > 0) add("vs" m SUBSEP "pr", VS["vs-vmm", r, m] / VS["vs-qemu", r, m])
            a = median("vs-vmm" SUBSEP m); al = lo["vs-vmm" SUBSEP m]; ah = hi["vs-vmm" SUBSEP m]
            b = median("vs-qemu" SUBSEP m); bl = lo["vs-qemu" SUBSEP m]; bh = hi["vs-qemu" SUBSEP m]
            printf "| %s | %s [%s-%s] | %s [%s-%s] | %s | %s |\n", m == "rtt" ? "64-byte round trip, us" : "stream host->guest, MiB/s", f(a, 0), f(al, 0), f(ah, 0), f(b, 0), f(bl, 0), f(bh, 0), ratio(a, b), f(median("vs" m SUBSEP "pr"), 2)
        }
        printf "| failed runs | %d | %d | | |\n", bad["vs-vmm"] + 0, bad["vs-qemu"] + 0
        }
        if (!("linux-vmm" in seen)) exit
        print ""
        print "Linux boot: process start -> first output byte / \"Linux version\" line / /init line / process reaped"
        print "after poweroff (runstat), ms, medians [min-max]:"
        print ""
        print "| case | first byte | Linux version | /init | exit | user ms | sys ms | max RSS MiB | failed runs |"
        print "|---|---|---|---|---|---|---|---|---|"
        nk = split("first_byte_ns linux_ns init_ns wall_ns", lk, " ")
        for (i = 1; i <= ncase; i++) {
            c = order[i]
            if (c !~ /^linux-/) continue
            line = "| " c
            for (j = 1; j <= nk; j++) {
                m = median(c SUBSEP lk[j]); L[c, lk[j]] = m
                line = line " | " (m == "" ? "n/a" : f(m / 1e6, 0) " [" f(lo[c SUBSEP lk[j]] / 1e6, 0) "-" f(hi[c SUBSEP lk[j]] / 1e6, 0) "]")
            }
            r = median(c SUBSEP "maxrss_kb"); L[c, "maxrss_kb"] = r
            printf "%s | %s | %s | %s [%s-%s] | %d |\n", line, f(median(c SUBSEP "user_ns") / 1e6, 0), f(median(c SUBSEP "sys_ns") / 1e6, 0), f(r / 1024, 1), f(lo[c SUBSEP "maxrss_kb"] / 1024, 1), f(hi[c SUBSEP "maxrss_kb"] / 1024, 1), bad[c] + 0
        }
        print ""
        print "Ratios vmm / QEMU, of medians; paired = median [min-max] of the per-round ratios:"
        print ""
        print "| ratio | Linux version | Linux version, paired | exit | exit, paired | max RSS |"
        print "|---|---|---|---|---|---|"
        for (i = 1; i <= ncase; i++) {
            q = order[i]
            if (q !~ /^linux-qemu/) continue
            for (r = 1; r <= maxround; r++) {
                if ((("linux-vmm", r, "wall_ns") in R) && ((q, r, "wall_ns") in R)) {
                    if (R["linux-vmm", r, "linux_ns"] > 0 && R[q, r, "linux_ns"] > 0)
                        add(q SUBSEP "pl", R["linux-vmm", r, "linux_ns"] / R[q, r, "linux_ns"])
                    add(q SUBSEP "pw", R["linux-vmm", r, "wall_ns"] / R[q, r, "wall_ns"])
                }
            }
            pl = median(q SUBSEP "pl"); pll = lo[q SUBSEP "pl"]; plh = hi[q SUBSEP "pl"]
            pw = median(q SUBSEP "pw"); pwl = lo[q SUBSEP "pw"]; pwh = hi[q SUBSEP "pw"]
            printf "| linux-vmm / %s | %s | %s [%s-%s] | %s | %s [%s-%s] | %s |\n", q, ratio(L["linux-vmm", "linux_ns"], L[q, "linux_ns"]), f(pl, 2), f(pll, 2), f(plh, 2), ratio(L["linux-vmm", "wall_ns"], L[q, "wall_ns"]), f(pw, 2), f(pwl, 2), f(pwh, 2), ratio(L["linux-vmm", "maxrss_kb"], L[q, "maxrss_kb"])
        }
    }' "$raw"
}

cases=${E2E_CASES:-exit start linux}
if [ "${1:-}" = --linux ]; then
    cases=linux
    shift
elif [ "${1:-}" = --blk ]; then
    cases=blk
    shift
elif [ "${1:-}" = --vhost ]; then
    cases=vhost
    shift
elif [ "${1:-}" = --vsock ]; then
    cases=vsock
    shift
elif [ "${1:-}" = --api ]; then
    cases=api
    shift
fi
has_case() { case " $cases " in *" $1 "*) return 0 ;; esac; return 1; }
if [ "${1:-}" = --summarize ]; then
    summarize "${2:?--summarize needs the raw file}"
    exit 0
fi

cd "$repo"
mkdir -p "$build"
files=$build/files
rm -rf "$files"
mkdir -p "$files"

# 1. vmm, NativeAOT (what ships).
if [ "${E2E_SKIP_PUBLISH:-0}" != 1 ] || [ ! -x "$build/vmm/vmm" ]; then
    echo "run.sh: publishing vmm (NativeAOT)" >&2
    dotnet publish src/Vmm.Cli -c Release -o "$build/vmm" --nologo >"$build/publish.log" 2>&1 ||
        { cat "$build/publish.log" >&2; exit 1; }
fi
cp "$build/vmm/vmm" "$files/vmm"

# 2. The C floor and the process meter, static so they need nothing in the guest.
gcc -O2 -Wall -Werror -static -o "$build/kvm_exit_floor" "$here/kvm_exit_floor.c"
gcc -O2 -Wall -Werror -static -o "$build/runstat" "$here/runstat.c"
cp "$build/kvm_exit_floor" "$build/runstat" "$files/"

# 3. Micro-guests (exit and start cases); the virtio-test guest (blk cases).
if has_case exit || has_case start || has_case api; then
    echo "run.sh: generating micro-guests" >&2
    dotnet run -c Release --project benchmarks/Vmm.Benchmarks -- make-guests "$files" >/dev/null
fi
if has_case blk; then
    make -s -C guest-images build/virtio-test.elf >&2
    cp guest-images/build/virtio-test.elf "$files/"
fi

# 4. QEMU for the start-up comparison: the host binary (the harness copies the libraries ldd lists) under
#    qemu/bin, its firmware under qemu/share, where QEMU finds it relative to its own path (<bin>/../share).
#    microvm needs qboot (bios-microvm.bin) and the multiboot option ROM; pc needs SeaBIOS, the VGA BIOS,
#    kvmvapic.bin and its default NIC's ROM. Symlinks are dereferenced (the guest has no /usr/share).
qemu_machines=${QEMU_MACHINES-microvm pc}
if [ -n "$qemu_machines" ]; then
    qemu=$(command -v qemu-system-x86_64 || true)
    if [ -z "$qemu" ]; then
        echo "run.sh: qemu-system-x86_64 not found: skipping the QEMU start-up comparison" >&2
        qemu_machines=
    else
        mkdir -p "$files/qemu/bin" "$files/qemu/share/qemu" "$files/qemu/share/seabios"
        cp -L "$qemu" "$files/qemu/bin/qemu-system-x86_64"
        for f in bios-microvm.bin multiboot_dma.bin multiboot.bin linuxboot_dma.bin kvmvapic.bin; do
            [ -e "/usr/share/qemu/$f" ] && cp -L "/usr/share/qemu/$f" "$files/qemu/share/qemu/"
        done
        for f in bios-256k.bin vgabios-stdvga.bin; do
            [ -e "/usr/share/seabios/$f" ] && cp -L "/usr/share/seabios/$f" "$files/qemu/share/seabios/"
        done
        if [ -e /usr/lib/ipxe/qemu/efi-e1000.rom ]; then # pc's default NIC (Debian looks in <bin>/../lib/ipxe/qemu)
            mkdir -p "$files/qemu/lib/ipxe/qemu"
            cp -L /usr/lib/ipxe/qemu/efi-e1000.rom "$files/qemu/lib/ipxe/qemu/"
        fi
    fi
fi
# 5. The Linux-boot guest: tools/nested-kvm's cached Debian kernel and a busybox initramfs (static busybox +
#    an /init that prints a marker and powers off; the same as tests/Vmm.Tests/Kvm/KvmFixture.cs builds).
if has_case linux; then
    cache=$("$repo/tools/nested-kvm/run-in-vm.sh" --prepare | tail -n1)
    vmlinuz=$(ls -t "${NESTED_KVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm-nested-kvm}"/linux-image-*/vmlinuz "$cache"/vmlinuz 2>/dev/null | head -n1)
    [ -n "$vmlinuz" ] || { echo "run.sh: no vmlinuz in the nested-kvm cache" >&2; exit 1; }
    cp "$vmlinuz" "$files/vmlinuz"
    ird=$build/initramfs
    rm -rf "$ird"
    mkdir -p "$ird/bin"
    cp /bin/busybox "$ird/bin/busybox"
    printf '#!/bin/busybox sh\n/bin/busybox echo '\''vmm-initramfs: /init ran, powering off'\''\n/bin/busybox poweroff -f\n' >"$ird/init"
    chmod 755 "$ird/init"
    (cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$files/initramfs.cpio.gz"
fi
if has_case vhost; then
    # The guest: the stock kernel, its virtio/fuse/virtiofs modules (tools/nested-kvm keeps them), io-bench.
    cache=$("$repo/tools/nested-kvm/run-in-vm.sh" --prepare | tail -n1)
    cp "$cache/vmlinuz" "$files/vmlinuz"
    gcc -O2 -Wall -Werror -static -pthread -o "$build/io-bench" "$here/io-bench.c"
    cp /usr/lib/qemu/virtiofsd /usr/bin/qemu-storage-daemon "$files/" ||
        { echo "run.sh: --vhost needs qemu-system-common (virtiofsd, qemu-storage-daemon)" >&2; exit 1; }
    ird=$build/iobench-initramfs
    rm -rf "$ird"
    mkdir -p "$ird/bin" "$ird/lib/modules" "$ird/proc" "$ird/sys" "$ird/dev" "$ird/mnt"
    cp /bin/busybox "$ird/bin/busybox"
    cp "$build/io-bench" "$ird/io-bench"
    cp "$cache"/virtio-modules/* "$ird/lib/modules/"
    cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
for m in $($B cat /lib/modules/load-order); do $B insmod /lib/modules/$m.ko 2>/dev/null; done
arg() { $B sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
what=$(arg iobench); rr=$(arg iobench-rr); th=$(arg iobench-threads); seq=$(arg iobench-seq)
case $what in
fs) $B mount -t virtiofs bench /mnt || echo "vmm-iobench: mount failed"; target=/mnt/data.bin ;;
*) n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do $B sleep 0.1; n=$((n + 1)); done; target=/dev/vda ;;
esac
/io-bench randread $target 4096 $rr 1 && /io-bench randread $target 4096 $rr $th && /io-bench seqread $target 1048576 $seq &&
    echo "vmm-iobench: done"
$B poweroff -f
INIT
    chmod 755 "$ird/init"
    (cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$files/iobench.cpio.gz"
fi
if has_case vsock; then
    cache=$("$repo/tools/nested-kvm/run-in-vm.sh" --prepare | tail -n1)
    cp "$cache/vmlinuz" "$files/vmlinuz"
    gcc -O2 -Wall -Werror -static -o "$build/vsock-bench" "$here/vsock-bench.c"
    cp "$build/vsock-bench" "$files/"
    ird=$build/vsockbench-initramfs
    rm -rf "$ird"
    mkdir -p "$ird/bin" "$ird/lib/modules" "$ird/proc" "$ird/sys" "$ird/dev"
    cp /bin/busybox "$ird/bin/busybox"
    cp "$build/vsock-bench" "$ird/vsock-bench"
    cp "$cache"/virtio-modules/* "$ird/lib/modules/"
    cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
for m in $($B cat /lib/modules/load-order); do $B insmod /lib/modules/$m.ko 2>/dev/null; done
/vsock-bench serve 5000
$B poweroff -f
INIT
    chmod 755 "$ird/init"
    (cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$files/vsockbench.cpio.gz"
fi
cp "$here/inner.sh" "$files/inner.sh"
chmod +x "$files/inner.sh"

# 6. One nested VM run for everything.
stamp=$(date +%Y%m%d-%H%M%S)
raw=$build/raw-$stamp.txt
echo "run.sh: running inner.sh in the nested-KVM VM (ROUNDS=${ROUNDS:-7}; several minutes)" >&2
set +e
"$repo/tools/nested-kvm/run-in-vm.sh" --timeout "${E2E_TIMEOUT:-1500}" --mem 1536 \
    --env "ROUNDS=${ROUNDS:-7}" --env "EXITS=$exits" --env "QEMU_MACHINES=$qemu_machines" --env "CASES=$cases" \
    --env "LINUX_QEMU_MACHINES=${LINUX_QEMU_MACHINES-pc microvm}" \
    --env "LINUX_CMDLINE=${LINUX_CMDLINE:-console=ttyS0 panic=-1 rdinit=/init}" \
    --env "BLK_IOS=${BLK_IOS:-500}" --env "BLK_QD=${BLK_QD:-16}" --env "BLK_MIB=${BLK_MIB:-16}" \
    --env "BLK_IMG_MB=${BLK_IMG_MB:-64}" --env "VH_RR=${VH_RR:-2000}" --env "VH_THREADS=${VH_THREADS:-8}" \
    --env "VH_SEQ_MIB=${VH_SEQ_MIB:-32}" --env "VH_MB=${VH_MB:-64}" --env "VS_COUNT=${VS_COUNT:-2000}" \
    --env "VS_MIB=${VS_MIB:-64}" --env "BLK_QEMU_DRIVE=${BLK_QEMU_DRIVE-cache=writeback,aio=threads}" \
    --files "$files" -- ./inner.sh | tee "$raw"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ] || ! grep -q '^E2E-DONE' "$raw"; then
    echo "run.sh: the nested run failed (status $rc); raw output in $raw" >&2
    exit 1
fi
summarize "$raw" | tee "$build/summary-$stamp.md"
echo "run.sh: raw lines in $raw, summary in $build/summary-$stamp.md" >&2
