"""What each segment file holds, per sink, without reading it: its summary.

A summary is, per sink, how many of a segment's records name that sink and the last one's seq;
for a sealed segment also the file's size. Summaries let a start count every backlog without
reading the spool, let a reader skip a segment with nothing for its sink, and say how many
records a damaged segment should have held (``damage.py``). Sealed segments' summaries are kept
in SQLite, written in the commit that seals them; the segment being appended to is summarised
in memory only (rebuilding it at open means reading one file, about a megabyte).

Invariant: a summary counts exactly the records its file holds (damage is repaired and the
summary corrected in one step), except a summary ``observed`` at this open by reading a file,
which cannot count what was unreadable before it was read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from dsmr_logger.delivery.spool.segments import Entry, Segment

Summary = dict[str, tuple[int, int]]
"""Per sink: how many of a segment's records it was sent, and the last one's seq."""
_Saved = tuple[dict[int, Summary], dict[int, int], set[int]]


class Summaries:
    def __init__(self) -> None:
        self.by_segment: dict[int, Summary] = {}
        self.sizes: dict[int, int] = {}
        """Sealed segments' sizes when sealed (or rewritten): what the file must still hold."""
        self.unsaved: set[int] = set()
        """Sealed segments whose summary is not in SQLite yet."""
        self.observed: set[int] = set()
        """Summarised by reading at this open (not by the commits that wrote them)."""

    def load(self, db: sqlite3.Connection) -> None:
        query = "SELECT first_seq, sink, records, last_seq, size FROM segments"
        self.load_rows(db.execute(query).fetchall())

    def load_rows(self, rows: Iterable[tuple[int, str, int, int, int | None]]) -> None:
        self.by_segment, self.sizes = {}, {}
        self.unsaved, self.observed = set(), set()
        for first, sink, records, last, size in rows:
            self.by_segment.setdefault(first, {})[sink] = (records, last)
            if size is not None:
                self.sizes[first] = size

    def get(self, first_seq: int) -> Summary:
        return self.by_segment.get(first_seq, {})

    def sinks(self) -> set[str]:
        return {sink for summary in self.by_segment.values() for sink in summary}

    def last_for(self, first_seq: int, sink: str) -> int:
        return self.get(first_seq).get(sink, (0, 0))[1]

    def observe(self, segment: Segment, entries: Iterable[Entry], *, sealed: bool) -> None:
        """Summarise a segment SQLite has no summary of, by reading it."""
        summary: Summary = {}
        for entry in entries:
            for sink in entry.sinks:
                summary[sink] = (summary.get(sink, (0, 0))[0] + 1, entry.seq)
        self.by_segment[segment.first_seq] = summary
        self.observed.add(segment.first_seq)
        if sealed:
            self.sizes[segment.first_seq] = segment.size
            self.unsaved.add(segment.first_seq)

    def replace(self, segment: Segment, entries: Sequence[Entry], *, sealed: bool) -> None:
        """After a rewrite: what the file now holds is known exactly."""
        self.observe(segment, entries, sealed=sealed)
        self.observed.discard(segment.first_seq)

    def add(self, first_seq: int, seq: int, sinks: Iterable[str]) -> None:
        summary = self.by_segment.setdefault(first_seq, {})
        for sink in sinks:
            summary[sink] = (summary.get(sink, (0, 0))[0] + 1, seq)

    def seal(self, segment: Segment) -> None:
        self.sizes[segment.first_seq] = segment.size
        self.unsaved.add(segment.first_seq)

    def forget(self, first_seq: int) -> None:
        self.by_segment.pop(first_seq, None)
        self.sizes.pop(first_seq, None)
        self.observed.discard(first_seq)

    def keep_only(self, present: Iterable[int]) -> None:
        for first in set(self.by_segment) - set(present):
            self.forget(first)

    def save(self, db: sqlite3.Connection, finished: Sequence[Segment]) -> None:
        """Write the summaries of newly sealed segments, forget finished ones (in a
        transaction)."""
        for first in sorted(self.unsaved):
            db.execute("DELETE FROM segments WHERE first_seq = ?", (first,))
            db.executemany(
                "INSERT INTO segments (first_seq, sink, records, last_seq, size, crc) "
                "VALUES (?1, ?2, ?3, ?4, ?5, row_crc(?1, ?2, ?3, ?4, ?5))",
                [
                    (first, s, n, last, self.sizes.get(first))
                    for s, (n, last) in self.get(first).items()
                ],
            )
        db.executemany(
            "DELETE FROM segments WHERE first_seq = ?", [(s.first_seq,) for s in finished]
        )

    def snapshot(self) -> _Saved:
        summaries = {first: dict(s) for first, s in self.by_segment.items()}
        return summaries, dict(self.sizes), set(self.unsaved)

    def restore(self, saved: _Saved) -> None:
        self.by_segment, self.sizes, self.unsaved = saved
