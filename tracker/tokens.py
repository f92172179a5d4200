"""Signed, compact tracking tokens and the tracking-URL format.

A token carries everything its endpoint needs, so a click redirects without the database:
``kind | varint(delivery_id) [| varint(position) | flag | url]`` followed by a 96-bit
HMAC-SHA256 tag, base64url without padding. The first secret signs; every configured
secret verifies, so secrets can be rotated without breaking links already sent.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import zlib
from typing import NamedTuple

TAG_BYTES = 12
OPEN, CLICK, HONEYPOT = b"o", b"c", b"h"


class Token(NamedTuple):
    """What a verified token says (a named tuple: one is made per request, and a frozen
    dataclass costs several times more to make)."""

    kind: str  # "open", "click" or "honeypot"
    delivery_id: int
    position: int = 0
    url: str = ""


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 56:
            raise ValueError("truncated")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> str:
    """base64url without padding (``urlsafe_b64encode`` less its two Python-level calls)."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Mints and verifies tokens with the configured secrets."""

    def __init__(self, secrets: list[str]) -> None:
        if not secrets:
            raise ValueError("at least one secret is needed")
        # HMAC-SHA256 of each key (a SHA-256 digest of its secret) with its padded key
        # blocks hashed once (RFC 2104; the key is shorter than the 64-byte block): a tag is
        # then two copies and two updates, ~0.6 us against hmac.digest's ~1.5 us (OpenSSL 3
        # looks the digest up and sets the key up again on every call). The relay mints ~40
        # tags per copy; the tracker verifies one per request. The first key signs.
        self._pads = [_pads(hashlib.sha256(s.encode()).digest()) for s in secrets]

    def _seal(self, payload: bytes) -> str:
        return _b64(payload + _tag(self._pads[0], payload))

    def open_token(self, delivery_id: int) -> str:
        return self._seal(OPEN + _varint(delivery_id))

    def honeypot_token(self, delivery_id: int) -> str:
        return self._seal(HONEYPOT + _varint(delivery_id))

    def click_token(self, delivery_id: int, position: int, url: str) -> str:
        return self._seal(CLICK + _varint(delivery_id) + click_part(position, url))

    def click_tokens(self, delivery_id: int, parts: list[bytes]) -> list[str]:
        """``click_token(delivery_id, position, url)`` for each ``click_part(position, url)``:
        the copies of a message share their parts, so each copy only signs."""
        head = CLICK + _varint(delivery_id)
        return [self._seal(head + part) for part in parts]

    def verify(self, token: str) -> Token | None:
        """The token's content if its tag verifies under any secret, else None."""
        try:
            data = _unb64(token)
        except (ValueError, TypeError):
            return None
        if len(data) <= TAG_BYTES + 1:
            return None
        payload, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        # A loop, not any(genexpr): this runs for every request, mostly with one secret.
        for pads in self._pads:
            if hmac.compare_digest(_tag(pads, payload), tag):
                break
        else:
            return None
        try:
            return _decode(payload)
        except (ValueError, zlib.error, UnicodeDecodeError):
            return None


def _pads(key: bytes) -> tuple:
    """The inner and outer hashes of an HMAC-SHA256 key's padded blocks (RFC 2104)."""
    block = key.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
    return inner, hashlib.sha256(bytes(b ^ 0x5C for b in block))


def _tag(pads: tuple, payload: bytes) -> bytes:
    """``hmac.digest(key, payload, "sha256")[:TAG_BYTES]`` from the key's :func:`_pads`."""
    inner = pads[0].copy()
    inner.update(payload)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()[:TAG_BYTES]


def click_part(position: int, url: str) -> bytes:
    """What follows the delivery id in a click token: the same in every copy of a message."""
    return _varint(position) + _packed_url(url)


@functools.lru_cache(maxsize=4096)
def _packed_url(url: str) -> bytes:
    """A click token's URL part: flag and body. Cached because every recipient's copy of a
    message carries the same links, and setting up deflate costs more than the HMAC (it was
    a tenth of the relay's busy time in the accept benchmark)."""
    raw = url.encode("utf-8")
    packed = zlib.compress(raw, 9)[2:-4]  # raw deflate: no header, no checksum
    return b"z" + packed if len(packed) < len(raw) else b"u" + raw


def _decode(payload: bytes) -> Token:
    kind = payload[:1]
    delivery_id, i = _read_varint(payload, 1)
    if kind == OPEN and i == len(payload):
        return Token("open", delivery_id)
    if kind == HONEYPOT and i == len(payload):
        return Token("honeypot", delivery_id)
    if kind != CLICK:
        raise ValueError("unknown kind")
    position, i = _read_varint(payload, i)
    return Token("click", delivery_id, position, _unpacked_url(payload[i:]))


@functools.lru_cache(maxsize=4096)
def _unpacked_url(packed: bytes) -> str:
    """The URL of a click token's URL part (the inverse of :func:`_packed_url`). Cached for
    the same reason: the copies of a message carry the same links, and inflate's set-up
    costs about as much as the HMAC. Raises ValueError/zlib.error on a bad part."""
    flag, body = packed[:1], packed[1:]
    if flag == b"z":
        body = zlib.decompress(body, -15)
    elif flag != b"u":
        raise ValueError("bad flag")
    return body.decode("utf-8")


def open_url(base_url: str, signer: Signer, delivery_id: int) -> str:
    """``{base_url}/o/{token}.gif``"""
    return f"{base_url}/o/{signer.open_token(delivery_id)}.gif"


def click_url(base_url: str, signer: Signer, delivery_id: int, position: int, url: str) -> str:
    """``{base_url}/c/{token}``"""
    return f"{base_url}/c/{signer.click_token(delivery_id, position, url)}"


def click_urls(base_url: str, signer: Signer, delivery_id: int, parts: list[bytes]) -> list[str]:
    """:func:`click_url` for each ``click_part(position, url)`` of one copy, minted together."""
    return [f"{base_url}/c/{t}" for t in signer.click_tokens(delivery_id, parts)]


def honeypot_url(base_url: str, signer: Signer, delivery_id: int) -> str:
    """A link no person sees or clicks; a hit on it marks the client as a machine."""
    return f"{base_url}/c/{signer.honeypot_token(delivery_id)}"
