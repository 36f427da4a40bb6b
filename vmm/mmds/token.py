"""MMDS V2 session tokens: opaque, self-contained, expiring.

A guest asks for a token with ``PUT /latest/api/token`` and a TTL header,
then presents it on every GET. The store keeps no list of tokens: the token
itself carries its expiry time, sealed under a key that never leaves the
process.

Firecracker seals the expiry with AES-256-GCM (random 96-bit nonce, AAD
``microvmid=<id>``). Python's standard library has no AEAD, so Ember uses an
encrypt-then-MAC construction built from HMAC-SHA256 only:

* ``key`` = 32 random bytes from `secrets` (per store, never persisted);
* ``nonce`` = 12 random bytes per token;
* ``ciphertext`` = expiry (u64 little-endian, ms on the monotonic clock)
  XOR the first 8 bytes of HMAC(key, "enc" || nonce) — a PRF keystream, so
  the guest cannot read the host's clock out of the token;
* ``tag`` = first 16 bytes of HMAC(key, "tag" || len(aad) || aad || nonce ||
  ciphertext), compared in constant time;
* token = base64(nonce || ciphertext || tag): 36 bytes, 48 characters, the
  same length as Firecracker's.

Unlike GCM, a repeated nonce does not leak the key, so there is no need for
Firecracker's re-keying after 2^32 tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable

__all__ = [
    "MIN_TOKEN_TTL_SECONDS",
    "MAX_TOKEN_TTL_SECONDS",
    "PATH_TO_TOKEN",
    "TOKEN_LENGTH_LIMIT",
    "TokenAuthority",
    "MmdsTokenError",
    "InvalidTtlValue",
]

# Firecracker `mmds/token.rs` (and EC2 IMDSv2): a token lives 1 s to 6 h.
MIN_TOKEN_TTL_SECONDS = 1
MAX_TOKEN_TTL_SECONDS = 21600

# The only resource a guest may PUT to.
PATH_TO_TOKEN = "/latest/api/token"

# Longer strings are refused before any decoding (Firecracker's bound).
TOKEN_LENGTH_LIMIT = 70

KEY_LEN = 32
NONCE_LEN = 12
PAYLOAD_LEN = 8
TAG_LEN = 16
TOKEN_BYTES = NONCE_LEN + PAYLOAD_LEN + TAG_LEN

MILLISECONDS_PER_SECOND = 1000


class MmdsTokenError(Exception):
    """MMDS token error."""


class InvalidTtlValue(MmdsTokenError):
    """Invalid time to live value provided for token: {ttl}. Please provide a value between 1 and 21600."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        super().__init__(
            f"Invalid time to live value provided for token: {ttl}. "
            f"Please provide a value between {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}."
        )


class TokenAuthority:
    """Issues and checks tokens; `clock` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float], key: bytes | None = None) -> None:
        self._clock = clock
        self._key = key if key is not None else secrets.token_bytes(KEY_LEN)
        if len(self._key) != KEY_LEN:
            raise ValueError(f"token key must be {KEY_LEN} bytes")
        self._aad = b""

    def __repr__(self) -> str:
        return f"<TokenAuthority aad={self._aad.decode(errors='replace')!r}>"

    def set_aad(self, instance_id: str) -> None:
        """Bind tokens to a microVM id; tokens issued under another id stop validating."""
        self._aad = f"microvmid={instance_id}".encode()

    def generate(self, ttl_seconds: int) -> str:
        if not MIN_TOKEN_TTL_SECONDS <= ttl_seconds <= MAX_TOKEN_TTL_SECONDS:
            raise InvalidTtlValue(ttl_seconds)
        expiry = self._now_ms() + ttl_seconds * MILLISECONDS_PER_SECOND
        nonce = secrets.token_bytes(NONCE_LEN)
        ciphertext = _xor(expiry.to_bytes(PAYLOAD_LEN, "little"), self._keystream(nonce))
        token = nonce + ciphertext + self._tag(nonce, ciphertext)
        return base64.b64encode(token).decode("ascii")

    def is_valid(self, token: str) -> bool:
        """True if `token` was issued here (same key and AAD) and has not expired."""
        if len(token) > TOKEN_LENGTH_LIMIT:
            return False
        try:
            raw = base64.b64decode(token.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error):
            return False
        if len(raw) != TOKEN_BYTES:
            return False
        nonce = raw[:NONCE_LEN]
        ciphertext = raw[NONCE_LEN : NONCE_LEN + PAYLOAD_LEN]
        tag = raw[NONCE_LEN + PAYLOAD_LEN :]
        if not hmac.compare_digest(tag, self._tag(nonce, ciphertext)):
            return False
        expiry = int.from_bytes(_xor(ciphertext, self._keystream(nonce)), "little")
        return expiry > self._now_ms()

    def _now_ms(self) -> int:
        return int(self._clock() * MILLISECONDS_PER_SECOND)

    def _keystream(self, nonce: bytes) -> bytes:
        return hmac.digest(self._key, b"enc" + nonce, hashlib.sha256)[:PAYLOAD_LEN]

    def _tag(self, nonce: bytes, ciphertext: bytes) -> bytes:
        message = b"tag" + len(self._aad).to_bytes(4, "little") + self._aad + nonce + ciphertext
        return hmac.digest(self._key, message, hashlib.sha256)[:TAG_LEN]


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))
