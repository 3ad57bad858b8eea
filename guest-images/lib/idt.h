/*
 * The interrupt descriptor table of the test guests: 256 32-bit interrupt
 * gates (DPL 0, code selector 0x08) onto lib/entry.S's isr_stubs, which all
 * funnel into the guest's isr_dispatch(uint32_t *frame).
 */
#ifndef GUEST_IDT_H
#define GUEST_IDT_H

/* Fills the table and loads it on this CPU. */
void idt_init(void);
/* Loads the (already filled) table on this CPU: for application processors. */
void idt_load(void);

#endif
