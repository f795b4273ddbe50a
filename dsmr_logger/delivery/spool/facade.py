"""``Spool``: the parts (log, summaries, cursors, cap, dead letters, damage, state) as one.

Only what a sink has not confirmed within ``flush_interval`` is spooled (or everything first, in
strict durability), so a healthy setup writes nothing. Each commit appends with one ``write``:
the telegrams survive a crash or SIGKILL of the daemon at once, and reach the card at the next
fsync. One daemon owns a spool (a lock); the ``spool`` tools read beside it. All methods block;
the queue calls them from one worker thread. This class only wires the parts and maps the layer
below's errors to ``SpoolError``; what each part guarantees is written at its top.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from dsmr_logger.delivery.spool.cap import SizeCap
from dsmr_logger.delivery.spool.cursors import Cursors
from dsmr_logger.delivery.spool.damage import Damage
from dsmr_logger.delivery.spool.letters import DeadLetters
from dsmr_logger.delivery.spool.opening import Opening
from dsmr_logger.delivery.spool.reads import Reads
from dsmr_logger.delivery.spool.segments import SegmentLog
from dsmr_logger.delivery.spool.state import SpoolError, SpoolUnavailable, StateDb
from dsmr_logger.delivery.spool.summaries import Summaries
from dsmr_logger.delivery.spool.writes import Writes

SEGMENT_BYTES = 1 << 20
"""A full segment: about 1,300 telegrams, 22 minutes of a DSMR 5 meter's outage."""
SYNC_INTERVAL = 30.0


def telegram_dir(path: Path) -> Path:
    """Where a spool's segment files live: beside the SQLite file, named after it."""
    return path.with_name(path.name + "-telegrams")


class Spool:
    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        strict: bool = False,
        sync_interval: float = SYNC_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.strict = strict
        self._logger = logger = logger or structlog.get_logger("dsmr_logger.spool")
        segment_bytes = max(1, min(SEGMENT_BYTES, max_bytes // 16))
        self.log = log = SegmentLog(telegram_dir(path), segment_bytes=segment_bytes)
        self.state = state = StateDb(path, log.directory, strict=strict)
        self.summaries = summaries = Summaries()
        self.cursors = cursors = Cursors(log, summaries)
        self.letters = letters = DeadLetters(state)
        self.damage = damage = Damage(log, summaries, cursors, state, logger)
        cap = SizeCap(max_bytes, log, summaries, cursors, damage)
        self._reads = reads = Reads(log, summaries, cursors, lambda: self._writes.repair())
        self._writes = writes = Writes(
            log=log,
            state=state,
            summaries=summaries,
            cursors=cursors,
            cap=cap,
            letters=letters,
            damage=damage,
            reads=reads,
            strict=strict,
            sync_interval=sync_interval,
            clock=clock,
            logger=logger,
        )
        self._opening = Opening(self, logger)
        self.backlogs = reads.backlogs
        self.page = reads.page
        self.commit = writes.commit
        self.dead_letter = writes.dead_letter
        self.purge = writes.purge
        self.sync = functools.partial(writes.fsyncs.sync, force=True)
        self.sync_due = writes.fsyncs.due
        self.repair = writes.repair
        self.forget_finished = writes.forget_finished
        self.check_present = writes.check_present
        self.probe = writes.probe
        self.dead_letters = letters.all
        self.requeue = letters.requeue
        self.requeued = letters.requeued
        self.forget_requeued = letters.forget_requeued
        self.requeued_count = letters.requeued_count
        self.counters = state.counters

    def open(self, *, shared: bool = False) -> None:
        """Open (a daemon, ``shared=False``: creating, converting, repairing and locking it) or
        read beside a running daemon (``shared=True``: the tools; nothing is written)."""
        try:
            self._writes.writer = not shared
            self._opening.open(writer=not shared)
        except sqlite3.OperationalError as exc:  # a full disk, locked, cannot open: transient
            self.close()
            raise SpoolUnavailable(f"{self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # not a database, and never was a spool
            self.close()
            raise SpoolError(f"{self.path}: {exc}") from exc
        except OSError as exc:
            self.close()
            raise SpoolUnavailable(f"{self.path}: {exc.strerror or exc}") from exc
        except SpoolError:
            self.close()
            raise

    def close(self) -> None:
        if self._writes.writer and self.state.present() and self.log.present():
            with contextlib.suppress(OSError):
                self._writes.fsyncs.sync(force=True)
        self.log.close()
        self.state.close()
        self._writes.writer = False

    def save_state(self) -> Path | None:
        """Before letting go of files deleted while open: what a deleted WAL holds goes into
        the database file; a deleted database file is copied beside (returns where)."""
        return self.state.save_remains()

    def abandon(self) -> None:
        """Let go of the files as a killed process would: no final fsync, no cleanup."""
        self.log.close()
        self.state.abandon()
        self._writes.writer = False

    @property
    def db(self) -> sqlite3.Connection:
        return self.state.db

    @property
    def stored_bytes(self) -> int:
        """Bytes of segment files: what the size cap compares with ``max_bytes``."""
        return self.log.total_bytes

    def last_seq(self) -> int:
        """The highest seq the spool knows of: new telegrams number above it."""
        return max(self.log.last_seq, self.state.recorded_seq())

    def backlog_upto(self, sink: str) -> int:
        """The newest spooled telegram; ``page`` skips those not for ``sink``."""
        return self.log.last_seq

    @property
    def lost(self) -> dict[str, int]:
        """Telegrams counted lost to damage, per sink (read without touching the files)."""
        return {sink: count for sink, count in self.damage.noted.items() if count}

    def segments_present(self) -> bool:
        """The segment being appended to is still there (only the state may have gone)."""
        return self.log.present()

    def set_aside_remains(self) -> Path | None:
        """After ``SpoolGone``: move what is left aside (abandoned first) to start afresh."""
        return self.state.set_aside_remains()

    def peek_last_seq(self) -> int:
        """The numbering to go on from when the spool cannot be opened to write: read beside,
        as the tools do, else the newest segment's name; 0 if nothing can be read."""
        reader = Spool(self.path, max_bytes=self.max_bytes, logger=self._logger)
        try:
            reader.open(shared=True)
        except SpoolError:
            names = [s.stem for s in self.log.directory.glob("*.seg") if s.stem.isdigit()]
            return max((int(name) for name in names), default=0)
        try:
            return reader.last_seq()
        finally:
            reader.close()
