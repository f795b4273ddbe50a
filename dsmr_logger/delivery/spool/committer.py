"""Keeping the spool in step with memory: flushes, strict commits, confirmations, dead letters.

Batched durability: what some sink still needs ``flush_interval`` after it arrived is committed,
in one transaction with the confirmations of spooled telegrams (grouped by ``ACK_BATCH``).
Strict: every record is committed before any sink sees it, every confirmation before the next
send. A commit that fails keeps its records in memory, encoded, and is retried by the flusher
(every ``flush_interval / 2``): no sink waits for it, and strict durability is suspended (the
records go to the sinks from memory) until the spool can be written again.

Invariant: records reach the spool in seq order (one flush at a time; a failed batch is retried
before a newer one), and a confirmation only ever names a record already appended.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from dsmr_logger.delivery.spool import Encoded, SpoolError, SpoolGone, StoredTelegram, encode
from dsmr_logger.delivery.spool.keeper import SpoolKeeper
from dsmr_logger.delivery.spool.window import Item, Record, SinkSide, Window

HOT_LIMIT = 2000
"""Records a sink keeps in memory before older (already spooled) ones are read back from disk.

A soft bound: a burst is spooled early once this many records wait unflushed, so a sink's memory
holds at most 2 x HOT_LIMIT + 1 records while commits stay batched (one transaction per burst)."""
ACK_BATCH = 32
"""Confirmations of spooled telegrams committed together: bounds resends after a crash mid-drain."""
ACKS_LIMIT = 50_000
"""Confirmations kept while the spool cannot be written (5 MB); older ones are let go: those
telegrams are sent again after a restart, never lost."""
LETTERS_LIMIT = 1000
"""Dead letters kept in memory while the spool cannot take them; older ones are let go,
counted as dropped for their sink."""
REQUEUE_TICKS = 4


class LetterBox:
    """Dead letters on their way into the spool.

    Invariant: a dead letter is in the spool, or waits here (the spool could not take it yet:
    written after the next commit), or was let go past ``LETTERS_LIMIT`` and counted as dropped
    for its sink; never let go without a count.
    """

    def __init__(self, keeper: SpoolKeeper, window: Window) -> None:
        self._keeper = keeper
        self._window = window
        self.waiting: list[tuple[str, StoredTelegram, dict[str, Any]]] = []

    async def put(self, sink: str, stored: StoredTelegram, answer: dict[str, Any]) -> None:
        if await self._write(sink, stored, answer):
            return
        self.waiting.append((sink, stored, answer))
        for gone, _, _ in self.waiting[:-LETTERS_LIMIT]:  # let go: counted as dropped
            self._window.counted["dropped"][gone] += 1
        del self.waiting[:-LETTERS_LIMIT]

    async def write_waiting(self) -> None:
        letters, self.waiting = self.waiting, []
        for sink, stored, answer in letters:
            if not await self._write(sink, stored, answer):
                self.waiting.append((sink, stored, answer))

    async def _write(self, sink: str, stored: StoredTelegram, answer: dict[str, Any]) -> bool:
        if not self._keeper.available:
            return False
        try:
            await self._keeper.call(self._keeper.spool.dead_letter, sink, stored, **answer)
        except SpoolGone as exc:
            self._keeper.gone = exc
            return False
        except (SpoolError, sqlite3.Error, OSError) as exc:
            self._keeper.failed(exc)
            return False
        return True


class Committer:
    def __init__(
        self,
        keeper: SpoolKeeper,
        window: Window,
        sinks: Mapping[str, SinkSide],
        gate: Any,
        *,
        flush_interval: float,
        strict: bool,
        hot_limit: int,
        log: Any,
    ) -> None:
        self._keeper = keeper
        self._window = window
        self._sinks = sinks
        self._gate = gate
        self.flush_interval = flush_interval
        self.strict = strict
        self.hot_limit = hot_limit
        self._log = log
        self._acks: list[tuple[str, int]] = []
        self._letters = LetterBox(keeper, window)
        self._adopted: dict[int, Record] = {}
        """Requeued rows taken back into memory: they stay in the spool's ``requeued`` until
        their telegram is spooled again, or every sink is done with it."""
        self._adopted_from = keeper.restarts
        self._strict_wakeup = asyncio.Event()
        self._early_flush: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def enqueue(self, record: Record) -> None:
        if self.strict:
            self._window.strict_waiting.append(record)
            self._strict_wakeup.set()
            return
        self._window.unflushed.append(record)
        for name in record.waiting:
            self._sinks[name].push(record)
        early = self._early_flush is None and not self._keeper.trouble.active
        if len(self._window.unflushed) > self.hot_limit and early:
            self._early_flush = asyncio.get_running_loop().create_task(self._flush_early())
        self._window.shed(self._sinks)

    async def run_strict_committer(self) -> None:
        """Strict mode: commit waiting records (grouped) before any sink may send them; while
        the spool cannot be written, hand them to the sinks all the same (from memory)."""
        while True:
            await self._strict_wakeup.wait()
            self._strict_wakeup.clear()
            batch, self._window.strict_waiting = self._window.strict_waiting, []
            self._window.unflushed.extend(batch)
            if self._keeper.available and not self._keeper.trouble.active:
                await self._flush_whole(everything=True)
            for record in batch:
                for name in record.waiting:
                    self._sinks[name].push(record)
            self._window.shed(self._sinks)

    async def confirmed(self, sink: str, item: Item) -> None:
        """The sink stored ``item`` (already out of its queue)."""
        if isinstance(item, Record):
            item.waiting.discard(sink)
            if not item.spooled:
                if not item.waiting:
                    self._window.release(item)
                return
        self._acks.append((sink, item.seq))
        del self._acks[:-ACKS_LIMIT]
        if self._keeper.trouble.active:
            return  # the flusher retries
        if self.strict or len(self._acks) >= ACK_BATCH:
            await self.flush()

    async def dead_lettered(self, sink: str, item: Item, answer: dict[str, Any]) -> None:
        """The server will never take ``item``: keep it aside (listable, requeueable)."""
        spooled = True
        if isinstance(item, Record):
            item.waiting.discard(sink)
            spooled = item.spooled
            if not item.waiting and not spooled:
                self._window.release(item)
        stored = StoredTelegram(item.seq, item.telegram, item.received_at)
        await self._letters.put(sink, stored, {**answer, "spooled": spooled})

    async def flush(self, *, everything: bool = False) -> None:
        """Commit what is still undelivered after ``flush_interval`` (or all of it), and acks."""
        async with self._flushing:
            await self._flush(everything or self.strict)

    async def _flush_whole(self, *, everything: bool = False) -> None:
        """A flush that cancelling its task (the daemon stopping) does not cut short: the batch
        it took out of the memory window is committed (or put back) before the cancellation
        goes on, and the stop's own flush waits for it. Cut short, that batch was in neither
        the window nor the spool, and the stop said "10 telegrams ... lost" for telegrams the
        spool could take (a flusher cancelled while waiting for SQLite's lock)."""
        await asyncio.shield(self.flush(everything=everything))

    async def _flush(self, everything: bool) -> None:
        keeper, window = self._keeper, self._window
        if keeper.gone is not None:
            await keeper.restart(keeper.gone)
        if not keeper.available and not await keeper.reopen():
            return
        cutoff = asyncio.get_running_loop().time() - self.flush_interval
        batch: list[Record] = []
        while window.unflushed and (everything or window.unflushed[0].accepted_at <= cutoff):
            record = window.unflushed.popleft()
            if record.waiting:
                record.spooled = True
                batch.append(record)
        acks, self._acks = self._acks, []
        if (batch or acks or window.pending_counts()) and not await self._commit(batch, acks):
            # Keep everything in memory and try again at the next flush: nothing is lost
            # while the process lives, and sinks keep delivering meanwhile. What every sink
            # confirmed or dead-lettered meanwhile is done: it leaves the window now (nothing
            # else would release it: ``confirmed`` took it for spooled).
            for record in batch:
                record.spooled = False
                if not record.waiting:
                    window.release(record)
            window.put_back([record for record in batch if record.waiting])
            # A sink that confirmed one of the batch meanwhile queued an ack for it; the retry
            # spools it without that sink, so that ack must not reach the spool.
            unspooled = {record.seq for record in batch}
            self._acks = acks + [(s, seq) for s, seq in self._acks if seq not in unspooled]
            return
        for record in batch:
            window.release(record)
        for queue in self._sinks.values():
            queue.evict(self.hot_limit)
        await self._letters.write_waiting()

    def _encoded(self, record: Record) -> Encoded:
        """A record's spool encoding, made once (again only if its sinks changed)."""
        sinks = tuple(sorted(record.waiting))
        if record.encoded is None or record.encoded_for != sinks:
            record.encoded = encode(record.seq, record.received_at, sinks, record.telegram)
            record.encoded_for = sinks
            self._window.hold(record)
        return record.seq, record.encoded, sinks

    async def _commit(self, batch: Sequence[Record], acks: list[tuple[str, int]]) -> bool:
        """Write a batch and acks in one transaction; False (the state logged) on failure."""
        keeper = self._keeper
        async with self._gate.holding():
            encoded = [self._encoded(record) for record in batch]
            protect = {seq for queue in self._sinks.values() for seq in queue.protected()}
            counted = self._window.pending_counts()
            try:
                dropped: dict[str, list[int]] = await keeper.call(
                    keeper.spool.commit,
                    acks=acks,
                    protect=protect,
                    encoded=encoded,
                    counted=counted,
                )
            except SpoolGone as exc:
                await keeper.restart(exc)
                return False
            except (SpoolError, sqlite3.Error, OSError) as exc:
                keeper.failed(exc)
                return False
        self._window.clear_counts(counted)
        keeper.writable()
        self._window.shedding.ended("memory window no longer full")
        for sink, seqs in dropped.items():
            if sink in self._sinks:
                self._sinks[sink].drop(seqs)
            self._log.warning(
                "spool full: dropped oldest telegrams",
                sink=sink,
                dropped=len(seqs),
                max_bytes=keeper.spool.max_bytes,
            )
        return True

    async def _flush_early(self) -> None:
        """A burst outgrew the memory window before ``flush_interval``: spool it now."""
        try:
            await self.flush(everything=True)
        finally:
            self._early_flush = None

    async def adopt_requeued(self) -> int:
        """Queue dead letters a user requeued (``dsmr-logger spool requeue``), even while running.

        Their rows are removed only once their telegrams are spooled again (or every sink is
        done with them): until then they are in this process's memory only, and a SIGKILL then
        lost them (10 of 10, killed right after they were taken back). A crash in between can
        only send one twice, never lose it.
        """
        keeper = self._keeper
        if not keeper.available:
            return 0
        await self._forget_adopted()
        waiting = await keeper.call(keeper.spool.requeued, list(self._sinks))
        fresh = [(row, sink, stored) for row, sink, stored in waiting if row not in self._adopted]
        now = asyncio.get_running_loop().time()
        for row, sink, stored in fresh:
            record = self._window.new(stored.telegram, stored.received_at, now, {sink})
            self._adopted[row] = record
            self.enqueue(record)
        if fresh:
            self._log.info("requeued telegrams queued again", telegrams=len(fresh))
        return len(fresh)

    async def _forget_adopted(self) -> None:
        """Remove the rows of adopted telegrams the spool no longer needs: spooled again, or
        done for every sink (a dead letter written, not one still waiting in memory)."""
        keeper = self._keeper
        if self._adopted_from != keeper.restarts:  # started anew: those rows went with the file
            self._adopted, self._adopted_from = {}, keeper.restarts
        async with self._flushing:  # a commit under way may fail yet: ``spooled`` is final after
            unwritten = {stored.seq for _, stored, _ in self._letters.waiting}
            safe = [
                row
                for row, record in self._adopted.items()
                if record.spooled or not (record.waiting or record.seq in unwritten)
            ]
            if safe:  # a lock here fails the flusher, which the daemon restarts (tried again)
                await keeper.call(keeper.spool.forget_requeued, safe)
                for row in safe:
                    del self._adopted[row]

    async def run_flusher(self) -> None:
        """Flush every ``flush_interval / 2``; adopt requeued telegrams every 2 x flush_interval.

        An idle daemon thus wakes the spool's thread only every 10 s (by default): each look
        for requeued telegrams is a hop to that thread and a read of the file's header.
        """
        keeper, window = self._keeper, self._window
        period = max(self.flush_interval / 2, 0.05)
        for tick in itertools.count(1):
            await asyncio.sleep(period)
            waiting = (
                window.unflushed or self._acks or self._letters.waiting or window.pending_counts()
            )
            if waiting or not keeper.available:
                await self._flush_whole()
            elif keeper.trouble.active:
                await keeper.probe()  # nothing to write: can it be written (to say so)?
            if keeper.available and keeper.spool.sync_due():
                try:
                    await keeper.call(keeper.spool.sync)
                except OSError as exc:  # retried at the next tick; a dead flusher stops spooling
                    keeper.failed(exc)
            if tick % REQUEUE_TICKS == 0 and keeper.available:
                try:
                    await keeper.call(keeper.spool.check_present)
                except SpoolGone as exc:
                    keeper.gone = exc
                    await self._flush_whole()
                await self.adopt_requeued()

    async def close(self) -> None:
        """Commit everything still undelivered (and every ack)."""
        leftover, self._window.strict_waiting = self._window.strict_waiting, []
        self._window.unflushed.extend(leftover)
        await self.flush(everything=True)
        if self._keeper.available and not self._keeper.trouble.active:
            with contextlib.suppress(SpoolError, sqlite3.Error, OSError):
                await self._forget_adopted()  # else adopted again at the next start: sent twice
        if self._window.count or self._letters.waiting:
            self._log.error(
                "stopping with telegrams that could not be written to the spool; they are lost",
                telegrams=self._window.count,
                dead_letters=len(self._letters.waiting),
                error=self._keeper.trouble.error,
            )
