/*
 * vblk — virtio-blk end to end (virtio 1.1 §5.2) through lib/virtio.c.
 *
 * For every block device (config order: drive 0 is the first): negotiate
 * VERSION_1 (+ RO, FLUSH, BLK_SIZE when offered), one request queue, then
 *   VBLK DEV <i> slot=<s> capacity=<sectors> ro=<0|1> flush=<0|1> features=<hex>
 *   VBLK ID <i> <string>                    GET_ID (or `VBLK ID <i> status=UNSUPP`)
 * and on drive 0:
 *   VBLK READ sectors=<n> sum=<crc32>       sectors [0, n) read in 4 KiB requests,
 *                                           several in flight, data split over two
 *                                           descriptors; CRC-32 as zlib.crc32
 *   VBLK BEYOND status=IOERR                a read straddling the end of the disk
 *   VBLK UNSUPP status=UNSUPP               an unknown request type
 * With vblk.write_sector=<s>, on every writable drive: write vblk.write_count
 * (default 8) sectors of the pattern below from sector s, FLUSH (if
 * offered), read them back and compare:
 *   VBLK WRITE <i> sector=<s> count=<n> ok
 *   VBLK FLUSH <i> status=OK
 * and on every read-only drive (with or without the option) the same write,
 * from sector 0, must fail:
 *   VBLK RO <i> write status=IOERR
 * Finally `VBLK IRQS <n>`: completions are waited for by interrupt, and every
 * drive must have interrupted with the used-buffer bit set.
 *
 * The write pattern, byte j of sector s: (j * 7 + s * 13 + 0x5a) & 0xff.
 * Options: vblk.sectors=<n> (default 128, capped at the capacity),
 * vblk.write_sector=<s>, vblk.write_count=<n>, vblk.timeout_ms=<ms> (5000).
 */
#include "virtio.h"

#define MAX_DRIVES 8
#define QUEUE_SIZE 64
#define CHUNK_SECTORS 8 /* 4 KiB per request */
#define IN_FLIGHT 8
#define MAX_WRITE_SECTORS 64
#define VBLK_T_BOGUS 0x7fu /* no request type has this number (§5.2.6) */

struct blk_req {
    struct virtio_blk_req_hdr hdr; /* device-readable */
    volatile u8 status;            /* device-writable */
    volatile u8 done;
    u32 used_len;
};

struct drive {
    struct virtio_dev *dev;
    struct virtq *vq;
    u64 capacity;
    int ro, flush;
    struct blk_req *reqs; /* IN_FLIGHT of them, in one page */
};

static struct drive drives[MAX_DRIVES];
static unsigned ndrives;
static u64 timeout_us;

static const char *status_name(u8 s) {
    switch (s) {
    case VIRTIO_BLK_S_OK: return "OK";
    case VIRTIO_BLK_S_IOERR: return "IOERR";
    case VIRTIO_BLK_S_UNSUPP: return "UNSUPP";
    default: return "INVALID";
    }
}

static u8 pattern_byte(u64 sector, unsigned j) { return (u8)((j * 7 + sector * 13 + 0x5a) & 0xff); }

/* Queues one request: header, then `len` data bytes (two descriptors when over one
 * sector, to exercise chains), then the status byte. Does not notify. */
static void submit(struct drive *dr, struct blk_req *r, u32 type, u64 sector, void *data, u32 len, int dev_writes) {
    r->hdr.type = type;
    r->hdr.reserved = 0;
    r->hdr.sector = sector;
    r->status = 0xff;
    r->done = 0;
    struct virtq_buf bufs[4];
    unsigned n = 0;
    bufs[n++] = (struct virtq_buf){ (u64)&r->hdr, sizeof(r->hdr), 0 };
    u16 dflags = dev_writes ? VIRTQ_DESC_F_WRITE : 0;
    if (len > VIRTIO_BLK_SECTOR_SIZE) {
        bufs[n++] = (struct virtq_buf){ (u64)data, VIRTIO_BLK_SECTOR_SIZE, dflags };
        bufs[n++] = (struct virtq_buf){ (u64)data + VIRTIO_BLK_SECTOR_SIZE, len - VIRTIO_BLK_SECTOR_SIZE, dflags };
    } else if (len) {
        bufs[n++] = (struct virtq_buf){ (u64)data, len, dflags };
    }
    bufs[n++] = (struct virtq_buf){ (u64)&r->status, 1, VIRTQ_DESC_F_WRITE };
    if (virtq_add(dr->vq, bufs, n, r) < 0)
        tg_fail("vblk: no free descriptors for a %u-descriptor request", n);
}

static void reap(struct drive *dr) {
    u32 len;
    struct blk_req *r;
    while ((r = virtq_get(dr->vq, &len))) {
        r->used_len = len;
        r->done = 1;
    }
}

struct wait_arg {
    struct drive *dr;
    struct blk_req *reqs;
    unsigned n;
};

static int all_done(void *p) {
    struct wait_arg *w = p;
    reap(w->dr);
    for (unsigned i = 0; i < w->n; i++)
        if (!w->reqs[i].done)
            return 0;
    return 1;
}

/* Notifies the device and waits (by interrupt) for requests reqs[0..n). */
static void complete(struct drive *dr, struct blk_req *reqs, unsigned n, const char *what) {
    virtq_kick(dr->vq);
    struct wait_arg w = { dr, reqs, n };
    if (!virtio_wait(all_done, &w, timeout_us))
        tg_fail("vblk: %s: %lu of %u requests still pending after %lu ms (interrupts %lu)", what,
                virtq_in_flight(dr->vq), n, timeout_us / 1000, tg_atomic_read(&dr->dev->interrupts));
    virtio_check_status(dr->dev, what);
}

/* One request, waited for; returns its status. */
static u8 request(struct drive *dr, u32 type, u64 sector, void *data, u32 len, int dev_writes, const char *what) {
    submit(dr, &dr->reqs[0], type, sector, data, len, dev_writes);
    complete(dr, dr->reqs, 1, what);
    return dr->reqs[0].status;
}

static void expect_ok(u8 status, const char *what, unsigned drive) {
    if (status != VIRTIO_BLK_S_OK)
        tg_fail("vblk: drive %u: %s completed with status %u (%s)", drive, what, status, status_name(status));
}

static void init_drive(unsigned i, struct virtio_dev *d) {
    struct drive *dr = &drives[i];
    dr->dev = d;
    u64 f = virtio_negotiate(d, VIRTIO_BIT(VIRTIO_F_VERSION_1),
                             VIRTIO_BIT(VIRTIO_BLK_F_RO) | VIRTIO_BIT(VIRTIO_BLK_F_FLUSH) |
                                 VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE));
    dr->ro = !!(f & VIRTIO_BIT(VIRTIO_BLK_F_RO));
    dr->flush = !!(f & VIRTIO_BIT(VIRTIO_BLK_F_FLUSH));
    dr->capacity = virtio_config_read64(d, VIRTIO_BLK_CFG_CAPACITY);
    dr->vq = virtio_queue_setup(d, 0, QUEUE_SIZE);
    dr->reqs = tg_alloc_pages(1);
    virtio_driver_ok(d);
    u32 blk_size = (f & VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE)) ? virtio_config_read32(d, VIRTIO_BLK_CFG_BLK_SIZE) : 512;
    tg_printf("VBLK DEV %u slot=%u capacity=%lu ro=%d flush=%d blk_size=%u features=%#lx queue=%u\n", i, d->slot,
              dr->capacity, dr->ro, dr->flush, blk_size, f, dr->vq->size);
}

static void get_id(unsigned i) {
    struct drive *dr = &drives[i];
    char *id = tg_alloc_pages(1);
    u8 st = request(dr, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES, 1, "GET_ID");
    if (st == VIRTIO_BLK_S_UNSUPP) {
        tg_printf("VBLK ID %u status=UNSUPP\n", i);
        return;
    }
    expect_ok(st, "GET_ID", i);
    id[VIRTIO_BLK_ID_BYTES] = 0; /* §5.2.6: no NUL if the string fills all 20 bytes */
    for (unsigned k = 0; id[k]; k++)
        if (id[k] < 0x21 || id[k] > 0x7e)
            id[k] = '?';
    tg_printf("VBLK ID %u %s\n", i, id[0] ? id : "(empty)");
}

static void read_drive0(u64 sectors) {
    struct drive *dr = &drives[0];
    u8 *buf = tg_alloc_pages(IN_FLIGHT * CHUNK_SECTORS * VIRTIO_BLK_SECTOR_SIZE / 4096);
    u32 crc = 0;
    for (u64 s = 0; s < sectors;) {
        unsigned n = 0;
        u64 first = s;
        for (; n < IN_FLIGHT && s < sectors; n++) {
            u64 count = sectors - s < CHUNK_SECTORS ? sectors - s : CHUNK_SECTORS;
            u8 *data = buf + n * CHUNK_SECTORS * VIRTIO_BLK_SECTOR_SIZE;
            memset(data, 0xa5, count * VIRTIO_BLK_SECTOR_SIZE);
            submit(dr, &dr->reqs[n], VIRTIO_BLK_T_IN, s, data, (u32)(count * VIRTIO_BLK_SECTOR_SIZE), 1);
            s += count;
        }
        complete(dr, dr->reqs, n, "read");
        for (unsigned k = 0; k < n; k++)
            expect_ok(dr->reqs[k].status, "read", 0);
        crc = tg_crc32(crc, buf, (s - first) * VIRTIO_BLK_SECTOR_SIZE);
    }
    tg_printf("VBLK READ sectors=%lu sum=%08x\n", sectors, crc);
}

static void write_test(unsigned i, u64 sector, u64 count) {
    struct drive *dr = &drives[i];
    u32 len = (u32)(count * VIRTIO_BLK_SECTOR_SIZE);
    u8 *out = tg_alloc_pages((len + 4095) / 4096), *back = tg_alloc_pages((len + 4095) / 4096);
    for (u64 k = 0; k < count; k++)
        for (unsigned j = 0; j < VIRTIO_BLK_SECTOR_SIZE; j++)
            out[k * VIRTIO_BLK_SECTOR_SIZE + j] = pattern_byte(sector + k, j);
    u8 st = request(dr, VIRTIO_BLK_T_OUT, sector, out, len, 0, "write");
    if (dr->ro) {
        if (st != VIRTIO_BLK_S_IOERR)
            tg_fail("vblk: drive %u is read-only, but a write completed with status %u (%s), not IOERR", i, st,
                    status_name(st));
        tg_printf("VBLK RO %u write status=%s\n", i, status_name(st));
        return;
    }
    expect_ok(st, "write", i);
    if (dr->flush) {
        st = request(dr, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0, "flush");
        expect_ok(st, "flush", i);
        tg_printf("VBLK FLUSH %u status=%s\n", i, status_name(st));
    }
    memset(back, 0, len);
    expect_ok(request(dr, VIRTIO_BLK_T_IN, sector, back, len, 1, "read back"), "read back", i);
    for (u32 k = 0; k < len; k++)
        if (back[k] != out[k])
            tg_fail("vblk: drive %u: byte %u of sector %lu reads back %#x, wrote %#x", i,
                    k % VIRTIO_BLK_SECTOR_SIZE, sector + k / VIRTIO_BLK_SECTOR_SIZE, back[k], out[k]);
    tg_printf("VBLK WRITE %u sector=%lu count=%lu ok\n", i, sector, count);
}

static void error_paths(void) {
    struct drive *dr = &drives[0];
    u8 *buf = tg_alloc_pages(1);
    if (dr->capacity) {
        /* Two sectors from the last one: the second lies past the end (§5.2.6.1: IOERR). */
        u8 st = request(dr, VIRTIO_BLK_T_IN, dr->capacity - 1, buf, 2 * VIRTIO_BLK_SECTOR_SIZE, 1, "read beyond");
        if (st != VIRTIO_BLK_S_IOERR)
            tg_fail("vblk: a read of sectors %lu..%lu on a %lu-sector disk completed with %s, not IOERR",
                    dr->capacity - 1, dr->capacity, dr->capacity, status_name(st));
        tg_printf("VBLK BEYOND status=%s\n", status_name(st));
    }
    u8 st = request(dr, VBLK_T_BOGUS, 0, buf, VIRTIO_BLK_SECTOR_SIZE, 1, "unknown request type");
    if (st != VIRTIO_BLK_S_UNSUPP)
        tg_fail("vblk: request type %#x completed with %s, not UNSUPP", VBLK_T_BOGUS, status_name(st));
    tg_printf("VBLK UNSUPP status=%s\n", status_name(st));
}

int mode_vblk(void) {
    timeout_us = tg_cmdline_u64("vblk.timeout_ms", 5000) * 1000;
    virtio_scan();
    struct virtio_dev *d;
    while (ndrives < MAX_DRIVES && (d = virtio_find(VIRTIO_ID_BLOCK, ndrives)))
        init_drive(ndrives++, d);
    if (!ndrives)
        tg_fail("no virtio-blk device found");

    for (unsigned i = 0; i < ndrives; i++)
        get_id(i);

    u64 sectors = tg_cmdline_u64("vblk.sectors", 128);
    if (sectors > drives[0].capacity)
        sectors = drives[0].capacity;
    read_drive0(sectors);
    error_paths();

    char tmp[24];
    int write = tg_cmdline_get("vblk.write_sector", tmp, sizeof(tmp)) != NULL;
    u64 sector = write ? tg_strtou64(tmp, NULL) : 0, count = tg_cmdline_u64("vblk.write_count", 8);
    if (!count || count > MAX_WRITE_SECTORS)
        tg_fail("vblk.write_count=%lu: must be 1..%u", count, MAX_WRITE_SECTORS);
    for (unsigned i = 0; i < ndrives; i++) {
        struct drive *dr = &drives[i];
        if (dr->ro) {
            if (dr->capacity)
                write_test(i, 0, count < dr->capacity ? count : dr->capacity);
            continue;
        }
        if (!write)
            continue;
        if (sector + count > dr->capacity)
            tg_fail("vblk: drive %u has %lu sectors; cannot write %lu from sector %lu", i, dr->capacity, count,
                    sector);
        write_test(i, sector, count);
    }

    virtio_settle();
    u64 irqs = 0;
    for (unsigned i = 0; i < ndrives; i++) {
        struct virtio_dev *dev = drives[i].dev;
        irqs += tg_atomic_read(&dev->interrupts);
        virtio_check_status(dev, "the test");
        if (!(dev->isr & VIRTIO_MMIO_INT_VRING))
            tg_fail("vblk: drive %u completed %lu requests, but its interrupt never showed the used-buffer bit "
                    "(interrupts %lu, isr %#x)", i, drives[i].vq->completed, tg_atomic_read(&dev->interrupts),
                    dev->isr);
    }
    tg_printf("VBLK IRQS %lu\n", irqs);
    return 0;
}
