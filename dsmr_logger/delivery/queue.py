"""Per-sink ordered queues over one shared spool.

Every accepted telegram becomes a ``Record`` that each of its sinks must either confirm or
dead-letter. A sink's queue is its spooled backlog first ("cold": read from disk a page at a
time, so a 100,000-telegram backlog costs no RAM), then the "hot" records in memory, oldest first.

Durability (see the README): in the default ``batched`` mode a record is written to the spool only
if some sink still needs it ``flush_interval`` seconds after it arrived, in one transaction with
the others; a healthy sink therefore costs no disk writes. In ``strict`` mode every record is
committed before any sink sees it, and every confirmation is committed before the next send.

When the spool cannot be written (a full card, its files deleted, it could not even be opened at
start), reading and delivering go on from memory: records wait, encoded once, for the spool to
come back (retried every ``flush_interval / 2``, at the cost of one ``statvfs`` while the disk is
full), strict durability is suspended rather than stalling a healthy sink, and past
``MEMORY_BYTES`` the oldest waiting records are dropped and counted. All of it is backlog, and
``spool_snapshot`` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from dsmr_logger.delivery.spool import Backlog, Spool, SpoolError, StoredTelegram
from dsmr_logger.delivery.spool.committer import ACK_BATCH, HOT_LIMIT, Committer
from dsmr_logger.delivery.spool.keeper import SpoolKeeper
from dsmr_logger.delivery.spool.window import MEMORY_BYTES, Item, Record, Window
from dsmr_logger.runtime.snapshot import SpoolSnapshot
from dsmr_logger.sources.p1.framing import Frame

__all__ = ["ACK_BATCH", "HOT_LIMIT", "MEMORY_BYTES", "Item", "Queues", "Record", "SinkQueue"]

T = TypeVar("T")

PAGE_SIZE = 256
READ_RETRY = 1.0
"""Seconds a sink waits to read its backlog again while the spool is being reopened."""


@dataclass(slots=True)
class QueueStats:
    accepted: int = 0
    throttled: int = 0
    dropped: int = 0
    """Lost to the spool's size cap (oldest first), or to a full memory window while the spool
    could not be written, with a warning each time."""


class CommitGate:
    """Whether a commit runs: no sink takes a new head meanwhile, since a commit spares only
    what was in flight when it began and may drop what would become the next head."""

    def __init__(self) -> None:
        self._running = 0
        self._settled = asyncio.Event()
        self._settled.set()

    @property
    def committing(self) -> bool:
        return self._running > 0

    async def settled(self) -> None:
        await self._settled.wait()

    @contextlib.asynccontextmanager
    async def holding(self) -> AsyncIterator[None]:
        self._running += 1
        self._settled.clear()
        try:
            yield
        finally:
            self._running -= 1
            if not self._running:
                self._settled.set()


PageReader = Callable[[str, int, int, int], Awaitable[list[StoredTelegram]]]
"""``(sink, after, upto, limit)`` → the next spooled telegrams that sink still needs."""


class SinkQueue:
    """One sink's view: strictly oldest first; an item leaves only by ``done``.

    Invariant: the cold part (spooled, ``cold_cursor < seq <= cold_upto``) is handed out before
    any hot record, and a record is handed out again only if it was never confirmed.
    """

    def __init__(
        self, name: str, min_interval: float, *, read_page: PageReader, gate: CommitGate
    ) -> None:
        self.name = name
        self.stats = QueueStats()
        self.min_interval = min_interval
        self.hot: deque[Record] = deque()
        self.cold_upto = 0
        self.cold_cursor = 0
        self.cold_count = 0
        self.cold_oldest: float | None = None
        self._read_page = read_page
        self._gate = gate
        self._page: deque[StoredTelegram] = deque()
        self._current: Item | None = None
        self._arrived = asyncio.Event()
        self._last_accepted_at: float | None = None
        self.lookahead = 1
        """Telegrams behind the head a worker may send before the head is confirmed."""

    def __len__(self) -> int:
        """Undelivered telegrams, spooled backlog included."""
        in_flight_cold = isinstance(self._current, StoredTelegram)
        return self.cold_count + len(self.hot) + in_flight_cold

    @property
    def current(self) -> Item | None:
        return self._current

    def oldest_received_at(self) -> float | None:
        if self._current is not None:
            return self._current.received_at
        if self._page:
            return self._page[0].received_at
        if self.cold_count:
            return self.cold_oldest
        return self.hot[0].received_at if self.hot else None

    def wants(self, received_at: float) -> bool:
        """The throttle: at most one telegram per ``min_interval`` seconds for this sink."""
        last = self._last_accepted_at
        # A clock stepped backwards (NTP) restarts the throttle instead of silencing the sink.
        gap = None if last is None else received_at - last
        if self.min_interval > 0 and gap is not None and 0 <= gap < self.min_interval:
            self.stats.throttled += 1
            return False
        self._last_accepted_at = received_at
        self.stats.accepted += 1
        return True

    def push(self, record: Record) -> None:
        self.hot.append(record)
        self._arrived.set()

    async def head(self) -> Item:
        """The oldest undelivered telegram; waits while there is none (or a commit runs)."""
        while self._current is None:
            await self._ready()
            if self._gate.committing:
                await self._gate.settled()
                continue
            self._current = self._take_ready()
        return self._current

    async def following(self, count: int) -> list[Item]:
        """Up to ``count`` telegrams after the head, in queue order, without waiting."""
        if self._current is None:
            return []
        if self.cold_cursor < self.cold_upto and not self._page:
            await self._load_page()
        return self._behind_head(count)

    def _behind_head(self, count: int) -> list[Item]:
        if self.cold_cursor < self.cold_upto:
            # The spooled backlog first (once its page is read); hot records only after it.
            return list(itertools.islice(self._page, count))
        skip = 1 if self.hot and self.hot[0] is self._current else 0
        return list(itertools.islice(self.hot, skip, skip + count))

    def protected(self) -> list[int]:
        """What may be on its way to the server now: the head and ``lookahead`` behind it."""
        if self._current is None:
            # Between a confirmation and the next head (a flush ACK_BATCH triggers): what the
            # worker's window sent ahead may be stored already.
            if self.cold_cursor < self.cold_upto:
                return [t.seq for t in itertools.islice(self._page, self.lookahead)]
            return [r.seq for r in itertools.islice(self.hot, self.lookahead)]
        behind = self._behind_head(self.lookahead)
        return [self._current.seq, *(item.seq for item in behind)]

    def done(self) -> Item:
        """Remove the head (confirmed or dead-lettered)."""
        item = self._current
        assert item is not None, "done() without a head"
        if isinstance(item, Record):
            if self.hot and self.hot[0] is item:
                self.hot.popleft()
            else:
                self.hot.remove(item)
        self._current = None
        return item

    async def _ready(self) -> None:
        """Wait until there is a telegram to take (its page of the backlog read)."""
        if self.cold_cursor < self.cold_upto:
            if not self._page:
                await self._load_page()
            return
        if not self.hot:
            self._arrived.clear()
            await self._arrived.wait()

    def _take_ready(self) -> Item | None:
        if self.cold_cursor < self.cold_upto:
            if not self._page:
                return None  # the spool cap dropped this page meanwhile: read the next
            item = self._page.popleft()
            self.cold_cursor = item.seq
            self.cold_count = max(0, self.cold_count - 1)
            return item
        if not self.hot:
            return None
        # Reading the backlog later (records evicted behind this one) must start after it: the
        # spool still hands out a telegram it spared for this sink until its ack is committed.
        self.cold_cursor = max(self.cold_cursor, self.hot[0].seq)
        return self.hot[0]

    async def _load_page(self) -> None:
        upto = self.cold_upto
        try:
            page = await self._read_page(self.name, self.cold_cursor, upto, PAGE_SIZE)
        except (SpoolError, sqlite3.Error, OSError):
            await asyncio.sleep(READ_RETRY)  # the spool is being reopened: its backlog waits
            return
        self._page.extend(page)
        if not page:
            # Nothing left up to where this read looked; a commit meanwhile may have evicted
            # newer records to the backlog (cold_upto moved on): those are still to be read.
            self.cold_cursor = max(self.cold_cursor, upto)
            if self.cold_cursor >= self.cold_upto:
                self.cold_count = 0

    def drop(self, seqs: list[int]) -> None:
        """The spool dropped these (size cap; never one in flight): forget them here too."""
        gone = set(seqs)
        self.hot = deque(r for r in self.hot if r.seq not in gone)
        self._page = deque(t for t in self._page if t.seq not in gone)
        cold = sum(1 for seq in gone if self.cold_cursor < seq <= self.cold_upto)
        self.cold_count = max(0, self.cold_count - cold)
        self.stats.dropped += len(gone)

    def forget(self, record: Record) -> None:
        """A record dropped from memory (the window is full and the spool cannot take it)."""
        with contextlib.suppress(ValueError):
            self.hot.remove(record)
        self.stats.dropped += 1

    def evict(self, limit: int) -> None:
        """Keep at most ``limit`` hot records; older spooled ones are read back from disk later."""
        while len(self.hot) > limit:
            index = 1 if self.hot[0] is self._current else 0
            if index >= len(self.hot) or not self.hot[index].spooled:
                return
            if index:
                # Behind a hot head in flight: its own spooled row must never be read back.
                self.cold_cursor = max(self.cold_cursor, self.hot[0].seq)
            record = self.hot[index]
            del self.hot[index]
            self.cold_upto = max(self.cold_upto, record.seq)
            self.cold_count += 1

    def restore_cold(self, upto: int, backlog: Backlog | None) -> int:
        """The spool (re)opened: its backlog for this sink is read from the start; returns how
        many telegrams the cold part held before."""
        before = self.cold_count + len(self._page)
        self._page.clear()
        self.cold_cursor, self.cold_upto = 0, upto
        self.cold_count = backlog.count if backlog else 0
        self.cold_oldest = backlog.oldest_received_at if backlog else None
        return before

    def spooled_in_memory(self, *, keep: bool) -> list[Record]:
        """Hot records the spool holds too; unless ``keep``, taken out (the cold part covers
        them again once the spool is read from the start)."""
        spooled = [r for r in self.hot if r.spooled]
        if not keep:
            self.hot = deque(r for r in self.hot if not r.spooled or r is self._current)
        return spooled


class Queues:
    """Accepts frames from the reader, feeds each sink's queue, and keeps the spool in step
    (``spool.committer``), whatever the spool's condition (``spool.keeper``).

    Invariant: a telegram accepted for a sink leaves that sink's queue only by its
    confirmation or dead letter, or dropped and counted (the spool's cap, the memory window).
    """

    def __init__(
        self,
        spool: Spool,
        sinks: Mapping[str, float],
        *,
        flush_interval: float,
        strict: bool,
        hot_limit: int = HOT_LIMIT,
        memory_bytes: int = MEMORY_BYTES,
        log: Any = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``sinks`` maps each sink name to its ``min_interval`` throttle."""
        log = log or structlog.get_logger("dsmr_logger.delivery")
        self.spool = spool
        self.strict = strict
        self.gate = CommitGate()
        self.window = Window(log, limit=memory_bytes, wall=wall_clock)
        self.sinks: dict[str, SinkQueue] = {}
        self.keeper = SpoolKeeper(spool, self.sinks, self.window, log=log, wall=wall_clock)
        for name, gap in sinks.items():
            self.sinks[name] = SinkQueue(name, gap, read_page=self.keeper.read_page, gate=self.gate)
        self.committer = Committer(
            self.keeper,
            self.window,
            self.sinks,
            self.gate,
            flush_interval=flush_interval,
            strict=strict,
            hot_limit=hot_limit,
            log=log,
        )
        self.flush = self.committer.flush
        self.run_flusher = self.committer.run_flusher
        self.run_strict_committer = self.committer.run_strict_committer
        self.adopt_requeued = self.committer.adopt_requeued

    @property
    def committing(self) -> bool:
        return self.gate.committing

    async def in_spool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking spool call on the spool's own thread (calls stay in order)."""
        return await self.keeper.call(fn, *args)

    async def open(self) -> dict[str, Backlog]:
        """Open the spool and restore each sink's backlog; returns backlogs of unknown sinks.

        A spool that cannot be opened now (a full disk) is opened again by the flusher; one
        another daemon owns, or a newer version wrote, stops the start (``SpoolError``).
        """
        orphans = await self.keeper.open()
        if orphans is None:
            return {}
        await self.committer.adopt_requeued()
        return orphans

    def accept(self, frame: Frame) -> None:
        """Take a frame from the reader (never blocks, never drops silently)."""
        wanted = {name for name, q in self.sinks.items() if q.wants(frame.received_at)}
        if wanted:
            now = asyncio.get_running_loop().time()
            self.committer.enqueue(self.window.new(frame.telegram, frame.received_at, now, wanted))

    async def confirm(self, sink: str, item: Item) -> None:
        """The sink stored the head telegram: it leaves that sink's queue."""
        self.sinks[sink].done()
        await self.committer.confirmed(sink, item)

    async def dead_letter(
        self, sink: str, item: Item, *, status: int | None, body: str, reason: str
    ) -> None:
        """The server will never take this telegram: keep it aside (listable, requeueable)."""
        self.sinks[sink].done()
        answer = {"status": status, "body": body, "reason": reason}
        await self.committer.dead_lettered(sink, item, answer)

    async def close(self) -> None:
        """Commit everything still undelivered (and every ack), then close the spool."""
        await self.committer.close()
        await self.keeper.close()

    def backlog(self, sink: str) -> int:
        """Everything ``sink`` still has to deliver: spooled, in memory, or being committed."""
        waiting = sum(1 for r in self.window.strict_waiting if sink in r.waiting)
        return len(self.sinks[sink]) + waiting

    def undelivered(self) -> dict[str, int]:
        return {name: self.backlog(name) for name in self.sinks}

    def spool_snapshot(self) -> SpoolSnapshot:
        return self.keeper.snapshot()
