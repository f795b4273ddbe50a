"""The durable spool: undelivered telegrams, stored once for all sinks, and what each sink needs.

Two parts, each where it writes least. The telegrams go to append-only segment files
(``segments.py``): spooling an outage writes little more than the telegrams themselves. The
small state beside them is in SQLite: per sink a cursor (every spooled telegram up to it is done
for that sink) and the few done out of order above it, a summary per full segment, dead letters
with their answers, requeued telegrams and counters. A segment file is deleted once every sink is
done with all of it.

Only what a sink has not confirmed within ``flush_interval`` is spooled (or everything first, in
strict durability), so a healthy setup writes nothing. Each commit appends with one ``write``:
the telegrams survive a crash or SIGKILL of the daemon at once; they reach the card itself at the
next fsync, every ``sync_interval`` (30 s) in batched durability, or before the commit returns
in strict durability. A torn write loses at most the records after the tear, never the file. The
spool is bounded: past ``max_bytes`` of segment files the oldest telegrams are dropped, and
counted per sink. One daemon owns a spool (a lock); the ``spool`` tools read beside it. All
methods block; the queue calls them from one worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dsmr_logger.delivery.segments import Segment, SegmentLog, encode, read_entries

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
    sink TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS done (
    sink TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spared (
    sink TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments (
    first_seq INTEGER NOT NULL,
    sink TEXT NOT NULL,
    records INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (first_seq, sink)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    sink TEXT NOT NULL,
    telegram_id INTEGER NOT NULL,
    received_at REAL NOT NULL,
    data BLOB NOT NULL,
    status INTEGER,
    body TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS requeued (
    id INTEGER PRIMARY KEY,
    sink TEXT NOT NULL,
    received_at REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    sink TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (sink, name)
) WITHOUT ROWID;
"""

SCHEMA_VERSION = 2
"""1: telegrams as SQLite rows (converted at the daemon's first start); 2: segment files."""
SEGMENT_BYTES = 1 << 20
"""A full segment: about 1,300 telegrams, 22 minutes of a DSMR 5 meter's outage."""
SYNC_INTERVAL = 30.0


def telegram_dir(path: Path) -> Path:
    """Where a spool's segment files live: beside the SQLite file, named after it."""
    return path.with_name(path.name + "-telegrams")


@dataclass(frozen=True, slots=True)
class StoredTelegram:
    seq: int
    telegram: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    sink: str
    seq: int
    received_at: float
    telegram: bytes
    status: int | None
    body: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Backlog:
    count: int
    oldest_received_at: float | None


class SpoolError(Exception):
    """The spool cannot be used (unreadable, not a spool, newer schema, owned by another)."""


@dataclass(slots=True)
class _Cursor:
    """Where a sink stands: every spooled telegram up to ``seq`` is done but ``spared``, and
    ``done`` above it."""

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


Summary = dict[str, tuple[int, int]]
"""Per sink: how many of a segment's records it was sent, and the last one's seq."""


class Spool:
    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        strict: bool = False,
        sync_interval: float = SYNC_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.strict = strict
        self.sync_interval = sync_interval
        self._clock = clock
        self.log = SegmentLog(
            telegram_dir(path), segment_bytes=max(1, min(SEGMENT_BYTES, max_bytes // 16))
        )
        self._db: sqlite3.Connection | None = None
        self._writer = False
        self._lock_fd: int | None = None
        self._cursors: dict[str, _Cursor] = {}
        self._summaries: dict[int, Summary] = {}
        self._unsaved: set[int] = set()
        """Full segments whose summary is not in SQLite yet."""
        self._unsynced = False
        self._directory_changed = False
        self._last_sync = 0.0
        self._seen_version: int | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def open(self, *, shared: bool = False) -> None:
        """Open (a daemon, ``shared=False``: creating, converting and locking it) or read beside
        a running daemon (``shared=True``: the tools; telegrams are only read)."""
        try:
            if not shared:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db = db
            db.execute("PRAGMA busy_timeout = 10000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {'FULL' if self.strict else 'NORMAL'}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SpoolError(
                    f"{self.path}: written by a newer dsmr-logger (schema {version}); upgrade"
                )
            if shared and version < SCHEMA_VERSION and self._has_table("telegrams"):
                raise SpoolError(
                    f"{self.path}: written by an older dsmr-logger; start the daemon once to "
                    "convert it"
                )
            if not shared:
                self._lock()
            db.executescript(_SCHEMA)
            self._writer = not shared
            self.log.open(writer=not shared, first_seq=self._first_seq())
            self._load()
            if not shared:
                self._convert_rows()
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._forget_finished()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise SpoolError(f"{self.path}: {exc}") from exc
        except OSError as exc:
            self.close()
            raise SpoolError(f"{self.path}: {exc.strerror or exc}") from exc
        except SpoolError:
            self.close()
            raise

    def _lock(self) -> None:
        directory = self.log.directory
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"{self.path}: in use by another dsmr-logger daemon (stop it first)"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._writer and self._db is not None:
            with contextlib.suppress(OSError):
                self._sync(force=True)
        self.log.close()
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._writer = False

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    @property
    def stored_bytes(self) -> int:
        """Bytes of segment files: what the size cap compares with ``max_bytes``."""
        return self.log.total_bytes

    def _has_table(self, name: str) -> bool:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self.db.execute(query, (name,)).fetchone() is not None

    def _recorded_seq(self) -> int:
        """The highest seq SQLite knows of (a new log must number above it)."""
        parts = [
            "SELECT MAX(telegram_id) AS m FROM dead_letters",
            "SELECT MAX(seq) FROM cursors",
            "SELECT MAX(seq) FROM done",
            "SELECT MAX(last_seq) FROM segments",
        ]
        if self._has_table("telegrams"):
            parts.append("SELECT MAX(id) FROM telegrams")
        row = self.db.execute(f"SELECT MAX(m) FROM ({' UNION ALL '.join(parts)})")
        return row.fetchone()[0] or 0

    def _first_seq(self) -> int:
        """What a new log's first segment is named: above every seq SQLite knows, or, when
        schema-1 rows are still to be converted, the oldest of them (a segment's name must not
        exceed the seqs in it)."""
        first = self._recorded_seq() + 1
        if self._has_table("telegrams"):
            oldest = self.db.execute("SELECT MIN(id) FROM telegrams").fetchone()[0]
            if oldest is not None:
                first = min(first, oldest)
        return first

    def _load(self) -> None:
        db = self.db
        self._cursors = {}
        for sink, seq in db.execute("SELECT sink, seq FROM cursors"):
            self._cursors[sink] = _Cursor(seq)
        for sink, seq in db.execute("SELECT sink, seq FROM done ORDER BY sink, seq"):
            self._cursor(sink).done.add(seq)
        for sink, seq in db.execute("SELECT sink, seq FROM spared"):
            self._cursor(sink).spared.add(seq)
        self._summaries = {}
        for first, sink, records, last in db.execute("SELECT * FROM segments"):
            self._summaries.setdefault(first, {})[sink] = (records, last)
        present = {s.first_seq for s in self.log.segments}
        for segment in self.log.segments[:-1]:
            if segment.first_seq not in self._summaries:
                self._summaries[segment.first_seq] = self._summarize(segment)
                if self._writer:
                    self._unsaved.add(segment.first_seq)
        if self.log.segments:
            active = self.log.active
            self._summaries[active.first_seq] = self._summarize(active)
        for first in set(self._summaries) - present:
            del self._summaries[first]

    def _summarize(self, segment: Segment) -> Summary:
        summary: Summary = {}
        end = None
        for entry in read_entries(segment):
            end = entry.end
            for sink in entry.sinks:
                records, _ = summary.get(sink, (0, 0))
                summary[sink] = (records + 1, entry.seq)
        if end is not None and end < segment.size and segment is not self.log.active:
            self.log.damaged.append((segment.path, end))
        return summary

    def _cursor(self, sink: str) -> _Cursor:
        cursor = self._cursors.get(sink)
        if cursor is None:
            cursor = self._cursors[sink] = _Cursor()
        return cursor

    def _convert_rows(self) -> None:
        """A spool written by schema 1 kept telegrams as rows: move them to the log, oldest first.

        Safe to interrupt: rows are deleted only after the log holds them, and a rerun skips
        what it already appended.
        """
        if not self._has_table("telegrams"):
            return
        rows = self.db.execute(
            "SELECT t.id, t.received_at, t.data, group_concat(p.sink, char(10)) "
            "FROM telegrams t JOIN pending p ON p.telegram_id = t.id GROUP BY t.id ORDER BY t.id"
        )
        batch: list[tuple[StoredTelegram, list[str]]] = []
        for seq, received_at, data, sinks in rows:
            batch.append((StoredTelegram(seq, bytes(data), received_at), sorted(sinks.split("\n"))))
            if len(batch) >= 1000:
                self.commit(batch)
                batch = []
        if batch:
            self.commit(batch)
        with self._transaction() as db:
            db.execute("DROP TABLE IF EXISTS pending")
            db.execute("DROP TABLE telegrams")

    # --- what the daemon needs at start -----------------------------------------------------

    def last_seq(self) -> int:
        return max(self.log.last_seq, self._recorded_seq())

    def backlog_upto(self, sink: str) -> int:
        """The newest spooled telegram; ``page`` skips those not for ``sink``."""
        return self.log.last_seq

    def backlogs(self) -> dict[str, Backlog]:
        """Each sink's backlog: its size and when its head was read.

        Counted from the segments' summaries, reading only the segment each cursor is in, so a
        start never reads the whole spool.
        """
        sinks = {sink for summary in self._summaries.values() for sink in summary}
        result = {}
        for sink in sorted(sinks):
            cursor = self._cursor(sink)
            count = len(cursor.spared)
            for segment in self.log.segments:
                records, last = self._summaries.get(segment.first_seq, {}).get(sink, (0, 0))
                if last <= cursor.seq:
                    continue
                if segment.first_seq > cursor.seq:
                    count += records - sum(
                        1 for seq in cursor.done if segment.first_seq <= seq <= last
                    )
                else:
                    count += sum(
                        1
                        for e in read_entries(segment)
                        if sink in e.sinks and e.seq > cursor.seq and e.seq not in cursor.done
                    )
            if count > 0:
                after = min(cursor.spared) - 1 if cursor.spared else cursor.seq
                resume = None if cursor.spared else cursor.resume
                head = next(self._pending(sink, after, resume), None)  # None: a damaged file
                result[sink] = Backlog(count, head.received_at if head else None)
        return result

    def _pending(
        self, sink: str, after: int, resume: tuple[int, int] | None
    ) -> Iterator[StoredTelegram]:
        cursor = self._cursor(sink)
        for entry in self.log.entries_after(after, resume, self._without(sink, after)):
            if sink in entry.sinks and cursor.needs(entry.seq):
                yield StoredTelegram(entry.seq, entry.telegram, entry.received_at)

    def _without(self, sink: str, after: int) -> Callable[[Segment], bool]:
        """Segments with no record for ``sink`` above ``after`` (by their summaries)."""

        def skip(segment: Segment) -> bool:
            summary = self._summaries.get(segment.first_seq)
            if summary is None or segment is self.log.segments[-1]:
                return False  # unknown, or still growing (a reader beside the daemon)
            return summary.get(sink, (0, 0))[1] <= after

        return skip

    # --- the write path ---------------------------------------------------------------------

    def commit(
        self,
        new: Sequence[tuple[StoredTelegram, Collection[str]]] = (),
        acks: Sequence[tuple[str, int]] = (),
        protect: Collection[int] = (),
    ) -> dict[str, list[int]]:
        """Append new telegrams (for the sinks named) and record acknowledged ones.

        Returns, per sink, the telegrams (seq) dropped to keep within ``max_bytes``; those in
        ``protect`` (being sent right now) are spared, so every dropped one is really lost. On
        an error nothing changed that a retry of the same call would not redo correctly.
        """
        dropped: dict[str, list[int]] = {}
        if not new and not acks:
            return dropped
        self._require_writer()
        records = [
            (t.seq, encode(t.seq, t.received_at, sorted(sinks), t.telegram), sinks)
            for t, sinks in new
            if t.seq > self.log.last_seq
        ]
        mark = self.log.mark()
        summaries = {first: dict(summary) for first, summary in self._summaries.items()}
        unsaved = set(self._unsaved)
        incoming = sum(len(record) for _, record, _ in records)
        kept = []
        for seq, record, sinks in records:  # oldest first: a batch larger than the whole spool
            if incoming > self.max_bytes and seq not in protect:
                incoming -= len(record)
                for sink in sinks:
                    dropped.setdefault(sink, []).append(seq)
            else:
                kept.append((seq, record, sinks))
        sealed = self.log.append([(seq, record) for seq, record, _ in kept])
        if kept:
            self._unsynced = True
        self._unsaved.update(s.first_seq for s in sealed)
        self._directory_changed |= bool(sealed)
        for seq, _, sinks in kept:
            summary = self._summaries.setdefault(self.log.segment_of(seq).first_seq, {})
            for sink in sinks:
                summary[sink] = (summary.get(sink, (0, 0))[0] + 1, seq)
        saved = self._snapshot()
        try:
            changed = {sink for sink, seq in acks if self._mark_done(sink, seq)}
            for sink in changed:
                self._advance(sink)
            self._cap(protect, dropped, changed, self._finished())
            finished = self._finished()
            with self._transaction():
                self._save(changed, finished)
                for sink, seqs in dropped.items():
                    self._count_dropped(sink, len(seqs))
        except BaseException:
            self._cursors = saved
            # Nothing of this commit may stay: a retry names the sinks still waiting then.
            self.log.rollback(mark)
            self._summaries, self._unsaved = summaries, unsaved
            raise
        self._remove(finished)
        try:
            self._sync()
        except OSError:
            if self.strict:
                raise  # not on the card: the caller keeps the batch; a retry appends nothing
            # Committed all the same (the queue must not take it for a failed commit): the
            # fsync is retried by ``sync`` (the flusher) and at close.
        return dropped

    def _require_writer(self) -> None:
        if not self._writer:
            raise SpoolError(f"{self.path}: opened to read beside the daemon, not to write")

    def _snapshot(self) -> dict[str, _Cursor]:
        return {
            sink: _Cursor(c.seq, set(c.done), set(c.spared), c.resume, c.page_end)
            for sink, c in self._cursors.items()
        }

    def _mark_done(self, sink: str, seq: int) -> bool:
        cursor = self._cursor(sink)
        if seq in cursor.spared:
            cursor.spared.discard(seq)
            return True
        if not cursor.needs(seq):
            return False
        cursor.done.add(seq)
        return True

    def _advance(self, sink: str) -> None:
        """Move the cursor over what is done (and what was never for this sink)."""
        cursor = self._cursor(sink)
        if not cursor.done:
            return
        skip = self._without(sink, cursor.seq)
        for entry in self.log.entries_after(cursor.seq, cursor.resume, skip):
            if sink in entry.sinks:
                if entry.seq not in cursor.done:
                    break
                cursor.done.discard(entry.seq)
            cursor.seq = entry.seq
            cursor.resume = (entry.segment, entry.end)
            if not cursor.done:
                break
        cursor.done = {seq for seq in cursor.done if seq > cursor.seq}

    def _cap(
        self,
        protect: Collection[int],
        dropped: dict[str, list[int]],
        changed: set[str],
        finished: Sequence[Segment],
    ) -> None:
        """Drop the oldest telegrams (whole segments) while the files exceed ``max_bytes``.

        What is being sent (``protect``) is spared, and its segment kept; every cursor moves
        past each segment gone through, so the dropped ones need no record of their own.
        """
        excess = self.log.total_bytes - self.max_bytes - sum(s.size for s in finished)
        for segment in list(self.log.segments[:-1]):
            if excess <= 0:
                break
            if segment in finished:
                continue
            spared = False
            for entry in read_entries(segment):
                for sink in entry.sinks:
                    cursor = self._cursor(sink)
                    if not cursor.needs(entry.seq):
                        continue
                    if entry.seq in protect:
                        cursor.spared.add(entry.seq)
                        spared = True
                    else:
                        cursor.spared.discard(entry.seq)  # no longer being sent: it goes too
                        dropped.setdefault(sink, []).append(entry.seq)
            for sink, (_, last) in self._summaries.get(segment.first_seq, {}).items():
                cursor = self._cursor(sink)
                if last > cursor.seq:
                    cursor.seq, cursor.resume, cursor.page_end = last, None, None
                cursor.done = {seq for seq in cursor.done if seq > cursor.seq}
                changed.add(sink)
            if not spared:
                excess -= segment.size

    def _finished(self) -> list[Segment]:
        """Full segments every sink is done with."""
        return [
            segment
            for segment in self.log.segments[:-1]
            if all(
                self._done_with(self._cursor(sink), segment.first_seq, last)
                for sink, (_, last) in self._summaries.get(segment.first_seq, {}).items()
            )
        ]

    @staticmethod
    def _done_with(cursor: _Cursor, first: int, last: int) -> bool:
        return cursor.seq >= last and not any(first <= seq <= last for seq in cursor.spared)

    def _save(self, changed: Iterable[str], finished: Sequence[Segment]) -> None:
        """Write cursors, out-of-order dones and segment summaries (inside a transaction)."""
        db = self.db
        for sink in changed:
            cursor = self._cursor(sink)
            db.execute(
                "INSERT INTO cursors (sink, seq) VALUES (?, ?) "
                "ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq",
                (sink, cursor.seq),
            )
            for table, seqs in (("done", cursor.done), ("spared", cursor.spared)):
                db.execute(f"DELETE FROM {table} WHERE sink = ?", (sink,))
                db.executemany(
                    f"INSERT INTO {table} (sink, seq) VALUES (?, ?)",
                    [(sink, seq) for seq in sorted(seqs)],
                )
        for first in sorted(self._unsaved):
            db.executemany(
                "INSERT OR REPLACE INTO segments (first_seq, sink, records, last_seq) "
                "VALUES (?, ?, ?, ?)",
                [(first, s, n, last) for s, (n, last) in self._summaries.get(first, {}).items()],
            )
        db.executemany(
            "DELETE FROM segments WHERE first_seq = ?", [(s.first_seq,) for s in finished]
        )

    def _remove(self, finished: Sequence[Segment]) -> None:
        """Delete finished segment files (after SQLite forgot them: a crash keeps, never loses)."""
        self._unsaved.clear()
        for segment in finished:
            try:
                self.log.remove(segment)
            except OSError:
                continue  # still finished: the next commit (or open) deletes it
            self._summaries.pop(segment.first_seq, None)
            self._directory_changed = True
        if finished:
            for cursor in self._cursors.values():
                cursor.page_end = None

    def _forget_finished(self) -> None:
        """At open: delete what a crash left behind after its cursors were saved."""
        finished = self._finished()
        if finished or self._unsaved:
            with self._transaction():
                self._save((), finished)
            self._remove(finished)

    def sync_due(self) -> bool:
        """Appended telegrams have waited ``sync_interval`` for an fsync (the flusher asks, so
        they reach the card even when no further commit comes)."""
        return self._unsynced and self._clock() - self._last_sync >= self.sync_interval

    def sync(self) -> None:
        self._sync(force=True)

    def _sync(self, *, force: bool = False) -> None:
        """fsync what was appended: every commit when strict, else every ``sync_interval``."""
        if not (self._unsynced or self._directory_changed):
            return
        now = self._clock()
        if force or self.strict or now - self._last_sync >= self.sync_interval:
            self.log.sync(directory=self._directory_changed)
            self._unsynced = self._directory_changed = False
            self._last_sync = now

    def _count_dropped(self, sink: str, amount: int) -> None:
        """Remember, for ``spool list``, how many telegrams a sink lost to the size cap."""
        self.db.execute(
            "INSERT INTO counters (sink, name, value) VALUES (?, 'dropped', ?) "
            "ON CONFLICT (sink, name) DO UPDATE SET value = value + excluded.value",
            (sink, amount),
        )

    # --- reading the backlog ----------------------------------------------------------------

    def page(self, sink: str, after: int, upto: int, limit: int) -> list[StoredTelegram]:
        """Up to ``limit`` telegrams ``sink`` still needs with ``after < seq <= upto``."""
        cursor = self._cursor(sink)
        if not any(seq > after for seq in cursor.spared):
            after = max(after, cursor.seq)
        resume = cursor.resume if after == cursor.seq else None
        if cursor.page_end is not None and cursor.page_end[0] == after:
            resume = cursor.page_end[1:]
        page: list[StoredTelegram] = []
        for entry in self.log.entries_after(after, resume, self._without(sink, after)):
            if entry.seq > upto:
                break
            if sink in entry.sinks and cursor.needs(entry.seq):
                page.append(StoredTelegram(entry.seq, entry.telegram, entry.received_at))
                if len(page) >= limit:
                    cursor.page_end = (entry.seq, entry.segment, entry.end)
                    break
        return page

    # --- dead letters -----------------------------------------------------------------------

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
        saved = self._snapshot()
        finished: list[Segment] = []
        try:
            changed = set()
            if spooled:
                self._require_writer()
                # Not yet in the log (its commit failed): nothing to mark; a retry will spool it
                # without this sink.
                if telegram.seq <= self.log.last_seq and self._mark_done(sink, telegram.seq):
                    changed.add(sink)
                    self._advance(sink)
                    finished = self._finished()
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO dead_letters (sink, telegram_id, received_at, data, status, "
                    "body, reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        sink,
                        telegram.seq,
                        telegram.received_at,
                        telegram.telegram,
                        status,
                        body,
                        reason,
                        time.time() if at is None else at,
                    ),
                )
                self._save(changed, finished)
        except BaseException:
            self._cursors = saved
            raise
        self._remove(finished)

    def dead_letters(self, sink: str | None = None) -> list[DeadLetter]:
        query = (
            "SELECT id, sink, telegram_id, received_at, data, status, body, reason, at "
            "FROM dead_letters"
        )
        args: tuple[str, ...] = ()
        if sink is not None:
            query += " WHERE sink = ?"
            args = (sink,)
        rows = self.db.execute(query + " ORDER BY id", args)
        return [
            DeadLetter(i, s, seq, ra, bytes(data), status, body, reason, at)
            for i, s, seq, ra, data, status, body, reason, at in rows
        ]

    def requeue(self, ids: Collection[int] | None = None, sink: str | None = None) -> int:
        """Hand dead letters back for another try (after fixing the server); returns how many.

        They wait in ``requeued`` until the daemon adopts them (within seconds if it runs, else
        at its next start), so this is safe while the daemon holds the spool open.
        """
        letters = [d for d in self.dead_letters(sink) if ids is None or d.id in ids]
        if not letters:
            return 0
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO requeued (sink, received_at, data) VALUES (?, ?, ?)",
                [(d.sink, d.received_at, d.telegram) for d in letters],
            )
            db.executemany("DELETE FROM dead_letters WHERE id = ?", [(d.id,) for d in letters])
        return len(letters)

    def requeued(self, sinks: Collection[str]) -> list[tuple[int, str, StoredTelegram]]:
        """Requeued telegrams waiting for these sinks, oldest first: (row id, sink, telegram).

        The daemon calls it periodically; unless another process (``spool requeue``) committed
        since the last call, it answers from ``PRAGMA data_version`` without touching the tables.
        """
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._seen_version:
            return []
        self._seen_version = version
        marks = ",".join("?" * len(sinks))
        rows = self.db.execute(
            f"SELECT id, sink, received_at, data FROM requeued WHERE sink IN ({marks}) "
            "ORDER BY received_at, id",
            tuple(sinks),
        )
        return [(i, sink, StoredTelegram(0, bytes(data), at)) for i, sink, at, data in rows]

    def forget_requeued(self, ids: Collection[int]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM requeued WHERE id = ?", [(i,) for i in ids])

    def requeued_count(self) -> int:
        count: int = self.db.execute("SELECT COUNT(*) FROM requeued").fetchone()[0]
        return count

    def purge(self, sink: str | None, *, backlog: bool, dead_letters: bool) -> tuple[int, int]:
        """Delete a sink's (or every sink's) backlog and/or dead letters; returns both counts."""
        where, args = ("WHERE sink = ?", (sink,)) if sink is not None else ("", ())
        queued = gone = 0
        finished: list[Segment] = []
        saved = self._snapshot()
        try:
            with self._transaction() as db:
                if backlog:
                    self._require_writer()
                    backlogs = self.backlogs()
                    targets = [sink] if sink is not None else sorted(backlogs)
                    if sink is None and self.log.seal() is not None:
                        self._unsaved.add(self.log.segments[-2].first_seq)
                    for name in targets:
                        queued += backlogs[name].count if name in backlogs else 0
                        cursor = self._cursor(name)
                        cursor.seq = max(cursor.seq, self.log.last_seq)
                        cursor.done, cursor.spared = set(), set()
                        cursor.resume = cursor.page_end = None
                    finished = self._finished()
                    self._save(targets, finished)
                    db.execute(f"DELETE FROM requeued {where}", args)
                if dead_letters:
                    gone = db.execute(f"DELETE FROM dead_letters {where}", args).rowcount
        except BaseException:
            self._cursors = saved
            raise
        self._remove(finished)
        self._sync(force=True)
        return queued, gone

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write to SQLite; on failure nothing in it changed."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def counters(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for sink, name, value in self.db.execute("SELECT sink, name, value FROM counters"):
            result.setdefault(sink, {})[name] = value
        return result
