/*
 * serial.c — polled output on COM1 (16550 at 0x3f8), as the boot contract's
 * output protocol asks: LSR.THRE is checked before each byte. Interrupt-driven
 * I/O is the echo mode's business (modes/echo.c).
 */
#include "tg.h"

#define COM1 0x3f8
/* Polls of LSR before writing anyway: a UART that never reports THRE must not hang the guest. */
#define THRE_POLL_LIMIT 1000000

tg_spinlock_t tg_console_lock;

void tg_serial_init(void) {
    outb(COM1 + UART_IER, 0);
    outb(COM1 + UART_LCR, 0x80); /* DLAB: divisor 1 = 115200 baud */
    outb(COM1 + UART_RBR, 1);
    outb(COM1 + UART_IER, 0);
    outb(COM1 + UART_LCR, 0x03); /* 8N1, DLAB off */
    /* FIFOs on (as Linux does). Switching FIFO mode clears the receiver on a 16550,
     * so input that reached the UART before this line is lost: interactive modes
     * print a READY line, and tests send input after it. */
    outb(COM1 + UART_FCR, 0x01);
    outb(COM1 + UART_MCR, UART_MCR_DTR | UART_MCR_RTS);
}

static void putc_polled(char c) {
    for (unsigned i = 0; i < THRE_POLL_LIMIT && !(inb(COM1 + UART_LSR) & UART_LSR_THRE); i++)
        cpu_relax();
    outb(COM1 + UART_THR, (u8)c);
}

void tg_console_write(const char *s, size_t n) {
    tg_spin_lock(&tg_console_lock);
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n')
            putc_polled('\r');
        putc_polled(s[i]);
    }
    tg_spin_unlock(&tg_console_lock);
}
