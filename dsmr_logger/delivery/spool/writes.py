"""Writing to the spool: commits (appends, confirmations, the cap), dead letters, purges.

Each is one SQLite transaction after the appends it needs, so a crash leaves the state before or
after it; on an error in between, the appends are cut back and the in-memory state restored, so
the caller may retry the same call (a retried batch appends nothing twice). Appends reach the
card at the next fsync: every commit in strict durability, else every ``sync_interval``, since
each fsync makes the next append rewrite a whole page (fsyncing every flush tripled the writes).

Invariant: a commit (appends, confirmations, cap) is all or nothing.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from dsmr_logger.delivery.spool.cap import SizeCap
from dsmr_logger.delivery.spool.cursors import Cursors
from dsmr_logger.delivery.spool.damage import Damage
from dsmr_logger.delivery.spool.letters import DeadLetters, StoredTelegram
from dsmr_logger.delivery.spool.reads import Reads
from dsmr_logger.delivery.spool.records import encode
from dsmr_logger.delivery.spool.segments import Segment, SegmentLog
from dsmr_logger.delivery.spool.state import SpoolError, StateDb
from dsmr_logger.delivery.spool.summaries import Summaries

Encoded = tuple[int, bytes, Collection[str]]
"""A record encoded once by the caller (``encode``): its seq, bytes, and the sinks it names."""


ROOM_MARGIN = 256 * 1024
"""Free bytes a commit wants beyond its records: SQLite's WAL frames and a new segment."""


class SpoolGone(SpoolError):
    """The spool's files were deleted (or replaced) while it was open: reopen to recreate."""


class Fsyncs:
    """When appended records reach the card: every commit when strict, else every
    ``interval``, and when the flusher finds them waiting that long with no commit since."""

    def __init__(
        self, log: SegmentLog, *, strict: bool, interval: float, clock: Callable[[], float]
    ) -> None:
        self._log = log
        self.strict = strict
        self.interval = interval
        self._clock = clock
        self._unsynced = self.directory_changed = False
        self._last = 0.0

    def appended(self, anything: bool) -> None:
        self._unsynced |= anything

    def due(self) -> bool:
        return self._unsynced and self._clock() - self._last >= self.interval

    def sync(self, *, force: bool = False) -> None:
        if not (self._unsynced or self.directory_changed):
            return
        now = self._clock()
        if force or self.strict or now - self._last >= self.interval:
            self._log.sync(directory=self.directory_changed)
            self._unsynced = self.directory_changed = False
            self._last = now


class Writes:
    def __init__(
        self,
        *,
        log: SegmentLog,
        state: StateDb,
        summaries: Summaries,
        cursors: Cursors,
        cap: SizeCap,
        letters: DeadLetters,
        damage: Damage,
        reads: Reads,
        strict: bool,
        sync_interval: float,
        clock: Callable[[], float],
        logger: Any,
    ) -> None:
        self.log, self.state, self.summaries, self.cursors = log, state, summaries, cursors
        self.cap, self.letters, self.damage, self.reads = cap, letters, damage, reads
        self.strict = strict
        self._logger = logger
        self.writer = False
        self.full = False
        """The last commit failed for want of room."""
        self._repair_failing = False
        self.fsyncs = Fsyncs(log, strict=strict, interval=sync_interval, clock=clock)

    def _wait_for_room(self, size: int) -> None:
        """After a full disk, fail at once (no write, no rollback) until there is room again:
        a retry every few seconds then costs one ``statvfs``."""
        if not self.full or not size:
            return
        try:
            fs = os.statvfs(self.log.directory)
        except OSError:
            return
        free = (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize
        if free < size + ROOM_MARGIN:
            raise OSError(errno.ENOSPC, f"No space left on device ({free} bytes free)")

    def probe(self) -> None:
        """Raise what a commit would meet now (files gone, no room, a lock), writing nothing."""
        self.require_writer()
        self.check_present()
        was, self.full = self.full, True
        try:
            self._wait_for_room(1)
        finally:
            self.full = was
        with self.state.transaction():
            pass

    def require_writer(self) -> None:
        if not self.writer:
            raise SpoolError(f"{self.state.path}: opened to read beside the daemon, not to write")

    def check_present(self) -> None:
        """Raise ``SpoolGone`` if the files were deleted behind the daemon's back (SQLite and
        the kernel would go on writing to the deleted files, losing it all at the close). The
        daemon's only: a tool beside it (``backfill`` keeping a dead letter) opened no file."""
        if self.writer and not (self.state.present() and self.log.present()):
            raise SpoolGone(f"{self.state.path}: the spool's files were deleted while open")

    def commit(
        self,
        new: Sequence[tuple[StoredTelegram, Collection[str]]] = (),
        acks: Sequence[tuple[str, int]] = (),
        protect: Collection[int] = (),
        *,
        encoded: Sequence[Encoded] = (),
        counted: Mapping[str, Mapping[str, int]] | None = None,
    ) -> dict[str, list[int]]:
        """Append new telegrams (for the sinks named) and record acknowledged ones.

        ``encoded`` are new telegrams the caller already encoded (a retried batch is not
        encoded again); ``counted`` adds to the counters (``{"dropped": {sink: n}}``). Returns,
        per sink, the telegrams (seq) dropped to keep within ``max_bytes``; those in ``protect``
        (being sent right now) are spared, so every dropped one is really lost.
        """
        dropped: dict[str, list[int]] = {}
        if not new and not acks and not encoded and not counted:
            return dropped
        self.require_writer()
        self.check_present()
        records = [
            (t.seq, encode(t.seq, t.received_at, sorted(sinks), t.telegram), sinks)
            for t, sinks in new
            if t.seq > self.log.last_seq
        ]
        records += [r for r in encoded if r[0] > self.log.last_seq]
        records.sort(key=lambda r: r[0])
        mark = self.log.mark()
        summaries = self.summaries.snapshot()
        kept = self.cap.trim_batch(records, protect, dropped)
        self._wait_for_room(sum(len(record) for _, record, _ in kept))
        try:
            sealed = self.log.append([(seq, record) for seq, record, _ in kept])
        except OSError as exc:
            self.full = exc.errno == errno.ENOSPC
            raise
        self.fsyncs.appended(bool(kept))
        for segment in sealed:
            self.summaries.seal(segment)
        self.fsyncs.directory_changed |= bool(sealed)
        for seq, _, sinks in kept:
            self.summaries.add(self.log.segment_of(seq).first_seq, seq, sinks)
        cursors = self.cursors.snapshot()
        try:
            changed = {sink for sink, seq in acks if self.cursors.mark_done(sink, seq)}
            for sink in changed:
                self.cursors.advance(sink)
            lost: dict[str, int] = {}
            self.cap.apply(protect, dropped, lost, changed)
            finished = self.cursors.finished()
            with self.state.transaction() as db:
                self.cursors.save(db, changed)
                self.summaries.save(db, finished)
                self.state.add_counters("dropped", {s: len(q) for s, q in dropped.items()})
                self.state.add_counters("lost", lost)
                for name, amounts in (counted or {}).items():
                    self.state.add_counters(name, amounts)
        except BaseException as exc:
            self.cursors.restore(cursors)
            # Nothing of this commit may stay: a retry names the sinks still waiting then.
            self.log.rollback(mark)
            self.summaries.restore(summaries)
            self.full = getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL"
            raise
        self.full = False
        self.damage.noted.update(lost)
        self.damage.noted.update((counted or {}).get("lost", {}))
        self.summaries.unsaved.clear()
        self._remove(finished)
        self.repair()
        try:
            self.fsyncs.sync()
        except OSError:
            if self.strict:
                raise  # not on the card: the caller keeps the batch; a retry appends nothing
            # Committed all the same (the queue must not take it for a failed commit): the
            # fsync is retried by ``sync`` (the flusher) and at close.
        return dropped

    def _remove(self, finished: Sequence[Segment]) -> None:
        """Delete finished segment files (after SQLite forgot them: a crash keeps, never loses)."""
        for segment in finished:
            try:
                self.log.remove(segment)
            except OSError:
                continue  # still finished: the next commit (or open) deletes it
            self.summaries.forget(segment.first_seq)
            self.fsyncs.directory_changed = True
        if finished:
            self.cursors.forget_hints()

    def forget_finished(self) -> None:
        """Delete what every sink is done with (after a crash, a purge, or a repair)."""
        changed = [sink for sink, cursor in self.cursors.by_sink.items() if cursor.done]
        for sink in changed:
            self.cursors.advance(sink)
        finished = self.cursors.finished()
        if finished or changed or self.summaries.unsaved:
            with self.state.transaction() as db:
                self.cursors.save(db, changed)
                self.summaries.save(db, finished)
            self.summaries.unsaved.clear()
            self._remove(finished)

    def repair(self) -> None:
        """Salvage the segments a read found damaged (the daemon only; the tools just skip)."""
        if not self.writer or not self.log.damaged:
            return
        try:
            for first in sorted(self.log.damaged):
                segment = self.log.find(first)
                if segment is None:
                    self.log.damaged.discard(first)
                else:
                    self.damage.repair(segment)
            self.forget_finished()
        except (OSError, sqlite3.Error) as exc:
            # Kept as it is (what is readable stays readable); tried again at the next read,
            # said once (a full disk would otherwise make it a line per read).
            if not self._repair_failing:
                self._logger.warning("cannot repair a damaged spool file yet", error=str(exc))
            self._repair_failing = True
        else:
            self._repair_failing = False

    def dead_letter(
        self,
        sink: str,
        telegram: StoredTelegram,
        *,
        status: int | None,
        body: str,
        reason: str,
        at: float | None = None,
        spooled: bool = False,
    ) -> None:
        """Keep a telegram the server will never accept, with its answer; a ``spooled`` one is
        done for ``sink`` in the same transaction."""
        self.check_present()
        saved = self.cursors.snapshot()
        finished: list[Segment] = []
        try:
            changed = set()
            if spooled:
                self.require_writer()
                # Not yet in the log (its commit failed): nothing to mark; a retry will spool it
                # without this sink.
                if telegram.seq <= self.log.last_seq and self.cursors.mark_done(sink, telegram.seq):
                    changed.add(sink)
                    self.cursors.advance(sink)
                    finished = self.cursors.finished()
            with self.state.transaction() as db:
                self.letters.add(db, sink, telegram, status=status, body=body, reason=reason, at=at)
                self.cursors.save(db, changed)
                self.summaries.save(db, finished)
        except BaseException:
            self.cursors.restore(saved)
            raise
        self.summaries.unsaved.clear()
        self._remove(finished)
        self.repair()

    def purge(self, sink: str | None, *, backlog: bool, dead_letters: bool) -> tuple[int, int]:
        """Delete a sink's (or every sink's) backlog and/or dead letters; returns both counts."""
        queued = gone = 0
        finished: list[Segment] = []
        if backlog:
            self.require_writer()
            backlogs = self.reads.backlogs()
        saved = self.cursors.snapshot()
        try:
            with self.state.transaction() as db:
                if backlog:
                    targets = [sink] if sink is not None else sorted(backlogs)
                    if sink is None and (sealed := self.log.seal()) is not None:
                        self.summaries.seal(sealed)
                    for name in targets:
                        queued += backlogs[name].count if name in backlogs else 0
                        cursor = self.cursors.get(name)
                        cursor.move_past(self.log.last_seq)
                        cursor.done, cursor.spared = set(), set()
                        cursor.resume = cursor.page_end = None
                    finished = self.cursors.finished()
                    self.cursors.save(db, targets)
                    self.summaries.save(db, finished)
                gone = self.letters.purge(db, sink, backlog=backlog, letters=dead_letters)
        except BaseException:
            self.cursors.restore(saved)
            raise
        self.summaries.unsaved.clear()
        self._remove(finished)
        self.fsyncs.sync(force=True)
        return queued, gone
