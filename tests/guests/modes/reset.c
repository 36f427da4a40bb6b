/* reset — START, then the i8042 reset (0xFE to port 0x64) with no PASS line:
 * the test checks that the VMM exits with status 0 and prints nothing more. */
#include "tg.h"

int mode_reset(void) {
    tg_reset();
}
