/*
 * entry.S — the ring-0 side of the test guest, by hand.
 *
 * Boot contract: the VMM enters _start in 64-bit mode, CPL 0, CS=0x08,
 * paging on (its own identity map, no U bit), IF=0, RSI = boot_params.
 * _start switches to our GDT, our page tables (identity map with U=1, see
 * pagetables.S), our stack, sets up the IDT, TSS and GS base (kernel/r0.c),
 * then drops to ring 3 (IOPL 3, IF 0) at tg_main. From then on ring 0 runs
 * only for interrupts, exceptions and tg_r0call services.
 *
 * Every instruction here runs emulated on PVM hosts (~0.8 µs each): keep the
 * paths short, and use nothing KVM's emulator lacks (no int3, no xsave, no
 * cmpxchg16b, no fwait).
 */
#include "tg_layout.h"

    .file "entry.S"

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    movq %rsi, tg_boot_params(%rip)
    leaq tg_bsp_r0_stack_top(%rip), %rsp
    call tg_r0_load_gdt
    /* Our page tables: identity map of [0, 4 GiB) with the U bit. */
    leaq tg_pml4(%rip), %rax
    movq %rax, %cr3
    call tg_r0_setup_cr
    call tg_r0_idt_init
    leaq tg_bsp_cpu(%rip), %rdi
    call tg_r0_cpu_init
    leaq tg_main(%rip), %rdi
    movq tg_bsp_cpu + CPU_R3_STACK(%rip), %rsi
    xorl %edx, %edx
    jmp tg_r0_enter_user

/* Loads tg_gdt and reloads every segment register (CS through a far return). */
tg_r0_load_gdt:
    lgdt tg_gdt_ptr(%rip)
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    popq %rax
    pushq $SEL_KCODE
    pushq %rax
    lretq

/* CR0: FPU present (MP, NE), no emulation; CR4: PAE, SSE allowed, no SMEP/SMAP
 * (ring 0 touches ring-3 pages: every page here is a user page). */
tg_r0_setup_cr:
    movq %cr0, %rax
    andq $~(CR0_EM | CR0_TS), %rax
    orq $(CR0_MP | CR0_NE), %rax
    movq %rax, %cr0
    movq %cr4, %rax
    andq $~(CR4_SMEP | CR4_SMAP), %rax
    orq $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
    movq %rax, %cr4
    ret

/* tg_r0_enter_user(rdi = entry, rsi = ring-3 stack top, rdx = argument):
 * iretq to ring 3 with IOPL 3 and interrupts disabled. */
tg_r0_enter_user:
    pushq $SEL_UDATA
    subq $8, %rsi           /* as if `entry` had been called: RSP+8 16-byte aligned */
    pushq %rsi
    pushq $RFLAGS_USER
    pushq $SEL_UCODE
    pushq %rdi
    movq %rdx, %rdi
    iretq

/* ---- interrupt and exception entry ----------------------------------------- */

/* One 16-byte stub per vector: push a zero error code unless the CPU pushes
 * one (vectors 8, 10-14, 17, 21, 29, 30), push the vector, jump to the common path. */
    .section .text, "ax"
    .balign 16
    .globl tg_isr_stubs
tg_isr_stubs:
    vector = 0
    .rept 256
    .balign 16
    .if (vector == 8) || (vector >= 10 && vector <= 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp tg_isr_common
    vector = vector + 1
    .endr

/* Saves the caller-saved registers (the C handler keeps the others), calls
 * tg_r0_trap(frame), restores and returns. The CPU aligned RSP to 16 before
 * pushing its 5-word frame; 2 + 9 more words keep it aligned for the call. */
tg_isr_common:
    cld
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    movq %rsp, %rdi
    call tg_r0_trap
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq

/* ---- ring-3 -> ring-0 service calls ------------------------------------------ */

/* u64 tg_r0call(nr, a0, a1, a2): the ud2 at tg_r0call_ud2 (and only that one)
 * is a service request; kernel/r0.c answers in RAX and skips the ud2. A ud2
 * is used because on PVM hosts a ring-3 `syscall` and `int N` do not reach the
 * guest kernel (the host note, host-kvm.md), while #UD always does. */
    .globl tg_r0call, tg_r0call_ud2
tg_r0call:
    movq %rdi, %rax
    movq %rsi, %rdi
    movq %rdx, %rsi
    movq %rcx, %rdx
tg_r0call_ud2:
    ud2
    ret

/* ---- application processors ------------------------------------------------------ */

/* The trampoline (below) jumps here in 64-bit mode with RDI = struct tg_cpu *. */
tg_ap_entry64:
    movq CPU_R0_STACK(%rdi), %rsp
    movq %rdi, %rbx         /* callee-saved across the calls below */
    call tg_r0_load_gdt
    call tg_r0_setup_cr
    movq %rbx, %rdi
    call tg_r0_cpu_init
    movq %rbx, %rdx
    movq CPU_R3_STACK(%rbx), %rsi
    leaq tg_ap_main(%rip), %rdi
    jmp tg_r0_enter_user

/*
 * Real-mode AP trampoline, copied to TG_TRAMPOLINE (page-aligned, below 1 MiB)
 * by tg_start_ap. The SIPI starts it at CS = TG_TRAMPOLINE >> 4, IP = 0. It
 * loads our GDT (32-bit base: the image sits below 4 GiB), sets PAE, CR3 and
 * EFER.LME, then sets CR0.PE and CR0.PG together and far-jumps straight to
 * the 64-bit code segment (allowed: CS.L is 0 in real mode; KVM checks the same).
 */
    .section .data.trampoline, "aw"
    .balign 16
    .globl tg_trampoline_start, tg_trampoline_end, tg_trampoline_cpu
    .code16
tg_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl tramp_gdtr - tg_trampoline_start
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl tramp_cr3 - tg_trampoline_start, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PE | CR0_PG), %eax
    movl %eax, %cr0
    ljmpl $SEL_KCODE, $(TG_TRAMPOLINE + tramp64 - tg_trampoline_start)
    .code64
tramp64:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movq (TG_TRAMPOLINE + tg_trampoline_cpu - tg_trampoline_start), %rdi
    movabsq $tg_ap_entry64, %rax
    jmp *%rax
    .balign 8
tramp_gdtr:
    .word GDT_ENTRIES * 8 - 1
    .long tg_gdt
tramp_cr3:
    .long tg_pml4
    .balign 8
tg_trampoline_cpu:
    .quad 0
tg_trampoline_end:

/* ---- GDT ------------------------------------------------------------------------- */

    .section .data, "aw"
    .balign 16
    .globl tg_gdt
tg_gdt:
    .quad 0                     /* null */
    .quad 0x00af9b000000ffff    /* 0x08 kernel code: 64-bit (L), DPL 0 */
    .quad 0x00cf93000000ffff    /* 0x10 kernel data */
    .quad 0x00cff3000000ffff    /* 0x18 user data, DPL 3 */
    .quad 0x00affb000000ffff    /* 0x20 user code: 64-bit, DPL 3 */
    .fill GDT_ENTRIES - 5, 8, 0 /* 0x28.. TSS descriptors, filled by tg_r0_cpu_init */
tg_gdt_ptr:
    .word GDT_ENTRIES * 8 - 1
    .quad tg_gdt

    .globl tg_boot_params
    .balign 8
tg_boot_params:
    .quad 0

/* ---- BSP stacks (APs get theirs from tg_alloc_pages) -------------------------------- */

    .section .bss.noinit, "aw", @nobits
    .balign 4096
    .space TG_R0_STACK_SIZE
    .globl tg_bsp_r0_stack_top
tg_bsp_r0_stack_top:
    .space TG_R3_STACK_SIZE
    .globl tg_bsp_r3_stack_top
tg_bsp_r3_stack_top:
    .space TG_IST_STACK_SIZE
    .globl tg_bsp_ist_stack_top
tg_bsp_ist_stack_top:

    .section .note.GNU-stack, "", @progbits
