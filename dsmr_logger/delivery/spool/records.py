"""One spooled telegram on disk: a record, and how to find the next one after damage.

A record is ``marker | head crc | head length | body length | body crc | seq | received_at |
sink names | telegram``. The head (everything from its length to the last sink name) has its own
checksum, so a flipped bit in the telegram, 96 % of a 778-byte record, still says exactly which
telegram was lost and for which sinks. Each sink name is length-prefixed: no name can break the
format (format 1 joined the names with newlines, so a name holding one became two sinks).

After a record that does not verify, reading resumes at the end its length fields give, if a
record verifies there, else at the next marker whose head verifies: one bad byte costs one
record, not the rest of the file. The marker is two bytes that never occur in a DSMR telegram's
ASCII, so the search runs at C speed; it is not checksummed (reading in order never looks at
it). The price: 8 bytes more per record than format 1 (38 instead of 30 for one sink named
"home", +1 % of a 778-byte telegram).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = b"DSMRLOG2"
"""The first bytes of a segment file in this format."""
MAGIC_V1 = b"DSMRLOG1"
"""Format 1 (newline-joined sink names, one checksum per record): converted at open."""
MARKER = b"\xd3\x9b"
_PREFIX = struct.Struct("<2sIH")
"""marker, crc32 of the head (from its length on), head length."""
_FIXED = struct.Struct("<IIqd")
"""body length, crc32 of the body, seq, received_at."""
_NAME = struct.Struct("<H")
HEAD_MIN = _PREFIX.size + _FIXED.size
HEAD_MAX = 8192
"""A head longer than this is damage (64 sinks of 64 characters need 4,256 bytes)."""


@dataclass(frozen=True, slots=True)
class Head:
    """What a verified head says: enough to name a lost telegram even if its body is damaged."""

    seq: int
    received_at: float
    sinks: tuple[str, ...]
    size: int
    """Bytes of the head, marker included: the body starts here."""
    body_length: int
    body_crc: int

    @property
    def record_size(self) -> int:
        return self.size + self.body_length


def encode(seq: int, received_at: float, sinks: Sequence[str], telegram: bytes) -> bytes:
    """One record; ``ValueError`` for a sink name over 65,535 bytes (config allows 64 chars)."""
    names = b"".join(_NAME.pack(len(n)) + n for n in (s.encode() for s in sinks))
    fixed = _FIXED.pack(len(telegram), zlib.crc32(telegram), seq, received_at)
    head_length = len(fixed) + len(names)
    if head_length > HEAD_MAX - _PREFIX.size:
        raise ValueError("sink names too long for a spool record")
    length = head_length.to_bytes(2, "little")
    crc = zlib.crc32(names, zlib.crc32(fixed, zlib.crc32(length)))
    return b"".join((MARKER, crc.to_bytes(4, "little"), length, fixed, names, telegram))


def parse_head(data: bytes | memoryview, at: int) -> Head | None:
    """The head at ``at`` if it is whole and verifies (the marker is not looked at)."""
    if at + HEAD_MIN > len(data):
        return None
    _, crc, head_length = _PREFIX.unpack_from(data, at)
    size = _PREFIX.size + head_length
    if head_length < _FIXED.size or size > HEAD_MAX or at + size > len(data):
        return None
    if zlib.crc32(data[at + 6 : at + size]) != crc:
        return None
    body_length, body_crc, seq, received_at = _FIXED.unpack_from(data, at + _PREFIX.size)
    sinks = []
    pos, end = at + HEAD_MIN, at + size
    while pos < end:
        (length,) = _NAME.unpack_from(data, pos)
        pos += _NAME.size
        sinks.append(bytes(data[pos : pos + length]).decode("utf-8", "replace"))
        pos += length
    if pos != end:
        return None  # cannot be: the checksum held; a writer bug, not damage
    return Head(seq, received_at, tuple(sinks), size, body_length, body_crc)


def claimed_size(data: bytes | memoryview, at: int) -> int | None:
    """The record size the (unverified) length fields at ``at`` claim, if plausible."""
    if at + HEAD_MIN > len(data):
        return None
    head_length: int = _PREFIX.unpack_from(data, at)[2]
    body_length = int.from_bytes(data[at + 8 : at + 12], "little")
    if head_length < _FIXED.size or _PREFIX.size + head_length > HEAD_MAX:
        return None
    return _PREFIX.size + head_length + body_length


def body_ok(data: bytes | memoryview, at: int, head: Head) -> bool:
    end = at + head.record_size
    return end <= len(data) and zlib.crc32(data[at + head.size : end]) == head.body_crc


# --- format 1, read only to convert it ------------------------------------------------------

_V1 = struct.Struct("<IIqdH")
"""crc32 of everything after it, payload length, seq, received_at, sink names length."""


@dataclass(frozen=True, slots=True)
class V1Record:
    start: int
    end: int
    seq: int
    received_at: float
    sinks: tuple[str, ...]
    telegram: bytes


def v1_record(data: bytes, at: int, after_seq: int) -> V1Record | None:
    """The format-1 record at ``at`` if it verifies (and numbers above ``after_seq``)."""
    if at + _V1.size > len(data):
        return None
    crc, length, seq, received_at, names_length = _V1.unpack_from(data, at)
    end = at + _V1.size + length
    if names_length > length or end > len(data) or seq <= after_seq:
        return None
    if zlib.crc32(data[at + 4 : end]) != crc:
        return None
    body = data[at + _V1.size : end]
    names = body[:names_length].decode("utf-8", "replace")
    sinks = tuple(names.split("\n")) if names else ()
    return V1Record(at, end, seq, received_at, sinks, bytes(body[names_length:]))
