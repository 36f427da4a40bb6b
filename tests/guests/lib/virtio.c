/*
 * virtio.c — a small virtio 1.1 driver core: the virtio-mmio transport
 * (version 2, §4.2), device initialisation (§3.1.1) and split virtqueues
 * (§2.6). The device-specific parts live in the modes that use them
 * (modes/vblk.c, modes/vnet.c, modes/vsock.c); include/virtio.h has the API.
 *
 * A split virtqueue in one paragraph (§2.6): the driver owns a descriptor
 * table (address, length, flags, next) and an available ring; it links
 * descriptors into a chain (device-readable ones first, then device-writable
 * ones), writes the chain's head index into avail->ring[avail->idx % size],
 * then increments avail->idx and writes the queue's index to QueueNotify. The
 * device consumes chains, and for each writes {head, bytes written} into
 * used->ring[used->idx % size], increments used->idx and raises an interrupt
 * (InterruptStatus bit 0), which the driver acknowledges through
 * InterruptACK. Indices are free-running 16-bit counters.
 *
 * Rings: everything runs in ring 3 except virtio_irq, the ring-0 handler,
 * which reads InterruptStatus, writes it back to InterruptACK and remembers
 * the bits. Ring 3 keeps interrupts disabled and sleeps with `sti; hlt`
 * (tg_wait_for_interrupt), so device interrupts coalesce while it works, and
 * a one-shot LAPIC timer bounds every sleep, so a silent device cannot hang
 * the guest: waits end with a timeout and the mode FAILs.
 */
#include "virtio.h"

/* One-shot LAPIC timer count for a sleep: 10 ms at KVM's 1 GHz APIC clock (divide by 1). */
#define WAKE_TICKS 10000000u
#define LAPIC_TIMER_DIV_1 0xb
#define CONFIG_RETRIES 100

static struct virtio_dev devs[VIRTIO_MMIO_MAX_SLOTS];
static unsigned ndevs;
static int scanned;

/* ---- register access: MMIO in the guest, hooks in host unit tests ---- */

#ifdef TG_HOST_TEST
static u32 reg_read(u64 addr, unsigned size) { return tg_host_mmio_read(addr, size); }
static void reg_write(u64 addr, unsigned size, u32 v) { tg_host_mmio_write(addr, size, v); }
#else
TG_RING0 static inline u32 reg_read(u64 addr, unsigned size) {
    switch (size) {
    case 1: return mmio_read8(addr);
    case 2: return mmio_read16(addr);
    default: return mmio_read32(addr);
    }
}
TG_RING0 static inline void reg_write(u64 addr, unsigned size, u32 v) {
    switch (size) {
    case 1: mmio_write8(addr, (u8)v); break;
    case 2: mmio_write16(addr, (u16)v); break;
    default: mmio_write32(addr, v); break;
    }
}
#endif

static u32 rd(struct virtio_dev *d, u32 reg) { return reg_read(d->base + reg, 4); }
static void wr(struct virtio_dev *d, u32 reg, u32 v) { reg_write(d->base + reg, 4, v); }

/* ---- interrupts and sleeping ---- */

/* Ring 0, interrupts off: read and acknowledge InterruptStatus (§4.2.3.4), remember the bits. */
TG_RING0 static void virtio_irq(u64 vector) {
    u64 slot = vector - VIRTIO_VEC_BASE;
    if (slot >= ndevs)
        return;
    struct virtio_dev *d = &devs[slot];
    u32 status = reg_read(d->base + VIRTIO_MMIO_INTERRUPT_STATUS, 4);
    if (status)
        reg_write(d->base + VIRTIO_MMIO_INTERRUPT_ACK, 4, status);
    else
        __atomic_add_fetch(&d->spurious.v, 1, __ATOMIC_RELAXED);
    __atomic_or_fetch(&d->isr, status, __ATOMIC_RELAXED);
    __atomic_add_fetch(&d->interrupts.v, 1, __ATOMIC_RELAXED);
}

static void platform_init(void) {
#ifndef TG_HOST_TEST
    if (tg_rflags() & RFLAGS_IF)
        tg_cli(); /* ring 3 runs with interrupts off; they are taken while sleeping */
    tg_tsc_hz();
    tg_pic_disable();
    tg_lapic_init();
    lapic_write(LAPIC_TIMER_DCR, LAPIC_TIMER_DIV_1);
    lapic_write(LAPIC_LVT_TIMER, TG_VEC_LAPIC_TIMER); /* one-shot; armed by each sleep */
#endif
}

static void platform_route(struct virtio_dev *d) {
#ifdef TG_HOST_TEST
    tg_host_irq_route(d->gsi, d->vector, virtio_irq);
#else
    tg_irq_register(d->vector, virtio_irq);
    tg_ioapic_route(d->gsi, d->vector, tg_lapic_id(), 0); /* edge, active high */
#endif
}

void virtio_sleep(void) {
#ifdef TG_HOST_TEST
    tg_host_sleep();
#else
    lapic_write(LAPIC_TIMER_ICR, WAKE_TICKS);
    tg_wait_for_interrupt();
#endif
}

u64 virtio_interrupts(void) {
    u64 n = 0;
    for (unsigned i = 0; i < ndevs; i++)
        n += tg_atomic_read(&devs[i].interrupts);
    return n;
}

void virtio_settle(void) {
    for (unsigned i = 0; i < 8; i++) {
        u64 before = virtio_interrupts();
        virtio_sleep();
        if (virtio_interrupts() == before)
            return;
    }
}

int virtio_wait(int (*cond)(void *), void *arg, u64 timeout_us) {
    u64 deadline = tg_deadline_us(timeout_us);
    for (;;) {
        if (cond(arg))
            return 1;
        if (rdtsc() >= deadline)
            return cond(arg);
        virtio_sleep();
    }
}

/* ---- discovery ---- */

const char *virtio_id_name(u32 device_id) {
    switch (device_id) {
    case VIRTIO_ID_NET: return "net";
    case VIRTIO_ID_BLOCK: return "block";
    case VIRTIO_ID_VSOCK: return "vsock";
    default: return "unknown";
    }
}

unsigned virtio_scan(void) {
    if (scanned)
        return ndevs;
    scanned = 1;
    platform_init();
    unsigned slot;
    u32 magic = 0;
    for (slot = 0; slot < VIRTIO_MMIO_MAX_SLOTS; slot++) {
        u64 base = VIRTIO_MMIO_BASE + (u64)slot * VIRTIO_MMIO_WINDOW;
        magic = reg_read(base + VIRTIO_MMIO_MAGIC_VALUE, 4);
        if (magic != VIRTIO_MMIO_MAGIC)
            break;
        struct virtio_dev *d = &devs[slot];
        d->slot = slot;
        d->base = base;
        d->version = rd(d, VIRTIO_MMIO_VERSION);
        d->device_id = rd(d, VIRTIO_MMIO_DEVICE_ID);
        d->vendor_id = rd(d, VIRTIO_MMIO_VENDOR_ID);
        d->gsi = VIRTIO_GSI_BASE + slot;
        d->vector = (u8)(VIRTIO_VEC_BASE + slot);
        ndevs = slot + 1;
        tg_printf("VIRTIO slot=%u addr=%#lx id=%u (%s) vendor=%#x version=%u gsi=%u\n", slot, base, d->device_id,
                  virtio_id_name(d->device_id), d->vendor_id, d->version, d->gsi);
        if (d->version != VIRTIO_MMIO_VERSION_MODERN)
            tg_fail("virtio slot %u: version %u; only the modern interface (version 2) is supported", slot,
                    d->version);
    }
    /* Ember's contract: the window after the last device reads all-ones. */
    if (slot < VIRTIO_MMIO_MAX_SLOTS && magic != 0xffffffffu)
        tg_fail("virtio slot %u: MagicValue reads %#x; an unused slot must read all-ones", slot, magic);
    tg_printf("VIRTIO devices=%u\n", ndevs);
    return ndevs;
}

struct virtio_dev *virtio_find(u32 device_id, unsigned nth) {
    virtio_scan();
    for (unsigned i = 0; i < ndevs; i++)
        if (devs[i].device_id == device_id && nth-- == 0)
            return &devs[i];
    return NULL;
}

/* ---- status and features ---- */

u32 virtio_status(struct virtio_dev *d) { return rd(d, VIRTIO_MMIO_STATUS); }

void virtio_check_status(struct virtio_dev *d, const char *what) {
    u32 st = virtio_status(d);
    if (st & VIRTIO_STATUS_DEVICE_NEEDS_RESET)
        tg_fail("virtio slot %u (%s): device set DEVICE_NEEDS_RESET (status %#x) after %s", d->slot,
                virtio_id_name(d->device_id), st, what);
}

void virtio_reset(struct virtio_dev *d) {
    wr(d, VIRTIO_MMIO_STATUS, 0);
    u32 st = virtio_status(d);
    if (st != 0)
        tg_fail("virtio slot %u: Status reads %#x after a reset (writing 0), expected 0", d->slot, st);
}

static void add_status(struct virtio_dev *d, u32 bits) { wr(d, VIRTIO_MMIO_STATUS, virtio_status(d) | bits); }

u64 virtio_negotiate(struct virtio_dev *d, u64 required, u64 optional) {
    virtio_reset(d);
    add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    add_status(d, VIRTIO_STATUS_DRIVER);
    wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 offered = rd(d, VIRTIO_MMIO_DEVICE_FEATURES);
    wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)rd(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    d->device_features = offered;
    if ((offered & required) != required) {
        add_status(d, VIRTIO_STATUS_FAILED);
        tg_fail("virtio slot %u (%s): device offers features %#lx, lacking required %#lx", d->slot,
                virtio_id_name(d->device_id), offered, required & ~offered);
    }
    d->features = required | (optional & offered);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->features);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
    add_status(d, VIRTIO_STATUS_FEATURES_OK);
    u32 st = virtio_status(d);
    if (!(st & VIRTIO_STATUS_FEATURES_OK)) {
        add_status(d, VIRTIO_STATUS_FAILED);
        tg_fail("virtio slot %u (%s): device refused features %#lx (status %#x)", d->slot,
                virtio_id_name(d->device_id), d->features, st);
    }
    return d->features;
}

void virtio_driver_ok(struct virtio_dev *d) {
    platform_route(d);
    add_status(d, VIRTIO_STATUS_DRIVER_OK);
    u32 st = virtio_status(d);
    if (!(st & VIRTIO_STATUS_DRIVER_OK))
        tg_fail("virtio slot %u (%s): DRIVER_OK did not stick (status %#x)", d->slot, virtio_id_name(d->device_id),
                st);
    virtio_check_status(d, "DRIVER_OK");
}

/* ---- configuration space ---- */

static u32 generation(struct virtio_dev *d) { return rd(d, VIRTIO_MMIO_CONFIG_GENERATION); }

u8 virtio_config_read8(struct virtio_dev *d, u32 offset) {
    return (u8)reg_read(d->base + VIRTIO_MMIO_CONFIG + offset, 1);
}

u16 virtio_config_read16(struct virtio_dev *d, u32 offset) {
    return (u16)reg_read(d->base + VIRTIO_MMIO_CONFIG + offset, 2);
}

u32 virtio_config_read32(struct virtio_dev *d, u32 offset) { return rd(d, VIRTIO_MMIO_CONFIG + offset); }

u64 virtio_config_read64(struct virtio_dev *d, u32 offset) {
    for (unsigned i = 0; i < CONFIG_RETRIES; i++) {
        u32 gen = generation(d);
        u64 lo = virtio_config_read32(d, offset), hi = virtio_config_read32(d, offset + 4);
        if (generation(d) == gen)
            return lo | (hi << 32);
    }
    tg_fail("virtio slot %u: ConfigGeneration kept changing while reading config offset %#x", d->slot, offset);
}

void virtio_config_read_bytes(struct virtio_dev *d, u32 offset, void *out, unsigned n) {
    u8 *p = out;
    for (unsigned i = 0; i < CONFIG_RETRIES; i++) {
        u32 gen = generation(d);
        for (unsigned k = 0; k < n; k++)
            p[k] = virtio_config_read8(d, offset + k);
        if (generation(d) == gen)
            return;
    }
    tg_fail("virtio slot %u: ConfigGeneration kept changing while reading config offset %#x", d->slot, offset);
}

/* ---- virtqueues ---- */

static void *alloc_bytes(u64 n) { return tg_alloc_pages((unsigned)((n + 4095) / 4096)); }

struct virtq *virtio_queue_setup(struct virtio_dev *d, unsigned index, unsigned max_size) {
    if (index >= VIRTIO_MAX_QUEUES)
        tg_fail("virtio: queue index %u out of range", index);
    wr(d, VIRTIO_MMIO_QUEUE_SEL, index);
    if (rd(d, VIRTIO_MMIO_QUEUE_READY))
        tg_fail("virtio slot %u: queue %u is ready before the driver set it up", d->slot, index);
    u32 max = rd(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (!max)
        tg_fail("virtio slot %u (%s): queue %u not available (QueueNumMax 0)", d->slot, virtio_id_name(d->device_id),
                index);
    u32 want = max < max_size ? max : max_size;
    if (want > VIRTQ_MAX_SIZE)
        want = VIRTQ_MAX_SIZE;
    u32 size = 1;
    while (size * 2 <= want)
        size *= 2;

    struct virtq *q = alloc_bytes(sizeof(*q));
    q->dev = d;
    q->index = (u16)index;
    q->size = (u16)size;
    q->desc = alloc_bytes(16ull * size);                                         /* §2.6: 16-byte aligned */
    q->avail = alloc_bytes(6 + 2ull * size);                                     /* 2-byte aligned */
    q->used = alloc_bytes(6 + sizeof(struct virtq_used_elem) * (u64)size);       /* 4-byte aligned */
    for (u32 i = 0; i < size; i++)
        q->next[i] = (u16)(i + 1);
    q->free_head = 0;
    q->num_free = (u16)size;

    wr(d, VIRTIO_MMIO_QUEUE_NUM, size);
    wr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
    wr(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
    wr(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)q->avail);
    wr(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)q->avail >> 32));
    wr(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)q->used);
    wr(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)q->used >> 32));
    wr(d, VIRTIO_MMIO_QUEUE_READY, 1);
    if (rd(d, VIRTIO_MMIO_QUEUE_READY) != 1)
        tg_fail("virtio slot %u: queue %u: QueueReady does not read back 1", d->slot, index);
    d->vq[index] = q;
    return q;
}

int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned n, void *token) {
    if (!n || !token)
        tg_fail("virtq_add: empty chain or NULL token");
    if (n > q->num_free)
        return -1;
    u16 head = q->free_head, i = head;
    u32 writable = 0;
    for (unsigned k = 0; k < n; k++) {
        volatile struct virtq_desc *desc = &q->desc[i];
        desc->addr = bufs[k].addr;
        desc->len = bufs[k].len;
        desc->flags = (u16)((bufs[k].flags & VIRTQ_DESC_F_WRITE) | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        desc->next = q->next[i];
        if (bufs[k].flags & VIRTQ_DESC_F_WRITE)
            writable += bufs[k].len;
        if (k + 1 < n)
            i = q->next[i];
    }
    q->free_head = q->next[i];
    q->num_free = (u16)(q->num_free - n);
    q->token[head] = token;
    q->chain_len[head] = (u16)n;
    q->writable[head] = writable;
    q->avail->ring[q->avail_idx % q->size] = head;
    /* §2.6.13.3: the ring entry before the index that publishes it (x86 keeps store order). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
    q->added++;
    return 0;
}

void virtq_kick(struct virtq *q) {
    /* §2.6.13.6: the new idx must be visible before reading used->flags. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (q->used->flags & VIRTQ_USED_F_NO_NOTIFY)
        return;
    wr(q->dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
    q->notifications++;
}

int virtq_has_used(struct virtq *q) { return q->used->idx != q->last_used; }

void *virtq_get(struct virtq *q, u32 *len) {
    struct virtio_dev *d = q->dev;
    u16 used_idx = q->used->idx;
    if (used_idx == q->last_used)
        return NULL;
    u16 pending = (u16)(used_idx - q->last_used);
    if (pending > virtq_in_flight(q))
        tg_fail("virtio slot %u queue %u: used->idx %u is %u entries ahead, but only %lu chains are in flight",
                d->slot, q->index, used_idx, pending, virtq_in_flight(q));
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* read the entry only after seeing the index */
    volatile struct virtq_used_elem *e = &q->used->ring[q->last_used % q->size];
    u32 id = e->id, n = e->len;
    if (id >= q->size || !q->token[id])
        tg_fail("virtio slot %u queue %u: used entry %u names descriptor %u, not the head of a chain in flight",
                d->slot, q->index, q->last_used, id);
    if (n > q->writable[id])
        tg_fail("virtio slot %u queue %u: used entry %u claims %u bytes written; the chain has %u writable bytes",
                d->slot, q->index, q->last_used, n, q->writable[id]);
    void *token = q->token[id];
    q->token[id] = NULL;
    u16 tail = (u16)id;
    for (u16 k = 1; k < q->chain_len[id]; k++)
        tail = q->next[tail];
    q->next[tail] = q->free_head;
    q->free_head = (u16)id;
    q->num_free = (u16)(q->num_free + q->chain_len[id]);
    q->last_used++;
    q->completed++;
    *len = n;
    return token;
}

/* ---- CRC-32 (reflected polynomial 0xEDB88320, zlib's) ---- */

static u32 crc_table[256];

u32 tg_crc32(u32 crc, const void *buf, size_t n) {
    if (!crc_table[1]) {
        for (u32 i = 0; i < 256; i++) {
            u32 c = i;
            for (int k = 0; k < 8; k++)
                c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
            crc_table[i] = c;
        }
    }
    const u8 *p = buf;
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}
