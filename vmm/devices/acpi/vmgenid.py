"""VM Generation ID: tell a restored guest it is a clone, so it reseeds its RNG.

Primer. Every microVM restored from one snapshot resumes with the same
memory, hence the same kernel RNG state: without help, clones would hand
out the same "random" numbers (TLS nonces, UUIDs, keys). Microsoft's
"Virtual Machine Generation ID" specification fixes this with a 128-bit
random ID in guest memory that the hypervisor changes whenever the VM may
have been duplicated, plus an ACPI notification. Linux implements it in
drivers/virt/vmgenid.c (CONFIG_VMGENID): it binds to an ACPI device with
_HID or _CID "VMGENCTR" / "VM_GEN_COUNTER", evaluates its `ADDR` method (a
Package of the ID's guest-physical address, low then high 32 bits), maps
those 16 bytes and feeds them to add_device_randomness(); on any notify it
re-reads them and, if they changed, calls add_vmfork_randomness(), which
reseeds the RNG at once.

The flow here:

* boot: `VmGenId.create` writes a random ID at `layout.VMGENID_ADDR` (16
  bytes in E820-reserved low memory) and `acpi_nodes()` gives the DSDT the
  VGEN device (`ADDR` returns that address) and a Generic Event Device
  (`ged.py`) whose `_EVT` sends `Notify(\\_SB.VGEN, 0x80)` when its
  interrupt fires;
* snapshot: `state()` records address, GSI and ID;
* restore: `VmGenId.restore` writes a *new* random ID (never the saved
  one) into the restored memory before the vCPUs run, and `notify()`,
  called once the vCPUs run again, pulses the GED interrupt so the guest
  picks the ID up and reseeds.

The address and GSI come from the snapshot, not from the current layout:
the guest's DSDT (in its memory) has them baked in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmm.arch.x86_64.acpi import AmlNode, vmgenid_device
from vmm.arch.x86_64.layout import IRQ_MAX, VMGENID_ADDR
from vmm.memory import GuestMemory, GuestMemoryError
from vmm.state_tree import StateTreeError, from_tree, to_tree

from .ged import ged_device

__all__ = [
    "VmGenIdError",
    "BadVmGenIdState",
    "VmGenIdOutsideMemory",
    "VmGenIdRngFailed",
    "VMGENID_SIZE",
    "VMGENID_ALIGN",
    "VMGENID_PATH",
    "VMGENID_NOTIFY",
    "VmGenIdState",
    "VmGenId",
]

# Microsoft VMGenID spec: the generation ID is a 128-bit integer.
VMGENID_SIZE = 16
# Kept 8-byte aligned, as Firecracker allocates it, so the guest reads it
# with aligned loads.
VMGENID_ALIGN = 8
VMGENID_PATH = "\\_SB_.VGEN"
# Microsoft VMGenID spec: the hypervisor signals a change with
# Notify(<device>, 0x80); 0x80.. are device-specific values (ACPI 6.5 §5.6.6).
VMGENID_NOTIFY = 0x80
# A fresh ID equal to the one it replaces (a 2^-128 event with a real RNG)
# is drawn again, at most this many times, before giving up.
_MAX_DRAWS = 4
_ADDR_MAX = (1 << 64) - VMGENID_SIZE

Rng = Callable[[int], bytes]


class VmGenIdError(ValueError):
    """The VM generation ID device could not be built or restored."""


class BadVmGenIdState(VmGenIdError):
    """A saved VMGenID state is malformed (address, GSI or a 16-byte ID)."""


class VmGenIdOutsideMemory(VmGenIdError):
    """The generation ID's address is not backed by guest memory."""


class VmGenIdRngFailed(VmGenIdError):
    """The random source did not produce a fresh 16-byte generation ID."""


def _check(addr: int, gsi: int, generation_id: bytes | None = None) -> None:
    if not 0 <= addr <= _ADDR_MAX or addr % VMGENID_ALIGN:
        raise BadVmGenIdState(f"address {addr:#x} is not an {VMGENID_ALIGN}-byte aligned 64-bit address")
    if not 0 <= gsi <= IRQ_MAX:
        raise BadVmGenIdState(f"GSI {gsi} is not an IOAPIC pin 0..{IRQ_MAX}")
    if generation_id is not None and len(generation_id) != VMGENID_SIZE:
        raise BadVmGenIdState(f"generation ID is {len(generation_id)} bytes, not {VMGENID_SIZE}")


@dataclass(frozen=True)
class VmGenIdState:
    """What a snapshot keeps: where the ID lives, the GED's GSI and the ID itself."""

    addr: int
    gsi: int
    generation_id: bytes

    def __post_init__(self) -> None:
        if isinstance(self.addr, bool) or isinstance(self.gsi, bool) or not isinstance(self.generation_id, bytes):
            raise BadVmGenIdState(f"wrong field types in {self!r}")
        _check(self.addr, self.gsi, self.generation_id)

    def to_tree(self) -> dict[str, Any]:
        """The plain tree a state file stores."""
        tree: dict[str, Any] = to_tree(self)
        return tree

    @classmethod
    def from_tree(cls, tree: Any) -> VmGenIdState:
        """Rebuild from an untrusted tree; `BadVmGenIdState` for any wrong shape or value."""
        try:
            return from_tree(cls, tree, "devices.vmgenid")
        except StateTreeError as exc:
            raise BadVmGenIdState(str(exc)) from exc

    def __repr__(self) -> str:
        return f"VmGenIdState(addr={self.addr:#x}, gsi={self.gsi}, generation_id={self.generation_id.hex()})"


def _draw(rng: Rng, previous: bytes | None) -> bytes:
    for _ in range(_MAX_DRAWS):
        fresh = rng(VMGENID_SIZE)
        if not isinstance(fresh, (bytes, bytearray)) or len(fresh) != VMGENID_SIZE:
            raise VmGenIdRngFailed(f"random source returned {fresh!r}, not {VMGENID_SIZE} bytes")
        if bytes(fresh) != previous:
            return bytes(fresh)
    raise VmGenIdRngFailed(f"random source returned the previous ID {_MAX_DRAWS} times")


class VmGenId:
    """The VMGenID device: a 16-byte ID in guest memory, its ACPI description,
    and the GED interrupt that announces a new one.

    Build it with `create` (boot) or `restore` (snapshot); both write the
    ID into guest memory. The object never changes afterwards: a new ID
    means a new `VmGenId`.
    """

    def __init__(self, addr: int, gsi: int, generation_id: bytes, interrupt: Callable[[], None]) -> None:
        _check(addr, gsi, generation_id)
        self._addr = addr
        self._gsi = gsi
        self._id = bytes(generation_id)
        self._interrupt = interrupt

    @classmethod
    def create(
        cls, mem: GuestMemory, gsi: int, interrupt: Callable[[], None], *, rng: Rng = os.urandom,
        addr: int = VMGENID_ADDR,
    ) -> VmGenId:
        """A device for a booting VM: a random ID written at `addr`; `interrupt`
        pulses `gsi`, the GED's line (e.g. `vm.interrupt_line(gsi)`)."""
        _check(addr, gsi)
        dev = cls(addr, gsi, _draw(rng, None), interrupt)
        dev._write(mem)
        return dev

    @classmethod
    def restore(
        cls, state: VmGenIdState, mem: GuestMemory, interrupt: Callable[[], None], *, rng: Rng = os.urandom,
    ) -> VmGenId:
        """The device of a restored VM: a new random ID (never the saved one)
        written at the saved address, in place of the template's. `interrupt`
        must pulse `state.gsi`. Call `notify()` once the vCPUs run again."""
        if not isinstance(state, VmGenIdState):
            raise BadVmGenIdState(f"expected a VmGenIdState, got {type(state).__name__}")
        dev = cls(state.addr, state.gsi, _draw(rng, state.generation_id), interrupt)
        dev._write(mem)
        return dev

    def _write(self, mem: GuestMemory) -> None:
        try:
            mem.write(self._addr, self._id)
        except GuestMemoryError as exc:
            raise VmGenIdOutsideMemory(f"{self._addr:#x}+{VMGENID_SIZE}: {exc}") from exc

    @property
    def generation_id(self) -> bytes:
        """The ID this VMM wrote (the guest's copy in memory is not trusted)."""
        return self._id

    @property
    def addr(self) -> int:
        """Guest-physical address of the 16-byte ID (what `ADDR` returns)."""
        return self._addr

    @property
    def gsi(self) -> int:
        """The Generic Event Device's interrupt line."""
        return self._gsi

    def acpi_nodes(self) -> list[AmlNode]:
        """The DSDT's VGEN device and the GED that notifies it (for `extra_dsdt`)."""
        return [
            vmgenid_device(self._addr, VMGENID_PATH),
            ged_device(self._gsi, [(VMGENID_PATH, VMGENID_NOTIFY)]),
        ]

    def notify(self) -> None:
        """Pulse the GED interrupt: the guest runs _EVT, which notifies VGEN,
        and Linux re-reads the ID. Only useful once the vCPUs run again."""
        self._interrupt()

    def state(self) -> VmGenIdState:
        return VmGenIdState(self._addr, self._gsi, self._id)

    def __repr__(self) -> str:
        return f"<VmGenId addr={self._addr:#x} gsi={self._gsi} id={self._id.hex()}>"
