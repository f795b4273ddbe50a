"""One task per sink: send the head of its queue until the answer says what to do with it.

Delivered → next. Rejected (``Failed to parse telegram``, 400) → dead-letter, next. Transient →
capped exponential backoff with full jitter (``Retry-After`` honoured), same telegram again.
Misconfigured (401/403/404/405) → one clear error naming the sink, keep queueing, probe slowly.

An HTML 500 is ambiguous: DSMR-reader answers it both for a database outage and for a telegram it
chokes on. After ``SUSPECT_LIMIT`` such answers for the same telegram the worker sends the telegram
*behind* it once: if that one is not stored, the server is down and nothing is dead-lettered; if
it is, the head gets one more try (an outage may just have ended) and is dead-lettered only if it
is refused again, so it no longer blocks the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from dsmr_logger.delivery.answers import Answer, Verdict, advice
from dsmr_logger.delivery.queue import Item, Queues, SinkQueue
from dsmr_logger.delivery.sinks import Sink

SUSPECT_LIMIT = 3


@dataclass(slots=True)
class SinkStats:
    delivered: int = 0
    retries: int = 0
    dead_letters: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    failing_since: float | None = None
    misconfigured: bool = False


class SinkWorker:
    def __init__(
        self,
        sink: Sink,
        queues: Queues,
        *,
        retry_initial: float,
        retry_max: float,
        jitter: Callable[[], float] = random.random,
        wall_clock: Callable[[], float] = time.time,
        max_in_flight: int = 1,
        log: Any = None,
    ) -> None:
        self.sink = sink
        self.queues = queues
        self.queue: SinkQueue = queues.sinks[sink.name]
        self.stats = SinkStats()
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._jitter = jitter
        self._wall = wall_clock
        self._log = (log or structlog.get_logger("dsmr_logger.delivery")).bind(sink=sink.name)
        self.max_in_flight = max_in_flight
        # The probe sends the telegram behind the head, pipelining up to max_in_flight - 1 more:
        # the spool's size cap must spare those while they may be on their way.
        self.queue.lookahead = max(1, max_in_flight - 1)
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._delivered_ahead: set[int] = set()
        """Telegrams behind the head already stored (probe, pipelining): confirmed, not resent."""
        self._window: dict[int, asyncio.Task[Answer]] = {}
        """Requests on their way (``max_in_flight`` > 1), by telegram."""

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for task in list(self._window.values()):
                task.cancel()

    async def _run(self) -> None:
        attempt = 0
        suspects = 0
        while not self._stopping.is_set():
            item = await self.queue.head()
            if self._stopping.is_set():
                return
            if item.seq in self._delivered_ahead:  # stored by the probe or a pipelined send
                self._delivered_ahead.discard(item.seq)
                await self._delivered(item)
                continue
            answer = await self._send_from(item)
            self._delivered_ahead.discard(item.seq)  # the window's note of its own head
            verdict = answer.verdict
            if verdict is Verdict.DELIVERED:
                await self._delivered(item)
                attempt = suspects = 0
                continue
            if verdict is Verdict.REJECTED:
                await self._dead_letter(item, answer, answer.error or "the server refused it")
                attempt = suspects = 0
                continue
            self._failed(answer)
            if verdict is Verdict.MISCONFIGURED:
                await self._pause(self.retry_max)
                continue
            if verdict is Verdict.SUSPECT:
                suspects += 1
                if suspects >= SUSPECT_LIMIT and await self._behind_head_is_stored():
                    # The server stores others; one more try tells a just-ended outage apart.
                    answer = await self._send(item)
                    if answer.verdict is Verdict.DELIVERED:
                        await self._delivered(item)
                        attempt = suspects = 0
                        continue
                    if answer.verdict in (Verdict.SUSPECT, Verdict.REJECTED):
                        await self._dead_letter(
                            item, answer, "server error for this telegram only (others are stored)"
                        )
                        attempt = suspects = 0
                        continue
            attempt += 1
            self.stats.retries += 1
            await self._pause(self._backoff(attempt, answer.retry_after))

    async def stop(self, grace: float) -> None:
        """Finish an in-flight request (up to ``grace`` seconds), then send nothing more."""
        self._stopping.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()

    async def _send_from(self, head: Item) -> Answer:
        """Send the head, keeping up to ``max_in_flight`` requests going behind it (a window).

        Draining a backlog is then bound by the server, not by round trips: whenever the head
        is answered, the window is topped up again. Confirmations stay in queue order (a stored
        follower is confirmed when it becomes the head), so a failure of the head never lets a
        later telegram overtake it in the queue; a follower that failed is sent again as head.
        """
        if self.max_in_flight == 1:
            return await self._send(head)
        sending = self._window.get(head.seq) or self._start(head)
        for follower in await self.queue.following(self.max_in_flight - 1):
            if follower.seq not in self._delivered_ahead and follower.seq not in self._window:
                self._start(follower)
        return await sending

    def _start(self, item: Item) -> asyncio.Task[Answer]:
        task = asyncio.get_running_loop().create_task(self._send(item))
        self._window[item.seq] = task
        task.add_done_callback(lambda done: self._answered(item.seq, done))
        return task

    def _answered(self, seq: int, task: asyncio.Task[Answer]) -> None:
        del self._window[seq]
        answered = not task.cancelled() and task.exception() is None
        if answered and task.result().verdict is Verdict.DELIVERED:
            self._delivered_ahead.add(seq)

    async def _send(self, item: Item) -> Answer:
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self.sink.send(item)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _delivered(self, item: Item) -> None:
        await self.queues.confirm(self.sink.name, item)
        self.stats.delivered += 1
        if self.stats.failing_since is not None:
            self._log.info(
                "sink recovered",
                failing_for=round(self._wall() - self.stats.failing_since, 1),
                backlog=len(self.queue),
            )
            self.stats.failing_since = None
            self.stats.misconfigured = False

    async def _dead_letter(self, item: Item, answer: Answer, reason: str) -> None:
        await self.queues.dead_letter(
            self.sink.name, item, status=answer.status, body=answer.body, reason=reason
        )
        self.stats.dead_letters += 1
        self._log.warning(
            "telegram dead-lettered",
            reason=reason,
            answer=answer.describe(),
            received_at=item.received_at,
            hint="list with: dsmr-logger spool list",
        )

    async def _behind_head_is_stored(self) -> bool:
        behind = await self.queue.peek_behind_head()
        if behind is None:
            return False
        if behind.seq in self._delivered_ahead:  # stored by an earlier probe or pipelined send
            return True
        in_flight = self._window.get(behind.seq)
        answer = await (in_flight if in_flight is not None else self._send(behind))
        if answer.verdict is Verdict.DELIVERED:
            self._delivered_ahead.add(behind.seq)
            return True
        if answer.verdict is Verdict.SUSPECT:
            self._log.warning(
                "server answers 500 to consecutive telegrams; if DSMR-reader works otherwise, "
                "the meter's telegrams may lack registers it needs over v1 (1.8.1, 2.8.1, 1.7.0, "
                "2.7.0)",
                answer=answer.describe(),
            )
        return False

    def _failed(self, answer: Answer) -> None:
        now = self._wall()
        description = answer.describe()
        first = self.stats.failing_since is None
        changed = description != self.stats.last_error
        self.stats.last_error = description
        self.stats.last_error_at = now
        if first:
            self.stats.failing_since = now
        if answer.verdict is Verdict.MISCONFIGURED:
            if not self.stats.misconfigured or changed:
                self._log.error(
                    "sink misconfigured; telegrams stay queued until it is fixed",
                    answer=description,
                    fix=advice(answer),
                    url=getattr(self.sink, "endpoint", None),
                    next_probe_in=self.retry_max,
                )
            self.stats.misconfigured = True
        elif first or changed:
            self._log.warning(
                "delivery failing, retrying", answer=description, backlog=len(self.queue)
            )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_max)
        ceiling = min(self.retry_max, self.retry_initial * 2.0 ** min(attempt - 1, 30))
        return max(self.retry_initial / 10, ceiling * self._jitter())

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
