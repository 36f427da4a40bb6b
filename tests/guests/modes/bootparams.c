/* bootparams — the command line and zero-page fields as the guest sees them,
 * then the boot-complete signal: byte 123 written to the boot timer device
 * (Firecracker's MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE) at the start of the
 * MMIO gap. The test runs it with --boot-timer. */
#include "tg_internal.h"

#define BOOT_TIMER_ADDR 0xd0000000
#define BOOT_COMPLETE_MAGIC 123

int mode_bootparams(void) {
    tg_printf("CMDLINE %s\n", tg_cmdline);
    tg_printf("BOOT_PARAMS addr=%#lx e820_entries=%u cmd_line_ptr=%#x acpi_rsdp_addr=%#lx\n", tg_boot_params,
              tg_e820_count(), *(const u32 *)(tg_boot_params + BP_CMD_LINE_PTR),
              *(const u64 *)(tg_boot_params + BP_ACPI_RSDP_ADDR));
    mmio_write8(BOOT_TIMER_ADDR, BOOT_COMPLETE_MAGIC);
    tg_printf("BOOT TIMER written %u to %#x\n", BOOT_COMPLETE_MAGIC, BOOT_TIMER_ADDR);
    return 0;
}
