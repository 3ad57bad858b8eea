/* PAE paging with a movable 1 GiB window. See paging.h. */
#include "paging.h"

/* PAE entries: a PDPTE has only P, PWT, PCD and the address (its R/W and U/S bits are reserved); a 2 MiB
 * PDE has P, R/W, PWT, PCD, PS and the address in bits 51:21. */
#define PTE_P 0x001ull
#define PTE_RW 0x002ull
#define PTE_PWT 0x008ull
#define PTE_PCD 0x010ull
#define PTE_PS 0x080ull

static uint64_t pdpt[4] __attribute__((aligned(32)));
static uint64_t pd[4][512] __attribute__((aligned(4096)));
static uint64_t window_base = ~0ull;
static uint32_t phys_bits;

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

uint32_t paging_phys_bits(void) { return phys_bits; }
uint64_t paging_window_base(void) { return window_base; }

static void flush_tlb(void)
{
    uint32_t cr3;
    __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

const char *paging_init(void)
{
    uint32_t a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (!(d & (1u << 6)))
        return "cpuid.1:edx.pae clear";
    cpuid(0x80000000u, &a, &b, &c, &d);
    phys_bits = 36;
    if (a >= 0x80000008u) {
        cpuid(0x80000008u, &a, &b, &c, &d);
        phys_bits = a & 0xFF;
    }
    for (uint32_t g = 0; g < 4; g++) {
        /* 3-4 GiB holds the MMIO hole (LAPIC, IOAPIC, BARs): uncached, as the MTRRs of a PC make it. */
        uint64_t attrs = PTE_P | PTE_RW | PTE_PS | (g == 3 ? PTE_PCD | PTE_PWT : 0);
        for (uint32_t i = 0; i < 512; i++)
            pd[g][i] = ((uint64_t)g << 30 | (uint64_t)i << 21) | attrs;
        pdpt[g] = (uint32_t)pd[g] | PTE_P;
    }
    uint32_t cr0, cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4 | 0x20u) : "memory");   /* CR4.PAE */
    __asm__ volatile("mov %0, %%cr3" : : "r"((uint32_t)pdpt) : "memory"); /* loads the four PDPTEs */
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %0, %%cr0; jmp 1f; 1:" : : "r"(cr0 | 0x80000000u) : "memory"); /* CR0.PG */
    return 0;
}

uintptr_t paging_map(uint64_t phys, uint32_t len)
{
    if (len > PAGING_WINDOW_SIZE - PAGING_LARGE_PAGE || len == 0 || phys_bits == 0 || phys_bits > 52 ||
        phys + len > 1ull << phys_bits)
        return 0;
    if (window_base == ~0ull || phys < window_base || phys + len > window_base + PAGING_WINDOW_SIZE) {
        uint64_t base = phys & ~(uint64_t)(PAGING_LARGE_PAGE - 1);
        uint64_t *w = pd[PAGING_WINDOW_VA >> 30];
        for (uint32_t i = 0; i < 512; i++) {
            uint64_t p = base + (uint64_t)i * PAGING_LARGE_PAGE;
            /* Pages of the window past the physical width stay not-present (a PDE there would be reserved). */
            w[i] = p + PAGING_LARGE_PAGE <= 1ull << phys_bits ? p | PTE_P | PTE_RW | PTE_PS | PTE_PCD | PTE_PWT : 0;
        }
        window_base = base;
        flush_tlb();
    }
    return PAGING_WINDOW_VA + (uintptr_t)(phys - window_base);
}
