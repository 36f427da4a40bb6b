/*
 * bootparams.c — the Linux zero page the VMM passed in RSI
 * (Documentation/arch/x86/zero-page.rst): e820 map, command line pointer.
 */
#include "tg_internal.h"

unsigned tg_e820_count(void) {
    unsigned n = *(volatile u8 *)(tg_boot_params + BP_E820_ENTRIES);
    return n > BP_E820_MAX ? BP_E820_MAX : n;
}

const struct tg_e820_entry *tg_e820_entry(unsigned i) {
    return (const struct tg_e820_entry *)(tg_boot_params + BP_E820_TABLE + 20 * i);
}

u64 tg_ram_top(void) {
    u64 top = 0;
    for (unsigned i = 0; i < tg_e820_count(); i++) {
        const struct tg_e820_entry *e = tg_e820_entry(i);
        if (e->type == E820_TYPE_RAM && e->addr + e->size > top)
            top = e->addr + e->size;
    }
    return top;
}
