"""Per-sink ordered queues over one shared spool.

Every accepted telegram becomes a ``Record`` that each of its sinks must either confirm or
dead-letter. A sink's queue is its spooled backlog first (read from disk a page at a time, so a
100,000-telegram backlog costs no RAM), then the "hot" records still in memory, oldest first.

Durability (see the README): in the default ``batched`` mode a record is written to the spool only
if some sink still needs it ``flush_interval`` seconds after it arrived, in one transaction with
the others; a healthy sink therefore costs no disk writes. In ``strict`` mode every record is
committed before any sink sees it, and every confirmation is committed before the next send.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import sqlite3
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from dsmr_logger.delivery.spool import Backlog, Spool, StoredTelegram
from dsmr_logger.sources.p1.framing import Frame

T = TypeVar("T")

HOT_LIMIT = 2000
"""Records a sink keeps in memory before older (already spooled) ones are read back from disk.

A soft bound: a burst is spooled early once this many records wait unflushed, so a sink's memory
holds at most 2 x HOT_LIMIT + 1 records while commits stay batched (one transaction per burst)."""
PAGE_SIZE = 256
ACK_BATCH = 32
"""Confirmations of spooled telegrams committed together: bounds resends after a crash mid-drain."""
SPOOL_RETRY = 1.0
REQUEUE_TICKS = 4


@dataclass(slots=True, eq=False)
class Record:
    """An accepted telegram still needed by at least one sink."""

    seq: int
    telegram: bytes
    received_at: float
    accepted_at: float
    waiting: set[str]
    spooled: bool = False


Item = Record | StoredTelegram
"""What a sink is handed: a hot record, or a telegram read back from the spool."""


@dataclass(slots=True)
class QueueStats:
    accepted: int = 0
    throttled: int = 0
    dropped: int = 0
    """Lost to the spool's size cap (oldest first), with a warning each time."""


class SinkQueue:
    """One sink's view: strictly oldest first; an item leaves only by ``done``."""

    def __init__(self, name: str, queues: Queues, min_interval: float) -> None:
        self.name = name
        self.stats = QueueStats()
        self.min_interval = min_interval
        self.hot: deque[Record] = deque()
        self.cold_upto = 0
        self.cold_cursor = 0
        self.cold_count = 0
        self._queues = queues
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

    def oldest_received_at(self) -> float | None:
        if self._current is not None:
            return self._current.received_at
        if self._page:
            return self._page[0].received_at
        if self.cold_count:
            return self._queues.cold_oldest.get(self.name)
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
        """The oldest undelivered telegram; waits while there is none.

        A new head is never taken while a commit runs: the commit spares only what was in
        flight when it began, and may drop what would otherwise become the head meanwhile.
        """
        while self._current is None:
            await self._ready()
            if self._queues.committing:
                await self._queues.settled()
                continue
            self._current = self._take_ready()
        return self._current

    async def peek_behind_head(self) -> Item | None:
        """The telegram after the head, without waiting (for the poison probe)."""
        behind = await self.following(1)
        return behind[0] if behind else None

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
        page = await self._queues.in_spool(
            self._queues.spool.page, self.name, self.cold_cursor, upto, PAGE_SIZE
        )
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


class Queues:
    """Accepts frames from the reader, feeds each sink's queue, and keeps the spool in step."""

    def __init__(
        self,
        spool: Spool,
        sinks: Mapping[str, float],
        *,
        flush_interval: float,
        strict: bool,
        hot_limit: int = HOT_LIMIT,
        log: Any = None,
    ) -> None:
        """``sinks`` maps each sink name to its ``min_interval`` throttle."""
        self.spool = spool
        self.flush_interval = flush_interval
        self.strict = strict
        self.hot_limit = hot_limit
        self.sinks = {name: SinkQueue(name, self, gap) for name, gap in sinks.items()}
        self.cold_oldest: dict[str, float | None] = {}
        self._log = log or structlog.get_logger("dsmr_logger.delivery")
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._seq = 0
        self._unflushed: deque[Record] = deque()
        self._acks: list[tuple[str, int]] = []
        self._strict_waiting: list[Record] = []
        self._strict_wakeup = asyncio.Event()
        self._early_flush: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        """One flush at a time: the spool appends in seq order, so a failed batch must be
        retried before a newer one is written."""
        self._commits = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self.spool_error: str | None = None

    @property
    def committing(self) -> bool:
        return self._commits > 0

    async def settled(self) -> None:
        """Wait until no commit runs (so none can drop what a sink takes next)."""
        await self._settled.wait()

    async def in_spool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking spool call on the spool's own thread (calls stay in order)."""
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        # Shielded: a cancelled caller (shutdown) must not cancel a commit that holds telegrams.
        return await asyncio.shield(job)

    async def open(self) -> dict[str, Backlog]:
        """Open the spool and restore each sink's backlog; returns backlogs of unknown sinks."""
        await self.in_spool(self.spool.open)
        for path, readable in self.spool.log.damaged:
            self._log.warning(
                "spool file ends in a torn or damaged record; kept what was whole before it",
                file=path.name,
                bytes_kept=readable,
            )
        self._seq = await self.in_spool(self.spool.last_seq)
        backlogs = await self.in_spool(self.spool.backlogs)
        for name, queue in self.sinks.items():
            queue.cold_upto = await self.in_spool(self.spool.backlog_upto, name)
            backlog = backlogs.get(name)
            queue.cold_count = backlog.count if backlog else 0
            self.cold_oldest[name] = backlog.oldest_received_at if backlog else None
            if backlog:
                self._log.info("restored backlog", sink=name, telegrams=backlog.count)
        await self.adopt_requeued()
        return {name: b for name, b in backlogs.items() if name not in self.sinks}

    # --- the reader's side ------------------------------------------------------------------

    def accept(self, frame: Frame) -> None:
        """Take a frame from the reader (never blocks, never drops silently)."""
        wanted = {name for name, q in self.sinks.items() if q.wants(frame.received_at)}
        if wanted:
            self._enqueue(frame.telegram, frame.received_at, wanted)

    def _enqueue(self, telegram: bytes, received_at: float, sinks: set[str]) -> None:
        loop = asyncio.get_running_loop()
        self._seq += 1
        record = Record(self._seq, telegram, received_at, loop.time(), sinks)
        if self.strict:
            self._strict_waiting.append(record)
            self._strict_wakeup.set()
            return
        self._unflushed.append(record)
        for name in sinks:
            self.sinks[name].push(record)
        if len(self._unflushed) > self.hot_limit and self._early_flush is None:
            self._early_flush = loop.create_task(self._flush_early())

    async def adopt_requeued(self) -> int:
        """Queue dead letters a user requeued (``dsmr-logger spool requeue``), even while running.

        They are enqueued like new telegrams before their rows are removed, so a crash in
        between can only send one twice, never lose it.
        """
        waiting = await self.in_spool(self.spool.requeued, list(self.sinks))
        for _, sink, stored in waiting:
            self._enqueue(stored.telegram, stored.received_at, {sink})
        if waiting:
            await self.in_spool(self.spool.forget_requeued, [row for row, _, _ in waiting])
            self._log.info("requeued telegrams queued again", telegrams=len(waiting))
        return len(waiting)

    async def run_strict_committer(self) -> None:
        """Strict mode: commit waiting records (grouped) before any sink may send them."""
        while True:
            await self._strict_wakeup.wait()
            self._strict_wakeup.clear()
            batch, self._strict_waiting = self._strict_waiting, []
            for record in batch:
                record.spooled = True
            async with self._flushing:
                committed = await self._commit(batch, [])
            if not committed:
                for record in batch:
                    record.spooled = False
                self._strict_waiting[:0] = batch
                await asyncio.sleep(SPOOL_RETRY)
                self._strict_wakeup.set()
                continue
            for record in batch:
                for name in record.waiting:
                    self.sinks[name].push(record)

    # --- the sinks' side --------------------------------------------------------------------

    async def confirm(self, sink: str, item: Item) -> None:
        """The sink stored the head telegram: it leaves that sink's queue."""
        self.sinks[sink].done()
        if isinstance(item, Record):
            item.waiting.discard(sink)
            if not item.spooled:
                return
        self._acks.append((sink, item.seq))
        if self.strict or len(self._acks) >= ACK_BATCH:
            await self.flush()

    async def dead_letter(
        self, sink: str, item: Item, *, status: int | None, body: str, reason: str
    ) -> None:
        """The server will never take this telegram: keep it aside (listable, requeueable)."""
        self.sinks[sink].done()
        spooled = True
        if isinstance(item, Record):
            item.waiting.discard(sink)
            spooled = item.spooled
        stored = StoredTelegram(item.seq, item.telegram, item.received_at)
        try:
            await self.in_spool(
                functools.partial(
                    self.spool.dead_letter,
                    sink,
                    stored,
                    status=status,
                    body=body,
                    reason=reason,
                    spooled=spooled,
                )
            )
        except (sqlite3.Error, OSError) as exc:
            # Not kept aside (a spooled one is still pending and comes back after a restart);
            # the sink's task must not die of it.
            self._spool_failed(exc)

    # --- the spool's side -------------------------------------------------------------------

    async def flush(self, *, everything: bool = False) -> None:
        """Commit what is still undelivered after ``flush_interval`` (or all of it), and acks."""
        async with self._flushing:
            await self._flush(everything)

    async def _flush(self, everything: bool) -> None:
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.flush_interval
        batch: list[Record] = []
        while self._unflushed and (everything or self._unflushed[0].accepted_at <= cutoff):
            record = self._unflushed.popleft()
            if record.waiting:
                record.spooled = True
                batch.append(record)
        acks, self._acks = self._acks, []
        if (batch or acks) and not await self._commit(batch, acks):
            # Keep everything in memory and try again at the next flush: nothing is lost
            # while the process lives, and sinks keep delivering meanwhile.
            for record in batch:
                record.spooled = False
            self._unflushed.extendleft(reversed(batch))
            # A sink that confirmed one of the batch meanwhile queued an ack for it; the retry
            # spools it without that sink, so that ack must not reach the spool.
            unspooled = {record.seq for record in batch}
            self._acks = acks + [(s, seq) for s, seq in self._acks if seq not in unspooled]
            return
        for queue in self.sinks.values():
            queue.evict(self.hot_limit)

    async def _commit(self, batch: Sequence[Record], acks: list[tuple[str, int]]) -> bool:
        """Write a batch and acks in one transaction; False (logged once per error) on failure."""
        self._commits += 1
        self._settled.clear()
        try:
            return await self._commit_now(batch, acks)
        finally:
            self._commits -= 1
            if not self._commits:
                self._settled.set()

    async def _commit_now(self, batch: Sequence[Record], acks: list[tuple[str, int]]) -> bool:
        new = [(StoredTelegram(r.seq, r.telegram, r.received_at), sorted(r.waiting)) for r in batch]
        protect = {seq for queue in self.sinks.values() for seq in queue.protected()}
        try:
            dropped: dict[str, list[int]] = await self.in_spool(
                self.spool.commit, new, acks, protect
            )
        except (sqlite3.Error, OSError) as exc:
            self._spool_failed(exc)
            return False
        if self.spool_error is not None:
            self._log.info("spool writable again", path=str(self.spool.path))
            self.spool_error = None
        for sink, seqs in dropped.items():
            if sink in self.sinks:
                self.sinks[sink].drop(seqs)
            self._log.warning(
                "spool full: dropped oldest telegrams",
                sink=sink,
                dropped=len(seqs),
                max_bytes=self.spool.max_bytes,
            )
        return True

    def _spool_failed(self, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if error != self.spool_error:
            self._log.error(
                "cannot write the spool; undelivered telegrams stay in memory meanwhile",
                path=str(self.spool.path),
                error=error,
            )
        self.spool_error = error

    async def _flush_early(self) -> None:
        """A burst outgrew the memory window before ``flush_interval``: spool it now."""
        try:
            await self.flush(everything=True)
        finally:
            self._early_flush = None

    async def run_flusher(self) -> None:
        """Flush every ``flush_interval / 2``; adopt requeued telegrams every 2 x flush_interval.

        An idle daemon thus wakes the spool's thread only every 10 s (by default): each look
        for requeued telegrams is a hop to that thread and a read of the file's header.
        """
        period = max(self.flush_interval / 2, 0.05)
        for tick in itertools.count(1):
            await asyncio.sleep(period)
            if self._unflushed or self._acks:
                await self.flush()
            if self.spool.sync_due():
                try:
                    await self.in_spool(self.spool.sync)
                except OSError as exc:  # retried at the next tick; a dead flusher stops spooling
                    self._spool_failed(exc)
            if tick % REQUEUE_TICKS == 0:
                await self.adopt_requeued()

    async def close(self) -> None:
        """Commit everything still undelivered (and every ack), then close the spool."""
        leftover, self._strict_waiting = self._strict_waiting, []
        self._unflushed.extendleft(reversed(leftover))
        await self.flush(everything=True)
        if self._unflushed:
            self._log.error(
                "stopping with telegrams that could not be written to the spool; they are lost",
                telegrams=sum(1 for r in self._unflushed if r.waiting),
                error=self.spool_error,
            )
        await self.in_spool(self.spool.close)
        self._executor.shutdown(wait=True)

    def undelivered(self) -> dict[str, int]:
        return {name: len(q) for name, q in self.sinks.items()}
