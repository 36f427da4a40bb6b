/*
 * mem — prints the e820 map (`E820 <addr> <size> <type>`), then for every
 * RAM entry writes and reads back two patterns at its first and last 8 bytes
 * and at every 256 MiB boundary inside it (restoring the old contents), and
 * prints `MEM OK <total RAM bytes>`. RAM above 4 GiB was mapped by core/main.c.
 */
#include "tg.h"

#define STEP (256ull << 20)

static unsigned checked;

static void check_addr(u64 a) {
    volatile u64 *p = (volatile u64 *)a;
    u64 old = *p, pat = a ^ 0x5a5aa5a5c3c33c3cull;
    *p = pat;
    u64 got = *p;
    if (got != pat)
        tg_fail("pattern at %#lx: wrote %#lx, read %#lx", a, pat, got);
    *p = ~pat;
    got = *p;
    if (got != ~pat)
        tg_fail("pattern at %#lx: wrote %#lx, read %#lx", a, ~pat, got);
    *p = old;
    checked++;
}

int mode_mem(void) {
    unsigned n = tg_e820_count();
    if (!n)
        tg_fail("the e820 map is empty");
    u64 total = 0;
    for (unsigned i = 0; i < n; i++) {
        const struct tg_e820_entry *e = tg_e820_entry(i);
        tg_printf("E820 %#018lx %#018lx %u\n", e->addr, e->size, e->type);
    }
    for (unsigned i = 0; i < n; i++) {
        const struct tg_e820_entry *e = tg_e820_entry(i);
        if (e->type != E820_TYPE_RAM)
            continue;
        for (unsigned j = 0; j < i; j++) {
            const struct tg_e820_entry *f = tg_e820_entry(j);
            if (f->type == E820_TYPE_RAM && e->addr < f->addr + f->size && f->addr < e->addr + e->size)
                tg_fail("e820 RAM entries %u and %u overlap", j, i);
        }
        if (e->size < 16)
            tg_fail("e820 RAM entry %u is only %lu bytes", i, e->size);
        total += e->size;
        u64 first = TG_ALIGN_UP(e->addr, 8), last = (e->addr + e->size - 8) & ~7ull;
        check_addr(first);
        for (u64 a = TG_ALIGN_UP(first + 1, STEP); a < last; a += STEP)
            check_addr(a);
        check_addr(last);
    }
    tg_printf("MEM CHECKED %u addresses\n", checked);
    tg_printf("MEM OK %lu\n", total);
    return 0;
}
