/*
 * pagetables.S — the guest's own identity map of [0, 4 GiB), built by the
 * assembler (no ring-0 instructions at run time): PML4 -> one PDPT -> four
 * page directories of 2 MiB pages, every level with the U bit so ring 3 can
 * reach all of it. [0xd0000000, 4 GiB) is the MMIO gap: mapped uncached
 * (PCD|PWT, i.e. UC with the reset PAT). RAM above 4 GiB is mapped at run time
 * by core/main.c (more page directories, then a CR3 reload).
 */
#include "tg_layout.h"

    .file "pagetables.S"

    .section .data.pagetables, "aw"
    .balign 4096
    .globl tg_pml4, tg_pdpt, tg_pd_low
tg_pml4:
    .quad tg_pdpt + PTE_TABLE
    .fill 511, 8, 0

tg_pdpt:
    .quad tg_pd_low + 0x0000 + PTE_TABLE
    .quad tg_pd_low + 0x1000 + PTE_TABLE
    .quad tg_pd_low + 0x2000 + PTE_TABLE
    .quad tg_pd_low + 0x3000 + PTE_TABLE
    .fill 508, 8, 0

tg_pd_low:
    addr = 0
    .rept TG_MMIO_GAP_START / 0x200000
    .quad addr + PTE_LARGE
    addr = addr + 0x200000
    .endr
    .rept (0x100000000 - TG_MMIO_GAP_START) / 0x200000
    .quad addr + PTE_LARGE + PTE_PCD + PTE_PWT
    addr = addr + 0x200000
    .endr

    .section .note.GNU-stack, "", @progbits
