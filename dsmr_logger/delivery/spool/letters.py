"""Dead letters: telegrams a server refused for good, kept with its answer; and requeues.

A user lists them (``spool list``), and after fixing the cause hands them back
(``spool requeue``): they wait in ``requeued`` until the daemon adopts them as new telegrams
(within seconds if it runs, else at its next start), so requeueing is safe beside the daemon.

Invariant: a letter leaves ``dead_letters`` in the transaction that puts it in ``requeued``, and
leaves ``requeued`` only after the daemon spooled it again (or every sink was done with it): at
most sent twice, never lost.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass

from dsmr_logger.delivery.spool.state import StateDb


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


class DeadLetters:
    def __init__(self, state: StateDb) -> None:
        self._state = state
        self._seen_version: int | None = None

    def add(
        self,
        db: sqlite3.Connection,
        sink: str,
        telegram: StoredTelegram,
        *,
        status: int | None,
        body: str,
        reason: str,
        at: float | None,
    ) -> None:
        """Keep a refused telegram with its answer (inside the caller's transaction)."""
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

    def all(self, sink: str | None = None) -> list[DeadLetter]:
        query = (
            "SELECT id, sink, telegram_id, received_at, data, status, body, reason, at "
            "FROM dead_letters"
        )
        args: tuple[str, ...] = ()
        if sink is not None:
            query += " WHERE sink = ?"
            args = (sink,)
        rows = self._state.db.execute(query + " ORDER BY id", args)
        return [
            DeadLetter(i, s, seq, ra, bytes(data), status, body, reason, at)
            for i, s, seq, ra, data, status, body, reason, at in rows
        ]

    def requeue(self, ids: Collection[int] | None = None, sink: str | None = None) -> int:
        """Hand dead letters back for another try; returns how many."""
        letters = [d for d in self.all(sink) if ids is None or d.id in ids]
        if not letters:
            return 0
        with self._state.transaction() as db:
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
        db = self._state.db
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._seen_version:
            return []
        self._seen_version = version
        marks = ",".join("?" * len(sinks))
        rows = db.execute(
            f"SELECT id, sink, received_at, data FROM requeued WHERE sink IN ({marks}) "
            "ORDER BY received_at, id",
            tuple(sinks),
        )
        return [(i, sink, StoredTelegram(0, bytes(data), at)) for i, sink, at, data in rows]

    def forget_requeued(self, ids: Collection[int]) -> None:
        with self._state.transaction() as db:
            db.executemany("DELETE FROM requeued WHERE id = ?", [(i,) for i in ids])

    def requeued_count(self) -> int:
        count: int = self._state.db.execute("SELECT COUNT(*) FROM requeued").fetchone()[0]
        return count

    def purge(
        self, db: sqlite3.Connection, sink: str | None, *, backlog: bool, letters: bool
    ) -> int:
        """Delete requeued (with a backlog) and dead letters (inside a transaction); returns how
        many dead letters went."""
        where, args = ("WHERE sink = ?", (sink,)) if sink is not None else ("", ())
        if backlog:
            db.execute(f"DELETE FROM requeued {where}", args)
        if letters:
            gone: int = db.execute(f"DELETE FROM dead_letters {where}", args).rowcount
            return gone
        return 0
