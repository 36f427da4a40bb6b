/*
 * r0.c — everything the test guest runs in ring 0, besides arch/entry.S.
 *
 * On PVM hosts each instruction here is emulated (~0.8 µs), so this file is
 * deliberately small: IDT/TSS/GS setup once per CPU, the trap dispatcher,
 * a handful of services for ring 3, the #GP fallback that emulates port I/O
 * (and cli/sti) should a host not honour IOPL 3, and the exception capture
 * that hands the report over to ring 3 (core/main.c, tg_fault_report).
 */
#include "tg_internal.h"

/* 64-bit IDT gate (Intel SDM Vol. 3A §7.14.1, Figure 7-8). */
struct tg_idt_gate {
    u16 offset0;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 offset1;
    u32 offset2;
    u32 reserved;
} __attribute__((packed));

#define IDT_INTERRUPT_GATE 0x8e /* present, DPL 0, 64-bit interrupt gate (IF cleared on entry) */
#define TSS_AVAILABLE 0x89      /* present, DPL 0, available 64-bit TSS */
#define VEC_NMI 2
#define VEC_UD 6
#define VEC_DF 8
#define VEC_GP 13
#define VEC_MC 18

static struct tg_idt_gate tg_idt[256] __attribute__((section(".bss.noinit"), aligned(16)));
static const struct {
    u16 limit;
    u64 base;
} __attribute__((packed)) tg_idt_ptr = { sizeof(tg_idt) - 1, (u64)tg_idt };

struct tg_fault tg_fault;
tg_atomic_t tg_emulated_io;

static inline struct tg_cpu *r0_this_cpu(void) {
    struct tg_cpu *c;
    __asm__ volatile("movq %%gs:0, %0" : "=r"(c));
    return c;
}

static inline void r0_wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static inline u64 r0_rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

void tg_r0_idt_init(void) {
    u64 stubs = (u64)tg_isr_stubs;
    for (unsigned v = 0; v < 256; v++) {
        u64 h = stubs + 16 * v;
        struct tg_idt_gate *g = &tg_idt[v];
        g->offset0 = (u16)h;
        g->selector = SEL_KCODE;
        /* NMI, #DF and #MC use their own stack (IST1): the current one may be the problem. */
        g->ist = (v == VEC_NMI || v == VEC_DF || v == VEC_MC) ? 1 : 0;
        g->type_attr = IDT_INTERRUPT_GATE;
        g->offset1 = (u16)(h >> 16);
        g->offset2 = (u32)(h >> 32);
        g->reserved = 0;
    }
}

/* Per-CPU setup: GS base, TSS (+ its GDT descriptor, then ltr), IDT. */
void tg_r0_cpu_init(struct tg_cpu *cpu) {
    r0_wrmsr(MSR_GS_BASE, (u64)cpu);
    struct tg_tss *tss = &cpu->tss;
    tss->rsp[0] = cpu->r0_stack_top;
    tss->ist[0] = cpu->ist_stack_top;
    tss->iomap_base = sizeof(*tss); /* no I/O bitmap: IOPL alone decides */

    /* 16-byte system descriptor (SDM Vol. 3A §8.2.3, Figure 8-4). */
    u64 base = (u64)tss, limit = sizeof(*tss) - 1;
    unsigned slot = (SEL_TSS0 >> 3) + 2 * cpu->index;
    tg_gdt[slot] = (limit & 0xffff) | ((base & 0xffffff) << 16) | ((u64)TSS_AVAILABLE << 40) |
                   (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    tg_gdt[slot + 1] = base >> 32;
    u16 sel = (u16)(slot << 3);
    __asm__ volatile("ltr %0" : : "r"(sel));
    __asm__ volatile("lidt %0" : : "m"(tg_idt_ptr));
}

static u64 r0_service(struct tg_frame *f) {
    switch (f->rax) {
    case R0_CPUID: {
        u32 a, b, c, d;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"((u32)f->rdi), "c"((u32)f->rsi));
        struct tg_cpuid *out = (struct tg_cpuid *)f->rdx;
        out->eax = a;
        out->ebx = b;
        out->ecx = c;
        out->edx = d;
        return 0;
    }
    case R0_RDMSR:
        return r0_rdmsr((u32)f->rdi);
    case R0_WRMSR:
        r0_wrmsr((u32)f->rdi, f->rsi);
        return 0;
    case R0_READ_CR: {
        u64 v = 0;
        switch (f->rdi) {
        case 0: __asm__ volatile("movq %%cr0, %0" : "=r"(v)); break;
        case 2: __asm__ volatile("movq %%cr2, %0" : "=r"(v)); break;
        case 3: __asm__ volatile("movq %%cr3, %0" : "=r"(v)); break;
        case 4: __asm__ volatile("movq %%cr4, %0" : "=r"(v)); break;
        }
        return v;
    }
    case R0_LOAD_CR3:
        __asm__ volatile("movq %0, %%cr3" : : "r"(f->rdi) : "memory");
        return 0;
    case R0_WAIT_FOR_INTERRUPT:
        /* sti's one-instruction shadow covers hlt: a pending interrupt wakes it. */
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        return 0;
    case R0_HALT_FOREVER:
        for (;;)
            __asm__ volatile("cli; hlt");
    }
    return (u64)-1;
}

/* Emulates the ring-3 instruction at f->rip if it is port I/O or cli/sti
 * (what IOPL 3 allows); returns 0 if it is something else. Only needed on a
 * host that traps these despite IOPL 3. */
static int r0_emulate_iopl(struct tg_frame *f) {
    const u8 *p = (const u8 *)f->rip;
    unsigned len = 1, size = 4;
    if (p[0] == 0x66) {
        size = 2;
        p++;
        len++;
    }
    u8 op = p[0];
    u16 port = (u16)f->rdx;
    if (op == 0xe4 || op == 0xe5 || op == 0xe6 || op == 0xe7) { /* imm8 port forms */
        port = p[1];
        len++;
    }
    switch (op) {
    case 0xe4: case 0xec: /* in al */
        f->rax = (f->rax & ~0xffull) | inb(port);
        break;
    case 0xe5: case 0xed: /* in ax / eax */
        if (size == 2)
            f->rax = (f->rax & ~0xffffull) | inw(port);
        else
            f->rax = inl(port); /* 32-bit results zero-extend */
        break;
    case 0xe6: case 0xee: /* out al */
        outb(port, (u8)f->rax);
        break;
    case 0xe7: case 0xef:
        if (size == 2)
            outw(port, (u16)f->rax);
        else
            outl(port, (u32)f->rax);
        break;
    case 0xfa:
        f->rflags &= ~(u64)RFLAGS_IF;
        break;
    case 0xfb:
        f->rflags |= RFLAGS_IF;
        break;
    default:
        return 0;
    }
    f->rip += len;
    __atomic_add_fetch(&tg_emulated_io.v, 1, __ATOMIC_RELAXED);
    return 1;
}

/* Records the first exception and returns into tg_fault_report in ring 3 (on
 * this CPU's ring-3 stack), which prints it and resets. A second exception
 * on the reporting CPU resets at once; other CPUs stop. */
static void r0_fault(struct tg_frame *f) {
    struct tg_cpu *cpu = r0_this_cpu();
    u32 expected = 0, me = cpu->index + 1;
    if (!__atomic_compare_exchange_n(&tg_fault.active, &expected, me, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        if (expected == me)
            outb(0x64, 0xfe);
        for (;;)
            __asm__ volatile("cli; hlt");
    }
    u64 cr2;
    __asm__ volatile("movq %%cr2, %0" : "=r"(cr2));
    tg_fault.cpu = cpu->index;
    tg_fault.vector = f->vector;
    tg_fault.error = f->error;
    tg_fault.rip = f->rip;
    tg_fault.cr2 = cr2;
    tg_fault.cs = f->cs;
    tg_fault.rsp = f->rsp;
    tg_fault.rflags = f->rflags;
    f->rip = (u64)tg_fault_report;
    f->cs = SEL_UCODE;
    f->rflags = RFLAGS_USER;
    f->rsp = cpu->r3_stack_top - 8;
    f->ss = SEL_UDATA;
}

/* Called by tg_isr_common for every vector. */
void tg_r0_trap(struct tg_frame *f) {
    u64 v = f->vector;
    if (v >= 32) {
        __atomic_add_fetch(&tg_irq_counts[v].v, 1, __ATOMIC_RELAXED);
        tg_irq_handler_t h = tg_irq_handlers[v];
        if (h)
            h(v);
        if (v != TG_VEC_SPURIOUS)
            *(volatile u32 *)(tg_lapic_base + LAPIC_EOI) = 0;
        return;
    }
    if ((f->cs & 3) == 3) {
        if (v == VEC_UD && f->rip == (u64)tg_r0call_ud2) {
            f->rax = r0_service(f);
            f->rip += 2;
            return;
        }
        if (v == VEC_GP && r0_emulate_iopl(f))
            return;
    }
    r0_fault(f);
}
