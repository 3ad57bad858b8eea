/*
 * Shared by the test guests: port I/O, the COM1 console (polled 16550A), PASS/FAIL reporting and the
 * isa-debug-exit. Header-only so each guest stays one compilation unit.
 */
#ifndef GUEST_CONSOLE_H
#define GUEST_CONSOLE_H

#include <stdarg.h>
#include <stdint.h>

#define COM1 0x3F8
#define DEBUG_EXIT_PORT 0xF4

/* 16550 register offsets (DLL/DLM with LCR.DLAB=1). */
enum { RBR = 0, THR = 0, DLL = 0, IER = 1, DLM = 1, IIR = 2, FCR = 2,
       LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7 };
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define MCR_NORMAL 0x0B /* DTR | RTS | OUT2 (OUT2 gates the IRQ on PCs) */
#define MCR_LOOP 0x18   /* LOOP | OUT2 */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* ---- console ---------------------------------------------------------- */

static inline void uart_init(void)
{
    outb(COM1 + IER, 0x00);
    outb(COM1 + LCR, 0x80); /* DLAB */
    outb(COM1 + DLL, 0x01); /* 115200 = 1.8432 MHz / 16 / 1 */
    outb(COM1 + DLM, 0x00);
    outb(COM1 + LCR, 0x03); /* 8N1 */
    outb(COM1 + FCR, 0x07); /* FIFO on, clear RX/TX */
    outb(COM1 + MCR, MCR_NORMAL);
}

static inline void con_putc(char c)
{
    for (int i = 0; i < 100000 && !(inb(COM1 + LSR) & LSR_THRE); i++)
        ;
    outb(COM1 + THR, (uint8_t)c);
}

static inline void put_hex(uint32_t v, int min_digits)
{
    for (int shift = 28; shift >= 0; shift -= 4)
        if ((v >> shift) || shift < min_digits * 4)
            con_putc("0123456789abcdef"[(v >> shift) & 0xF]);
}

static inline void put_dec(uint32_t v, int min_digits)
{
    char buf[10];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n < min_digits)
        con_putc('0'), min_digits--;
    while (n)
        con_putc(buf[--n]);
}

/* %s %u %x (32-bit), %X (64-bit hex), %c; %0Nu and %0Nx zero-pad to N digits. */
static inline void vprint(const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            con_putc(*fmt);
            continue;
        }
        int width = 0;
        if (fmt[1] == '0' && fmt[2] >= '1' && fmt[2] <= '9') {
            width = fmt[2] - '0';
            fmt += 2;
        }
        switch (*++fmt) {
        case 's': for (const char *s = va_arg(ap, const char *); *s; s++) con_putc(*s); break;
        case 'u': put_dec(va_arg(ap, uint32_t), width); break;
        case 'x': put_hex(va_arg(ap, uint32_t), width ? width : 1); break;
        case 'X': {
            uint64_t v = va_arg(ap, uint64_t);
            if (v >> 32) {
                put_hex((uint32_t)(v >> 32), 1);
                put_hex((uint32_t)v, 8);
            } else {
                put_hex((uint32_t)v, 1);
            }
            break;
        }
        case 'c': con_putc((char)va_arg(ap, int)); break;
        default: con_putc('%'); if (*fmt) con_putc(*fmt); else fmt--; break;
        }
    }
}

static inline void print(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprint(fmt, ap);
    va_end(ap);
}

static uint32_t failures __attribute__((unused));

static inline void check(int ok, const char *what, const char *detail_fmt, ...)
{
    print(ok ? "PASS: %s" : "FAIL: %s", what);
    if (!ok) {
        va_list ap;
        va_start(ap, detail_fmt);
        print(" (");
        vprint(detail_fmt, ap);
        print(")");
        va_end(ap);
        failures++;
    }
    print("\n");
}

static inline void __attribute__((noreturn)) exit_vm(uint32_t code)
{
    outl(DEBUG_EXIT_PORT, code); /* isa-debug-exit: VMM exits with (code << 1) | 1 */
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* Value of a "key=value" argument (a token starting with key), or 0. */
static inline const char *find_arg(const char *cmd, const char *key)
{
    for (const char *p = cmd; *p; p++) {
        if (p != cmd && p[-1] != ' ')
            continue;
        const char *a = p, *k = key;
        while (*k && *a == *k)
            a++, k++;
        if (!*k)
            return a;
    }
    return 0;
}

#endif
