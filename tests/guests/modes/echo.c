/*
 * echo — interrupt-driven serial I/O, the way Linux's 8250 driver does it.
 *
 * COM1's IRQ 4 goes through the IOAPIC (pin from the MADT) to TG_VEC_SERIAL.
 * The ring-0 handler reads IIR until it says "no interrupt": on received data
 * it drains RBR into rx_buf, on THRE it moves up to 16 bytes from tx_buf to
 * THR and disables the THRE interrupt once tx_buf is empty. Ring 3 prints
 * `ECHO READY`, enables the RX interrupt, then echoes each received line as
 * `ECHO:<line>` through tx_buf (setting IER.THRI, so the UART must raise a
 * THRE interrupt for the output to appear) until the line `quit`.
 *
 * Flow control, as Linux's tty throttling: when rx_buf is full the handler
 * disables the RX interrupt and leaves the rest in the UART (the VMM then
 * holds back its input); ring 3 re-enables it once half of rx_buf is free,
 * and the UART, still holding data, interrupts at once. Input sent before
 * `ECHO READY` may be lost (lib/serial.c enables the FIFOs at boot).
 */
#include "tg.h"

#define COM1 0x3f8
#define COM1_ISA_IRQ 4
#define RX_SIZE 256 /* powers of two: indices wrap freely */
#define TX_SIZE 1024
#define LINE_MAX 200

static volatile u8 rx_buf[RX_SIZE];
static volatile u32 rx_head, rx_tail; /* head: ring 0 */
static volatile u8 tx_buf[TX_SIZE];
static volatile u32 tx_head, tx_tail; /* tail: ring 0 */
static volatile u8 ier;               /* shadow of IER; ring 3 changes it with interrupts off */
static volatile u8 rx_throttled;      /* the handler turned IER.RDI off: rx_buf was full */
static tg_atomic_t rx_events, thre_events, throttles;

/* Moves bytes from tx_buf to THR while the UART takes them; stops THRE interrupts when done. */
TG_RING0 static void tx_fill(void) {
    for (int n = 0; n < 16 && tx_tail != tx_head && (inb(COM1 + UART_LSR) & UART_LSR_THRE); n++) {
        outb(COM1 + UART_THR, tx_buf[tx_tail % TX_SIZE]);
        tx_tail++;
    }
    if (tx_tail == tx_head && (ier & UART_IER_THRI)) {
        ier &= ~UART_IER_THRI;
        outb(COM1 + UART_IER, ier);
    }
}

TG_RING0 static void serial_irq(u64 vector) {
    (void)vector;
    for (int guard = 0; guard < 64; guard++) {
        u8 iir = inb(COM1 + UART_IIR);
        if (iir & UART_IIR_NO_INT)
            return;
        switch (iir & UART_IIR_ID) {
        case UART_IIR_RDI:
        case UART_IIR_TIMEOUT:
            tg_atomic_inc(&rx_events);
            for (int n = 0; n < RX_SIZE && (inb(COM1 + UART_LSR) & UART_LSR_DR); n++) {
                if (rx_head - rx_tail == RX_SIZE) { /* full: leave the rest in the UART */
                    ier &= ~UART_IER_RDI;
                    outb(COM1 + UART_IER, ier);
                    rx_throttled = 1;
                    tg_atomic_inc(&throttles);
                    break;
                }
                rx_buf[rx_head % RX_SIZE] = inb(COM1 + UART_RBR);
                rx_head++;
            }
            break;
        case UART_IIR_THRI: /* reading IIR cleared it */
            tg_atomic_inc(&thre_events);
            tx_fill();
            break;
        case UART_IIR_RLSI:
            inb(COM1 + UART_LSR);
            break;
        default:
            inb(COM1 + UART_MSR);
            break;
        }
    }
}

static int rx_ready(void *arg) { (void)arg; return rx_head != rx_tail; }
static int tx_room(void *arg) { (void)arg; return tx_head - tx_tail < TX_SIZE; }
static int tx_empty(void *arg) { (void)arg; return tx_head == tx_tail; }

/* Read-modify-write of IER with interrupts off (the handler changes it too). */
static void update_ier(u8 set, u8 clear) {
    tg_cli();
    ier = (ier | set) & ~clear;
    outb(COM1 + UART_IER, ier);
    tg_sti();
}

/* Makes sure the THRE interrupt is on while tx_buf holds data. */
static void tx_kick(void) {
    if (!(ier & UART_IER_THRI))
        update_ier(UART_IER_THRI, 0); /* THR is empty: the UART interrupts at once */
}

/* Queues bytes for the THRE interrupt handler. */
static void tx_write(const char *s) {
    for (; *s; s++) {
        if (!tx_room(NULL)) {
            tx_kick();
            tg_wait_until(tx_room, NULL);
        }
        tx_buf[tx_head % TX_SIZE] = (u8)*s;
        barrier();
        tx_head++;
    }
    tx_kick();
}

int mode_echo(void) {
    struct tg_acpi_info acpi;
    tg_acpi_parse(&acpi, 0);
    u16 iso_flags;
    u32 gsi = tg_acpi_isa_gsi(&acpi, COM1_ISA_IRQ, &iso_flags);
    tg_pic_disable();
    tg_lapic_init();
    tg_irq_register(TG_VEC_SERIAL, serial_irq);
    tg_ioapic_route(gsi, TG_VEC_SERIAL, tg_lapic_id(), tg_ioapic_isa_flags(iso_flags));
    outb(COM1 + UART_MCR, UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2);
    tg_printf("ECHO READY irq=%u gsi=%u vector=%#x\n", COM1_ISA_IRQ, gsi, TG_VEC_SERIAL);
    update_ier(UART_IER_RDI, 0);

    char line[LINE_MAX + 1];
    unsigned len = 0, lines = 0;
    for (;;) {
        tg_wait_until(rx_ready, NULL);
        char c = (char)rx_buf[rx_tail % RX_SIZE];
        rx_tail++;
        if (rx_throttled && rx_head - rx_tail <= RX_SIZE / 2) {
            rx_throttled = 0;
            update_ier(UART_IER_RDI, 0); /* data still waiting in the UART interrupts at once */
        }
        if (c != '\r' && c != '\n') {
            if (len < LINE_MAX)
                line[len++] = c;
            continue;
        }
        if (!len)
            continue;
        line[len] = 0;
        len = 0;
        if (strcmp(line, "quit") == 0)
            break;
        tx_write("ECHO:");
        tx_write(line);
        tx_write("\r\n");
        lines++;
    }
    tg_wait_until(tx_empty, NULL);
    update_ier(0, 0xff);
    tg_printf("ECHO lines=%u rx_irqs=%lu thre_irqs=%lu throttled=%lu serial_irqs=%lu\n", lines,
              tg_atomic_read(&rx_events), tg_atomic_read(&thre_events), tg_atomic_read(&throttles),
              tg_irq_count(TG_VEC_SERIAL));
    if (!tg_atomic_read(&thre_events) && lines)
        tg_fail("output went out without a THRE interrupt");
    if (!tg_atomic_read(&rx_events))
        tg_fail("input arrived without a received-data interrupt");
    return 0;
}
