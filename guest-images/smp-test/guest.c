/*
 * smp-test: freestanding Multiboot v1 SMP/timer test guest for the vmm.
 *
 * Checks the BSP's local APIC, starts the APs with INIT-SIPI-SIPI (16-bit
 * trampoline at 0x70000), sends IPIs both ways, counts PIT (through the 8259)
 * and LAPIC timer interrupts, reads the CMOS RTC, and measures the ACPI PM
 * timer (found through RSDP -> RSDT/XSDT -> FACP) against the PIT.  Prints one
 * "PASS: <what>" or "FAIL: <what> (<detail>)" line per check, then exits via
 * isa-debug-exit (port 0xF4, outl): 0 when everything passed, 1 otherwise.
 *
 * Every wait is bounded.  Time comes from PIT channel 2 (one-shot, mode 0,
 * OUT2 read from port 0x61), never from calibrated busy loops: under emulation
 * each port access is expensive, so waits fail with a clear message instead
 * of spinning forever.
 */
#include "console.h"
#include "acpi.h"
#include "idt.h"

#define PIC1 0x20
#define PIC2 0xA0
#define PIT_CH0 0x40
#define PIT_CH2 0x42
#define PIT_CMD 0x43
#define PORT_B 0x61 /* bit 0: PIT ch2 gate, bit 1: speaker data, bit 5: PIT ch2 OUT */
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define MB_BOOT_MAGIC 0x2BADB002u

#define MAX_CPUS 16          /* BSP + 15 APs: keep in sync with MAX_APS in start.S */
#define TRAMP_BASE 0x70000u  /* page aligned, below 1 MiB, clear of 0x6000-0x9FFF */
#define SIPI_VECTOR (TRAMP_BASE >> 12)
#define IPI_VECTOR 0x40
#define TIMER_VECTOR 0x41
#define SPURIOUS_VECTOR 0xFF
#define PIT_COUNTS_PER_MS 1193u /* 1.193182 MHz */
#define PIT_10MS 11932u


/* xAPIC registers (MMIO at 0xFEE00000). */
#define LAPIC_BASE 0xFEE00000u
enum { LAPIC_ID = 0x20, LAPIC_VER = 0x30, LAPIC_TPR = 0x80, LAPIC_EOI = 0xB0, LAPIC_SVR = 0xF0,
       LAPIC_IRR = 0x200, LAPIC_ICR_LO = 0x300, LAPIC_ICR_HI = 0x310, LAPIC_LVT_TIMER = 0x320,
       LAPIC_LVT_LINT0 = 0x350, LAPIC_LVT_LINT1 = 0x360, LAPIC_TMR_INIT = 0x380,
       LAPIC_TMR_CUR = 0x390, LAPIC_TMR_DIV = 0x3E0 };
#define LVT_MASKED 0x10000u
#define LVT_PERIODIC 0x20000u
#define ICR_BUSY (1u << 12)
#define ICR_FIXED 0x4000u        /* fixed, physical, edge, assert */
#define ICR_INIT_ASSERT 0xC500u  /* INIT, level, assert */
#define ICR_INIT_DEASSERT 0x8500u
#define ICR_STARTUP 0x4600u

static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }
static inline void irq_on(void) { __asm__ volatile("sti" : : : "memory"); }
static inline void irq_off(void) { __asm__ volatile("cli" : : : "memory"); }
/* IF=0 on entry; a pending interrupt is taken after the hlt starts (sti shadow), then IF=0 again. */
static inline void halt_for_irq(void) { __asm__ volatile("sti; hlt; cli" : : : "memory"); }

static inline uint32_t lapic_read(uint32_t reg) { return *(volatile uint32_t *)(LAPIC_BASE + reg); }
static inline void lapic_write(uint32_t reg, uint32_t v) { *(volatile uint32_t *)(LAPIC_BASE + reg) = v; }

static inline uint32_t atomic_xadd(volatile uint32_t *p, uint32_t v)
{
    __asm__ volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}
static inline void atomic_or(volatile uint32_t *p, uint32_t v)
{
    __asm__ volatile("lock orl %1, %0" : "+m"(*p) : "r"(v) : "memory");
}

/* ---- PIT channel 2: one-shot deadlines --------------------------------- */

static uint32_t pit2_broken;   /* set when the start-up check saw OUT2 misbehave */
static uint32_t pit2_overruns; /* chunks that hit the poll cap before OUT2 went high */

/* Mode 0 (interrupt on terminal count): OUT2 goes low now, high after `count` PIT clocks. */
static void pit2_start(uint32_t count)
{
    outb(PIT_CMD, 0xB0); /* channel 2, lobyte/hibyte, mode 0, binary */
    outb(PIT_CH2, (uint8_t)count);
    outb(PIT_CH2, (uint8_t)(count >> 8));
}

static int pit2_out(void) { return inb(PORT_B) & 0x20; }

static uint32_t pit2_count(void)
{
    outb(PIT_CMD, 0x80); /* latch channel 2 */
    uint32_t lo = inb(PIT_CH2);
    return lo | (uint32_t)inb(PIT_CH2) << 8;
}

/* A deadline of any length, run as a chain of <= 65535-count one-shots.  The
 * poll cap only matters when the PIT is broken: it assumes a poll takes at
 * least ~40 ns (20 polls per 838 ns PIT clock); with pit2_broken it assumes
 * ~3 us so that a run on a VMM without a working PIT still ends. */
struct deadline { uint32_t left, polls, cap; };

static void dl_chunk(struct deadline *d)
{
    uint32_t c = d->left > 0xFFFF ? 0xFFFF : d->left;
    d->left -= c;
    d->polls = 0;
    d->cap = pit2_broken ? c / 4 + 16 : 20 * c + 1000;
    pit2_start(c);
}

static void dl_start(struct deadline *d, uint32_t counts)
{
    d->left = counts < 2 ? 2 : counts;
    dl_chunk(d);
}

static int dl_expired(struct deadline *d)
{
    if (!pit2_out() && ++d->polls < d->cap)
        return 0;
    if (d->polls >= d->cap && !pit2_broken)
        pit2_overruns++;
    if (d->left == 0)
        return 1;
    dl_chunk(d);
    return 0;
}

static void delay_counts(uint32_t counts)
{
    struct deadline d;
    dl_start(&d, counts);
    while (!dl_expired(&d))
        cpu_relax();
}

static void check_pit2(void)
{
    outb(PORT_B, (uint8_t)((inb(PORT_B) & ~0x03) | 0x01)); /* gate 2 on, speaker off */
    pit2_start(2 * PIT_COUNTS_PER_MS);
    int low_first = !pit2_out();
    uint32_t polls = 0;
    while (polls < 1000000 && !pit2_out())
        polls++;
    int ok = low_first && polls < 1000000;
    check(ok, "pit channel 2 one-shot (port 0x61 bit 5)", "%s",
          low_first ? "out2 never went high" : "out2 high right after start");
    pit2_broken = !ok;
}

/* ---- interrupts ------------------------------------------------------- */

static volatile uint32_t bsp_apic_id;
static volatile uint32_t ipi_count[MAX_CPUS + 1]; /* by APIC ID; [MAX_CPUS]: IDs out of range */
static volatile uint32_t reply_mask;              /* bit per AP APIC ID that sent an IPI back */
static volatile uint32_t pit_ticks, lapic_ticks, spurious_count, other_irqs, last_other;
static volatile uint32_t icr_sends, icr_stuck;

static uint32_t apic_id(void) { return lapic_read(LAPIC_ID) >> 24; }
static uint32_t id_slot(uint32_t id) { return id < MAX_CPUS ? id : MAX_CPUS; }

static void count_other(uint32_t vec)
{
    atomic_xadd(&other_irqs, 1);
    last_other = vec | (apic_id() << 8);
}

/* frame: [0..7] pushal, [8] vector, then (error code,) eip, cs, eflags. */
void isr_dispatch(uint32_t *frame)
{
    uint32_t vec = frame[8];
    if (vec < 32) {
        int has_err = vec == 8 || (vec >= 10 && vec <= 14) || vec == 17;
        print("FAIL: unexpected exception (vector %u eip=0x%x err=0x%x apic id %u)\n", vec,
              frame[9 + has_err], has_err ? frame[9] : 0, apic_id());
        exit_vm(1);
    }
    if (vec >= 0x20 && vec < 0x30) { /* 8259, remapped to 0x20/0x28 */
        uint32_t irq = vec - 0x20;
        if (irq == 0 && apic_id() == bsp_apic_id)
            pit_ticks++;
        else
            count_other(vec);
        if (irq == 7)
            return; /* possibly spurious: no EOI */
        if (irq >= 8)
            outb(PIC2, 0x20);
        outb(PIC1, 0x20);
        return;
    }
    if (vec == SPURIOUS_VECTOR) { /* LAPIC spurious: no EOI */
        atomic_xadd(&spurious_count, 1);
        return;
    }
    if (vec == IPI_VECTOR)
        atomic_xadd(&ipi_count[id_slot(apic_id())], 1);
    else if (vec == TIMER_VECTOR && apic_id() == bsp_apic_id)
        lapic_ticks++;
    else
        count_other(vec);
    lapic_write(LAPIC_EOI, 0);
}

/* 8259 remapped to 0x20/0x28, everything masked (IRQ0 is unmasked only for its test). */
static void pic_init(void)
{
    outb(PIC1, 0x11); outb(PIC2, 0x11);         /* ICW1: edge, cascade, ICW4 needed */
    outb(PIC1 + 1, 0x20); outb(PIC2 + 1, 0x28); /* ICW2: vector bases */
    outb(PIC1 + 1, 0x04); outb(PIC2 + 1, 0x02); /* ICW3: slave on IRQ2 */
    outb(PIC1 + 1, 0x01); outb(PIC2 + 1, 0x01); /* ICW4: 8086 mode */
    outb(PIC1 + 1, 0xFF); outb(PIC2 + 1, 0xFF); /* OCW1: mask all */
}

/* Send an IPI from this CPU and wait (bounded) for the delivery-status bit to clear. */
static void icr_send(uint32_t dest_apic_id, uint32_t lo)
{
    lapic_write(LAPIC_ICR_HI, dest_apic_id << 24);
    lapic_write(LAPIC_ICR_LO, lo);
    atomic_xadd(&icr_sends, 1);
    for (int i = 0; i < 10000; i++)
        if (!(lapic_read(LAPIC_ICR_LO) & ICR_BUSY))
            return;
    atomic_xadd(&icr_stuck, 1);
}

/* ---- multiboot -------------------------------------------------------- */

struct mb_info { uint32_t flags, mem_lower, mem_upper, boot_device, cmdline; };

static char cmdline[256];
static uint32_t expected_cpus = 2;

/* Copies the command line first: the info structure may sit in memory we reuse. */
static void read_multiboot(uint32_t magic, const struct mb_info *mi)
{
    check(magic == MB_BOOT_MAGIC, "multiboot magic", "eax=0x%x", magic);
    if (magic == MB_BOOT_MAGIC && (mi->flags & (1u << 2)) && mi->cmdline) {
        const char *s = (const char *)mi->cmdline;
        uint32_t n = 0;
        for (; n < sizeof(cmdline) - 1 && s[n]; n++)
            cmdline[n] = s[n];
        cmdline[n] = 0;
    }
    print("cmdline: %s\n", cmdline);
    const char *v = find_arg(cmdline, "cpus=");
    if (v) {
        uint32_t n = 0, digits = 0;
        for (; *v >= '0' && *v <= '9' && digits < 6; v++, digits++)
            n = n * 10 + (uint32_t)(*v - '0');
        int ok = digits > 0 && n >= 1 && n <= MAX_CPUS;
        check(ok, "cpus= argument in range 1..16", "cpus=%u", n);
        if (ok)
            expected_cpus = n;
    }
    print("expected cpus: %u\n", expected_cpus);
}

/* ---- BSP local APIC ---------------------------------------------------- */

static void check_bsp_lapic(void)
{
    uint32_t a = 1, b, c = 0, d, lo, hi;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0x1B));
    if (!(lo & 0x800)) /* globally disabled: enable (base unchanged) */
        __asm__ volatile("wrmsr" : : "a"(lo | 0x800), "d"(hi), "c"(0x1B));
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR); /* software enable */
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, 0x700);             /* ExtINT, edge, unmasked: 8259 virtual wire */
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
    uint32_t svr = lapic_read(LAPIC_SVR), lint0 = lapic_read(LAPIC_LVT_LINT0), id = apic_id();
    print("bsp: apic base msr 0x%x, apic version 0x%x\n", lo, lapic_read(LAPIC_VER));
    check((d & (1u << 9)) && (lo & 0xFFFFF000u) == LAPIC_BASE && (lo & 0x100) && (svr & 0x1FF) == 0x1FF &&
          (lint0 & 0x1F700) == 0x700,
          "bsp local apic enabled", "cpuid.1:edx=0x%x apic_base=0x%x svr=0x%x lint0=0x%x", d, lo, svr, lint0);
    check(id == 0, "bsp apic id 0", "apic id %u", id);
    bsp_apic_id = id;
}

/* ---- APs -------------------------------------------------------------- */

extern const uint8_t ap_tramp_start[], ap_tramp_end[];
extern volatile uint32_t ap_next_slot; /* start.S: APs that reached ap_entry32 */
static volatile uint32_t ap_online;
static volatile uint32_t ap_apic_id[MAX_CPUS];
static uint32_t ap_ids[MAX_CPUS], ap_count; /* checked-in APs' APIC IDs, sorted */

/* An AP after the trampoline: own stack, IF=0.  Enables its LAPIC, checks in,
 * then idles in "sti; hlt" and answers every IPI_VECTOR with one to the BSP. */
void __attribute__((noreturn)) ap_main(uint32_t slot)
{
    idt_load();
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED | 0x700); /* only the BSP takes 8259 interrupts */
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
    uint32_t id = apic_id(), idx = id_slot(id), replied = 0;
    ap_apic_id[slot] = id;
    atomic_xadd(&ap_online, 1); /* locked: also orders the store above */
    for (;;) {
        irq_off();
        uint32_t got = ipi_count[idx];
        if (got != replied) {
            replied = got;
            atomic_or(&reply_mask, 1u << idx);
            icr_send(bsp_apic_id, ICR_FIXED | IPI_VECTOR);
        }
        __asm__ volatile("sti; hlt" : : : "memory");
    }
}

static void start_aps(void)
{
    uint32_t want = expected_cpus - 1;
    volatile uint8_t *dst = (volatile uint8_t *)TRAMP_BASE;
    for (const uint8_t *s = ap_tramp_start; s < ap_tramp_end; s++)
        *dst++ = *s;

    for (uint32_t id = 1; id <= want; id++) {
        icr_send(id, ICR_INIT_ASSERT);
        icr_send(id, ICR_INIT_DEASSERT);
        delay_counts(PIT_10MS);
        icr_send(id, ICR_STARTUP | SIPI_VECTOR);
        delay_counts(239); /* 200 us */
        icr_send(id, ICR_STARTUP | SIPI_VECTOR);
    }

    struct deadline d;
    dl_start(&d, 1000 * PIT_COUNTS_PER_MS);
    while (ap_online < want && !dl_expired(&d))
        cpu_relax();
    uint32_t n = ap_online;
    check(n == want, "aps checked in", "%u of %u within 1 s, %u entered the trampoline", n, want,
          ap_next_slot);

    ap_count = n < MAX_CPUS - 1 ? n : MAX_CPUS - 1;
    for (uint32_t i = 0; i < ap_count; i++) { /* insertion sort by APIC ID */
        uint32_t v = ap_apic_id[i], j = i;
        for (; j > 0 && ap_ids[j - 1] > v; j--)
            ap_ids[j] = ap_ids[j - 1];
        ap_ids[j] = v;
    }
    print("cpu 0: apic id %u\n", bsp_apic_id);
    int ids_ok = ap_count == want;
    for (uint32_t i = 0; i < ap_count; i++) {
        print("cpu %u: apic id %u\n", i + 1, ap_ids[i]);
        ids_ok &= ap_ids[i] == i + 1;
    }
    check(ids_ok, "ap apic ids are 1..N-1", "%u aps online, expected ids 1..%u", ap_count, want);
}

/* ---- IPIs ------------------------------------------------------------- */

static void check_ipis(void)
{
    uint32_t want = expected_cpus - 1, bsp = id_slot(bsp_apic_id);
    uint32_t bsp_before = ipi_count[bsp], want_mask = ((1u << expected_cpus) - 1) & ~1u, ap_ok = 0;
    irq_on();
    for (uint32_t i = 0; i < ap_count; i++) {
        uint32_t a = id_slot(ap_ids[i]), ap_before = ipi_count[a], bsp_now = ipi_count[bsp];
        icr_send(ap_ids[i], ICR_FIXED | IPI_VECTOR);
        struct deadline d;
        dl_start(&d, 100 * PIT_COUNTS_PER_MS);
        while (!(ipi_count[a] != ap_before && ipi_count[bsp] != bsp_now) && !dl_expired(&d))
            cpu_relax();
    }
    irq_off();
    for (uint32_t i = 0; i < ap_count; i++)
        ap_ok += ipi_count[id_slot(ap_ids[i])] == 1;
    uint32_t back = ipi_count[bsp] - bsp_before;
    check(ap_count == want && ap_ok == want, "ipi bsp -> each ap (vector 0x40)",
          "%u of %u aps got exactly one, %u online", ap_ok, want, ap_count);
    check(ap_count == want && back == want && reply_mask == want_mask, "ipi each ap -> bsp (vector 0x40)",
          "bsp got %u of %u, reply mask 0x%x want 0x%x", back, want, reply_mask, want_mask);
}

/* ---- timers ----------------------------------------------------------- */

/* PIT channel 0, mode 2 at ~1 kHz, through the 8259 (IRQ0 -> vector 0x20) and
 * the BSP's LINT0 (ExtINT).  With IF=0 the guest polls the PIC's IRR and only
 * halts ("sti; hlt") when IRQ0 is pending: a pending, unmasked IRQ must wake it. */
static void check_pit_irq0(void)
{
    pit_ticks = 0;
    outb(PIT_CMD, 0x34); /* channel 0, lobyte/hibyte, mode 2, binary */
    outb(PIT_CH0, (uint8_t)PIT_COUNTS_PER_MS);
    outb(PIT_CH0, (uint8_t)(PIT_COUNTS_PER_MS >> 8));
    outb(PIC1, 0x0A);     /* OCW3: reads of port 0x20 return IRR from now on */
    outb(PIC1 + 1, 0xFE); /* unmask IRQ0 only */
    uint32_t halts = 0;
    struct deadline d;
    dl_start(&d, 200 * PIT_COUNTS_PER_MS);
    while (pit_ticks < 5 && !dl_expired(&d))
        if (inb(PIC1) & 0x01) {
            halt_for_irq();
            halts++;
        }
    outb(PIC1 + 1, 0xFF);
    outb(PIT_CMD, 0x30); /* channel 0 back to mode 0: no more periodic edges */
    outb(PIT_CH0, 0);
    outb(PIT_CH0, 0);
    check(pit_ticks >= 5, "pit irq0 via 8259 (vector 0x20)", "%u ticks in 200 ms, irr showed irq0 %u times",
          pit_ticks, halts);
}

/* BSP LAPIC timer, periodic, divide by 16, initial count 62500 (1 ms at the
 * 1 GHz APIC bus of KVM and QEMU; only arrival is checked, not the rate). */
static void check_lapic_timer(void)
{
    lapic_ticks = 0;
    lapic_write(LAPIC_TMR_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR);
    lapic_write(LAPIC_TMR_INIT, 62500);
    uint32_t cur = lapic_read(LAPIC_TMR_CUR), halts = 0;
    struct deadline d;
    dl_start(&d, 200 * PIT_COUNTS_PER_MS);
    while (lapic_ticks < 5 && !dl_expired(&d))
        if (lapic_read(LAPIC_IRR + 0x10 * (TIMER_VECTOR / 32)) & (1u << (TIMER_VECTOR % 32))) {
            halt_for_irq();
            halts++;
        }
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
    lapic_write(LAPIC_TMR_INIT, 0);
    check(lapic_ticks >= 5, "lapic timer periodic (vector 0x41)",
          "%u ticks in 200 ms, irr showed it %u times, current count after start %u", lapic_ticks, halts, cur);
}

/* ---- CMOS RTC --------------------------------------------------------- */

static uint8_t cmos_read(uint8_t reg)
{
    outb(CMOS_INDEX, reg);
    return inb(CMOS_DATA);
}

static uint32_t from_bcd(uint8_t v) { return (uint32_t)(v >> 4) * 10 + (v & 0x0F); }

static void check_rtc(void)
{
    static const uint8_t regs[7] = { 0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32 }; /* s m h D M Y century */
    uint8_t v[7] = { 0 };
    int stable = 0, uip_stuck = 0;
    for (int attempt = 0; attempt < 5 && !stable; attempt++) {
        struct deadline d;
        dl_start(&d, 10 * PIT_COUNTS_PER_MS);
        while ((cmos_read(0x0A) & 0x80) && !(uip_stuck = dl_expired(&d)))
            ;
        stable = 1;
        for (int i = 0; i < 7; i++)
            v[i] = cmos_read(regs[i]);
        for (int i = 0; i < 7; i++)
            stable &= cmos_read(regs[i]) == v[i];
    }
    uint8_t rb = cmos_read(0x0B), rd = cmos_read(0x0D);
    int bcd = !(rb & 0x04), h24 = (rb & 0x02) != 0;
    uint32_t f[7];
    for (int i = 0; i < 7; i++) {
        uint8_t x = i == 2 ? (uint8_t)(v[i] & 0x7F) : v[i]; /* hour bit 7 = PM in 12-hour mode */
        f[i] = bcd ? from_bcd(x) : x;
    }
    if (!h24) /* 12-hour mode: 12 AM = 0, 12 PM = 12 */
        f[2] = f[2] % 12 + ((v[2] & 0x80) ? 12 : 0);
    uint32_t century = f[6] >= 19 && f[6] <= 21 ? f[6] : 20;
    uint32_t year = century * 100 + f[5];
    print("rtc: %04u-%02u-%02u %02u:%02u:%02u\n", year, f[4], f[3], f[2], f[1], f[0]);
    print("rtc: register b=0x%x (%s, %s), d=0x%x\n", rb, bcd ? "bcd" : "binary", h24 ? "24-hour" : "12-hour", rd);
    check(stable && !uip_stuck, "rtc read consistent", "stable=%u uip_stuck=%u", stable, uip_stuck);
    check(rd & 0x80, "rtc register d valid (bit 7)", "d=0x%x", rd);
    check(f[0] < 60 && f[1] < 60 && f[2] < 24 && f[3] >= 1 && f[3] <= 31 && f[4] >= 1 && f[4] <= 12 && f[5] < 100,
          "rtc fields in range", "raw s=0x%x m=0x%x h=0x%x D=0x%x M=0x%x Y=0x%x", v[0], v[1], v[2], v[3], v[4], v[5]);
    check(year >= 2024 && year < 2100, "rtc year >= 2024", "year %u", year);
}

/* ---- ACPI PM timer ---------------------------------------------------- */

/* a * b / c for a quotient below 2^32 (64-bit intermediate, no libgcc). */
static uint32_t muldiv(uint32_t a, uint32_t b, uint32_t c)
{
    uint32_t q, hi;
    __asm__("mull %3\n\tdivl %4" : "=a"(q), "=&d"(hi) : "0"(a), "rm"(b), "rm"(c) : "cc");
    return q;
}

#define PM_HZ_MIN 3221591u /* 3.579545 MHz - 10% */
#define PM_HZ_MAX 3937499u /* 3.579545 MHz + 10% */

static void check_acpi_pm_timer(void)
{
    const uint8_t *rsdp = 0;
    uint32_t bad_sum = 0;
    for (uint32_t a = 0xE0000; a < 0x100000 && !rsdp; a += 16) {
        const uint8_t *p = (const uint8_t *)a;
        if (acpi_rd32(p) != 0x20445352u || !acpi_sig_is(p, "RSD PTR ")) /* "RSD " first: one compare per slot */
            continue;
        if (acpi_sum8(p, 20) == 0)
            rsdp = p;
        else
            bad_sum = a;
    }
    check(rsdp != 0, "acpi rsdp found in 0xe0000-0xfffff", bad_sum ? "bad checksum at 0x%x" : "no signature",
          bad_sum);
    if (!rsdp)
        return;
    uint32_t rev = rsdp[15], rsdt = acpi_rd32(rsdp + 16), xsdt = 0;
    print("acpi: rsdp at 0x%x rev %u oem \"%c%c%c%c%c%c\" rsdt=0x%x", (uint32_t)rsdp, rev, rsdp[9], rsdp[10],
          rsdp[11], rsdp[12], rsdp[13], rsdp[14], rsdt);
    if (rev >= 2) {
        print(" xsdt=0x%X", *(const uint64_t *)(rsdp + 24));
        check(acpi_sum8(rsdp, 36) == 0, "acpi rsdp extended checksum", "rev %u", rev);
        if (acpi_rd32(rsdp + 28) == 0)
            xsdt = acpi_rd32(rsdp + 24);
    }
    print("\n");

    uint32_t facp_r = 0, facp_x = 0;
    if (rsdt) {
        int ok = acpi_table_ok(rsdt, "RSDT");
        if (ok)
            facp_r = acpi_sdt_find(rsdt, 4, "FACP");
        check(ok && facp_r, "acpi rsdt lists facp", ok ? "no FACP entry" : "bad RSDT at 0x%x", rsdt);
    }
    if (xsdt) {
        int ok = acpi_table_ok(xsdt, "XSDT");
        if (ok)
            facp_x = acpi_sdt_find(xsdt, 8, "FACP");
        check(ok && facp_x, "acpi xsdt lists facp", ok ? "no FACP entry" : "bad XSDT at 0x%x", xsdt);
    }
    uint32_t facp = facp_x ? facp_x : facp_r;
    int facp_ok = facp && acpi_table_ok(facp, "FACP") && acpi_rd32((const uint8_t *)facp + 4) >= 116 &&
                  (!facp_r || !facp_x || facp_r == facp_x);
    check(facp_ok, "acpi facp valid", "facp=0x%x (rsdt 0x%x, xsdt 0x%x)", facp, facp_r, facp_x);
    if (!facp_ok)
        return;
    const uint8_t *f = (const uint8_t *)facp;
    uint32_t port = acpi_rd32(f + 76), ext = (acpi_rd32(f + 112) >> 8) & 1; /* PM_TMR_BLK, flags.TMR_VAL_EXT */
    uint32_t mask = ext ? 0xFFFFFFFFu : 0xFFFFFFu;
    print("acpi: facp at 0x%x rev %u pm_tmr_blk=0x%x (%u-bit)\n", facp, f[8], port, ext ? 32 : 24);
    check(port != 0 && port < 0x10000, "acpi facp pm_tmr_blk set", "pm_tmr_blk=0x%x", port);
    if (port == 0 || port >= 0x10000)
        return;

    /* PIT and PM timer both derive from 14.31818 MHz (/12 and /4): 3 PM ticks per PIT
     * clock.  Each end of the ~10 ms interval reads PM, latches PIT channel 2, reads PM
     * again; an end whose two PM reads are > 0.5 ms apart (vCPU descheduled) is retried,
     * and so is a ratio outside +-10%, up to 5 tries. */
    uint32_t pm = 0, pit = 0, hz = 0;
    for (int attempt = 0; attempt < 5; attempt++) {
        pit2_start(0xFFFF);
        uint32_t a0 = inl((uint16_t)port), c0 = pit2_count(), b0 = inl((uint16_t)port), c1 = c0, polls = 0;
        while (c0 - c1 < PIT_10MS && c1 <= c0 && ++polls < 20 * PIT_10MS)
            c1 = pit2_count();
        uint32_t a1 = inl((uint16_t)port);
        c1 = pit2_count();
        uint32_t b1 = inl((uint16_t)port), open0 = (b0 - a0) & mask, open1 = (b1 - a1) & mask;
        if (c1 > c0 || pit2_out()) /* channel 2 wrapped: more than 55 ms passed */
            continue;
        pit = c0 - c1;
        pm = (((a1 - a0) & mask) + open1 / 2) - open0 / 2; /* midpoint to midpoint */
        hz = pit && pm < 16 * pit ? muldiv(pm, 1193182, pit) : 0;
        if (open0 <= 1790 && open1 <= 1790 && hz >= PM_HZ_MIN && hz <= PM_HZ_MAX)
            break;
    }
    print("acpi: pm timer %u ticks in %u pit clocks (%u Hz)\n", pm, pit, hz);
    check(hz >= PM_HZ_MIN && hz <= PM_HZ_MAX, "acpi pm timer runs at 3.579545 MHz +-10%", "%u Hz", hz);
}

/* ---- main ------------------------------------------------------------- */

void __attribute__((noreturn)) guest_main(uint32_t magic, const struct mb_info *mi)
{
    uart_init();
    print("smp-test: start\n");
    read_multiboot(magic, mi); /* before anything below 1 MiB is written */
    pic_init();
    idt_init();
    check_bsp_lapic();
    check_pit2();
    start_aps();
    check_ipis();
    check(icr_stuck == 0, "lapic icr delivery status clears", "%u of %u sends stayed busy", icr_stuck, icr_sends);
    check_pit_irq0();
    check_lapic_timer();
    check_rtc();
    check_acpi_pm_timer();
    check(other_irqs == 0, "no unexpected interrupts", "%u, last vector 0x%x on apic id %u", other_irqs,
          last_other & 0xFF, last_other >> 8);
    check(pit2_overruns == 0, "pit channel 2 deadlines fired", "%u one-shots hit the poll cap", pit2_overruns);
    if (failures == 0) {
        print("PASS: all\n");
        exit_vm(0);
    }
    print("FAIL: summary %u failed\n", failures);
    exit_vm(1);
}
