"""The spooled telegrams themselves: append-only segment files of checksummed records.

Why not rows in SQLite: a row insert rewrites whole 4 KiB pages (table, index, WAL, and again at
the checkpoint), which measured 9 x a telegram's size in bytes written per telegram at one commit
every few seconds. An append dirties each page of a file once. Records are appended in ``seq``
order, so a segment is named by its first seq and the files sort as the queue does. Reading
skips a damaged record (``records.py``) and reports it as a ``Gap``; which sink still needs what
is kept elsewhere (the cursors). This module only appends, reads, rotates, rewrites and deletes.

Invariant: the records of the log are in strictly increasing seq order, file after file, and a
file never holds a seq below its name; a retried append writes nothing twice.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from dsmr_logger.delivery.spool.records import MAGIC
from dsmr_logger.delivery.spool.scan import Entry, Gap, Segment, read_entries, scan

__all__ = ["MAGIC", "SUFFIX", "Entry", "Gap", "Segment", "SegmentLog", "read_entries", "scan"]

SUFFIX = ".seg"


def _above(item: Entry | Gap, seq: int) -> bool:
    """A record above ``seq``, or a gap that may hold one."""
    if isinstance(item, Entry):
        return item.seq > seq
    return item.before is None or item.before > seq + 1


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:016d}{SUFFIX}"


class SegmentLog:
    """The segment files of one spool, oldest first; the last one is appended to."""

    def __init__(self, directory: Path, *, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self.last_seq = 0
        self.damaged: set[int] = set()
        self.tail: list[Entry] = []
        """The last segment's records as ``open`` read them (its summary is made of them)."""
        """Segments (first seq) a read found a gap in since the owner last looked."""
        self._fd: int | None = None
        self._active_inode: int | None = None

    # --- opening --------------------------------------------------------------------------

    def open(self, *, writer: bool, first_seq: int) -> None:
        """Find the segments; a writer also opens the last for appends (``first_seq`` names a
        new one when there is none). Damage is noted in ``damaged``, not repaired here."""
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
        self.damaged = set()
        self.tail = []
        if self.segments:
            last = self.segments[-1]
            self.last_seq = last.first_seq - 1
            for item in self._noting(scan(last)):
                if isinstance(item, Entry):
                    self.tail.append(item)
                    self.last_seq = max(self.last_seq, item.seq)
                else:
                    self.last_seq = max([self.last_seq, *(h.seq for h in item.lost)])
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
            if self._fd is not None:
                os.fsync(self._fd)  # the segment it seals: nothing else will ever fsync it
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self.close()
        self._fd, self._active_inode = fd, os.fstat(fd).st_ino
        self.segments.append(Segment(first_seq, path, len(MAGIC)))

    def _open_active(self) -> None:
        active = self.segments[-1]
        self.close()
        self._fd = os.open(active.path, os.O_WRONLY)
        self._active_inode = os.fstat(self._fd).st_ino
        if active.size < len(MAGIC):  # cut before its magic was whole
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, MAGIC, 0)
            active.size = len(MAGIC)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def present(self) -> bool:
        """The file appended to is still there (not deleted, nor replaced, behind our back)."""
        if not self.segments:
            return False
        try:
            return os.stat(self.active.path).st_ino == self._active_inode
        except OSError:
            return False

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
            self._open_active()
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

    def reopen_active(self) -> None:
        """The file appended to was replaced (a repair): append to the new one."""
        if self.segments and self._fd is not None:
            self._open_active()

    # --- reading ---------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def _noting(self, items: Iterator[Entry | Gap]) -> Iterator[Entry | Gap]:
        for item in items:
            if isinstance(item, Gap):
                self.damaged.add(item.segment)
            yield item

    def read(self, segment: Segment, offset: int = len(MAGIC)) -> Iterator[Entry]:
        """``read_entries``, noting any gap in ``damaged``."""
        for item in self._noting(scan(segment, offset)):
            if isinstance(item, Entry):
                yield item

    def entries_after(
        self,
        seq: int,
        hint: tuple[int, int] | None = None,
        skip: Callable[[Segment], bool] | None = None,
    ) -> Iterator[Entry]:
        """Every readable record with a seq above ``seq``, oldest first.

        ``hint`` is ``(first_seq, offset)`` of a segment position known to come right after
        ``seq`` (where an earlier read stopped); without it the segment is read from its start.
        """
        for item in self.items_after(seq, hint, skip):
            if isinstance(item, Entry):
                yield item

    def items_after(
        self,
        seq: int,
        hint: tuple[int, int] | None = None,
        skip: Callable[[Segment], bool] | None = None,
    ) -> Iterator[Entry | Gap]:
        """``entries_after``, with the gaps among them (a reader must not pass one unseen)."""
        firsts = [s.first_seq for s in self.segments]
        index = max(0, bisect.bisect_right(firsts, seq) - 1)
        offset = len(MAGIC)
        if hint is not None and hint[0] in firsts:
            index, offset = firsts.index(hint[0]), hint[1]
        for segment in self.segments[index:]:
            if skip is not None and skip(segment):
                offset = len(MAGIC)
                continue
            for item in self._noting(scan(segment, offset)):
                if _above(item, seq):
                    yield item
            offset = len(MAGIC)

    def segment_of(self, entry_seq: int) -> Segment:
        """The segment a record is in; searched from the newest, where appends land."""
        for segment in reversed(self.segments):
            if segment.first_seq <= entry_seq:
                return segment
        return self.segments[0]

    def find(self, first_seq: int) -> Segment | None:
        for segment in self.segments:
            if segment.first_seq == first_seq:
                return segment
        return None
