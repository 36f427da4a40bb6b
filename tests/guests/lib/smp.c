/*
 * smp.c — starting application processors (Intel SDM Vol. 3A §9.4.4.1, the
 * INIT-SIPI-SIPI sequence; MP spec §B.4). The BSP gives each AP a struct
 * tg_cpu with fresh stacks, copies the real-mode trampoline (arch/entry.S)
 * below 1 MiB, points it at that struct and sends the IPIs; the AP switches
 * to long mode, runs tg_r0_cpu_init and enters tg_ap_main in ring 3.
 */
#include "tg_internal.h"

#define ICR_INIT 0x00004500 /* delivery mode INIT, level assert */
#define ICR_SIPI 0x00004600 /* delivery mode Start-up, level assert; low byte = vector */

struct tg_cpu *tg_cpus[TG_MAX_CPUS] = { &tg_bsp_cpu };

static int ap_started(struct tg_cpu *cpu) { return __atomic_load_n(&cpu->started, __ATOMIC_ACQUIRE) != 0; }

static int wait_started(struct tg_cpu *cpu, u64 us) {
    u64 deadline = tg_deadline_us(us);
    while (!ap_started(cpu)) {
        if (rdtsc() > deadline)
            return 0;
        cpu_relax();
    }
    return 1;
}

int tg_start_ap(unsigned index, u32 apic_id, void (*entry)(void *), void *arg, u64 timeout_us) {
    if (index == 0 || index >= TG_MAX_CPUS)
        tg_fail("tg_start_ap: CPU index %u out of range", index);
    u64 tramp_len = (u64)(tg_trampoline_end - tg_trampoline_start);
    u64 bp = tg_boot_params, cmdline = *(const u32 *)(tg_boot_params + BP_CMD_LINE_PTR);
    if ((bp >= TG_TRAMPOLINE && bp < TG_TRAMPOLINE + 4096) || (cmdline >= TG_TRAMPOLINE && cmdline < TG_TRAMPOLINE + 4096))
        tg_fail("tg_start_ap: boot data overlaps the trampoline page %#x", TG_TRAMPOLINE);

    /* Layout of the AP's pages: struct tg_cpu | IST stack | ring-0 stack | ring-3 stack. */
    unsigned pages = 1 + TG_IST_STACK_SIZE / 4096 + TG_R0_STACK_SIZE / 4096 + TG_R3_STACK_SIZE / 4096;
    u8 *mem = tg_alloc_pages(pages);
    struct tg_cpu *cpu = (struct tg_cpu *)mem;
    cpu->self = cpu;
    cpu->index = index;
    cpu->apic_id = apic_id;
    cpu->ist_stack_top = (u64)mem + 4096 + TG_IST_STACK_SIZE;
    cpu->r0_stack_top = cpu->ist_stack_top + TG_R0_STACK_SIZE;
    cpu->r3_stack_top = cpu->r0_stack_top + TG_R3_STACK_SIZE;
    cpu->entry = (u64)entry;
    cpu->arg = (u64)arg;
    cpu->started = 0;
    tg_cpus[index] = cpu;

    memcpy((void *)TG_TRAMPOLINE, tg_trampoline_start, tramp_len);
    *(volatile u64 *)(TG_TRAMPOLINE + (tg_trampoline_cpu - tg_trampoline_start)) = (u64)cpu;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);

    if (tg_lapic_send_ipi(apic_id, ICR_INIT) < 0)
        tg_fail("INIT IPI to APIC %u not delivered (ICR busy)", apic_id);
    tg_udelay(10000);
    for (int sipi = 0; sipi < 2; sipi++) {
        if (tg_lapic_send_ipi(apic_id, ICR_SIPI | (TG_TRAMPOLINE >> 12)) < 0)
            tg_fail("SIPI to APIC %u not delivered (ICR busy)", apic_id);
        if (wait_started(cpu, sipi == 0 ? 200 : timeout_us))
            return 0;
    }
    return -1;
}
