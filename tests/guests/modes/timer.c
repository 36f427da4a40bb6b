/*
 * timer — two interrupt sources counted while ring 3 spins:
 *   - the local APIC timer, periodic, ~100 Hz (its input clock calibrated
 *     against the TSC first: 1 GHz on KVM, the bus clock on hardware);
 *   - PIT channel 0 at ~100 Hz through the IOAPIC.
 * Where does the PIT arrive? ISA IRQ 0 is IOAPIC pin 0 unless the MADT has an
 * interrupt source override (PCs usually say GSI 2). KVM's in-kernel PIT raises
 * GSI 0, which its default routing sends to IOAPIC pin 0; a VMM that
 * advertises IRQ0 -> GSI 2 must route GSI 0 to pin 2 itself (QEMU does). So the
 * mode routes both pins 0 and 2 (distinct vectors) and fails if the ticks do
 * not come in on the pin the MADT names. The counts come from the ring-0
 * dispatcher's per-vector counters (kernel/r0.c); no handlers are needed.
 *
 * Command line: timer.ms=<window, default 500>, timer.hz=<rate, default 100>.
 */
#include "tg.h"

#define VEC_PIN(p) (TG_VEC_IOAPIC_BASE + (p))

static u64 rate(u64 ticks, u64 cycles, u64 tsc_hz) { return cycles ? ticks * tsc_hz / cycles : 0; }

/* LAPIC timer input clock (after divide-by-1) in Hz, measured over ~10 ms of TSC. */
static u64 lapic_timer_hz(u64 tsc_hz) {
    lapic_write(LAPIC_TIMER_DCR, 0xb); /* divide by 1 */
    lapic_write(LAPIC_LVT_TIMER, LAPIC_LVT_MASKED | TG_VEC_LAPIC_TIMER);
    lapic_write(LAPIC_TIMER_ICR, 0xffffffff);
    u64 t0 = rdtsc();
    tg_udelay(10000);
    u32 ccr = lapic_read(LAPIC_TIMER_CCR);
    u64 t1 = rdtsc();
    lapic_write(LAPIC_TIMER_ICR, 0);
    u64 elapsed = 0xffffffffull - ccr;
    if (!elapsed)
        tg_fail("LAPIC timer current count did not move (CCR %#x)", ccr);
    return elapsed * tsc_hz / (t1 - t0);
}

int mode_timer(void) {
    u64 window_ms = tg_cmdline_u64("timer.ms", 500), hz = tg_cmdline_u64("timer.hz", 100);
    struct tg_acpi_info acpi;
    tg_acpi_parse(&acpi, 0);
    u16 iso_flags;
    u32 pit_gsi = tg_acpi_isa_gsi(&acpi, 0, &iso_flags);
    if (pit_gsi != 0 && pit_gsi != 2)
        tg_fail("MADT routes ISA IRQ0 to GSI %u (expected 0 or 2)", pit_gsi);

    u64 tsc_hz = tg_tsc_hz();
    tg_printf("TSC %lu kHz\n", tsc_hz / 1000);
    tg_pic_disable();
    tg_lapic_init();
    u32 me = tg_lapic_id();
    u64 lapic_hz = lapic_timer_hz(tsc_hz);
    tg_printf("LAPIC timer clock %lu kHz\n", lapic_hz / 1000);
    u64 initial = lapic_hz / 16 / hz;
    if (!initial || initial > 0xffffffffull)
        tg_fail("LAPIC timer initial count %lu out of range", initial);

    u32 flags = tg_ioapic_isa_flags(iso_flags);
    tg_ioapic_route(0, VEC_PIN(0), me, pit_gsi == 0 ? flags : 0);
    tg_ioapic_route(2, VEC_PIN(2), me, pit_gsi == 2 ? flags : 0);
    lapic_write(LAPIC_TIMER_DCR, 0x3); /* divide by 16 */
    lapic_write(LAPIC_LVT_TIMER, TG_VEC_LAPIC_TIMER | LAPIC_TIMER_PERIODIC);
    lapic_write(LAPIC_TIMER_ICR, (u32)initial);
    tg_pit_start((unsigned)hz);

    u64 l0 = tg_irq_count(TG_VEC_LAPIC_TIMER), p0 = tg_irq_count(VEC_PIN(0)), p2 = tg_irq_count(VEC_PIN(2));
    u64 t0 = rdtsc(), end = t0 + window_ms * (tsc_hz / 1000);
    tg_sti();
    while (rdtsc() < end)
        cpu_relax(); /* ring 3 spins; the ticks are taken in ring 0 */
    tg_cli();
    u64 t1 = rdtsc();
    u64 lapic = tg_irq_count(TG_VEC_LAPIC_TIMER) - l0;
    u64 pin0 = tg_irq_count(VEC_PIN(0)) - p0, pin2 = tg_irq_count(VEC_PIN(2)) - p2;

    lapic_write(LAPIC_LVT_TIMER, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_TIMER_ICR, 0);
    tg_pit_stop();
    tg_ioapic_mask(0);
    tg_ioapic_mask(2);

    u64 cycles = t1 - t0, ms = cycles * 1000 / tsc_hz;
    tg_printf("WINDOW %lu ms\n", ms);
    tg_printf("LAPIC ticks=%lu rate=%lu Hz\n", lapic, rate(lapic, cycles, tsc_hz));
    u64 pit = pit_gsi == 0 ? pin0 : pin2;
    tg_printf("PIT ticks=%lu rate=%lu Hz pin=%u pin0=%lu pin2=%lu\n", pit, rate(pit, cycles, tsc_hz), pit_gsi, pin0,
              pin2);
    if (!lapic)
        tg_fail("no LAPIC timer interrupts in %lu ms", ms);
    if (!pin0 && !pin2)
        tg_fail("no PIT interrupts on IOAPIC pin 0 or 2 in %lu ms", ms);
    if (!pit)
        tg_fail("PIT interrupts arrive on IOAPIC pin %u, but the MADT says ISA IRQ0 is GSI %u", pin0 ? 0 : 2,
                pit_gsi);
    return 0;
}
