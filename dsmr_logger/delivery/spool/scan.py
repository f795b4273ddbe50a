"""Reading segment files back: records in order, and a ``Gap`` for every damaged stretch.

A reader never trusts a byte it cannot verify: each record's head and telegram have their own
checksums (``records.py``), a length that would run past the file's end is damage, and after a
damaged record reading resumes at the next record that verifies. Files are read forward in
256 KiB chunks, so a page of the backlog costs a few reads, never the whole file (1 MiB).

Invariant: what ``scan`` yields covers the file from its offset to its end, in order, each byte
in exactly one ``Entry`` or ``Gap``; an ``Entry`` is a record exactly as it was written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dsmr_logger.delivery.spool.records import (
    HEAD_MAX,
    MAGIC,
    MAGIC_V1,
    MARKER,
    Head,
    claimed_size,
    parse_head,
    read,
    v1_record,
)

_FIRST_READ = 16 * 1024
_CHUNK = 256 * 1024
"""Reads start at 16 KiB (the head of a backlog is one record) and grow 4-fold to 256 KiB (a
page of the backlog is about 200 KiB)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One record read back, and where in its segment the next one starts."""

    seq: int
    received_at: float
    sinks: tuple[str, ...]
    telegram: bytes
    segment: int
    """The first seq of the segment it is in (its name)."""
    end: int
    """Where in that segment the next record starts."""
    start: int = 0


@dataclass(frozen=True, slots=True)
class Gap:
    """Bytes that are not a whole, verified record: damage, or a write cut short."""

    segment: int
    start: int
    end: int
    lost: tuple[Head, ...]
    """Records whose head verified but whose telegram did not (or was cut short)."""
    unknown: int
    """Records whose head is damaged too, counted by their markers."""
    after: int
    """The seq of the last record before the gap."""
    before: int | None
    """The seq of the first readable record after it; None: the gap runs to the file's end."""


@dataclass(slots=True)
class Segment:
    first_seq: int
    path: Path
    size: int


class _Window:
    """A file read forward in growing chunks: ``need(pos, n)`` makes ``n`` bytes from ``pos``
    available in ``data`` (as far as the file goes) and returns where ``pos`` is in it."""

    def __init__(self, file: BinaryIO, pos: int, size: int) -> None:
        self.file, self.size = file, size
        file.seek(pos)
        self.base, self.data = pos, b""
        self._chunk = _FIRST_READ

    def need(self, pos: int, n: int) -> int:
        end = min(pos + n, self.size)
        have = self.base + len(self.data)
        if end > have:
            more = self.file.read(max(self._chunk, end - have))
            self._chunk = min(4 * self._chunk, _CHUNK)
            if len(more) < end - have:
                self.size = have + len(more)  # cut back meanwhile (a reader beside the daemon)
            self.data, self.base = self.data[pos - self.base :] + more, pos
        return pos - self.base


def scan(segment: Segment, offset: int = len(MAGIC)) -> Iterator[Entry | Gap]:
    """The records of one segment from ``offset`` on, and a ``Gap`` for each damaged stretch."""
    try:
        file = segment.path.open("rb")
    except FileNotFoundError:
        return
    with file:
        size = os.fstat(file.fileno()).st_size
        if file.read(len(MAGIC_V1)) == MAGIC_V1:
            yield from _scan_v1(segment, file.read(), offset)
            return
        window = _Window(file, offset, size)
        pos, last = offset, segment.first_seq - 1
        while pos < window.size:
            rel = window.need(pos, HEAD_MAX)
            record = read(window.data, rel, last)
            if record is None and rel + claimed_record(window.data, rel) > len(window.data):
                rel = window.need(pos, claimed_record(window.data, rel))  # a long one
                record = read(window.data, rel, last)
            if record is not None:
                seq, received_at, sinks, telegram, ends = record
                end = pos + ends - rel
                yield Entry(seq, received_at, sinks, telegram, segment.first_seq, end, pos)
                pos, last = end, seq
                continue
            head = parse_head(window.data, rel)
            if head is not None and head.seq > last:  # its telegram is damaged, or cut short
                end = min(pos + head.record_size, window.size)
                yield Gap(segment.first_seq, pos, end, (head,), 0, last, None)
                pos, last = end, head.seq
                continue
            window.need(pos, window.size - pos)  # damage: the rest of the file, to search it
            gap, pos = _resync(segment.first_seq, window.data[pos - window.base :], pos, last)
            yield gap


def claimed_record(data: bytes, at: int) -> int:
    return claimed_size(data, at) or 0


def _resync(segment: int, data: bytes, pos: int, last: int) -> tuple[Gap, int]:
    """Where reading goes on after an unreadable head at ``pos`` (``data`` starts there): where
    its length fields point, if a record verifies there, else at the next verified marker."""
    resume = None
    claimed = claimed_size(data, 0)
    if claimed is not None and 0 < claimed < len(data):
        head = parse_head(data, claimed)
        if head is not None and head.seq > last:
            resume = (claimed, head.seq)
    found = data.find(MARKER, 1)
    while resume is None and found >= 0:
        head = parse_head(data, found)
        if head is not None and head.seq > last:
            resume = (found, head.seq)
        found = data.find(MARKER, found + 1)
    end = resume[0] if resume else len(data)
    unknown = data.count(MARKER, 0, end)
    gap = Gap(segment, pos, pos + end, (), unknown, last, resume[1] if resume else None)
    return gap, pos + end


def _scan_v1(segment: Segment, data: bytes, offset: int) -> Iterator[Entry | Gap]:
    """A format-1 segment (before its conversion): records, resynchronised byte by byte."""
    base = len(MAGIC_V1)
    pos, last = max(offset, base), segment.first_seq - 1
    while pos - base < len(data):
        record = v1_record(data, pos - base, last)
        if record is not None:
            end = record.end + base
            yield Entry(record.seq, record.received_at, record.sinks, record.telegram,
                        segment.first_seq, end, pos)  # fmt: skip
            pos, last = end, record.seq
            continue
        start = pos
        pos += 1
        while pos - base < len(data) and v1_record(data, pos - base, last) is None:
            pos += 1
        after = v1_record(data, pos - base, last)
        yield Gap(segment.first_seq, start, pos, (), 1, last, after.seq if after else None)


def read_entries(segment: Segment, offset: int = len(MAGIC)) -> Iterator[Entry]:
    """The readable records of one segment from ``offset`` on (damaged ones skipped)."""
    for item in scan(segment, offset):
        if isinstance(item, Entry):
            yield item
