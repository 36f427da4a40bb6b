/*
 * smp — ACPI and application processors.
 *
 * Parses RSDP -> XSDT -> MADT (every checksum verified and printed), then
 * starts each enabled CPU the MADT lists (INIT-SIPI-SIPI, lib/smp.c). Every
 * CPU, the BSP included, reads its APIC ID three ways — CPUID.1:EBX[31:24],
 * CPUID.0xB:EDX (x2APIC ID) and the LAPIC ID register — which must all equal
 * its MADT entry, runs a counting loop in ring 3, bumps an atomic counter and
 * prints `CPU <apic_id> online ...`. The BSP waits (bounded) for all of them
 * and prints `CPUS <n>`. APs then halt.
 *
 * Command line: smp.loops=<counting-loop iterations, default 10000000>.
 */
#include "tg.h"

#define AP_START_TIMEOUT_US 5000000
#define ALL_ONLINE_TIMEOUT_US 20000000

static struct tg_acpi_info acpi;
static tg_atomic_t online, mismatches;
static u64 loops;

static void cpu_report(const struct tg_madt_cpu *madt) {
    struct tg_cpuid r;
    tg_cpuid(0, 0, &r);
    u32 max_leaf = r.eax;
    tg_cpuid(1, 0, &r);
    u32 id_leaf1 = r.ebx >> 24;
    u32 id_leaf_b = 0xffffffff;
    if (max_leaf >= 0xb) {
        tg_cpuid(0xb, 0, &r);
        id_leaf_b = r.edx;
    }
    u32 id_lapic = tg_lapic_id();

    u64 n = loops, t0 = rdtsc();
    __asm__ volatile("1: dec %0; jnz 1b" : "+r"(n)); /* ring 3: native speed */
    u64 cycles = rdtsc() - t0;

    if (id_leaf1 != madt->apic_id || id_leaf_b != madt->apic_id || id_lapic != madt->apic_id) {
        tg_atomic_inc(&mismatches);
        tg_printf("CPU %u MISMATCH index=%u madt=%u cpuid1=%u cpuidB=%d lapic=%u max_leaf=%#x\n", madt->apic_id,
                  tg_cpu_index(), madt->apic_id, id_leaf1, (int)id_leaf_b, id_lapic, max_leaf);
    } else {
        tg_printf("CPU %u online index=%u cpuid1=%u cpuidB=%u lapic=%u loop_us=%lu\n", madt->apic_id,
                  tg_cpu_index(), id_leaf1, id_leaf_b, id_lapic, cycles * 1000000 / tg_tsc_hz());
    }
    tg_atomic_inc(&online);
}

static void ap_entry(void *arg) {
    tg_lapic_init();
    cpu_report(arg);
}

int mode_smp(void) {
    loops = tg_cmdline_u64("smp.loops", 10000000);
    if (!loops)
        loops = 1;
    tg_acpi_parse(&acpi, 1);
    tg_tsc_hz(); /* calibrate once, on the BSP */
    tg_lapic_init();
    u32 bsp_id = tg_lapic_id();

    const struct tg_madt_cpu *bsp = NULL;
    unsigned enabled = 0;
    for (unsigned i = 0; i < acpi.ncpus; i++) {
        if (!(acpi.cpus[i].flags & 1))
            continue;
        enabled++;
        if (acpi.cpus[i].apic_id == bsp_id)
            bsp = &acpi.cpus[i];
    }
    tg_printf("MADT cpus=%u enabled=%u bsp_apic_id=%u\n", acpi.ncpus, enabled, bsp_id);
    if (!bsp)
        tg_fail("the BSP (APIC ID %u) is not an enabled CPU in the MADT", bsp_id);
    cpu_report(bsp);

    unsigned index = 1, failed = 0;
    for (unsigned i = 0; i < acpi.ncpus; i++) {
        const struct tg_madt_cpu *c = &acpi.cpus[i];
        if (!(c->flags & 1) || c == bsp)
            continue;
        if (tg_start_ap(index++, c->apic_id, ap_entry, (void *)c, AP_START_TIMEOUT_US) < 0) {
            tg_printf("CPU %u did not start\n", c->apic_id);
            failed++;
        }
    }

    u64 deadline = tg_deadline_us(ALL_ONLINE_TIMEOUT_US);
    while (tg_atomic_read(&online) < enabled - failed && rdtsc() < deadline)
        cpu_relax();
    u64 n = tg_atomic_read(&online);
    tg_printf("CPUS %lu\n", n);
    if (failed || n != enabled)
        tg_fail("%lu of %u CPUs online", n, enabled);
    if (tg_atomic_read(&mismatches))
        tg_fail("%lu CPUs report APIC IDs that differ from the MADT", tg_atomic_read(&mismatches));
    return 0;
}
