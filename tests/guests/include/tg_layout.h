/*
 * tg_layout.h — constants shared by the assembly (arch/ .S files) and the C code.
 * Plain #defines only: this file is included from assembly.
 */
#ifndef TG_LAYOUT_H
#define TG_LAYOUT_H

/* Where the image is linked (the boot contract: the VMM loads PT_LOAD at p_paddr). */
#define TG_LOAD_ADDR 0x200000

/* GDT selectors. 0x08/0x10 are the boot contract's; the user pair sits in the
 * order SYSRET expects (data, then code), then one 16-byte TSS descriptor per CPU. */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b /* GDT index 3, RPL 3 */
#define SEL_UCODE 0x23 /* GDT index 4, RPL 3 */
#define SEL_TSS0 0x28  /* GDT index 5: 16-byte TSS descriptors, one per CPU */
#define GDT_ENTRIES (5 + 2 * 64)

/* RFLAGS for ring 3: reserved bit 1, IOPL = 3 (bits 12-13); IF is set separately. */
#define RFLAGS_RESERVED 0x2
#define RFLAGS_IF 0x200
#define RFLAGS_IOPL3 0x3000
#define RFLAGS_USER (RFLAGS_RESERVED | RFLAGS_IOPL3)

/* Control registers and MSRs. */
#define CR0_PE (1 << 0)
#define CR0_MP (1 << 1)
#define CR0_EM (1 << 2)
#define CR0_TS (1 << 3)
#define CR0_NE (1 << 5)
#define CR0_WP (1 << 16)
#define CR0_PG (1 << 31)
#define CR4_PAE (1 << 5)
#define CR4_OSFXSR (1 << 9)
#define CR4_OSXMMEXCPT (1 << 10)
#define CR4_SMEP (1 << 20)
#define CR4_SMAP (1 << 21)
#define MSR_EFER 0xc0000080
#define EFER_LME (1 << 8)
#define MSR_GS_BASE 0xc0000101
#define MSR_APIC_BASE 0x1b

/* Page-table entry bits (Intel SDM Vol. 3A §4.5). */
#define PTE_P 0x1
#define PTE_RW 0x2
#define PTE_US 0x4
#define PTE_PWT 0x8
#define PTE_PCD 0x10
#define PTE_PS 0x80
#define PTE_TABLE (PTE_P | PTE_RW | PTE_US)
#define PTE_LARGE (PTE_P | PTE_RW | PTE_US | PTE_PS)
#define TG_MMIO_GAP_START 0xd0000000 /* mapped uncached up to 4 GiB */
#define TG_MAX_PHYS_GIB 512          /* one PDPT */

/* The AP trampoline is copied to this page below 1 MiB (SIPI vector = page
 * number). The VMM uses 0x500 (boot GDT/IDT), 0x6000 (PVH info), 0x7000 (boot
 * params, boot stack), 0x9000.. (its page tables) and 0x20000 (command line);
 * 0x1000-0x5fff is free. */
#define TG_TRAMPOLINE 0x3000

/* struct tg_cpu field offsets, for the assembly (tg_internal.h checks them with _Static_assert). */
#define CPU_SELF 0
#define CPU_INDEX 8
#define CPU_APIC_ID 12
#define CPU_R0_STACK 16
#define CPU_R3_STACK 24
#define CPU_IST_STACK 32
#define CPU_ENTRY 40
#define CPU_ARG 48
#define CPU_STARTED 56
#define CPU_TSS 64
#define CPU_SIZE 192

/* Stack sizes. */
#define TG_R0_STACK_SIZE 8192
#define TG_R3_STACK_SIZE 32768
#define TG_IST_STACK_SIZE 4096

/* Ring-0 services (kernel/r0.c), requested from ring 3 with tg_r0call. */
#define R0_CPUID 1
#define R0_RDMSR 2
#define R0_WRMSR 3
#define R0_READ_CR 4
#define R0_LOAD_CR3 5
#define R0_WAIT_FOR_INTERRUPT 6
#define R0_HALT_FOREVER 7

#endif /* TG_LAYOUT_H */
