/*
 * Shared 32-bit entry of the test guests (virtio-test, smp-test).
 *
 * Multiboot v1 header (ELF image), our own flat GDT (the loader's GDTR is not
 * guaranteed valid), a 16 KiB stack, then guest_main(magic, info).  256
 * interrupt stubs, 16 bytes apart (isr_stubs + 16 * vector), each pushes its
 * vector and funnels into isr_dispatch(uint32_t *frame), which the guest
 * defines.  The GDT is global so smp-test's AP trampoline can load it; its
 * limit (three descriptors: null, 0x08 code, 0x10 data) is 23.
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

/* 256 interrupt stubs, 16 bytes apart: push the vector, then the common path. */
        .balign 16
        .globl isr_stubs
isr_stubs:
        .set vec, 0
        .rept 256
        .balign 16
        pushl   $vec
        jmp     isr_common
        .set vec, vec + 1
        .endr

/* Stack on entry to isr_dispatch's frame: 8 pushal regs, vector, [error code], eip, cs, eflags. */
isr_common:
        pushal
        cld
        push    %esp
        call    isr_dispatch
        add     $4, %esp
        popal
        add     $4, %esp                   /* drop vector (interrupt vectors push no error code) */
        iret

        .section .rodata
        .balign 8
        .globl gdt
gdt:    .quad   0
        .quad   0x00CF9B000000FFFF         /* 0x08: flat 32-bit code, accessed bit preset */
        .quad   0x00CF93000000FFFF         /* 0x10: flat 32-bit data, accessed bit preset */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

        .bss
        .balign 16
stack:  .skip   16384
stack_top:

        .section .note.GNU-stack, "", @progbits
