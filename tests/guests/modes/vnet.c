/*
 * vnet — virtio-net end to end (virtio 1.1 §5.1) through lib/virtio.c.
 *
 * Negotiates VERSION_1 (+ MAC, MTU, STATUS when offered), reads the MAC from
 * the config space (without VIRTIO_NET_F_MAC the driver picks
 * 02:00:00:00:00:01), sets up receiveq1 and transmitq1 and posts receive
 * buffers of 2 KiB (one descriptor each: the 12-byte header, then the frame;
 * §5.1.6.3.1 asks for 1526 bytes without MRG_RXBUF or GUEST_TSO/UFO). Then,
 * until the host's frame arrives (vnet.timeout_ms, default 30000):
 *   - every vnet.interval_ms (200) it transmits a broadcast frame of
 *     ethertype 0x88b5 (IEEE local experimental) with the payload
 *     `EMBER-VNET-PING <n>` (header and frame in two descriptors);
 *   - it prints `VNET RX <len> <first 32 bytes, hex>` for each received frame
 *     (the first 64);
 *   - with vnet.ip=<a.b.c.d> it answers ARP requests for that address and
 *     ICMP echo requests to it, so the host can ping the guest;
 *   - a frame of ethertype 0x88b5 whose payload starts with `EMBER-HOST-PING`
 *     ends the loop: `VNET HOST-PING <payload>`, then
 *     `VNET DONE tx=<frames> rx=<frames> arp=<replies> icmp=<replies> irqs=<n>`.
 */
#include "virtio.h"

#define QUEUE_SIZE 64
#define RX_BUFS 32
#define RX_BUF_SIZE 2048
#define TX_SLOTS 16
#define MAX_PRINTED 64
#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_ZLEN 60 /* minimum frame without FCS (IEEE 802.3) */
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define ETHERTYPE_EMBER 0x88b5
#define IPPROTO_ICMP 1
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define ARP_REQUEST 1
#define ARP_REPLY 2
#define NET_HDR_LEN sizeof(struct virtio_net_hdr)

static const char HOST_PING[] = "EMBER-HOST-PING";

struct tx_slot {
    struct virtio_net_hdr hdr;
    u8 frame[1600];
    volatile int busy;
};

static struct virtio_dev *dev;
static struct virtq *rxq, *txq;
static u8 mac[ETH_ALEN];
static u8 ip[4];
static int have_ip;
static struct tx_slot *tx_slots[TX_SLOTS];
static u64 tx_frames, rx_frames, arp_replies, icmp_replies;
static int host_ping_seen;

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put_be16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }

/* RFC 1071 Internet checksum. */
static u16 inet_checksum(const u8 *p, unsigned len) {
    u32 sum = 0;
    for (unsigned i = 0; i + 1 < len; i += 2)
        sum += be16(p + i);
    if (len & 1)
        sum += (u32)p[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static int parse_ip(const char *s, u8 out[4]) {
    for (int i = 0; i < 4; i++) {
        const char *end;
        u64 v = tg_strtou64(s, &end);
        if (end == s || v > 255 || (i < 3 && *end != '.') || (i == 3 && *end))
            return -1;
        out[i] = (u8)v;
        s = end + 1;
    }
    return 0;
}

static void post_rx(u8 *buf) {
    struct virtq_buf b = { (u64)buf, RX_BUF_SIZE, VIRTQ_DESC_F_WRITE };
    if (virtq_add(rxq, &b, 1, buf) < 0)
        tg_fail("vnet: receive queue full while reposting a buffer");
}

static void reclaim_tx(void) {
    u32 len;
    struct tx_slot *s;
    while ((s = virtq_get(txq, &len)))
        s->busy = 0;
}

static int tx_slot_free(void *arg) {
    struct tx_slot **out = arg;
    reclaim_tx();
    for (unsigned i = 0; i < TX_SLOTS; i++)
        if (!tx_slots[i]->busy) {
            *out = tx_slots[i];
            return 1;
        }
    return 0;
}

static struct tx_slot *get_tx_slot(void) {
    struct tx_slot *s = NULL;
    if (!virtio_wait(tx_slot_free, &s, 2000000))
        tg_fail("vnet: the device completed none of %u transmitted frames within 2 s", TX_SLOTS);
    return s;
}

/* Sends s->frame[0..len): header and frame as two descriptors. */
static void transmit(struct tx_slot *s, unsigned len) {
    if (len < ETH_ZLEN) {
        memset(s->frame + len, 0, ETH_ZLEN - len);
        len = ETH_ZLEN;
    }
    memset(&s->hdr, 0, sizeof(s->hdr)); /* no checksum offload, GSO_NONE */
    struct virtq_buf b[2] = { { (u64)&s->hdr, NET_HDR_LEN, 0 }, { (u64)s->frame, len, 0 } };
    s->busy = 1;
    if (virtq_add(txq, b, 2, s) < 0)
        tg_fail("vnet: transmit queue full");
    virtq_kick(txq);
    tx_frames++;
}

static void send_ping(u64 n) {
    struct tx_slot *s = get_tx_slot();
    memset(s->frame, 0xff, ETH_ALEN);
    memcpy(s->frame + ETH_ALEN, mac, ETH_ALEN);
    put_be16(s->frame + 12, ETHERTYPE_EMBER);
    int plen = tg_snprintf((char *)s->frame + ETH_HLEN, 64, "EMBER-VNET-PING %lu", n);
    transmit(s, ETH_HLEN + (unsigned)plen);
}

/* ARP (RFC 826) over Ethernet/IPv4: answer a request for our address. */
static void handle_arp(const u8 *f, unsigned len) {
    const u8 *a = f + ETH_HLEN;
    if (!have_ip || len < ETH_HLEN + 28 || be16(a) != 1 || be16(a + 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 ||
        be16(a + 6) != ARP_REQUEST || memcmp(a + 24, ip, 4) != 0)
        return;
    struct tx_slot *s = get_tx_slot();
    u8 *o = s->frame, *r = o + ETH_HLEN;
    memcpy(o, a + 8, ETH_ALEN); /* to the sender's hardware address */
    memcpy(o + ETH_ALEN, mac, ETH_ALEN);
    put_be16(o + 12, ETHERTYPE_ARP);
    memcpy(r, a, 6); /* htype, ptype, hlen, plen */
    put_be16(r + 6, ARP_REPLY);
    memcpy(r + 8, mac, ETH_ALEN);
    memcpy(r + 14, ip, 4);
    memcpy(r + 18, a + 8, 10); /* target = the requester's sha + spa */
    transmit(s, ETH_HLEN + 28);
    arp_replies++;
}

/* IPv4 (RFC 791) + ICMP echo (RFC 792): answer an echo request to our address. */
static void handle_ipv4(const u8 *f, unsigned len) {
    const u8 *h = f + ETH_HLEN;
    if (!have_ip || len < ETH_HLEN + 20 || (h[0] >> 4) != 4)
        return;
    unsigned ihl = (h[0] & 0xf) * 4u, total = be16(h + 2);
    if (ihl < 20 || total < ihl + 8 || ETH_HLEN + total > len || total > sizeof(tx_slots[0]->frame) - ETH_HLEN)
        return;
    if (h[9] != IPPROTO_ICMP || memcmp(h + 16, ip, 4) != 0 || h[ihl] != ICMP_ECHO_REQUEST)
        return;
    if (inet_checksum(h, ihl) != 0 || inet_checksum(h + ihl, total - ihl) != 0)
        return; /* corrupted: a host would drop it too */
    struct tx_slot *s = get_tx_slot();
    u8 *o = s->frame, *r = o + ETH_HLEN;
    memcpy(o, f + ETH_ALEN, ETH_ALEN);
    memcpy(o + ETH_ALEN, mac, ETH_ALEN);
    put_be16(o + 12, ETHERTYPE_IPV4);
    memcpy(r, h, total);
    memcpy(r + 12, h + 16, 4); /* swap source and destination */
    memcpy(r + 16, h + 12, 4);
    r[8] = 64; /* TTL */
    put_be16(r + 10, 0);
    put_be16(r + 10, inet_checksum(r, ihl));
    r[ihl] = ICMP_ECHO_REPLY;
    put_be16(r + ihl + 2, 0);
    put_be16(r + ihl + 2, inet_checksum(r + ihl, total - ihl));
    transmit(s, ETH_HLEN + total);
    icmp_replies++;
}

static void handle_frame(const u8 *f, unsigned len) {
    rx_frames++;
    if (rx_frames <= MAX_PRINTED) {
        char hex[2 * 32 + 1];
        unsigned n = len < 32 ? len : 32;
        for (unsigned i = 0; i < n; i++)
            tg_snprintf(hex + 2 * i, 3, "%02x", f[i]);
        hex[2 * n] = 0;
        tg_printf("VNET RX %u %s\n", len, hex);
    }
    if (len < ETH_HLEN)
        return;
    switch (be16(f + 12)) {
    case ETHERTYPE_ARP:
        handle_arp(f, len);
        break;
    case ETHERTYPE_IPV4:
        handle_ipv4(f, len);
        break;
    case ETHERTYPE_EMBER: {
        unsigned plen = len - ETH_HLEN;
        if (plen >= sizeof(HOST_PING) - 1 && memcmp(f + ETH_HLEN, HOST_PING, sizeof(HOST_PING) - 1) == 0) {
            char text[65];
            unsigned n = 0;
            for (; n < plen && n < 64 && f[ETH_HLEN + n] >= 0x20 && f[ETH_HLEN + n] < 0x7f; n++)
                text[n] = (char)f[ETH_HLEN + n];
            text[n] = 0;
            tg_printf("VNET HOST-PING %s\n", text);
            host_ping_seen = 1;
        }
        break;
    }
    }
}

/* Handles every received frame; returns how many. */
static unsigned poll_rx(void) {
    unsigned n = 0;
    u32 len;
    u8 *buf;
    while ((buf = virtq_get(rxq, &len))) {
        if (len < NET_HDR_LEN)
            tg_fail("vnet: used receive buffer of %u bytes is shorter than the %u-byte header", len,
                    (unsigned)NET_HDR_LEN);
        handle_frame(buf + NET_HDR_LEN, len - (u32)NET_HDR_LEN);
        post_rx(buf);
        n++;
    }
    if (n)
        virtq_kick(rxq);
    return n;
}

int mode_vnet(void) {
    u64 timeout_ms = tg_cmdline_u64("vnet.timeout_ms", 30000), interval_ms = tg_cmdline_u64("vnet.interval_ms", 200);
    char text[32];
    if (tg_cmdline_get("vnet.ip", text, sizeof(text))) {
        if (parse_ip(text, ip) < 0)
            tg_fail("vnet.ip=%s is not a dotted-quad IPv4 address", text);
        have_ip = 1;
    }
    virtio_scan();
    dev = virtio_find(VIRTIO_ID_NET, 0);
    if (!dev)
        tg_fail("no virtio-net device found");
    u64 f = virtio_negotiate(dev, VIRTIO_BIT(VIRTIO_F_VERSION_1),
                             VIRTIO_BIT(VIRTIO_NET_F_MAC) | VIRTIO_BIT(VIRTIO_NET_F_MTU) |
                                 VIRTIO_BIT(VIRTIO_NET_F_STATUS));
    if (f & VIRTIO_BIT(VIRTIO_NET_F_MAC)) {
        virtio_config_read_bytes(dev, VIRTIO_NET_CFG_MAC, mac, ETH_ALEN);
    } else {
        static const u8 chosen[ETH_ALEN] = { 0x02, 0, 0, 0, 0, 0x01 }; /* locally administered */
        memcpy(mac, chosen, ETH_ALEN);
    }
    rxq = virtio_queue_setup(dev, VIRTIO_NET_Q_RX, QUEUE_SIZE);
    txq = virtio_queue_setup(dev, VIRTIO_NET_Q_TX, QUEUE_SIZE);
    for (unsigned i = 0; i < RX_BUFS && i < rxq->size; i += 2) {
        u8 *page = tg_alloc_pages(1);
        post_rx(page);
        post_rx(page + RX_BUF_SIZE);
    }
    for (unsigned i = 0; i < TX_SLOTS; i++)
        tx_slots[i] = tg_alloc_pages(1);
    virtio_driver_ok(dev);
    virtq_kick(rxq);
    tg_printf("VNET MAC %02x:%02x:%02x:%02x:%02x:%02x%s features=%#lx\n", mac[0], mac[1], mac[2], mac[3], mac[4],
              mac[5], (f & VIRTIO_BIT(VIRTIO_NET_F_MAC)) ? "" : " (driver-chosen)", f);
    if (f & VIRTIO_BIT(VIRTIO_NET_F_MTU))
        tg_printf("VNET MTU %u\n", virtio_config_read16(dev, VIRTIO_NET_CFG_MTU));
    if (f & VIRTIO_BIT(VIRTIO_NET_F_STATUS))
        tg_printf("VNET LINK %s\n", (virtio_config_read16(dev, VIRTIO_NET_CFG_STATUS) & 1) ? "up" : "down");
    if (have_ip)
        tg_printf("VNET IP %u.%u.%u.%u\n", ip[0], ip[1], ip[2], ip[3]);

    u64 hz = tg_tsc_hz(), deadline = tg_deadline_us(timeout_ms * 1000), next_ping = rdtsc(), pings = 0;
    while (!host_ping_seen) {
        u64 now = rdtsc();
        if (now >= deadline)
            tg_fail("vnet: no EMBER-HOST-PING frame within %lu ms (sent %lu frames, received %lu)", timeout_ms,
                    tx_frames, rx_frames);
        if (now >= next_ping) {
            send_ping(++pings);
            next_ping = now + interval_ms * (hz / 1000);
        }
        reclaim_tx();
        if (!poll_rx() && !host_ping_seen)
            virtio_sleep();
    }
    virtio_check_status(dev, "the exchange");
    virtio_settle();
    tg_printf("VNET DONE tx=%lu rx=%lu arp=%lu icmp=%lu irqs=%lu\n", tx_frames, rx_frames, arp_replies, icmp_replies,
              tg_atomic_read(&dev->interrupts));
    if (!tg_atomic_read(&dev->interrupts))
        tg_fail("vnet: frames moved, but no device interrupt was taken");
    return 0;
}
