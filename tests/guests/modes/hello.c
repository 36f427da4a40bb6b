/* hello — the smallest mode: a greeting, and how ring-3 port I/O got done. */
#include "tg_internal.h"

int mode_hello(void) {
    tg_printf("Hello from Ember test guest\n");
    u64 emulated = tg_atomic_read(&tg_emulated_io);
    if (emulated)
        tg_printf("ring-3 port I/O: trapped despite IOPL %lu, emulated in ring 0 (%lu instructions)\n",
                  (tg_rflags() >> 12) & 3, emulated);
    else
        tg_printf("ring-3 port I/O: native (IOPL 3)\n");
    return 0;
}
