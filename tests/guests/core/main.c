/*
 * main.c — ring-3 start of the test guest: checks the image, brings up the
 * console, maps RAM above 4 GiB, picks the mode from the command line
 * (`mode=<name>`), runs it and reports with the output protocol:
 *
 *     TESTGUEST <mode> START
 *     ... the mode's own lines ...
 *     TESTGUEST <mode> PASS            or   TESTGUEST <mode> FAIL <reason>
 *
 * then resets the machine through the i8042 so the VMM exits with status 0.
 * An exception anywhere prints `TESTGUEST EXCEPTION vec=.. err=.. rip=.. cr2=..`
 * (tg_fault_report) and resets too.
 */
#include "tg_internal.h"

#define CMDLINE_MAX 2048
#define GIB (1ull << 30)

extern char tg_bsp_r0_stack_top[], tg_bsp_r3_stack_top[], tg_bsp_ist_stack_top[];

struct tg_cpu tg_bsp_cpu = {
    .self = &tg_bsp_cpu,
    .index = 0,
    .r0_stack_top = (u64)tg_bsp_r0_stack_top,
    .r3_stack_top = (u64)tg_bsp_r3_stack_top,
    .ist_stack_top = (u64)tg_bsp_ist_stack_top,
    .started = 1,
};

const char *tg_mode_name = "none";
static char cmdline_buf[CMDLINE_MAX];
const char *tg_cmdline = cmdline_buf;

/* ---- reset and failure ---- */

void tg_reset(void) {
    outb(0x64, 0xfe);
    /* The VMM should be gone within 3 s; if it ignores the reset, say so once.
     * (No calibration here: tg_reset may be reached from a failed one.) */
    u64 hz = tg_tsc_hz_if_known();
    u64 end = rdtsc() + 3 * (hz ? hz : 4000000000ull);
    while (rdtsc() < end)
        cpu_relax();
    tg_printf("TESTGUEST RESET IGNORED\n");
    tg_halt_forever();
}

void tg_fail(const char *fmt, ...) {
    char reason[400];
    va_list ap;
    va_start(ap, fmt);
    tg_vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    tg_printf("TESTGUEST %s FAIL %s\n", tg_mode_name, reason);
    tg_reset();
}

void tg_fault_report(void) {
    /* The faulting CPU may hold the console lock: wait a little, then take it over. */
    for (unsigned i = 0; i < 1000000 && !tg_spin_trylock(&tg_console_lock); i++)
        cpu_relax();
    tg_spin_unlock(&tg_console_lock);
    tg_printf("\nTESTGUEST EXCEPTION vec=%lu err=%#lx rip=%#lx cr2=%#lx cs=%#lx rsp=%#lx cpu=%u mode=%s\n",
              tg_fault.vector, tg_fault.error, tg_fault.rip, tg_fault.cr2, tg_fault.cs, tg_fault.rsp, tg_fault.cpu,
              tg_mode_name);
    tg_reset();
}

/* ---- command line ---- */

static void copy_cmdline(void) {
    u32 ptr = *(const u32 *)(tg_boot_params + BP_CMD_LINE_PTR);
    if (!ptr)
        return;
    const char *src = (const char *)(u64)ptr;
    size_t n = strnlen(src, CMDLINE_MAX - 1);
    memcpy(cmdline_buf, src, n);
    cmdline_buf[n] = 0;
}

const char *tg_cmdline_get(const char *key, char *buf, size_t size) {
    size_t klen = strlen(key);
    const char *p = tg_cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - word) > klen && strncmp(word, key, klen) == 0 && word[klen] == '=') {
            const char *v = word + klen + 1;
            size_t n = (size_t)(p - v);
            if (n >= size)
                n = size - 1;
            memcpy(buf, v, n);
            buf[n] = 0;
            return buf;
        }
    }
    return NULL;
}

u64 tg_cmdline_u64(const char *key, u64 def) {
    char buf[32];
    return tg_cmdline_get(key, buf, sizeof(buf)) ? tg_strtou64(buf, NULL) : def;
}

/* ---- start-up checks and memory ---- */

/* The ELF loader must zero p_memsz beyond p_filesz: nothing has written .bss yet. */
static u64 first_nonzero_bss(void) {
    for (const u64 *p = (const u64 *)tg_bss_start; p < (const u64 *)tg_bss_end; p++)
        if (*p)
            return (u64)p;
    return 0;
}

/* The static tables map [0, 4 GiB); give RAM above that 2 MiB pages too. */
static void map_high_ram(void) {
    u64 top = tg_ram_top();
    if (top <= 4 * GIB)
        return;
    u64 ngib = (top + GIB - 1) / GIB;
    if (ngib > TG_MAX_PHYS_GIB)
        tg_fail("RAM reaches %#lx: more than the %u GiB one PDPT maps", top, TG_MAX_PHYS_GIB);
    for (u64 g = 4; g < ngib; g++) {
        if (tg_pdpt[g])
            continue;
        u64 *pd = tg_alloc_pages(1);
        for (u64 i = 0; i < 512; i++)
            pd[i] = (g * GIB + i * (2ull << 20)) | PTE_LARGE;
        tg_pdpt[g] = (u64)pd | PTE_TABLE;
    }
    tg_load_cr3((u64)tg_pml4);
}

static const struct tg_mode *find_mode(const char *name) {
    for (unsigned i = 0; i < tg_nmodes; i++)
        if (strcmp(tg_modes[i].name, name) == 0)
            return &tg_modes[i];
    return NULL;
}

static void list_modes(char *buf, size_t size) {
    size_t n = 0;
    buf[0] = 0;
    for (unsigned i = 0; i < tg_nmodes; i++)
        n += (size_t)tg_snprintf(buf + n, n < size ? size - n : 0, "%s%s", i ? " " : "", tg_modes[i].name);
}

void tg_main(void) {
    u64 dirty_bss = first_nonzero_bss();
    tg_serial_init();
    copy_cmdline();
    tg_bsp_cpu.apic_id = tg_lapic_id();

    static char name[32], known[256];
    if (tg_cmdline_get("mode", name, sizeof(name)))
        tg_mode_name = name;
    tg_printf("TESTGUEST %s START\n", tg_mode_name);
    if (dirty_bss)
        tg_fail(".bss not zeroed by the loader: nonzero byte near %#lx", dirty_bss);
    map_high_ram();

    const struct tg_mode *mode = find_mode(tg_mode_name);
    if (!mode) {
        list_modes(known, sizeof(known));
        tg_fail("unknown mode '%s' (cmdline: '%s'); modes: %s", tg_mode_name, tg_cmdline, known);
    }
    int rc = mode->run();
    if (rc)
        tg_fail("mode returned %d", rc);
    tg_printf("TESTGUEST %s PASS\n", tg_mode_name);
    tg_reset();
}

void tg_ap_main(struct tg_cpu *cpu) {
    __atomic_store_n(&cpu->started, 1, __ATOMIC_RELEASE);
    ((void (*)(void *))cpu->entry)((void *)cpu->arg);
    tg_halt_forever();
}
