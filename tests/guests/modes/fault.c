/*
 * fault — takes an exception on purpose, to check the exception report
 * (`TESTGUEST EXCEPTION vec=.. err=.. rip=.. cr2=..`, then a reset).
 * Command line: fault.kind=ud (ud2 in ring 3, the default), pf (read of the
 * unmapped address 512 GiB) or gp (read of a non-canonical address).
 */
#include "tg.h"

#define UNMAPPED_ADDR 0x8000000000ull        /* PML4 slot 1: never mapped */
#define NONCANONICAL_ADDR 0x8000000000000000ull

int mode_fault(void) {
    char kind[8] = "ud";
    tg_cmdline_get("fault.kind", kind, sizeof(kind));
    tg_printf("FAULT kind=%s\n", kind);
    if (strcmp(kind, "pf") == 0)
        (void)*(volatile u64 *)UNMAPPED_ADDR;
    else if (strcmp(kind, "gp") == 0)
        (void)*(volatile u64 *)NONCANONICAL_ADDR;
    else
        __asm__ volatile("ud2");
    tg_fail("no exception was taken");
}
