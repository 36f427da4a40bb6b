"""Kernel command line building, checked against the kernel's own splitting rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.loader import (
    COMMAND_LINE_SIZE,
    Cmdline,
    CmdlineBadKey,
    CmdlineBadValue,
    CmdlineError,
    CmdlineInvalidText,
    CmdlineTooLong,
    split_args,
    virtio_mmio_device_arg,
)


def kernel_parse(line: str) -> list[tuple[str, str | None]]:
    """A transliteration of lib/cmdline.c next_arg(), to check against."""
    out = []
    args = line.lstrip()
    while args:
        in_quote = quoted = False
        if args[0] == '"':
            args = args[1:]
            in_quote = quoted = True
        i = 0
        equals = 0
        while i < len(args):
            if args[i].isspace() and not in_quote:
                break
            if equals == 0 and args[i] == "=":
                equals = i
            if args[i] == '"':
                in_quote = not in_quote
            i += 1
        token = args[:i]
        if quoted and token.endswith('"'):
            token = token[:-1]
        if not equals:
            param, val = token, None
        else:
            param, val = token[:equals], token[equals + 1:]
            if val.startswith('"'):
                val = val[1:]
                if val.endswith('"'):
                    val = val[:-1]
        out.append((param, val))
        args = args[i + 1:].lstrip()
    return out


def test_build_and_render():
    c = Cmdline()
    c.append("console=ttyS0")
    c.insert("reboot", "k")
    c.append("panic=1")
    c.extend("  pci=off   nomodule ")
    assert str(c) == "console=ttyS0 reboot=k panic=1 pci=off nomodule"
    assert c.as_bytes() == b"console=ttyS0 reboot=k panic=1 pci=off nomodule\0"
    assert len(c) == len(str(c))
    assert c.args[-1] == "nomodule"
    assert repr(c).startswith("<Cmdline 48/2048 bytes")
    assert c.capacity == COMMAND_LINE_SIZE


def test_values_with_spaces_are_quoted():
    c = Cmdline()
    c.insert("init.msg", "hello world")
    c.insert("empty", "")
    assert str(c) == 'init.msg="hello world" empty='
    assert kernel_parse(str(c)) == [("init.msg", "hello world"), ("empty", "")]


def test_has_follows_parameq():
    c = Cmdline()
    c.extend('quiet root=/dev/vda "init-msg=a b" clearcpuid=smap')
    assert c.has("quiet")
    assert c.has("root")
    assert c.has("init_msg")
    assert c.has("init-msg")
    assert not c.has("ro")
    assert not c.has("clear")


def test_capacity_counts_the_nul():
    c = Cmdline(capacity=6)
    c.append("abcde")  # 5 + NUL == 6
    with pytest.raises(CmdlineTooLong):
        c.append("x")
    assert str(c) == "abcde"
    c = Cmdline(capacity=5)
    with pytest.raises(CmdlineTooLong, match="6 bytes"):
        c.append("abcde")
    with pytest.raises(ValueError):
        Cmdline(capacity=0)


def test_extend_is_all_or_nothing():
    c = Cmdline(capacity=12)
    c.append("a")
    with pytest.raises(CmdlineTooLong):
        c.extend("bb cc dd ee")
    assert str(c) == "a"
    with pytest.raises(CmdlineInvalidText):
        c.extend("ok bad\tone")
    assert str(c) == "a"


@pytest.mark.parametrize("text", ["tab\there", "nul\0", "newline\n", "caf\u00e9", "del\x7f"])
def test_non_printable_is_refused(text):
    with pytest.raises(CmdlineInvalidText):
        Cmdline().extend(text)
    with pytest.raises(CmdlineInvalidText):
        Cmdline().insert("k", text)


def test_append_takes_exactly_one_argument():
    c = Cmdline()
    for bad in ["two args", "", " ", ' pad', 'open="quote']:
        with pytest.raises(CmdlineInvalidText):
            c.append(bad)
    c.append('msg="two words"')
    assert kernel_parse(str(c)) == [("msg", "two words")]


@pytest.mark.parametrize(
    "key, error",
    [("", CmdlineBadKey), ("a b", CmdlineBadKey), ("a=b", CmdlineBadKey), ('q"', CmdlineBadKey),
     ("x\0", CmdlineInvalidText)],
)
def test_bad_keys(key, error):
    c = Cmdline()
    with pytest.raises(error):
        c.insert(key, "v")
    assert str(c) == ""


def test_quote_in_value_is_refused():
    with pytest.raises(CmdlineBadValue):
        Cmdline().insert("k", 'say "hi"')


def test_unbalanced_quote():
    with pytest.raises(CmdlineInvalidText, match="unclosed"):
        split_args('a="b c')


def test_virtio_mmio_device_arg():
    assert virtio_mmio_device_arg(0xD0001000, 0x1000, 5) == "virtio_mmio.device=4K@0xd0001000:5"
    assert virtio_mmio_device_arg(0xD0000000, 0x100, 48) == "virtio_mmio.device=256@0xd0000000:48"
    assert virtio_mmio_device_arg(0xC0000000, 2 << 20, 7, device_id=3) == "virtio_mmio.device=2M@0xc0000000:7:3"
    assert virtio_mmio_device_arg(1 << 32, 1 << 30, 9) == "virtio_mmio.device=1G@0x100000000:9"
    c = Cmdline()
    c.append(virtio_mmio_device_arg(0xD0001000, 0x1000, 5))
    c.append(virtio_mmio_device_arg(0xD0002000, 0x1000, 6))
    assert c.has("virtio_mmio.device")
    assert len(kernel_parse(str(c))) == 2


@pytest.mark.parametrize("base, size, irq", [(0, 0, 5), (0, 0x1000, 0), (-1, 0x1000, 5), (0, 0x1000, 1 << 32)])
def test_virtio_mmio_device_arg_rejects(base, size, irq):
    with pytest.raises(CmdlineBadValue):
        virtio_mmio_device_arg(base, size, irq)


printable_no_quote = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters='"'))
keys = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters='="'), min_size=1
)


@given(st.lists(st.tuples(keys, printable_no_quote), max_size=8))
def test_inserted_pairs_round_trip_through_the_kernel_parser(pairs):
    c = Cmdline(capacity=1 << 16)
    for key, value in pairs:
        c.insert(key, value)
    assert kernel_parse(str(c)) == [(k, v) for k, v in pairs]
    assert c.as_bytes().count(b"\0") == 1


@given(st.text(max_size=60))
def test_extend_never_raises_anything_else(text):
    c = Cmdline(capacity=64)
    try:
        c.extend(text)
    except CmdlineError:
        assert str(c) == ""
        return
    assert split_args(str(c)) == list(c.args)
    assert len(c.as_bytes()) <= 64
