/* PCI configuration access, bus 0 enumeration, BAR sizing, capabilities, MCFG. See pci.h. */
#include "pci.h"
#include "acpi.h"
#include "x86.h"

#define PCI_ADDR 0xCF8
#define PCI_DATA 0xCFC

static uint32_t cfg_addr(const struct pci_func *f, uint32_t off)
{
    return 0x80000000u | (uint32_t)f->bus << 16 | (uint32_t)f->dev << 11 | (uint32_t)f->fn << 8 | (off & 0xFC);
}

uint32_t pci_read32(const struct pci_func *f, uint32_t off)
{
    outl(PCI_ADDR, cfg_addr(f, off));
    return inl(PCI_DATA);
}
uint16_t pci_read16(const struct pci_func *f, uint32_t off)
{
    outl(PCI_ADDR, cfg_addr(f, off));
    return inw((uint16_t)(PCI_DATA + (off & 2)));
}
uint8_t pci_read8(const struct pci_func *f, uint32_t off)
{
    outl(PCI_ADDR, cfg_addr(f, off));
    return inb((uint16_t)(PCI_DATA + (off & 3)));
}
void pci_write32(const struct pci_func *f, uint32_t off, uint32_t v)
{
    outl(PCI_ADDR, cfg_addr(f, off));
    outl(PCI_DATA, v);
}
void pci_write16(const struct pci_func *f, uint32_t off, uint16_t v)
{
    outl(PCI_ADDR, cfg_addr(f, off));
    outw((uint16_t)(PCI_DATA + (off & 2)), v);
}
void pci_write8(const struct pci_func *f, uint32_t off, uint8_t v)
{
    outl(PCI_ADDR, cfg_addr(f, off));
    outb((uint16_t)(PCI_DATA + (off & 3)), v);
}

/* Size and decode the BARs; decode is off while a BAR holds all-ones. */
static void size_bars(struct pci_func *f)
{
    f->nbars = f->header_type == 0 ? 6 : f->header_type == 1 ? 2 : 0;
    uint16_t cmd = pci_read16(f, PCI_COMMAND);
    for (int i = 0; i < f->nbars; i++)
        f->bar_raw[i] = pci_read32(f, PCI_BAR0 + 4u * (uint32_t)i);
    if (f->nbars)
        pci_write16(f, PCI_COMMAND, (uint16_t)(cmd & ~(PCI_CMD_IO | PCI_CMD_MEM)));
    for (int i = 0; i < f->nbars; i++) {
        uint32_t off = PCI_BAR0 + 4u * (uint32_t)i, orig = f->bar_raw[i];
        struct pci_bar *b = &f->bar[i];
        pci_write32(f, off, 0xFFFFFFFFu);
        uint32_t mask = pci_read32(f, off);
        pci_write32(f, off, orig);
        if (orig & 1) { /* I/O */
            b->is_io = 1;
            b->base = orig & 0xFFFFFFFCu;
            mask &= 0xFFFCu; /* the upper 16 bits of an I/O BAR may read as zero */
            if (mask)
                b->size = ~(mask | 0xFFFF0000u) + 1;
            continue;
        }
        b->prefetch = (orig >> 3) & 1;
        uint64_t m = mask & 0xFFFFFFF0u;
        b->base = orig & 0xFFFFFFF0u;
        if (((orig >> 1) & 3) == 2 && i + 1 < f->nbars) { /* 64-bit: the next register is the high half */
            b->is_64 = 1;
            uint32_t hi_off = off + 4, hi = pci_read32(f, hi_off);
            f->bar_raw[i + 1] = hi;
            pci_write32(f, hi_off, 0xFFFFFFFFu);
            uint32_t hmask = pci_read32(f, hi_off);
            pci_write32(f, hi_off, hi);
            b->base |= (uint64_t)hi << 32;
            m |= (uint64_t)hmask << 32;
            if (m) /* a BAR of 4 GiB or more has no size bits in its low half */
                b->size = ~m + 1;
            i++;
        } else if (m) {
            m |= 0xFFFFFFFF00000000ull;
            b->size = ~m + 1;
        }
    }
    if (f->nbars)
        pci_write16(f, PCI_COMMAND, cmd);
}

int pci_enumerate(struct pci_func *out, int max)
{
    int n = 0;
    for (uint8_t dev = 0; dev < 32; dev++) {
        for (uint8_t fn = 0; fn < 8 && n < max; fn++) {
            struct pci_func *f = &out[n];
            for (uint32_t i = 0; i < sizeof(*f); i++)
                ((uint8_t *)f)[i] = 0;
            f->bus = 0, f->dev = dev, f->fn = fn;
            uint32_t id = pci_read32(f, PCI_VENDOR);
            if ((id & 0xFFFF) == 0xFFFF) {
                if (fn == 0)
                    break;
                continue;
            }
            uint8_t ht = pci_read8(f, PCI_HEADER_TYPE);
            f->vendor = (uint16_t)id;
            f->device = (uint16_t)(id >> 16);
            f->class_rev = pci_read32(f, PCI_CLASS_REV);
            f->header_type = ht & 0x7F;
            f->int_line = pci_read8(f, PCI_INT_LINE);
            f->int_pin = pci_read8(f, PCI_INT_PIN);
            size_bars(f);
            n++;
            if (fn == 0 && !(ht & 0x80))
                break; /* single-function device */
        }
    }
    return n;
}

uint8_t pci_cap_next(const struct pci_func *f, uint8_t cap)
{
    if (cap == 0)
        return (pci_read16(f, PCI_STATUS) & PCI_STATUS_CAP_LIST) ? pci_read8(f, PCI_CAP_PTR) & 0xFC : 0;
    return pci_read8(f, cap + 1u) & 0xFC;
}

uint8_t pci_find_cap(const struct pci_func *f, uint8_t id, uint8_t after)
{
    uint8_t c = pci_cap_next(f, after);
    for (int guard = 0; c >= 0x40 && guard < 48; guard++, c = pci_cap_next(f, c))
        if (pci_read8(f, c) == id)
            return c;
    return 0;
}

void pci_enable(const struct pci_func *f, int io)
{
    uint16_t cmd = pci_read16(f, PCI_COMMAND);
    cmd |= PCI_CMD_MEM | PCI_CMD_MASTER | (io ? PCI_CMD_IO : 0);
    pci_write16(f, PCI_COMMAND, cmd);
}

uintptr_t pci_bar_addr(const struct pci_func *f, uint8_t bar, uint32_t off, uint32_t len)
{
    if (bar > 5 || f->bar[bar].is_io || f->bar[bar].size == 0)
        return 0;
    const struct pci_bar *b = &f->bar[bar];
    if (b->base == 0 || b->base + b->size > 0x100000000ull || (uint64_t)off + len > b->size)
        return 0;
    return (uintptr_t)b->base + off;
}

/* ---- MSI-X and MSI ------------------------------------------------------ */

#define MSI_ADDR(apic_id) (0xFEE00000u | (apic_id) << 12)

int pci_msix_find(const struct pci_func *f, struct pci_msix *m)
{
    m->cap = pci_find_cap(f, PCI_CAP_MSIX, 0);
    m->size = 0;
    m->table_reg = m->pba_reg = 0;
    m->table = 0;
    if (!m->cap)
        return 0;
    m->size = (uint16_t)((pci_read16(f, m->cap + 2u) & 0x7FF) + 1);
    m->table_reg = pci_read32(f, m->cap + 4u);
    m->pba_reg = pci_read32(f, m->cap + 8u);
    m->table = pci_bar_addr(f, (uint8_t)(m->table_reg & 7), m->table_reg & ~7u, 16u * m->size);
    return m->table != 0;
}

void pci_msix_set_entry(const struct pci_msix *m, uint32_t entry, uint32_t apic_id, uint8_t vector, int masked)
{
    volatile uint32_t *e = (volatile uint32_t *)(m->table + 16 * entry);
    e[0] = MSI_ADDR(apic_id); /* fixed, physical destination */
    e[1] = 0;
    e[2] = vector;            /* edge, fixed delivery */
    e[3] = masked ? 1 : 0;    /* vector control: bit 0 masks */
}

void pci_msix_enable(const struct pci_func *f, const struct pci_msix *m, uint32_t n, uint32_t apic_id,
                     uint8_t vector_base)
{
    for (uint32_t i = 0; i < n && i < m->size; i++)
        pci_msix_set_entry(m, i, apic_id, (uint8_t)(vector_base + i), 0);
    uint16_t ctrl = pci_read16(f, m->cap + 2u);
    pci_write16(f, m->cap + 2u, (uint16_t)((ctrl | 0x8000) & ~0x4000)); /* enable on, function mask off */
}

void pci_msix_disable(const struct pci_func *f, const struct pci_msix *m)
{
    pci_write16(f, m->cap + 2u, (uint16_t)(pci_read16(f, m->cap + 2u) & ~0x8000));
}

uint8_t pci_msi_enable(const struct pci_func *f, uint32_t apic_id, uint8_t vector)
{
    uint8_t c = pci_find_cap(f, PCI_CAP_MSI, 0);
    if (!c)
        return 0;
    uint16_t ctrl = pci_read16(f, c + 2u);
    int is64 = (ctrl >> 7) & 1;
    pci_write32(f, c + 4u, MSI_ADDR(apic_id));
    if (is64)
        pci_write32(f, c + 8u, 0);
    pci_write16(f, c + (is64 ? 12u : 8u), vector);
    pci_write16(f, c + 2u, (uint16_t)((ctrl & ~0x70) | 1)); /* one message, enable */
    return c;
}

/* ---- ACPI MCFG ---------------------------------------------------------- */

uint32_t acpi_find_table(const char *sig)
{
    const uint8_t *rsdp = 0;
    for (uint32_t a = 0xE0000; a < 0x100000 && !rsdp; a += 16) {
        const uint8_t *p = (const uint8_t *)a;
        if (acpi_rd32(p) == 0x20445352u && acpi_sig_is(p, "RSD PTR ") && acpi_sum8(p, 20) == 0)
            rsdp = p;
    }
    if (!rsdp)
        return 0;
    uint32_t t = 0;
    if (rsdp[15] >= 2 && acpi_rd32(rsdp + 28) == 0 && acpi_table_ok(acpi_rd32(rsdp + 24), "XSDT"))
        t = acpi_sdt_find(acpi_rd32(rsdp + 24), 8, sig);
    if (!t && acpi_table_ok(acpi_rd32(rsdp + 16), "RSDT"))
        t = acpi_sdt_find(acpi_rd32(rsdp + 16), 4, sig);
    return t;
}

int acpi_find_mcfg(uint64_t *base, uint8_t *bus_start, uint8_t *bus_end)
{
    uint32_t mcfg = acpi_find_table("MCFG");
    if (!mcfg)
        return 0;
    const uint8_t *t = (const uint8_t *)mcfg;
    uint32_t len = acpi_rd32(t + 4);
    for (uint32_t off = 44; off + 16 <= len; off += 16) { /* 36-byte header + 8 reserved, 16-byte entries */
        const uint8_t *e = t + off;
        if (*(const uint16_t *)(e + 8) != 0)
            continue; /* segment group */
        *base = *(const uint64_t *)e;
        *bus_start = e[10];
        *bus_end = e[11];
        return 1;
    }
    return 0;
}
