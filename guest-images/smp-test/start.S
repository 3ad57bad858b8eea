/*
 * smp-test: the AP side. The BSP entry, GDT, stack and interrupt stubs are
 * lib/entry.S, shared with virtio-test.
 *
 * APs: guest.c copies ap_tramp_start..ap_tramp_end to TRAMP_BASE (0x70000) and
 * sends SIPI vector 0x70, so an AP starts in real mode at CS=0x7000, IP=0.  The
 * trampoline loads the main GDT (through a GDTR kept inside the trampoline),
 * sets CR0.PE and far-jumps straight to ap_entry32 in the 1 MiB image, which
 * takes a per-AP 4 KiB stack (slot from lock xadd on ap_next_slot) and calls
 * ap_main(slot).
 */
        .set MAX_APS, 15                   /* keep in sync with MAX_CPUS - 1 in guest.c */
        .set AP_STACK_SIZE, 4096
        .set GDT_LIMIT, 3 * 8 - 1          /* lib/entry.S's gdt: null, 0x08 code, 0x10 data */

        .text
        .code32
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
        .word   GDT_LIMIT
        .long   gdt
ap_tramp_end:
        .code32

        .bss
        .balign 16
ap_stacks:
        .skip   MAX_APS * AP_STACK_SIZE
        .balign 4
        .globl ap_next_slot
ap_next_slot:
        .skip   4

        .section .note.GNU-stack, "", @progbits
