"""Versioned, checksummed framing of one cold-tier blob, and :class:`BlobCodec`: a lossless
coder framed per block (the coding half of a tier; storage and bookkeeping are apart).

Layout (little-endian)::

    magic  4s   b"SKVB"
    version B   FORMAT_VERSION
    codec  B    0 raw, 1 ColdCodec, 2 TokenCoder
    pad    H
    model  8s   codec/model tag (a blob coded under another model is refused)
    key    16s  blake2b of the block key (a blob stored under another key is refused)
    raw_len   Q
    payload_len Q
    raw_digest 16s  blake2b-128 of the decoded bytes (checked after decoding)
    digest 16s  blake2b-128 of everything above + payload
    payload

Any mismatch raises :class:`BlobError`; tiers turn that into a miss.
"""

from __future__ import annotations

import hashlib
import struct

MAGIC = b"SKVB"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sBBH8s16sQQ16s")
HEADER_BYTES = _HEAD.size + 16


class BlobError(ValueError):
    """Corrupt, truncated, foreign or wrong-version blob."""


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def key_bytes(key) -> bytes:
    """Normalize a block key (bytes, int or str) to bytes."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    if isinstance(key, int):
        return key.to_bytes(32, "little", signed=True)
    if isinstance(key, str):
        return key.encode()
    raise TypeError(f"unsupported block key type {type(key).__name__}")


def pack(key, codec_id: int, model_tag: bytes, raw: bytes, payload: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, codec_id, 0, model_tag, _h(key_bytes(key)),
                      len(raw), len(payload), _h(raw))
    return head + hashlib.blake2b(head + payload, digest_size=16).digest() + payload


def unpack(blob: bytes, key, codec_id: int, model_tag: bytes) -> tuple[int, bytes, bytes]:
    """-> (raw_len, payload, raw_digest); raises BlobError on any mismatch."""
    if len(blob) < HEADER_BYTES:
        raise BlobError(f"truncated blob ({len(blob)} bytes < header)")
    magic, ver, cid, _, tag, kh, raw_len, plen, raw_digest = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise BlobError("bad magic")
    if ver != FORMAT_VERSION:
        raise BlobError(f"format version {ver}, expected {FORMAT_VERSION}")
    if len(blob) != HEADER_BYTES + plen:
        raise BlobError(f"length {len(blob)} != header {HEADER_BYTES} + payload {plen}")
    digest = blob[_HEAD.size:HEADER_BYTES]
    payload = blob[HEADER_BYTES:]
    if hashlib.blake2b(blob[:_HEAD.size] + payload, digest_size=16).digest() != digest:
        raise BlobError("checksum mismatch")
    if cid != codec_id or tag != model_tag:
        raise BlobError("blob was coded with another codec/model")
    if kh != _h(key_bytes(key)):
        raise BlobError("blob belongs to another key")
    return raw_len, payload, raw_digest


def check_raw(raw: bytes, raw_len: int, raw_digest: bytes) -> bytes:
    if len(raw) != raw_len or _h(raw) != raw_digest:
        raise BlobError("decoded bytes do not match the stored digest")
    return raw


class BlobCodec:
    """A lossless coder (``codec_id``, ``tag``, ``encode(data)``, ``decode(payload, raw_len)``:
    :mod:`.coders`, :mod:`.code_model`) framed per block: ``encode(key, data) -> blob`` /
    ``decode(key, blob) -> data``. Touches no tier state (background threads call it without
    the tier's lock); ``decode`` raises :class:`BlobError` or the coder's error on a bad blob."""

    def __init__(self, codec):
        self.codec = codec

    def encode(self, key, data: bytes) -> bytes:
        return pack(key, self.codec.codec_id, self.codec.tag, data, self.codec.encode(data))

    def decode(self, key, blob: bytes) -> bytes:
        raw_len, payload, digest = unpack(blob, key, self.codec.codec_id, self.codec.tag)
        return check_raw(self.codec.decode(payload, raw_len), raw_len, digest)
