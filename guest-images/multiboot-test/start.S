/*
 * multiboot-test: 32-bit entry point.
 *
 * Multiboot v1 header (ELF image, so no a.out address kludge), our own flat
 * GDT (the loader's GDTR is not guaranteed valid), a 16 KiB stack, and 48
 * interrupt stubs (vectors 0-31 exceptions, 0x20-0x2F remapped PIC IRQs)
 * that all funnel into isr_dispatch(uint32_t *frame) in guest.c.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003          /* bit 0: page-align modules, bit 1: memory info */

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .text
        .code32
        .globl _start
_start:
        cli
        cld
        mov     $stack_top, %esp
        mov     %eax, %esi                 /* multiboot magic (0x2BADB002) */
        mov     %ebx, %edi                 /* physical address of multiboot_info */
        lgdt    gdt_desc
        ljmp    $0x08, $1f
1:      mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        pushl   $0x2                       /* clean EFLAGS (IF=0, DF=0) */
        popfl
        push    %edi
        push    %esi
        call    guest_main                 /* guest_main(magic, info) does not return */
2:      cli
        hlt
        jmp     2b

/* One stub per vector: push the vector number, then the common path. */
        .macro isr_stub n
isr_\n:
        pushl   $\n
        jmp     isr_common
        .endm
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
        isr_stub \n
        .endr

/* Stack on entry to isr_dispatch's frame: 8 pushal regs, vector, [error code], eip, cs, eflags. */
isr_common:
        pushal
        cld
        push    %esp
        call    isr_dispatch
        add     $4, %esp
        popal
        add     $4, %esp                   /* drop vector (IRQ vectors push no error code) */
        iret

        .section .rodata
        .align 4
        .globl isr_stub_table
isr_stub_table:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
        .long   isr_\n
        .endr

        .align 8
gdt:    .quad   0
        .quad   0x00CF9B000000FFFF         /* 0x08: flat 32-bit code, accessed bit preset */
        .quad   0x00CF93000000FFFF         /* 0x10: flat 32-bit data, accessed bit preset */
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt

        .bss
        .align 16
stack:  .skip   16384
stack_top:

        .section .note.GNU-stack, "", @progbits
