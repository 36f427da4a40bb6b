/*
 * vbench — virtio device benchmarks measured from inside the guest, for
 * `python -m bench.virtio` (bench/virtio.py drives the host side).
 *
 * Clock. Every figure is timed with RDTSC (native in ring 3). Its rate comes
 * from KVM's timing leaf (CPUID 0x40000010 EAX = TSC kHz) when the VMM
 * offers it, else from the PIT channel-2 calibration of tg_tsc_hz() (50 ms;
 * each port poll costs ~0.15 ms on PVM hosts, so about 0.3 % uncertainty):
 *   VBENCH TSC hz=<Hz> src=<cpuid-0x40000010|pit> pit_hz=<Hz> cpuid15_hz=<Hz or 0>
 * (CPUID 0x15 is printed for comparison only: in a VM it may describe the
 * host's crystal or nothing at all.)
 *
 * Waiting. vbench.poll=0 (default): sleep with `sti; hlt` until the device
 * interrupts, as a driver normally does. vbench.poll=1: spin in ring 3 on
 * the used rings and set VIRTQ_AVAIL_F_NO_INTERRUPT (§2.6.7.1), so the
 * guest's interrupt path (emulated ring 0 on PVM hosts) drops out of the
 * measurement and the device path is what remains. Either way progress is
 * bounded by vbench.timeout_ms (default 20000) without progress.
 *
 * Around the phases the guest starts (blk read/write, net tx) it prints two
 * short markers, `VBENCH GO <what>` and `VBENCH STOP <what>`, and net rx
 * ends with `VBENCH STOP net rx`, so the host can sample the VMM's CPU time
 * at the edges (the result line comes after STOP: console output is slow).
 * The host starts the other phases itself and samples there.
 *
 * vbench.dev=blk (virtio-blk, §5.2): drive 0, vbench.mib=<N> (64) MiB
 * sequentially in vbench.req_kib=<K> (64) KiB requests, vbench.qd=<D> (8)
 * requests in flight (a completed request is replaced at once), each
 * request header + data (split at the device's size_max) + status. Passes
 * by vbench.op=read|write|rw (rw: the read pass first, so a host that
 * dropped the file's cache measures a cold read). The disk wraps if N MiB
 * is more than its capacity.
 *   VBENCH blk <read|write> bytes=<n> reqs=<n> usec=<n> MBps=<x.xx> req_kib=<K> qd=<D> irqs=<n> kicks=<n>
 *
 * vbench.dev=net (virtio-net, §5.1): vbench.dir=tx|rx|both (both).
 *   tx: vbench.frames=<N> (20000) broadcast frames of vbench.frame_len=<L>
 *   (1514) bytes, ethertype 0x88b5, payload `VBENCH-TX <seq>`, one
 *   descriptor each (header + frame, as Linux does with VERSION_1), the
 *   transmit ring kept full; timed from the first add to the last completion.
 *     VBENCH net tx frames=<n> bytes=<frame bytes> usec=<n> fps=<n> Mbps=<x.xx> irqs=<n> kicks=<n>
 *   rx: `VBENCH net rx READY`, then counts frames whose payload starts
 *   `VBENCH-RX` until one starting `VBENCH-END <sent>`. The clock starts at
 *   data frame min(N/4, ring size) (the receive ring may hold that many
 *   before the guest first looks) and stops at the last; `timed` frames
 *   and their bytes arrived in between.
 *     VBENCH net rx frames=<n> timed=<n> bytes=<n> usec=<n> fps=<n> Mbps=<x.xx> host_sent=<n> irqs=<n>
 *   Rates count Ethernet frame bytes (no virtio header, no FCS).
 *
 * vbench.dev=vsock (virtio-vsock streams, §5.10): listens on vbench.port=<P>
 * (5201) and serves ONE connection from the host (Firecracker's hybrid
 * Unix socket, `CONNECT <P>\n`) in three phases:
 *   1. echo vbench.rtt=<R> (1000) x vbench.msg=<M> (64) bytes back as they
 *      come (the host times each round trip);
 *   2. receive vbench.mib=<N> (16) MiB, then send one byte `A`;
 *        VBENCH vsock rx bytes=<n> usec=<n> MBps=<x.xx>   (first to last byte)
 *   3. send N MiB (packets of up to vbench.pkt_kib=<K> (4) KiB payload, as
 *      far as the host's credit allows), then SHUTDOWN and wait for RST.
 *        VBENCH vsock tx bytes=<n> usec=<n> MBps=<x.xx>   (first send to last completion)
 *   Receive buffers: 64 chains of a 44-byte header descriptor + 4 KiB (as
 *   Linux's virtio_vsock), buf_alloc 256 KiB; a packet past the guest's
 *   credit FAILs the run.
 */
#include "virtio.h"

#define MIB (1024ull * 1024)
#define KVM_CPUID_SIGNATURE 0x40000000u
#define KVM_CPUID_TIMING 0x40000010u /* EAX: TSC frequency in kHz (VMware/KVM timing leaf) */

static u64 hz;
static int poll_mode;
static u64 timeout_us;

/* ---- clock, waiting, output ------------------------------------------------------- */

static void clock_init(void) {
    u64 pit = tg_tsc_hz(), kvm = 0, c15 = 0;
    struct tg_cpuid r;
    tg_cpuid(KVM_CPUID_SIGNATURE, 0, &r);
    /* "KVMKVMKVM\0\0\0" in EBX, ECX, EDX. */
    if (r.ebx == 0x4b4d564bu && r.ecx == 0x564b4d56u && r.edx == 0x4du && r.eax >= KVM_CPUID_TIMING) {
        tg_cpuid(KVM_CPUID_TIMING, 0, &r);
        kvm = (u64)r.eax * 1000;
    }
    tg_cpuid(0, 0, &r);
    if (r.eax >= 0x15) {
        tg_cpuid(0x15, 0, &r); /* EAX denominator, EBX numerator, ECX crystal Hz (SDM Vol. 2A, CPUID) */
        if (r.eax && r.ebx && r.ecx)
            c15 = (u64)r.ecx * r.ebx / r.eax;
    }
    hz = kvm ? kvm : pit;
    tg_printf("VBENCH TSC hz=%lu src=%s pit_hz=%lu cpuid15_hz=%lu\n", hz, kvm ? "cpuid-0x40000010" : "pit", pit, c15);
}

static u64 usec_of(u64 ticks) { return ticks / (hz / 1000000); }
static u64 ticks_of(u64 us) { return us * (hz / 1000000); }

/* bytes/usec is MB/s (10^6 bytes per second); printed with two decimals. */
static void print_rate(const char *label, u64 bytes, u64 usec) {
    u64 x100 = usec ? bytes * 100 / usec : 0;
    tg_printf(" %s=%lu.%02lu", label, x100 / 100, x100 % 100);
}

/* Nothing to do until the device hands something back. */
static void idle(void) {
    if (poll_mode) {
        for (unsigned i = 0; i < 32; i++)
            cpu_relax();
    } else {
        virtio_sleep();
    }
}

/* Progress watchdog: FAILs after timeout_us without a call to progress(). */
struct watchdog {
    u64 last;
    const char *what;
};

static void progress(struct watchdog *w) { w->last = rdtsc(); }

static void check_stalled(struct watchdog *w, u64 a, u64 b) {
    if (rdtsc() - w->last > ticks_of(timeout_us))
        tg_fail("vbench: %s made no progress for %lu ms (%lu of %lu)", w->what, timeout_us / 1000, a, b);
}

static void quiet_interrupts(struct virtq *q) {
    if (poll_mode)
        q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
}

static u64 irqs(struct virtio_dev *d) { return tg_atomic_read(&d->interrupts); }

/* ---- virtio-blk ------------------------------------------------------------------ */

#define BLK_QUEUE 256
#define BLK_MAX_QD 64
#define BLK_MAX_DESCS 64 /* per request: header + data segments + status */

struct breq {
    struct virtio_blk_req_hdr hdr; /* device-readable */
    volatile u8 status;            /* device-writable */
    u8 *data;
};

static struct virtio_dev *bdev;
static struct virtq *bq;
static u64 capacity_bytes, seg_bytes;
static struct breq *breqs;

static void blk_submit(struct breq *r, int write, u64 offset, u32 len) {
    struct virtq_buf bufs[BLK_MAX_DESCS];
    unsigned n = 0;
    r->hdr.type = write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    r->hdr.reserved = 0;
    r->hdr.sector = offset / VIRTIO_BLK_SECTOR_SIZE;
    r->status = 0xff;
    bufs[n++] = (struct virtq_buf){ (u64)&r->hdr, sizeof(r->hdr), 0 };
    for (u32 at = 0; at < len; at += (u32)seg_bytes) {
        u32 k = len - at < seg_bytes ? len - at : (u32)seg_bytes;
        bufs[n++] = (struct virtq_buf){ (u64)r->data + at, k, write ? 0 : VIRTQ_DESC_F_WRITE };
    }
    bufs[n++] = (struct virtq_buf){ (u64)&r->status, 1, VIRTQ_DESC_F_WRITE };
    if (virtq_add(bq, bufs, n, r) < 0)
        tg_fail("vbench: blk queue full (%u descriptors per request)", n);
}

static void blk_pass(int write, u64 total, u32 req_bytes, unsigned qd) {
    const char *name = write ? "write" : "read";
    u64 nreqs = total / req_bytes, wrap = capacity_bytes - capacity_bytes % req_bytes;
    u64 issued = 0, done = 0, offset = 0, irq0 = irqs(bdev), kick0 = bq->notifications;
    struct watchdog w = { 0, name };
    tg_printf("VBENCH GO blk %s\n", name);
    u64 t0 = rdtsc();
    progress(&w);
    for (; issued < qd && issued < nreqs; issued++) {
        blk_submit(&breqs[issued], write, offset, req_bytes);
        offset = (offset + req_bytes) % wrap;
    }
    virtq_kick(bq);
    while (done < nreqs) {
        unsigned got = 0, again = 0;
        u32 len;
        struct breq *r;
        while ((r = virtq_get(bq, &len))) {
            if (r->status != VIRTIO_BLK_S_OK)
                tg_fail("vbench: blk %s request completed with status %u", name, r->status);
            done++;
            got++;
            if (issued < nreqs) {
                blk_submit(r, write, offset, req_bytes);
                offset = (offset + req_bytes) % wrap;
                issued++;
                again++;
            }
        }
        if (again)
            virtq_kick(bq);
        if (got) {
            progress(&w);
        } else {
            check_stalled(&w, done, nreqs);
            idle();
        }
    }
    u64 t1 = rdtsc();
    tg_printf("VBENCH STOP blk %s\n", name);
    virtio_check_status(bdev, name);
    u64 bytes = nreqs * req_bytes, us = usec_of(t1 - t0);
    tg_printf("VBENCH blk %s bytes=%lu reqs=%lu usec=%lu", name, bytes, nreqs, us);
    print_rate("MBps", bytes, us);
    tg_printf(" req_kib=%u qd=%u irqs=%lu kicks=%lu\n", req_bytes / 1024, qd, irqs(bdev) - irq0,
              bq->notifications - kick0);
}

static void bench_blk(void) {
    u64 mib = tg_cmdline_u64("vbench.mib", 64), req_kib = tg_cmdline_u64("vbench.req_kib", 64);
    u64 qd = tg_cmdline_u64("vbench.qd", 8);
    char op[8] = "rw";
    tg_cmdline_get("vbench.op", op, sizeof(op));
    int do_read = !strcmp(op, "read") || !strcmp(op, "rw"), do_write = !strcmp(op, "write") || !strcmp(op, "rw");
    if (!do_read && !do_write)
        tg_fail("vbench.op=%s: read, write or rw", op);
    if (!mib || !req_kib || req_kib > 4096 || !qd || qd > BLK_MAX_QD)
        tg_fail("vbench: need vbench.mib >= 1, vbench.req_kib 1..4096, vbench.qd 1..%u", BLK_MAX_QD);
    bdev = virtio_find(VIRTIO_ID_BLOCK, 0);
    if (!bdev)
        tg_fail("no virtio-blk device found");
    u64 f = virtio_negotiate(bdev, VIRTIO_BIT(VIRTIO_F_VERSION_1),
                             VIRTIO_BIT(VIRTIO_BLK_F_RO) | VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX));
    if (do_write && (f & VIRTIO_BIT(VIRTIO_BLK_F_RO)))
        tg_fail("vbench: drive 0 is read-only; vbench.op=%s writes", op);
    capacity_bytes = virtio_config_read64(bdev, VIRTIO_BLK_CFG_CAPACITY) * VIRTIO_BLK_SECTOR_SIZE;
    seg_bytes = (f & VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX)) ? virtio_config_read32(bdev, VIRTIO_BLK_CFG_SIZE_MAX) : 0;
    if (seg_bytes < 4096 || seg_bytes > 1 * MIB)
        seg_bytes = 1 * MIB;
    u32 req_bytes = (u32)(req_kib * 1024);
    if (capacity_bytes < req_bytes)
        tg_fail("vbench: drive 0 holds %lu bytes, less than one %u-byte request", capacity_bytes, req_bytes);
    bq = virtio_queue_setup(bdev, 0, BLK_QUEUE);
    unsigned per_req = 2 + (unsigned)((req_bytes + seg_bytes - 1) / seg_bytes);
    if (per_req > BLK_MAX_DESCS)
        tg_fail("vbench: a %u-byte request takes %u descriptors (size_max %lu); at most %u", req_bytes, per_req,
                seg_bytes, BLK_MAX_DESCS);
    if (qd * per_req > bq->size)
        tg_fail("vbench: qd %lu x %u descriptors does not fit a %u-entry queue", qd, per_req, bq->size);
    quiet_interrupts(bq);
    breqs = tg_alloc_pages((unsigned)((qd * sizeof(struct breq) + 4095) / 4096));
    for (unsigned i = 0; i < qd; i++) {
        breqs[i].data = tg_alloc_pages(req_bytes / 4096 + (req_bytes % 4096 != 0));
        memset(breqs[i].data, 0x5a + i, req_bytes);
    }
    virtio_driver_ok(bdev);
    tg_printf("VBENCH blk capacity=%lu seg=%lu queue=%u poll=%d\n", capacity_bytes, seg_bytes, bq->size, poll_mode);
    if (do_read)
        blk_pass(0, mib * MIB, req_bytes, (unsigned)qd);
    if (do_write)
        blk_pass(1, mib * MIB, req_bytes, (unsigned)qd);
}

/* ---- virtio-net ------------------------------------------------------------------ */

#define NET_QUEUE 256
#define NET_BUF 2048 /* one RX buffer / TX slot: header + frame (<= 1526 bytes) */
#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_FRAME_MIN 60
#define ETH_FRAME_MAX 1514
#define ETHERTYPE_EMBER 0x88b5
#define NET_HDR ((u32)sizeof(struct virtio_net_hdr))

static const char TX_TAG[] = "VBENCH-TX", RX_TAG[] = "VBENCH-RX", END_TAG[] = "VBENCH-END";

static struct virtio_dev *ndev;
static struct virtq *rxq, *txq;
static u8 mac[ETH_ALEN];

static int has_tag(const u8 *payload, u32 n, const char *tag, u32 tag_len) {
    return n >= tag_len && memcmp(payload, tag, tag_len) == 0;
}

static void net_tx(u64 frames, u32 frame_len) {
    u8 *slots[NET_QUEUE];
    unsigned nfree = 0;
    for (unsigned i = 0; i < txq->size; i += 2) {
        u8 *page = tg_alloc_pages(1);
        for (unsigned k = 0; k < 2; k++) {
            u8 *s = page + k * NET_BUF, *fr = s + NET_HDR;
            memset(fr, 0xff, ETH_ALEN);
            memcpy(fr + ETH_ALEN, mac, ETH_ALEN);
            fr[12] = ETHERTYPE_EMBER >> 8;
            fr[13] = ETHERTYPE_EMBER & 0xff;
            slots[nfree++] = s;
        }
    }
    u64 sent = 0, done = 0, irq0 = irqs(ndev), kick0 = txq->notifications;
    struct watchdog w = { 0, "net tx" };
    tg_printf("VBENCH GO net tx\n");
    u64 t0 = rdtsc();
    progress(&w);
    while (done < frames) {
        unsigned added = 0, got = 0;
        while (sent < frames && nfree) {
            u8 *s = slots[--nfree];
            tg_snprintf((char *)s + NET_HDR + ETH_HLEN, 32, "%s %lu", TX_TAG, sent);
            struct virtq_buf b = { (u64)s, NET_HDR + frame_len, 0 };
            if (virtq_add(txq, &b, 1, s) < 0)
                tg_fail("vbench: transmit queue full");
            sent++;
            added++;
        }
        if (added)
            virtq_kick(txq);
        u32 len;
        u8 *s;
        while ((s = virtq_get(txq, &len))) {
            slots[nfree++] = s;
            done++;
            got++;
        }
        if (got) {
            progress(&w);
        } else if (!added) {
            check_stalled(&w, done, frames);
            idle();
        }
    }
    u64 t1 = rdtsc();
    tg_printf("VBENCH STOP net tx\n");
    virtio_check_status(ndev, "net tx");
    u64 us = usec_of(t1 - t0), bytes = frames * frame_len;
    tg_printf("VBENCH net tx frames=%lu bytes=%lu usec=%lu fps=%lu", frames, bytes, us, us ? frames * 1000000 / us : 0);
    print_rate("Mbps", bytes * 8, us);
    tg_printf(" irqs=%lu kicks=%lu\n", irqs(ndev) - irq0, txq->notifications - kick0);
}

/* The clock starts at data frame number `skip` (the receive ring may already hold that many when the
 * guest first looks), so the rate is the sustained one. */
static void net_rx(u64 skip) {
    u64 frames = 0, bytes = 0, t_first = 0, t_last = 0, host_sent = 0, irq0 = irqs(ndev);
    int end = 0;
    struct watchdog w = { 0, "net rx" };
    tg_printf("VBENCH net rx READY\n");
    progress(&w);
    while (!end) {
        unsigned got = 0;
        u32 len;
        u8 *buf;
        while ((buf = virtq_get(rxq, &len))) {
            got++;
            if (len < NET_HDR + ETH_HLEN)
                tg_fail("vbench: received buffer of %u bytes", len);
            u8 *fr = buf + NET_HDR, *payload = fr + ETH_HLEN;
            u32 flen = len - NET_HDR, plen = flen - ETH_HLEN;
            if (fr[12] == (ETHERTYPE_EMBER >> 8) && fr[13] == (ETHERTYPE_EMBER & 0xff)) {
                if (has_tag(payload, plen, RX_TAG, sizeof(RX_TAG) - 1)) {
                    u64 now = rdtsc();
                    if (frames++ == skip)
                        t_first = now;
                    if (frames > skip + 1)
                        bytes += flen;
                    t_last = now;
                } else if (has_tag(payload, plen, END_TAG, sizeof(END_TAG) - 1)) {
                    char num[24];
                    u32 k = 0;
                    for (u32 i = sizeof(END_TAG); i < plen && k + 1 < sizeof(num) && payload[i] >= '0' &&
                                                   payload[i] <= '9'; i++)
                        num[k++] = (char)payload[i];
                    num[k] = 0;
                    host_sent = tg_strtou64(num, NULL);
                    end = 1;
                }
            }
            struct virtq_buf b = { (u64)buf, NET_BUF, VIRTQ_DESC_F_WRITE };
            if (virtq_add(rxq, &b, 1, buf) < 0)
                tg_fail("vbench: receive queue full while reposting");
        }
        if (got) {
            virtq_kick(rxq);
            progress(&w);
        } else {
            check_stalled(&w, frames, 0);
            idle();
        }
    }
    tg_printf("VBENCH STOP net rx\n");
    virtio_check_status(ndev, "net rx");
    u64 counted = frames > skip + 1 ? frames - skip - 1 : 0, us = counted ? usec_of(t_last - t_first) : 0;
    tg_printf("VBENCH net rx frames=%lu timed=%lu bytes=%lu usec=%lu fps=%lu", frames, counted, bytes, us,
              us ? counted * 1000000 / us : 0);
    print_rate("Mbps", bytes * 8, us);
    tg_printf(" host_sent=%lu irqs=%lu\n", host_sent, irqs(ndev) - irq0);
}

static void bench_net(void) {
    char dir[8] = "both";
    tg_cmdline_get("vbench.dir", dir, sizeof(dir));
    int tx = !strcmp(dir, "tx") || !strcmp(dir, "both"), rx = !strcmp(dir, "rx") || !strcmp(dir, "both");
    if (!tx && !rx)
        tg_fail("vbench.dir=%s: tx, rx or both", dir);
    u64 frames = tg_cmdline_u64("vbench.frames", 20000), frame_len = tg_cmdline_u64("vbench.frame_len", 1514);
    if (!frames || frame_len < ETH_FRAME_MIN || frame_len > ETH_FRAME_MAX)
        tg_fail("vbench: need vbench.frames >= 1 and vbench.frame_len %u..%u", ETH_FRAME_MIN, ETH_FRAME_MAX);
    ndev = virtio_find(VIRTIO_ID_NET, 0);
    if (!ndev)
        tg_fail("no virtio-net device found");
    u64 f = virtio_negotiate(ndev, VIRTIO_BIT(VIRTIO_F_VERSION_1), VIRTIO_BIT(VIRTIO_NET_F_MAC));
    if (f & VIRTIO_BIT(VIRTIO_NET_F_MAC)) {
        virtio_config_read_bytes(ndev, VIRTIO_NET_CFG_MAC, mac, ETH_ALEN);
    } else {
        static const u8 chosen[ETH_ALEN] = { 0x02, 0, 0, 0, 0, 0x01 };
        memcpy(mac, chosen, ETH_ALEN);
    }
    rxq = virtio_queue_setup(ndev, VIRTIO_NET_Q_RX, NET_QUEUE);
    txq = virtio_queue_setup(ndev, VIRTIO_NET_Q_TX, NET_QUEUE);
    quiet_interrupts(rxq);
    quiet_interrupts(txq);
    for (unsigned i = 0; i < rxq->size; i += 2) {
        u8 *page = tg_alloc_pages(1);
        for (unsigned k = 0; k < 2; k++) {
            struct virtq_buf b = { (u64)page + k * NET_BUF, NET_BUF, VIRTQ_DESC_F_WRITE };
            if (virtq_add(rxq, &b, 1, page + k * NET_BUF) < 0)
                tg_fail("vbench: cannot post receive buffers");
        }
    }
    virtio_driver_ok(ndev);
    virtq_kick(rxq);
    tg_printf("VBENCH net mac=%02x:%02x:%02x:%02x:%02x:%02x queue=%u poll=%d\n", mac[0], mac[1], mac[2], mac[3],
              mac[4], mac[5], txq->size, poll_mode);
    if (tx)
        net_tx(frames, (u32)frame_len);
    if (rx)
        net_rx(frames / 4 < rxq->size ? frames / 4 : rxq->size);
}

/* ---- virtio-vsock ------------------------------------------------------------------ */

#define VS_QUEUE 128
#define VS_RX_CHAINS 64
#define VS_RX_DATA 4096
#define VS_EVENTS 4
#define VS_TX_SLOTS 32
#define VS_RBUF (256u * 1024) /* our buf_alloc: a power of two */
#define VS_HDR ((u32)sizeof(struct virtio_vsock_hdr))
#define VS_MAX_PKT (64u * 1024)
#define VS_CLOSE_WAIT_US 2000000

struct vs_chain {
    struct virtio_vsock_hdr hdr;
    u8 *data;
};

struct vs_conn {
    int state; /* 0 listening, 1 established, 2 closed */
    u32 port, peer_port;
    u8 *rbuf;
    u32 rx_cnt, fwd_cnt, fwd_sent, tx_cnt;
    u32 peer_buf_alloc, peer_fwd_cnt, peer_shutdown;
    int reset, need_response, need_credit;
};

static struct virtio_dev *vdev;
static struct virtq *vrx, *vtx, *vev;
static u64 guest_cid;
static struct vs_conn vc;
static u8 *vs_free[VS_TX_SLOTS];
static unsigned vs_nfree;
static u32 vs_pkt;

static void vs_post_rx(struct vs_chain *c) {
    struct virtq_buf b[2] = { { (u64)&c->hdr, VS_HDR, VIRTQ_DESC_F_WRITE },
                              { (u64)c->data, VS_RX_DATA, VIRTQ_DESC_F_WRITE } };
    if (virtq_add(vrx, b, 2, c) < 0)
        tg_fail("vbench: vsock receive queue full");
}

static void vs_post_event(u32 *e) {
    struct virtq_buf b = { (u64)e, 8, VIRTQ_DESC_F_WRITE };
    if (virtq_add(vev, &b, 1, e) < 0)
        tg_fail("vbench: vsock event queue full");
}

static u32 vs_pending(void) { return vc.rx_cnt - vc.fwd_cnt; }

static u32 vs_credit(void) {
    u32 in_use = vc.tx_cnt - vc.peer_fwd_cnt;
    return in_use >= vc.peer_buf_alloc ? 0 : vc.peer_buf_alloc - in_use;
}

static void vs_packet(const struct virtio_vsock_hdr *h, const u8 *data) {
    if (h->dst_cid != guest_cid || h->type != VIRTIO_VSOCK_TYPE_STREAM || h->dst_port != vc.port)
        tg_fail("vbench: vsock packet for cid %lu port %u type %u (op %u)", h->dst_cid, h->dst_port, h->type, h->op);
    if (vc.state == 0) {
        if (h->op != VIRTIO_VSOCK_OP_REQUEST)
            tg_fail("vbench: vsock op %u before a connection", h->op);
        vc.state = 1;
        vc.peer_port = h->src_port;
        vc.need_response = 1;
    } else if (h->src_port != vc.peer_port) {
        tg_fail("vbench: vsock packet from a second peer port %u", h->src_port);
    }
    vc.peer_buf_alloc = h->buf_alloc;
    vc.peer_fwd_cnt = h->fwd_cnt;
    switch (h->op) {
    case VIRTIO_VSOCK_OP_REQUEST:
        break;
    case VIRTIO_VSOCK_OP_RW: {
        if (h->len > VS_RBUF - vs_pending())
            tg_fail("vbench: vsock peer sent %u bytes with %u of credit", h->len, VS_RBUF - vs_pending());
        for (u32 done = 0; done < h->len;) {
            u32 at = vc.rx_cnt % VS_RBUF, k = h->len - done;
            if (k > VS_RBUF - at)
                k = VS_RBUF - at;
            memcpy(vc.rbuf + at, data + done, k);
            done += k;
            vc.rx_cnt += k;
        }
        break;
    }
    case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
        break;
    case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        vc.need_credit = 1;
        break;
    case VIRTIO_VSOCK_OP_SHUTDOWN:
        vc.peer_shutdown |= h->flags;
        break;
    case VIRTIO_VSOCK_OP_RST:
        vc.reset = 1;
        break;
    default:
        tg_fail("vbench: vsock op %u", h->op);
    }
}

/* Takes everything the device completed; returns how many buffers. */
static unsigned vs_poll(void) {
    unsigned n = 0, rx = 0, ev = 0;
    u32 len;
    u8 *s;
    while ((s = virtq_get(vtx, &len))) {
        vs_free[vs_nfree++] = s;
        n++;
    }
    struct vs_chain *c;
    while ((c = virtq_get(vrx, &len))) {
        if (len < VS_HDR || c->hdr.len > VS_RX_DATA || c->hdr.len > len - VS_HDR)
            tg_fail("vbench: vsock packet of %u bytes claims %u payload bytes", len, c->hdr.len);
        vs_packet(&c->hdr, c->data);
        vs_post_rx(c);
        rx++;
    }
    u32 *e;
    while ((e = virtq_get(vev, &len))) {
        if (len >= 4 && *e == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
            tg_fail("vbench: vsock transport reset");
        vs_post_event(e);
        ev++;
    }
    if (rx)
        virtq_kick(vrx);
    if (ev)
        virtq_kick(vev);
    return n + rx + ev;
}

/* Queues one packet (not kicked). */
static void vs_queue(u8 *slot, u16 op, u32 flags, u32 len) {
    struct virtio_vsock_hdr *h = (struct virtio_vsock_hdr *)slot;
    h->src_cid = guest_cid;
    h->dst_cid = VMADDR_CID_HOST;
    h->src_port = vc.port;
    h->dst_port = vc.peer_port;
    h->len = len;
    h->type = VIRTIO_VSOCK_TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = VS_RBUF;
    h->fwd_cnt = vc.fwd_cnt;
    vc.fwd_sent = vc.fwd_cnt;
    vc.tx_cnt += len;
    struct virtq_buf b = { (u64)slot, VS_HDR + len, 0 };
    if (virtq_add(vtx, &b, 1, slot) < 0)
        tg_fail("vbench: vsock transmit queue full");
}

static void vs_control(u16 op, u32 flags) {
    struct watchdog w = { 0, "vsock control packet" };
    progress(&w);
    while (!vs_nfree) {
        if (vs_poll())
            progress(&w);
        else {
            check_stalled(&w, 0, 1);
            idle();
        }
    }
    vs_queue(vs_free[--vs_nfree], op, flags, 0);
    virtq_kick(vtx);
}

/* Answers what received packets asked for, and returns credit once a quarter of the buffer was consumed. */
static void vs_flush(void) {
    if (vc.need_response) {
        vc.need_response = 0;
        vs_control(VIRTIO_VSOCK_OP_RESPONSE, 0);
        tg_printf("VBENCH vsock ACCEPTED port=%u peer=%u\n", vc.port, vc.peer_port);
    }
    if (vc.state == 1 && (vc.need_credit || vc.fwd_cnt - vc.fwd_sent >= VS_RBUF / 4)) {
        vc.need_credit = 0;
        vs_control(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
    }
}

/* Sends up to `len` bytes (from the receive ring when `echo`, else whatever the slot holds)
 * as far as credit and free slots allow; returns the bytes queued. */
static u32 vs_send(u32 len, int echo) {
    u32 sent = 0;
    while (sent < len && vs_nfree && !vc.reset && !(vc.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV)) {
        u32 n = len - sent, credit = vs_credit();
        if (n > credit)
            n = credit;
        if (n > vs_pkt)
            n = vs_pkt;
        if (!n)
            break;
        u8 *slot = vs_free[--vs_nfree];
        if (echo) {
            for (u32 done = 0; done < n;) {
                u32 at = vc.fwd_cnt % VS_RBUF, k = n - done;
                if (k > VS_RBUF - at)
                    k = VS_RBUF - at;
                memcpy(slot + VS_HDR + done, vc.rbuf + at, k);
                done += k;
                vc.fwd_cnt += k;
            }
        }
        vs_queue(slot, VIRTIO_VSOCK_OP_RW, 0, n);
        sent += n;
    }
    if (sent)
        virtq_kick(vtx);
    return sent;
}

static void vs_check_alive(const char *what) {
    if (vc.reset || vc.peer_shutdown)
        tg_fail("vbench: vsock connection closed by the host during %s (reset=%d shutdown=%u)", what, vc.reset,
                vc.peer_shutdown);
}

static void bench_vsock(void) {
    u64 port = tg_cmdline_u64("vbench.port", 5201), rtt = tg_cmdline_u64("vbench.rtt", 1000);
    u64 msg = tg_cmdline_u64("vbench.msg", 64), mib = tg_cmdline_u64("vbench.mib", 16);
    u64 pkt_kib = tg_cmdline_u64("vbench.pkt_kib", 4);
    if (!port || port > 0xffffffffull || !msg || msg > 4096 || rtt * msg > 0x7fffffffull || mib > 1024 || !pkt_kib ||
        pkt_kib * 1024 > VS_MAX_PKT)
        tg_fail("vbench: vsock options out of range");
    vs_pkt = (u32)(pkt_kib * 1024);
    vdev = virtio_find(VIRTIO_ID_VSOCK, 0);
    if (!vdev)
        tg_fail("no virtio-vsock device found");
    virtio_negotiate(vdev, VIRTIO_BIT(VIRTIO_F_VERSION_1), 0);
    guest_cid = virtio_config_read64(vdev, VIRTIO_VSOCK_CFG_GUEST_CID);
    vrx = virtio_queue_setup(vdev, VIRTIO_VSOCK_Q_RX, VS_QUEUE);
    vtx = virtio_queue_setup(vdev, VIRTIO_VSOCK_Q_TX, VS_QUEUE);
    vev = virtio_queue_setup(vdev, VIRTIO_VSOCK_Q_EVENT, VS_EVENTS);
    quiet_interrupts(vrx);
    quiet_interrupts(vtx);
    vc.port = (u32)port;
    vc.rbuf = tg_alloc_pages(VS_RBUF / 4096);
    struct vs_chain *chains = tg_alloc_pages((VS_RX_CHAINS * sizeof(struct vs_chain) + 4095) / 4096);
    for (unsigned i = 0; i < VS_RX_CHAINS && 2 * i + 2 <= vrx->size; i++) {
        chains[i].data = tg_alloc_pages(VS_RX_DATA / 4096);
        vs_post_rx(&chains[i]);
    }
    u32 *events = tg_alloc_pages(1);
    for (unsigned i = 0; i < VS_EVENTS && i < vev->size; i++)
        vs_post_event(&events[2 * i]);
    for (unsigned i = 0; i < VS_TX_SLOTS; i++)
        vs_free[vs_nfree++] = tg_alloc_pages((VS_HDR + vs_pkt + 4095) / 4096);
    virtio_driver_ok(vdev);
    virtq_kick(vrx);
    virtq_kick(vev);
    tg_printf("VBENCH vsock cid=%lu port=%lu pkt=%u poll=%d LISTENING\n", guest_cid, port, vs_pkt, poll_mode);

    /* 0. Accept. */
    struct watchdog w = { 0, "vsock accept" };
    progress(&w);
    while (vc.state == 0) {
        if (vs_poll())
            progress(&w);
        else {
            check_stalled(&w, 0, 1);
            idle();
        }
    }
    vs_flush();

    /* 1. Echo R x M bytes as they arrive. */
    u64 echo_total = rtt * msg, echoed = 0;
    w.what = "vsock echo";
    progress(&w);
    while (echoed < echo_total) {
        unsigned ev = vs_poll();
        vs_check_alive("the echo");
        u32 want = vs_pending();
        if (want > echo_total - echoed)
            want = (u32)(echo_total - echoed);
        u32 sent = vs_send(want, 1);
        echoed += sent;
        vs_flush();
        if (ev || sent)
            progress(&w);
        else {
            check_stalled(&w, echoed, echo_total);
            idle();
        }
    }
    tg_printf("VBENCH vsock echo bytes=%lu\n", echoed);

    /* 2. Host -> guest bulk: consume N MiB, then acknowledge with one byte. */
    u64 total = mib * MIB, got = 0, t_first = 0, t_last = 0;
    w.what = "vsock rx";
    progress(&w);
    while (got < total) {
        unsigned ev = vs_poll();
        u32 n = vs_pending();
        if (n > total - got)
            n = (u32)(total - got);
        if (n) {
            if (!got)
                t_first = rdtsc();
            t_last = rdtsc();
            vc.fwd_cnt += n; /* discard: the payload is not looked at */
            got += n;
        }
        vs_check_alive("the host->guest stream");
        vs_flush();
        if (ev || n)
            progress(&w);
        else {
            check_stalled(&w, got, total);
            idle();
        }
    }
    w.what = "vsock ack";
    progress(&w);
    while (!vs_send(1, 0)) { /* the ack: one byte (its value does not matter) */
        if (vs_poll())
            progress(&w);
        else {
            check_stalled(&w, 0, 1);
            idle();
        }
    }
    u64 us = usec_of(t_last - t_first);
    tg_printf("VBENCH vsock rx bytes=%lu usec=%lu", got, us);
    print_rate("MBps", got, us);
    tg_printf("\n");

    /* 3. Guest -> host bulk. */
    u64 queued = 0;
    w.what = "vsock tx";
    u64 t0 = rdtsc();
    progress(&w);
    while (queued < total || vs_nfree < VS_TX_SLOTS) {
        unsigned ev = vs_poll();
        vs_check_alive("the guest->host stream");
        u32 sent = queued < total ? vs_send((u32)(total - queued < 0x40000000ull ? total - queued : 0x40000000ull), 0)
                                  : 0;
        queued += sent;
        vs_flush();
        if (ev || sent)
            progress(&w);
        else {
            check_stalled(&w, queued, total);
            idle();
        }
    }
    u64 t1 = rdtsc();
    us = usec_of(t1 - t0);
    tg_printf("VBENCH vsock tx bytes=%lu usec=%lu", queued, us);
    print_rate("MBps", queued, us);
    tg_printf("\n");

    /* Close (§5.10.6.5): SHUTDOWN both ways, wait for the host's RST (or send ours). */
    vs_control(VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND);
    u64 deadline = tg_deadline_us(VS_CLOSE_WAIT_US);
    while (!vc.reset && rdtsc() < deadline)
        if (!vs_poll())
            idle();
    if (!vc.reset)
        vs_control(VIRTIO_VSOCK_OP_RST, 0);
    virtio_check_status(vdev, "vsock");
    tg_printf("VBENCH vsock DONE irqs=%lu\n", irqs(vdev));
}

/* ---- entry ------------------------------------------------------------------------ */

int mode_vbench(void) {
    char dev[8] = "";
    tg_cmdline_get("vbench.dev", dev, sizeof(dev));
    poll_mode = tg_cmdline_u64("vbench.poll", 0) != 0;
    timeout_us = tg_cmdline_u64("vbench.timeout_ms", 20000) * 1000;
    virtio_scan();
    clock_init();
    if (!strcmp(dev, "blk"))
        bench_blk();
    else if (!strcmp(dev, "net"))
        bench_net();
    else if (!strcmp(dev, "vsock"))
        bench_vsock();
    else
        tg_fail("vbench.dev=%s: blk, net or vsock", dev);
    return 0;
}
