/*
 * Shared by the test guests: 16-bit port I/O, memory barriers, xAPIC access and
 * PIT channel 2 one-shot deadlines (the timing scheme smp-test uses: mode 0,
 * OUT2 read from port 0x61 bit 5, chained for waits over 55 ms).
 * Header-only (static inline), on top of console.h.
 */
#ifndef GUEST_X86_H
#define GUEST_X86_H

#include "console.h"

static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
/* Full fence (store-load ordering) without SSE2's mfence. */
static inline void mb(void) { __asm__ volatile("lock; addl $0, (%%esp)" : : : "memory", "cc"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }
static inline void irq_on(void) { __asm__ volatile("sti" : : : "memory"); }
static inline void irq_off(void) { __asm__ volatile("cli" : : : "memory"); }
/* IF=0 on entry; a pending interrupt is taken after the hlt starts (sti shadow), then IF=0 again. */
static inline void halt_for_irq(void) { __asm__ volatile("sti; hlt; cli" : : : "memory"); }

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return (uint64_t)hi << 32 | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}

static inline uint8_t mmio_read8(uintptr_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t mmio_read16(uintptr_t a) { return *(volatile uint16_t *)a; }
static inline uint32_t mmio_read32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_write8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void mmio_write16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline void mmio_write32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }

/* ---- xAPIC (MMIO at 0xFEE00000) ---------------------------------------- */

#define LAPIC_BASE 0xFEE00000u
enum { LAPIC_ID = 0x20, LAPIC_VER = 0x30, LAPIC_TPR = 0x80, LAPIC_EOI = 0xB0, LAPIC_SVR = 0xF0,
       LAPIC_IRR = 0x200, LAPIC_LVT_TIMER = 0x320, LAPIC_LVT_LINT0 = 0x350, LAPIC_TMR_INIT = 0x380,
       LAPIC_TMR_CUR = 0x390, LAPIC_TMR_DIV = 0x3E0 };
#define LVT_MASKED 0x10000u

static inline uint32_t lapic_read(uint32_t reg) { return mmio_read32(LAPIC_BASE + reg); }
static inline void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

/* xAPIC globally (IA32_APIC_BASE) and software enabled (SVR 0x1FF: spurious vector 0xFF), TPR 0, timer
 * divide by 16 and stopped, one-shot on timer_vector once an initial count is written.  Returns the APIC ID
 * (the MSI destination). */
static inline uint32_t lapic_enable(uint8_t timer_vector)
{
    uint64_t base = rdmsr(0x1B);
    if (!(base & (1u << 11)))
        wrmsr(0x1B, base | (1u << 11));
    lapic_write(LAPIC_SVR, 0x1FF);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_TMR_DIV, 0x3);
    lapic_write(LAPIC_TMR_INIT, 0);
    lapic_write(LAPIC_LVT_TIMER, timer_vector);
    return lapic_read(LAPIC_ID) >> 24;
}

/* ---- IOAPIC (MMIO at 0xFEC00000: IOREGSEL, IOWIN at +0x10) -------------- */

#define IOAPIC_BASE 0xFEC00000u

static inline uint32_t ioapic_read(uint32_t reg)
{
    mmio_write32(IOAPIC_BASE, reg);
    return mmio_read32(IOAPIC_BASE + 0x10);
}
static inline void ioapic_write(uint32_t reg, uint32_t v)
{
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, v);
}
/* Redirection entries the IOAPIC has (version register bits 23:16, plus one). */
static inline uint32_t ioapic_entries(void) { return ((ioapic_read(1) >> 16) & 0xFF) + 1; }
/* Routes input `gsi` to `vector` on the CPU with APIC ID apic_id (physical destination, fixed delivery),
 * unmasked; level: level-triggered (else edge); active_low: polarity low (ACPI's default for PCI lines). */
static inline void ioapic_route(uint32_t gsi, uint8_t vector, uint32_t apic_id, int level, int active_low)
{
    ioapic_write(0x11 + 2 * gsi, apic_id << 24);
    ioapic_write(0x10 + 2 * gsi, vector | (active_low ? 1u << 13 : 0) | (level ? 1u << 15 : 0));
}
static inline void ioapic_mask(uint32_t gsi) { ioapic_write(0x10 + 2 * gsi, 1u << 16); }

/* ---- 8259: remap to 0x20/0x28 and mask everything ---------------------- */

static inline void pic_mask_all(void)
{
    outb(0x20, 0x11); outb(0xA0, 0x11); /* ICW1: edge, cascade, ICW4 needed */
    outb(0x21, 0x20); outb(0xA1, 0x28); /* ICW2: vector bases */
    outb(0x21, 0x04); outb(0xA1, 0x02); /* ICW3: slave on IRQ2 */
    outb(0x21, 0x01); outb(0xA1, 0x01); /* ICW4: 8086 mode */
    outb(0x21, 0xFF); outb(0xA1, 0xFF); /* OCW1: all masked */
}

/* ---- PIT channel 2 deadlines ------------------------------------------- */

#define PIT_CH2 0x42
#define PIT_CMD 0x43
#define PORT_B 0x61 /* bit 0: PIT ch2 gate, bit 1: speaker data, bit 5: PIT ch2 OUT */
#define PIT_COUNTS_PER_MS 1193u

static inline void pit2_gate_on(void) { outb(PORT_B, (uint8_t)((inb(PORT_B) & ~0x03) | 0x01)); }

/* Mode 0 (interrupt on terminal count): OUT2 goes low now, high after `count` PIT clocks. */
static inline void pit2_start(uint32_t count)
{
    outb(PIT_CMD, 0xB0); /* channel 2, lobyte/hibyte, mode 0, binary */
    outb(PIT_CH2, (uint8_t)count);
    outb(PIT_CH2, (uint8_t)(count >> 8));
}
static inline int pit2_out(void) { return inb(PORT_B) & 0x20; }

/* A deadline of any length, run as a chain of <= 65535-count one-shots.  The poll
 * cap (20 polls per PIT clock, i.e. >= ~40 ns a poll) only matters when the PIT
 * never raises OUT2: the wait still ends. */
struct deadline { uint32_t left, polls, cap; };

static inline void dl_chunk(struct deadline *d)
{
    uint32_t c = d->left > 0xFFFF ? 0xFFFF : d->left;
    d->left -= c;
    d->polls = 0;
    d->cap = 20 * c + 1000;
    pit2_start(c);
}
static inline void dl_start_ms(struct deadline *d, uint32_t ms)
{
    d->left = ms * PIT_COUNTS_PER_MS + 2;
    dl_chunk(d);
}
static inline int dl_expired(struct deadline *d)
{
    if (!pit2_out() && ++d->polls < d->cap)
        return 0;
    if (d->left == 0)
        return 1;
    dl_chunk(d);
    return 0;
}

#endif
