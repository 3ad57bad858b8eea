namespace Vmm.Tests.Kvm;

/// <summary>The control-plane scenarios that run on KVM: the files and the script (run with sh in the scenario
/// directory, where ./vmm is the NativeAOT binary). The script prints markers the tests parse:
/// <c>@@ CMD</c> before each `vmm remote` command, then its stdout/stderr and <c>@@rc N</c>.</summary>
public static class ApiScenario
{
    /// <summary>A stock Linux with two vCPUs, a disk and COM1 in a file; watchdog_thresh=1 makes the soft-lockup detector
    /// fire after 2 s, so a pause of 3 s that the guest clock is not told about would show.</summary>
    public const string LifecycleConfig = """
        {
          "payload": {
            "kernel": "vmlinuz",
            "initramfs": "api-initramfs.cpio.gz",
            "cmdline": "console=ttyS0 panic=-1 rdinit=/init watchdog_thresh=1"
          },
          "cpus": { "boot_vcpus": 2, "max_vcpus": 2 },
          "memory": { "size": 268435456 },
          "disks": [ { "path": "api.img", "readonly": true } ],
          "serial": { "mode": "File", "file": "console.log" },
          "console": { "mode": "Off" }
        }
        """;

    /// <summary>The same VM as the "multiboot-test" scenario's flags (--kernel, --initrd, --cmdline).</summary>
    public const string MultibootConfig = """
        {
          "payload": {
            "kernel": "multiboot-test.elf",
            "initramfs": "module.txt",
            "cmdline": "expect-module=hello expect-mem-mb=128"
          },
          "serial": { "mode": "Tty" },
          "console": { "mode": "Off" }
        }
        """;

    public const string LifecycleScript = """
        S=api.sock
        ./vmm --api-socket $S --event-monitor path=events.json --log-level info 2>vmm.err &
        VPID=$!
        n=0; while [ ! -S $S ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
        r() { echo "@@ $*"; ./vmm remote --api-socket $S "$@" 2>&1; echo "@@rc $?"; }
        # Waits up to $2 seconds until console.log has $1 lines matching $3.
        wait_lines() { n=0; while [ "$(grep -c "$3" console.log 2>/dev/null)" -lt $1 ] && [ $n -lt $(($2 * 5)) ]; do sleep 0.2; n=$((n+1)); done; }
        last_tick() { grep -o 'vmm-api: tick [0-9]*' console.log | tail -n 1 | cut -d' ' -f3; }
        state() { ./vmm remote --api-socket $S info 2>/dev/null | grep -o '"state":"[A-Za-z]*"'; }
        r ping
        r info
        r create api-lifecycle.json
        r info
        r pause
        r boot
        wait_lines 1 150 'vmm-api: ticking'
        wait_lines 3 20 'vmm-api: tick '
        r info
        r pause
        sleep 0.5; t1=$(last_tick); sleep 3; t2=$(last_tick)
        echo "@@PAUSED $t1 $t2"
        r info
        r pause
        r resume
        sleep 3; t3=$(last_tick)
        echo "@@RESUMED $t3"
        # Requests racing each other and the state changes: every one is answered, the VM stays alive.
        pids=
        for i in 1 2 3 4 5 6 7 8; do
          ./vmm remote --api-socket $S pause >/dev/null 2>&1 & pids="$pids $!"
          ./vmm remote --api-socket $S resume >/dev/null 2>&1 & pids="$pids $!"
          ./vmm remote --api-socket $S info >/dev/null 2>&1 & pids="$pids $!"
        done
        wait $pids
        ./vmm remote --api-socket $S resume >/dev/null 2>&1
        echo "@@RACED $(state)"
        t4=$(last_tick); sleep 2; t5=$(last_tick)
        echo "@@AFTER-RACE $t4 $t5"
        # Hostile clients (guest-images/api-abuse): each gets an error answer; the VM goes on.
        chmod +x api-abuse; ./api-abuse $S >abuse.out 2>&1; echo "@@ABUSE-RC $?"
        echo "@@ABUSE"; cat abuse.out
        echo "@@AFTER-ABUSE $(state) $t5 $(sleep 1; last_tick)"
        r counters
        r power-button
        n=0; while [ "$(state)" != '"state":"Shutdown"' ] && [ $n -lt 600 ]; do sleep 0.2; n=$((n+1)); done
        r info
        r boot
        wait_lines 2 150 'Linux version'
        r info
        r delete
        r info
        r shutdown-vmm
        wait $VPID
        echo "@@VMM-EXIT $?"
        [ -e $S ] && echo "@@SOCKET LEFT" || echo "@@SOCKET GONE"
        echo "@@CONSOLE"; cat console.log
        echo "@@EVENTS"; cat events.json
        echo "@@VMM-STDERR"; cat vmm.err
        """;
}
