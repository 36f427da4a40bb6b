"""Place an initrd (initramfs) in guest memory.

Boot loaders put the initrd as high as allowed (Documentation/x86/boot.rst,
initrd_addr_max: "the maximum address that may be occupied by the initial
ramdisk"), so it stays clear of the kernel, which decompresses and grows
upwards from its load address. Ember does the same: the highest
page-aligned spot below `max_addr` that lies inside one RAM region and
above the kernel's end. The file is read straight into guest memory.
"""

from __future__ import annotations

from vmm.memory import GuestMemory

from .common import (
    PAGE_SIZE,
    ImageEmpty,
    ImageSource,
    LoaderError,
    align_down,
    open_image,
)

__all__ = ["InitrdError", "InitrdDoesNotFit", "place_initrd", "load_initrd"]


class InitrdError(LoaderError):
    """Invalid initrd."""


class InitrdDoesNotFit(InitrdError):
    """Initrd does not fit in guest memory between the kernel and its address limit."""


def place_initrd(mem: GuestMemory, size: int, *, kernel_end: int, max_addr: int) -> int:
    """The guest address for an initrd of `size` bytes.

    The initrd ends at or below `max_addr` (exclusive; for a bzImage pass
    `SetupHeader.initrd_limit`, initrd_addr_max + 1), starts page aligned at
    or above `kernel_end`, and lies wholly inside one memory region; of the
    places that qualify, the highest wins.
    """
    if size <= 0:
        raise ImageEmpty()
    for region in sorted(mem.regions, key=lambda r: r.guest_addr, reverse=True):
        top = min(region.end, max_addr)
        if top - size < 0:
            continue
        addr = align_down(top - size, PAGE_SIZE)
        if addr >= region.guest_addr and addr >= kernel_end:
            return addr
    raise InitrdDoesNotFit(
        f"{size} bytes, kernel ends at {kernel_end:#x}, limit {max_addr:#x} ({mem!r})"
    )


def load_initrd(
    mem: GuestMemory,
    source: ImageSource,
    *,
    kernel_end: int,
    max_addr: int,
) -> tuple[int, int]:
    """Load an initrd file high in guest memory; return (address, size).

    See `place_initrd` for where it goes. Raises InitrdDoesNotFit (or
    another LoaderError: missing, unreadable or empty file) and writes
    nothing if it cannot be placed.
    """
    with open_image(source) as image:
        addr = place_initrd(mem, image.size, kernel_end=kernel_end, max_addr=max_addr)
        image.copy_to_guest(0, image.size, mem, addr)
    return addr, image.size
