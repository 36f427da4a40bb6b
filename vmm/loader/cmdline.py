"""Build a Linux kernel command line.

Primer. The kernel splits its command line at spaces that are not inside
double quotes (lib/cmdline.c `next_arg`); each argument is `name` or
`name=value`, and a value with spaces is written `name="a b"` (the quotes
are stripped). There is no escape for a quote character. Names compare
with '-' and '_' equal (kernel/params.c `parameq`). The boot loader passes
the line NUL-terminated; on x86 it holds at most COMMAND_LINE_SIZE bytes
including the NUL, and a bzImage states its own limit in the setup
header's cmdline_size (which excludes the NUL).

A Cmdline only ever holds printable ASCII arguments with balanced quotes,
so whatever Ember adds cannot change how the guest splits the rest.
"""

from __future__ import annotations

__all__ = [
    "COMMAND_LINE_SIZE",
    "CmdlineError",
    "CmdlineInvalidText",
    "CmdlineBadKey",
    "CmdlineBadValue",
    "CmdlineTooLong",
    "Cmdline",
    "split_args",
    "virtio_mmio_device_arg",
]

# arch/x86/include/asm/setup.h: COMMAND_LINE_SIZE, including the NUL.
COMMAND_LINE_SIZE = 2048

_PRINTABLE = frozenset(chr(c) for c in range(0x20, 0x7F))


class CmdlineError(Exception):
    """Invalid kernel command line."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        doc = (type(self).__doc__ or type(self).__name__).strip().splitlines()[0].rstrip(".")
        return f"{doc}: {self.detail}" if self.detail else doc


class CmdlineInvalidText(CmdlineError):
    """Kernel command line text must be printable ASCII with balanced quotes."""


class CmdlineBadKey(CmdlineError):
    """Invalid kernel parameter name."""


class CmdlineBadValue(CmdlineError):
    """Invalid kernel parameter value."""


class CmdlineTooLong(CmdlineError):
    """Kernel command line does not fit in its capacity."""


def _check_printable(text: str) -> None:
    for ch in text:
        if ch not in _PRINTABLE:
            raise CmdlineInvalidText(f"character {ch!r} in {text!r}")


def split_args(text: str) -> list[str]:
    """Split text into arguments the way the kernel does (quote-aware).

    Raises CmdlineInvalidText on non-printable characters or an unclosed
    quote.
    """
    _check_printable(text)
    args: list[str] = []
    current: list[str] = []
    in_quote = False
    for ch in text:
        if ch == " " and not in_quote:
            if current:
                args.append("".join(current))
                current = []
            continue
        if ch == '"':
            in_quote = not in_quote
        current.append(ch)
    if in_quote:
        raise CmdlineInvalidText(f"unclosed quote in {text!r}")
    if current:
        args.append("".join(current))
    return args


def _arg_key(arg: str) -> str:
    """The parameter name of one argument, normalised as parameq compares."""
    if arg.startswith('"'):
        arg = arg[1:]
    return arg.split("=", 1)[0].rstrip('"').replace("-", "_")


def _check_key(key: str) -> None:
    if not key:
        raise CmdlineBadKey("empty name")
    _check_printable(key)
    for bad in (" ", "=", '"'):
        if bad in key:
            raise CmdlineBadKey(f"{key!r} contains {bad!r}")


class Cmdline:
    """A kernel command line with a fixed capacity (in bytes, NUL included)."""

    def __init__(self, capacity: int = COMMAND_LINE_SIZE) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 (the NUL), got {capacity}")
        self.capacity = capacity
        self._args: list[str] = []

    @property
    def args(self) -> tuple[str, ...]:
        return tuple(self._args)

    def append(self, arg: str) -> None:
        """Add one argument: a flag (`quiet`) or `key=value` as the kernel reads it."""
        parsed = split_args(arg)
        if len(parsed) != 1 or parsed[0] != arg:
            raise CmdlineInvalidText(f"{arg!r} is not exactly one argument")
        self._add([arg])

    def insert(self, key: str, value: str) -> None:
        """Add `key=value`, quoting the value if it contains spaces."""
        _check_key(key)
        _check_printable(value)
        if '"' in value:
            raise CmdlineBadValue(f"{key}: a value cannot contain '\"' (the kernel has no escape for it)")
        if " " in value:
            value = f'"{value}"'
        self._add([f"{key}={value}"])

    def extend(self, text: str) -> None:
        """Add every argument of a space-separated string; all or nothing."""
        self._add(split_args(text))

    def has(self, key: str) -> bool:
        """Whether some argument names `key` ('-' and '_' compare equal)."""
        want = key.replace("-", "_")
        return any(_arg_key(arg) == want for arg in self._args)

    def _add(self, new: list[str]) -> None:
        if not new:
            return
        length = len(" ".join(self._args + new)) + 1
        if length > self.capacity:
            raise CmdlineTooLong(f"{length} bytes with the NUL, capacity is {self.capacity}")
        self._args.extend(new)

    def __len__(self) -> int:
        """Length in bytes without the terminating NUL."""
        return len(str(self))

    def __str__(self) -> str:
        return " ".join(self._args)

    def as_bytes(self) -> bytes:
        """The command line as the kernel reads it: ASCII, NUL-terminated."""
        return str(self).encode("ascii") + b"\0"

    def __repr__(self) -> str:
        return f"<Cmdline {len(self) + 1}/{self.capacity} bytes {str(self)!r}>"


def _memparse_size(size: int) -> str:
    """A size in the kernel's memparse syntax, with the largest exact suffix."""
    for shift, suffix in ((30, "G"), (20, "M"), (10, "K")):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


def virtio_mmio_device_arg(base: int, size: int, irq: int, device_id: int | None = None) -> str:
    """The argument declaring one virtio-mmio device to the guest kernel.

    drivers/virtio/virtio_mmio.c: `virtio_mmio.device=<size>@<baseaddr>:<irq>[:<id>]`,
    e.g. `virtio_mmio.device=4K@0xd0001000:5`; the driver refuses irq 0.
    """
    if size <= 0 or size >= 1 << 64:
        raise CmdlineBadValue(f"virtio-mmio size {size} must be in 1..2^64-1")
    if base < 0 or base + size > 1 << 64:
        raise CmdlineBadValue(f"virtio-mmio range {base:#x}+{size:#x} is outside the 64-bit address space")
    if not 0 < irq < 1 << 32:
        raise CmdlineBadValue(f"virtio-mmio irq {irq} must be in 1..2^32-1")
    arg = f"virtio_mmio.device={_memparse_size(size)}@{base:#x}:{irq}"
    if device_id is not None:
        if not 0 <= device_id < 1 << 31:
            raise CmdlineBadValue(f"virtio-mmio device id {device_id} must be in 0..2^31-1")
        arg += f":{device_id}"
    return arg
