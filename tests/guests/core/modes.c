/* modes.c — builds tg_modes[] from modes/modes.def. */
#include "tg.h"

#define TG_MODE(name, help) int mode_##name(void);
#include "../modes/modes.def"
#undef TG_MODE

#define TG_MODE(name, help) { #name, help, mode_##name },
const struct tg_mode tg_modes[] = {
#include "../modes/modes.def"
};
#undef TG_MODE

const unsigned tg_nmodes = TG_ARRAY_SIZE(tg_modes);
