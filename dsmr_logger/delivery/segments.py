"""The spooled telegrams themselves: append-only segment files, a checksum per record.

Why not rows in SQLite: a row insert rewrites whole 4 KiB pages (table, index, WAL, and again at
the checkpoint), which measured 9 x a telegram's size in bytes written per telegram at one commit
every few seconds. An append dirties each page of a file once. A segment is a sequence of records
``[crc32 | length | seq | received_at | names length | sink names | telegram]``; reading stops at
the first record that is incomplete or fails its checksum (a torn write), and the writer cuts the
file back to there. Records are appended in ``seq`` order, so a segment is named by its first seq
and the files sort as the queue does. Which sink still needs what is kept elsewhere (the spool's
cursors); this module only appends, reads, rotates and deletes.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"DSMRLOG1"
_HEADER = struct.Struct("<IIqdH")
"""crc32 of everything after it, payload length, seq, received_at, sink names length."""
SUFFIX = ".seg"


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


@dataclass(slots=True)
class Segment:
    first_seq: int
    path: Path
    size: int


def encode(seq: int, received_at: float, sinks: Sequence[str], telegram: bytes) -> bytes:
    names = "\n".join(sinks).encode()
    rest = _HEADER.pack(0, len(names) + len(telegram), seq, received_at, len(names))[4:]
    body = rest + names + telegram
    return struct.pack("<I", zlib.crc32(body)) + body


def read_entries(segment: Segment, offset: int = len(MAGIC)) -> Iterator[Entry]:
    """The records of one segment from ``offset`` on, up to the first damaged one."""
    try:
        file = segment.path.open("rb")
    except FileNotFoundError:
        return
    with file:
        size = os.fstat(file.fileno()).st_size
        file.seek(offset)
        while True:
            head = file.read(_HEADER.size)
            if len(head) < _HEADER.size:
                return
            crc, length, seq, received_at, names_length = _HEADER.unpack(head)
            if names_length > length or offset + _HEADER.size + length > size:
                return  # a damaged length must not make us read (or allocate) gigabytes
            payload = file.read(length)
            if len(payload) < length or zlib.crc32(payload, zlib.crc32(head[4:])) != crc:
                return
            offset += _HEADER.size + length
            names = payload[:names_length].decode()
            sinks = tuple(names.split("\n")) if names else ()
            yield Entry(seq, received_at, sinks, payload[names_length:], segment.first_seq, offset)


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:016d}{SUFFIX}"


class SegmentLog:
    """The segment files of one spool, oldest first; the last one is appended to."""

    def __init__(self, directory: Path, *, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self.last_seq = 0
        self.damaged: list[tuple[Path, int]] = []
        """Segments whose records stop before the file ends: (file, readable bytes)."""
        self._fd: int | None = None

    # --- opening --------------------------------------------------------------------------

    def open(self, *, writer: bool, first_seq: int) -> None:
        """Find the segments; a writer also cuts a torn tail and opens the last for appends.

        ``first_seq`` names a new segment when there is none.
        """
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.segments = []
        paths = sorted(self.directory.glob("*" + SUFFIX)) if self.directory.is_dir() else []
        for path in paths:
            # A reader beside the daemon may see a file the daemon deletes meanwhile.
            with contextlib.suppress(ValueError, FileNotFoundError):
                self.segments.append(Segment(int(path.stem), path, path.stat().st_size))
        self.segments.sort(key=lambda s: s.first_seq)
        self.last_seq = 0
        if self.segments:
            last = self.segments[-1]
            good = len(MAGIC)
            for entry in read_entries(last):
                self.last_seq, good = entry.seq, entry.end
            if good < last.size:
                if writer:
                    os.truncate(last.path, good)
                self.damaged.append((last.path, good))
                last.size = good
            if not self.last_seq:
                self.last_seq = last.first_seq - 1
        if writer:
            if not self.segments:
                self._create(max(first_seq, 1))
            else:
                self._open_active()

    def _create(self, first_seq: int) -> None:
        path = self.directory / _segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, MAGIC)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if self._fd is not None:
            try:
                os.fsync(self._fd)  # the segment it seals: nothing else will ever fsync it
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            os.close(self._fd)
        self._fd = fd
        self.segments.append(Segment(first_seq, path, len(MAGIC)))

    def _open_active(self) -> None:
        active = self.segments[-1]
        if active.size < len(MAGIC):  # cut before its magic was whole
            os.truncate(active.path, 0)
            active.size = 0
        self._fd = os.open(active.path, os.O_WRONLY)
        if active.size == 0:
            os.pwrite(self._fd, MAGIC, 0)
            active.size = len(MAGIC)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- writing ---------------------------------------------------------------------------

    @property
    def active(self) -> Segment:
        return self.segments[-1]

    def append(self, records: Sequence[tuple[int, bytes]]) -> list[Segment]:
        """Append encoded ``(seq, record)`` pairs in order; returns the segments filled (sealed).

        Records at or below ``last_seq`` are already here (a retried commit) and are skipped. On
        failure the log is cut back to where it was, so a retry appends nothing twice.
        """
        if self._fd is None:  # an earlier failure closed it: reopen, or fail as I/O does
            self._open_active()
        sealed: list[Segment] = []
        start = self.mark()
        pending = bytearray()
        try:
            for seq, record in records:
                if seq <= self.last_seq:
                    continue
                full = self.active.size + len(pending) + len(record) > self.segment_bytes
                if full and (pending or self.active.size > len(MAGIC)):
                    self._write(pending)
                    pending.clear()
                    sealed.append(self.active)
                    self._create(seq)
                pending += record
                self.last_seq = seq
            self._write(pending)
        except OSError:
            self.rollback(start)
            raise
        return sealed

    def _write(self, data: bytearray) -> None:
        assert self._fd is not None
        view = memoryview(data)
        active = self.active
        while view:
            written = os.pwrite(self._fd, view, active.size)
            active.size += written
            view = view[written:]

    def mark(self) -> tuple[int, int, int]:
        """Where the log ends now, for ``rollback``."""
        return (len(self.segments), self.active.size, self.last_seq)

    def rollback(self, mark: tuple[int, int, int]) -> None:
        """Cut the log back to ``mark`` (a failed append, or a commit whose state could not be
        saved)."""
        segments, size, last_seq = mark
        with contextlib.suppress(OSError):
            while len(self.segments) > segments:
                dropped = self.segments.pop()
                dropped.path.unlink(missing_ok=True)
            self.close()
            os.truncate(self.active.path, size)
            self.active.size = size
            self._fd = os.open(self.active.path, os.O_WRONLY)
        self.last_seq = last_seq

    def sync(self, *, directory: bool = False) -> None:
        """fsync the segment appended to (and the directory, after a file came or went)."""
        if self._fd is not None:
            os.fsync(self._fd)
        if directory:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def seal(self) -> Segment | None:
        """Start a new segment now (the cap must be able to drop everything written so far)."""
        if self.active.size <= len(MAGIC):
            return None
        sealed = self.active
        self._create(self.last_seq + 1)
        return sealed

    def remove(self, segment: Segment) -> None:
        """Delete a sealed segment whose every record is done."""
        assert segment is not self.active, "the segment appended to is never removed"
        segment.path.unlink(missing_ok=True)
        self.segments.remove(segment)

    # --- reading ---------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def entries_after(
        self,
        seq: int,
        hint: tuple[int, int] | None = None,
        skip: Callable[[Segment], bool] | None = None,
    ) -> Iterator[Entry]:
        """Every record with a seq above ``seq``, oldest first.

        ``hint`` is ``(first_seq, offset)`` of a segment position known to come right after
        ``seq`` (where an earlier read stopped); without it the segment is read from its start.
        """
        firsts = [s.first_seq for s in self.segments]
        index = max(0, bisect.bisect_right(firsts, seq) - 1)
        offset = len(MAGIC)
        if hint is not None and hint[0] in firsts:
            index, offset = firsts.index(hint[0]), hint[1]
        for segment in self.segments[index:]:
            if skip is not None and skip(segment):
                offset = len(MAGIC)
                continue
            for entry in read_entries(segment, offset):
                if entry.seq > seq:
                    yield entry
            offset = len(MAGIC)

    def segment_of(self, entry_seq: int) -> Segment:
        """The segment a record is in; searched from the newest, where appends land."""
        for segment in reversed(self.segments):
            if segment.first_seq <= entry_seq:
                return segment
        return self.segments[0]
