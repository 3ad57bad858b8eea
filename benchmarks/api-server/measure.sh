#!/bin/bash
# Re-runnable side-by-side measurement of vmm API server options (NativeAOT).
# usage: ./measure.sh [ROUNDS]   (default 21). Raw lines + summary -> results.txt
set -euo pipefail
cd "$(dirname "$0")"; mkdir -p build
ROUNDS=${1:-21}
[ -x build/out/baseline/baseline ] && [ -x build/out/own/own ] && [ -x build/out/kestrel/kestrel ] || ./build.sh
gcc -O2 -Wall -o build/bench bench.c
RAW=build/results.txt
{
echo "# $(date -Is) host=$(uname -r) cores=$(nproc) sdk=$(dotnet --version) rounds=$ROUNDS"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# sizes (bytes): $(stat -c '%n=%s' build/out/baseline/baseline build/out/own/own build/out/kestrel/kestrel | tr '\n' ' ')"
echo "# kestrel is built with Sdk.Web defaults (ServerGarbageCollection=true); kestrel-wks = same binary run with DOTNET_gcServer=0"
echo "# cols: round name startup_ms startup_cpu_ms ready_ms VmHWM_kB VmRSS_kB VmHWM_after_200_kB lat_med_us lat_min_us lat_p99_us exit"
} > $RAW
run1() { # name
  case $1 in
    baseline)    ./build/bench baseline build/out/baseline/baseline - ;;
    own)         ./build/bench own build/out/own/own /tmp/sb-own.sock ;;
    kestrel)     DOTNET_gcServer=1 ./build/bench kestrel build/out/kestrel/kestrel /tmp/sb-kestrel.sock ;;
    kestrel-wks) DOTNET_gcServer=0 ./build/bench kestrel-wks build/out/kestrel/kestrel /tmp/sb-kestrel.sock ;;
  esac
}
OPTS=(baseline own kestrel kestrel-wks)
for o in "${OPTS[@]}"; do run1 $o >/dev/null; done   # warm-up round (page cache), discarded
for r in $(seq 1 $ROUNDS); do
  for i in 0 1 2 3; do   # rotate order each round
    o=${OPTS[$(( (i + r) % 4 ))]}
    echo "$r $(run1 $o)" >> $RAW
  done
done
# curl cross-check: first response body, and 200 keep-alive pings in one curl invocation (time_total per transfer)
URLS=$(for i in $(seq 200); do printf -- '-o /dev/null http://localhost/api/v1/vmm.ping '; done)
for o in own kestrel; do
  s=/tmp/sb-curl-$o.sock; f=/tmp/sb-curl-$o.fifo; rm -f $s $f; mkfifo $f
  DOTNET_gcServer=0 build/out/$o/$o $s < $f > /tmp/sb-curl-$o.out & srv=$!
  exec 4> $f   # server's stdin; closing it = EOF = exit
  until curl -s -o /dev/null --unix-socket $s http://localhost/api/v1/vmm.ping; do sleep 0.01; done
  echo "# curl $o body: $(curl -s --unix-socket $s http://localhost/api/v1/vmm.ping)" >> $RAW
  for k in 1 2 3; do
    curl -s --unix-socket $s -w '%{time_total}\n' $URLS | sort -g | awk -v o=$o -v k=$k '{a[NR]=$1} END{printf "# curl keepalive %s run%d: median %.1f us per transfer (curl time_total) over %d transfers\n",o,k,a[int((NR+1)/2)]*1e6,NR}' >> $RAW
  done
  exec 4>&-; wait $srv; rm -f $f
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> $RAW
python3 - "$RAW" <<'PY' | tee -a $RAW
import sys,statistics as st,os
rows=[l.split() for l in open(sys.argv[1]) if l[0].isdigit()]
d={}
for r in rows: d.setdefault(r[1],[]).append(r)
size={'baseline':'build/out/baseline/baseline','own':'build/out/own/own','kestrel':'build/out/kestrel/kestrel','kestrel-wks':'build/out/kestrel/kestrel'}
def col(n,i): return [float(r[i]) for r in d[n]]
b_su=st.median(col('baseline',2)); b_cpu=st.median(col('baseline',3)); b_hwm=st.median(col('baseline',5))/1024
print("# SUMMARY (medians over %d rounds; startup = exec -> first 200 response, baseline: exec -> 'ready')"%len(d['baseline']))
print("%-12s %9s %24s %8s %18s %8s %9s %8s %9s %9s"%("option","size_MiB","startup_ms med(min-max)","d_ms","startup_cpu_ms(d)","HWM_MiB","d_MiB","RSS_MiB","HWM200MiB","req_us"))
for n in ['baseline','own','kestrel','kestrel-wks']:
    su=col(n,2); cpu=col(n,3); hwm=[x/1024 for x in col(n,5)]; rss=[x/1024 for x in col(n,6)]; h2=[x/1024 for x in col(n,7)]; lat=col(n,8)
    print("%-12s %9.2f %10.1f (%5.1f-%6.1f) %8.1f %8.1f (%+6.1f) %8.2f %+9.2f %8.2f %9s %9s"%(n,os.path.getsize(size[n])/2**20,st.median(su),min(su),max(su),st.median(su)-b_su,
      st.median(cpu),st.median(cpu)-b_cpu,st.median(hwm),st.median(hwm)-b_hwm,st.median(rss),
      "%.2f"%st.median(h2) if h2[0]>0 else "-", "%.1f"%st.median(lat) if lat[0]>0 else "-"))
PY
