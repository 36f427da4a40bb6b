/*
 * tg_internal.h — structures shared by the ring-0 code (arch/entry.S,
 * kernel/r0.c) and the library's core. Modes do not need this header.
 */
#ifndef TG_INTERNAL_H
#define TG_INTERNAL_H

#include "tg.h"

/* 64-bit TSS (Intel SDM Vol. 3A §8.7, Figure 8-11). */
struct tg_tss {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

/* Per-CPU data; GS base points at it in both rings (offsets in tg_layout.h). */
struct tg_cpu {
    struct tg_cpu *self;
    u32 index;
    u32 apic_id;
    u64 r0_stack_top;
    u64 r3_stack_top;
    u64 ist_stack_top;
    u64 entry; /* ring-3 entry point: void entry(void *arg) */
    u64 arg;
    volatile u64 started; /* set by the CPU once it runs ring-3 code */
    struct tg_tss tss __attribute__((aligned(64)));
} __attribute__((aligned(64)));

_Static_assert(__builtin_offsetof(struct tg_cpu, self) == CPU_SELF, "CPU_SELF");
_Static_assert(__builtin_offsetof(struct tg_cpu, index) == CPU_INDEX, "CPU_INDEX");
_Static_assert(__builtin_offsetof(struct tg_cpu, apic_id) == CPU_APIC_ID, "CPU_APIC_ID");
_Static_assert(__builtin_offsetof(struct tg_cpu, r0_stack_top) == CPU_R0_STACK, "CPU_R0_STACK");
_Static_assert(__builtin_offsetof(struct tg_cpu, r3_stack_top) == CPU_R3_STACK, "CPU_R3_STACK");
_Static_assert(__builtin_offsetof(struct tg_cpu, ist_stack_top) == CPU_IST_STACK, "CPU_IST_STACK");
_Static_assert(__builtin_offsetof(struct tg_cpu, entry) == CPU_ENTRY, "CPU_ENTRY");
_Static_assert(__builtin_offsetof(struct tg_cpu, arg) == CPU_ARG, "CPU_ARG");
_Static_assert(__builtin_offsetof(struct tg_cpu, started) == CPU_STARTED, "CPU_STARTED");
_Static_assert(__builtin_offsetof(struct tg_cpu, tss) == CPU_TSS, "CPU_TSS");
_Static_assert(sizeof(struct tg_cpu) == CPU_SIZE, "CPU_SIZE");

/* What arch/entry.S pushes on an interrupt or exception (lowest address first). */
struct tg_frame {
    u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

/* The first exception taken, for the ring-3 reporter. */
struct tg_fault {
    volatile u32 active;
    u32 cpu;
    u64 vector, error, rip, cr2, cs, rsp, rflags;
};
extern struct tg_fault tg_fault;

extern struct tg_cpu tg_bsp_cpu;
extern struct tg_cpu *tg_cpus[TG_MAX_CPUS];
extern u64 tg_gdt[GDT_ENTRIES];
extern u64 tg_pml4[512], tg_pdpt[512];
extern tg_irq_handler_t tg_irq_handlers[256];
extern tg_atomic_t tg_irq_counts[256];
/* Port I/O or cli/sti instructions kernel/r0.c had to emulate for ring 3. */
extern tg_atomic_t tg_emulated_io;

/* arch/entry.S */
u64 tg_r0call(u64 nr, u64 a0, u64 a1, u64 a2);
extern char tg_r0call_ud2[];
extern char tg_isr_stubs[];
extern char tg_trampoline_start[], tg_trampoline_end[], tg_trampoline_cpu[];
extern char tg_image_start[], tg_image_end[], tg_bss_start[], tg_bss_end[];

/* kernel/r0.c (ring 0) */
void tg_r0_idt_init(void);
void tg_r0_cpu_init(struct tg_cpu *cpu);
void tg_r0_trap(struct tg_frame *f);

/* core/main.c (ring 3) */
TG_NORETURN void tg_main(void);
TG_NORETURN void tg_ap_main(struct tg_cpu *cpu);
TG_NORETURN void tg_fault_report(void);

/* lib/timer.c: the calibrated TSC rate, or 0 before tg_tsc_hz() ran. */
u64 tg_tsc_hz_if_known(void);

#endif /* TG_INTERNAL_H */
