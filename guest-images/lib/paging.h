/*
 * PAE paging for the 32-bit test guests (Intel SDM vol. 3A §4.4), so they can
 * reach physical addresses above 4 GiB (e.g. a 64-bit BAR the VMM placed
 * high).  paging_init identity-maps the low 4 GiB with 2 MiB pages (so RAM,
 * the LAPIC and BARs below 4 GiB keep their addresses; 3-4 GiB is uncached)
 * and reserves the virtual range [PAGING_WINDOW_VA, + 1 GiB) as a window that
 * paging_map points at any 2 MiB-aligned 1 GiB of physical address space
 * (uncached, as device memory wants).  The guest's own RAM must stay below
 * PAGING_WINDOW_VA (the guests run in the first few MiB).
 */
#ifndef GUEST_PAGING_H
#define GUEST_PAGING_H

#include <stdint.h>

#define PAGING_WINDOW_VA 0x40000000u
#define PAGING_WINDOW_SIZE 0x40000000u
#define PAGING_LARGE_PAGE 0x200000u

/* Builds the tables and turns paging on (CR4.PAE, CR3, CR0.PG).  Returns 0, or why it cannot (no PAE). */
const char *paging_init(void);
/* Physical address width from CPUID 0x80000008 (36 when the leaf is missing). */
uint32_t paging_phys_bits(void);
/* Virtual address of [phys, phys + len), moving the window there if it does not already cover it (and
 * flushing the TLB).  0 if len does not fit in one window or the range is beyond the physical width. */
uintptr_t paging_map(uint64_t phys, uint32_t len);
/* Physical address the window starts at now (all-ones before the first paging_map). */
uint64_t paging_window_base(void);

#endif
