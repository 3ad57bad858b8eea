/* The test guests' IDT. See idt.h. */
#include <stdint.h>
#include "idt.h"

struct idt_gate {
    uint16_t off_lo, sel;
    uint8_t zero, type;
    uint16_t off_hi;
} __attribute__((packed));

static struct idt_gate idt[256];
static struct { uint16_t limit; uint32_t base; } __attribute__((packed)) idtr;
extern const uint8_t isr_stubs[]; /* 256 stubs, 16 bytes apart (entry.S) */

void idt_load(void) { __asm__ volatile("lidt %0" : : "m"(idtr)); }

void idt_init(void)
{
    for (int i = 0; i < 256; i++) {
        uint32_t a = (uint32_t)isr_stubs + 16u * (uint32_t)i;
        idt[i].off_lo = (uint16_t)a;
        idt[i].sel = 0x08;
        idt[i].zero = 0;
        idt[i].type = 0x8E; /* present, DPL 0, 32-bit interrupt gate */
        idt[i].off_hi = (uint16_t)(a >> 16);
    }
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (uint32_t)idt;
    idt_load();
}
