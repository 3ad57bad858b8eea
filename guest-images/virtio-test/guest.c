/*
 * virtio-test: PCI and modern virtio-pci test guest for the vmm.
 *
 * Multiboot command line (after the kernel's file name) selects subtests:
 *   pci            enumerate bus 0, BAR sizing, capabilities, ECAM vs 0xCF8
 *   blk            virtio-blk read/write/flush/get-id/write-zeroes/discard/past-end
 *   blk-ro         virtio-blk that must be read-only (VIRTIO_BLK_F_RO, writes fail)
 *   net            virtio-net ping/pong with build/net-responder (+ checksum offload)
 *   rng            virtio-rng
 *   console        virtio-console port 0 transmit (console-rx: also receive a line and echo it)
 *   all            pci + every virtio device type found (the default with no subtest)
 *   bench          virtio-blk benchmark on the first disk (writes it!); not part of "all"
 *   blk-stream     crash-consistency writer on the first disk (writes it until killed); not part of "all"
 * Modifiers: blk-id=STRING, mac=52:54:00:12:34:56, console-rx,
 *   bench-ios=N bench-qd=N bench-mib=N bench-case=NAME bench-poll (see test_bench),
 *   stream-base=N stream-gens=N (see test_blk_stream).
 * Prints one "PASS: <subtest> ..." / "FAIL: <subtest> ..." line per check, then
 * "PASS: all" and exits 0, or "FAIL: summary N failed" and exits 1 (isa-debug-exit).
 */
#include "console.h"
#include "x86.h"
#include "pci.h"
#include "virtio.h"
#include "idt.h"

#define MB_BOOT_MAGIC 0x2BADB002u
#define MAX_FUNCS 64

static char cmdline[512];
static struct pci_func funcs[MAX_FUNCS];
static int nfuncs;

/* ---- interrupts -------------------------------------------------------- */

static volatile uint32_t other_irqs, last_other, watchdog_ticks;

/* frame: [0..7] pushal, [8] vector, then (error code,) eip, cs, eflags. */
void isr_dispatch(uint32_t *frame)
{
    uint32_t vec = frame[8];
    if (vec < 32) {
        int has_err = vec == 8 || (vec >= 10 && vec <= 14) || vec == 17;
        print("FAIL: unexpected exception (vector %u eip=0x%x err=0x%x)\n", vec, frame[9 + has_err],
              has_err ? frame[9] : 0);
        exit_vm(1);
    }
    if (vec == 0xFF)
        return; /* LAPIC spurious: no EOI */
    if (vec == VIRTIO_WATCHDOG_VEC)
        watchdog_ticks++;
    else if (vec >= VIRTIO_VEC_BASE && vec < VIRTIO_VEC_BASE + VIRTIO_MAX_VECS)
        virtio_irq(vec);
    else
        other_irqs++, last_other = vec;
    lapic_eoi();
}

/* ---- command line -------------------------------------------------------- */

/* Is `word` one of the tokens after the first (the kernel's file name)? */
static int has_token(const char *word)
{
    const char *p = cmdline;
    while (*p && *p != ' ')
        p++;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *w = word;
        while (*w && *p == *w)
            p++, w++;
        if (!*w && (*p == ' ' || *p == 0))
            return 1;
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

/* Copies the value of key=VALUE (up to a space) into out; returns 1 if present. */
static int arg_value(const char *key, char *out, uint32_t max)
{
    const char *v = find_arg(cmdline, key);
    if (!v)
        return 0;
    uint32_t n = 0;
    while (v[n] && v[n] != ' ' && n + 1 < max)
        out[n] = v[n], n++;
    out[n] = 0;
    return 1;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static int parse_mac(const char *s, uint8_t mac[6])
{
    for (int i = 0; i < 6; i++) {
        int h = hexval(s[0]), l = hexval(s[1]);
        if (h < 0 || l < 0 || (i < 5 && s[2] != ':'))
            return 0;
        mac[i] = (uint8_t)(h << 4 | l);
        s += 3;
    }
    return 1;
}

static void put_mac(const uint8_t *m)
{
    for (int i = 0; i < 6; i++)
        print(i ? ":%02x" : "%02x", m[i]);
}

static void put_hex2(uint8_t v) { print("%02x", v); }

/* check() with the subtest name in front: "PASS: <sub> <what>". */
static void check2(int ok, const char *sub, const char *what, const char *detail_fmt, ...)
{
    print(ok ? "PASS: %s %s" : "FAIL: %s %s", sub, what);
    if (!ok) {
        va_list ap;
        va_start(ap, detail_fmt);
        print(" (");
        vprint(detail_fmt, ap);
        print(")");
        va_end(ap);
        failures++;
    }
    print("\n");
}

static const struct pci_func *find_virtio(uint32_t type)
{
    for (int i = 0; i < nfuncs; i++)
        if (funcs[i].vendor == VIRTIO_VENDOR && funcs[i].device == VIRTIO_PCI_DEVICE(type))
            return &funcs[i];
    return 0;
}

static int device_init(struct virtio_dev *d, uint32_t type, const char *name, uint64_t wanted)
{
    if (has_token("no-indirect"))
        wanted &= ~VIRTIO_F(VIRTIO_F_INDIRECT_DESC);
    if (has_token("no-event-idx"))
        wanted &= ~VIRTIO_F(VIRTIO_F_EVENT_IDX);
    const struct pci_func *f = find_virtio(type);
    check2(f != 0, name, "virtio device found", "no virtio device 1af4:%x on bus 0", VIRTIO_PCI_DEVICE(type));
    if (!f)
        return 0;
    print("%s: device at 00:%02x.%u\n", name, f->dev, f->fn);
    int ok = virtio_init(d, f, name, wanted);
    print("%s: ", name);
    virtio_print_features("offered", d->offered, type);
    if (ok) {
        print("%s: ", name);
        virtio_print_features("negotiated", d->negotiated, type);
    }
    check2(ok, name, "device init (features ok, msi-x on)", "%s: 0x%x", d->err, d->err_val);
    return ok;
}

static int queues_init(struct virtio_dev *d, const char *name, uint16_t n, uint16_t size)
{
    for (uint16_t q = 0; q < n; q++)
        if (!virtio_setup_queue(d, q, size)) {
            print("FAIL: %s queue %u setup (%s: 0x%x)\n", name, q, d->err, d->err_val);
            failures++;
            virtio_reset(d);
            return 0;
        }
    virtio_driver_ok(d);
    uint8_t st = virtio_status(d);
    check2((st & 0x4F) == 0x0F, name, "driver ok", "status after DRIVER_OK 0x%x", st);
    return (st & 0x4F) == 0x0F;
}

static void report_queue(const char *name, const struct virtq *q)
{
    print("%s: queue %u: %u notifies, %u suppressed, %u interrupt waits (%u saw the msi-x vector)\n", name, q->index,
          q->notifies, q->suppressed, q->irq_waits, q->irq_seen);
}

/* ---- pci ------------------------------------------------------------------- */

static const char *cap_name(uint8_t id)
{
    switch (id) {
    case 0x01: return "pm";
    case 0x05: return "msi";
    case 0x09: return "vendor";
    case 0x10: return "pcie";
    case 0x11: return "msi-x";
    case 0x12: return "sata";
    case 0x13: return "af";
    default: return "?";
    }
}

static void test_pci(void)
{
    int host_bridge = 0, bars_ok = 1, caps_ok = 1;
    for (int i = 0; i < nfuncs; i++) {
        const struct pci_func *f = &funcs[i];
        uint32_t cls = f->class_rev >> 8;
        print("pci 00:%02x.%u %04x:%04x class %06x rev %u hdr %u int pin %u line %u\n", f->dev, f->fn, f->vendor,
              f->device, cls, f->class_rev & 0xFF, f->header_type, f->int_pin, f->int_line);
        if (f->dev == 0 && f->fn == 0 && (cls >> 8) == 0x0600)
            host_bridge = 1;
        for (int b = 0; b < f->nbars; b++) {
            const struct pci_bar *bar = &f->bar[b];
            if (bar->size == 0)
                continue;
            print("  bar%u %s 0x%X size 0x%X%s\n", b, bar->is_io ? "io" : bar->is_64 ? "mem64" : "mem32", bar->base,
                  bar->size, bar->prefetch ? " prefetchable" : "");
            int pow2 = (bar->size & (bar->size - 1)) == 0, aligned = (bar->base & (bar->size - 1)) == 0;
            int same = pci_read32(f, PCI_BAR0 + 4u * (uint32_t)b) == f->bar_raw[b] &&
                       (!bar->is_64 || pci_read32(f, PCI_BAR0 + 4u * (uint32_t)b + 4) == f->bar_raw[b + 1]);
            int min = bar->is_io ? bar->size >= 4 : bar->size >= 16;
            if (!pow2 || !aligned || !same || !min) {
                print("  bar%u inconsistent: pow2 %u aligned %u restored %u min %u\n", b, pow2, aligned, same, min);
                bars_ok = 0;
            }
        }
        uint8_t c = pci_cap_next(f, 0);
        if (c) {
            print("  caps:");
            for (int n = 0; c && n < 48; n++, c = pci_cap_next(f, c)) {
                if (c < 0x40) {
                    caps_ok = 0;
                    break;
                }
                uint8_t id = pci_read8(f, c);
                print(" 0x%x %s", c, cap_name(id));
                if (id == PCI_CAP_VENDOR && f->vendor == VIRTIO_VENDOR)
                    print("(%u)", pci_read8(f, c + 3u));
            }
            print("\n");
        }
    }
    check(nfuncs > 0, "pci enumerate bus 0", "no functions");
    print("pci: %u functions\n", nfuncs);
    check(host_bridge, "pci host bridge at 00:00.0 (class 0x0600)", "class %x",
          nfuncs ? funcs[0].class_rev >> 8 : 0);
    check(bars_ok, "pci bar sizing consistent (power of 2, aligned, restored)", "see above");
    check(caps_ok, "pci capability lists well formed", "pointer below 0x40");

    uint64_t base = 0;
    uint8_t bs = 0, be = 0;
    if (!acpi_find_mcfg(&base, &bs, &be)) {
        print("pci: no ACPI MCFG table: ECAM cross-check skipped\n");
        return;
    }
    print("pci: ecam base 0x%X buses %u-%u\n", base, bs, be);
    if (base >> 32 || bs != 0) {
        check(0, "pci ecam reachable", "base above 4 GiB or bus 0 not covered");
        return;
    }
    uint32_t mismatches = 0;
    for (int i = 0; i < nfuncs; i++) {
        const struct pci_func *f = &funcs[i];
        uintptr_t a = (uintptr_t)base + ((uint32_t)f->dev << 15 | (uint32_t)f->fn << 12);
        for (uint32_t off = 0; off < 64; off += 4) {
            uint32_t e = mmio_read32(a + off), p = pci_read32(f, off);
            if (e != p) {
                if (mismatches++ < 8)
                    print("pci: ecam mismatch 00:%02x.%u offset 0x%x: ecam 0x%x cf8 0x%x\n", f->dev, f->fn, off, e, p);
            }
        }
    }
    check(mismatches == 0, "pci ecam matches 0xcf8 (first 64 bytes of every function)", "%u mismatches", mismatches);
    /* An absent function reads all-ones through ECAM too. */
    uint32_t absent = 0xFFFFFFFFu;
    for (uint32_t dev = 31; dev > 0 && absent == 0xFFFFFFFFu; dev--) {
        int present = 0;
        for (int i = 0; i < nfuncs; i++)
            present |= funcs[i].dev == dev;
        if (!present) {
            absent = mmio_read32((uintptr_t)base + (dev << 15));
            check(absent == 0xFFFFFFFFu, "pci ecam absent device reads all-ones", "00:%02x.0 read 0x%x", dev, absent);
            break;
        }
    }
}

/* ---- blk -------------------------------------------------------------------- */

enum { BLK_T_IN = 0, BLK_T_OUT = 1, BLK_T_FLUSH = 4, BLK_T_GET_ID = 8, BLK_T_DISCARD = 11, BLK_T_WRITE_ZEROES = 13 };
enum { BLK_F_SIZE_MAX = 1, BLK_F_SEG_MAX = 2, BLK_F_GEOMETRY = 4, BLK_F_RO = 5, BLK_F_BLK_SIZE = 6, BLK_F_FLUSH = 9,
       BLK_F_TOPOLOGY = 10, BLK_F_DISCARD = 13, BLK_F_WRITE_ZEROES = 14 };

struct blk_hdr { uint32_t type, reserved; uint64_t sector; };
struct blk_range { uint64_t sector; uint32_t num_sectors, flags; };

static struct blk_hdr blk_hdr;
static struct blk_range blk_range;
static volatile uint8_t blk_status;
static uint8_t blk_buf[16384] __attribute__((aligned(4096)));
static char blk_id[24];

/* One request: header, data buffers, status.  Returns the status byte, 0xFF on timeout. */
static uint32_t blk_request(struct virtio_dev *d, uint32_t type, uint64_t sector, const struct vq_buf *data, int n,
                            int indirect, int irq)
{
    struct vq_buf b[VQ_MAX_INDIRECT];
    blk_hdr.type = type;
    blk_hdr.reserved = 0;
    blk_hdr.sector = sector;
    blk_status = 0xEE;
    b[0] = (struct vq_buf){ &blk_hdr, sizeof(blk_hdr), 0 };
    for (int i = 0; i < n; i++)
        b[1 + i] = data[i];
    b[1 + n] = (struct vq_buf){ (const void *)&blk_status, 1, 1 };
    struct virtq *q = &d->vq[0];
    if (vq_add(q, b, n + 2, indirect && virtio_has(d, VIRTIO_F_INDIRECT_DESC), 0) < 0)
        return 0xFD;
    vq_kick(q);
    if (vq_wait(q, 5000, irq, 0, 0) < 0)
        return 0xFF;
    return blk_status;
}

static uint8_t in_pattern(uint32_t s, uint32_t j) { (void)j; return (uint8_t)((s & 0xFF) ^ 0x5A); }
static uint8_t out_pattern(uint32_t s, uint32_t j) { return (uint8_t)(((s * 3 + j) & 0xFF) ^ 0xA5); }

/* Number of bytes in blk_buf (sectors first.. of count) that differ from the pattern. */
static uint32_t verify(uint32_t first, uint32_t count, uint8_t (*pat)(uint32_t, uint32_t), uint32_t *bad_at)
{
    uint32_t bad = 0;
    for (uint32_t s = 0; s < count; s++)
        for (uint32_t j = 0; j < 512; j++)
            if (blk_buf[s * 512 + j] != pat(first + s, j)) {
                if (!bad)
                    *bad_at = s * 512 + j;
                bad++;
            }
    return bad;
}

static uint8_t zero_pattern(uint32_t s, uint32_t j) { (void)s; (void)j; return 0; }

static void test_blk(int ro)
{
    const char *n = ro ? "blk-ro" : "blk";
    struct virtio_dev dev, *d = &dev;
    uint64_t want = VIRTIO_F(VIRTIO_F_INDIRECT_DESC) | VIRTIO_F(VIRTIO_F_EVENT_IDX) | VIRTIO_F(BLK_F_SIZE_MAX) |
                    VIRTIO_F(BLK_F_SEG_MAX) | VIRTIO_F(BLK_F_GEOMETRY) | VIRTIO_F(BLK_F_RO) |
                    VIRTIO_F(BLK_F_BLK_SIZE) | VIRTIO_F(BLK_F_FLUSH) | VIRTIO_F(BLK_F_TOPOLOGY) |
                    VIRTIO_F(BLK_F_DISCARD) | VIRTIO_F(BLK_F_WRITE_ZEROES);
    dma_reset();
    if (!device_init(d, VIRTIO_ID_BLK, n, want) || !queues_init(d, n, 1, 16))
        return;
    uint64_t cap = virtio_cfg64(d, 0);
    print("%s: capacity %X sectors", n, cap);
    if (virtio_has(d, BLK_F_BLK_SIZE))
        print(", blk_size %u", virtio_cfg32(d, 20));
    if (virtio_has(d, BLK_F_SEG_MAX))
        print(", seg_max %u", virtio_cfg32(d, 12));
    if (virtio_has(d, BLK_F_DISCARD))
        print(", max_discard_sectors %u", virtio_cfg32(d, 36));
    if (virtio_has(d, BLK_F_WRITE_ZEROES))
        print(", max_write_zeroes_sectors %u", virtio_cfg32(d, 48));
    print("\n");
    check2(cap >= 320, n, "capacity >= 320 sectors", "%X", cap);
    if (cap < 320) {
        virtio_reset(d);
        return;
    }
    uint32_t bad_at = 0, st, bad;

    /* Read 0..7, waiting for the MSI-X interrupt. */
    struct vq_buf data[2] = { { blk_buf, 4096, 1 } };
    memset(blk_buf, 0, sizeof(blk_buf));
    struct virtq *q = &d->vq[0];
    uint32_t seen_before = q->irq_seen;
    st = blk_request(d, BLK_T_IN, 0, data, 1, 0, 1);
    bad = st == 0 ? verify(0, 8, in_pattern, &bad_at) : 4096;
    check2(st == 0 && !bad, n, "read sectors 0..7", "status 0x%x, %u bad bytes, first at %u", st, bad, bad_at);
    check2(q->irq_seen > seen_before, n, "msi-x interrupt for the read",
          "vector 0x%x count %u", VIRTIO_VEC_BASE + q->vector, virtio_irq_count[q->vector]);

    if (ro) {
        check(virtio_has(d, BLK_F_RO), "blk-ro VIRTIO_BLK_F_RO offered", "offered 0x%X", d->offered);
        for (uint32_t j = 0; j < 512; j++)
            blk_buf[j] = out_pattern(100, j);
        data[0] = (struct vq_buf){ blk_buf, 512, 0 };
        st = blk_request(d, BLK_T_OUT, 100, data, 1, 0, 0);
        check(st == 1, "blk-ro write to sector 100 fails with IOERR", "status 0x%x", st);
        memset(blk_buf, 0, 4096);
        data[0] = (struct vq_buf){ blk_buf, 4096, 1 };
        st = blk_request(d, BLK_T_IN, 100, data, 1, 1, 0);
        bad = st == 0 ? verify(100, 8, in_pattern, &bad_at) : 4096;
        check(st == 0 && !bad, "blk-ro read sectors 100..107 after the failed write (unchanged)",
              "status 0x%x, %u bad bytes", st, bad);
    } else {
        check(!virtio_has(d, BLK_F_RO), "blk device is writable (no VIRTIO_BLK_F_RO)", "RO offered");
        /* Write 100..131 as one request, data over two descriptors. */
        for (uint32_t s = 0; s < 32; s++)
            for (uint32_t j = 0; j < 512; j++)
                blk_buf[s * 512 + j] = out_pattern(100 + s, j);
        data[0] = (struct vq_buf){ blk_buf, 8192, 0 };
        data[1] = (struct vq_buf){ blk_buf + 8192, 8192, 0 };
        st = blk_request(d, BLK_T_OUT, 100, data, 2, 0, 0);
        check(st == 0, "blk write sectors 100..131 (one request, 2 data descriptors)", "status 0x%x", st);
        if (virtio_has(d, BLK_F_FLUSH)) {
            st = blk_request(d, BLK_T_FLUSH, 0, data, 0, 0, 0);
            check(st == 0, "blk flush", "status 0x%x", st);
        }
        memset(blk_buf, 0, sizeof(blk_buf));
        data[0] = (struct vq_buf){ blk_buf, 8192, 1 };
        data[1] = (struct vq_buf){ blk_buf + 8192, 8192, 1 };
        st = blk_request(d, BLK_T_IN, 100, data, 2, 1, 0);
        bad = st == 0 ? verify(100, 32, out_pattern, &bad_at) : 16384;
        check(st == 0 && !bad, virtio_has(d, VIRTIO_F_INDIRECT_DESC)
                                   ? "blk read back sectors 100..131 (indirect descriptors)"
                                   : "blk read back sectors 100..131",
              "status 0x%x, %u bad bytes, first at %u", st, bad, bad_at);
        if (virtio_has(d, BLK_F_WRITE_ZEROES)) {
            blk_range = (struct blk_range){ 200, 8, 0 };
            data[0] = (struct vq_buf){ &blk_range, sizeof(blk_range), 0 };
            st = blk_request(d, BLK_T_WRITE_ZEROES, 0, data, 1, 0, 0);
            check(st == 0, "blk write-zeroes sectors 200..207", "status 0x%x", st);
            memset(blk_buf, 0xCC, 4096);
            data[0] = (struct vq_buf){ blk_buf, 4096, 1 };
            st = blk_request(d, BLK_T_IN, 200, data, 1, 0, 0);
            bad = st == 0 ? verify(200, 8, zero_pattern, &bad_at) : 4096;
            check(st == 0 && !bad, "blk sectors 200..207 read back as zeros", "status 0x%x, %u bad bytes", st, bad);
        } else {
            print("blk: WRITE_ZEROES not offered: skipped\n");
        }
        if (virtio_has(d, BLK_F_DISCARD)) {
            blk_range = (struct blk_range){ 300, 8, 0 };
            data[0] = (struct vq_buf){ &blk_range, sizeof(blk_range), 0 };
            st = blk_request(d, BLK_T_DISCARD, 0, data, 1, 0, 0);
            check(st == 0, "blk discard sectors 300..307", "status 0x%x", st);
        } else {
            print("blk: DISCARD not offered: skipped\n");
        }
    }

    /* GET_ID: up to 20 bytes, NUL-terminated if shorter. */
    memset(blk_id, 0, sizeof(blk_id));
    data[0] = (struct vq_buf){ blk_id, 20, 1 };
    st = blk_request(d, BLK_T_GET_ID, 0, data, 1, 0, 0);
    print("%s: serial \"%s\"\n", n, blk_id);
    check2(st == 0, n, "get-id", "status 0x%x", st);
    char want_id[24];
    if (arg_value("blk-id=", want_id, sizeof(want_id))) {
        int same = st == 0 && memcmp(blk_id, want_id, 21) == 0;
        check2(same, n, "get-id matches blk-id=", "got \"%s\" want \"%s\"",
              blk_id, want_id);
    }

    /* A read at sector == capacity is past the end. */
    data[0] = (struct vq_buf){ blk_buf, 512, 1 };
    st = blk_request(d, BLK_T_IN, cap, data, 1, 0, 0);
    check2(st == 1, n, "read past the end fails with IOERR",
          "status 0x%x", st);
    report_queue(n, q);
    virtio_reset(d);
}

/* ---- bench ------------------------------------------------------------------ */

/*
 * virtio-blk benchmark on the first disk (token "bench"; it writes, so give it a scratch image).
 * Cases: 4 KiB random reads, then writes (sector from an LCG, 4 KiB aligned, anywhere in the disk) at
 * queue depth 1 and bench-qd; then 1 MiB sequential writes and reads over the first bench-mib MiB (one
 * request per MiB).  Completions: the queue's MSI-X interrupt (hlt while the used ring is empty, a
 * periodic 100 ms LAPIC timer bounds each hlt), or spinning on the used ring with bench-poll.  Timed
 * with RDTSC, calibrated against the ACPI PM timer (PM_TMR_BLK from the FACP).  One line per case:
 *   BENCH case=randread4k-qd1 qd=1 bs=4096 ios=N us=T iops=I errors=E
 *   BENCH case=seqwrite1m qd=1 bs=1048576 ios=N us=T mibps=M.M errors=E
 * bench-case=NAME runs only that case (NAME as printed; "none": device setup and calibration only).
 */
#define BENCH_QD_MAX 16
static uint8_t bench_buf[1u << 20] __attribute__((aligned(4096)));
static struct { struct blk_hdr h; volatile uint8_t st; } __attribute__((aligned(32))) bench_req[BENCH_QD_MAX];
static uint32_t tsc_khz;

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

/* n / d without libgcc (the remainder of the high word is < d, so divl cannot overflow). */
static uint64_t div64(uint64_t n, uint32_t d)
{
    uint32_t hi = (uint32_t)(n >> 32), qhi = hi / d, r = hi % d, qlo;
    __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"((uint32_t)n), "d"(r), "rm"(d));
    return (uint64_t)qhi << 32 | qlo;
}

static uint32_t arg_u32(const char *key, uint32_t def)
{
    const char *v = find_arg(cmdline, key);
    if (!v || *v < '0' || *v > '9')
        return def;
    uint32_t n = 0;
    while (*v >= '0' && *v <= '9')
        n = n * 10 + (uint32_t)(*v++ - '0');
    return n;
}

/* TSC kHz against the PM timer (3.579545 MHz) over >= 50 ms, one timer read per ~10^6 TSC cycles
 * (both ends: timer read, then RDTSC, so the exit's cost cancels).  0 without a usable timer. */
static uint32_t tsc_calibrate(void)
{
    uint32_t facp = acpi_find_table("FACP");
    if (!facp)
        return 0;
    uint32_t port = *(const uint32_t *)(facp + 76), ext = (*(const uint32_t *)(facp + 112) >> 8) & 1;
    uint32_t mask = ext ? 0xFFFFFFFFu : 0xFFFFFFu;
    print("bench: pm timer at port 0x%x (%u-bit, from the FACP)\n", port, ext ? 32 : 24);
    if (port == 0 || port > 0xFFFF)
        return 0;
    uint32_t p0 = inl((uint16_t)port) & mask, dp = 0;
    uint64_t t0 = rdtsc(), t1 = t0;
    for (int i = 0; i < 20000 && dp < 3579545u / 20; i++) {
        for (uint64_t s = rdtsc(); rdtsc() - s < 1000000;)
            cpu_relax();
        dp = ((inl((uint16_t)port) & mask) - p0) & mask;
        t1 = rdtsc();
    }
    if (dp < 3579545u / 20)
        return 0;
    return (uint32_t)div64(div64((t1 - t0) * 3579545u, dp), 1000);
}

/* `ios` requests of `len` bytes, at most qd in flight.  Returns the TSC cycles taken, 0 on a timeout
 * (60 s) or a bad used element; *done: requests completed, *errors: those with a nonzero status. */
static uint64_t bench_run(struct virtio_dev *d, uint32_t type, uint32_t ios, uint32_t qd, uint32_t len, int seq,
                          uint32_t blocks, int poll, uint32_t *done, uint32_t *errors)
{
    struct virtq *q = &d->vq[0];
    int ind = virtio_has(d, VIRTIO_F_INDIRECT_DESC), h = -1;
    uint32_t issued = 0, nfree = 0, lcg = 12345, fr[BENCH_QD_MAX];
    for (uint32_t i = qd; i > 0; i--)
        fr[nfree++] = i - 1;
    *done = *errors = 0;
    uint64_t t0 = rdtsc(), limit = (uint64_t)tsc_khz * 60000;
    while (*done < ios) {
        int added = 0;
        while (issued < ios && nfree) {
            uint32_t s = fr[--nfree];
            uint64_t sector = (uint64_t)issued * (len / 512);
            if (!seq) {
                lcg = lcg * 1103515245u + 12345u;
                sector = (uint64_t)((lcg >> 8) % blocks) * 8;
            }
            bench_req[s].h = (struct blk_hdr){ type, 0, sector };
            bench_req[s].st = 0xEE;
            struct vq_buf b[3] = { { &bench_req[s].h, sizeof(struct blk_hdr), 0 },
                                   { bench_buf + (s * len) % sizeof(bench_buf), len, type == BLK_T_IN },
                                   { (const void *)&bench_req[s].st, 1, 1 } };
            if (vq_add(q, b, 3, ind, (void *)(uintptr_t)(s + 1)) < 0) { /* ring full (no indirect) */
                fr[nfree++] = s;
                break;
            }
            issued++, added = 1;
        }
        if (added)
            vq_kick(q);
        void *ck;
        int got = 0;
        while ((h = vq_get_used(q, 0, &ck)) >= 0) {
            uint32_t s = (uint32_t)(uintptr_t)ck - 1;
            *errors += bench_req[s].st != 0;
            fr[nfree++] = s;
            (*done)++, got++;
        }
        if (h == -2 || rdtsc() - t0 > limit)
            return 0;
        if (got)
            continue;
        mb(); /* used_event (written by vq_get_used) before the last look at the used index */
        if (*(volatile uint16_t *)(q->used + 2) != q->last_used)
            continue;
        if (poll)
            cpu_relax();
        else
            halt_for_irq();
    }
    return rdtsc() - t0;
}

/* Does sel name this case: "<base>" (sequential) or "<base>-qd<N>" (random)? */
static int case_named(const char *sel, const char *base, uint32_t qd, int seq)
{
    while (*base && *sel == *base)
        sel++, base++;
    if (*base)
        return 0;
    if (seq)
        return *sel == 0;
    if (sel[0] != '-' || sel[1] != 'q' || sel[2] != 'd')
        return 0;
    uint32_t n = 0;
    for (sel += 3; *sel >= '0' && *sel <= '9'; sel++)
        n = n * 10 + (uint32_t)(*sel - '0');
    return *sel == 0 && n == qd;
}

static void test_bench(void)
{
    struct virtio_dev dev, *d = &dev;
    uint64_t want = VIRTIO_F(VIRTIO_F_INDIRECT_DESC) | VIRTIO_F(VIRTIO_F_EVENT_IDX) | VIRTIO_F(BLK_F_SIZE_MAX) |
                    VIRTIO_F(BLK_F_SEG_MAX) | VIRTIO_F(BLK_F_BLK_SIZE) | VIRTIO_F(BLK_F_FLUSH) |
                    VIRTIO_F(BLK_F_TOPOLOGY);
    dma_reset();
    if (!device_init(d, VIRTIO_ID_BLK, "bench", want) || !queues_init(d, "bench", 1, 32))
        return;
    uint64_t cap = virtio_cfg64(d, 0);
    uint32_t ios = arg_u32("bench-ios=", 2000), qd = arg_u32("bench-qd=", 16), mib = arg_u32("bench-mib=", 16);
    uint32_t blocks = cap >> 35 ? 0xFFFFFFFFu : (uint32_t)(cap >> 3), poll = has_token("bench-poll");
    qd = qd < 1 ? 1 : qd > BENCH_QD_MAX ? BENCH_QD_MAX : qd;
    char sel[32];
    int only = arg_value("bench-case=", sel, sizeof(sel));
    print("bench: capacity %X sectors, ios %u, qd 1 and %u, seq %u MiB, queue size %u, %s, %s\n", cap, ios, qd, mib,
          d->vq[0].size, poll ? "polling" : "msi-x interrupts", virtio_has(d, VIRTIO_F_INDIRECT_DESC) ? "indirect" : "direct");
    tsc_khz = tsc_calibrate();
    print("bench: tsc %u kHz\n", tsc_khz);
    check2(tsc_khz > 0, "bench", "tsc calibrated against the acpi pm timer", "no FACP / PM timer, or it does not run");
    check2(blocks >= 8 && cap >= (uint64_t)mib * 2048, "bench", "disk holds the sequential span", "%X sectors", cap);
    if (!tsc_khz || blocks < 8 || cap < (uint64_t)mib * 2048) {
        virtio_reset(d);
        return;
    }
    if (!poll) { /* a periodic timer bounds every hlt */
        lapic_write(LAPIC_LVT_TIMER, VIRTIO_WATCHDOG_VEC | 0x20000);
        lapic_write(LAPIC_TMR_INIT, 6250000); /* 100 ms at a 1 GHz APIC bus / 16 */
    }
    static const struct { const char *base; uint32_t type, deep, seq; } cs[] = {
        { "randread4k", BLK_T_IN, 0, 0 }, { "randread4k", BLK_T_IN, 1, 0 }, { "randwrite4k", BLK_T_OUT, 0, 0 },
        { "randwrite4k", BLK_T_OUT, 1, 0 }, { "seqwrite1m", BLK_T_OUT, 0, 1 }, { "seqread1m", BLK_T_IN, 0, 1 },
    };
    uint32_t errors = 0, failed = 0, ran = 0;
    for (uint32_t i = 0; i < sizeof(cs) / sizeof(cs[0]) && !failed; i++) {
        uint32_t cqd = cs[i].deep ? qd : 1, len = cs[i].seq ? 1u << 20 : 4096, n = cs[i].seq ? mib : ios, done, err;
        if ((cs[i].deep && qd == 1) || (only && !case_named(sel, cs[i].base, cqd, cs[i].seq)) || n == 0)
            continue;
        ran++;
        uint64_t t = bench_run(d, cs[i].type, n, cqd, len, cs[i].seq, blocks, poll, &done, &err);
        errors += err;
        if (!t) {
            print("FAIL: bench %s qd %u timed out or bad used element (%u of %u done)\n", cs[i].base, cqd, done, n);
            failures++, failed = 1;
            break;
        }
        uint32_t us = (uint32_t)div64(t * 1000, tsc_khz);
        us = us ? us : 1;
        print("BENCH case=%s", cs[i].base);
        if (!cs[i].seq)
            print("-qd%u", cqd);
        print(" qd=%u bs=%u ios=%u us=%u", cqd, len, n, us);
        if (cs[i].seq) {
            uint32_t t10 = (uint32_t)div64((uint64_t)n * 10000000u, us);
            print(" mibps=%u.%u", t10 / 10, t10 % 10);
        } else {
            print(" iops=%u", (uint32_t)div64((uint64_t)n * 1000000u, us));
        }
        print(" errors=%u\n", err);
    }
    lapic_write(LAPIC_TMR_INIT, 0);
    lapic_write(LAPIC_LVT_TIMER, VIRTIO_WATCHDOG_VEC);
    if (only)
        check2(ran > 0 || case_named(sel, "none", 0, 1), "bench", "bench-case= names a case", "\"%s\"", sel);
    check2(errors == 0, "bench", "every request completed with status 0", "%u failed", errors);
    report_queue("bench", &d->vq[0]);
    virtio_reset(d);
}

/* ---- net -------------------------------------------------------------------- */

enum { NET_F_CSUM = 0, NET_F_GUEST_CSUM = 1, NET_F_MAC = 5, NET_F_MRG_RXBUF = 15, NET_F_STATUS = 16 };
#define NET_HDR_LEN 12
#define NET_RX_BUFS 8
#define NET_RX_SIZE 2048
#define ETH_TEST 0x88B5

static uint8_t net_rx[NET_RX_BUFS][NET_RX_SIZE] __attribute__((aligned(64)));
static uint8_t net_tx_hdr[NET_HDR_LEN];
static uint8_t net_tx[256];
static uint8_t net_mac[6];

static void net_post_rx(struct virtq *q, int i)
{
    struct vq_buf b = { net_rx[i], NET_RX_SIZE, 1 };
    vq_add(q, &b, 1, 0, net_rx[i]);
}

static uint32_t net_frame(const char *payload_prefix)
{
    uint32_t n = 0;
    for (int i = 0; i < 6; i++)
        net_tx[n++] = 0xFF;
    for (int i = 0; i < 6; i++)
        net_tx[n++] = net_mac[i];
    net_tx[n++] = ETH_TEST >> 8;
    net_tx[n++] = ETH_TEST & 0xFF;
    for (const char *p = payload_prefix; *p; p++)
        net_tx[n++] = (uint8_t)*p;
    for (int i = 0; i < 16; i++)
        net_tx[n++] = (uint8_t)i;
    return n;
}

static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t len)
{
    for (uint32_t i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)p[i] << 8 | p[i + 1];
    if (len & 1)
        sum += (uint32_t)p[len - 1] << 8;
    return sum;
}
static uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)sum;
}

/* Broadcast IPv4/UDP 10.0.2.15:1234 -> 10.0.2.2:7; UDP checksum field = pseudo-header sum only. */
static uint32_t net_udp_frame(void)
{
    static const uint8_t src_ip[4] = { 10, 0, 2, 15 }, dst_ip[4] = { 10, 0, 2, 2 };
    static const char payload[] = "vmm-net-test csum ";
    uint32_t plen = sizeof(payload) - 1 + 16, udp_len = 8 + plen, ip_len = 20 + udp_len, n = 0;
    for (int i = 0; i < 6; i++)
        net_tx[n++] = 0xFF;
    for (int i = 0; i < 6; i++)
        net_tx[n++] = net_mac[i];
    net_tx[n++] = 0x08, net_tx[n++] = 0x00;
    uint8_t *ip = net_tx + n;
    memset(ip, 0, 28);
    ip[0] = 0x45;
    ip[2] = (uint8_t)(ip_len >> 8), ip[3] = (uint8_t)ip_len;
    ip[4] = 0x12, ip[5] = 0x34;
    ip[6] = 0x40; /* DF */
    ip[8] = 64, ip[9] = 17;
    memcpy(ip + 12, src_ip, 4);
    memcpy(ip + 16, dst_ip, 4);
    uint16_t ipsum = (uint16_t)~csum_fold(csum_add(0, ip, 20));
    ip[10] = (uint8_t)(ipsum >> 8), ip[11] = (uint8_t)ipsum;
    uint8_t *udp = ip + 20;
    udp[0] = 1234 >> 8, udp[1] = 1234 & 0xFF, udp[2] = 0, udp[3] = 7;
    udp[4] = (uint8_t)(udp_len >> 8), udp[5] = (uint8_t)udp_len;
    uint32_t ps = csum_add(0, src_ip, 4);
    ps = csum_add(ps, dst_ip, 4);
    ps += 17 + udp_len;
    uint16_t pseudo = csum_fold(ps);
    udp[6] = (uint8_t)(pseudo >> 8), udp[7] = (uint8_t)pseudo;
    n += 28;
    for (const char *p = payload; *p; p++)
        net_tx[n++] = (uint8_t)*p;
    for (int i = 0; i < 16; i++)
        net_tx[n++] = (uint8_t)i;
    return n;
}

static int net_send(struct virtio_dev *d, uint32_t len, int needs_csum)
{
    memset(net_tx_hdr, 0, sizeof(net_tx_hdr));
    if (needs_csum) {
        net_tx_hdr[0] = 1;                     /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
        net_tx_hdr[6] = 34, net_tx_hdr[7] = 0; /* csum_start: Ethernet 14 + IPv4 20 */
        net_tx_hdr[8] = 6, net_tx_hdr[9] = 0;  /* csum_offset: UDP checksum field */
    }
    struct vq_buf b[2] = { { net_tx_hdr, NET_HDR_LEN, 0 }, { net_tx, len, 0 } };
    struct virtq *q = &d->vq[1];
    if (vq_add(q, b, 2, virtio_has(d, VIRTIO_F_INDIRECT_DESC), 0) < 0)
        return 0;
    vq_kick(q);
    return vq_wait(q, 2000, 0, 0, 0) >= 0;
}

static uint32_t net_ignored;

/* Waits for an 0x88B5 frame to our MAC whose payload starts with `prefix` (+ the 16
 * bytes 0..15 if tail16). Every 2 s without it, resend_len > 0 resends net_tx.
 * Returns the received header's num_buffers + 1, or 0 on timeout. */
static uint32_t net_expect(struct virtio_dev *d, const char *prefix, int tail16, uint32_t ms, uint32_t resend_len,
                           uint32_t *resends, char *got, uint32_t got_max)
{
    struct virtq *rx = &d->vq[0];
    for (uint32_t waited = 0; waited < ms; waited += 2000) {
        for (;;) {
            uint32_t len = 0;
            void *buf = 0;
            if (vq_wait(rx, 2000, 1, &len, &buf) < 0)
                break;
            uint8_t *h = buf, *f = h + NET_HDR_LEN;
            uint32_t flen = len > NET_HDR_LEN ? len - NET_HDR_LEN : 0, plen = 0, match = 0;
            while (prefix[plen])
                plen++;
            if (flen >= 14 + plen && f[12] == (ETH_TEST >> 8) && f[13] == (ETH_TEST & 0xFF) &&
                memcmp(f, net_mac, 6) == 0 && memcmp(f + 14, prefix, plen) == 0) {
                match = 1;
                if (tail16)
                    for (uint32_t i = 0; i < 16; i++)
                        match &= flen >= 14 + plen + 16 && f[14 + plen + i] == i;
            }
            uint32_t nbuf = (uint32_t)h[10] | (uint32_t)h[11] << 8;
            if (match && got) {
                uint32_t k = 0;
                for (uint32_t i = 14; i < flen && k + 1 < got_max && f[i] >= 0x20 && f[i] < 0x7F; i++)
                    got[k++] = (char)f[i];
                got[k] = 0;
            }
            if (!match && net_ignored++ < 8) {
                print("net: ignored frame of %u bytes ethertype 0x", flen);
                put_hex2(f[12]);
                put_hex2(f[13]);
                print(" to ");
                put_mac(f);
                print("\n");
            }
            net_post_rx(rx, (int)((uint8_t(*)[NET_RX_SIZE])buf - net_rx));
            vq_kick(rx);
            if (match)
                return nbuf + 1;
        }
        if (resend_len && waited + 2000 < ms) {
            net_send(d, resend_len, 0);
            (*resends)++;
        }
    }
    return 0;
}

static void test_net(void)
{
    struct virtio_dev dev, *d = &dev;
    uint64_t want = VIRTIO_F(VIRTIO_F_INDIRECT_DESC) | VIRTIO_F(VIRTIO_F_EVENT_IDX) | VIRTIO_F(NET_F_MAC) |
                    VIRTIO_F(NET_F_MRG_RXBUF) | VIRTIO_F(NET_F_CSUM) | VIRTIO_F(NET_F_GUEST_CSUM) |
                    VIRTIO_F(NET_F_STATUS);
    dma_reset();
    if (!device_init(d, VIRTIO_ID_NET, "net", want))
        return;
    char macarg[24];
    uint8_t want_mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
    int have_arg = arg_value("mac=", macarg, sizeof(macarg));
    if (have_arg && !parse_mac(macarg, want_mac)) {
        check(0, "net mac= argument parses", "\"%s\"", macarg);
        have_arg = 0;
    }
    if (virtio_has(d, NET_F_MAC)) {
        for (int i = 0; i < 6; i++)
            net_mac[i] = virtio_cfg8(d, (uint32_t)i);
    } else {
        memcpy(net_mac, want_mac, 6);
    }
    print("net: mac ");
    put_mac(net_mac);
    print(virtio_has(d, NET_F_MAC) ? " (from config)\n" : " (no VIRTIO_NET_F_MAC: our own)\n");
    if (have_arg) {
        check(virtio_has(d, NET_F_MAC), "net VIRTIO_NET_F_MAC offered", "offered 0x%X", d->offered);
        check(memcmp(net_mac, want_mac, 6) == 0, "net config mac matches mac=", "see the mac line above");
    }
    if (!queues_init(d, "net", 2, 16))
        return;
    if (virtio_has(d, NET_F_STATUS))
        print("net: link status 0x%x\n", virtio_cfg16(d, 6));

    struct virtq *rx = &d->vq[0];
    for (int i = 0; i < NET_RX_BUFS; i++)
        net_post_rx(rx, i);
    vq_kick(rx);

    uint32_t len = net_frame("vmm-net-test ping "), resends = 0;
    int sent = net_send(d, len, 0);
    check(sent, "net transmit ping frame", "tx queue did not complete within 2 s");
    uint32_t nb = net_expect(d, "vmm-net-test pong ", 1, 30000, len, &resends, 0, 0);
    print("net: pong after %u resends\n", resends);
    check(nb != 0, "net pong received from the responder", "nothing within 30 s");
    if (nb && virtio_has(d, NET_F_MRG_RXBUF))
        check(nb == 2, "net rx num_buffers is 1 (MRG_RXBUF)", "num_buffers %u", nb - 1);
    check(rx->irq_seen > 0, "net msi-x interrupt for rx", "vector 0x%x count %u", VIRTIO_VEC_BASE + rx->vector,
          virtio_irq_count[rx->vector]);

    if (virtio_has(d, NET_F_CSUM)) {
        len = net_udp_frame();
        sent = net_send(d, len, 1);
        check(sent, "net transmit udp with NEEDS_CSUM", "tx queue did not complete within 2 s");
        char got[64];
        got[0] = 0;
        nb = net_expect(d, "vmm-net-test csum-", 0, 10000, 0, &resends, got, sizeof(got));
        print("net: checksum answer \"%s\"\n", got);
        check(nb && memcmp(got, "vmm-net-test csum-ok", 21) == 0, "net udp checksum offload verified by the responder",
              nb ? "responder said \"%s\"" : "no answer within 10 s", got);
    } else {
        print("net: CSUM not offered: checksum offload skipped\n");
    }
    report_queue("net", rx);
    report_queue("net", &d->vq[1]);
    virtio_reset(d);
}

/* ---- rng -------------------------------------------------------------------- */

static uint8_t rng_buf[2][64] __attribute__((aligned(64)));

/* Fills rng_buf[k]: the device may return fewer bytes than asked. */
static uint32_t rng_read(struct virtio_dev *d, int k, int indirect, int irq)
{
    uint32_t got = 0;
    for (int tries = 0; tries < 16 && got < 64; tries++) {
        uint32_t rest = 64 - got, len = 0;
        struct vq_buf b[2] = { { rng_buf[k] + got, rest / 2, 1 }, { rng_buf[k] + got + rest / 2, rest - rest / 2, 1 } };
        int two = indirect && rest >= 2;
        if (!two)
            b[0].len = rest;
        if (vq_add(&d->vq[0], b, two ? 2 : 1, two, 0) < 0)
            return got;
        vq_kick(&d->vq[0]);
        if (vq_wait(&d->vq[0], 5000, irq, &len, 0) < 0)
            return got;
        got += len <= rest ? len : rest;
    }
    return got;
}

static void test_rng(void)
{
    struct virtio_dev dev, *d = &dev;
    dma_reset();
    if (!device_init(d, VIRTIO_ID_RNG, "rng", VIRTIO_F(VIRTIO_F_INDIRECT_DESC) | VIRTIO_F(VIRTIO_F_EVENT_IDX)) ||
        !queues_init(d, "rng", 1, 8))
        return;
    memset(rng_buf, 0, sizeof(rng_buf));
    uint32_t a = rng_read(d, 0, 0, 1);
    uint32_t b = rng_read(d, 1, virtio_has(d, VIRTIO_F_INDIRECT_DESC), 0);
    print("rng: ");
    for (int i = 0; i < 16; i++)
        put_hex2(rng_buf[0][i]);
    print("... / ");
    for (int i = 0; i < 16; i++)
        put_hex2(rng_buf[1][i]);
    print("...\n");
    int nz = 0;
    for (int i = 0; i < 64; i++)
        nz |= rng_buf[0][i] | rng_buf[1][i];
    check(a == 64 && b == 64, "rng read 64 bytes twice", "got %u and %u bytes", a, b);
    check(nz != 0, "rng data not all zero", "all zero");
    check(memcmp(rng_buf[0], rng_buf[1], 64) != 0, "rng the two reads differ", "identical");
    check(d->vq[0].irq_seen > 0, "rng msi-x interrupt", "vector 0x%x count %u", VIRTIO_VEC_BASE + d->vq[0].vector,
          virtio_irq_count[d->vq[0].vector]);
    report_queue("rng", &d->vq[0]);
    virtio_reset(d);
}

/* ---- console ---------------------------------------------------------------- */

static char con_tx[160];
static char con_rx[128];
static char con_line[96];

static int console_send(struct virtio_dev *d, const char *s, int irq)
{
    uint32_t n = 0;
    while (s[n] && n < sizeof(con_tx))
        con_tx[n] = s[n], n++;
    struct vq_buf b = { con_tx, n, 0 };
    if (vq_add(&d->vq[1], &b, 1, 0, 0) < 0)
        return 0;
    vq_kick(&d->vq[1]);
    return vq_wait(&d->vq[1], 5000, irq, 0, 0) >= 0;
}

static void test_console(int rx)
{
    struct virtio_dev dev, *d = &dev;
    dma_reset();
    if (!device_init(d, VIRTIO_ID_CONSOLE, "console",
                     VIRTIO_F(VIRTIO_F_INDIRECT_DESC) | VIRTIO_F(VIRTIO_F_EVENT_IDX)) ||
        !queues_init(d, "console", 2, 8))
        return;
    int ok = console_send(d, "virtio-console: hello from the guest\n", 1);
    check(ok, "console transmit hello line", "transmitq did not complete");
    check(d->vq[1].irq_seen > 0, "console msi-x interrupt for transmit", "vector 0x%x count %u",
          VIRTIO_VEC_BASE + d->vq[1].vector, virtio_irq_count[d->vq[1].vector]);
    if (rx) {
        uint32_t n = 0, done = 0;
        struct deadline dl;
        for (int tries = 0; tries < 30 && !done; tries++) {
            struct vq_buf b = { con_rx, sizeof(con_rx), 1 };
            uint32_t len = 0;
            if (vq_add(&d->vq[0], &b, 1, 0, 0) < 0)
                break;
            vq_kick(&d->vq[0]);
            if (vq_wait(&d->vq[0], 20000, 1, &len, 0) < 0)
                break;
            for (uint32_t i = 0; i < len && i < sizeof(con_rx) && !done; i++) {
                if (con_rx[i] == '\n' || con_rx[i] == '\r')
                    done = n > 0;
                else if (n + 1 < sizeof(con_line))
                    con_line[n++] = con_rx[i];
            }
        }
        (void)dl;
        con_line[n] = 0;
        print("console: received \"%s\"\n", con_line);
        check(done, "console received a line from the host", "%u bytes, no newline within 20 s", n);
        if (done) {
            static char reply[160];
            const char *pre = "virtio-console: got ";
            uint32_t k = 0;
            for (const char *p = pre; *p; p++)
                reply[k++] = *p;
            for (uint32_t i = 0; i < n; i++)
                reply[k++] = con_line[i];
            reply[k++] = '\n';
            reply[k] = 0;
            check(console_send(d, reply, 0), "console echoed the line", "transmitq did not complete");
        }
    }
    report_queue("console", &d->vq[1]);
    virtio_reset(d);
}

/* ---- blk-stream: the writer of the crash-consistency test ------------------------------------
 * Writes generation after generation of sectors STREAM_FIRST..+STREAM_SECTORS-1, in ascending order, in requests of
 * 1..16 sectors (varying with the generation), one request at a time; after each generation a FLUSH, and once it
 * completed "blk-stream: flushed G" on COM1.  It never ends by itself before stream-gens=N generations (default
 * 900), so the host kills vmm in the middle of it.  Generations start at stream-base=B + 1, so a later run's
 * generations are all newer than an earlier run's.  Sector s of generation g holds stream_sector(s, g), which
 * blk-image crash-check recomputes: "VMMS", s, g (little-endian), then bytes ((g * 131 + s * 7 + j) & 0xFF) ^ 0x3C. */
#define STREAM_FIRST 1024u
#define STREAM_SECTORS 64u

static void stream_sector(uint8_t *p, uint32_t s, uint32_t g)
{
    for (uint32_t j = 0; j < 512; j++)
        p[j] = (uint8_t)(((g * 131 + s * 7 + j) & 0xFF) ^ 0x3C);
    memcpy(p, "VMMS", 4);
    memcpy(p + 4, &s, 4);
    memcpy(p + 8, &g, 4);
}

static void test_blk_stream(void)
{
    const char *n = "blk-stream";
    struct virtio_dev dev, *d = &dev;
    dma_reset();
    if (!device_init(d, VIRTIO_ID_BLK, n, VIRTIO_F(BLK_F_FLUSH) | VIRTIO_F(BLK_F_BLK_SIZE)) || !queues_init(d, n, 1, 16))
        return;
    uint64_t cap = virtio_cfg64(d, 0);
    uint32_t base = arg_u32("stream-base=", 0), gens = arg_u32("stream-gens=", 900);
    check2(virtio_has(d, BLK_F_FLUSH) && cap >= STREAM_FIRST + STREAM_SECTORS, n, "FLUSH offered, disk large enough",
           "features 0x%X, capacity %X", d->offered, cap);
    if (!virtio_has(d, BLK_F_FLUSH) || cap < STREAM_FIRST + STREAM_SECTORS) {
        virtio_reset(d);
        return;
    }
    print("%s: sectors %u..%u, generations %u..%u\n", n, STREAM_FIRST, STREAM_FIRST + STREAM_SECTORS - 1, base + 1,
          base + gens);
    struct vq_buf data[1];
    for (uint32_t g = base + 1; g <= base + gens; g++) {
        uint32_t chunk = 1 + g % 16;
        for (uint32_t s = 0; s < STREAM_SECTORS; s += chunk) {
            uint32_t count = STREAM_SECTORS - s < chunk ? STREAM_SECTORS - s : chunk;
            for (uint32_t k = 0; k < count; k++)
                stream_sector(blk_buf + k * 512, STREAM_FIRST + s + k, g);
            data[0] = (struct vq_buf){ blk_buf, count * 512, 0 };
            uint32_t st = blk_request(d, BLK_T_OUT, STREAM_FIRST + s, data, 1, 0, 0);
            if (st != 0) {
                check2(0, n, "write", "generation %u, sector %u: status 0x%x", g, STREAM_FIRST + s, st);
                virtio_reset(d);
                return;
            }
        }
        uint32_t st = blk_request(d, BLK_T_FLUSH, 0, data, 0, 0, 0);
        if (st != 0) {
            check2(0, n, "flush", "generation %u: status 0x%x", g, st);
            virtio_reset(d);
            return;
        }
        print("%s: flushed %u\n", n, g);
    }
    check2(1, n, "every generation written and flushed", "");
    virtio_reset(d);
}

/* ---- main ------------------------------------------------------------------- */

struct mb_info { uint32_t flags, mem_lower, mem_upper, boot_device, cmdline; };

void __attribute__((noreturn)) guest_main(uint32_t magic, const struct mb_info *mi)
{
    uart_init();
    print("virtio-test: start\n");
    if (magic == MB_BOOT_MAGIC && (mi->flags & 4) && mi->cmdline) {
        const char *c = (const char *)mi->cmdline;
        for (uint32_t i = 0; c[i] && i + 1 < sizeof(cmdline); i++)
            cmdline[i] = c[i];
    }
    print("cmdline: %s\n", cmdline);
    check(magic == MB_BOOT_MAGIC, "multiboot magic", "eax=0x%x", magic);
    idt_init();
    pic_mask_all();
    pit2_gate_on();
    uint32_t apic = virtio_lapic_init();
    print("lapic: id %u version 0x%x\n", apic, lapic_read(LAPIC_VER));
    nfuncs = pci_enumerate(funcs, MAX_FUNCS);

    int all = has_token("all");
    int t_blk = has_token("blk"), t_ro = has_token("blk-ro"), t_net = has_token("net"), t_rng = has_token("rng");
    int t_con = has_token("console") || has_token("console-rx"), t_pci = has_token("pci"), t_bench = has_token("bench");
    int t_stream = has_token("blk-stream");
    if (!(t_blk || t_ro || t_net || t_rng || t_con || t_pci || t_bench || t_stream))
        all = 1;
    if (all) {
        t_pci = 1;
        t_blk |= find_virtio(VIRTIO_ID_BLK) != 0 && !t_ro;
        t_net |= find_virtio(VIRTIO_ID_NET) != 0;
        t_rng |= find_virtio(VIRTIO_ID_RNG) != 0;
        t_con |= find_virtio(VIRTIO_ID_CONSOLE) != 0;
    }
    print("subtests:%s%s%s%s%s%s%s\n", t_pci ? " pci" : "", t_blk && !t_ro ? " blk" : "", t_ro ? " blk-ro" : "",
          t_net ? " net" : "", t_rng ? " rng" : "", t_con ? " console" : "", t_bench ? " bench" : "");
    if (t_pci)
        test_pci();
    if (t_blk || t_ro)
        test_blk(t_ro);
    if (t_net)
        test_net();
    if (t_rng)
        test_rng();
    if (t_con)
        test_console(has_token("console-rx"));
    if (t_bench)
        test_bench();
    if (t_stream)
        test_blk_stream();
    check(other_irqs == 0, "no unexpected interrupts", "%u, last vector 0x%x", other_irqs, last_other);
    if (failures == 0) {
        print("PASS: all\n");
        exit_vm(0);
    }
    print("FAIL: summary %u failed\n", failures);
    exit_vm(1);
}
