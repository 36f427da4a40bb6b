/*
 * timer.c — PIT channel 0 (periodic interrupts) and TSC calibration against
 * PIT channel 2, read through port 0x61 (its gate and OUT2), as Linux's
 * pit_calibrate_tsc does. Ring-3 RDTSC runs natively.
 */
#include "tg_internal.h"

#define PIT_CH0 0x40
#define PIT_CH2 0x42
#define PIT_CMD 0x43
#define PORT_61 0x61 /* bit 0: channel 2 gate, bit 1: speaker, bit 5: OUT2 */
#define CALIBRATE_MS 50

void tg_pit_start(unsigned hz) {
    u32 div = PIT_HZ / hz;
    if (div > 0xffff)
        div = 0xffff;
    outb(PIT_CMD, 0x34); /* channel 0, lobyte/hibyte, mode 2 (rate generator), binary */
    outb(PIT_CH0, div & 0xff);
    outb(PIT_CH0, div >> 8);
}

void tg_pit_stop(void) {
    outb(PIT_CMD, 0x30); /* channel 0, mode 0 with no count written: output stays low */
}

static u64 tsc_hz;

u64 tg_tsc_hz_if_known(void) { return tsc_hz; }

u64 tg_tsc_hz(void) {
    if (tsc_hz)
        return tsc_hz;
    u32 count = PIT_HZ * CALIBRATE_MS / 1000;
    outb(PORT_61, (inb(PORT_61) & ~0x02) | 0x01);
    outb(PIT_CMD, 0xb0); /* channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count) */
    outb(PIT_CH2, count & 0xff);
    outb(PIT_CH2, count >> 8);
    u64 t0 = rdtsc();
    if (inb(PORT_61) & 0x20)
        tg_fail("TSC calibration: PIT OUT2 (port 0x61 bit 5) high right after loading channel 2");
    u64 polls = 0;
    while (!(inb(PORT_61) & 0x20))
        if (++polls > 100000000ull)
            tg_fail("TSC calibration: PIT channel 2 never reached terminal count");
    u64 t1 = rdtsc();
    tsc_hz = (t1 - t0) * 1000 / CALIBRATE_MS;
    if (tsc_hz < 10000000ull)
        tg_fail("TSC calibration: implausible TSC rate %lu Hz", tsc_hz);
    return tsc_hz;
}

u64 tg_deadline_us(u64 us) { return rdtsc() + us * (tg_tsc_hz() / 1000000); }

void tg_udelay(u64 us) {
    u64 end = tg_deadline_us(us);
    while (rdtsc() < end)
        cpu_relax();
}
