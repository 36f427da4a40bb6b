"""The strict JSON toolkit: serde-style messages, readers, `loads`."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import pytest

from vmm.config import (
    ConfigError,
    ConfigParseError,
    DuplicateField,
    InvalidJson,
    InvalidType,
    InvalidValue,
    MissingField,
    UnknownField,
    UnknownVariant,
    loads,
)
from vmm.config.schema import (
    U8,
    U16,
    U32,
    U64,
    ConfigType,
    Field,
    Schema,
    describe,
    enum_of,
    one_of,
    optional,
    read_bool,
    read_str,
    sequence_of,
    str_map,
    to_json_value,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        (True, "boolean `true`"),
        (False, "boolean `false`"),
        (7, "integer `7`"),
        (-1, "integer `-1`"),
        (1.5, "floating point `1.5`"),
        ("ab\"c", 'string "ab\\"c"'),
        ([1], "sequence"),
        ({}, "map"),
    ],
)
def test_describe_names_values_like_serde_json(value: object, text: str) -> None:
    assert describe(value) == text


def test_describe_truncates_huge_values() -> None:
    assert len(describe("x" * 10_000)) < 120
    assert describe(10**80) == f"integer `{10**80}`"
    assert describe(1 << 100_000) == "integer of 100001 bits"


def test_one_of_formats_alternatives_like_serde() -> None:
    assert one_of(["a"]) == "expected `a`"
    assert one_of(["a", "b"]) == "expected `a` or `b`"
    assert one_of(["a", "b", "c"]) == "expected one of `a`, `b`, `c`"


@pytest.mark.parametrize(
    ("reader", "good", "bad", "message"),
    [
        (read_bool, True, 1, "invalid type: integer `1`, expected a boolean"),
        (read_bool, False, "false", 'invalid type: string "false", expected a boolean'),
        (read_str, "x", 5, "invalid type: integer `5`, expected a string"),
        (read_str, "", None, "invalid type: null, expected a string"),
        (U8, 255, True, "invalid type: boolean `true`, expected u8"),
        (U8, 0, 2.0, "invalid type: floating point `2.0`, expected u8"),
        (U8, 255, 256, "invalid value: integer `256`, expected u8"),
        (U16, 65535, 65536, "invalid value: integer `65536`, expected u16"),
        (U32, 2**32 - 1, -1, "invalid value: integer `-1`, expected u32"),
        (U64, 2**64 - 1, 2**64, f"invalid value: integer `{2**64}`, expected u64"),
    ],
)
def test_primitive_readers_are_strict(reader, good, bad, message) -> None:  # noqa: ANN001
    assert reader(good, "") == good
    with pytest.raises(ConfigParseError) as info:
        reader(bad, "")
    assert str(info.value) == message


def test_read_str_rejects_lone_surrogates() -> None:
    with pytest.raises(InvalidValue, match="lone surrogate"):
        read_str("a\ud800", "")


class Color(enum.StrEnum):
    RED = "Red"
    BLUE = "Blue"


def test_enum_reader_reports_unknown_variants() -> None:
    read = enum_of(Color)
    assert read("Red", "") is Color.RED
    with pytest.raises(UnknownVariant) as info:
        read("red", "color")
    assert str(info.value) == "color: unknown variant `red`, expected `Red` or `Blue`"
    with pytest.raises(InvalidType):
        read(1, "")
    only_red = enum_of(Color, accepted=[Color.RED])
    with pytest.raises(UnknownVariant, match="expected `Red`$"):
        only_red("Blue", "")


def test_optional_and_sequence_readers() -> None:
    assert optional(U8)(None, "") is None
    assert sequence_of(U8)([1, 2], "") == (1, 2)
    with pytest.raises(InvalidType) as info:
        sequence_of(U8)([1, "2"], "xs")
    assert info.value.path == "xs[1]"
    with pytest.raises(InvalidType, match="expected a sequence"):
        sequence_of(U8)({"a": 1}, "")


def test_str_map_sorts_and_checks_values() -> None:
    assert str_map({"b": "1", "a": "2"}, "") == (("a", "2"), ("b", "1"))
    with pytest.raises(InvalidType) as info:
        str_map({"a": 1}, "props")
    assert info.value.path == "props.a"


@dataclass(frozen=True)
class Pair(ConfigType):
    left: int
    right: str | None = None
    flag: bool = False

    SCHEMA = Schema(
        "Pair",
        [
            Field("left", U8),
            Field.option("right", read_str, skip_none=True),
            Field("flag", read_bool, default=False),
        ],
    )


def test_schema_parses_in_document_order_then_reports_missing_fields() -> None:
    assert Pair.from_json({"left": 1}) == Pair(1)
    # The unknown key comes before the bad value, so it is what serde reports.
    with pytest.raises(UnknownField) as info:
        Pair.from_json({"zzz": 1, "left": "x"})
    assert str(info.value) == "unknown field `zzz`, expected one of `left`, `right`, `flag`"
    with pytest.raises(InvalidType):
        Pair.from_json({"left": "x", "zzz": 1})
    with pytest.raises(MissingField) as info2:
        Pair.from_json({"flag": True})
    assert str(info2.value) == "missing field `left`"
    with pytest.raises(InvalidType) as info3:
        Pair.from_json([1])
    assert str(info3.value) == "invalid type: sequence, expected struct Pair"


def test_schema_defaults_reject_null_but_options_accept_it() -> None:
    assert Pair.from_json({"left": 1, "right": None}) == Pair(1)
    with pytest.raises(InvalidType, match="null, expected a boolean"):
        Pair.from_json({"left": 1, "flag": None})


def test_schema_dump_skips_none_only_where_marked() -> None:
    assert Pair(3).to_json() == {"left": 3, "flag": False}
    assert Pair(3, "r", True).to_json() == {"left": 3, "right": "r", "flag": True}


def test_to_json_value_handles_config_values() -> None:
    assert to_json_value(Color.RED) == "Red"
    assert to_json_value((Pair(1),)) == [{"left": 1, "flag": False}]
    with pytest.raises(TypeError):
        to_json_value(object())


def test_loads_is_as_strict_as_serde_json() -> None:
    assert loads(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    with pytest.raises(DuplicateField, match="duplicate field `a`"):
        loads('{"a": 1, "a": 2}')
    with pytest.raises(InvalidJson, match="NaN"):
        loads('{"a": NaN}')
    with pytest.raises(InvalidJson, match="Infinity"):
        loads("[-Infinity]")
    with pytest.raises(InvalidJson, match="line 1 column"):
        loads("{")
    with pytest.raises(InvalidJson, match="UTF-8"):
        loads(b'"\xff"')
    with pytest.raises(InvalidJson):
        loads("1" * 10_000)  # beyond Python's int digit limit
    with pytest.raises(InvalidJson):
        loads("[" * 100_000 + "]" * 100_000)


def test_error_location_prefixes_the_message() -> None:
    err = MissingField("missing field `size`", path="bandwidth")
    moved = err.at("drives[0].rate_limiter")
    assert str(moved) == "drives[0].rate_limiter.bandwidth: missing field `size`"
    assert moved.fault_message == str(moved)
    assert isinstance(moved, MissingField)
    assert str(err) == "bandwidth: missing field `size`"  # the original is unchanged
    assert err.at("") is err
    assert str(MissingField("m", path="[2]").at("drives")) == "drives[2]: m"


def test_errors_are_value_errors_with_docstring_messages() -> None:
    class Odd(ConfigError):
        """An odd
        thing happened."""

    assert isinstance(Odd(), ValueError)
    assert str(Odd()) == "An odd thing happened."
