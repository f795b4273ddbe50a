"""The spool's earlier formats, frozen here to test their conversion: schema 1 (telegrams as
SQLite rows) and schema 2 (segment files of format-1 records)."""

from __future__ import annotations

import sqlite3
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA_1 = """
CREATE TABLE telegrams (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, data BLOB NOT NULL);
CREATE TABLE pending (sink TEXT NOT NULL, telegram_id INTEGER NOT NULL,
    PRIMARY KEY (sink, telegram_id)) WITHOUT ROWID;
CREATE INDEX pending_by_telegram ON pending (telegram_id);
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, sink TEXT NOT NULL,
    telegram_id INTEGER NOT NULL, received_at REAL NOT NULL, data BLOB NOT NULL, status INTEGER,
    body TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE requeued (id INTEGER PRIMARY KEY, sink TEXT NOT NULL, received_at REAL NOT NULL,
    data BLOB NOT NULL);
CREATE TABLE counters (sink TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (sink, name)) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


# --- schema 2: segment files of format-1 records (newline-joined sink names) --------------------

SCHEMA_2 = """
CREATE TABLE cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE done (sink TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (sink, seq))
    WITHOUT ROWID;
CREATE TABLE spared (sink TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (sink, seq))
    WITHOUT ROWID;
CREATE TABLE segments (first_seq INTEGER NOT NULL, sink TEXT NOT NULL, records INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, PRIMARY KEY (first_seq, sink)) WITHOUT ROWID;
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, sink TEXT NOT NULL,
    telegram_id INTEGER NOT NULL, received_at REAL NOT NULL, data BLOB NOT NULL, status INTEGER,
    body TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE requeued (id INTEGER PRIMARY KEY, sink TEXT NOT NULL, received_at REAL NOT NULL,
    data BLOB NOT NULL);
CREATE TABLE counters (sink TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (sink, name)) WITHOUT ROWID;
PRAGMA journal_mode = WAL;
PRAGMA user_version = 2;
"""
MAGIC_1 = b"DSMRLOG1"
_HEADER_1 = struct.Struct("<IIqdH")


def encode_1(seq: int, received_at: float, sinks: Sequence[str], telegram: bytes) -> bytes:
    """A format-1 record, as the daemon wrote it before format 2 (``crc | length | seq |
    received_at | names length | names joined by newlines | telegram``)."""
    names = "\n".join(sinks).encode()
    rest = _HEADER_1.pack(0, len(names) + len(telegram), seq, received_at, len(names))[4:]
    body = rest + names + telegram
    return struct.pack("<I", zlib.crc32(body)) + body


def write_schema_2(
    path: Path,
    telegrams: Sequence[tuple[Any, Sequence[str]]],
    *,
    segment_records: int,
    cursors: Mapping[str, int] | None = None,
    done: Sequence[tuple[str, int]] = (),
) -> None:
    """A spool as the daemon before format 2 left it: ``telegrams`` (``StoredTelegram``,
    sinks) in segment files of ``segment_records`` records each (the last one active, without a
    summary), sealed segments summarised in SQLite, and the cursors and out-of-order
    confirmations given."""
    directory = path.with_name(path.name + "-telegrams")
    directory.mkdir(parents=True)
    (directory / "lock").touch()
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_2)
    chunks = [telegrams[i : i + segment_records] for i in range(0, len(telegrams), segment_records)]
    for index, chunk in enumerate(chunks):
        first = chunk[0][0].seq
        records = [encode_1(t.seq, t.received_at, sinks, t.telegram) for t, sinks in chunk]
        (directory / f"{first:016d}.seg").write_bytes(MAGIC_1 + b"".join(records))
        if index < len(chunks) - 1:
            summary: dict[str, tuple[int, int]] = {}
            for t, sinks in chunk:
                for sink in sinks:
                    summary[sink] = (summary.get(sink, (0, 0))[0] + 1, t.seq)
            db.executemany(
                "INSERT INTO segments VALUES (?, ?, ?, ?)",
                [(first, sink, n, last) for sink, (n, last) in summary.items()],
            )
    db.executemany("INSERT INTO cursors VALUES (?, ?)", list((cursors or {}).items()))
    db.executemany("INSERT INTO done VALUES (?, ?)", list(done))
    db.commit()
    db.close()
