"""Damage: what an unreadable stretch of a segment cost each sink, counted once, and repaired.

Found by any read (``SegmentLog.damaged``), a damaged segment is *salvaged*: its readable
records are copied to a new file, the telegrams lost are counted per sink (counter ``lost``,
shown by ``spool list`` and ``status``) and logged, and the copy replaces the file. A record
whose head verified names its telegram and sinks exactly; one whose head is damaged too is
counted from the segment's summary (how many records per sink the file held), or, when the file
was only summarised by reading it at this open, for every sink that may have needed it (an
upper bound). A sink that was done with those records loses nothing.

Invariant: each lost record is counted once. The counters, the corrected summary and a row in
``rewrites`` are one transaction; the new file replaces the old one after it, and an
interrupted replacement is finished at the next open (the row says it was counted). A record
cut from the end of the log is no longer in it: the log ends at the last record kept, so one
appended again from a copy elsewhere (a schema-1 row being converted) is written, while new
telegrams still number above the cut one (``keep_numbering``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

from dsmr_logger.delivery.spool.cursors import Cursors
from dsmr_logger.delivery.spool.records import MAGIC, MAGIC_V1, encode
from dsmr_logger.delivery.spool.segments import SUFFIX, Entry, Gap, Segment, SegmentLog, scan
from dsmr_logger.delivery.spool.state import StateDb
from dsmr_logger.delivery.spool.summaries import Summaries

NEW = ".new"
"""A rewritten segment beside the original, until it replaces it."""


class Damage:
    def __init__(
        self, log: SegmentLog, summaries: Summaries, cursors: Cursors, state: StateDb, logger: Any
    ) -> None:
        self._log = log
        self._summaries = summaries
        self._cursors = cursors
        self._state = state
        self._logger = logger
        self.noted: Counter[str] = Counter()
        """Telegrams counted lost per sink (since the spool was created): what status shows."""
        self.copied: Collection[int] = ()
        """Seqs with a copy outside the log (schema-1 rows being converted): a damaged record
        among them is appended again from it, not lost."""

    def account(
        self, segment: Segment, items: Sequence[Entry | Gap], *, count_named: bool = True
    ) -> dict[str, int]:
        """Per sink, how many records it still needed that are missing from ``items`` (a whole
        segment read): named ones exactly (unless ``count_named`` is False: the caller counts
        them), the rest from its summary, or else by their gaps."""
        gaps = [item for item in items if isinstance(item, Gap)]
        lost: Counter[str] = Counter()
        for gap in gaps if count_named else ():
            for head in gap.lost:
                if head.seq not in self.copied:
                    lost.update(s for s in head.sinks if self._cursors.get(s).needs(head.seq))
        unknown = [gap for gap in gaps if gap.unknown]
        bound = self._log.last_seq + 1
        first = segment.first_seq
        if first in self._summaries.by_segment and first not in self._summaries.observed:
            entries = [item for item in items if isinstance(item, Entry)]
            readable = Counter(s for entry in entries for s in entry.sinks)
            named = Counter(s for gap in gaps for head in gap.lost for s in head.sinks)
            last = entries[-1].seq if entries else first - 1
            spans = unknown or [Gap(first, 0, 0, (), 0, last, None)]  # cut at a record's end
            for sink, (records, _) in self._summaries.get(first).items():
                missing = records - readable[sink] - named[sink]
                if missing > 0 and any(self._needs(sink, gap, bound) for gap in spans):
                    lost[sink] += missing
        else:
            sinks = self._summaries.sinks() | set(self._cursors.by_sink)
            for gap in unknown:
                lost.update({s: gap.unknown for s in sinks if self._needs(s, gap, bound)})
        return dict(lost)

    def _needs(self, sink: str, gap: Gap, bound: int) -> bool:
        return self._cursors.may_need(sink, gap.after, gap.before or max(bound, gap.after + 2))

    def repair(self, segment: Segment) -> None:
        """Repair one segment a read (or the open) found damaged, cut short, or in format 1."""
        items = list(scan(segment))
        gaps = [item for item in items if isinstance(item, Gap)]
        recorded = self._summaries.sizes.get(segment.first_seq)
        if not gaps and not is_v1(segment) and recorded in (None, segment.size):
            self._log.damaged.discard(segment.first_seq)
            return
        tail_only = len(gaps) == 1 and items[-1] is gaps[0] and gaps[0].before is None
        if segment is self._log.active and tail_only and not is_v1(segment):
            self.cut_tail(segment, items)
        else:
            self.salvage(segment, items)

    def salvage(self, segment: Segment, items: Sequence[Entry | Gap]) -> dict[str, int]:
        """Repair a damaged (or format-1) segment, ``items`` being all of it read; returns what
        each sink lost."""
        data = segment.path.read_bytes()
        entries = [item for item in items if isinstance(item, Entry)]
        lost = self.account(segment, items)
        if data.startswith(MAGIC_V1):
            records = [encode(e.seq, e.received_at, e.sinks, e.telegram) for e in entries]
        else:
            records = [data[e.start : e.end] for e in entries]
        sealed = segment is not self._log.active
        size = self._prepare(segment, records)
        saved = self._summaries.snapshot()
        self._summaries.replace(segment, entries, sealed=sealed)
        if sealed:
            self._summaries.sizes[segment.first_seq] = size
        cursors = self._cursors.snapshot()
        try:
            with self._state.transaction() as db:
                self._state.add_counters("lost", lost)
                self._summaries.save(db, ())
                self._cursors.save(db, self._forget_gone(segment, entries))
                self._state.keep_numbering(self._log.last_seq)
                db.execute(
                    "INSERT OR REPLACE INTO rewrites (first_seq, size) VALUES (?, ?)",
                    (segment.first_seq, size),
                )
        except BaseException:
            self._summaries.restore(saved)
            self._cursors.restore(cursors)
            segment.path.with_name(segment.path.name + NEW).unlink(missing_ok=True)
            raise
        self._summaries.unsaved.clear()
        self.noted.update(lost)
        self._finish(segment, size)
        if not sealed:
            self._log.last_seq = entries[-1].seq if entries else segment.first_seq - 1
        self._report(segment, items, lost, len(data), size)
        return lost

    def cut_tail(self, segment: Segment, items: Sequence[Entry | Gap]) -> dict[str, int]:
        """The file appended to ends in a torn or damaged record: cut it there (a truncate needs
        no free space, a rewrite does)."""
        entries = [item for item in items if isinstance(item, Entry)]
        keep = entries[-1].end if entries else len(MAGIC)
        lost = self.account(segment, items)
        saved = self._summaries.snapshot()
        self._summaries.replace(segment, entries, sealed=False)
        cursors = self._cursors.snapshot()
        try:
            with self._state.transaction() as db:
                self._state.add_counters("lost", lost)
                self._cursors.save(db, self._forget_gone(segment, entries))
                self._state.keep_numbering(self._log.last_seq)
                db.execute(
                    "INSERT OR REPLACE INTO rewrites (first_seq, size) VALUES (?, ?)",
                    (segment.first_seq, keep),
                )
        except BaseException:
            self._summaries.restore(saved)
            self._cursors.restore(cursors)
            raise
        self.noted.update(lost)
        size = segment.size
        self._finish(segment, keep)
        self._log.last_seq = entries[-1].seq if entries else segment.first_seq - 1
        self._report(segment, items, lost, size, keep)
        return lost

    def _forget_gone(self, segment: Segment, entries: Sequence[Entry]) -> list[str]:
        """Confirmations (and spared ones) of records the repair removes: gone with them, so a
        count from the summaries stays right. Returns the sinks changed."""
        later = [s.first_seq for s in self._log.segments if s.first_seq > segment.first_seq]
        end = min(later) if later else self._log.last_seq + 1
        readable = {entry.seq for entry in entries}
        changed = []
        for sink, cursor in self._cursors.by_sink.items():
            gone = {
                seq
                for seq in cursor.done | cursor.spared
                if segment.first_seq <= seq < end and seq not in readable
            }
            if gone:
                cursor.done -= gone
                cursor.spared -= gone
                changed.append(sink)
        return changed

    def _prepare(self, segment: Segment, records: Sequence[bytes]) -> int:
        """Write what ``segment`` will hold beside it (synced); returns its size. Until
        ``replace`` the segment itself is untouched."""
        path = segment.path.with_name(segment.path.name + NEW)
        data = b"".join((MAGIC, *records))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return len(data)

    def replace(self, segment: Segment, size: int) -> None:
        """Put the rewritten file in place (or, with none prepared, cut ``segment`` to
        ``size``); idempotent, so a crash in between is finished at the next open."""
        new = segment.path.with_name(segment.path.name + NEW)
        if new.exists():
            os.replace(new, segment.path)
        elif segment.path.exists() and segment.path.stat().st_size > size:
            os.truncate(segment.path, size)
        segment.size = size
        self._log.sync(directory=True)
        if segment is self._log.active:
            self._log.reopen_active()

    def _finish(self, segment: Segment, size: int) -> None:
        self.replace(segment, size)
        self._state.db.execute("DELETE FROM rewrites WHERE first_seq = ?", (segment.first_seq,))
        self._log.damaged.discard(segment.first_seq)
        self._cursors.forget_hints(segment.first_seq)

    def finish_interrupted(self) -> None:
        """At open: complete rewrites a crash interrupted (already counted); drop stray copies."""
        pending = dict(self._state.db.execute("SELECT first_seq, size FROM rewrites").fetchall())
        for first, size in pending.items():
            segment = self._log.find(first)
            if segment is not None:
                self.replace(segment, size)
            self._state.db.execute("DELETE FROM rewrites WHERE first_seq = ?", (first,))
        for stray in self._log.directory.glob(f"*{SUFFIX}{NEW}"):
            stray.unlink(missing_ok=True)

    def account_missing(self, first: int) -> dict[str, int]:
        """A sealed segment SQLite knows is gone (its file deleted): all its records are lost."""
        lost = {}
        for sink, (records, last) in self._summaries.get(first).items():
            cursor = self._cursors.get(sink)
            if cursor.seq < last or any(first <= seq <= last for seq in cursor.spared):
                done = sum(1 for seq in cursor.done if first <= seq <= last)
                lost[sink] = max(0, records - done)
        return lost

    def _report(
        self,
        segment: Segment,
        items: Sequence[Entry | Gap],
        lost: dict[str, int],
        was: int,
        now: int,
    ) -> None:
        gaps = [item for item in items if isinstance(item, Gap)]
        named = [head for gap in gaps for head in gap.lost if head.seq not in self.copied]
        unknown = sum(gap.unknown for gap in gaps)
        if not named and not unknown and not any(lost.values()):
            if gaps:
                self._logger.warning(
                    "spool file ended in a torn write; cut it there",
                    file=segment.path.name,
                    bytes_cut=was - now,
                )
            return
        self._logger.error(
            "spool file damaged: telegrams in it lost; the rest of the file kept",
            file=segment.path.name,
            lost_per_sink=lost,
            telegrams_named=[(head.seq, head.received_at, list(head.sinks)) for head in named][:20],
            records_unreadable=len(named) + unknown,
            bytes_before=was,
            bytes_after=now,
            hint="counted as 'lost' in: dsmr-logger spool list",
        )


def is_v1(segment: Segment) -> bool:
    try:
        with segment.path.open("rb") as file:
            return file.read(len(MAGIC_V1)) == MAGIC_V1
    except OSError:
        return False
