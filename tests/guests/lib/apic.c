/*
 * apic.c — local APIC (xAPIC MMIO), IOAPIC and the legacy 8259 PICs.
 * All of it is plain MMIO / port I/O, done from ring 3.
 */
#include "tg.h"

u64 tg_lapic_base = 0xfee00000;
u64 tg_ioapic_base = 0xfec00000;

void tg_lapic_init(void) {
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LAPIC_LVT_MASKED); /* the 8259 is not used: no ExtINT */
    lapic_write(LAPIC_LVT_ERROR, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_ESR, 0);
    lapic_write(LAPIC_ESR, 0);
    lapic_write(LAPIC_SVR, 0x100 | TG_VEC_SPURIOUS); /* software enable */
}

u32 tg_lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

int tg_lapic_send_ipi(u32 dest_apic_id, u32 icr_lo) {
    lapic_write(LAPIC_ICR_HI, dest_apic_id << 24);
    lapic_write(LAPIC_ICR_LO, icr_lo);
    u64 deadline = tg_deadline_us(100000);
    while (lapic_read(LAPIC_ICR_LO) & LAPIC_ICR_BUSY) {
        if (rdtsc() > deadline)
            return -1;
        cpu_relax();
    }
    return 0;
}

u32 tg_ioapic_read(u32 reg) {
    mmio_write32(tg_ioapic_base, reg);
    return mmio_read32(tg_ioapic_base + 0x10);
}

void tg_ioapic_write(u32 reg, u32 v) {
    mmio_write32(tg_ioapic_base, reg);
    mmio_write32(tg_ioapic_base + 0x10, v);
}

unsigned tg_ioapic_pins(void) { return ((tg_ioapic_read(IOAPIC_REG_VER) >> 16) & 0xff) + 1; }

void tg_ioapic_route(unsigned pin, u8 vector, u32 dest_apic_id, u32 flags) {
    tg_ioapic_write(IOAPIC_REDTBL + 2 * pin + 1, dest_apic_id << 24);
    tg_ioapic_write(IOAPIC_REDTBL + 2 * pin, vector | flags);
}

void tg_ioapic_mask(unsigned pin) {
    tg_ioapic_write(IOAPIC_REDTBL + 2 * pin, IOAPIC_RTE_MASKED);
}

u32 tg_ioapic_isa_flags(u16 madt_flags) {
    u32 f = 0;
    if ((madt_flags & 0x3) == 0x3)
        f |= IOAPIC_RTE_ACTIVE_LOW;
    if (((madt_flags >> 2) & 0x3) == 0x3)
        f |= IOAPIC_RTE_LEVEL;
    return f;
}

void tg_pic_disable(void) {
    /* ICW1-ICW4 (8259A datasheet): edge, cascade, 8086 mode; vectors 0x20 / 0x28. */
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xff); /* OCW1: mask everything */
    outb(0xa1, 0xff);
}
