/*
 * virtio.h — the test guest's virtio driver (lib/virtio.c): virtio 1.1
 * "modern" devices on the virtio-mmio transport (version 2) with split
 * virtqueues, plus the device-specific layouts the virtio modes use (block,
 * net, vsock).
 *
 * Discovery (Ember's contract, the same as Firecracker's): device windows of
 * 4 KiB from 0xd0001000, slot i at 0xd0001000 + i * 0x1000, interrupt on
 * IOAPIC GSI 5 + i (edge, active high), devices in config order (drives,
 * network interfaces, vsock). An unused slot reads all-ones, so scanning stops
 * at the first slot without the magic value. Linux learns the same from the
 * DSDT (LNRO0005 devices); the test guest only scans.
 *
 * The driver runs in ring 3 and keeps ring 0 to the interrupt handler (read
 * InterruptStatus, write InterruptACK, remember the bits). Every wait is
 * bounded, and the driver checks what the device hands back (used ring index,
 * descriptor ids, lengths): a misbehaving device ends the test with
 * `TESTGUEST <mode> FAIL <reason>`, never a hang.
 *
 * Building with -DTG_HOST_TEST compiles the driver and the virtio modes for
 * the host (tests/integration/test_guests_virtio.py runs them against mock
 * devices): register accesses, interrupt routing and sleeping then go through
 * the tg_host_* hooks below instead of MMIO, the IOAPIC and `hlt`.
 */
#ifndef TG_VIRTIO_H
#define TG_VIRTIO_H

#include "tg.h"

/* ---- discovery (Ember's layout; vmm/arch/x86_64/layout.py) --------------------- */

#define VIRTIO_MMIO_BASE 0xd0001000ull
#define VIRTIO_MMIO_WINDOW 0x1000
#define VIRTIO_MMIO_MAX_SLOTS 16
#define VIRTIO_GSI_BASE 5
#define VIRTIO_VEC_BASE 0x60 /* + slot */

/* ---- virtio-mmio registers (virtio 1.1 §4.2.2, Table "MMIO Device Register Layout") */

#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976u /* "virt", little-endian (§4.2.2) */
#define VIRTIO_MMIO_VERSION_MODERN 2  /* 1 is the legacy interface (§4.2.4) */

/* InterruptStatus bits (§4.2.2). */
#define VIRTIO_MMIO_INT_VRING 0x1  /* used buffer notification */
#define VIRTIO_MMIO_INT_CONFIG 0x2 /* configuration change notification */

/* ---- device status (§2.1) ---------------------------------------------------------- */

#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

/* ---- feature bits (§6 reserved bits; device bits in each device's section) ---------- */

#define VIRTIO_BIT(n) (1ull << (n))
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

/* Device IDs (§5). */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_VSOCK 19

/* ---- split virtqueues (§2.6) -------------------------------------------------------- */

/* §2.6.5 The Virtqueue Descriptor Table (16-byte aligned). */
struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2 /* device-writable (otherwise device-readable) */
#define VIRTQ_DESC_F_INDIRECT 4

/* §2.6.6 The Virtqueue Available Ring (2-byte aligned); used_event follows ring[]. */
struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[];
};
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

/* §2.6.8 The Virtqueue Used Ring (4-byte aligned); avail_event follows ring[]. */
struct virtq_used_elem {
    u32 id; /* head of the completed descriptor chain */
    u32 len; /* bytes the device wrote into the chain */
};
struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[];
};
#define VIRTQ_USED_F_NO_NOTIFY 1

/* The largest queue the driver sets up (a power of two, §2.6: "Queue Size"). */
#define VIRTQ_MAX_SIZE 256

struct virtio_dev;

/* One split virtqueue: the three areas in guest memory plus the driver's bookkeeping. */
struct virtq {
    struct virtio_dev *dev;
    u16 index, size;
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    u16 free_head, num_free; /* free descriptors, linked through next[] */
    u16 avail_idx;           /* the next avail->idx to publish */
    u16 last_used;           /* used->idx up to which completions were taken */
    u64 added, completed, notifications;
    /* The driver's own copy of every desc[].next: freeing a chain never trusts shared memory. */
    u16 next[VIRTQ_MAX_SIZE];
    /* Per chain head while the chain is with the device: */
    void *token[VIRTQ_MAX_SIZE];     /* the caller's cookie (NULL: not in flight) */
    u16 chain_len[VIRTQ_MAX_SIZE];   /* descriptors in the chain */
    u32 writable[VIRTQ_MAX_SIZE];    /* device-writable bytes: the bound for used.len */
};

/* One buffer of a chain: `flags` is 0 (device reads it) or VIRTQ_DESC_F_WRITE. */
struct virtq_buf {
    u64 addr;
    u32 len;
    u16 flags;
};

#define VIRTIO_MAX_QUEUES 4

/* One virtio-mmio device found by virtio_scan. */
struct virtio_dev {
    unsigned slot;
    u64 base;
    u32 device_id, vendor_id, version;
    u64 device_features; /* what the device offers */
    u64 features;        /* what was negotiated */
    u32 gsi;
    u8 vector;
    volatile u32 isr;           /* InterruptStatus bits seen by the handler (ring 0 ORs, ring 3 reads) */
    tg_atomic_t interrupts;     /* handler runs */
    tg_atomic_t spurious;       /* handler runs that found InterruptStatus 0 */
    struct virtq *vq[VIRTIO_MAX_QUEUES];
};

/* ---- the API -------------------------------------------------------------------- */

/* Scans the slots (once; later calls return the same table), prints
 * `VIRTIO slot=<i> id=<device id> vendor=<hex> version=<v> gsi=<n>` per device
 * and returns how many there are. A slot with the magic but another version
 * than 2 fails the test. */
unsigned virtio_scan(void);
/* The `nth` device (from 0) with `device_id`, or NULL. */
struct virtio_dev *virtio_find(u32 device_id, unsigned nth);
/* A device ID's name ("block", "net", "vsock" or "unknown"). */
const char *virtio_id_name(u32 device_id);

/* §3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, read the device's features,
 * accept `required` (all must be offered, else FAIL) plus whatever of
 * `optional` is offered, FEATURES_OK and check it stuck. Returns the
 * negotiated set (also in d->features). */
u64 virtio_negotiate(struct virtio_dev *d, u64 required, u64 optional);
/* §4.2.3.2: sets up queue `index` with min(QueueNumMax, max_size) entries
 * (rounded down to a power of two) in freshly allocated pages. FAILs if the
 * queue does not exist or is already live. */
struct virtq *virtio_queue_setup(struct virtio_dev *d, unsigned index, unsigned max_size);
/* §3.1.1 step 8: routes the device's interrupt (GSI 5 + slot -> VIRTIO_VEC_BASE
 * + slot, ring-0 handler) and sets DRIVER_OK. */
void virtio_driver_ok(struct virtio_dev *d);
/* Writes 0 to Status (§4.2.3.1: device reset) and checks it reads back 0. */
void virtio_reset(struct virtio_dev *d);
u32 virtio_status(struct virtio_dev *d);
/* FAILs (naming `what`) if the device set DEVICE_NEEDS_RESET. */
void virtio_check_status(struct virtio_dev *d, const char *what);

/* Device configuration space (§4.2.2: accesses as wide as the field, 64-bit
 * fields as two 32-bit halves; the generation counter makes reads consistent). */
u8 virtio_config_read8(struct virtio_dev *d, u32 offset);
u16 virtio_config_read16(struct virtio_dev *d, u32 offset);
u32 virtio_config_read32(struct virtio_dev *d, u32 offset);
u64 virtio_config_read64(struct virtio_dev *d, u32 offset);
/* `n` bytes from `offset` read one by one, retried until ConfigGeneration is stable. */
void virtio_config_read_bytes(struct virtio_dev *d, u32 offset, void *out, unsigned n);

/* Puts the chain `bufs[0..n)` (device-readable buffers first, then
 * device-writable ones, §2.6.4.2) on the available ring with `token` (not
 * NULL) as its cookie. Returns 0, or -1 if fewer than `n` descriptors are
 * free. The device is not notified: call virtq_kick. */
int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned n, void *token);
/* Notifies the device (QueueNotify) unless it asked not to be (VIRTQ_USED_F_NO_NOTIFY). */
void virtq_kick(struct virtq *q);
/* Takes the next completed chain: returns its token and sets *len to the used
 * length, or returns NULL if there is none. FAILs on a used entry that names
 * no chain in flight or claims more bytes than the chain can hold. */
void *virtq_get(struct virtq *q, u32 *len);
/* Whether the device has completed chains not yet taken. */
int virtq_has_used(struct virtq *q);
/* Chains in flight (added, not yet taken back). */
static inline u64 virtq_in_flight(const struct virtq *q) { return q->added - q->completed; }

/* Waits until `cond(arg)` is true (returns 1) or `timeout_us` passed (returns 0).
 * Sleeps between checks (hlt, woken by device interrupts or a LAPIC timer tick). */
int virtio_wait(int (*cond)(void *), void *arg, u64 timeout_us);
/* Sleeps until the next interrupt or a timer tick (at most ~10 ms on KVM). */
void virtio_sleep(void);
/* Lets in device interrupts still pending (ring 3 runs with interrupts off, and
 * one sleep may admit only one of them): sleeps until a sleep brings no new
 * device interrupt, at most 8 times. */
void virtio_settle(void);
/* Device interrupts taken so far (all devices). */
u64 virtio_interrupts(void);

/* CRC-32 (IEEE 802.3, reflected, as Python's zlib.crc32): continue from `crc` (0 to start). */
u32 tg_crc32(u32 crc, const void *buf, size_t n);

/* ---- virtio-blk (§5.2) ------------------------------------------------------------ */

#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_GEOMETRY 4
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
/* struct virtio_blk_config (§5.2.4) offsets */
#define VIRTIO_BLK_CFG_CAPACITY 0x00 /* le64, in 512-byte sectors */
#define VIRTIO_BLK_CFG_SIZE_MAX 0x08
#define VIRTIO_BLK_CFG_SEG_MAX 0x0c
#define VIRTIO_BLK_CFG_BLK_SIZE 0x14
#define VIRTIO_BLK_SECTOR_SIZE 512
/* §5.2.6 request types and statuses */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_ID_BYTES 20
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

/* The device-readable head of every request (§5.2.6). */
struct virtio_blk_req_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

/* ---- virtio-net (§5.1) -------------------------------------------------------------- */

#define VIRTIO_NET_F_MTU 3
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_STATUS 16
/* struct virtio_net_config (§5.1.4) offsets */
#define VIRTIO_NET_CFG_MAC 0x00
#define VIRTIO_NET_CFG_STATUS 0x06
#define VIRTIO_NET_CFG_MTU 0x0a
#define VIRTIO_NET_Q_RX 0
#define VIRTIO_NET_Q_TX 1

/* §5.1.6: with VIRTIO_F_VERSION_1 the header always has num_buffers (12 bytes). */
struct virtio_net_hdr {
    u8 flags;
    u8 gso_type;
    u16 hdr_len;
    u16 gso_size;
    u16 csum_start;
    u16 csum_offset;
    u16 num_buffers;
} __attribute__((packed));
#define VIRTIO_NET_HDR_GSO_NONE 0

/* ---- virtio-vsock (§5.10) ------------------------------------------------------------- */

/* struct virtio_vsock_config (§5.10.4): le64 guest_cid (upper 32 bits reserved). */
#define VIRTIO_VSOCK_CFG_GUEST_CID 0x00
#define VIRTIO_VSOCK_Q_RX 0
#define VIRTIO_VSOCK_Q_TX 1
#define VIRTIO_VSOCK_Q_EVENT 2
#define VMADDR_CID_HOST 2

/* §5.10.6 struct virtio_vsock_hdr: 44 bytes, little-endian, packed. */
struct virtio_vsock_hdr {
    u64 src_cid;
    u64 dst_cid;
    u32 src_port;
    u32 dst_port;
    u32 len;
    u16 type;
    u16 op;
    u32 flags;
    u32 buf_alloc;
    u32 fwd_cnt;
} __attribute__((packed));
#define VIRTIO_VSOCK_TYPE_STREAM 1
#define VIRTIO_VSOCK_OP_INVALID 0
#define VIRTIO_VSOCK_OP_REQUEST 1
#define VIRTIO_VSOCK_OP_RESPONSE 2
#define VIRTIO_VSOCK_OP_RST 3
#define VIRTIO_VSOCK_OP_SHUTDOWN 4
#define VIRTIO_VSOCK_OP_RW 5
#define VIRTIO_VSOCK_OP_CREDIT_UPDATE 6
#define VIRTIO_VSOCK_OP_CREDIT_REQUEST 7
#define VIRTIO_VSOCK_SHUTDOWN_RCV 1
#define VIRTIO_VSOCK_SHUTDOWN_SEND 2
/* §5.10.6.7 struct virtio_vsock_event */
#define VIRTIO_VSOCK_EVENT_TRANSPORT_RESET 0

_Static_assert(sizeof(struct virtq_desc) == 16, "virtq_desc");
_Static_assert(sizeof(struct virtio_blk_req_hdr) == 16, "virtio_blk_req_hdr");
_Static_assert(sizeof(struct virtio_net_hdr) == 12, "virtio_net_hdr");
_Static_assert(sizeof(struct virtio_vsock_hdr) == 44, "virtio_vsock_hdr");

/* ---- host unit-test hooks (TG_HOST_TEST builds only) ------------------------------------ */

#ifdef TG_HOST_TEST
u32 tg_host_mmio_read(u64 addr, unsigned size);
void tg_host_mmio_write(u64 addr, unsigned size, u32 value);
void tg_host_irq_route(unsigned gsi, unsigned vector, tg_irq_handler_t handler);
void tg_host_sleep(void);
#endif

#endif /* TG_VIRTIO_H */
