/*
 * PCI for the test guests: configuration access through 0xCF8/0xCFC, bus 0
 * enumeration with BAR sizing, capability walking, and ECAM (found through the
 * ACPI MCFG table).  The guest runs flat (no paging), so ECAM and BARs in the
 * 32-bit hole are used by their physical address.  BARs are never reassigned:
 * the VMM (or the firmware under QEMU) owns the layout.
 */
#ifndef GUEST_PCI_H
#define GUEST_PCI_H

#include <stdint.h>

#define PCI_VENDOR 0x00
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_CLASS_REV 0x08
#define PCI_HEADER_TYPE 0x0E
#define PCI_BAR0 0x10
#define PCI_CAP_PTR 0x34
#define PCI_INT_LINE 0x3C
#define PCI_INT_PIN 0x3D
#define PCI_CMD_IO 0x0001
#define PCI_CMD_MEM 0x0002
#define PCI_CMD_MASTER 0x0004
#define PCI_CMD_INTX_DISABLE 0x0400
#define PCI_STATUS_CAP_LIST 0x0010
#define PCI_CAP_MSI 0x05
#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_PCIE 0x10
#define PCI_CAP_MSIX 0x11

struct pci_bar {
    uint64_t base;   /* decoded address (I/O port or memory) */
    uint64_t size;   /* from the all-ones sizing write; 0 = BAR not implemented */
    uint8_t is_io, is_64, prefetch;
};

struct pci_func {
    uint8_t bus, dev, fn, header_type; /* header_type without the multifunction bit */
    uint16_t vendor, device;
    uint32_t class_rev;                /* class << 8 | revision */
    uint8_t int_pin, int_line, nbars;
    uint32_t bar_raw[6];               /* register values as found (before sizing) */
    struct pci_bar bar[6];             /* bar[i+1] of a 64-bit BAR i is folded into bar[i] */
};

uint32_t pci_read32(const struct pci_func *f, uint32_t off);
uint16_t pci_read16(const struct pci_func *f, uint32_t off);
uint8_t pci_read8(const struct pci_func *f, uint32_t off);
void pci_write32(const struct pci_func *f, uint32_t off, uint32_t v);
void pci_write16(const struct pci_func *f, uint32_t off, uint16_t v);
void pci_write8(const struct pci_func *f, uint32_t off, uint8_t v);

/* Fills out[] with every function on bus 0 (BARs sized with decode disabled
 * while sizing, command register restored); returns how many. */
int pci_enumerate(struct pci_func *out, int max);

/* First capability with this ID at or after `from` in the list (0 = from the
 * head), or 0. pci_cap_next: the capability after `cap` (0 = first), or 0. */
uint8_t pci_cap_next(const struct pci_func *f, uint8_t cap);
uint8_t pci_find_cap(const struct pci_func *f, uint8_t id, uint8_t after);

/* Sets Memory Space and Bus Master (and I/O if asked) in the command register. */
void pci_enable(const struct pci_func *f, int io);

/* CPU address of [off, off + len) in memory BAR `bar` if the whole BAR lies below 4 GiB (the guests run
 * flat or identity-mapped there), else 0. */
uintptr_t pci_bar_addr(const struct pci_func *f, uint8_t bar, uint32_t off, uint32_t len);

/* MSI-X (PCI Local Bus 3.0 §6.8.2). Messages go to the xAPIC: address 0xFEE00000 | apic_id << 12
 * (physical destination), data = vector (fixed delivery, edge). */
struct pci_msix {
    uint8_t cap;                /* config offset of the capability, 0 if there is none */
    uint16_t size;              /* table entries */
    uint32_t table_reg, pba_reg; /* BIR in bits 2:0, offset in the rest */
    uintptr_t table;            /* the table's address, 0 if its BAR is not reachable */
};
/* Reads the capability and maps the table; returns 1 if both worked (m->cap tells a missing capability
 * from an unreachable table). */
int pci_msix_find(const struct pci_func *f, struct pci_msix *m);
void pci_msix_set_entry(const struct pci_msix *m, uint32_t entry, uint32_t apic_id, uint8_t vector, int masked);
/* Entries 0..n-1 -> vector_base + entry, unmasked; then MSI-X enable on, function mask off. */
void pci_msix_enable(const struct pci_func *f, const struct pci_msix *m, uint32_t n, uint32_t apic_id,
                     uint8_t vector_base);
void pci_msix_disable(const struct pci_func *f, const struct pci_msix *m);

/* MSI (§6.8.1), one vector: address/data as for MSI-X, multiple-message enable 0, MSI enable on.
 * Returns the capability's offset, or 0 if the function has none. */
uint8_t pci_msi_enable(const struct pci_func *f, uint32_t apic_id, uint8_t vector);

/* ACPI: RSDP in 0xE0000-0xFFFFF -> RSDT/XSDT -> MCFG.  Returns 1 and the
 * segment-0 ECAM base and bus range if found. */
int acpi_find_mcfg(uint64_t *base, uint8_t *bus_start, uint8_t *bus_end);
/* Address of the (checksummed) ACPI table with this signature, e.g. "FACP", or 0. */
uint32_t acpi_find_table(const char *sig);

#endif
