"""Where each sink stands in the log: its cursor, and what it confirmed out of order.

A sink's *cursor* is a seq: every record up to it is done for that sink (confirmed,
dead-lettered, dropped by the cap, or never meant for it), except the few the cap *spared*
because they were being sent when it dropped their segment. Above the cursor, ``done`` holds
what was confirmed out of order (a window of requests, or a dead letter behind a retried head);
the cursor moves over them as soon as the gap below closes, so ``done`` stays small.

Invariants: a sink needs a record iff its seq is above the cursor and not in ``done``, or in
``spared``; ``spared`` is at or below the cursor and ``done`` above it; a segment file is deleted
only when every sink's cursor is past its last record for that sink and nothing in it is spared.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dsmr_logger.delivery.spool.segments import Gap, Segment, SegmentLog
from dsmr_logger.delivery.spool.summaries import Summaries


@dataclass(slots=True)
class Cursor:
    seq: int = 0
    done: set[int] = field(default_factory=set)
    spared: set[int] = field(default_factory=set)
    """At or below ``seq`` and still needed: the size cap went past them while they were being
    sent. Moving the cursor past a dropped segment keeps ``done`` small through a long outage."""
    resume: tuple[int, int] | None = None
    """(segment, offset) of the record right after ``seq``: reading on needs no search."""
    page_end: tuple[int, int, int] | None = None
    """(seq, segment, offset) where the last page for this sink ended."""

    def needs(self, seq: int) -> bool:
        return seq in self.spared if seq <= self.seq else seq not in self.done

    def copy(self) -> Cursor:
        return Cursor(self.seq, set(self.done), set(self.spared), self.resume, self.page_end)

    def move_past(self, seq: int) -> None:
        """Everything up to ``seq`` is done (the cap dropped it, or a purge)."""
        if seq > self.seq:
            self.seq, self.resume, self.page_end = seq, None, None
        self.done = {s for s in self.done if s > self.seq}


class Cursors:
    def __init__(self, log: SegmentLog, summaries: Summaries) -> None:
        self._log = log
        self._summaries = summaries
        self.by_sink: dict[str, Cursor] = {}

    def load(self, db: sqlite3.Connection) -> None:
        self.by_sink = {}
        for sink, seq in db.execute("SELECT sink, seq FROM cursors"):
            self.by_sink[sink] = Cursor(seq)
        for sink, seq in db.execute("SELECT sink, seq FROM done ORDER BY sink, seq"):
            self.get(sink).done.add(seq)
        for sink, seq in db.execute("SELECT sink, seq FROM spared"):
            self.get(sink).spared.add(seq)

    def save(self, db: sqlite3.Connection, changed: Iterable[str]) -> None:
        for sink in changed:
            cursor = self.get(sink)
            db.execute(
                "INSERT INTO cursors (sink, seq, crc) VALUES (?1, ?2, row_crc(?1, ?2)) "
                "ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq, crc = excluded.crc",
                (sink, cursor.seq),
            )
            for table, seqs in (("done", cursor.done), ("spared", cursor.spared)):
                db.execute(f"DELETE FROM {table} WHERE sink = ?", (sink,))
                db.executemany(
                    f"INSERT INTO {table} (sink, seq, crc) VALUES (?1, ?2, row_crc(?1, ?2))",
                    [(sink, seq) for seq in sorted(seqs)],
                )

    def get(self, sink: str) -> Cursor:
        cursor = self.by_sink.get(sink)
        if cursor is None:
            cursor = self.by_sink[sink] = Cursor()
        return cursor

    def highest(self) -> int:
        return max((max([c.seq, *c.done]) for c in self.by_sink.values()), default=0)

    def snapshot(self) -> dict[str, Cursor]:
        return {sink: cursor.copy() for sink, cursor in self.by_sink.items()}

    def restore(self, saved: dict[str, Cursor]) -> None:
        self.by_sink = saved

    def mark_done(self, sink: str, seq: int) -> bool:
        """Record a confirmation (or dead letter); False if the sink did not need it."""
        cursor = self.get(sink)
        if seq in cursor.spared:
            cursor.spared.discard(seq)
            return True
        if not cursor.needs(seq):
            return False
        cursor.done.add(seq)
        return True

    def advance(self, sink: str) -> None:
        """Move the cursor over what is done (and what was never for this sink)."""
        cursor = self.get(sink)
        if not cursor.done:
            return
        skip = self.without(sink, cursor.seq)
        for entry in self._log.items_after(cursor.seq, cursor.resume, skip):
            if isinstance(entry, Gap):
                break  # not past damage before it is counted (``Spool.repair`` moves on)
            if sink in entry.sinks:
                if entry.seq not in cursor.done:
                    break
                cursor.done.discard(entry.seq)
            cursor.seq = entry.seq
            cursor.resume = (entry.segment, entry.end)
            if not cursor.done:
                break
        cursor.done = {seq for seq in cursor.done if seq > cursor.seq}

    def without(self, sink: str, after: int) -> Callable[[Segment], bool]:
        """Segments with no record for ``sink`` above ``after`` (by their summaries)."""

        def skip(segment: Segment) -> bool:
            if segment.first_seq not in self._summaries.by_segment:
                return False  # unknown
            if self._log.segments and segment is self._log.segments[-1]:
                return False  # still growing (a reader beside the daemon)
            return self._summaries.last_for(segment.first_seq, sink) <= after

        return skip

    def finished(self) -> list[Segment]:
        """Full segments every sink is done with."""
        return [
            segment
            for segment in self._log.segments[:-1]
            if all(
                self.done_with(sink, segment.first_seq, last)
                for sink, (_, last) in self._summaries.get(segment.first_seq).items()
            )
        ]

    def done_with(self, sink: str, first: int, last: int) -> bool:
        cursor = self.get(sink)
        return cursor.seq >= last and not any(first <= seq <= last for seq in cursor.spared)

    def may_need(self, sink: str, after: int, before: int | None) -> bool:
        """Could ``sink`` still need a record whose seq is somewhere between these two?"""
        cursor = self.get(sink)
        if before is None or cursor.seq < before - 1:
            return True
        return any(after < seq < before for seq in cursor.spared)

    def forget_hints(self, first_seq: int | None = None) -> None:
        """Offsets into a rewritten (or any, with None) segment are no longer valid."""
        for cursor in self.by_sink.values():
            if first_seq is None or (cursor.resume and cursor.resume[0] == first_seq):
                cursor.resume = None
            if first_seq is None or (cursor.page_end and cursor.page_end[1] == first_seq):
                cursor.page_end = None
