/*
 * vfio-gpu-test: drives the vfio-user test GPU (docs/test-gpu.md) that vmm attaches with
 * --device vfio-user=SOCKET: PCI identity and BARs, registers, BAR0 SRAM, the >= 4 GiB BAR2 above 4 GiB
 * (through PAE paging, lib/paging.c), MSI-X (or MSI) interrupts and the DMA engine at IOVA = guest
 * physical address.  With `device=1af4:1110 tests=bar-only` it runs only the large-BAR part against
 * QEMU's ivshmem-plain (the QEMU cross-check; QEMU 7.2 has no vfio-user client).
 *
 * Every step prints "vfio-gpu: <step> ok"; the first failure prints "vfio-gpu: FAIL <step>: <why>" with
 * the values involved and exits with isa-debug-exit 1 (status 3).  The end is "vfio-gpu: all ok" and exit
 * 0 (status 1).  See guest-images/README.md for the command line and the exact bytes written.
 */
#include "console.h"
#include "x86.h"
#include "pci.h"
#include "idt.h"
#include "paging.h"

#define MB_BOOT_MAGIC 0x2BADB002u
#define MAX_FUNCS 64

/* BAR0 registers (docs/test-gpu.md) */
enum { REG_ID = 0x000, REG_VERSION = 0x004, REG_SCRATCH = 0x008, REG_BAR2_SIZE_LO = 0x010, REG_BAR2_SIZE_HI = 0x014,
       REG_DMA_SRC_LO = 0x020, REG_DMA_SRC_HI = 0x024, REG_DMA_DST_LO = 0x028, REG_DMA_DST_HI = 0x02C,
       REG_DMA_LEN = 0x030, REG_DMA_PATTERN = 0x034, REG_DMA_VECTOR = 0x038, REG_DMA_CMD = 0x03C,
       REG_DMA_STATUS = 0x040, REG_DMA_COUNT = 0x044, REG_IRQ_COUNT = 0x048, REG_IRQ_ACK = 0x04C };
enum { CMD_FILL = 1, CMD_COPY = 2, CMD_COPY_FROM_BAR2 = 3, CMD_COPY_TO_BAR2 = 4 };
#define GPU_VENDOR 0x1B36
#define GPU_DEVICE 0x7001
#define GPU_ID 0x47505530u
#define GPU_CLASS 0x0302 /* 3D controller */
#define DMA_DONE 1u
#define DMA_ERR(code) (0x80000000u | (code))
#define SRAM_OFF 0x10000u
#define GIB 0x40000000ull

#define VEC_WATCHDOG 0x4F
#define VEC_MSIX_BASE 0x60 /* MSI-X entry i -> LAPIC vector 0x60 + i */
#define VEC_MSI 0x70
#define VEC_INTX 0x71
/* vmm routes interrupt pin p (config value 1 = INTA .. 4 = INTD) of root-bus slot s to IOAPIC input
 * 16 + (s + p - 1) % 4, level-triggered (MemoryLayout.PciIntxGsi; its ACPI _PRT says the same); intx-gsi=N
 * overrides. */
#define INTX_FIRST_GSI 16
#define DMA_MSIX_ENTRY 3
#define WATCHDOG_COUNT 625000u /* 10 ms at the 1 GHz APIC bus of KVM and QEMU (divide by 16) */

/* Guest data the DMA tests write and read: guest physical (identity-mapped) = IOVA. */
#define BUF_DWORDS 2048 /* 8 KiB: two pages */
#define GUARD_DWORDS 16
#define GUARD 0xDEADBEEFu
struct dma_buf {
    uint32_t d[BUF_DWORDS];
    uint32_t guard[GUARD_DWORDS];
};
static struct dma_buf buf1 __attribute__((aligned(4096))), buf2 __attribute__((aligned(4096)));

static char cmdline[512];
static struct pci_func funcs[MAX_FUNCS];
static int n_funcs;
static const struct pci_func *gpu;
static uintptr_t bar0;
static uint32_t bar0_size;
static uint64_t bar2, bar2_size;
static uint32_t apic_id;
static enum { IRQ_MSIX, IRQ_MSI, IRQ_INTX, IRQ_POLL } irq_mode;
static uint32_t intx_gsi = ~0u; /* from intx-gsi=, else the swizzle */
static uint32_t dma_vec; /* LAPIC vector the DMA completion arrives on */
static struct pci_msix msix; /* irq=msix: the capability as found (table mapped) */
static const char *dma_hint; /* appended to a dma_ok failure with DMA_STATUS 0x80000001 (bad IOVA) */
static const char *step = "start";

static volatile uint32_t irq_count[256];
static volatile uint32_t watchdog_ticks;

static void reg_write(uint32_t off, uint32_t v);

/* ---- reporting ------------------------------------------------------------ */

static void __attribute__((noreturn)) fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    print("vfio-gpu: FAIL %s: ", step);
    vprint(fmt, ap);
    print("\n");
    va_end(ap);
    exit_vm(1);
}

static void ok(void) { print("vfio-gpu: %s ok\n", step); }

/* ---- interrupts ------------------------------------------------------------ */

/* frame: [0..7] pushal, [8] vector, then (error code,) eip, cs, eflags. */
void isr_dispatch(uint32_t *frame)
{
    uint32_t vec = frame[8];
    if (vec < 32) {
        int has_err = vec == 8 || (vec >= 10 && vec <= 14) || vec == 17;
        uint32_t cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        fail("cpu exception vector %u eip=0x%x err=0x%x cr2=0x%x", vec, frame[9 + has_err], has_err ? frame[9] : 0,
             cr2);
    }
    if (vec == 0xFF)
        return; /* LAPIC spurious: no EOI */
    if (vec == VEC_WATCHDOG)
        watchdog_ticks++;
    else
        irq_count[vec]++;
    if (vec == VEC_INTX && irq_mode == IRQ_INTX)
        reg_write(REG_IRQ_ACK, 1); /* deassert the level-triggered line before the EOI, or it fires again */
    lapic_eoi();
}

/* Halts (IF=0 between checks, "sti; hlt" each round, a 10 ms LAPIC one-shot bounding every hlt) until
 * irq_count[vec] moves past `seen` or `ms` of PIT time pass.  Returns 1 if the interrupt came. */
static int wait_irq(uint32_t vec, uint32_t seen, uint32_t ms)
{
    struct deadline dl;
    dl_start_ms(&dl, ms);
    while (irq_count[vec] == seen && !dl_expired(&dl)) {
        lapic_write(LAPIC_TMR_INIT, WATCHDOG_COUNT);
        halt_for_irq();
    }
    lapic_write(LAPIC_TMR_INIT, 0);
    return irq_count[vec] != seen;
}

/* ---- command line ------------------------------------------------------------ */

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* Hex number at s up to a non-hex character; *end set past it. */
static uint32_t parse_hex(const char *s, const char **end)
{
    uint32_t v = 0;
    while (hexval(*s) >= 0)
        v = v << 4 | (uint32_t)hexval(*s++);
    *end = s;
    return v;
}

/* Is `word` a whole space-separated token of the command line? */
static int has_token(const char *cmd, const char *word)
{
    for (const char *p = cmd; *p; p++) {
        if (p != cmd && p[-1] != ' ')
            continue;
        const char *a = p, *w = word;
        while (*w && *a == *w)
            a++, w++;
        if (!*w && (*a == ' ' || *a == 0))
            return 1;
    }
    return 0;
}

/* Is `word` an item of the comma-separated list that ends at a space or the end? */
static int list_has(const char *list, const char *word)
{
    for (const char *p = list; p && *p && *p != ' ';) {
        const char *w = word;
        while (*w && *p == *w)
            p++, w++;
        if (!*w && (*p == ',' || *p == ' ' || *p == 0))
            return 1;
        while (*p && *p != ',' && *p != ' ')
            p++;
        if (*p == ',')
            p++;
    }
    return 0;
}

/* ---- BAR access --------------------------------------------------------------- */

static uint32_t reg_read(uint32_t off) { return mmio_read32(bar0 + off); }
static void reg_write(uint32_t off, uint32_t v) { mmio_write32(bar0 + off, v); }

/* What the guest writes at BAR2 offset off (a multiple of 4): includes the offset's high half, so a write
 * whose bit 32+ is lost on the way lands with the wrong value somewhere the guest checks. */
static uint32_t bar2_pattern(uint64_t off) { return (uint32_t)off ^ ((uint32_t)(off >> 32) << 24) ^ 0x6B000000u; }
static uint32_t sram_pattern(uint32_t off) { return off ^ 0x52A30000u; }
static uint32_t buf_pattern(uint32_t i) { return 0xC0DE0000u ^ (i * 0x9E3779B1u); }
#define FILL_PATTERN 0xF111C0DEu

/* 64-byte blocks written into BAR2: offset 0, 4 GiB - 4096, one across the 4 GiB line, and the last 64
 * bytes of the BAR (ends with its last dword). */
#define BLOCK 64u
static uint64_t bar2_blocks[4];
static int bar2_written;

static volatile uint32_t *bar2_map(uint64_t off, uint32_t len)
{
    uintptr_t va = paging_map(bar2 + off, len);
    if (!va)
        fail("cannot map BAR2 offset 0x%X (phys 0x%X, %u bytes; physical address width %u bits)", off, bar2 + off,
             len, paging_phys_bits());
    return (volatile uint32_t *)va;
}

static void bar2_write_blocks(void)
{
    for (int b = 0; b < 4; b++) {
        volatile uint32_t *p = bar2_map(bar2_blocks[b], BLOCK);
        for (uint32_t i = 0; i < BLOCK / 4; i++)
            p[i] = bar2_pattern(bar2_blocks[b] + 4 * i);
    }
    bar2_written = 1;
}

static void bar2_check_block(uint64_t off, uint32_t len, uint32_t (*want)(uint64_t off, uint64_t base))
{
    volatile uint32_t *p = bar2_map(off, len);
    for (uint32_t i = 0; i < len / 4; i++) {
        uint32_t got = p[i], w = want(off + 4 * i, off);
        if (got != w)
            fail("BAR2 offset 0x%X (phys 0x%X, virtual 0x%x, window at phys 0x%X) reads 0x%x, want 0x%x",
                 off + 4 * i, bar2 + off + 4 * i, (uint32_t)(uintptr_t)(p + i), paging_window_base(), got, w);
    }
}

static uint32_t want_bar2_pattern(uint64_t off, uint64_t base) { (void)base; return bar2_pattern(off); }

/* ---- steps ------------------------------------------------------------------- */

static void step_find(uint32_t vendor, uint32_t device, int generic)
{
    step = "find";
    int n = n_funcs = pci_enumerate(funcs, MAX_FUNCS);
    for (int i = 0; i < n && !gpu; i++)
        if (funcs[i].vendor == vendor && funcs[i].device == device)
            gpu = &funcs[i];
    if (!gpu) {
        for (int i = 0; i < n; i++)
            print("vfio-gpu: pci 00:%02x.%u %04x:%04x class %06x\n", funcs[i].dev, funcs[i].fn, funcs[i].vendor,
                  funcs[i].device, funcs[i].class_rev >> 8);
        fail("no %04x:%04x among the %u functions on bus 0", vendor, device, (uint32_t)n);
    }
    print("vfio-gpu: device %04x:%04x at 00:%02x.%u class %06x rev %u int pin %u\n", vendor, device, gpu->dev, gpu->fn,
          gpu->class_rev >> 8, gpu->class_rev & 0xFF, gpu->int_pin);
    ok();
    if (!generic) {
        step = "class";
        if ((gpu->class_rev >> 16) != GPU_CLASS)
            fail("class/subclass 0x%04x, want 0x%04x (3D controller)", gpu->class_rev >> 16, GPU_CLASS);
        ok();
    }
}

static void print_bar(int i)
{
    const struct pci_bar *b = &gpu->bar[i];
    print("vfio-gpu: bar%u %s 0x%X size 0x%X%s (registers 0x%x", (uint32_t)i, b->is_io ? "io" : b->is_64 ? "mem64" : "mem32",
          b->base, b->size, b->prefetch ? " prefetchable" : "", gpu->bar_raw[i]);
    if (b->is_64)
        print(" 0x%x", gpu->bar_raw[i + 1]);
    print(")\n");
}

static void step_bars(int generic)
{
    step = "bars";
    const struct pci_bar *b0 = &gpu->bar[0], *b2 = &gpu->bar[2];
    if (!generic)
        print_bar(0);
    print_bar(2);
    if (!generic) {
        if (b0->is_io || b0->is_64 || b0->size < 2 * SRAM_OFF || b0->base == 0 || b0->base + b0->size > 1ull << 32)
            fail("BAR0 must be a 32-bit memory BAR of at least 128 KiB below 4 GiB");
        bar0 = (uintptr_t)b0->base;
        bar0_size = (uint32_t)b0->size;
    }
    if (b2->is_io || !b2->is_64 || !b2->prefetch)
        fail("BAR2 must be 64-bit prefetchable memory (is_io %u is_64 %u prefetch %u)", b2->is_io, b2->is_64,
             b2->prefetch);
    if (b2->size < 4 * GIB || (b2->size & (b2->size - 1)))
        fail("BAR2 size 0x%X: want a power of two >= 4 GiB", b2->size);
    if (b2->base < 4 * GIB || (b2->base & (b2->size - 1)))
        fail("BAR2 at 0x%X: want an address >= 4 GiB aligned to its size", b2->base);
    bar2 = b2->base;
    bar2_size = b2->size;
    bar2_blocks[0] = 0;
    bar2_blocks[1] = 4 * GIB - 4096;
    bar2_blocks[2] = 4 * GIB - BLOCK / 2;
    bar2_blocks[3] = bar2_size - BLOCK;
    ok();

    step = "enable";
    pci_enable(gpu, 0);
    uint16_t cmd = pci_read16(gpu, PCI_COMMAND);
    print("vfio-gpu: command 0x%x\n", cmd);
    if ((cmd & (PCI_CMD_MEM | PCI_CMD_MASTER)) != (PCI_CMD_MEM | PCI_CMD_MASTER))
        fail("command register 0x%x lacks memory space (bit 1) or bus master (bit 2)", cmd);
    ok();
}

static void step_paging(void)
{
    step = "paging";
    const char *why = paging_init();
    if (why)
        fail("%s", why);
    print("vfio-gpu: PAE paging on: low 4 GiB identity-mapped (2 MiB pages), 1 GiB window at 0x%x, %u-bit physical "
          "addresses\n", PAGING_WINDOW_VA, paging_phys_bits());
    if (paging_phys_bits() < 64 && bar2 + bar2_size > 1ull << paging_phys_bits())
        fail("BAR2 ends at 0x%X, beyond the %u-bit physical address width", bar2 + bar2_size, paging_phys_bits());
    ok();
}

static void step_regs(void)
{
    step = "regs";
    uint32_t id = reg_read(REG_ID), ver = reg_read(REG_VERSION);
    print("vfio-gpu: ID 0x%x VERSION %u\n", id, ver);
    if (id != GPU_ID || ver != 1)
        fail("ID 0x%x VERSION 0x%x, want 0x%x and 1", id, ver, GPU_ID);
    static const uint32_t vals[2] = { 0xA5A5F00Du, 0x5A5A0FF0u };
    for (int i = 0; i < 2; i++) {
        reg_write(REG_SCRATCH, vals[i]);
        uint32_t got = reg_read(REG_SCRATCH);
        if (got != vals[i])
            fail("SCRATCH reads 0x%x after writing 0x%x", got, vals[i]);
    }
    uint64_t size = reg_read(REG_BAR2_SIZE_LO) | (uint64_t)reg_read(REG_BAR2_SIZE_HI) << 32;
    if (size != bar2_size)
        fail("BAR2_SIZE register 0x%X, the BAR sized as 0x%X", size, bar2_size);
    ok();
}

static void step_sram(void)
{
    step = "sram";
    uint32_t offs[2] = { SRAM_OFF, bar0_size - BLOCK };
    for (int b = 0; b < 2; b++)
        for (uint32_t i = 0; i < BLOCK; i += 4)
            reg_write(offs[b] + i, sram_pattern(offs[b] + i));
    for (int b = 0; b < 2; b++)
        for (uint32_t i = 0; i < BLOCK; i += 4) {
            uint32_t got = reg_read(offs[b] + i), want = sram_pattern(offs[b] + i);
            if (got != want)
                fail("BAR0 offset 0x%x (address 0x%x) reads 0x%x, want 0x%x", offs[b] + i, bar0 + offs[b] + i, got,
                     want);
        }
    ok();
}

static void step_bar2(void)
{
    step = "bar2";
    print("vfio-gpu: BAR2 blocks of %u bytes at offsets 0x%X 0x%X 0x%X 0x%X\n", BLOCK, bar2_blocks[0], bar2_blocks[1],
          bar2_blocks[2], bar2_blocks[3]);
    bar2_write_blocks();
    for (int b = 0; b < 4; b++)
        bar2_check_block(bar2_blocks[b], BLOCK, want_bar2_pattern);
    ok();
}

static void step_irq(void)
{
    if (irq_mode == IRQ_MSIX) {
        step = "msix";
        struct pci_msix m;
        int reachable = pci_msix_find(gpu, &m);
        msix = m;
        print("vfio-gpu: msi-x cap at 0x%x: %u entries, table 0x%x, pba 0x%x (bir in bits 2:0)\n", m.cap, m.size,
              m.table_reg, m.pba_reg);
        if (!m.cap)
            fail("no MSI-X capability");
        if (m.size != 8 || m.table_reg != 0x1000 || m.pba_reg != 0x2000)
            fail("want 8 entries, table in BAR0 at 0x1000, PBA at 0x2000");
        if (!reachable)
            fail("table not reachable in BAR0");
        pci_msix_enable(gpu, &m, m.size, apic_id, VEC_MSIX_BASE);
        uint16_t ctrl = pci_read16(gpu, m.cap + 2u);
        if ((ctrl & 0xC000) != 0x8000)
            fail("message control 0x%x after enabling: want enable (bit 15) on, function mask (bit 14) off", ctrl);
        dma_vec = VEC_MSIX_BASE + DMA_MSIX_ENTRY;
        print("vfio-gpu: msi-x entries 0..7 -> apic %u vectors 0x%x..0x%x; DMA_VECTOR %u -> vector 0x%x\n", apic_id,
              VEC_MSIX_BASE, VEC_MSIX_BASE + 7, DMA_MSIX_ENTRY, dma_vec);
    } else if (irq_mode == IRQ_MSI) {
        step = "msi";
        uint8_t c = pci_msi_enable(gpu, apic_id, VEC_MSI);
        if (!c)
            fail("no MSI capability");
        uint16_t ctrl = pci_read16(gpu, c + 2u);
        print("vfio-gpu: msi cap at 0x%x control 0x%x -> apic %u vector 0x%x\n", c, ctrl, apic_id, VEC_MSI);
        if (!(ctrl & 1))
            fail("MSI enable does not read back (control 0x%x)", ctrl);
        dma_vec = VEC_MSI;
    } else if (irq_mode == IRQ_INTX) {
        step = "intx";
        uint32_t pin = gpu->int_pin, entries = ioapic_entries();
        if (intx_gsi == ~0u)
            intx_gsi = INTX_FIRST_GSI + (gpu->dev + pin - 1) % 4;
        uint16_t cmd = pci_read16(gpu, PCI_COMMAND);
        print("vfio-gpu: intx pin %u (1 = INTA) -> ioapic input %u of %u, level, active low -> apic %u vector 0x%x; "
              "command 0x%x\n", pin, intx_gsi, entries, apic_id, VEC_INTX, cmd);
        if (pin < 1 || pin > 4)
            fail("interrupt pin %u: want 1..4", pin);
        if (intx_gsi >= entries)
            fail("ioapic input %u beyond its %u entries", intx_gsi, entries);
        if (cmd & PCI_CMD_INTX_DISABLE)
            pci_write16(gpu, PCI_COMMAND, (uint16_t)(cmd & ~PCI_CMD_INTX_DISABLE));
        ioapic_route(intx_gsi, VEC_INTX, apic_id, 1, 1);
        dma_vec = VEC_INTX;
    } else {
        step = "poll";
        print("vfio-gpu: irq=poll: no interrupt waits\n");
    }
    ok();
}

static void fill_buf(struct dma_buf *b, uint32_t (*pat)(uint32_t))
{
    for (uint32_t i = 0; i < BUF_DWORDS; i++)
        b->d[i] = pat ? pat(i) : 0;
    for (uint32_t i = 0; i < GUARD_DWORDS; i++)
        b->guard[i] = GUARD;
}

static uint32_t iova(const void *p) { return (uint32_t)(uintptr_t)p; }

/* Programs and starts one DMA; returns DMA_STATUS (the operation completes before the DMA_CMD write returns). */
static uint32_t dma_start(uint32_t cmd, uint64_t src, uint64_t dst, uint32_t len, uint32_t pattern)
{
    reg_write(REG_DMA_SRC_LO, (uint32_t)src);
    reg_write(REG_DMA_SRC_HI, (uint32_t)(src >> 32));
    reg_write(REG_DMA_DST_LO, (uint32_t)dst);
    reg_write(REG_DMA_DST_HI, (uint32_t)(dst >> 32));
    reg_write(REG_DMA_LEN, len);
    reg_write(REG_DMA_PATTERN, pattern);
    reg_write(REG_DMA_VECTOR, DMA_MSIX_ENTRY);
    reg_write(REG_DMA_CMD, cmd);
    return reg_read(REG_DMA_STATUS);
}

/* One DMA that must succeed: DMA_STATUS 1, DMA_COUNT one up, and the interrupt on dma_vec (IF stays 0
 * except inside the wait, so nothing is counted before the snapshot). */
static void dma_ok(const char *what, uint32_t cmd, uint64_t src, uint64_t dst, uint32_t len, uint32_t pattern)
{
    uint32_t count0 = reg_read(REG_DMA_COUNT), irqs0 = reg_read(REG_IRQ_COUNT), seen = irq_count[dma_vec];
    uint32_t st = dma_start(cmd, src, dst, len, pattern);
    uint32_t count = reg_read(REG_DMA_COUNT);
    if (st != DMA_DONE)
        fail("%s (cmd %u src 0x%X dst 0x%X len 0x%x): DMA_STATUS 0x%x, want 1 (DMA_COUNT %u, IRQ_COUNT %u)%s%s", what,
             cmd, src, dst, len, st, count, reg_read(REG_IRQ_COUNT), dma_hint && st == DMA_ERR(1) ? "; " : "",
             dma_hint && st == DMA_ERR(1) ? dma_hint : "");
    if (count != count0 + 1)
        fail("%s: DMA_COUNT went from %u to %u, want one more", what, count0, count);
    if (irq_mode != IRQ_POLL && !wait_irq(dma_vec, seen, 1000))
        fail("%s: no interrupt on vector 0x%x within 1 s (IRQ_COUNT %u -> %u, watchdog ticks %u, LAPIC IRR 0x%x)",
             what, dma_vec, irqs0, reg_read(REG_IRQ_COUNT), watchdog_ticks, lapic_read(LAPIC_IRR + 0x10 * (dma_vec / 32)));
}

/* Dword i of b against want (first mismatch fails with its IOVA). */
static void check_dword(const char *what, const struct dma_buf *b, uint32_t i, uint32_t want)
{
    uint32_t got = i < BUF_DWORDS ? b->d[i] : b->guard[i - BUF_DWORDS];
    if (got != want)
        fail("%s: dword at IOVA 0x%x reads 0x%x, want 0x%x", what, iova(b) + 4 * i, got, want);
}

static void check_guard(const char *what, const struct dma_buf *b)
{
    for (uint32_t i = BUF_DWORDS; i < BUF_DWORDS + GUARD_DWORDS; i++)
        check_dword(what, b, i, GUARD);
}

static uint32_t want_to_bar2(uint64_t off, uint64_t base) { return buf_pattern((uint32_t)(off - base) / 4); }

static void step_dma(void)
{
    step = "dma-fill";
    fill_buf(&buf1, 0);
    dma_ok("FILL", CMD_FILL, 0, iova(buf1.d), sizeof(buf1.d), FILL_PATTERN);
    for (uint32_t i = 0; i < BUF_DWORDS; i++)
        check_dword("FILL", &buf1, i, FILL_PATTERN);
    check_guard("FILL past the end", &buf1);
    print("vfio-gpu: FILL 0x%x bytes at IOVA 0x%x with 0x%x; interrupts on vector 0x%x: %u\n", sizeof(buf1.d),
          iova(buf1.d), FILL_PATTERN, dma_vec, irq_count[dma_vec]);
    ok();

    /* 4 KiB from buf1 + 0x800 to buf2 + 0x400: both ranges cross a page boundary. */
    step = "dma-copy";
    fill_buf(&buf1, buf_pattern);
    fill_buf(&buf2, 0);
    dma_ok("COPY", CMD_COPY, iova(&buf1.d[0x200]), iova(&buf2.d[0x100]), 4096, 0);
    for (uint32_t i = 0; i < BUF_DWORDS; i++)
        check_dword("COPY", &buf2, i, i >= 0x100 && i < 0x500 ? buf_pattern(i + 0x100) : 0);
    check_guard("COPY past the end", &buf2);
    ok();

    /* The blocks the guest wrote through its BAR2 mapping, as the server's memory holds them. */
    step = "dma-from-bar2";
    if (!bar2_written)
        bar2_write_blocks();
    fill_buf(&buf2, 0);
    dma_ok("COPY_FROM_BAR2 across 4 GiB", CMD_COPY_FROM_BAR2, bar2_blocks[2], iova(&buf2.d[0]), BLOCK, 0);
    dma_ok("COPY_FROM_BAR2 end of BAR", CMD_COPY_FROM_BAR2, bar2_blocks[3], iova(&buf2.d[BLOCK / 4]), BLOCK, 0);
    for (uint32_t i = 0; i < BLOCK / 4; i++) {
        check_dword("COPY_FROM_BAR2 across 4 GiB", &buf2, i, bar2_pattern(bar2_blocks[2] + 4 * i));
        check_dword("COPY_FROM_BAR2 end of BAR", &buf2, BLOCK / 4 + i, bar2_pattern(bar2_blocks[3] + 4 * i));
    }
    check_dword("COPY_FROM_BAR2 length", &buf2, BLOCK / 2, 0);
    ok();

    /* buf1 (buf_pattern) into BAR2 at 0x1000 (4 KiB) and at 4 GiB + 0x1000 (64 bytes), read through the mapping. */
    step = "dma-to-bar2";
    dma_ok("COPY_TO_BAR2 at 0x1000", CMD_COPY_TO_BAR2, iova(buf1.d), 0x1000, 4096, 0);
    dma_ok("COPY_TO_BAR2 above 4 GiB", CMD_COPY_TO_BAR2, iova(buf1.d), 4 * GIB + 0x1000, BLOCK, 0);
    bar2_check_block(0x1000, 4096, want_to_bar2);
    bar2_check_block(4 * GIB + 0x1000, BLOCK, want_to_bar2);
    bar2_check_block(bar2_blocks[0], BLOCK, want_bar2_pattern); /* the DMA at 0x1000 left offset 0 alone */
    ok();
}

/* A DMA that must fail with DMA_STATUS = 0x80000000 | code. */
static void dma_err(const char *what, uint32_t cmd, uint64_t src, uint64_t dst, uint32_t len, uint32_t code)
{
    uint32_t st = dma_start(cmd, src, dst, len, 0xBADBAD00u);
    print("vfio-gpu: %s: DMA_STATUS 0x%x\n", what, st);
    if (st != DMA_ERR(code))
        fail("%s (cmd %u src 0x%X dst 0x%X len 0x%x): DMA_STATUS 0x%x, want 0x%x", what, cmd, src, dst, len, st,
             DMA_ERR(code));
}

static void step_errors(void)
{
    step = "dma-errors";
    fill_buf(&buf2, 0);
    dma_err("FILL to unmapped IOVA 0xf0000000", CMD_FILL, 0, 0xF0000000u, 4096, 1);
    dma_err("COPY from unmapped IOVA 0x100000000000", CMD_COPY, 0x100000000000ull, iova(buf2.d), 64, 1);
    dma_err("FILL with length 6", CMD_FILL, 0, iova(buf2.d), 6, 2);
    dma_err("FILL with length 16 MiB + 4", CMD_FILL, 0, iova(buf2.d), 0x1000004u, 2);
    dma_err("command 9", 9, 0, iova(buf2.d), 64, 3);
    uint16_t cmd = pci_read16(gpu, PCI_COMMAND);
    pci_write16(gpu, PCI_COMMAND, (uint16_t)(cmd & ~PCI_CMD_MASTER));
    dma_err("FILL with bus master off", CMD_FILL, 0, iova(buf2.d), 64, 4);
    pci_write16(gpu, PCI_COMMAND, cmd);
    for (uint32_t i = 0; i < BUF_DWORDS; i++)
        check_dword("failed DMAs left guest memory alone", &buf2, i, 0);
    check_guard("failed DMAs left guest memory alone", &buf2);
    /* The device (and the guest) carry on: registers answer, and a DMA works again. */
    reg_write(REG_SCRATCH, 0x600DF00Du);
    if (reg_read(REG_SCRATCH) != 0x600DF00Du)
        fail("SCRATCH reads 0x%x after the failed DMAs", reg_read(REG_SCRATCH));
    dma_ok("FILL after the failed DMAs", CMD_FILL, 0, iova(buf2.d), 64, FILL_PATTERN);
    for (uint32_t i = 0; i < 16; i++)
        check_dword("FILL after the failed DMAs", &buf2, i, FILL_PATTERN);
    check_dword("FILL after the failed DMAs", &buf2, 16, 0);
    ok();
}

/* ---- MSI-X masking ----------------------------------------------------------------- */

/* vmm emulates the table and PBA of a passed-through function: masking (entry or function) detaches the vector's
 * KVM irqfd so the device's signal waits in the eventfd, the PBA bit reads set while it waits, and unmasking
 * attaches it again so KVM delivers the message once (PCI Local Bus 3.0 §6.8.2.9). */
#define MSIX_CTRL_ENABLE 0x8000u
#define MSIX_CTRL_FUNCTION_MASK 0x4000u
#define MSIX_ENTRY_MASKED 1u
#define MASK_FILL_PATTERN 0x3A5C0FF1u

static uint32_t pba_read(void) { return reg_read(msix.pba_reg & ~7u); }
static volatile uint32_t *msix_vector_control(uint32_t entry)
{
    return (volatile uint32_t *)(msix.table + 16 * entry + 12);
}
static uint32_t lapic_irr_has(uint32_t vec) { return lapic_read(LAPIC_IRR + 0x10 * (vec / 32)) >> (vec % 32) & 1; }

/* Sets or clears the function mask (MSI-X control bit 14) or DMA_MSIX_ENTRY's mask (vector control bit 0), read back. */
static void msix_mask(int function_mask, int on)
{
    if (function_mask) {
        uint16_t c = pci_read16(gpu, msix.cap + 2u);
        pci_write16(gpu, msix.cap + 2u, (uint16_t)(on ? c | MSIX_CTRL_FUNCTION_MASK : c & ~MSIX_CTRL_FUNCTION_MASK));
        uint16_t got = pci_read16(gpu, msix.cap + 2u);
        if ((got & (MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK)) != (MSIX_CTRL_ENABLE | (on ? MSIX_CTRL_FUNCTION_MASK : 0)))
            fail("message control 0x%x after %s the function mask (was 0x%x): want enable (bit 15) on, bit 14 %s", got,
                 on ? "setting" : "clearing", c, on ? "on" : "off");
    } else {
        volatile uint32_t *vc = msix_vector_control(DMA_MSIX_ENTRY);
        *vc = on ? MSIX_ENTRY_MASKED : 0;
        uint32_t got = *vc;
        if ((got & MSIX_ENTRY_MASKED) != (on ? MSIX_ENTRY_MASKED : 0))
            fail("entry %u vector control reads 0x%x after writing %u", DMA_MSIX_ENTRY, got, on ? 1 : 0);
    }
}

/* One round: mask, a FILL whose completion must wait (no interrupt, PBA bit set), unmask, exactly one interrupt
 * and the PBA bit clear. */
static void msix_mask_round(int function_mask)
{
    const char *how = function_mask ? "function mask (control bit 14)" : "entry mask (entry 3 vector control bit 0)";
    const uint32_t bit = 1u << DMA_MSIX_ENTRY;
    uint32_t seen = irq_count[dma_vec];

    msix_mask(function_mask, 1);
    uint32_t pba = pba_read();
    if (pba & bit)
        fail("%s: PBA 0x%x has bit %u set before any DMA (a stale signal?)", how, pba, DMA_MSIX_ENTRY);

    for (uint32_t i = 0; i < 64; i++)
        buf2.d[i] = 0;
    uint32_t count0 = reg_read(REG_DMA_COUNT), irqs0 = reg_read(REG_IRQ_COUNT);
    uint32_t st = dma_start(CMD_FILL, 0, iova(buf2.d), 256, MASK_FILL_PATTERN);
    uint32_t count = reg_read(REG_DMA_COUNT), irqs = reg_read(REG_IRQ_COUNT);
    if (st != DMA_DONE || count != count0 + 1)
        fail("%s: FILL 256 bytes at IOVA 0x%x: DMA_STATUS 0x%x (want 1), DMA_COUNT %u -> %u", how, iova(buf2.d), st,
             count0, count);
    for (uint32_t i = 0; i < 64; i++)
        check_dword("FILL while masked", &buf2, i, MASK_FILL_PATTERN);
    check_dword("FILL while masked (length)", &buf2, 64, 0);
    if (irqs != irqs0 + 1)
        fail("%s: IRQ_COUNT %u -> %u after the FILL: the device did not raise its interrupt (want one more)", how,
             irqs0, irqs);

    /* 20 ms with interrupts on (sti; hlt): a masked vector must not fire. */
    if (wait_irq(dma_vec, seen, 20))
        fail("%s: interrupt on vector 0x%x arrived while masked (guest count %u -> %u, IRQ_COUNT %u, PBA 0x%x)", how,
             dma_vec, seen, irq_count[dma_vec], reg_read(REG_IRQ_COUNT), pba_read());
    pba = pba_read();
    if (!(pba & bit))
        fail("%s: PBA 0x%x lacks bit %u 20 ms after the device signalled (IRQ_COUNT %u -> %u, LAPIC IRR bit %u, "
             "guest count %u)", how, pba, DMA_MSIX_ENTRY, irqs0, irqs, lapic_irr_has(dma_vec), irq_count[dma_vec]);
    if (lapic_irr_has(dma_vec))
        fail("%s: LAPIC IRR has vector 0x%x while masked (PBA 0x%x)", how, dma_vec, pba);
    print("vfio-gpu: %s: FILL done, IRQ_COUNT %u -> %u, no interrupt in 20 ms, PBA 0x%x\n", how, irqs0, irqs, pba);

    msix_mask(function_mask, 0);
    if (!wait_irq(dma_vec, seen, 1000))
        fail("%s: no interrupt on vector 0x%x within 1 s of unmasking (PBA 0x%x, LAPIC IRR bit %u, IRQ_COUNT %u, "
             "watchdog ticks %u)", how, dma_vec, pba_read(), lapic_irr_has(dma_vec), reg_read(REG_IRQ_COUNT),
             watchdog_ticks);
    wait_irq(dma_vec, seen + 1, 10); /* a second delivery would arrive here */
    pba = pba_read();
    if (irq_count[dma_vec] != seen + 1)
        fail("%s: %u interrupts on vector 0x%x after unmasking, want exactly 1 (PBA 0x%x)", how,
             irq_count[dma_vec] - seen, dma_vec, pba);
    if (pba & bit)
        fail("%s: PBA 0x%x still has bit %u after the interrupt was delivered", how, pba, DMA_MSIX_ENTRY);
    print("vfio-gpu: %s: unmasked, 1 interrupt on vector 0x%x, PBA 0x%x\n", how, dma_vec, pba);
}

static void step_msix_mask(void)
{
    step = "msix-mask";
    wait_irq(0, irq_count[0], 5); /* settle: nothing left over from the DMA steps may count as a masked delivery */
    msix_mask_round(0);
    msix_mask_round(1);
    ok();
}

/* ---- peer-to-peer DMA (cmdline `p2p`) ---------------------------------------------- */

/* GPU1 (the first test GPU) DMAs to and from GPU2's BAR2 at IOVA = GPU2's BAR2 guest physical address, which vmm
 * maps in GPU1's DMA space with --device vfio-user=...,p2p=on.  What lands in GPU2's BAR2 (offsets in it):
 * [0x4000, 0x5000) p2p_pattern (written by the guest, read by GPU1); [size - 0xC000 - 64, size - 0xC000) and
 * [size - 0xB000, size - 0xB000 + 64) GUARD; [size - 0xC000, size - 0xB000) dword i = p2p_ram_pattern(i) (GPU1's
 * COPY from guest RAM). */
#define P2P_LEN 4096u
#define P2P_SRC_OFF 0x4000ull
#define P2P_DST_FROM_END 0xC000ull

static uint32_t p2p_pattern(uint64_t off) { return (uint32_t)off ^ ((uint32_t)(off >> 32) << 24) ^ 0x2D000000u; }
static uint32_t p2p_ram_pattern(uint32_t i) { return 0x5EE20000u ^ (i * 0x85EBCA6Bu); }

static volatile uint32_t *phys_map(const char *what, uint64_t phys, uint32_t len)
{
    uintptr_t va = paging_map(phys, len);
    if (!va)
        fail("cannot map %s at phys 0x%X (%u bytes; physical address width %u bits)", what, phys, len,
             paging_phys_bits());
    return (volatile uint32_t *)va;
}

static void step_p2p(void)
{
    step = "p2p";
    /* Settle: interrupts raised for the failed DMAs of dma-errors (tolerated there) must not count as GPU1's. */
    if (irq_mode != IRQ_POLL)
        wait_irq(0, irq_count[0], 10);
    const struct pci_func *peer = 0;
    int n_gpus = 0;
    for (int i = 0; i < n_funcs; i++)
        if (funcs[i].vendor == GPU_VENDOR && funcs[i].device == GPU_DEVICE && n_gpus++ == 1)
            peer = &funcs[i];
    if (gpu->vendor != GPU_VENDOR || gpu->device != GPU_DEVICE || !peer) {
        for (int i = 0; i < n_funcs; i++)
            print("vfio-gpu: pci 00:%02x.%u %04x:%04x\n", funcs[i].dev, funcs[i].fn, funcs[i].vendor, funcs[i].device);
        fail("p2p needs two %04x:%04x functions on bus 0 (the first drives DMA, the second's BAR2 is the peer), found "
             "%u; start vmm with two --device vfio-user=", GPU_VENDOR, GPU_DEVICE, (uint32_t)n_gpus);
    }
    const struct pci_bar *pb0 = &peer->bar[0], *pb2 = &peer->bar[2];
    print("vfio-gpu: p2p: GPU1 00:%02x.%u drives DMA; GPU2 00:%02x.%u bar0 0x%X size 0x%X, bar2 0x%X size 0x%X\n",
          gpu->dev, gpu->fn, peer->dev, peer->fn, pb0->base, pb0->size, pb2->base, pb2->size);
    if (pb0->is_io || pb0->is_64 || pb0->size < 0x1000 || pb0->base == 0 || pb0->base + pb0->size > 1ull << 32)
        fail("GPU2 BAR0 must be 32-bit memory below 4 GiB (is_io %u is_64 %u)", pb0->is_io, pb0->is_64);
    if (pb2->is_io || !pb2->is_64 || pb2->size < 0x10000 || pb2->base < 4 * GIB ||
        (paging_phys_bits() < 64 && pb2->base + pb2->size > 1ull << paging_phys_bits()))
        fail("GPU2 BAR2 must be 64-bit memory of at least 64 KiB above 4 GiB within the %u-bit physical width "
             "(is_io %u is_64 %u)", paging_phys_bits(), pb2->is_io, pb2->is_64);
    pci_enable(peer, 0);
    uint16_t cmd = pci_read16(peer, PCI_COMMAND);
    if ((cmd & (PCI_CMD_MEM | PCI_CMD_MASTER)) != (PCI_CMD_MEM | PCI_CMD_MASTER))
        fail("GPU2 command register 0x%x lacks memory space (bit 1) or bus master (bit 2)", cmd);
    uint32_t peer_bar0 = (uint32_t)pb0->base;
    uint32_t id = mmio_read32(peer_bar0 + REG_ID);
    uint64_t size = mmio_read32(peer_bar0 + REG_BAR2_SIZE_LO) | (uint64_t)mmio_read32(peer_bar0 + REG_BAR2_SIZE_HI) << 32;
    if (id != GPU_ID || size != pb2->size)
        fail("GPU2 registers: ID 0x%x (want 0x%x), BAR2_SIZE 0x%X (the BAR sized as 0x%X)", id, GPU_ID, size, pb2->size);

    /* GPU2 BAR2 -> guest RAM: the guest writes the pattern through its mapping, GPU1 copies it from the BAR's IOVA. */
    uint64_t src = pb2->base + P2P_SRC_OFF;
    volatile uint32_t *p = phys_map("GPU2 BAR2", src, P2P_LEN);
    for (uint32_t i = 0; i < P2P_LEN / 4; i++)
        p[i] = p2p_pattern(P2P_SRC_OFF + 4 * i);
    fill_buf(&buf2, 0);
    dma_hint = "GPU1 cannot reach GPU2's BAR2 at that IOVA: vmm must map the peer's BARs into GPU1's DMA space at "
               "IOVA = guest physical address (--device vfio-user=GPU1.sock,p2p=on)";
    print("vfio-gpu: p2p: GPU1 COPY 0x%x bytes from GPU2 BAR2 offset 0x%X (IOVA 0x%X) to RAM IOVA 0x%x\n", P2P_LEN,
          P2P_SRC_OFF, src, iova(buf2.d));
    dma_ok("p2p COPY GPU2 BAR2 -> RAM", CMD_COPY, src, iova(buf2.d), P2P_LEN, 0);
    for (uint32_t i = 0; i < BUF_DWORDS; i++)
        check_dword("p2p COPY GPU2 BAR2 -> RAM", &buf2, i, i < P2P_LEN / 4 ? p2p_pattern(P2P_SRC_OFF + 4 * i) : 0);
    check_guard("p2p COPY GPU2 BAR2 -> RAM, past the end", &buf2);

    /* Guest RAM -> GPU2 BAR2: GPU1 copies into the BAR's IOVA (above 4 GiB into the BAR when it is over 4 GiB),
     * the guest reads it back through its mapping; 64 guard bytes either side stay. */
    uint64_t dst_off = pb2->size - P2P_DST_FROM_END, dst = pb2->base + dst_off;
    fill_buf(&buf1, p2p_ram_pattern);
    p = phys_map("GPU2 BAR2", dst - BLOCK, P2P_LEN + 2 * BLOCK);
    for (uint32_t i = 0; i < (P2P_LEN + 2 * BLOCK) / 4; i++)
        p[i] = GUARD;
    print("vfio-gpu: p2p: GPU1 COPY 0x%x bytes from RAM IOVA 0x%x to GPU2 BAR2 offset 0x%X (IOVA 0x%X)\n", P2P_LEN,
          iova(buf1.d), dst_off, dst);
    dma_ok("p2p COPY RAM -> GPU2 BAR2", CMD_COPY, iova(buf1.d), dst, P2P_LEN, 0);
    dma_hint = 0;
    p = phys_map("GPU2 BAR2", dst - BLOCK, P2P_LEN + 2 * BLOCK);
    for (uint32_t i = 0; i < (P2P_LEN + 2 * BLOCK) / 4; i++) {
        uint32_t k = i - BLOCK / 4; /* dword index in the copy (wraps for the guard before it) */
        uint32_t got = p[i], want = k < P2P_LEN / 4 ? p2p_ram_pattern(k) : GUARD;
        if (got != want)
            fail("p2p COPY RAM -> GPU2 BAR2: GPU2 BAR2 offset 0x%X (phys 0x%X) reads 0x%x, want 0x%x (%s)",
                 dst_off - BLOCK + 4 * i, dst - BLOCK + 4 * i, got, want, k < P2P_LEN / 4 ? "copied" : "guard");
    }
    /* The first copy's source is still there: the second went where it was sent. */
    p = phys_map("GPU2 BAR2", src, P2P_LEN);
    for (uint32_t i = 0; i < P2P_LEN / 4; i++)
        if (p[i] != p2p_pattern(P2P_SRC_OFF + 4 * i))
            fail("GPU2 BAR2 offset 0x%X reads 0x%x after the second copy, want 0x%x", P2P_SRC_OFF + 4 * i, p[i],
                 p2p_pattern(P2P_SRC_OFF + 4 * i));
    ok();
}

/* ---- main ------------------------------------------------------------------------ */

struct mb_info { uint32_t flags, mem_lower, mem_upper, boot_device, cmdline; };

void __attribute__((noreturn)) guest_main(uint32_t magic, const struct mb_info *mi)
{
    uart_init();
    print("vfio-gpu: start\n");
    if (magic != MB_BOOT_MAGIC)
        fail("multiboot magic 0x%x", magic);
    if ((mi->flags & 4) && mi->cmdline) {
        const char *c = (const char *)mi->cmdline;
        for (uint32_t i = 0; c[i] && i + 1 < sizeof(cmdline); i++)
            cmdline[i] = c[i];
    }
    print("vfio-gpu: cmdline: %s\n", cmdline);
    if (mi->flags & 1)
        print("vfio-gpu: memory %u KiB above 1 MiB\n", mi->mem_upper);

    uint32_t vendor = GPU_VENDOR, device = GPU_DEVICE;
    const char *a = find_arg(cmdline, "device="), *end;
    if (a) {
        vendor = parse_hex(a, &end);
        device = *end == ':' ? parse_hex(end + 1, &end) : 0x10000;
        if (vendor > 0xFFFF || device > 0xFFFF || (*end && *end != ' '))
            fail("device= wants VVVV:DDDD in hex");
    }
    const char *tests = find_arg(cmdline, "tests=");
    int generic = tests && list_has(tests, "bar-only");
    int t_regs = !tests || list_has(tests, "regs"), t_sram = !tests || list_has(tests, "sram");
    int t_bar2 = !tests || generic || list_has(tests, "bar2"), t_dma = !tests || list_has(tests, "dma");
    int t_errors = !tests || list_has(tests, "errors");
    int t_p2p = has_token(cmdline, "p2p") || (tests && list_has(tests, "p2p")); /* never by default */
    if (generic)
        t_regs = t_sram = t_dma = t_errors = t_p2p = 0;
    const char *irq = find_arg(cmdline, "irq=");
    irq_mode = !irq || list_has(irq, "msix") ? IRQ_MSIX : list_has(irq, "msi") ? IRQ_MSI
             : list_has(irq, "intx") ? IRQ_INTX : list_has(irq, "poll") ? IRQ_POLL
             : (fail("irq= wants msix, msi, intx or poll"), IRQ_POLL);
    const char *gsi = find_arg(cmdline, "intx-gsi=");
    if (gsi) {
        intx_gsi = 0;
        for (; *gsi >= '0' && *gsi <= '9'; gsi++)
            intx_gsi = intx_gsi * 10 + (uint32_t)(*gsi - '0');
    }
    print("vfio-gpu: device %04x:%04x tests:%s%s%s%s%s%s%s irq %s\n", vendor, device, generic ? " bar-only" : "",
          t_regs ? " regs" : "", t_sram ? " sram" : "", t_bar2 ? " bar2" : "", t_dma ? " dma" : "",
          t_errors ? " errors" : "", t_p2p ? " p2p" : "", irq_mode == IRQ_MSIX ? "msix" : irq_mode == IRQ_MSI ? "msi" : irq_mode == IRQ_INTX ? "intx" : "poll");

    idt_init();
    pic_mask_all();
    pit2_gate_on();
    apic_id = lapic_enable(VEC_WATCHDOG);

    step_find(vendor, device, generic);
    step_bars(generic);
    step_paging();
    if (t_regs)
        step_regs();
    if (t_sram)
        step_sram();
    if (t_bar2)
        step_bar2();
    if (t_dma || t_errors || t_p2p)
        step_irq();
    if (t_dma)
        step_dma();
    if (t_dma && irq_mode == IRQ_MSIX)
        step_msix_mask();
    if (t_errors)
        step_errors();
    if (t_p2p)
        step_p2p();

    step = "interrupts";
    /* Settle: an interrupt the device raised for a failed DMA (the spec leaves that open) arrives here. */
    if (irq_mode != IRQ_POLL && (t_dma || t_errors || t_p2p))
        wait_irq(0, irq_count[0], 10);
    uint32_t others = 0, last = 0;
    for (uint32_t v = 32; v < 256; v++)
        if (irq_count[v] && v != dma_vec)
            others += irq_count[v], last = v;
    if (t_dma || t_errors || t_p2p)
        print("vfio-gpu: DMA_COUNT %u IRQ_COUNT %u, interrupts on vector 0x%x: %u\n", reg_read(REG_DMA_COUNT),
              reg_read(REG_IRQ_COUNT), dma_vec, irq_count[dma_vec]);
    if (others)
        fail("%u interrupts on other vectors (last 0x%x)", others, last);
    ok();
    print("vfio-gpu: all ok\n");
    exit_vm(0);
}
