"""The spool's condition, seen from the daemon: open or not, writable or not, and why.

A spool that cannot be opened at start (a full card: SQLite's WAL needs its ``-shm`` file; a
read-only or failing one) does not stop the daemon: it reads the meter and delivers from memory
meanwhile, numbering on from what a reader beside can see, and the spool is opened again at the
next flush. A spool whose files are deleted while open is started again: if its telegrams are
still there, it is rebuilt from them; else what memory holds is spooled again, and the backlog
only the deleted files held is counted lost. Each change is one log line (``Trouble``). Its
counters (``lost``, ``dropped``) count since the spool was created: a state started anew goes on
from the old one's, so ``lost`` in ``/status`` and ``dsmr_logger_sink_lost_total`` never go down.

Invariant: while ``available`` the spool is open; every sink's cold part then reflects the
spool's backlog as of its last (re)opening.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from dsmr_logger.delivery.spool import Backlog, Spool, SpoolError, SpoolGone, SpoolUnavailable
from dsmr_logger.delivery.spool.letters import StoredTelegram
from dsmr_logger.delivery.spool.link import SpoolLink, Trouble
from dsmr_logger.delivery.spool.window import Record, SinkSide, Window
from dsmr_logger.runtime.snapshot import SpoolSnapshot

T = TypeVar("T")


class SpoolKeeper:
    def __init__(
        self,
        spool: Spool,
        sinks: Mapping[str, SinkSide],
        window: Window,
        *,
        log: Any,
        wall: Callable[[], float],
    ) -> None:
        self.spool = spool
        self._sinks = sinks
        self._window = window
        self._log = log
        self._link = SpoolLink()
        self.trouble = Trouble(
            log, "cannot write the spool; undelivered telegrams stay in memory meanwhile", wall=wall
        )
        self.available = False
        self.gone: SpoolGone | None = None
        """Deleted files found outside a flush; the next flush starts the spool again."""
        self.restarts = 0
        """Times the spool was started anew after its files were deleted (``restart``)."""
        self._carried: dict[str, dict[str, int]] = {}
        """The counters of a state started anew, to go on from at the next opening."""
        self._lost_shown: dict[str, int] = {}
        """``lost`` as it was before the state was started anew: never shown less."""

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking spool call on the spool's own thread (calls stay in order)."""
        return await self._link.call(fn, *args, **kwargs)

    async def read_page(self, sink: str, after: int, upto: int, limit: int) -> list[StoredTelegram]:
        if not self.available:
            raise SpoolError("spool not open")
        return await self.call(self.spool.page, sink, after, upto, limit)

    def failed(self, exc: Exception) -> None:
        self.trouble.failed(
            f"{type(exc).__name__}: {exc}", path=str(self.spool.path), in_memory=self._window.count
        )

    def writable(self) -> None:
        self.trouble.ended("spool writable again", path=str(self.spool.path))

    async def probe(self) -> None:
        """With nothing to write, whether a commit could be written now: the trouble ends
        then, not only at the next commit (a lock released, room made on the card)."""
        try:
            await self.call(self.spool.probe)
        except SpoolGone as exc:
            self.gone = exc
        except (SpoolError, sqlite3.Error, OSError) as exc:
            self.failed(exc)
        else:
            self.writable()

    async def open(self) -> dict[str, Backlog] | None:
        """Open at start; None if it cannot be now. Another daemon owning it, or a newer
        version having written it, is raised: that stops the start."""
        try:
            await self.call(self.spool.open)
        except SpoolUnavailable as exc:
            self.failed(exc)
            self._window.seq = await self.call(self.spool.peek_last_seq)
            return None
        return await self._adopt()

    async def reopen(self) -> bool:
        try:
            await self.call(self.spool.open)
        except SpoolError as exc:
            self.failed(exc)
            return False
        await self._adopt()
        return True

    async def _adopt(self) -> dict[str, Backlog]:
        """The spool is open (opening writes: it can be written again): number on above it,
        and read each sink's backlog from it."""
        self.available = True
        self.writable()
        if self._carried:
            await self._carry_counters()
        self._window.renumber(await self.call(self.spool.last_seq), self._sinks)
        backlogs = await self.call(self.spool.backlogs)
        upto = await self.call(self.spool.backlog_upto, "")
        for name, queue in self._sinks.items():
            backlog = backlogs.get(name)
            queue.restore_cold(upto, backlog)
            if backlog:
                self._log.info("restored backlog", sink=name, telegrams=backlog.count)
        return {name: b for name, b in backlogs.items() if name not in self._sinks}

    async def restart(self, exc: SpoolGone) -> None:
        """The spool's files were deleted while open: start it again (flush lock held)."""
        self.failed(exc)
        self.gone = None
        self.available = False
        self.restarts += 1
        try:
            self._carried = await self.call(self.spool.counters)
        except (SpoolError, sqlite3.Error, OSError):
            self._carried = {}
        shown = {sink: counts.get("lost", 0) for sink, counts in self._carried.items()}
        self._lost_shown = {s: max(n, self._lost_shown.get(s, 0)) for s, n in shown.items()}
        whole_log = await self.call(self.spool.segments_present)
        copied = await self.call(self.spool.save_state)
        await self.call(self.spool.abandon)
        if not whole_log:
            moved = await self.call(self.spool.set_aside_remains)
            self._log.error(
                "spool files deleted while running; starting anew", kept=str(moved or copied)
            )
        elif copied is not None:
            self._log.error(
                "spool state file deleted while running; started anew from the segment files "
                "(their telegrams are sent again: at least once); its dead letters and counters "
                "are kept in a copy",
                kept=str(copied),
            )
        spooled: dict[int, Record] = {}
        for queue in self._sinks.values():
            spooled.update((id(r), r) for r in queue.spooled_in_memory(keep=not whole_log))
        if not whole_log:
            self._window.respool(spooled.values())
        before = {name: queue.cold_count for name, queue in self._sinks.items()}
        if not await self.reopen() or whole_log:
            return
        lost = {name: max(0, before[name] - q.cold_count) for name, q in self._sinks.items()}
        if any(lost.values()):
            self._window.counted["lost"].update(lost)
            self._log.error("backlog lost with the deleted spool files", lost=lost)

    async def _carry_counters(self) -> None:
        """Add what the spool's counters lack of the old state's, at the next commit."""
        now = await self.call(self.spool.counters)
        for sink, counts in self._carried.items():
            for name, pending in self._window.counted.items():  # "dropped", "lost"
                missing = counts.get(name, 0) - now.get(sink, {}).get(name, 0)
                if missing > 0:
                    pending[sink] += missing
        self._carried = {}

    def snapshot(self) -> SpoolSnapshot:
        lost = self.spool.lost
        for sink, count in self._lost_shown.items():
            lost[sink] = max(count, lost.get(sink, 0))
        return SpoolSnapshot(
            writable=self.available and not self.trouble.active,
            error=self.trouble.error,
            failing_since=self.trouble.since,
            in_memory=self._window.count,
            lost=lost,
        )

    async def close(self) -> None:
        await self.call(self.spool.close)
        self._link.shutdown()
