"""The SQLite file beside the segments: its schema, its versions, its lock, and its damage.

SQLite (stdlib, WAL) keeps the small state that changes in place: cursors, segment summaries,
dead letters, counters. One daemon owns a spool (an ``flock`` on a file in the segment
directory); the tools read beside it. Reading must work on a full disk: a WAL database needs its
``-shm`` file, which SQLite cannot create there ("disk I/O error", measured on a full tmpfs), so
a reader falls back to a private, read-only view when no daemon holds the spool.

A damaged file (``PRAGMA quick_check`` fails, a row no longer matches its checksum, or it is
no longer a database while its segment directory says it was a spool) is moved aside, never
deleted, and a new one is started: the segments still hold every telegram with its sinks, so
only dead letters, counters and what was already confirmed (sent again: at least once) are lost,
and the daemon says so. SQLite checks a file's structure, not its content: one flipped bit in a
cursor's seq skipped a sink's whole backlog (100 of 100 telegrams), one in a segment's summary
86, silently. So each row that says what a sink still needs (``CHECKED``) carries a checksum of
its values, written with it and verified when the daemon opens the spool.

Invariant: every change is one transaction (``transaction``): after a crash the state is as
before or after it, never between.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
    sink TEXT PRIMARY KEY, seq INTEGER NOT NULL, crc INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS done (
    sink TEXT NOT NULL, seq INTEGER NOT NULL, crc INTEGER, PRIMARY KEY (sink, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spared (
    sink TEXT NOT NULL, seq INTEGER NOT NULL, crc INTEGER, PRIMARY KEY (sink, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments (
    first_seq INTEGER NOT NULL, sink TEXT NOT NULL, records INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, size INTEGER, crc INTEGER,
    PRIMARY KEY (first_seq, sink)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, sink TEXT NOT NULL, telegram_id INTEGER NOT NULL,
    received_at REAL NOT NULL, data BLOB NOT NULL, status INTEGER, body TEXT NOT NULL,
    reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS requeued (
    id INTEGER PRIMARY KEY, sink TEXT NOT NULL, received_at REAL NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    sink TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL, crc INTEGER,
    PRIMARY KEY (sink, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rewrites (first_seq INTEGER PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS numbering (
    id INTEGER PRIMARY KEY CHECK (id = 1), last_seq INTEGER, crc INTEGER);
"""

CHECKED = {
    "cursors": ("sink", "seq"),
    "done": ("sink", "seq"),
    "spared": ("sink", "seq"),
    "segments": ("first_seq", "sink", "records", "last_seq", "size"),
    "counters": ("sink", "name", "value"),
    "numbering": ("id", "last_seq"),
}
"""The tables whose rows carry a checksum (``crc``) of these columns, in this order."""

SCHEMA_VERSION = 4
"""1: telegrams as SQLite rows; 2: segment files (format 1); 3: format 2 records, sealed
segments' sizes, rewrites of damaged segments; 4: a checksum per state row (``CHECKED``). Older
ones are converted at the daemon's start."""


def row_crc(*values: object) -> int:
    """The checksum of one state row's values (also SQL's ``row_crc``, for upserts)."""
    return zlib.crc32(repr(values).encode())


class SpoolError(Exception):
    """The spool cannot be used (unreadable, not a spool, newer schema, owned by another)."""


class SpoolBusy(SpoolError):
    """Another daemon owns this spool."""


class SpoolUnavailable(SpoolError):
    """The spool cannot be opened now (a full or read-only disk, an I/O error): try again."""


class _Damaged(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` found damage."""


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """Damage (not a full disk, a lock or a permission): the file is no database (any more)."""
    name = getattr(exc, "sqlite_errorname", "")
    return isinstance(exc, _Damaged) or name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def _verify_rows(db: sqlite3.Connection) -> None:
    """Raise ``_Damaged`` if a checked row no longer matches its checksum (text that is no
    longer UTF-8 is read as it is, to fail the check rather than the reading)."""
    db.text_factory = lambda data: data.decode("utf-8", "surrogateescape")
    try:
        for table, columns in CHECKED.items():
            for *values, crc in db.execute(f"SELECT {', '.join(columns)}, crc FROM {table}"):
                if crc != row_crc(*values):
                    raise _Damaged(f"a row of {table} does not match its checksum")
    finally:
        db.text_factory = str


class SpoolLock:
    """An ``flock`` on ``lock`` in the segment directory. Invariant: at most one daemon holds
    it (``take``); a tool only asks whether one does (``held``) and never holds it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def take(self, path: Path) -> None:
        """Hold the lock, or raise ``SpoolBusy`` naming the spool ``path``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(
                f"{path}: in use by another dsmr-logger daemon (stop it first)"
            ) from None
        self._fd = fd

    def held(self) -> bool:
        """A daemon holds it (never this object: a tool asks)."""
        try:
            fd = os.open(self.directory / "lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


READER_ROOM = 1 << 20
"""Free bytes below which a tool reads the spool without letting SQLite create any file."""


def _room(directory: Path) -> bool:
    try:
        fs = os.statvfs(directory)
    except OSError:
        return True
    return fs.f_bavail * fs.f_frsize >= READER_ROOM


class StateDb:
    """The SQLite file: connected as a writer (locked, checked, upgraded) or a reader; every
    change one transaction."""

    def __init__(self, path: Path, lock_dir: Path, *, strict: bool) -> None:
        self.path = path
        self.lock_dir = lock_dir
        self.strict = strict
        self._db: sqlite3.Connection | None = None
        self._lock = SpoolLock(lock_dir)
        self.inode: int | None = None
        self.wal_inode: int | None = None
        """The WAL file SQLite writes to (it exists from the first write on)."""
        self.set_aside: Path | None = None
        """Where a damaged SQLite file was moved at this open."""

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    def open(self, *, writer: bool) -> int:
        """Connect (a writer: lock, check, create or upgrade); returns the schema version found."""
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            was_a_spool = self.lock_dir.is_dir()
            self._lock.take(self.path)
            try:
                return self._connect_writer()
            except sqlite3.DatabaseError as exc:
                if not (was_a_spool and _damaged(exc)):
                    raise
                self._set_aside()
                return self._connect_writer()
        self._connect_reader()
        return self.version()

    def _connect(self, uri: str) -> sqlite3.Connection:
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        db.create_function("row_crc", -1, row_crc, deterministic=True)
        self._db = db
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db

    def _connect_writer(self) -> int:
        self.close_db()
        db = self._connect(f"file:{self.path}?mode=rwc")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {'FULL' if self.strict else 'NORMAL'}")
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise _Damaged("database disk image is malformed")
        version = self.version()
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"{self.path}: written by a newer dsmr-logger (schema {version}); upgrade"
            )
        if version == SCHEMA_VERSION:
            _verify_rows(db)
        if version == 2:
            with contextlib.suppress(sqlite3.OperationalError):  # added by schema 3
                db.execute("ALTER TABLE segments ADD COLUMN size INTEGER")
        db.executescript(SCHEMA)
        if 0 < version < SCHEMA_VERSION:
            self._add_checksums()
        self.inode = self.path.stat().st_ino
        self.wal_inode = None
        return version

    def _add_checksums(self) -> None:
        """An older schema: give every checked row its checksum (rows written since carry one)."""
        with self.transaction() as db:
            for table, columns in CHECKED.items():
                with contextlib.suppress(sqlite3.OperationalError):  # a rerun: already there
                    db.execute(f"ALTER TABLE {table} ADD COLUMN crc INTEGER")
                listed = ", ".join(columns)
                db.execute(f"UPDATE {table} SET crc = row_crc({listed}) WHERE crc IS NULL")

    def _connect_reader(self) -> None:
        """Beside a daemon, or with room on the disk: as SQLite does (``spool requeue`` writes
        through it). On a full disk with no daemon: read only, creating no file, as an immutable
        file when its WAL is empty, else with SQLite's heap-memory WAL index."""
        held = self._lock.held()
        if held or _room(self.path.parent):
            try:
                db = self._connect(f"file:{self.path}?mode=rwc")  # backfill starts one
            except sqlite3.OperationalError:
                self.close_db()
                if held:
                    raise
            else:
                if self.version() in (0, SCHEMA_VERSION):
                    db.executescript(SCHEMA)  # nothing written if they are there
                return
        wal = Path(f"{self.path}-wal")
        if not wal.exists() or wal.stat().st_size == 0:
            self._connect(f"file:{self.path}?mode=ro&immutable=1")
            return
        db = sqlite3.connect(
            f"file:{self.path}?mode=rw", uri=True, isolation_level=None, check_same_thread=False
        )
        self._db = db
        db.execute("PRAGMA locking_mode = EXCLUSIVE")
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()

    def version(self) -> int:
        version: int = self.db.execute("PRAGMA user_version").fetchone()[0]
        return version

    def set_version(self) -> None:
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def has_column(self, table: str, column: str) -> bool:
        return any(row[1] == column for row in self.db.execute(f"PRAGMA table_info({table})"))

    def has_table(self, name: str) -> bool:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self.db.execute(query, (name,)).fetchone() is not None

    def _set_aside(self) -> None:
        """Move a damaged SQLite file (and its WAL) aside; the next connect starts afresh."""
        self.close_db()
        target = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                os.replace(source, Path(f"{target}{suffix}"))
        self.set_aside = target

    def present(self) -> bool:
        """The file and its WAL are still the ones opened (not deleted or replaced behind our
        back). SQLite keeps writing to a deleted WAL, and its content dies with the process:
        a SIGKILL then lost every change since the last checkpoint (170 of 170 dead letters)."""
        try:
            if self.path.stat().st_ino != self.inode:
                return False
            wal = Path(f"{self.path}-wal").stat().st_ino
        except FileNotFoundError as exc:
            # No WAL may only mean nothing was written since the open.
            return exc.filename == f"{self.path}-wal" and self.wal_inode is None
        except OSError:
            return False
        if self.wal_inode is None:
            self.wal_inode = wal
        return wal == self.wal_inode

    def save_remains(self) -> Path | None:
        """Before letting go of files deleted while open, keep what the open connection still
        reads: a deleted WAL's changes go into the database file; a deleted (or replaced)
        database file is copied beside, as a damaged one is moved aside (its dead letters are
        the only copy of those telegrams). Returns where the copy is, if one was made."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            if self.path.stat().st_ino == self.inode:
                return None
        except FileNotFoundError:
            pass
        except (OSError, sqlite3.Error, SpoolError):
            return None
        target = self.path.with_name(f"{self.path.name}.gone-{int(time.time())}")
        try:
            self.db.execute("VACUUM INTO ?", (str(target),))
        except (sqlite3.Error, SpoolError):
            return None
        return target

    def set_aside_remains(self) -> Path | None:
        """What is left of a spool whose files were deleted while open (its state without its
        telegrams, or the reverse) is moved aside, to start afresh beside it."""
        stamp = f".gone-{int(time.time())}"
        moved = None
        sources = [Path(f"{self.path}{suffix}") for suffix in ("", "-wal", "-shm")]
        for source in [*sources, self.lock_dir]:
            if source.exists():
                os.replace(source, source.with_name(source.name + stamp))
                moved = self.path.with_name(self.path.name + stamp)
        return moved

    def close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def close(self) -> None:
        self.close_db()
        self._lock.release()

    def abandon(self) -> None:
        """Let go as a killed process would (for crash tests): no checkpoint, no cleanup."""
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write; on failure nothing in it changed."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def add_counters(self, name: str, amounts: Mapping[str, int]) -> None:
        """Add to a per-sink counter (inside a transaction)."""
        self.db.executemany(
            "INSERT INTO counters (sink, name, value, crc) VALUES (?1, ?2, ?3, row_crc(?1, ?2, ?3))"
            " ON CONFLICT (sink, name) DO UPDATE SET value = value + excluded.value,"
            " crc = row_crc(sink, name, value + excluded.value)",
            [(sink, name, amount) for sink, amount in amounts.items() if amount],
        )

    def keep_numbering(self, last_seq: int) -> None:
        """Remember the highest seq used (inside a transaction): a repair that removes the
        newest records must not let their numbers be used again."""
        self.db.execute(
            "INSERT INTO numbering (id, last_seq, crc) VALUES (1, ?1, row_crc(1, ?1)) "
            "ON CONFLICT (id) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq), "
            "crc = row_crc(1, MAX(last_seq, excluded.last_seq))",
            (last_seq,),
        )

    def counters(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for sink, name, value in self.db.execute("SELECT sink, name, value FROM counters"):
            result.setdefault(sink, {})[name] = value
        return result

    def recorded_seq(self) -> int:
        """The highest seq SQLite knows of (a new log must number above it)."""
        parts = [
            "SELECT MAX(telegram_id) AS m FROM dead_letters",
            "SELECT MAX(seq) FROM cursors",
            "SELECT MAX(seq) FROM done",
            "SELECT MAX(last_seq) FROM segments",
        ]
        if self.has_table("numbering"):
            parts.append("SELECT last_seq FROM numbering")
        if self.has_table("telegrams"):
            parts.append("SELECT MAX(id) FROM telegrams")
        row = self.db.execute(f"SELECT MAX(m) FROM ({' UNION ALL '.join(parts)})")
        return row.fetchone()[0] or 0
