/*
 * vsock — virtio-vsock stream sockets end to end (virtio 1.1 §5.10) through
 * lib/virtio.c, against a host side like Firecracker's (guest CID from the
 * config, host CID 2).
 *
 * The protocol in short (§5.10.6): every packet is a 44-byte header (CIDs,
 * ports, payload length, type STREAM, op, flags, buf_alloc, fwd_cnt) plus
 * payload. A connection opens with REQUEST, answered by RESPONSE (or RST);
 * data travels in RW packets; SHUTDOWN (flags RCV/SEND) announces the end, and
 * the peer's RST completes the close. Flow control is by credit: each side
 * advertises, in every header, buf_alloc (its receive buffer for the
 * connection) and fwd_cnt (bytes it has taken out of that buffer, free
 * running). A sender may have at most peer_buf_alloc - (tx_cnt - peer_fwd_cnt)
 * bytes unconsumed at the peer; CREDIT_UPDATE tells the peer a new fwd_cnt
 * without data, CREDIT_REQUEST asks for one.
 *
 * The driver: rxq holds 64 chains of two descriptors (the 44-byte header,
 * then 4 KiB of payload); txq packets are one descriptor (header + payload
 * contiguous, up to 4052 payload bytes); eventq holds 4 event buffers.
 * Received packets are only recorded (data into the connection's 128 KiB
 * receive ring, replies as pending flags); the main loops send, so handling
 * never recurses. The device must respect the guest's credit: a packet past
 * it FAILs the test.
 *
 * Modes of operation (both may be given; connect runs first):
 *   vsock.port=<P>    connect to host port P (Firecracker: the host listens on
 *                     <uds_path>_P), send `hello from guest`, read the echo:
 *                     VSOCK CONNECTED port=<P> local=<port>
 *                     VSOCK ECHO hello from guest
 *                     with vsock.bytes=<n> then stream n bytes while reading the
 *                     echo back: VSOCK BYTES <n> SUM <crc32> via=connect
 *                     (CRC-32 of the bulk bytes, as zlib.crc32; the echo must match)
 *   vsock.listen=<P>  VSOCK LISTENING <P>, accept one connection and echo
 *                     everything back until the host closes:
 *                     VSOCK ACCEPTED port=<P> peer=<port>
 *                     VSOCK BYTES <n> SUM <crc32> via=listen
 * Each connection ends with `VSOCK CLOSED <port> by=<rst|shutdown|guest>`, the
 * run with `VSOCK DONE ...` (counters; credit_requests=<sent>/<received>).
 * vsock.timeout_ms=<ms> (default 30000) bounds every wait for progress.
 */
#include "virtio.h"

#define QUEUE_SIZE 128
#define RX_CHAINS 64
#define RX_DATA 4096
#define EVENT_BUFS 4
#define TX_SLOTS 32
#define HDR_LEN ((u32)sizeof(struct virtio_vsock_hdr))
#define TX_MAX_PAYLOAD (4096 - HDR_LEN)
#define RBUF_SIZE (128u * 1024) /* our buf_alloc; a power of two */
#define LOCAL_PORT 50000
#define MAX_PENDING_RST 16
#define CREDIT_REQUEST_US 100000
#define CLOSE_WAIT_US 2000000

static const char HELLO[] = "hello from guest";

enum conn_state { C_FREE, C_CONNECTING, C_ESTABLISHED, C_CLOSED };

struct conn {
    enum conn_state state;
    u32 local_port, peer_port;
    u8 *rbuf;       /* RBUF_SIZE bytes: what the peer sent and we have not consumed */
    u32 rx_cnt;     /* bytes received (free running) */
    u32 fwd_cnt;    /* bytes consumed from rbuf (free running) */
    u32 fwd_sent;   /* the fwd_cnt the peer last heard from us */
    u32 tx_cnt;     /* payload bytes sent */
    u32 peer_buf_alloc, peer_fwd_cnt;
    u32 peer_shutdown;
    int reset;
    int need_response, need_credit_update;
};

struct rx_chain {
    struct virtio_vsock_hdr hdr;
    u8 *data;
};

struct tx_slot {
    struct virtio_vsock_hdr hdr; /* payload follows directly: one descriptor */
    u8 payload[TX_MAX_PAYLOAD];
};

static struct virtio_dev *dev;
static struct virtq *rxq, *txq, *evq;
static u64 guest_cid;
static u32 listen_port;
static u64 timeout_us;
static struct conn conn;
static struct tx_slot *tx_free[TX_SLOTS];
static unsigned ntx_free;
static struct { u32 src_port, dst_port; } pending_rst[MAX_PENDING_RST];
static unsigned npending_rst;
static u64 rx_packets, tx_packets, credit_requests_sent, credit_requests_seen, credit_updates_sent, rsts_sent,
    unmatched, dropped_rst;

/* ---- receiving ---- */

static void post_rx(struct rx_chain *c) {
    struct virtq_buf b[2] = { { (u64)&c->hdr, HDR_LEN, VIRTQ_DESC_F_WRITE },
                              { (u64)c->data, RX_DATA, VIRTQ_DESC_F_WRITE } };
    if (virtq_add(rxq, b, 2, c) < 0)
        tg_fail("vsock: receive queue full while reposting a buffer");
}

static void post_event(u32 *e) {
    struct virtq_buf b = { (u64)e, sizeof(*e), VIRTQ_DESC_F_WRITE };
    if (virtq_add(evq, &b, 1, e) < 0)
        tg_fail("vsock: event queue full while reposting a buffer");
}

static u32 rx_pending(const struct conn *c) { return c->rx_cnt - c->fwd_cnt; }

static void queue_rst(u32 src_port, u32 dst_port) {
    if (npending_rst == MAX_PENDING_RST) {
        dropped_rst++;
        return;
    }
    pending_rst[npending_rst].src_port = src_port;
    pending_rst[npending_rst].dst_port = dst_port;
    npending_rst++;
}

static void conn_init(struct conn *c, enum conn_state state, u32 local_port, u32 peer_port) {
    u8 *rbuf = c->rbuf;
    memset(c, 0, sizeof(*c));
    c->rbuf = rbuf;
    c->state = state;
    c->local_port = local_port;
    c->peer_port = peer_port;
}

static void handle_packet(const struct virtio_vsock_hdr *h, const u8 *data) {
    struct conn *c = &conn;
    rx_packets++;
    if (h->dst_cid != guest_cid || h->src_cid != VMADDR_CID_HOST)
        tg_fail("vsock: packet from cid %lu to cid %lu (guest cid %lu, host %u), op %u", h->src_cid, h->dst_cid,
                guest_cid, VMADDR_CID_HOST, h->op);
    int ours = c->state != C_FREE && c->state != C_CLOSED && h->dst_port == c->local_port &&
               h->src_port == c->peer_port && h->type == VIRTIO_VSOCK_TYPE_STREAM;
    if (!ours) {
        if (h->op == VIRTIO_VSOCK_OP_REQUEST && h->type == VIRTIO_VSOCK_TYPE_STREAM && listen_port &&
            h->dst_port == listen_port && c->state == C_FREE) {
            conn_init(c, C_ESTABLISHED, listen_port, h->src_port);
            c->peer_buf_alloc = h->buf_alloc;
            c->peer_fwd_cnt = h->fwd_cnt;
            c->need_response = 1;
            return;
        }
        unmatched++;
        if (h->op != VIRTIO_VSOCK_OP_RST) /* §5.10.6.4: unknown connection -> RST */
            queue_rst(h->dst_port, h->src_port);
        return;
    }
    c->peer_buf_alloc = h->buf_alloc;
    c->peer_fwd_cnt = h->fwd_cnt;
    switch (h->op) {
    case VIRTIO_VSOCK_OP_RESPONSE:
        if (c->state == C_CONNECTING)
            c->state = C_ESTABLISHED;
        break;
    case VIRTIO_VSOCK_OP_RW: {
        if (c->state != C_ESTABLISHED)
            tg_fail("vsock: RW packet on port %u before the connection was established", c->local_port);
        u32 room = RBUF_SIZE - rx_pending(c);
        if (h->len > room)
            tg_fail("vsock: the host sent %u bytes with only %u bytes of credit left (buf_alloc %u, rx %u, fwd %u)",
                    h->len, room, RBUF_SIZE, c->rx_cnt, c->fwd_sent);
        for (u32 done = 0; done < h->len;) {
            u32 at = c->rx_cnt % RBUF_SIZE, n = h->len - done;
            if (n > RBUF_SIZE - at)
                n = RBUF_SIZE - at;
            memcpy(c->rbuf + at, data + done, n);
            done += n;
            c->rx_cnt += n;
        }
        break;
    }
    case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
        break;
    case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        credit_requests_seen++;
        c->need_credit_update = 1;
        break;
    case VIRTIO_VSOCK_OP_SHUTDOWN:
        c->peer_shutdown |= h->flags & (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND);
        break;
    case VIRTIO_VSOCK_OP_RST:
        c->reset = 1;
        c->state = C_CLOSED;
        break;
    case VIRTIO_VSOCK_OP_REQUEST:
        tg_fail("vsock: REQUEST for port %u, which already has a connection from port %u", c->local_port,
                c->peer_port);
    default:
        tg_fail("vsock: packet with unknown op %u on port %u", h->op, c->local_port);
    }
}

/* Takes every completed buffer from the three queues; returns how many. Never sends. */
static unsigned poll(void) {
    unsigned n = 0, rx = 0, ev = 0;
    u32 len;
    struct tx_slot *s;
    while ((s = virtq_get(txq, &len))) {
        tx_free[ntx_free++] = s;
        n++;
    }
    struct rx_chain *c;
    while ((c = virtq_get(rxq, &len))) {
        if (len < HDR_LEN)
            tg_fail("vsock: used receive chain of %u bytes is shorter than the %u-byte header", len, HDR_LEN);
        if (c->hdr.len > RX_DATA || c->hdr.len > len - HDR_LEN)
            tg_fail("vsock: header says %u payload bytes; the device wrote %u into a %u-byte buffer", c->hdr.len,
                    len - HDR_LEN, RX_DATA);
        handle_packet(&c->hdr, c->data);
        post_rx(c);
        rx++;
    }
    u32 *e;
    while ((e = virtq_get(evq, &len))) {
        if (len >= sizeof(*e))
            tg_printf("VSOCK EVENT id=%u\n", *e);
        if (len >= sizeof(*e) && *e == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
            tg_fail("vsock: the device reset the transport (connections are gone)");
        post_event(e);
        ev++;
    }
    if (rx)
        virtq_kick(rxq);
    if (ev)
        virtq_kick(evq);
    return n + rx + ev;
}

/* ---- sending ---- */

static struct tx_slot *tx_slot_wait(void) {
    u64 deadline = tg_deadline_us(timeout_us);
    for (;;) {
        poll();
        if (ntx_free)
            return tx_free[--ntx_free];
        if (rdtsc() >= deadline)
            tg_fail("vsock: the device completed none of %u transmitted packets within %lu ms", TX_SLOTS,
                    timeout_us / 1000);
        virtio_sleep();
    }
}

/* Sends one packet of connection `c` (or, with c == NULL, an RST for the given ports). */
static void send_packet(struct tx_slot *s, struct conn *c, u32 src_port, u32 dst_port, u16 op, u32 flags, u32 len) {
    struct virtio_vsock_hdr *h = &s->hdr;
    h->src_cid = guest_cid;
    h->dst_cid = VMADDR_CID_HOST;
    h->src_port = src_port;
    h->dst_port = dst_port;
    h->len = len;
    h->type = VIRTIO_VSOCK_TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = RBUF_SIZE;
    h->fwd_cnt = c ? c->fwd_cnt : 0;
    if (c) {
        c->fwd_sent = c->fwd_cnt;
        c->tx_cnt += len;
    }
    struct virtq_buf b = { (u64)s, HDR_LEN + len, 0 };
    if (virtq_add(txq, &b, 1, s) < 0)
        tg_fail("vsock: transmit queue full");
    tx_packets++;
}

static void send_control(struct conn *c, u16 op, u32 flags) {
    struct tx_slot *s = tx_slot_wait();
    send_packet(s, c, c->local_port, c->peer_port, op, flags, 0);
    virtq_kick(txq);
}

/* Sends what received packets asked for: RESPONSE, CREDIT_UPDATE, RSTs. */
static void flush_control(void) {
    struct conn *c = &conn;
    if (c->need_response) {
        c->need_response = 0;
        send_control(c, VIRTIO_VSOCK_OP_RESPONSE, 0);
        tg_printf("VSOCK ACCEPTED port=%u peer=%u\n", c->local_port, c->peer_port);
    }
    if (c->need_credit_update && c->state == C_ESTABLISHED) {
        c->need_credit_update = 0;
        send_control(c, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
        credit_updates_sent++;
    }
    /* Most of the receive ring consumed without telling the peer: it may be waiting for credit. */
    if (c->state == C_ESTABLISHED && c->fwd_cnt - c->fwd_sent >= RBUF_SIZE / 4) {
        send_control(c, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
        credit_updates_sent++;
    }
    while (npending_rst) {
        npending_rst--;
        struct tx_slot *s = tx_slot_wait();
        send_packet(s, NULL, pending_rst[npending_rst].src_port, pending_rst[npending_rst].dst_port,
                    VIRTIO_VSOCK_OP_RST, 0, 0);
        virtq_kick(txq);
        rsts_sent++;
    }
}

static u32 peer_credit(const struct conn *c) {
    u32 in_use = c->tx_cnt - c->peer_fwd_cnt;
    return in_use >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_use;
}

/* Sends up to `len` bytes from `produce` as RW packets, as far as credit and free
 * slots allow without waiting; returns the bytes sent. */
typedef void (*producer_t)(u8 *out, u32 n, void *arg);
static u32 send_data(struct conn *c, u32 len, producer_t produce, void *arg) {
    u32 sent = 0;
    while (sent < len && c->state == C_ESTABLISHED && !(c->peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV)) {
        u32 n = len - sent, credit = peer_credit(c);
        if (n > credit)
            n = credit;
        if (n > TX_MAX_PAYLOAD)
            n = TX_MAX_PAYLOAD;
        if (!n || !ntx_free)
            break;
        struct tx_slot *s = tx_free[--ntx_free];
        produce(s->payload, n, arg);
        send_packet(s, c, c->local_port, c->peer_port, VIRTIO_VSOCK_OP_RW, 0, n);
        sent += n;
    }
    if (sent)
        virtq_kick(txq);
    return sent;
}

/* TSC ticks in `us` microseconds. */
static u64 ticks(u64 us) { return us * (tg_tsc_hz() / 1000000); }

/* Asks for credit when blocked on it for a while (§5.10.6.3). */
static void maybe_request_credit(struct conn *c, u64 *last) {
    u64 now = rdtsc();
    if (peer_credit(c) == 0 && now - *last >= ticks(CREDIT_REQUEST_US)) {
        *last = now;
        send_control(c, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0);
        credit_requests_sent++;
    }
}

/* ---- connections ---- */

/* Copies `n` bytes out of the receive ring (consuming them) into `out` (NULL: discard). */
static void consume(struct conn *c, u8 *out, u32 n, u32 *crc) {
    for (u32 done = 0; done < n;) {
        u32 at = c->fwd_cnt % RBUF_SIZE, k = n - done;
        if (k > RBUF_SIZE - at)
            k = RBUF_SIZE - at;
        if (out)
            memcpy(out + done, c->rbuf + at, k);
        if (crc)
            *crc = tg_crc32(*crc, c->rbuf + at, k);
        done += k;
        c->fwd_cnt += k;
    }
}

static int conn_settled(void *arg) {
    struct conn *c = arg;
    poll();
    flush_control();
    return c->state != C_CONNECTING;
}

static int hello_echoed(void *arg) {
    struct conn *c = arg;
    poll();
    flush_control();
    return rx_pending(c) >= sizeof(HELLO) - 1 || c->state != C_ESTABLISHED || c->peer_shutdown;
}

static int closed(void *arg) {
    struct conn *c = arg;
    poll();
    flush_control();
    return c->reset || c->peer_shutdown == (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND);
}

/* Ends the connection cleanly (§5.10.6.5): answer the peer's full SHUTDOWN with
 * RST, or send ours and wait for its RST (sending RST ourselves after a while). */
static void conn_close(struct conn *c) {
    const char *by = "rst";
    if (!c->reset) {
        if (c->peer_shutdown == (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND)) {
            by = "shutdown";
        } else {
            by = "guest";
            send_control(c, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND);
            virtio_wait(closed, c, CLOSE_WAIT_US);
        }
        if (!c->reset) {
            send_control(c, VIRTIO_VSOCK_OP_RST, 0);
            rsts_sent++;
        }
    }
    tg_printf("VSOCK CLOSED %u by=%s\n", c->local_port, by);
    c->state = C_FREE;
}

/* Byte k of the guest's bulk stream. */
static u8 bulk_byte(u32 k) { return (u8)((k * 0x9e3779b1u) >> 24); }

struct bulk {
    u32 next; /* the stream offset of the next byte to produce */
    u32 crc;
};

static void produce_bulk(u8 *out, u32 n, void *arg) {
    struct bulk *b = arg;
    for (u32 i = 0; i < n; i++)
        out[i] = bulk_byte(b->next + i);
    b->crc = tg_crc32(b->crc, out, n);
    b->next += n;
}

static void produce_hello(u8 *out, u32 n, void *arg) {
    (void)arg;
    memcpy(out, HELLO, n);
}

static void run_connect(u32 port, u64 bulk_bytes) {
    struct conn *c = &conn;
    conn_init(c, C_CONNECTING, LOCAL_PORT, port);
    send_control(c, VIRTIO_VSOCK_OP_REQUEST, 0);
    if (!virtio_wait(conn_settled, c, timeout_us))
        tg_fail("vsock: no answer to a connection request to host port %u within %lu ms", port, timeout_us / 1000);
    if (c->state != C_ESTABLISHED)
        tg_fail("vsock: connection to host port %u refused (RST)", port);
    tg_printf("VSOCK CONNECTED port=%u local=%u\n", port, c->local_port);

    u64 blocked_since = rdtsc();
    for (u32 sent = 0; sent < sizeof(HELLO) - 1;) {
        poll();
        flush_control();
        sent += send_data(c, (u32)sizeof(HELLO) - 1 - sent, produce_hello, NULL);
        if (c->state != C_ESTABLISHED)
            tg_fail("vsock: connection closed while sending the greeting");
        if (sent < sizeof(HELLO) - 1) {
            maybe_request_credit(c, &blocked_since);
            virtio_sleep();
        }
    }
    if (!virtio_wait(hello_echoed, c, timeout_us) || rx_pending(c) < sizeof(HELLO) - 1)
        tg_fail("vsock: the greeting's echo did not come back within %lu ms (%u bytes)", timeout_us / 1000,
                rx_pending(c));
    char echo[sizeof(HELLO)];
    consume(c, (u8 *)echo, sizeof(HELLO) - 1, NULL);
    echo[sizeof(HELLO) - 1] = 0;
    tg_printf("VSOCK ECHO %s\n", echo);
    if (strcmp(echo, HELLO) != 0)
        tg_fail("vsock: echo '%s' differs from the greeting", echo);

    if (bulk_bytes) {
        struct bulk b = { 0, 0 };
        u32 received = 0, rx_crc = 0;
        u64 last_progress = rdtsc(), last_request = rdtsc();
        while (received < bulk_bytes) {
            unsigned events = poll();
            u32 got = rx_pending(c);
            if (got > bulk_bytes - received)
                tg_fail("vsock: %u bytes echoed beyond the %lu sent", got - (u32)(bulk_bytes - received),
                        bulk_bytes);
            consume(c, NULL, got, &rx_crc);
            received += got;
            flush_control();
            u32 sent = send_data(c, (u32)bulk_bytes - b.next, produce_bulk, &b);
            if (c->reset || c->state != C_ESTABLISHED || c->peer_shutdown)
                tg_fail("vsock: connection ended after %u of %lu bytes echoed (reset=%d shutdown=%u)", received,
                        bulk_bytes, c->reset, c->peer_shutdown);
            if (events || got || sent) {
                last_progress = rdtsc();
                continue;
            }
            if (rdtsc() - last_progress > ticks(timeout_us))
                tg_fail("vsock: no progress for %lu ms: sent %u, echoed %u of %lu bytes, credit %u", timeout_us / 1000,
                        b.next, received, bulk_bytes, peer_credit(c));
            if (b.next < bulk_bytes)
                maybe_request_credit(c, &last_request);
            virtio_sleep();
        }
        if (rx_crc != b.crc)
            tg_fail("vsock: the echo of %lu bytes has CRC %08x; sent CRC %08x", bulk_bytes, rx_crc, b.crc);
        tg_printf("VSOCK BYTES %lu SUM %08x via=connect\n", bulk_bytes, rx_crc);
    }
    conn_close(c);
    virtio_check_status(dev, "the connection to the host");
}

struct echo_src {
    struct conn *c;
    u32 crc;
};

static void produce_echo(u8 *out, u32 n, void *arg) {
    struct echo_src *e = arg;
    consume(e->c, out, n, &e->crc);
}

static int accepted(void *arg) {
    struct conn *c = arg;
    poll();
    flush_control();
    return c->state != C_FREE;
}

static void run_listen(u32 port) {
    struct conn *c = &conn;
    listen_port = port;
    tg_printf("VSOCK LISTENING %u\n", port);
    if (!virtio_wait(accepted, c, timeout_us))
        tg_fail("vsock: no connection to port %u within %lu ms", port, timeout_us / 1000);
    struct echo_src e = { c, 0 };
    u64 echoed = 0, last_progress = rdtsc(), last_request = rdtsc();
    for (;;) {
        unsigned events = poll();
        flush_control();
        u32 sent = send_data(c, rx_pending(c), produce_echo, &e);
        echoed += sent;
        if (c->reset || (c->peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV) ||
            ((c->peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND) && !rx_pending(c)))
            break;
        if (events || sent) {
            last_progress = rdtsc();
            continue;
        }
        if (rdtsc() - last_progress > ticks(timeout_us))
            tg_fail("vsock: no progress for %lu ms after echoing %lu bytes (pending %u, credit %u)",
                    timeout_us / 1000, echoed, rx_pending(c), peer_credit(c));
        if (rx_pending(c))
            maybe_request_credit(c, &last_request);
        virtio_sleep();
    }
    listen_port = 0;
    if (rx_pending(c))
        tg_printf("VSOCK UNECHOED %u bytes (the host stopped reading)\n", rx_pending(c));
    tg_printf("VSOCK BYTES %lu SUM %08x via=listen\n", echoed, e.crc);
    conn_close(c);
    virtio_check_status(dev, "the connection from the host");
}

int mode_vsock(void) {
    timeout_us = tg_cmdline_u64("vsock.timeout_ms", 30000) * 1000;
    u64 port = tg_cmdline_u64("vsock.port", 0), listen = tg_cmdline_u64("vsock.listen", 0);
    u64 bulk = tg_cmdline_u64("vsock.bytes", 0);
    if (port > 0xffffffffull || listen > 0xffffffffull || bulk > 0x7fffffffull)
        tg_fail("vsock: vsock.port, vsock.listen or vsock.bytes out of range");
    virtio_scan();
    dev = virtio_find(VIRTIO_ID_VSOCK, 0);
    if (!dev)
        tg_fail("no virtio-vsock device found");
    u64 f = virtio_negotiate(dev, VIRTIO_BIT(VIRTIO_F_VERSION_1), 0);
    guest_cid = virtio_config_read64(dev, VIRTIO_VSOCK_CFG_GUEST_CID);
    rxq = virtio_queue_setup(dev, VIRTIO_VSOCK_Q_RX, QUEUE_SIZE);
    txq = virtio_queue_setup(dev, VIRTIO_VSOCK_Q_TX, QUEUE_SIZE);
    evq = virtio_queue_setup(dev, VIRTIO_VSOCK_Q_EVENT, EVENT_BUFS);
    conn.rbuf = tg_alloc_pages(RBUF_SIZE / 4096);
    struct rx_chain *chains = tg_alloc_pages((RX_CHAINS * sizeof(struct rx_chain) + 4095) / 4096);
    for (unsigned i = 0; i < RX_CHAINS && 2 * i + 2 <= rxq->size; i++) {
        chains[i].data = tg_alloc_pages(RX_DATA / 4096);
        post_rx(&chains[i]);
    }
    u32 *events = tg_alloc_pages(1);
    for (unsigned i = 0; i < EVENT_BUFS && i < evq->size; i++)
        post_event(&events[i]);
    for (unsigned i = 0; i < TX_SLOTS; i++)
        tx_free[ntx_free++] = tg_alloc_pages(1);
    virtio_driver_ok(dev);
    virtq_kick(rxq);
    virtq_kick(evq);
    tg_printf("VSOCK CID %lu features=%#lx\n", guest_cid, f);
    if (!port && !listen)
        tg_fail("vsock: nothing to do; give vsock.port=<host port> and/or vsock.listen=<guest port>");

    if (port)
        run_connect((u32)port, bulk);
    if (listen)
        run_listen((u32)listen);
    virtio_settle();
    tg_printf("VSOCK DONE irqs=%lu rx=%lu tx=%lu credit_requests=%lu/%lu credit_updates=%lu rsts=%lu unmatched=%lu "
              "rsts_dropped=%lu\n",
              tg_atomic_read(&dev->interrupts), rx_packets, tx_packets, credit_requests_sent, credit_requests_seen,
              credit_updates_sent, rsts_sent, unmatched, dropped_rst);
    if (!tg_atomic_read(&dev->interrupts))
        tg_fail("vsock: packets moved, but no device interrupt was taken");
    return 0;
}
