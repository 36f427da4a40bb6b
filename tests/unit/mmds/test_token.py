"""Session tokens: TTL bounds, expiry on an injected clock, forgery resistance."""

from __future__ import annotations

import base64

import pytest

from vmm.mmds import InvalidTtlValue, MAX_TOKEN_TTL_SECONDS, MIN_TOKEN_TTL_SECONDS
from vmm.mmds.token import TOKEN_LENGTH_LIMIT, TokenAuthority

from .packets import FakeClock


def authority(clock: FakeClock | None = None) -> TokenAuthority:
    return TokenAuthority(clock or FakeClock())


@pytest.mark.parametrize("ttl", [MIN_TOKEN_TTL_SECONDS - 1, MAX_TOKEN_TTL_SECONDS + 1, -5, 2**32])
def test_ttl_out_of_range(ttl: int) -> None:
    with pytest.raises(InvalidTtlValue) as info:
        authority().generate(ttl)
    assert str(info.value) == (
        f"Invalid time to live value provided for token: {ttl}. Please provide a value between 1 and 21600."
    )


@pytest.mark.parametrize("ttl", [MIN_TOKEN_TTL_SECONDS, 60, MAX_TOKEN_TTL_SECONDS])
def test_token_valid_until_ttl_elapses(ttl: int) -> None:
    clock = FakeClock()
    auth = authority(clock)
    token = auth.generate(ttl)
    assert len(token) == 48 and len(token) <= TOKEN_LENGTH_LIMIT
    assert auth.is_valid(token)
    clock.advance(ttl - 0.002)
    assert auth.is_valid(token)
    clock.advance(0.002)
    assert not auth.is_valid(token)


def test_tokens_are_random_and_opaque() -> None:
    clock = FakeClock(5000.0)
    auth = authority(clock)
    tokens = {auth.generate(60) for _ in range(50)}
    assert len(tokens) == 50
    # The plaintext expiry (5060000 ms, little-endian) does not appear in the token.
    plain = (5_060_000).to_bytes(8, "little")
    assert all(plain not in base64.b64decode(t) for t in tokens)


def test_tokens_of_another_authority_are_refused() -> None:
    a, b = authority(), authority()
    assert not b.is_valid(a.generate(60))


def test_aad_binds_tokens_to_the_instance() -> None:
    auth = authority()
    auth.set_aad("vm-1")
    token = auth.generate(60)
    assert auth.is_valid(token)
    auth.set_aad("vm-2")
    assert not auth.is_valid(token)


def test_any_bit_flip_invalidates() -> None:
    auth = authority()
    raw = bytearray(base64.b64decode(auth.generate(60)))
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            raw[i] ^= bit
            assert not auth.is_valid(base64.b64encode(bytes(raw)).decode())
            raw[i] ^= bit
    assert auth.is_valid(base64.b64encode(bytes(raw)).decode())


@pytest.mark.parametrize(
    "token",
    ["", "INVALID_TOKEN", "A" * 48, "A" * (TOKEN_LENGTH_LIMIT + 2), "not base64 at all!!", "é" * 10, "QUJD", "=" * 48],
)
def test_garbage_tokens_are_refused(token: str) -> None:
    assert not authority().is_valid(token)


def test_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError):
        TokenAuthority(FakeClock(), key=b"short")
    fixed = TokenAuthority(FakeClock(), key=b"k" * 32)
    assert TokenAuthority(FakeClock(), key=b"k" * 32).is_valid(fixed.generate(60))
