/*
 * smp-test: 32-bit BSP entry, 16-bit AP trampoline, AP 32-bit entry and
 * interrupt stubs.
 *
 * BSP: multiboot v1 header (ELF image), our own flat GDT, 16 KiB stack, then
 * guest_main(magic, info).
 *
 * APs: guest.c copies ap_tramp_start..ap_tramp_end to TRAMP_BASE (0x70000) and
 * sends SIPI vector 0x70, so an AP starts in real mode at CS=0x7000, IP=0.  The
 * trampoline loads the main GDT (through a GDTR kept inside the trampoline),
 * sets CR0.PE and far-jumps straight to ap_entry32 in the 1 MiB image, which
 * takes a per-AP 4 KiB stack (slot from lock xadd on ap_next_slot) and calls
 * ap_main(slot).
 *
 * Interrupts: 256 stubs, 16 bytes apart (isr_stubs + 16 * vector), each pushes
 * its vector and funnels into isr_dispatch(uint32_t *frame) in guest.c.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003          /* bit 0: page-align modules, bit 1: memory info */
        .set MAX_APS, 15                   /* keep in sync with MAX_CPUS - 1 in guest.c */
        .set AP_STACK_SIZE, 4096

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

/* AP, 32-bit protected mode, CS=0x08 (from the trampoline's far jump). */
        .globl ap_entry32
ap_entry32:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        mov     $1, %eax
        lock xaddl %eax, ap_next_slot      /* eax = this AP's slot (0, 1, ...) */
        cmp     $MAX_APS, %eax
        jae     3f                         /* more APs than stacks: park */
        lea     1(%eax), %ecx
        shl     $12, %ecx                  /* (slot + 1) * AP_STACK_SIZE */
        lea     ap_stacks(%ecx), %esp
        pushl   $0x2
        popfl
        push    %eax
        call    ap_main                    /* ap_main(slot) does not return */
3:      cli
        hlt
        jmp     3b

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

/*
 * AP trampoline: position independent apart from the GDTR it loads (which
 * holds the absolute address of gdt) and the far jump to ap_entry32.  Runs at
 * CS:IP = 0x7000:0000; DS = CS makes the GDTR addressable by its offset.
 */
        .section .rodata
        .balign 16
        .globl ap_tramp_start, ap_tramp_end
        .code16
ap_tramp_start:
        cli
        cld
        mov     %cs, %ax
        mov     %ax, %ds
        lgdtl   tramp_gdtr - ap_tramp_start   /* 32-bit base: the GDT is above 1 MiB */
        mov     %cr0, %eax
        or      $1, %eax                   /* PE */
        mov     %eax, %cr0
        ljmpl   $0x08, $ap_entry32
        .balign 4
tramp_gdtr:
        .word   gdt_end - gdt - 1
        .long   gdt
ap_tramp_end:
        .code32

        .balign 8
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
        .balign 16
ap_stacks:
        .skip   MAX_APS * AP_STACK_SIZE
        .balign 4
        .globl ap_next_slot
ap_next_slot:
        .skip   4

        .section .note.GNU-stack, "", @progbits
