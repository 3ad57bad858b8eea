namespace Vmm.Tests.Kvm;

/// <summary>The process-kill consistency scenario (KvmCrashTests; not a power loss: the page cache survives a kill),
/// run with sh in the scenario directory. The image starts as blk-image's background (sector s: bytes (s &amp; 0xFF) ^
/// 0x5A). Three rounds: vmm runs virtio-test's blk-stream (generation after generation of sectors 1024..1087, a FLUSH
/// and "blk-stream: flushed G" after each), the script waits for 4, 8, 12 reported flushes plus a random 0-300 ms,
/// SIGKILLs vmm and runs `blk-image crash-check` with the last generation vmm reported flushed (the rule is in
/// guest-images/blk-image/blk-image.c). Round i's generations start at i*1000+1, so data a previous round left cannot
/// pass for this one's. Each next round starts at once on the image the killed vmm held writable: its locks must have
/// died with it. In round 1, while vmm writes, a second vmm asks for the same image and must be refused, naming the
/// first. A last clean run writes 3 generations and exits. Markers: <c>@@REFUSED status</c>, <c>@@KILLED i status
/// flushes</c>, <c>@@CHECK i status flushed</c> (then crash-check's output), <c>@@FINAL status</c>, <c>@@FINALCHECK
/// status</c>.</summary>
public static class CrashScenario
{
    public const int Rounds = 3;

    public const string Script = """
        chmod +x blk-image
        ./blk-image create crash.img 8192 >/dev/null || exit 2
        for i in 1 2 3; do
          : >stream$i.out
          ./vmm run --kernel virtio-test.elf --disk path=crash.img --cmdline "blk-stream stream-base=${i}000" \
            >>stream$i.out 2>stream$i.err &
          p=$!
          n=0; while [ "$(grep -c flushed stream$i.out)" -lt $((i * 4)) ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done
          if [ $i -eq 1 ]; then
            ./vmm run --kernel virtio-test.elf --disk path=crash.img --cmdline "blk-stream stream-gens=1" >second.out 2>second.err
            echo "@@REFUSED $? pid $p"; cat second.err
          fi
          sleep $(awk "BEGIN { srand($$ + $i); printf \"%.3f\", rand() * 0.3 }")
          kill -KILL $p; wait $p; s=$?
          echo "@@KILLED $i $s $(grep -c flushed stream$i.out)"
          # Complete lines only: the kill can cut the last one ("flushed 30" of "flushed 3023").
          f=$(head -n "$(wc -l <stream$i.out)" stream$i.out | grep -o 'flushed [0-9]*' | tail -n 1 | cut -d' ' -f2)
          r=$(./blk-image crash-check crash.img ${f:-0}); c=$?
          echo "@@CHECK $i $c ${f:-0}"; echo "$r"
          grep -v '^blk-stream: flushed' stream$i.out | tail -n 5; cat stream$i.err
        done
        ./vmm run --kernel virtio-test.elf --disk path=crash.img --cmdline 'blk-stream stream-base=9000 stream-gens=3' >final.out 2>final.err
        echo "@@FINAL $?"; grep -E '^(PASS|FAIL)' final.out; cat final.err
        r=$(./blk-image crash-check crash.img 9003); echo "@@FINALCHECK $?"; echo "$r"
        """;
}
