/*
 * tg.h — the Ember test guest library (ring-3 C, freestanding).
 *
 * One header for everything a mode needs: types, port I/O and MMIO, atomics
 * and spinlocks, the serial console and printf, strings, boot_params, ACPI,
 * the local APIC / IOAPIC / PIT / TSC, interrupts, ring-0 services and SMP.
 *
 * Rings. The guest does almost all of its work in ring 3 (CPL 3, IOPL 3, so
 * port I/O, cli and sti work there): on nested PVM hosts ring-0 code is
 * emulated instruction by instruction (~0.8 µs each) while ring 3 runs
 * natively. Ring 0 (arch/entry.S, kernel/r0.c) only sets the CPU up, takes
 * interrupts and exceptions, and serves the few requests ring 3 cannot do
 * itself (tg_cpuid, tg_rdmsr, halting). Functions marked TG_RING0 run in
 * ring 0: keep them to a handful of instructions.
 */
#ifndef TG_H
#define TG_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

#define TG_NORETURN __attribute__((noreturn))
#define TG_PRINTF(f, a) __attribute__((format(printf, f, a)))
/* Documentation marker: this function is called in ring 0 (interrupt handlers). */
#define TG_RING0
#define TG_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define TG_ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))

#include "tg_layout.h"

/* ---- port I/O and MMIO ------------------------------------------------------ */

static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
/* With IOPL 3 these work in ring 3 (kernel/r0.c emulates them if the host traps them). */
static inline void tg_cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void tg_sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline u64 tg_rflags(void) { u64 f; __asm__ volatile("pushfq; popq %0" : "=r"(f)); return f; }

/* ---- atomics and spinlocks --------------------------------------------------- */

typedef struct { volatile u64 v; } tg_atomic_t;

static inline u64 tg_atomic_read(tg_atomic_t *a) { return __atomic_load_n(&a->v, __ATOMIC_SEQ_CST); }
static inline void tg_atomic_set(tg_atomic_t *a, u64 v) { __atomic_store_n(&a->v, v, __ATOMIC_SEQ_CST); }
/* Returns the new value. */
static inline u64 tg_atomic_add(tg_atomic_t *a, u64 n) { return __atomic_add_fetch(&a->v, n, __ATOMIC_SEQ_CST); }
static inline u64 tg_atomic_inc(tg_atomic_t *a) { return tg_atomic_add(a, 1); }

typedef struct { volatile u32 locked; } tg_spinlock_t;
#define TG_SPINLOCK_INIT { 0 }

static inline int tg_spin_trylock(tg_spinlock_t *l) {
    return !__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE);
}
static inline void tg_spin_lock(tg_spinlock_t *l) {
    while (!tg_spin_trylock(l))
        while (__atomic_load_n(&l->locked, __ATOMIC_RELAXED))
            cpu_relax();
}
static inline void tg_spin_unlock(tg_spinlock_t *l) { __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE); }

/* ---- strings (lib/string.c) ------------------------------------------------- */

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);
/* Parses decimal or 0x-prefixed hex; *end (if given) points past the digits. */
u64 tg_strtou64(const char *s, const char **end);

/* ---- serial console (lib/serial.c, lib/printf.c) ---------------------------- */

/* 16550 registers (PC16550D datasheet, "Register Summary"): offsets from the base port. */
#define UART_RBR 0 /* receive buffer (read, DLAB=0) */
#define UART_THR 0 /* transmit holding (write, DLAB=0) */
#define UART_IER 1 /* interrupt enable */
#define UART_IIR 2 /* interrupt identification (read) */
#define UART_FCR 2 /* FIFO control (write) */
#define UART_LCR 3 /* line control */
#define UART_MCR 4 /* modem control */
#define UART_LSR 5 /* line status */
#define UART_MSR 6 /* modem status */
#define UART_SCR 7 /* scratch */
#define UART_IER_RDI 0x01  /* received data available */
#define UART_IER_THRI 0x02 /* transmit holding register empty */
#define UART_IIR_NO_INT 0x01
#define UART_IIR_ID 0x0e
#define UART_IIR_MSI 0x00
#define UART_IIR_THRI 0x02
#define UART_IIR_RDI 0x04
#define UART_IIR_RLSI 0x06
#define UART_IIR_TIMEOUT 0x0c
#define UART_LSR_DR 0x01
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40
#define UART_MCR_DTR 0x01
#define UART_MCR_RTS 0x02
#define UART_MCR_OUT2 0x08 /* gates the interrupt output on PC hardware */

void tg_serial_init(void);
/* Polled output of raw bytes (LSR.THRE checked before each byte), under the console lock. */
void tg_console_write(const char *s, size_t n);
int tg_printf(const char *fmt, ...) TG_PRINTF(1, 2);
int tg_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int tg_snprintf(char *buf, size_t size, const char *fmt, ...) TG_PRINTF(3, 4);
/* Lock held by tg_console_write; modes that drive the UART themselves take it too. */
extern tg_spinlock_t tg_console_lock;

/* ---- test protocol (core/main.c) -------------------------------------------- */

/* The running mode's name, for messages. */
extern const char *tg_mode_name;
/* Prints "TESTGUEST <mode> FAIL <reason>" and resets the machine. */
TG_NORETURN void tg_fail(const char *fmt, ...) TG_PRINTF(1, 2);
/* Resets the machine through the i8042 (0xFE to port 0x64); the VMM exits 0. */
TG_NORETURN void tg_reset(void);
/* Boolean check: on failure, FAIL with the expression text and location. */
#define TG_CHECK(cond) \
    do { if (!(cond)) tg_fail("check failed: %s (%s:%d)", #cond, __FILE__, __LINE__); } while (0)

/* A value of the kernel command line ("key=value" words); NULL if absent. */
const char *tg_cmdline_get(const char *key, char *buf, size_t size);
/* A numeric command-line value, or `def` if absent. */
u64 tg_cmdline_u64(const char *key, u64 def);
extern const char *tg_cmdline; /* the whole command line (a copy) */

/* ---- boot_params (Linux Documentation/arch/x86/zero-page.rst) ---------------- */

#define BP_ACPI_RSDP_ADDR 0x070 /* u64 */
#define BP_E820_ENTRIES 0x1e8   /* u8 */
#define BP_CMD_LINE_PTR 0x228   /* u32, in setup_header */
#define BP_E820_TABLE 0x2d0     /* struct boot_e820_entry[128] */
#define BP_E820_MAX 128
#define E820_TYPE_RAM 1

struct tg_e820_entry {
    u64 addr;
    u64 size;
    u32 type;
} __attribute__((packed));

extern u64 tg_boot_params; /* physical address the VMM passed in RSI */
unsigned tg_e820_count(void);
const struct tg_e820_entry *tg_e820_entry(unsigned i);
/* One past the highest RAM byte in the e820 map. */
u64 tg_ram_top(void);

/* ---- ACPI (lib/acpi.c; ACPI 6.5 §5.2) ---------------------------------------- */

#define TG_MAX_CPUS 64
#define TG_MAX_ISO 16

struct tg_madt_cpu {
    u32 apic_id;
    u32 acpi_uid;
    u32 flags; /* bit 0: enabled, bit 1: online capable */
};

struct tg_madt_iso {
    u8 bus, source; /* ISA IRQ */
    u32 gsi;
    u16 flags; /* polarity bits 1:0, trigger mode bits 3:2 (ACPI 6.5 Table 5.26) */
};

struct tg_acpi_info {
    u64 rsdp_addr;
    u8 rsdp_revision;
    u64 sdt_addr; /* XSDT (revision >= 2) or RSDT */
    int sdt_is_xsdt;
    u64 madt_addr;
    u32 lapic_addr;
    u32 ioapic_addr;
    u8 ioapic_id;
    u32 ioapic_gsi_base;
    unsigned ncpus;
    struct tg_madt_cpu cpus[TG_MAX_CPUS];
    unsigned niso;
    struct tg_madt_iso iso[TG_MAX_ISO];
};

/* Finds and checks RSDP -> XSDT/RSDT -> every table (MADT decoded, DSDT via the
 * FADT); prints each one when `verbose`. Any bad pointer or checksum fails the test. */
void tg_acpi_parse(struct tg_acpi_info *out, int verbose);
/* An ISA IRQ's GSI and its polarity/trigger flags, per the MADT's source overrides. */
u32 tg_acpi_isa_gsi(const struct tg_acpi_info *a, u8 isa_irq, u16 *flags);
/* Sum of `len` bytes (ACPI checksums make the sum 0 mod 256). */
u8 tg_acpi_sum(const void *p, size_t len);

/* ---- CPU: ring-0 services, CPUID, MSRs ---------------------------------------- */

struct tg_cpuid { u32 eax, ebx, ecx, edx; };
/* CPUID executed in ring 0 (ring-3 CPUID may bypass the VMM's table on some hosts). */
void tg_cpuid(u32 leaf, u32 subleaf, struct tg_cpuid *out);
u64 tg_rdmsr(u32 msr);
void tg_wrmsr(u32 msr, u64 value);
u64 tg_read_cr(int n);
/* Reloads CR3 with `cr3` (flushes the TLB). */
void tg_load_cr3(u64 cr3);
/* Waits for an interrupt. Call with interrupts disabled (tg_cli) after checking
 * the wake-up condition: the wait is `sti; hlt` in ring 0, so an interrupt that
 * arrives in between is not lost. Returns with interrupts still disabled. */
void tg_wait_for_interrupt(void);
/* Stops this CPU for good (cli; hlt): used by APs that are done. */
TG_NORETURN void tg_halt_forever(void);
/* Calls `cond(arg)` with interrupts disabled until it is true, sleeping in between. */
void tg_wait_until(int (*cond)(void *), void *arg);

/* ---- per-CPU data -------------------------------------------------------------- */

struct tg_cpu;
struct tg_cpu *tg_this_cpu(void);
unsigned tg_cpu_index(void);

/* ---- interrupts (lib/irq.c) ------------------------------------------------------ */

#define TG_VEC_SERIAL 0x24  /* COM1 through the IOAPIC */
#define TG_VEC_LAPIC_TIMER 0x40
#define TG_VEC_IOAPIC_BASE 0x50 /* + pin, for tests that probe several pins */
#define TG_VEC_SPURIOUS 0xff

/* A ring-0 interrupt handler: runs with interrupts disabled; the EOI is sent after it. */
typedef void (*tg_irq_handler_t)(u64 vector);
void tg_irq_register(unsigned vector, tg_irq_handler_t fn);
/* Number of times `vector` was taken (all CPUs). */
u64 tg_irq_count(unsigned vector);

/* ---- local APIC, IOAPIC, 8259, PIT, TSC (lib/apic.c, lib/timer.c) ------------- */

/* Intel SDM Vol. 3A §11.4.1 / Table 11-1: xAPIC register offsets. */
#define LAPIC_ID 0x020
#define LAPIC_VERSION 0x030
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_ESR 0x280
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_CCR 0x390
#define LAPIC_TIMER_DCR 0x3e0
#define LAPIC_LVT_MASKED (1u << 16)
#define LAPIC_TIMER_PERIODIC (1u << 17)
#define LAPIC_ICR_BUSY (1u << 12)

extern u64 tg_lapic_base;
static inline u32 lapic_read(u32 reg) { return mmio_read32(tg_lapic_base + reg); }
static inline void lapic_write(u32 reg, u32 v) { mmio_write32(tg_lapic_base + reg, v); }
/* Software-enables this CPU's LAPIC (SVR), TPR 0, masks LINT0 and the error LVT. */
void tg_lapic_init(void);
u32 tg_lapic_id(void);
/* Sends an IPI: ICR high = dest << 24, low = `icr_lo`; waits for delivery. Returns 0 or -1 on timeout. */
int tg_lapic_send_ipi(u32 dest_apic_id, u32 icr_lo);

/* IOAPIC (82093AA datasheet §3.2): IOREGSEL at +0, IOWIN at +0x10; redirection entries at 0x10 + 2*pin. */
#define IOAPIC_REG_ID 0x00
#define IOAPIC_REG_VER 0x01
#define IOAPIC_REDTBL 0x10
#define IOAPIC_RTE_MASKED (1u << 16)
#define IOAPIC_RTE_LEVEL (1u << 15)
#define IOAPIC_RTE_ACTIVE_LOW (1u << 13)
extern u64 tg_ioapic_base;
u32 tg_ioapic_read(u32 reg);
void tg_ioapic_write(u32 reg, u32 v);
unsigned tg_ioapic_pins(void);
/* Routes `pin` to `vector` on `dest_apic_id` (fixed delivery, physical destination). */
void tg_ioapic_route(unsigned pin, u8 vector, u32 dest_apic_id, u32 flags);
void tg_ioapic_mask(unsigned pin);
/* Redirection-entry polarity/trigger bits for an ISA IRQ from its MADT ISO flags
 * (ACPI 6.5 Table 5.26; "conforms to the bus" = ISA: active high, edge). */
u32 tg_ioapic_isa_flags(u16 madt_flags);
/* Remaps both 8259s to vectors 0x20..0x2f and masks every line (we use the IOAPIC). */
void tg_pic_disable(void);

/* i8253/i8254 PIT: 1.193182 MHz input clock. */
#define PIT_HZ 1193182u
/* Programs channel 0 as a rate generator (mode 2) at ~`hz`. */
void tg_pit_start(unsigned hz);
void tg_pit_stop(void);
/* TSC frequency in Hz, calibrated once against PIT channel 2 (~50 ms). */
u64 tg_tsc_hz(void);
/* Busy-waits (ring 3) for `us` microseconds. */
void tg_udelay(u64 us);
/* TSC deadline `us` microseconds from now. */
u64 tg_deadline_us(u64 us);

/* ---- SMP (lib/smp.c) ---------------------------------------------------------- */

/* Starts the AP with `apic_id` as CPU number `index` (INIT-SIPI-SIPI through the
 * real-mode trampoline); it enters `entry(arg)` in ring 3 on its own stacks.
 * Returns 0 once the AP runs, -1 if it did not start within `timeout_us`. */
int tg_start_ap(unsigned index, u32 apic_id, void (*entry)(void *), void *arg, u64 timeout_us);

/* ---- memory -------------------------------------------------------------------- */

/* Zeroed pages from a bump allocator above the image (never freed). */
void *tg_alloc_pages(unsigned n);

/* ---- modes (modes/modes.def) --------------------------------------------------- */

struct tg_mode {
    const char *name;
    const char *help;
    /* Returns 0 for PASS; may call tg_fail() instead (which does not return). */
    int (*run)(void);
};
extern const struct tg_mode tg_modes[];
extern const unsigned tg_nmodes;

#endif /* TG_H */
