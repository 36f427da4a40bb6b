/*
 * acpi.c — finds and checks the ACPI tables the VMM wrote (ACPI 6.5 §5.2):
 * RSDP (§5.2.5) -> XSDT (§5.2.8) or RSDT (§5.2.7) -> every table, with the
 * MADT (§5.2.12) decoded and the DSDT reached through the FADT (§5.2.9).
 * Every checksum is verified; a bad one fails the test.
 */
#include "tg_internal.h"

#define SDT_HEADER_LEN 36
#define SDT_MAX_LEN (1u << 20)
/* MADT interrupt controller structure types (ACPI 6.5 Table 5.21). */
#define MADT_LOCAL_APIC 0
#define MADT_IO_APIC 1
#define MADT_ISO 2
#define MADT_LAPIC_ADDR_OVERRIDE 5
#define MADT_LOCAL_X2APIC 9

u8 tg_acpi_sum(const void *p, size_t len) {
    const u8 *b = p;
    u8 s = 0;
    while (len--)
        s += *b++;
    return s;
}

static u32 rd32(u64 a) { return *(const u32 *)a; }
static u64 rd64(u64 a) { return *(const u64 *)a; }

static int rsdp_valid(u64 a) {
    if (memcmp((const void *)a, "RSD PTR ", 8) != 0 || tg_acpi_sum((const void *)a, 20) != 0)
        return 0;
    u8 rev = *(const u8 *)(a + 15);
    if (rev >= 2) {
        u32 len = rd32(a + 20);
        if (len < 36 || len > 4096 || tg_acpi_sum((const void *)a, len) != 0)
            return 0;
    }
    return 1;
}

static u64 find_rsdp(void) {
    u64 a = rd64(tg_boot_params + BP_ACPI_RSDP_ADDR);
    if (a) {
        if (!rsdp_valid(a))
            tg_fail("ACPI: boot_params.acpi_rsdp_addr=%#lx holds no valid RSDP", a);
        return a;
    }
    /* ACPI 6.5 §5.2.5.1: 16-byte boundaries of 0xe0000..0xfffff. */
    for (a = 0xe0000; a < 0x100000; a += 16)
        if (rsdp_valid(a))
            return a;
    tg_fail("ACPI: no RSDP (boot_params.acpi_rsdp_addr is 0 and 0xe0000-0xfffff has none)");
}

/* Checks a table's signature, length and checksum; returns its length. */
static u32 check_sdt(u64 a, const char *expect_sig, int verbose) {
    if (a < 0x1000 || a >= (1ull << 40))
        tg_fail("ACPI: table pointer %#lx out of range", a);
    char sig[5];
    memcpy(sig, (const void *)a, 4);
    sig[4] = 0;
    if (expect_sig && memcmp(sig, expect_sig, 4) != 0)
        tg_fail("ACPI: expected %s at %#lx, found '%s'", expect_sig, a, sig);
    u32 len = rd32(a + 4);
    if (len < SDT_HEADER_LEN || len > SDT_MAX_LEN)
        tg_fail("ACPI: %s at %#lx has bad length %u", sig, a, len);
    u8 sum = tg_acpi_sum((const void *)a, len);
    if (sum != 0)
        tg_fail("ACPI: %s at %#lx checksum bad (sum %#x)", sig, a, sum);
    if (verbose) {
        char oem[7];
        memcpy(oem, (const void *)(a + 10), 6);
        oem[6] = 0;
        tg_printf("ACPI %s addr=%#lx len=%u rev=%u checksum=%#04x oem=%s ok\n", sig, a, len,
                  *(const u8 *)(a + 8), *(const u8 *)(a + 9), oem);
    }
    return len;
}

static void parse_madt(struct tg_acpi_info *out, u64 a, u32 len, int verbose) {
    out->madt_addr = a;
    out->lapic_addr = rd32(a + 36);
    u64 p = a + 44, end = a + len;
    while (p + 2 <= end) {
        u8 type = *(const u8 *)p, elen = *(const u8 *)(p + 1);
        if (elen < 2 || p + elen > end)
            tg_fail("ACPI: MADT entry at %#lx has bad length %u", p, elen);
        if (type == MADT_LOCAL_APIC && elen >= 8) {
            struct tg_madt_cpu c = { *(const u8 *)(p + 3), *(const u8 *)(p + 2), rd32(p + 4) };
            if (out->ncpus < TG_MAX_CPUS)
                out->cpus[out->ncpus++] = c;
            if (verbose)
                tg_printf("MADT LAPIC apic_id=%u uid=%u flags=%#x\n", c.apic_id, c.acpi_uid, c.flags);
        } else if (type == MADT_LOCAL_X2APIC && elen >= 16) {
            struct tg_madt_cpu c = { rd32(p + 4), rd32(p + 12), rd32(p + 8) };
            if (out->ncpus < TG_MAX_CPUS)
                out->cpus[out->ncpus++] = c;
            if (verbose)
                tg_printf("MADT X2APIC apic_id=%u uid=%u flags=%#x\n", c.apic_id, c.acpi_uid, c.flags);
        } else if (type == MADT_IO_APIC && elen >= 12) {
            out->ioapic_id = *(const u8 *)(p + 2);
            out->ioapic_addr = rd32(p + 4);
            out->ioapic_gsi_base = rd32(p + 8);
            if (verbose)
                tg_printf("MADT IOAPIC id=%u addr=%#x gsi_base=%u\n", out->ioapic_id, out->ioapic_addr,
                          out->ioapic_gsi_base);
        } else if (type == MADT_ISO && elen >= 10) {
            struct tg_madt_iso iso = { *(const u8 *)(p + 2), *(const u8 *)(p + 3), rd32(p + 4),
                                       *(const u16 *)(p + 8) };
            if (out->niso < TG_MAX_ISO)
                out->iso[out->niso++] = iso;
            if (verbose)
                tg_printf("MADT ISO bus=%u irq=%u gsi=%u flags=%#x\n", iso.bus, iso.source, iso.gsi, iso.flags);
        } else if (type == MADT_LAPIC_ADDR_OVERRIDE && elen >= 12) {
            out->lapic_addr = (u32)rd64(p + 4);
        } else if (verbose) {
            tg_printf("MADT entry type=%u len=%u\n", type, elen);
        }
        p += elen;
    }
}

static void parse_fadt(u64 a, u32 len, int verbose) {
    /* FADT: DSDT (32-bit) at offset 40, X_DSDT (64-bit) at 140 (ACPI 6.5 Table 5.9). */
    u64 dsdt = len >= 148 ? rd64(a + 140) : 0;
    if (!dsdt)
        dsdt = rd32(a + 40);
    if (dsdt)
        check_sdt(dsdt, "DSDT", verbose);
}

void tg_acpi_parse(struct tg_acpi_info *out, int verbose) {
    memset(out, 0, sizeof(*out));
    u64 rsdp = find_rsdp();
    out->rsdp_addr = rsdp;
    out->rsdp_revision = *(const u8 *)(rsdp + 15);
    if (verbose)
        tg_printf("ACPI RSDP addr=%#lx rev=%u checksum=%#04x ext_checksum=%#04x ok\n", rsdp, out->rsdp_revision,
                  *(const u8 *)(rsdp + 8), out->rsdp_revision >= 2 ? *(const u8 *)(rsdp + 32) : 0);
    u64 sdt = out->rsdp_revision >= 2 ? rd64(rsdp + 24) : 0;
    out->sdt_is_xsdt = sdt != 0;
    if (!sdt)
        sdt = rd32(rsdp + 16);
    out->sdt_addr = sdt;
    u32 len = check_sdt(sdt, out->sdt_is_xsdt ? "XSDT" : "RSDT", verbose);
    unsigned width = out->sdt_is_xsdt ? 8 : 4;
    unsigned n = (len - SDT_HEADER_LEN) / width;
    for (unsigned i = 0; i < n; i++) {
        u64 slot = sdt + SDT_HEADER_LEN + (u64)i * width;
        u64 t = width == 8 ? rd64(slot) : rd32(slot);
        u32 tlen = check_sdt(t, NULL, verbose);
        if (memcmp((const void *)t, "APIC", 4) == 0)
            parse_madt(out, t, tlen, verbose);
        else if (memcmp((const void *)t, "FACP", 4) == 0)
            parse_fadt(t, tlen, verbose);
    }
    if (!out->madt_addr)
        tg_fail("ACPI: no MADT (APIC) table in the %s", out->sdt_is_xsdt ? "XSDT" : "RSDT");
    if (out->lapic_addr)
        tg_lapic_base = out->lapic_addr;
    if (out->ioapic_addr)
        tg_ioapic_base = out->ioapic_addr;
}

u32 tg_acpi_isa_gsi(const struct tg_acpi_info *a, u8 isa_irq, u16 *flags) {
    for (unsigned i = 0; i < a->niso; i++)
        if (a->iso[i].bus == 0 && a->iso[i].source == isa_irq) {
            if (flags)
                *flags = a->iso[i].flags;
            return a->iso[i].gsi;
        }
    if (flags)
        *flags = 0;
    return isa_irq; /* ISA IRQs are identity-mapped unless overridden (ACPI 6.5 §5.2.12.5) */
}
