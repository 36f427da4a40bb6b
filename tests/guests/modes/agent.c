/*
 * agent — a tiny stand-in for the guest agent (docs/agent.md) on virtio-vsock,
 * for fast pool tests: it answers PING with PONG "testguest" and nothing else.
 *
 * It listens on vsock port agent.port= (default 52, the agent's port) and
 * serves connections forever (the host kills the VMM): up to MAX_CONNS at a
 * time, several requests per connection. Frames are `u8 type, u32 length
 * (big-endian), payload`:
 *   PING (0x01, payload: protocol version 1)  -> PONG (0x81): 0x01 "testguest"
 *   EXEC (0x02)                               -> ERROR (0x86) "exec not supported by the test guest"
 *   any other request, a bad PING, a length
 *   over 8 MiB                                -> ERROR, then the guest closes the connection
 * The payload of a request is consumed as it arrives (never buffered beyond
 * the one byte PING needs), so credit is returned at once.
 *
 * vsock in short (virtio 1.1 §5.10.6; modes/vsock.c has the longer primer):
 * the host's REQUEST is answered with RESPONSE; data moves in RW packets
 * under credit flow control (buf_alloc/fwd_cnt in every header); a peer's
 * SHUTDOWN with both flags is answered with RST, which frees the slot.
 *
 * Console lines: `AGENT LISTENING <port>` once ready and, with agent.log=1,
 * `AGENT CONN <peer port>` per accepted connection, `AGENT PING <n>` per
 * answered ping, `AGENT ERROR <request type, hex>` per request refused and
 * `AGENT RESET` per transport reset. Those are off by default: every console
 * byte is two emulated exits on a nested host (about 0.25 ms there), so a
 * ping's two lines cost more than the ping itself and would be counted as the
 * guest's share of every pool Acquire. agent.timeout_ms= (default 0: none)
 * ends the mode with PASS after that long, for tests that want the VMM to
 * exit.
 */
#include "virtio.h"

#define QUEUE_SIZE 128
#define RX_CHAINS 32
#define RX_DATA 4096
#define EVENT_BUFS 4
#define TX_SLOTS 16
#define HDR_LEN ((u32)sizeof(struct virtio_vsock_hdr))
#define BUF_ALLOC (64u * 1024) /* our advertised receive buffer (we consume at once) */
#define MAX_CONNS 4
#define MAX_PENDING_RST 16
#define OUT_MAX 128
#define CLOSE_WAIT_US 2000000

/* docs/agent.md "Frames". */
#define T_PING 0x01
#define T_EXEC 0x02
#define T_PONG 0x81
#define T_ERROR 0x86
#define FRAME_HDR 5
#define MAX_PAYLOAD (8u << 20)
#define PROTOCOL_VERSION 1

static const char PONG_TEXT[] = "testguest";
static const char EXEC_REFUSED[] = "exec not supported by the test guest";
static const char OTHER_REFUSED[] = "request not supported by the test guest";
static const char BAD_PING[] = "malformed PING or unsupported protocol version";
static const char TOO_LONG[] = "malformed frame: payload longer than 8 MiB";

enum conn_state { C_FREE, C_OPEN, C_CLOSING };

struct conn {
    enum conn_state state;
    u32 peer_port;
    u32 fwd_cnt, fwd_sent, tx_cnt, peer_buf_alloc, peer_fwd_cnt;
    int need_response, need_credit_update, credit_requested;
    u64 close_deadline;
    /* Frame parser. */
    u8 hdr[FRAME_HDR];
    u32 hdr_got;
    u32 payload_left; /* bytes of the current frame's payload still to come */
    u8 first_payload; /* PING's version byte */
    int refuse;       /* current request: 0 PING, else the ERROR to send once it is read */
    /* Reply bytes waiting for credit. */
    u8 out[OUT_MAX];
    u32 out_len;
    int close_after_out;
};

struct rx_chain {
    struct virtio_vsock_hdr hdr;
    u8 *data;
};

struct tx_slot {
    struct virtio_vsock_hdr hdr;
    u8 payload[OUT_MAX];
};

static struct virtio_dev *dev;
static struct virtq *rxq, *txq, *evq;
static u64 guest_cid;
static u32 listen_port;
static struct conn conns[MAX_CONNS];
static struct tx_slot *tx_free[TX_SLOTS];
static unsigned ntx_free;
static struct { u32 src_port, dst_port; } pending_rst[MAX_PENDING_RST];
static unsigned npending_rst;
static u64 pings;
static int log_requests; /* agent.log= */

static void post_rx(struct rx_chain *c) {
    struct virtq_buf b[2] = { { (u64)&c->hdr, HDR_LEN, VIRTQ_DESC_F_WRITE },
                              { (u64)c->data, RX_DATA, VIRTQ_DESC_F_WRITE } };
    if (virtq_add(rxq, b, 2, c) < 0)
        tg_fail("agent: receive queue full while reposting a buffer");
}

static void post_event(u32 *e) {
    struct virtq_buf b = { (u64)e, sizeof(*e), VIRTQ_DESC_F_WRITE };
    if (virtq_add(evq, &b, 1, e) < 0)
        tg_fail("agent: event queue full while reposting a buffer");
}

static void queue_rst(u32 src_port, u32 dst_port) {
    if (npending_rst < MAX_PENDING_RST) { /* else dropped: the host times the connection out */
        pending_rst[npending_rst].src_port = src_port;
        pending_rst[npending_rst].dst_port = dst_port;
        npending_rst++;
    }
}

static void queue_reply(struct conn *c, u8 type, const void *payload, u32 len, int close) {
    if (c->out_len + FRAME_HDR + len > OUT_MAX) {
        /* A client pipelining many pings without reading: drop the connection. */
        queue_rst(listen_port, c->peer_port);
        c->state = C_FREE;
        return;
    }
    u8 *o = c->out + c->out_len;
    o[0] = type;
    o[1] = (u8)(len >> 24);
    o[2] = (u8)(len >> 16);
    o[3] = (u8)(len >> 8);
    o[4] = (u8)len;
    memcpy(o + FRAME_HDR, payload, len);
    c->out_len += FRAME_HDR + len;
    if (close)
        c->close_after_out = 1;
}

static void refuse(struct conn *c, const char *msg) {
    /* The type, not the message (the host has that): every console byte is an
     * exit, and the pool's SET_TIME at each Acquire is refused here. */
    if (log_requests)
        tg_printf("AGENT ERROR %x\n", (unsigned)c->hdr[0]);
    queue_reply(c, T_ERROR, msg, (u32)strlen(msg), 1);
}

/* A whole request has been read. */
static void request_done(struct conn *c) {
    if (c->refuse) {
        refuse(c, c->hdr[0] == T_EXEC ? EXEC_REFUSED : OTHER_REFUSED);
        return;
    }
    if (c->first_payload != PROTOCOL_VERSION) {
        refuse(c, BAD_PING);
        return;
    }
    u8 pong[1 + sizeof(PONG_TEXT) - 1];
    pong[0] = PROTOCOL_VERSION;
    memcpy(pong + 1, PONG_TEXT, sizeof(PONG_TEXT) - 1);
    queue_reply(c, T_PONG, pong, sizeof(pong), 0);
    pings++;
    if (log_requests)
        tg_printf("AGENT PING %lu\n", pings);
}

/* Feeds received stream bytes to the frame parser. */
static void parse(struct conn *c, const u8 *data, u32 len) {
    u32 i = 0;
    while (i < len && c->state == C_OPEN && !c->close_after_out) {
        if (c->hdr_got < FRAME_HDR) {
            c->hdr[c->hdr_got++] = data[i++];
            if (c->hdr_got < FRAME_HDR)
                continue;
            u32 n = (u32)c->hdr[1] << 24 | (u32)c->hdr[2] << 16 | (u32)c->hdr[3] << 8 | c->hdr[4];
            if (n > MAX_PAYLOAD) {
                refuse(c, TOO_LONG);
                return;
            }
            if (c->hdr[0] == T_PING && n != 1) {
                refuse(c, BAD_PING);
                return;
            }
            if (c->hdr[0] == T_PING)
                c->refuse = 0;
            else if (c->hdr[0] >= 0x01 && c->hdr[0] <= 0x04)
                c->refuse = 1;
            else {
                refuse(c, "malformed frame: unknown request type");
                return;
            }
            c->payload_left = n;
        } else {
            u32 take = len - i < c->payload_left ? len - i : c->payload_left;
            if (c->hdr[0] == T_PING && take)
                c->first_payload = data[i];
            i += take;
            c->payload_left -= take;
        }
        if (c->hdr_got == FRAME_HDR && c->payload_left == 0) {
            request_done(c);
            c->hdr_got = 0;
        }
    }
}

static struct conn *find_conn(u32 peer_port) {
    for (unsigned i = 0; i < MAX_CONNS; i++)
        if (conns[i].state != C_FREE && conns[i].peer_port == peer_port)
            return &conns[i];
    return NULL;
}

static void handle_packet(const struct virtio_vsock_hdr *h, const u8 *data) {
    if (h->dst_cid != guest_cid || h->src_cid != VMADDR_CID_HOST || h->type != VIRTIO_VSOCK_TYPE_STREAM)
        tg_fail("agent: packet from cid %lu to cid %lu type %u (guest cid %lu)", h->src_cid, h->dst_cid, h->type,
                guest_cid);
    struct conn *c = h->dst_port == listen_port ? find_conn(h->src_port) : NULL;
    if (!c) {
        if (h->op == VIRTIO_VSOCK_OP_REQUEST && h->dst_port == listen_port) {
            for (unsigned i = 0; i < MAX_CONNS; i++) {
                if (conns[i].state == C_FREE) {
                    c = &conns[i];
                    memset(c, 0, sizeof(*c));
                    c->state = C_OPEN;
                    c->peer_port = h->src_port;
                    c->peer_buf_alloc = h->buf_alloc;
                    c->peer_fwd_cnt = h->fwd_cnt;
                    c->need_response = 1;
                    return;
                }
            }
        }
        if (h->op != VIRTIO_VSOCK_OP_RST) /* §5.10.6.4: unknown connection (or no slot) -> RST */
            queue_rst(h->dst_port, h->src_port);
        return;
    }
    c->peer_buf_alloc = h->buf_alloc;
    c->peer_fwd_cnt = h->fwd_cnt;
    switch (h->op) {
    case VIRTIO_VSOCK_OP_RW:
        if (h->len > BUF_ALLOC - (c->fwd_cnt - c->fwd_sent))
            tg_fail("agent: the host sent %u bytes beyond our credit", h->len);
        c->fwd_cnt += h->len; /* consumed right here */
        if (c->state == C_OPEN)
            parse(c, data, h->len);
        break;
    case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
        c->need_credit_update = 1;
        break;
    case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
        break;
    case VIRTIO_VSOCK_OP_SHUTDOWN:
        if ((h->flags & (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND)) ==
            (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND)) {
            queue_rst(listen_port, c->peer_port); /* §5.10.6.5: the peer waits for our RST */
            c->state = C_FREE;
        }
        break;
    case VIRTIO_VSOCK_OP_RST:
        c->state = C_FREE;
        break;
    default:
        queue_rst(listen_port, c->peer_port);
        c->state = C_FREE;
    }
}

static unsigned poll_queues(void) {
    unsigned n = 0, rx = 0, ev = 0;
    u32 len;
    struct tx_slot *s;
    while ((s = virtq_get(txq, &len))) {
        tx_free[ntx_free++] = s;
        n++;
    }
    struct rx_chain *ch;
    while ((ch = virtq_get(rxq, &len))) {
        if (len < HDR_LEN || ch->hdr.len > RX_DATA || ch->hdr.len > len - HDR_LEN)
            tg_fail("agent: bad receive chain (used %u bytes, header says %u)", len, ch->hdr.len);
        handle_packet(&ch->hdr, ch->data);
        post_rx(ch);
        rx++;
    }
    u32 *e;
    while ((e = virtq_get(evq, &len))) {
        if (len >= sizeof(*e) && *e == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) {
            /* After a snapshot restore every connection is gone (§5.10.6.6). */
            for (unsigned i = 0; i < MAX_CONNS; i++)
                conns[i].state = C_FREE;
            if (log_requests)
                tg_printf("AGENT RESET\n");
        }
        post_event(e);
        ev++;
    }
    if (rx)
        virtq_kick(rxq);
    if (ev)
        virtq_kick(evq);
    return n + rx + ev;
}

/* Sends one packet if a slot is free; returns 0 if not (try again later). */
static int send_packet(struct conn *c, u32 src_port, u32 dst_port, u16 op, u32 flags, const u8 *payload, u32 len) {
    if (!ntx_free)
        return 0;
    struct tx_slot *s = tx_free[--ntx_free];
    struct virtio_vsock_hdr *h = &s->hdr;
    h->src_cid = guest_cid;
    h->dst_cid = VMADDR_CID_HOST;
    h->src_port = src_port;
    h->dst_port = dst_port;
    h->len = len;
    h->type = VIRTIO_VSOCK_TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = BUF_ALLOC;
    h->fwd_cnt = c ? c->fwd_cnt : 0;
    if (len)
        memcpy(s->payload, payload, len);
    if (c) {
        c->fwd_sent = c->fwd_cnt;
        c->tx_cnt += len;
    }
    struct virtq_buf b = { (u64)s, HDR_LEN + len, 0 };
    if (virtq_add(txq, &b, 1, s) < 0)
        tg_fail("agent: transmit queue full");
    virtq_kick(txq);
    return 1;
}

static void flush(void) {
    for (unsigned i = 0; i < MAX_CONNS; i++) {
        struct conn *c = &conns[i];
        if (c->state == C_FREE)
            continue;
        if (c->need_response) {
            if (!send_packet(c, listen_port, c->peer_port, VIRTIO_VSOCK_OP_RESPONSE, 0, NULL, 0))
                return;
            c->need_response = 0;
            if (log_requests)
                tg_printf("AGENT CONN %u\n", c->peer_port);
        }
        if (c->out_len) {
            u32 in_use = c->tx_cnt - c->peer_fwd_cnt;
            u32 credit = in_use >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_use;
            if (credit >= c->out_len) {
                if (!send_packet(c, listen_port, c->peer_port, VIRTIO_VSOCK_OP_RW, 0, c->out, c->out_len))
                    return;
                c->out_len = 0;
                c->credit_requested = 0;
            } else if (!c->credit_requested) { /* §5.10.6.3: ask once per shortage */
                if (!send_packet(c, listen_port, c->peer_port, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0, NULL, 0))
                    return;
                c->credit_requested = 1;
            }
        }
        if (c->need_credit_update || c->fwd_cnt - c->fwd_sent >= BUF_ALLOC / 4) {
            if (!send_packet(c, listen_port, c->peer_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0))
                return;
            c->need_credit_update = 0;
        }
        if (c->close_after_out && !c->out_len && c->state == C_OPEN) {
            if (!send_packet(c, listen_port, c->peer_port, VIRTIO_VSOCK_OP_SHUTDOWN,
                             VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND, NULL, 0))
                return;
            c->state = C_CLOSING;
            c->close_deadline = tg_deadline_us(CLOSE_WAIT_US);
        }
        if (c->state == C_CLOSING && rdtsc() >= c->close_deadline) {
            if (!send_packet(c, listen_port, c->peer_port, VIRTIO_VSOCK_OP_RST, 0, NULL, 0))
                return;
            c->state = C_FREE;
        }
    }
    while (npending_rst) {
        if (!send_packet(NULL, pending_rst[npending_rst - 1].src_port, pending_rst[npending_rst - 1].dst_port,
                         VIRTIO_VSOCK_OP_RST, 0, NULL, 0))
            return;
        npending_rst--;
    }
}

int mode_agent(void) {
    u64 port = tg_cmdline_u64("agent.port", 52);
    u64 timeout_ms = tg_cmdline_u64("agent.timeout_ms", 0);
    log_requests = tg_cmdline_u64("agent.log", 0) != 0;
    if (port == 0 || port > 0xffffffffull)
        tg_fail("agent: agent.port out of range");
    virtio_scan();
    dev = virtio_find(VIRTIO_ID_VSOCK, 0);
    if (!dev)
        tg_fail("no virtio-vsock device found");
    virtio_negotiate(dev, VIRTIO_BIT(VIRTIO_F_VERSION_1), 0);
    guest_cid = virtio_config_read64(dev, VIRTIO_VSOCK_CFG_GUEST_CID);
    rxq = virtio_queue_setup(dev, VIRTIO_VSOCK_Q_RX, QUEUE_SIZE);
    txq = virtio_queue_setup(dev, VIRTIO_VSOCK_Q_TX, QUEUE_SIZE);
    evq = virtio_queue_setup(dev, VIRTIO_VSOCK_Q_EVENT, EVENT_BUFS);
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
    listen_port = (u32)port;
    tg_printf("AGENT LISTENING %u cid=%lu\n", listen_port, guest_cid);
    u64 end = timeout_ms ? tg_deadline_us(timeout_ms * 1000) : 0;
    for (;;) {
        unsigned events_seen = poll_queues();
        flush();
        if (end && rdtsc() >= end)
            break;
        if (!events_seen)
            virtio_sleep();
    }
    tg_printf("AGENT DONE pings=%lu\n", pings);
    return 0;
}
