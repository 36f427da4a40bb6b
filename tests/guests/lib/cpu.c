/*
 * cpu.c — ring-3 wrappers of the ring-0 services (kernel/r0.c), per-CPU data,
 * interrupt handler registration and the page allocator.
 */
#include "tg_internal.h"

void tg_cpuid(u32 leaf, u32 subleaf, struct tg_cpuid *out) {
    tg_r0call(R0_CPUID, leaf, subleaf, (u64)out);
}

u64 tg_rdmsr(u32 msr) { return tg_r0call(R0_RDMSR, msr, 0, 0); }
void tg_wrmsr(u32 msr, u64 value) { tg_r0call(R0_WRMSR, msr, value, 0); }
u64 tg_read_cr(int n) { return tg_r0call(R0_READ_CR, (u64)n, 0, 0); }
void tg_load_cr3(u64 cr3) { tg_r0call(R0_LOAD_CR3, cr3, 0, 0); }
void tg_wait_for_interrupt(void) { tg_r0call(R0_WAIT_FOR_INTERRUPT, 0, 0, 0); }

void tg_halt_forever(void) {
    for (;;)
        tg_r0call(R0_HALT_FOREVER, 0, 0, 0);
}

void tg_wait_until(int (*cond)(void *), void *arg) {
    u64 flags = tg_rflags();
    for (;;) {
        tg_cli();
        if (cond(arg))
            break;
        tg_wait_for_interrupt();
    }
    if (flags & RFLAGS_IF)
        tg_sti();
}

struct tg_cpu *tg_this_cpu(void) {
    struct tg_cpu *c;
    __asm__ volatile("movq %%gs:0, %0" : "=r"(c));
    return c;
}

unsigned tg_cpu_index(void) { return tg_this_cpu()->index; }

/* ---- interrupts ---- */

tg_irq_handler_t tg_irq_handlers[256];
tg_atomic_t tg_irq_counts[256];

void tg_irq_register(unsigned vector, tg_irq_handler_t fn) {
    __atomic_store_n(&tg_irq_handlers[vector & 0xff], fn, __ATOMIC_SEQ_CST);
}

u64 tg_irq_count(unsigned vector) { return tg_atomic_read(&tg_irq_counts[vector & 0xff]); }

/* ---- pages above the image ---- */

static tg_spinlock_t alloc_lock;
static u64 alloc_next, alloc_limit;

void *tg_alloc_pages(unsigned n) {
    tg_spin_lock(&alloc_lock);
    if (!alloc_next) {
        alloc_next = TG_ALIGN_UP((u64)tg_image_end, 4096);
        /* The e820 RAM entry holding the image bounds the allocator. */
        for (unsigned i = 0; i < tg_e820_count(); i++) {
            const struct tg_e820_entry *e = tg_e820_entry(i);
            if (e->type == E820_TYPE_RAM && e->addr <= alloc_next && alloc_next < e->addr + e->size)
                alloc_limit = e->addr + e->size;
        }
    }
    u64 p = alloc_next, size = (u64)n * 4096;
    if (p + size > alloc_limit) {
        tg_spin_unlock(&alloc_lock);
        tg_fail("out of guest memory: %u pages at %#lx (RAM ends at %#lx)", n, p, alloc_limit);
    }
    alloc_next += size;
    tg_spin_unlock(&alloc_lock);
    memset((void *)p, 0, size);
    return (void *)p;
}
