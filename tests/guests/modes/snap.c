/*
 * snap — a guest for snapshot/restore tests: it runs numbered rounds paced by
 * the LAPIC timer and checks, every round, that its state is still exactly what
 * it left, so a VM paused, saved, restored in another VMM process and resumed
 * at any moment must go on as if nothing happened.
 *
 * Set-up (once):
 *   SNAP CONFIG rounds=<n> round_ms=<ms> hz=<hz> round_ticks=<t> mem_mb=<m> seed=<hex> idle=hlt|spin
 *   VIRTIO ...                                (lib/virtio.c's scan lines)
 *   SNAP TIMER clock=<kHz> kHz initial=<count> hz=<hz>
 *   SNAP BLK drive=0 slot=<s> capacity=<sectors> sectors=<n> sum=<crc32>
 *     or SNAP BLK none                        (no virtio-blk device: the block part is skipped)
 *   SNAP MEM mb=<m> pages=<p> sum=<a>:<b>
 * then one line per round, nothing else:
 *   SNAP round=<n> ticks=<t> mem=ok|BAD blk=ok|BAD|none
 * and PASS after the last round. A BAD line is followed by FAIL naming what
 * differed. Inconsistent state ends the run with
 *   SNAP FAIL <what> ...                      then TESTGUEST snap FAIL <reason>
 *
 * What a round checks:
 *   - registers: the round counter lives only in r15 of the ring-3 loop in
 *     snap_loop (assembly below), with rbx = ~r15, r13 = r15 * SIG and r14 =
 *     SIG beside it. Each round compares r15 with the count of finished rounds
 *     kept in memory (a stall, skip or replay shows as a mismatch) and the
 *     other three registers with r15. With snap.idle=spin those registers are
 *     live in the CPU while ring 3 spins between rounds, which is where a
 *     pause then lands; with hlt the CPU mostly sits in the ring-0 `hlt`.
 *   - memory: an array of snap.mem_mb MiB, word i of page p is
 *     pattern(seed, i, generation of p); each round first verifies the whole
 *     array's Fletcher-style checksum against the value the model predicts,
 *     then rewrites UPDATE_PAGES pages (a rolling window, next generation)
 *     and updates the expected checksum from the model (never from memory).
 *   - the timer: rounds are paced by LAPIC periodic timer ticks counted by a
 *     ring-0 handler (one increment), round_ticks = round_ms * hz / 1000; the
 *     printed tick count must keep increasing across a restore. Between rounds
 *     the CPU sleeps in `hlt` (snap.idle=hlt, the default) or ring 3 spins with
 *     interrupts on (snap.idle=spin); either way only the armed timer ends the
 *     wait, so a timer that stops firing after a restore stops the rounds
 *     (the host sees no further SNAP line).
 *   - virtio-blk (drive 0, if any): sectors [0, snap.blk_sectors) are read in
 *     4 KiB requests on a 16-entry queue (the ring wraps every few rounds) into
 *     a buffer poisoned first; their CRC-32 must equal the set-up read's, so a
 *     device that lost its ring indices (re-running or ignoring requests)
 *     fails here or in the driver's used-ring checks.
 *
 * Options: snap.rounds=<n> (50), snap.round_ms=<ms> (100), snap.hz=<Hz> (100),
 * snap.mem_mb=<MiB> (8), snap.seed=<n> (0x5eed), snap.idle=hlt|spin (hlt),
 * snap.blk_sectors=<n> (16, at most 32, capped at the capacity),
 * snap.blk_timeout_ms=<ms> (5000, in timer ticks).
 */
#include "virtio.h"

/* r14's constant; odd, so r13 = r15 * SIG (mod 2^64) never repeats. No suffix: the assembly uses it too. */
#define SNAP_SIG_ASM 0x5eadc0de12345679
#define SNAP_SIG ((u64)SNAP_SIG_ASM)
#define SNAP_STR_(x) #x
#define SNAP_STR(x) SNAP_STR_(x)
#define UPDATE_PAGES 4                 /* pages rewritten per round */
#define WORDS_PER_PAGE (4096 / 8)
#define BLK_QUEUE_SIZE 16
#define BLK_REQ_SECTORS 8 /* 4 KiB per request */
#define BLK_MAX_REQS 4    /* 3 descriptors each: 12 of the 16 */
#define BLK_MAX_SECTORS (BLK_REQ_SECTORS * BLK_MAX_REQS)

struct blk_req {
    struct virtio_blk_req_hdr hdr; /* device-readable */
    volatile u8 status;            /* device-writable */
    volatile u8 done;
};

/* Everything the rounds need. The first two fields are read by snap_loop. */
struct snap {
    volatile u64 target; /* offset 0: snap_ticks value the next round waits for */
    u64 spin;            /* offset 8: idle by spinning in ring 3 instead of hlt */
    u64 rounds, round_ticks, seed;
    u64 round;      /* rounds finished: the memory copy of r15 */
    u64 last_ticks; /* tick count printed by the previous round */
    /* memory */
    u64 *mem;
    u64 pages, words;
    u64 sum_a, sum_b; /* expected checksum of mem[] */
    /* virtio-blk drive 0 (dev == NULL: none) */
    struct virtio_dev *dev;
    struct virtq *vq;
    struct blk_req *reqs;
    u8 *buf;
    u64 blk_sectors, blk_timeout_ticks;
    u32 blk_sum;
};
_Static_assert(__builtin_offsetof(struct snap, target) == 0, "snap_loop reads target at 0");
_Static_assert(__builtin_offsetof(struct snap, spin) == 8, "snap_loop reads spin at 8");

/* LAPIC timer ticks since the timer was armed; the only thing ring 0 does for this mode. */
volatile u64 snap_ticks;

TG_RING0 static void snap_tick(u64 vector) {
    (void)vector;
    snap_ticks++;
}

int snap_round(struct snap *s, u64 reg_round, u64 reg_not, u64 reg_mul, u64 reg_sig);
u64 snap_loop(struct snap *s);

/*
 * u64 snap_loop(struct snap *s): the ring-3 round loop, in assembly so that the
 * round counter provably lives in a register (r15) for the whole run and never
 * in memory. Callee-saved registers (SysV ABI) survive the calls to C; they
 * survive interrupts and the `hlt` service because the trap path saves and
 * restores them; and they must survive a snapshot. Per round: wait until
 * snap_ticks >= s->target (hlt: tg_wait_for_interrupt with interrupts off in
 * ring 3, as lib/virtio.c sleeps; spin: sti, pause loop, cli), then
 * snap_round(s, r15, rbx, r13, r14); a non-zero return ends the loop.
 * Five pushes after the return address keep rsp 16-byte aligned at the calls.
 */
__asm__(
    "    .text\n"
    "    .globl snap_loop\n"
    "    .type snap_loop, @function\n"
    "snap_loop:\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rdi, %r12\n"            /* r12: the context */
    "    xorl %r15d, %r15d\n"          /* r15: the round counter */
    "    movabsq $" SNAP_STR(SNAP_SIG_ASM) ", %r14\n"
    "1:  incq %r15\n"
    "    movq %r15, %rbx\n"
    "    notq %rbx\n"                  /* rbx = ~round */
    "    movq %r15, %r13\n"
    "    imulq %r14, %r13\n"           /* r13 = round * SIG */
    "    cmpq $0, 8(%r12)\n"
    "    jne 3f\n"
    "2:  movq snap_ticks(%rip), %rax\n" /* idle=hlt */
    "    cmpq (%r12), %rax\n"
    "    jae 4f\n"
    "    call tg_wait_for_interrupt\n"
    "    jmp 2b\n"
    "3:  sti\n"                        /* idle=spin */
    "5:  pause\n"
    "    movq snap_ticks(%rip), %rax\n"
    "    cmpq (%r12), %rax\n"
    "    jb 5b\n"
    "    cli\n"
    "4:  movq %r12, %rdi\n"
    "    movq %r15, %rsi\n"
    "    movq %rbx, %rdx\n"
    "    movq %r13, %rcx\n"
    "    movq %r14, %r8\n"
    "    call snap_round\n"
    "    testl %eax, %eax\n"
    "    jz 1b\n"
    "    movq %r15, %rax\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    ret\n"
    "    .size snap_loop, .-snap_loop\n");

/* ---- memory: the model and the checksum ---- */

/* splitmix64's finaliser over (seed, word index, generation). */
static u64 pattern(u64 seed, u64 i, u64 gen) {
    u64 z = seed + i * 0x9e3779b97f4a7c15ull + gen * 0xd1b54a32d192ed03ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* How often page p was rewritten after `rounds` rounds: round r rewrites the
 * pages [(r-1)*U, r*U) modulo the page count, so rewrites walk the pages in a
 * cycle and page p's k-th rewrite is rewrite number p + (k-1)*pages overall. */
static u64 generation(const struct snap *s, u64 p, u64 rounds) {
    return (rounds * UPDATE_PAGES + s->pages - 1 - p) / s->pages;
}

/* Fletcher-style: a = sum of the words, b = sum of the running a (so b weighs
 * word i by words - i and catches swapped words). Both mod 2^64. */
static void checksum(const struct snap *s, u64 *a_out, u64 *b_out) {
    u64 a = 0, b = 0;
    for (u64 i = 0; i < s->words; i++) {
        a += s->mem[i];
        b += a;
    }
    *a_out = a;
    *b_out = b;
}

/* Sets word i from the model's old value to the new one, keeping the expected checksum. */
static void set_word(struct snap *s, u64 i, u64 old, u64 new) {
    u64 delta = new - old;
    s->mem[i] = new;
    s->sum_a += delta;
    s->sum_b += (s->words - i) * delta;
}

static void mem_fill(struct snap *s) {
    s->sum_a = s->sum_b = 0;
    for (u64 i = 0; i < s->words; i++)
        set_word(s, i, 0, pattern(s->seed, i, 0));
}

/* 1 if the array's checksum is the expected one. */
static int mem_verify(const struct snap *s) {
    u64 a, b;
    checksum(s, &a, &b);
    return a == s->sum_a && b == s->sum_b;
}

/* After a bad checksum: names the first word that differs from the model. */
TG_NORETURN static void mem_fail(const struct snap *s) {
    u64 a, b;
    checksum(s, &a, &b);
    for (u64 i = 0; i < s->words; i++) {
        u64 p = i / WORDS_PER_PAGE, gen = generation(s, p, s->round), want = pattern(s->seed, i, gen);
        if (s->mem[i] != want)
            tg_fail("memory: word %lu (page %lu at %p, generation %lu) reads %#lx, expected %#lx "
                    "(checksum %016lx:%016lx, expected %016lx:%016lx)", i, p, (void *)&s->mem[i], gen, s->mem[i],
                    want, a, b, s->sum_a, s->sum_b);
    }
    tg_fail("memory: checksum %016lx:%016lx, expected %016lx:%016lx, but every word matches the model", a, b,
            s->sum_a, s->sum_b);
}

/* Round `r`'s rolling update: the next generation of UPDATE_PAGES pages. */
static void mem_update(struct snap *s, u64 r) {
    for (u64 k = 0; k < UPDATE_PAGES; k++) {
        u64 p = ((r - 1) * UPDATE_PAGES + k) % s->pages, gen = generation(s, p, r - 1);
        for (u64 i = p * WORDS_PER_PAGE; i < (p + 1) * WORDS_PER_PAGE; i++)
            set_word(s, i, pattern(s->seed, i, gen), pattern(s->seed, i, gen + 1));
    }
}

/* ---- virtio-blk drive 0 ---- */

/* Waits (by interrupt; the periodic timer bounds every sleep) until n requests
 * are done. Not virtio_wait: its sleeps re-arm the LAPIC timer as a one-shot. */
static void blk_wait(struct snap *s, unsigned n) {
    u64 deadline = snap_ticks + s->blk_timeout_ticks;
    for (;;) {
        u32 len;
        struct blk_req *r;
        while ((r = virtq_get(s->vq, &len)))
            r->done = 1;
        unsigned done = 0;
        for (unsigned k = 0; k < n; k++)
            done += s->reqs[k].done;
        if (done == n)
            break;
        if (snap_ticks >= deadline)
            tg_fail("virtio-blk: %u of %u reads still pending after %lu timer ticks (interrupts %lu)", n - done, n,
                    s->blk_timeout_ticks, tg_atomic_read(&s->dev->interrupts));
        tg_wait_for_interrupt();
    }
    virtio_check_status(s->dev, "a read");
}

/* Reads sectors [0, blk_sectors) into the poisoned buffer; returns their CRC-32,
 * or sets *bad_status to the first status other than OK. */
static u32 blk_read(struct snap *s, int *bad_status) {
    memset(s->buf, 0xa5, s->blk_sectors * VIRTIO_BLK_SECTOR_SIZE);
    unsigned n = 0;
    for (u64 sec = 0; sec < s->blk_sectors; sec += BLK_REQ_SECTORS, n++) {
        u64 count = s->blk_sectors - sec < BLK_REQ_SECTORS ? s->blk_sectors - sec : BLK_REQ_SECTORS;
        struct blk_req *r = &s->reqs[n];
        r->hdr = (struct virtio_blk_req_hdr){ .type = VIRTIO_BLK_T_IN, .sector = sec };
        r->status = 0xff;
        r->done = 0;
        struct virtq_buf bufs[3] = {
            { (u64)&r->hdr, sizeof(r->hdr), 0 },
            { (u64)(s->buf + sec * VIRTIO_BLK_SECTOR_SIZE), (u32)(count * VIRTIO_BLK_SECTOR_SIZE),
              VIRTQ_DESC_F_WRITE },
            { (u64)&r->status, 1, VIRTQ_DESC_F_WRITE },
        };
        if (virtq_add(s->vq, bufs, 3, r) < 0)
            tg_fail("virtio-blk: no free descriptors (%u free) for read %u", s->vq->num_free, n);
    }
    virtq_kick(s->vq);
    blk_wait(s, n);
    *bad_status = -1;
    for (unsigned k = 0; k < n; k++)
        if (s->reqs[k].status != VIRTIO_BLK_S_OK && *bad_status < 0)
            *bad_status = s->reqs[k].status;
    return tg_crc32(0, s->buf, s->blk_sectors * VIRTIO_BLK_SECTOR_SIZE);
}

static void blk_setup(struct snap *s) {
    virtio_scan();
    s->dev = virtio_find(VIRTIO_ID_BLOCK, 0);
    if (!s->dev)
        return;
    virtio_negotiate(s->dev, VIRTIO_BIT(VIRTIO_F_VERSION_1), 0);
    u64 capacity = virtio_config_read64(s->dev, VIRTIO_BLK_CFG_CAPACITY);
    s->vq = virtio_queue_setup(s->dev, 0, BLK_QUEUE_SIZE);
    if (s->vq->size < 3 * BLK_MAX_REQS)
        tg_fail("virtio-blk: queue of %u entries; need %u", s->vq->size, 3 * BLK_MAX_REQS);
    s->reqs = tg_alloc_pages(1);
    s->buf = tg_alloc_pages(BLK_MAX_SECTORS * VIRTIO_BLK_SECTOR_SIZE / 4096);
    virtio_driver_ok(s->dev);
    if (s->blk_sectors > capacity)
        s->blk_sectors = capacity;
    if (!s->blk_sectors)
        tg_fail("virtio-blk: drive 0 has no sectors to read (capacity %lu)", capacity);
}

/* The reference read (needs the timer: waits are bounded in ticks). */
static void blk_reference(struct snap *s) {
    int bad;
    s->blk_sum = blk_read(s, &bad);
    if (bad >= 0)
        tg_fail("virtio-blk: reading sectors 0..%lu completed with status %d", s->blk_sectors - 1, bad);
    tg_printf("SNAP BLK drive=0 slot=%u capacity=%lu sectors=%lu sum=%08x\n", s->dev->slot,
              virtio_config_read64(s->dev, VIRTIO_BLK_CFG_CAPACITY), s->blk_sectors, s->blk_sum);
}

/* ---- the timer ---- */

/* LAPIC timer input clock (divide by 1) in Hz, measured over ~10 ms of TSC (as in modes/timer.c). */
static u64 lapic_timer_hz(u64 tsc_hz) {
    lapic_write(LAPIC_TIMER_DCR, 0xb); /* divide by 1 */
    lapic_write(LAPIC_LVT_TIMER, LAPIC_LVT_MASKED | TG_VEC_LAPIC_TIMER);
    lapic_write(LAPIC_TIMER_ICR, 0xffffffff);
    u64 t0 = rdtsc();
    tg_udelay(10000);
    u32 ccr = lapic_read(LAPIC_TIMER_CCR);
    u64 t1 = rdtsc();
    lapic_write(LAPIC_TIMER_ICR, 0);
    u64 elapsed = 0xffffffffull - ccr;
    if (!elapsed)
        tg_fail("LAPIC timer current count did not move (CCR %#x)", ccr);
    return elapsed * tsc_hz / (t1 - t0);
}

static void timer_arm(u64 hz) {
    u64 clock = lapic_timer_hz(tg_tsc_hz());
    u64 initial = clock / 16 / hz;
    if (!initial || initial > 0xffffffffull)
        tg_fail("LAPIC timer initial count %lu out of range (clock %lu Hz, snap.hz=%lu)", initial, clock, hz);
    snap_ticks = 0;
    tg_irq_register(TG_VEC_LAPIC_TIMER, snap_tick);
    lapic_write(LAPIC_TIMER_DCR, 0x3); /* divide by 16 */
    lapic_write(LAPIC_LVT_TIMER, TG_VEC_LAPIC_TIMER | LAPIC_TIMER_PERIODIC);
    lapic_write(LAPIC_TIMER_ICR, (u32)initial);
    tg_printf("SNAP TIMER clock=%lu kHz initial=%lu hz=%lu\n", clock / 1000, initial, hz);
}

/* ---- one round (called by snap_loop) ---- */

int snap_round(struct snap *s, u64 reg_round, u64 reg_not, u64 reg_mul, u64 reg_sig) {
    u64 ticks = snap_ticks;
    if (reg_sig != SNAP_SIG || reg_not != ~reg_round || reg_mul != reg_round * SNAP_SIG) {
        tg_printf("SNAP FAIL registers r15=%#lx rbx=%#lx r13=%#lx r14=%#lx\n", reg_round, reg_not, reg_mul, reg_sig);
        tg_fail("registers: r15=%#lx with rbx=%#lx (expected %#lx), r13=%#lx (expected %#lx), r14=%#lx "
                "(expected %#lx)", reg_round, reg_not, ~reg_round, reg_mul, reg_round * SNAP_SIG, reg_sig,
                SNAP_SIG);
    }
    if (reg_round != s->round + 1) {
        tg_printf("SNAP FAIL round register=%lu memory=%lu\n", reg_round, s->round);
        tg_fail("round counter: r15 says round %lu, memory says %lu rounds finished", reg_round, s->round);
    }
    if (ticks <= s->last_ticks) {
        tg_printf("SNAP FAIL ticks=%lu previous=%lu\n", ticks, s->last_ticks);
        tg_fail("timer: tick count %lu did not move past the previous round's %lu", ticks, s->last_ticks);
    }

    int mem_ok = mem_verify(s);
    const char *blk = "none";
    u32 sum = 0;
    int bad_status = -1;
    if (s->dev) {
        sum = blk_read(s, &bad_status);
        blk = bad_status < 0 && sum == s->blk_sum ? "ok" : "BAD";
    }
    tg_printf("SNAP round=%lu ticks=%lu mem=%s blk=%s\n", reg_round, ticks, mem_ok ? "ok" : "BAD", blk);
    if (!mem_ok)
        mem_fail(s);
    if (blk[0] == 'B') {
        if (bad_status >= 0)
            tg_fail("virtio-blk: round %lu: a read completed with status %d", reg_round, bad_status);
        tg_fail("virtio-blk: round %lu: sectors 0..%lu read with CRC-32 %08x, the first read gave %08x", reg_round,
                s->blk_sectors - 1, sum, s->blk_sum);
    }

    mem_update(s, reg_round);
    s->round = reg_round;
    s->last_ticks = ticks;
    u64 next = s->target + s->round_ticks;
    s->target = next > snap_ticks ? next : snap_ticks + s->round_ticks; /* late: no burst of rounds */
    return reg_round >= s->rounds;
}

int mode_snap(void) {
    static struct snap s;
    s.rounds = tg_cmdline_u64("snap.rounds", 50);
    u64 round_ms = tg_cmdline_u64("snap.round_ms", 100), hz = tg_cmdline_u64("snap.hz", 100);
    u64 mem_mb = tg_cmdline_u64("snap.mem_mb", 8);
    s.seed = tg_cmdline_u64("snap.seed", 0x5eed);
    s.blk_sectors = tg_cmdline_u64("snap.blk_sectors", 16);
    u64 blk_timeout_ms = tg_cmdline_u64("snap.blk_timeout_ms", 5000);
    char idle[8] = "hlt";
    tg_cmdline_get("snap.idle", idle, sizeof(idle));
    if (strcmp(idle, "hlt") && strcmp(idle, "spin"))
        tg_fail("snap.idle=%s: must be hlt or spin", idle);
    s.spin = idle[0] == 's';
    if (!s.rounds)
        tg_fail("snap.rounds=0: need at least one round");
    if (!hz || hz > 10000)
        tg_fail("snap.hz=%lu: must be 1..10000", hz);
    if (!mem_mb || mem_mb > 1024)
        tg_fail("snap.mem_mb=%lu: must be 1..1024", mem_mb);
    if (!s.blk_sectors || s.blk_sectors > BLK_MAX_SECTORS)
        tg_fail("snap.blk_sectors=%lu: must be 1..%u", s.blk_sectors, BLK_MAX_SECTORS);
    s.round_ticks = round_ms * hz / 1000;
    if (!s.round_ticks)
        s.round_ticks = 1;
    s.blk_timeout_ticks = blk_timeout_ms * hz / 1000 + 1;
    tg_printf("SNAP CONFIG rounds=%lu round_ms=%lu hz=%lu round_ticks=%lu mem_mb=%lu seed=%#lx idle=%s\n", s.rounds,
              round_ms, hz, s.round_ticks, mem_mb, s.seed, idle);

    blk_setup(&s); /* before the timer: lib/virtio.c programs the LAPIC timer as a one-shot */
    timer_arm(hz);
    if (s.dev)
        blk_reference(&s);
    else
        tg_printf("SNAP BLK none\n");

    s.pages = mem_mb * 256;
    s.words = s.pages * WORDS_PER_PAGE;
    s.mem = tg_alloc_pages((unsigned)s.pages);
    mem_fill(&s);
    tg_printf("SNAP MEM mb=%lu pages=%lu sum=%016lx:%016lx\n", mem_mb, s.pages, s.sum_a, s.sum_b);

    s.last_ticks = snap_ticks;
    s.target = snap_ticks + s.round_ticks;
    u64 done = snap_loop(&s);
    if (done != s.rounds || s.round != s.rounds)
        tg_fail("snap_loop returned after round %lu (memory says %lu), expected %lu", done, s.round, s.rounds);
    if (!mem_verify(&s)) /* the last round's update */
        mem_fail(&s);

    lapic_write(LAPIC_LVT_TIMER, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_TIMER_ICR, 0);
    return 0;
}
