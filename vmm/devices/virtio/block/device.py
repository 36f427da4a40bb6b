"""The virtio block device (virtio 1.1 §5.2): one request queue over a host file.

Offered features (§5.2.3, §6): VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX,
VIRTIO_BLK_F_BLK_SIZE, plus VIRTIO_BLK_F_RO for a read-only drive and
VIRTIO_BLK_F_FLUSH when the cache type is Writeback (as Firecracker: an
Unsafe drive does not promise that a flush makes data durable).

Config space (§5.2.4): capacity (512-byte sectors), size_max, seg_max,
geometry (zero, not offered), blk_size (512). seg_max is the queue size
minus the header and status descriptors, so no legal chain is ever longer
than the queue (§2.6.5.3.1) even without indirect descriptors.

Processing (`process_queue`): pop chains until the ring is empty; for each,
walk and validate the chain, parse the request, ask the rate limiter, then
do the I/O synchronously and write the status. A chain the queue rejects
(loop, bad address, ...) is returned with length 0 since no status location
can be trusted; a well-formed chain with an invalid request gets
VIRTIO_BLK_S_IOERR (VIRTIO_BLK_S_UNSUPP for an unknown type) in its status
byte. One interrupt per batch, if the driver wants it (EVENT_IDX). When the
rate limiter refuses, the chain goes back to the ring and processing stops
until `on_rate_limiter_ready()` (or the next queue notification).
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass

import structlog

from vmm.config.drive import CacheType
from vmm.devices.virtio.block.backend import SECTOR_SIZE, BlockBackendError, FileBackend
from vmm.devices.virtio.block.persist import BlockState, BlockStateInvalid, validate_block_state
from vmm.devices.virtio.block.request import (
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    Request,
    RequestError,
    RequestType,
    parse_request,
    status_address,
)
from vmm.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    RateLimiter,
    VirtioDevice,
    VirtioDeviceError,
    VirtioInterrupt,
    feature,
)
from vmm.devices.virtio.queue import DescriptorChain, DescriptorChainError, QueueError
from vmm.memory import GuestMemory

__all__ = [
    "VIRTIO_BLK_F_SIZE_MAX",
    "VIRTIO_BLK_F_SEG_MAX",
    "VIRTIO_BLK_F_GEOMETRY",
    "VIRTIO_BLK_F_RO",
    "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_FLUSH",
    "BLOCK_QUEUE_SIZE",
    "BLOCK_SIZE_MAX",
    "CONFIG_SPACE_SIZE",
    "BlockError",
    "BlockMetrics",
    "Block",
]

log = structlog.get_logger("vmm.devices.virtio.block")

# virtio 1.1 §5.2.3 "Feature bits".
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

# Firecracker's block queue size (one queue).
BLOCK_QUEUE_SIZE = 256
# The largest data segment the device takes (config size_max): bounds the work one descriptor asks for.
BLOCK_SIZE_MAX = 1 << 20

# virtio 1.1 §5.2.4: le64 capacity; le32 size_max; le32 seg_max;
# struct { le16 cylinders; u8 heads; u8 sectors; } geometry; le32 blk_size.
_CONFIG = struct.Struct("<QII4xI")
CONFIG_SPACE_SIZE = _CONFIG.size

_STATUS_OK = bytes((VIRTIO_BLK_S_OK,))
_STATUS_IOERR = bytes((VIRTIO_BLK_S_IOERR,))


class BlockError(VirtioDeviceError):
    """The virtio block device could not be built, updated or restored."""


@dataclass
class BlockMetrics:
    """Counters for the metrics endpoint (Firecracker's block metrics, by name)."""

    read_bytes: int = 0
    write_bytes: int = 0
    read_count: int = 0
    write_count: int = 0
    flush_count: int = 0
    get_id_count: int = 0
    invalid_reqs: int = 0  # chains or requests the guest got wrong (completed with IOERR/UNSUPP or len 0)
    io_errors: int = 0  # the backing file failed a valid request
    rate_limiter_throttled: int = 0
    config_changes: int = 0


class Block(VirtioDevice):
    """A virtio-blk device over `path`.

    `is_root` and `partuuid` are for the kernel command line (root=/dev/vda
    or root=PARTUUID=...); the device itself does not use them. GET_ID
    answers with `drive_id` (its first 20 bytes, NUL-padded).
    `rate_limiter` is any `RateLimiter` (consume(tokens, "bytes"|"ops")).
    """

    device_type = VIRTIO_ID_BLOCK

    def __init__(self, drive_id: str, path: str, read_only: bool = False, is_root: bool = False,
                 cache_type: CacheType | str = CacheType.UNSAFE, rate_limiter: RateLimiter | None = None,
                 partuuid: str | None = None, *, queue_size: int = BLOCK_QUEUE_SIZE):
        if queue_size < 4:
            raise ValueError("a block queue needs room for a header, a status and data")
        self.drive_id = drive_id
        self.is_root = is_root
        self.partuuid = partuuid
        self.read_only = read_only
        self.cache_type = CacheType(cache_type)
        try:
            self.backend = FileBackend(path, read_only=read_only, cache_type=self.cache_type)
        except BlockBackendError as exc:
            raise BlockError(str(exc)) from exc
        features = (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX)
                    | feature(VIRTIO_RING_F_INDIRECT_DESC) | feature(VIRTIO_BLK_F_SIZE_MAX)
                    | feature(VIRTIO_BLK_F_SEG_MAX) | feature(VIRTIO_BLK_F_BLK_SIZE))
        if read_only:
            features |= feature(VIRTIO_BLK_F_RO)
        if self.cache_type is CacheType.WRITEBACK:
            features |= feature(VIRTIO_BLK_F_FLUSH)
        super().__init__(queue_sizes=[queue_size], avail_features=features)
        self.seg_max = queue_size - 2
        self.size_max = BLOCK_SIZE_MAX
        self.rate_limiter = rate_limiter
        self.throttled = False
        self.metrics = BlockMetrics()
        self.device_id = drive_id.encode()[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        if self.backend.size % SECTOR_SIZE:
            log.warning("backing file size is not a multiple of 512; the tail is not visible",
                        drive_id=drive_id, size=self.backend.size)

    # --- properties & config ------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self.backend.path

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors."""
        return self.backend.capacity

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.capacity, self.size_max, self.seg_max, SECTOR_SIZE)

    # --- host-side control ---------------------------------------------------------------------

    def update_path(self, path: str) -> None:
        """Swap the backing file (PATCH /drives): new capacity, config-change interrupt if active.

        `BlockError` if the new file cannot be opened; the old one stays.
        """
        with self.lock:
            try:
                self.backend.update_path(path)
            except BlockBackendError as exc:
                raise BlockError(str(exc)) from exc
            self.metrics.config_changes += 1
            self.config_changed()

    def update_rate_limiter(self, rate_limiter: RateLimiter | None) -> None:
        with self.lock:
            self.rate_limiter = rate_limiter

    def on_rate_limiter_ready(self) -> None:
        """The rate limiter has tokens again: resume the queue where it stopped."""
        with self.lock:
            self.throttled = False
            if self.is_activated:
                self.process_queue(0)

    def close(self) -> None:
        with self.lock:
            self.backend.close()

    def _on_reset(self) -> None:
        self.throttled = False

    # --- the request queue ------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        with self.lock:
            if index != 0 or self.mem is None:
                return
            queue, mem = self.queues[0], self.mem
            used_any = False
            self.throttled = False
            while (chain := queue.pop(mem)) is not None:
                used_len = self._process_chain(mem, chain)
                if used_len is None:
                    queue.undo_pop()
                    self.throttled = True
                    self.metrics.rate_limiter_throttled += 1
                    break
                try:
                    queue.add_used(mem, chain.head_index, used_len)
                except QueueError as exc:  # pop only returns heads < size: a bug, not the guest
                    log.error("cannot complete a block request", head=chain.head_index, error=str(exc))
                    continue
                used_any = True
            if used_any:
                self.signal_used(queue)

    def _process_chain(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        """Handle one chain; the used length, or None if the rate limiter refused it."""
        try:
            descriptors = chain.descriptors()
        except DescriptorChainError as exc:
            self._invalid(exc, chain.head_index)
            return 0
        try:
            request = parse_request(descriptors, mem, self.capacity, seg_max=self.seg_max, size_max=self.size_max)
        except RequestError as exc:
            self._invalid(exc, chain.head_index)
            status_addr = status_address(descriptors)
            if status_addr is None:
                return 0
            mem.write(status_addr, bytes((exc.status,)))
            return 1
        if not self._rate_limit(request):
            return None
        return self._execute(mem, request)

    def _invalid(self, exc: Exception, head: int) -> None:
        self.metrics.invalid_reqs += 1
        if self.metrics.invalid_reqs == 1:
            log.warning("invalid virtio-blk request; further ones are counted", drive_id=self.drive_id,
                        head=head, error=f"{type(exc).__name__}: {exc}")

    def _rate_limit(self, request: Request) -> bool:
        limiter = self.rate_limiter
        if limiter is None:
            return True
        if not limiter.consume(1, "ops"):
            return False
        if request.type in (RequestType.IN, RequestType.OUT) and not limiter.consume(request.data_len, "bytes"):
            replenish = getattr(limiter, "manual_replenish", None)
            if replenish is not None:
                replenish(1, "ops")
            return False
        return True

    def _execute(self, mem: GuestMemory, request: Request) -> int:
        """Do the I/O and write the status; returns the bytes written to guest memory."""
        written = 0
        status = _STATUS_OK
        try:
            if request.type is RequestType.IN:
                written = self._transfer(mem, request, into_guest=True)
                if written != request.data_len:
                    status = _STATUS_IOERR
                    self.metrics.io_errors += 1
                else:
                    self.metrics.read_count += 1
                self.metrics.read_bytes += written
            elif request.type is RequestType.OUT:
                if self.read_only:
                    # §5.2.6.2: a read-only device fails writes with IOERR.
                    status = _STATUS_IOERR
                    self.metrics.invalid_reqs += 1
                else:
                    done = self._transfer(mem, request, into_guest=False)
                    self.metrics.write_bytes += done
                    if done != request.data_len:
                        status = _STATUS_IOERR
                        self.metrics.io_errors += 1
                    else:
                        self.metrics.write_count += 1
            elif request.type is RequestType.FLUSH:
                self.backend.flush()
                self.metrics.flush_count += 1
            else:  # GET_ID
                written = self._scatter(mem, request, self.device_id)
                self.metrics.get_id_count += 1
        except (OSError, BlockBackendError) as exc:
            status = _STATUS_IOERR
            self.metrics.io_errors += 1
            log.error("virtio-blk I/O failed", drive_id=self.drive_id, type=request.type.name,
                      sector=request.sector, error=str(exc))
        mem.write(request.status_addr, status)
        return written + 1

    def _transfer(self, mem: GuestMemory, request: Request, *, into_guest: bool) -> int:
        with contextlib.ExitStack() as views:
            # SAFETY: each view covers a descriptor the queue checked lies wholly inside one
            # guest region; the views are released (ExitStack) before the mapping could go away.
            buffers = [views.enter_context(mem.view(d.addr, d.length)) for d in request.data]
            if into_guest:
                return self.backend.read_at(request.offset, buffers)
            return self.backend.write_at(request.offset, buffers)

    @staticmethod
    def _scatter(mem: GuestMemory, request: Request, payload: bytes) -> int:
        done = 0
        for d in request.data:
            if done == len(payload):
                break
            chunk = payload[done:done + d.length]
            mem.write(d.addr, chunk)
            done += len(chunk)
        return done

    # --- persistence -----------------------------------------------------------------------------

    def state(self) -> BlockState:
        with self.lock:
            return BlockState(
                drive_id=self.drive_id, path=self.path, read_only=self.read_only, is_root=self.is_root,
                cache_type=self.cache_type.value, partuuid=self.partuuid,
                queue_size=self.queues[0].max_size, virtio=self.virtio_state(),
            )

    @classmethod
    def from_state(cls, state: BlockState, mem: GuestMemory, interrupt: VirtioInterrupt, *,
                   rate_limiter: RateLimiter | None = None) -> Block:
        """Reopen the backing file and reload untrusted `state`, re-activating the device if it was.

        `BlockStateInvalid` for a bad state, `BlockError` if the file cannot be
        opened. Call `kick()` once the VM runs again, for requests the guest
        queued before the snapshot.
        """
        validate_block_state(state)
        block = cls(state.drive_id, state.path, state.read_only, state.is_root, state.cache_type,
                    rate_limiter, state.partuuid, queue_size=state.queue_size)
        try:
            block.restore_virtio_state(state.virtio, mem, interrupt)
        except VirtioDeviceError as exc:
            block.close()
            raise BlockStateInvalid(str(exc)) from exc
        return block

    def __repr__(self) -> str:
        flags = "".join(f" {name}" for name, on in (("ro", self.read_only), ("root", self.is_root),
                                                     ("active", self.is_activated), ("throttled", self.throttled))
                        if on)
        return (f"<Block {self.drive_id} {self.path!r} sectors={self.capacity} "
                f"{self.cache_type.value}{flags}>")
