"""Pooled network slots: one network namespace per sandbox, created ahead and reused.

Primer. Every clone of a template is restored from the same snapshot, so
every guest has the same network configuration inside: eth0 =
``GUEST_ADDR``/30 (169.254.0.21), default gateway ``GATEWAY_ADDR``
(169.254.0.22), MAC ``GUEST_MAC``, set at template boot by the kernel's
``ip=`` argument (`guest_ip_boot_arg`, CONFIG_IP_PNP). What makes each
sandbox reachable is the *slot* its VMM runs in (E2B's scheme)::

    host (root netns)                       netns ember-<service>-<N>                 guest
    emb<tag>-<N>  10.200.0.(4N+1)/30 <-veth-> veth0 10.200.0.(4N+2)/30                 eth0 169.254.0.21/30
                                              tap0  169.254.0.22/30  <-TAP-> VMM <->   gw   169.254.0.22
                                              nft: dnat 10.200.0.(4N+2) -> 169.254.0.21
                                                   snat 169.254.0.21 -> 10.200.0.(4N+2)

* The slot's **address** (``Slot.address``, the sandbox's network address)
  is the namespace end of the veth pair: the host reaches the sandbox there
  (DNAT to the guest), and the guest's outbound packets leave with it as
  their source (SNAT), so the host sees every sandbox at its own address.
  The guest reaches the host at ``Slot.host_addr`` (or any host address,
  through its default route).
* Every slot has the same TAP name (``tap0``) and TAP MAC (``TAP_MAC``),
  so the guest's ARP entry for its gateway, taken at template boot, is
  right in every slot.
* A /30 per slot from a configurable block (``NetConfig.cidr``, default
  10.200.0.0/16: 16384 slots, capped by ``max_slots``). Services on one host
  need disjoint blocks and distinct service ids (`NetSlots.start` refuses
  a block in use and holds a per-id lock in ``LOCK_DIR``).
* The namespace forwards only: new connections from the host side to the
  guest, and from the guest to its host end or outside the block (so
  sandboxes never reach each other's slot addresses, even on a host that
  forwards), spoofed guest sources are dropped. Internet egress is the
  host's business (forwarding + masquerade of the block on its uplink).

Life of a slot (`SlotAllocator`, pure): absent -> CREATING -> FREE ->
LEASED -> DIRTY -> RECYCLING -> FREE ... A released slot is DIRTY until its
connection-tracking table is flushed (``conntrack -F`` in the namespace; if
that fails the slot is destroyed and created again), so a new sandbox never
inherits the old one's NAT state. `NetSlots` keeps ``min_free`` slots ready
in a background thread, creates on demand up to ``max_slots``, and recycles
released slots.

I/O. Slots are made with iproute2 batches and an nftables ruleset
(``ip``, ``nsenter``, ``nft``; ``conntrack`` from conntrack-tools for the
flush): three processes per slot. The host needs root, /dev/net/tun and
those tools (Debian: iproute2, util-linux, nftables, conntrack).

Crash recovery: namespaces are named ``ember-<service>-<N>`` and host veth
ends ``emb<tag>-<N>`` (tag: 4 hex digits of the service id's SHA-256);
`cleanup_stale` removes every such leftover of a service whose lock is free.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

__all__ = [
    "NetSlotError",
    "SlotStateError",
    "NetSlotsExhausted",
    "SlotCommandError",
    "SlotLockHeld",
    "NetConfig",
    "Slot",
    "SlotLayout",
    "SlotState",
    "SlotAllocator",
    "NetSlots",
    "cleanup_stale",
    "guest_ip_boot_arg",
    "missing_requirements",
    "GUEST_ADDR",
    "GATEWAY_ADDR",
    "GUEST_PREFIX_LEN",
    "GUEST_MAC",
    "GUEST_IFACE_ID",
    "TAP_NAME",
    "TAP_MAC",
    "NETNS_DIR",
]

log = structlog.get_logger("poolsvc.netslots")

#: The guest's side, the same in every clone (set at template boot by `guest_ip_boot_arg`).
GUEST_ADDR = "169.254.0.21"
#: The TAP's address in each slot: the guest's default gateway.
GATEWAY_ADDR = "169.254.0.22"
GUEST_PREFIX_LEN = 30
#: The guest's MAC (PUT /network-interfaces ``guest_mac``) and the TAP's, fixed in every slot.
GUEST_MAC = "06:00:a9:fe:00:15"
TAP_MAC = "06:00:a9:fe:00:16"
#: The VMM's interface id (Firecracker's ``iface_id``), the guest's device name and the TAP name.
GUEST_IFACE_ID = "eth0"
GUEST_DEVICE = "eth0"
TAP_NAME = "tap0"
#: The veth end inside each namespace.
NS_VETH = "veth0"
#: Where `ip netns` keeps its namespace files.
NETNS_DIR = Path("/run/netns")
#: Per-service locks: a second service with the same id on this host is refused.
LOCK_DIR = Path("/run/ember")
SLOT_PREFIX_LEN = 30
NFT_TABLE = "ember"
_CMD_TIMEOUT = 30.0
#: Seconds between retries after a slot could not be created.
_CREATE_BACKOFF = 1.0


class NetSlotError(Exception):
    """A network slot could not be created, recycled or removed."""


class SlotStateError(NetSlotError):
    """A slot was moved through its life in an order the allocator does not allow."""


class NetSlotsExhausted(NetSlotError):
    """Every network slot is leased (the slot block or ``max_slots`` is used up)."""


class SlotCommandError(NetSlotError):
    """An ``ip``/``nft``/``conntrack`` command setting up a slot failed."""


class SlotLockHeld(NetSlotError):
    """Another running service holds this service id's network slots."""


def guest_ip_boot_arg() -> str:
    """The kernel argument that configures the guest's eth0 at boot (CONFIG_IP_PNP; autoconf off).

    ``ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>``
    (Documentation/admin-guide/nfs/nfsroot.rst).
    """
    mask = ipaddress.IPv4Network(f"0.0.0.0/{GUEST_PREFIX_LEN}").netmask
    return f"ip={GUEST_ADDR}::{GATEWAY_ADDR}:{mask}::{GUEST_DEVICE}:off"


def missing_requirements() -> str | None:
    """Why this host cannot make slots (not root, no /dev/net/tun, a tool missing), None if it can."""
    if os.geteuid() != 0:
        return "network slots need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    for tool in ("ip", "nsenter", "nft"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command is missing (apt-get install iproute2 util-linux nftables)"
    return None


# --- layout (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class NetConfig:
    """Which addresses slots use and how many to keep.

    `cidr`: the block the per-slot /30s come from (slot N: the N-th /30).
    `max_slots`: the most slots (also bounded by the block's size).
    `min_free`: slots kept created and unleased, ready for the next restore.
    """

    cidr: str = "10.200.0.0/16"
    max_slots: int = 1024
    min_free: int = 2

    def __post_init__(self) -> None:
        try:
            net = ipaddress.IPv4Network(self.cidr, strict=True)
        except ValueError as exc:
            raise NetSlotError(f"bad slot block {self.cidr!r}: {exc}") from exc
        if net.prefixlen > SLOT_PREFIX_LEN:
            raise NetSlotError(f"slot block {self.cidr} is smaller than one /{SLOT_PREFIX_LEN}")
        if net.overlaps(ipaddress.IPv4Network(f"{GUEST_ADDR}/{GUEST_PREFIX_LEN}", strict=False)):
            raise NetSlotError(f"slot block {self.cidr} overlaps the guests' own {GUEST_ADDR}/{GUEST_PREFIX_LEN}")
        if self.max_slots < 1 or self.min_free < 0:
            raise NetSlotError("max_slots must be at least 1 and min_free not negative")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)

    @property
    def capacity(self) -> int:
        """How many slots there can be: `max_slots`, bounded by the block's /30s."""
        return min(self.max_slots, self.network.num_addresses // 4)


@dataclass(frozen=True)
class Slot:
    """One slot's names and addresses (computed by `SlotLayout`; the slot may or may not exist)."""

    index: int
    #: The network namespace (a file ``NETNS_DIR/netns``).
    netns: str
    #: The host end of the veth pair, in the root namespace.
    host_if: str
    #: The host end's address: how the guest reaches the host.
    host_addr: str
    #: The namespace end's address: the sandbox's network address.
    address: str
    #: The slot block, in CIDR form (the forward filter keeps guests out of it).
    block: str
    prefix_len: int = SLOT_PREFIX_LEN
    tap: str = TAP_NAME
    guest_addr: str = GUEST_ADDR

    @property
    def netns_path(self) -> Path:
        """The namespace's file (``setns`` target)."""
        return NETNS_DIR / self.netns

    def __repr__(self) -> str:
        return f"<Slot {self.index} {self.netns} {self.address}>"


class SlotLayout:
    """Names and addresses of a service's slots: slot N is the N-th /30 of the block."""

    def __init__(self, service_id: str, config: NetConfig) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", service_id):
            raise NetSlotError(f"invalid service id {service_id!r}")
        self.service_id = service_id
        self.config = config
        self.netns_prefix = f"ember-{service_id}-"
        self.host_if_prefix = f"emb{service_tag(service_id)}-"

    def __repr__(self) -> str:
        return f"<SlotLayout {self.netns_prefix}N {self.config.cidr} capacity={self.config.capacity}>"

    def slot(self, index: int) -> Slot:
        if not 0 <= index < self.config.capacity:
            raise NetSlotError(f"slot {index} is outside 0..{self.config.capacity - 1}")
        base = int(self.config.network.network_address) + 4 * index
        return Slot(index=index, netns=f"{self.netns_prefix}{index}", host_if=f"{self.host_if_prefix}{index}",
                    host_addr=str(ipaddress.IPv4Address(base + 1)), address=str(ipaddress.IPv4Address(base + 2)),
                    block=self.config.cidr)

    def netns_index(self, name: str) -> int | None:
        """N if `name` is this service's namespace ``ember-<service>-<N>``, else None."""
        m = re.fullmatch(re.escape(self.netns_prefix) + r"(0|[1-9][0-9]{0,5})", name)
        return int(m.group(1)) if m else None

    def host_if_index(self, name: str) -> int | None:
        """N if `name` is this service's host veth end ``emb<tag>-<N>``, else None."""
        m = re.fullmatch(re.escape(self.host_if_prefix) + r"(0|[1-9][0-9]{0,5})", name)
        return int(m.group(1)) if m else None


def service_tag(service_id: str) -> str:
    """4 hex digits naming the service in its host interface names (IFNAMSIZ leaves no room for the id)."""
    return hashlib.sha256(service_id.encode()).hexdigest()[:4]


def nft_ruleset(slot: Slot) -> str:
    """The namespace's nftables ruleset: NAT between the slot's address and the guest's, and a forward filter."""
    g, a, h = slot.guest_addr, slot.address, slot.host_addr
    return f"""table ip {NFT_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{NS_VETH}" ip daddr {a} dnat to {g}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{NS_VETH}" ip saddr {g} snat to {a}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{NS_VETH}" oifname "{slot.tap}" ip daddr {g} accept
    iifname "{slot.tap}" oifname "{NS_VETH}" ip saddr {g} ip daddr {h} accept
    iifname "{slot.tap}" oifname "{NS_VETH}" ip saddr {g} ip daddr != {slot.block} accept
  }}
}}
"""


# --- the allocator (pure) ------------------------------------------------------------------


class SlotState(enum.Enum):
    """Where a slot is in its life (absent slots have no state)."""

    CREATING = "creating"
    FREE = "free"
    LEASED = "leased"
    DIRTY = "dirty"
    RECYCLING = "recycling"


class SlotAllocator:
    """Which slot indices exist and what each is doing; no I/O.

    Indices are handed out lowest first (leases and new slots alike), so a
    small pool keeps reusing the same few namespaces.
    """

    def __init__(self, capacity: int, min_free: int) -> None:
        if capacity < 1 or min_free < 0:
            raise NetSlotError("capacity must be at least 1 and min_free not negative")
        self.capacity = capacity
        self.min_free = min(min_free, capacity)
        self.states: dict[int, SlotState] = {}
        self.owners: dict[int, str] = {}

    def __repr__(self) -> str:
        c = self.counts()
        return (f"<SlotAllocator free={c[SlotState.FREE]} leased={c[SlotState.LEASED]} dirty={c[SlotState.DIRTY]} "
                f"creating={c[SlotState.CREATING]} recycling={c[SlotState.RECYCLING]} cap={self.capacity}>")

    def counts(self) -> dict[SlotState, int]:
        out = {s: 0 for s in SlotState}
        for s in self.states.values():
            out[s] += 1
        return out

    def _lowest(self, state: SlotState) -> int | None:
        found = [i for i, s in self.states.items() if s is state]
        return min(found) if found else None

    def _move(self, index: int, expected: SlotState, new: SlotState | None) -> None:
        have = self.states.get(index)
        if have is not expected:
            raise SlotStateError(f"slot {index} is {have.value if have else 'absent'}, not {expected.value}")
        if new is None:
            del self.states[index]
            self.owners.pop(index, None)
        else:
            self.states[index] = new

    def lease(self, owner: str) -> int | None:
        """The lowest FREE slot, now LEASED to `owner`; None if none is free."""
        index = self._lowest(SlotState.FREE)
        if index is not None:
            self._move(index, SlotState.FREE, SlotState.LEASED)
            self.owners[index] = owner
        return index

    def reserve_new(self) -> int | None:
        """The lowest absent index below the capacity, now CREATING; None at the capacity."""
        for index in range(self.capacity):
            if index not in self.states:
                self.states[index] = SlotState.CREATING
                return index
        return None

    def created(self, index: int, *, lease_to: str | None = None) -> None:
        """CREATING -> FREE (or straight to LEASED to `lease_to`)."""
        self._move(index, SlotState.CREATING, SlotState.LEASED if lease_to is not None else SlotState.FREE)
        if lease_to is not None:
            self.owners[index] = lease_to

    def create_failed(self, index: int) -> None:
        """CREATING -> absent (whatever was made of it has been removed)."""
        self._move(index, SlotState.CREATING, None)

    def release(self, index: int) -> None:
        """LEASED -> DIRTY: its sandbox is gone; the slot must be recycled before the next lease."""
        self._move(index, SlotState.LEASED, SlotState.DIRTY)
        self.owners.pop(index, None)

    def start_recycle(self) -> int | None:
        """The lowest DIRTY slot, now RECYCLING; None if none is dirty."""
        index = self._lowest(SlotState.DIRTY)
        if index is not None:
            self._move(index, SlotState.DIRTY, SlotState.RECYCLING)
        return index

    def recycled(self, index: int, *, ok: bool = True, lease_to: str | None = None) -> None:
        """RECYCLING -> FREE (or LEASED to `lease_to`); with not `ok`, -> absent (it was destroyed)."""
        if not ok:
            self._move(index, SlotState.RECYCLING, None)
            return
        self._move(index, SlotState.RECYCLING, SlotState.LEASED if lease_to is not None else SlotState.FREE)
        if lease_to is not None:
            self.owners[index] = lease_to

    def forget(self, index: int) -> None:
        """Drop a slot in any state (it was destroyed)."""
        self.states.pop(index, None)
        self.owners.pop(index, None)

    def to_create(self) -> int:
        """How many new slots would bring the ready ones (free, being created or recycled) to `min_free`."""
        c = self.counts()
        ready = c[SlotState.FREE] + c[SlotState.CREATING] + c[SlotState.RECYCLING]
        room = self.capacity - len(self.states)
        return max(0, min(self.min_free - ready, room))


# --- I/O: making, recycling and removing one slot ------------------------------------------


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlotCommandError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip() or f"status {proc.returncode}"
        raise SlotCommandError(f"{' '.join(argv)}: {detail}")
    return proc.stdout


def _in_netns(slot: Slot, *argv: str) -> list[str]:
    """A command line running `argv` in the slot's namespace (nsenter execs it: no extra process)."""
    return ["nsenter", f"--net={slot.netns_path}", "--", *argv]


def create_slot(slot: Slot) -> None:
    """Make the slot: namespace, veth pair, TAP, addresses, routes, forwarding, nftables rules.

    On failure whatever was made is removed, then `SlotCommandError`.
    """
    root_batch = (f"netns add {slot.netns}\n"
                  f"link add {slot.host_if} type veth peer name {NS_VETH} netns {slot.netns}\n"
                  f"addr add {slot.host_addr}/{slot.prefix_len} dev {slot.host_if}\n"
                  f"link set {slot.host_if} up\n")
    ns_batch = (f"link set lo up\n"
                f"tuntap add dev {slot.tap} mode tap\n"
                f"link set {slot.tap} address {TAP_MAC}\n"
                f"addr add {GATEWAY_ADDR}/{GUEST_PREFIX_LEN} dev {slot.tap}\n"
                f"link set {slot.tap} up\n"
                f"addr add {slot.address}/{slot.prefix_len} dev {NS_VETH}\n"
                f"link set {NS_VETH} up\n"
                f"route add default via {slot.host_addr}\n")
    try:
        _run(["ip", "-batch", "-"], root_batch)
        _run(["ip", "-n", slot.netns, "-batch", "-"], ns_batch)
        # /proc/sys/net is the reading process's namespace: forwarding is switched on inside it only.
        _run(_in_netns(slot, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward && exec nft -f -"),
             nft_ruleset(slot))
    except SlotCommandError:
        destroy_slot(slot)
        raise


def recycle_slot(slot: Slot) -> None:
    """Forget the previous sandbox's state: flush the namespace's connection tracking and neighbours."""
    _run(_in_netns(slot, "conntrack", "-F"))
    _run(["ip", "-n", slot.netns, "neigh", "flush", "dev", slot.tap])


def destroy_slot(slot: Slot) -> None:
    """Remove the slot (idempotent): the host veth end (its peer goes with it), then the namespace."""
    _delete_link(slot.host_if)
    _delete_netns(slot.netns)


def _delete_link(name: str) -> None:
    proc = subprocess.run(["ip", "link", "del", name], capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    if proc.returncode and os.path.exists(f"/sys/class/net/{name}"):
        raise SlotCommandError(f"ip link del {name}: {proc.stderr.strip()}")


def _delete_netns(name: str) -> None:
    proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    if proc.returncode and (NETNS_DIR / name).exists():
        raise SlotCommandError(f"ip netns del {name}: {proc.stderr.strip()}")


def slot_exists(slot: Slot) -> bool:
    """The slot's namespace file and host veth end both exist."""
    return (NETNS_DIR / slot.netns).exists() and os.path.exists(f"/sys/class/net/{slot.host_if}")


# --- crash recovery ------------------------------------------------------------------------


class _ServiceLock:
    """An flock on ``LOCK_DIR/netslots-<service>.lock``: one live owner of a service id's slots per host."""

    def __init__(self, service_id: str) -> None:
        self.path = LOCK_DIR / f"netslots-{service_id}.lock"
        self.fd: int | None = None

    def __repr__(self) -> str:
        return f"<_ServiceLock {self.path} held={self.fd is not None}>"

    def acquire(self) -> bool:
        """Take the lock; False if another process holds it.

        `release` unlinks the file while holding the lock, so after taking it
        the path must still name the locked file (else a releaser removed it
        meanwhile: try again on the new one).
        """
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid()}).encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # still ours: no lock files pile up
            except FileNotFoundError:
                pass
            os.close(self.fd)  # closing the last fd drops the flock
            self.fd = None


def _list_stale(layout: SlotLayout) -> tuple[list[str], list[str]]:
    try:
        netns = sorted(n for n in os.listdir(NETNS_DIR) if layout.netns_index(n) is not None)
    except FileNotFoundError:
        netns = []
    try:
        links = sorted(n for n in os.listdir("/sys/class/net") if layout.host_if_index(n) is not None)
    except FileNotFoundError:
        links = []
    return netns, links


def _remove_stale(layout: SlotLayout) -> list[str]:
    netns, links = _list_stale(layout)
    for name in links:
        _delete_link(name)
    for name in netns:
        _delete_netns(name)
    if netns or links:
        log.info("stale network slots removed", service=layout.service_id, netns=len(netns), links=len(links))
    return netns + links


def cleanup_stale(service_id: str) -> list[str]:
    """Remove the namespaces and host veth ends a crashed service `service_id` left; their names.

    Does nothing (returns []) while a live service holds that id's lock.
    """
    layout = SlotLayout(service_id, NetConfig())
    if _list_stale(layout) == ([], []):
        return []  # the common case: no lock file is made on hosts that never had slots
    lock = _ServiceLock(service_id)
    if not lock.acquire():
        return []
    try:
        return _remove_stale(layout)
    finally:
        lock.release()


# --- the pool of slots ---------------------------------------------------------------------


@dataclass
class _Timings:
    create_s: list[float] = field(default_factory=list)
    recycle_s: list[float] = field(default_factory=list)

    def add(self, series: list[float], seconds: float) -> None:
        series.append(seconds)
        del series[:-1000]


class NetSlots:
    """A service's network slots: lease one per sandbox, release it afterwards. Thread-safe.

    `start` takes the service id's host lock, removes stale slots, checks the
    block is not in use and starts the background thread that keeps
    ``min_free`` slots ready and recycles released ones; `close` stops it and
    (by default) destroys every slot.
    """

    def __init__(self, service_id: str, config: NetConfig | None = None) -> None:
        self.config = config if config is not None else NetConfig()
        self.layout = SlotLayout(service_id, self.config)
        self.allocator = SlotAllocator(self.config.capacity, self.config.min_free)
        self.timings = _Timings()
        self._lock = _ServiceLock(service_id)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._retry_at = 0.0

    def __repr__(self) -> str:
        return f"<NetSlots {self.layout.netns_prefix}N {self.config.cidr} {self.allocator!r}>"

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Take the lock, clean up stale slots (their names are returned), start refilling.

        Raises `SlotLockHeld` if another live service uses this id, and
        `NetSlotError` if a host address already lies in the slot block.
        """
        why = missing_requirements()
        if why:
            raise NetSlotError(f"cannot make network slots: {why}")
        if not self._lock.acquire():
            raise SlotLockHeld(f"another service with id {self.layout.service_id!r} owns network slots on this "
                               f"host ({self._lock.path})")
        try:
            stale = _remove_stale(self.layout)
            self._check_block_unused()
        except BaseException:
            self._lock.release()
            raise
        self._thread = threading.Thread(target=self._refill_loop, name="ember-netslots", daemon=True)
        self._thread.start()
        return stale

    def _check_block_unused(self) -> None:
        """No host interface has an address inside the block (another service's, or the host's own)."""
        out = _run(["ip", "-j", "-4", "addr", "show"])
        block = self.config.network
        for link in json.loads(out or "[]"):
            for addr in link.get("addr_info", []):
                try:
                    local = ipaddress.IPv4Address(addr.get("local", ""))
                except ValueError:
                    continue
                if local in block:
                    raise NetSlotError(f"slot block {self.config.cidr} is in use on this host: {local} on "
                                       f"{link.get('ifname')} (give each service its own block)")

    def close(self, destroy: bool = True) -> None:
        """Stop the refill thread; with `destroy`, remove every slot (leased ones too); drop the lock."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        if destroy and self._lock.fd is not None:
            with self._cond:
                indices = list(self.allocator.states)
            for index in indices:
                try:
                    destroy_slot(self.layout.slot(index))
                except NetSlotError as exc:
                    log.error("cannot remove a network slot", slot=index, error=str(exc))
                with self._cond:
                    self.allocator.forget(index)
        self._lock.release()

    def __enter__(self) -> NetSlots:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- leasing ---------------------------------------------------------------------------

    def acquire(self, owner: str) -> Slot:
        """A ready slot leased to `owner` (a free one, else one made or recycled now).

        Raises `NetSlotsExhausted` when every slot is leased, `SlotCommandError`
        when a slot could not be made.
        """
        deadline = time.monotonic() + _CMD_TIMEOUT
        with self._cond:
            while True:
                if self._stopping:
                    raise NetSlotError("the network slots are closed")
                mode = "leased"
                index = self.allocator.lease(owner)
                if index is None:
                    mode, index = "recycle", self.allocator.start_recycle()
                if index is None:
                    mode, index = "create", self.allocator.reserve_new()
                if index is not None:
                    break
                counts = self.allocator.counts()
                busy = counts[SlotState.CREATING] + counts[SlotState.RECYCLING]
                left = deadline - time.monotonic()
                if not busy or left <= 0:  # every slot is leased (or dirty ones keep failing)
                    raise NetSlotsExhausted(f"all {self.config.capacity} network slots are leased")
                self._cond.wait(left)  # one is being made or recycled by the refill thread
            self._cond.notify_all()  # the refill thread tops up min_free
        slot = self.layout.slot(index)
        if mode == "leased":
            return slot
        if mode == "recycle":
            if self._recycle(slot):
                with self._cond:
                    self.allocator.recycled(index, lease_to=owner)
                return slot
            with self._cond:
                self.allocator.recycled(index, ok=False)
                new_index = self.allocator.reserve_new()
                if new_index is None:
                    raise NetSlotsExhausted(f"all {self.config.capacity} network slots are leased")
            index, slot = new_index, self.layout.slot(new_index)
        try:
            self._create(slot)
        except NetSlotError:
            with self._cond:
                self.allocator.create_failed(index)
            raise
        with self._cond:
            self.allocator.created(index, lease_to=owner)
        return slot

    def release(self, slot: Slot) -> None:
        """Give back a leased slot (its VMM is dead); it is recycled before its next lease."""
        with self._cond:
            self.allocator.release(slot.index)
            self._cond.notify_all()

    def leased(self) -> dict[int, str]:
        """Leased slot index -> owner."""
        with self._cond:
            return dict(self.allocator.owners)

    # --- the edge ------------------------------------------------------------------------

    def _create(self, slot: Slot) -> None:
        t0 = time.monotonic()
        try:
            create_slot(slot)
        except SlotCommandError as exc:
            # A leftover of the same name (e.g. from a failed destroy) would make every retry fail.
            log.warning("network slot creation failed", slot=slot.index, error=str(exc))
            raise
        self.timings.add(self.timings.create_s, time.monotonic() - t0)

    def _recycle(self, slot: Slot) -> bool:
        """Flush the slot; if that fails, destroy it (False: it is gone and must be made again)."""
        t0 = time.monotonic()
        try:
            recycle_slot(slot)
            self.timings.add(self.timings.recycle_s, time.monotonic() - t0)
            return True
        except SlotCommandError as exc:
            log.warning("network slot recycling failed; destroying it", slot=slot.index, error=str(exc))
            try:
                destroy_slot(slot)
            except SlotCommandError as exc2:
                log.error("cannot remove a network slot", slot=slot.index, error=str(exc2))
            return False

    def _refill_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    index = self.allocator.start_recycle()
                    if index is not None:
                        job = "recycle"
                        break
                    if self.allocator.to_create() > 0 and time.monotonic() >= self._retry_at:
                        index = self.allocator.reserve_new()
                        if index is not None:
                            job = "create"
                            break
                    wait = max(0.05, self._retry_at - time.monotonic()) if self.allocator.to_create() else None
                    self._cond.wait(wait)
            slot = self.layout.slot(index)
            if job == "recycle":
                ok = self._recycle(slot)
                with self._cond:
                    self.allocator.recycled(index, ok=ok)
                    self._cond.notify_all()
                continue
            try:
                self._create(slot)
            except NetSlotError:
                with self._cond:
                    self.allocator.create_failed(index)
                    self._retry_at = time.monotonic() + _CREATE_BACKOFF
                    self._cond.notify_all()
                continue
            with self._cond:
                self.allocator.created(index)
                self._cond.notify_all()
