"""The durable spool: undelivered telegrams in one SQLite file, stored once for all sinks.

Only what a sink has not confirmed within ``flush_interval`` is written here (or everything first,
in strict durability), in one transaction per batch, so a healthy setup writes nothing to the SD
card. WAL journaling makes a torn write or a SIGKILL lose at most the uncommitted batch, never the
file. The spool is bounded: past ``max_bytes`` of telegram data the oldest telegrams are dropped,
and counted per sink. All methods are blocking; the queue calls them from one worker thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS telegrams (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    sink TEXT NOT NULL,
    telegram_id INTEGER NOT NULL,
    PRIMARY KEY (sink, telegram_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_by_telegram ON pending (telegram_id);
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

SCHEMA_VERSION = 1


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
    """The spool file cannot be used (unreadable, not a spool, newer schema)."""


class Spool:
    def __init__(self, path: Path, *, max_bytes: int, strict: bool = False) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.strict = strict
        self._db: sqlite3.Connection | None = None
        self._bytes = 0
        self._seen_version: int | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def open(self, *, count_bytes: bool = True) -> None:
        """Open (creating it if need be); ``count_bytes=False`` leaves ``count_bytes()`` to later.

        Counting visits every stored telegram: with a large backlog on an SD card that is
        seconds of reading, which the daemon does after READY instead (before its first commit).
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout = 10000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {'FULL' if self.strict else 'NORMAL'}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SpoolError(
                    f"{self.path}: written by a newer dsmr-logger (schema {version}); upgrade"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"{self.path}: {exc}") from exc
        except OSError as exc:
            raise SpoolError(f"{self.path}: {exc.strerror or exc}") from exc
        self._db = db
        if count_bytes:
            self.count_bytes()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    # --- what the daemon needs at start -----------------------------------------------------

    def last_seq(self) -> int:
        row = self.db.execute(
            "SELECT MAX(m) FROM (SELECT MAX(id) AS m FROM telegrams "
            "UNION ALL SELECT MAX(telegram_id) FROM dead_letters)"
        ).fetchone()
        return row[0] or 0

    def backlog_upto(self, sink: str) -> int:
        row = self.db.execute("SELECT MAX(telegram_id) FROM pending WHERE sink = ?", (sink,))
        return row.fetchone()[0] or 0

    def backlogs(self) -> dict[str, Backlog]:
        """Each sink's backlog: its size and when its head was read (from ``pending`` alone,
        plus one lookup per sink, so a start never reads the whole spool)."""
        db = self.db
        heads = db.execute(
            "SELECT sink, COUNT(*), MIN(telegram_id) FROM pending GROUP BY sink"
        ).fetchall()
        return {
            sink: Backlog(
                count,
                db.execute("SELECT received_at FROM telegrams WHERE id = ?", (head,)).fetchone()[0],
            )
            for sink, count, head in heads
        }

    # --- the write path ---------------------------------------------------------------------

    def commit(
        self,
        new: Sequence[tuple[StoredTelegram, Collection[str]]] = (),
        acks: Sequence[tuple[str, int]] = (),
        protect: Collection[int] = (),
    ) -> dict[str, list[int]]:
        """Store new telegrams (for the sinks named) and drop acknowledged ones, atomically.

        Returns, per sink, the telegrams (seq) dropped to keep within ``max_bytes``; those in
        ``protect`` (being sent right now) are spared, so every dropped one is really lost.
        """
        dropped: dict[str, list[int]] = {}
        if not new and not acks:
            return dropped
        incoming = sum(len(t.telegram) for t, _ in new)
        kept = []
        for telegram, sinks in new:  # oldest first: a batch larger than the whole spool
            if incoming > self.max_bytes and telegram.seq not in protect:
                incoming -= len(telegram.telegram)
                for sink in sinks:
                    dropped.setdefault(sink, []).append(telegram.seq)
            else:
                kept.append((telegram, sinks))
        new = kept
        with self._transaction() as db:
            if acks:
                self._forget(acks)
            excess = self._bytes + incoming - self.max_bytes
            if new and excess > 0:
                for sink, seqs in self._drop_oldest(excess, protect).items():
                    dropped.setdefault(sink, []).extend(seqs)
            if new:
                db.executemany(
                    "INSERT INTO telegrams (id, received_at, data) VALUES (?, ?, ?)",
                    [(t.seq, t.received_at, t.telegram) for t, _ in new],
                )
                db.executemany(
                    "INSERT INTO pending (sink, telegram_id) VALUES (?, ?)",
                    [(sink, t.seq) for t, sinks in new for sink in sinks],
                )
                self._bytes += incoming
            for sink, seqs in dropped.items():
                self._count_dropped(sink, len(seqs))
        return dropped

    def _forget(self, acks: Iterable[tuple[str, int]]) -> None:
        db = self.db
        acks = list(acks)
        db.executemany("DELETE FROM pending WHERE sink = ? AND telegram_id = ?", acks)
        ids = sorted({seq for _, seq in acks})
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            freed = db.execute(
                f"DELETE FROM telegrams WHERE id IN ({marks}) AND NOT EXISTS "
                "(SELECT 1 FROM pending WHERE telegram_id = telegrams.id) "
                "RETURNING length(data)",
                chunk,
            ).fetchall()
            self._bytes -= sum(n for (n,) in freed)

    def _drop_oldest(self, excess: int, protect: Collection[int]) -> dict[str, list[int]]:
        """Delete the oldest telegrams until ``excess`` bytes are freed, sparing ``protect``."""
        db = self.db
        dropped: dict[str, list[int]] = {}
        after = 0
        while excess > 0:
            rows = db.execute(
                "SELECT id, length(data) FROM telegrams WHERE id > ? ORDER BY id LIMIT 256",
                (after,),
            ).fetchall()
            if not rows:
                break
            victims = []
            for seq, size in rows:
                after = seq
                if seq in protect:
                    continue
                victims.append(seq)
                excess -= size
                self._bytes -= size
                if excess <= 0:
                    break
            if not victims:
                continue
            marks = ",".join("?" * len(victims))
            for sink, seq in db.execute(
                f"SELECT sink, telegram_id FROM pending WHERE telegram_id IN ({marks})", victims
            ).fetchall():
                dropped.setdefault(sink, []).append(seq)
            db.execute(f"DELETE FROM pending WHERE telegram_id IN ({marks})", victims)
            db.execute(f"DELETE FROM telegrams WHERE id IN ({marks})", victims)
        return dropped

    def _count_dropped(self, sink: str, amount: int) -> None:
        """Remember, for ``spool list``, how many telegrams a sink lost to the size cap."""
        self.db.execute(
            "INSERT INTO counters (sink, name, value) VALUES (?, 'dropped', ?) "
            "ON CONFLICT (sink, name) DO UPDATE SET value = value + excluded.value",
            (sink, amount),
        )

    # --- reading the backlog ----------------------------------------------------------------

    def page(self, sink: str, after: int, upto: int, limit: int) -> list[StoredTelegram]:
        rows = self.db.execute(
            "SELECT t.id, t.data, t.received_at FROM pending p JOIN telegrams t "
            "ON t.id = p.telegram_id WHERE p.sink = ? AND p.telegram_id > ? "
            "AND p.telegram_id <= ? ORDER BY p.telegram_id LIMIT ?",
            (sink, after, upto, limit),
        )
        return [StoredTelegram(seq, bytes(data), received_at) for seq, data, received_at in rows]

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
    ) -> None:
        """Keep a telegram the server will never accept, with its answer, and unqueue it."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO dead_letters (sink, telegram_id, received_at, data, status, body, "
                "reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
            self._forget([(sink, telegram.seq)])

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
        return self.db.execute("SELECT COUNT(*) FROM requeued").fetchone()[0]

    def purge(self, sink: str | None, *, backlog: bool, dead_letters: bool) -> tuple[int, int]:
        """Delete a sink's (or every sink's) backlog and/or dead letters; returns both counts."""
        where, args = ("WHERE sink = ?", (sink,)) if sink is not None else ("", ())
        with self._transaction() as db:
            queued = gone = 0
            if backlog:
                queued = db.execute(f"DELETE FROM pending {where}", args).rowcount
                db.execute(
                    "DELETE FROM telegrams WHERE NOT EXISTS "
                    "(SELECT 1 FROM pending WHERE telegram_id = telegrams.id)"
                )
                db.execute(f"DELETE FROM requeued {where}", args)
            if dead_letters:
                gone = db.execute(f"DELETE FROM dead_letters {where}", args).rowcount
        self.count_bytes()
        return queued, gone

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write; on failure nothing changed, the byte count included."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self.count_bytes()
            raise

    def count_bytes(self) -> int:
        """Total the stored telegrams' bytes (what the size cap compares with ``max_bytes``)."""
        query = "SELECT COALESCE(SUM(length(data)), 0) FROM telegrams"
        self._bytes = self.db.execute(query).fetchone()[0]
        return self._bytes

    def counters(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for sink, name, value in self.db.execute("SELECT sink, name, value FROM counters"):
            result.setdefault(sink, {})[name] = value
        return result
