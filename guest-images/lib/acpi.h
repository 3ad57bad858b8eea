/*
 * Finding ACPI tables from a 32-bit flat guest: checksums, signatures and the
 * RSDT/XSDT walk (ACPI 6.x §5.2). Shared by lib/pci.c (MCFG, FACP) and smp-test.
 */
#ifndef GUEST_ACPI_H
#define GUEST_ACPI_H

#include <stdint.h>

static inline uint8_t acpi_sum8(const uint8_t *p, uint32_t n)
{
    uint8_t s = 0;
    while (n--)
        s = (uint8_t)(s + *p++);
    return s;
}

static inline int acpi_sig_is(const uint8_t *p, const char *sig)
{
    for (; *sig; p++, sig++)
        if (*p != (uint8_t)*sig)
            return 0;
    return 1;
}

static inline uint32_t acpi_rd32(const uint8_t *p) { return *(const uint32_t *)p; }

/* A table header at addr with this signature, a sane length and a zero checksum. */
static inline int acpi_table_ok(uint32_t addr, const char *sig)
{
    const uint8_t *t = (const uint8_t *)addr;
    if (addr < 0x1000 || !acpi_sig_is(t, sig))
        return 0;
    uint32_t len = acpi_rd32(t + 4);
    return len >= 36 && len <= 0x10000 && acpi_sum8(t, len) == 0;
}

/* The valid table with this signature listed in an RSDT (esize 4) or XSDT (esize 8), or 0. */
static inline uint32_t acpi_sdt_find(uint32_t sdt, uint32_t esize, const char *sig)
{
    const uint8_t *t = (const uint8_t *)sdt;
    uint32_t n = (acpi_rd32(t + 4) - 36) / esize;
    for (uint32_t i = 0; i < n && i < 64; i++) {
        const uint8_t *e = t + 36 + i * esize;
        if (esize == 8 && acpi_rd32(e + 4) != 0)
            continue; /* above 4 GiB */
        if (acpi_table_ok(acpi_rd32(e), sig))
            return acpi_rd32(e);
    }
    return 0;
}

#endif
