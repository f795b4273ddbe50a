"""One task per sink: send the head of its queue until the answer says what to do with it.

Delivered → next. Transient → capped exponential backoff with full jitter (``Retry-After``
honoured), same telegram again. Misconfigured (401/403/404/405, a redirect) → one clear error
naming the sink, keep queueing, probe slowly. The head is the only telegram on its way (with the
default ``max_in_flight = 1``), so the server stores telegrams in the order they were read: nothing
behind the head is sent before the head is stored or dead-lettered.

**Refusals** (400, ``Failed to parse telegram``) may be about the telegram or about the *sink*:
a reverse proxy answering 400 to everything, a URL pointing at some other web server (39 of 39
telegrams were dead-lettered behind such a proxy, with health OK). So before a refused telegram is
dead-lettered, the worker asks the sink's health probe (``probe()``, a read that stores nothing)
whether the server answers like DSMR-reader. If it does, the refusal is the telegram's and it is
dead-lettered (also a run of them, e.g. a bad gas value repeated until the next M-Bus reading); if
not, the sink is misconfigured: nothing is dead-lettered, everything stays queued, ``/healthz``
names the sink. Dead-letter warnings are summarised: the first at once, then one line with a count
at most every ``REPORT_INTERVAL``.

**The poison rule** (an HTML 500): DSMR-reader answers the same page for a database outage and for
a telegram it chokes on (registers missing, a value too large). A poison telegram fails *every*
time while the server otherwise works; an outage fails everything; a flapping server fails at
random. So each HTML 500 of the head is followed by the health probe, and it counts as a strike
only if the probe shows the server answering. ``POISON_STRIKES`` strikes dead-letter the head. A
good telegram on a server failing a fraction ``p`` of requests at random gets a strike before its
success with odds ``p / (1 + p)`` (a failure, then a probe that got through, before a success), so
ten strikes are ``(1/6)^10 = 1.7e-8`` at p = 0.2 — one good telegram in 60 million — and
``(1/3)^10 = 1.7e-5`` even at p = 0.5; an outage, whose probe fails, never strikes. The old rule
(three 500s, then send the telegram behind the head, then the head once more) dead-lettered 1 of
566 good telegrams at p = 0.2, stored the one behind before the head (7 out-of-order pairs in
1,500), and blocked for ever on two poison telegrams in a row (the probe failed too, so it took
the server for down). A run of poison telegrams now costs each of them ten posts and ten probes,
``retry_initial / 4`` apart.

What the server may hold twice is counted, not guessed: a failure that may have stored the
telegram (``Answer.maybe_stored``: a read timeout, a connection lost after sending, a gateway's
502/504) followed by a success is a possible duplicate (``possible_duplicates``, an upper bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import structlog

from dsmr_logger.delivery.answers import Answer, Verdict, advice
from dsmr_logger.delivery.queue import Item, Queues, SinkQueue
from dsmr_logger.delivery.sinks import Sink

POISON_STRIKES = 10
"""HTML 500s of one telegram, each while the server answered its health probe, before it is
dead-lettered as poison (see the module docstring for the odds)."""
RECENT = 100
"""Telegrams last resolved (delivered or dead-lettered) that ``refused_recently`` counts in: ten
refused among them make ``/healthz`` say so, though no run forms (every other one refused)."""
REPORT_INTERVAL = 60.0
"""Seconds between dead-letter warnings: the first is logged at once, later ones as a count."""


@runtime_checkable
class Probing(Protocol):
    """A sink that can ask its server, without storing anything, whether it works."""

    async def probe(self) -> Answer: ...


@dataclass(slots=True)
class SinkStats:
    delivered: int = 0
    retries: int = 0
    dead_letters: int = 0
    possible_duplicates: int = 0
    """Failed attempts that may have stored a telegram that was then stored again."""
    refused_in_a_row: int = 0
    """Telegrams dead-lettered since the last delivery."""
    refused_recently: int = 0
    """Telegrams dead-lettered among the last ``resolved_recently`` (at most ``RECENT``)."""
    resolved_recently: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    failing_since: float | None = None
    misconfigured: bool = False
    fix: str | None = None
    """What to change, while misconfigured."""


class DeadLetterReport:
    """Dead-letter warnings, and failures of a flapping server, rate-limited: the first at
    once, then a count at most every ``interval`` (logs must never fill an SD card).

    Invariant: every dead letter is in exactly one logged count (the rest by ``flush``)."""

    def __init__(self, log: Any, clock: Callable[[], float], interval: float) -> None:
        self._log = log
        self._clock = clock
        self._interval = interval
        self._pending = 0
        self._last: tuple[str, str] = ("", "")
        self._logged_at: float | None = None
        self._failure_logged_at: float | None = None
        self._failures_unlogged = 0

    def may_log_failure(self) -> bool:
        """A sink starts failing: log it, unless one was logged within ``interval`` (counted)."""
        now = self._clock()
        if self._failure_logged_at is not None and now - self._failure_logged_at < self._interval:
            self._failures_unlogged += 1
            return False
        self._failure_logged_at = now
        return True

    def unlogged_failures(self) -> dict[str, int]:
        """For the next failure line: how many short failures went unlogged before it."""
        count, self._failures_unlogged = self._failures_unlogged, 0
        return {"short_failures_since_last_line": count} if count else {}

    def add(self, reason: str, answer: str) -> None:
        self._pending += 1
        self._last = (reason, answer)
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= self._interval:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        reason, answer = self._last
        self._log.warning(
            "telegrams dead-lettered",
            count=self._pending,
            reason=reason,
            answer=answer,
            hint="list with: dsmr-logger spool list",
        )
        self._pending = 0
        self._logged_at = self._clock()


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
        clock: Callable[[], float] = time.monotonic,
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
        self._clock = clock
        self.failing_began: float | None = None
        """``clock`` when the current failure began (``stats.failing_since`` on the wall)."""
        self._log = (log or structlog.get_logger("dsmr_logger.delivery")).bind(sink=sink.name)
        self._report = DeadLetterReport(self._log, clock, REPORT_INTERVAL)
        self.max_in_flight = max_in_flight
        # Pipelining sends up to max_in_flight - 1 telegrams behind the head: the spool's size cap
        # must spare those while they may be on their way.
        self.queue.lookahead = max_in_flight - 1
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._episode_logged = False
        """The current failure was logged (so its recovery is); short ones are only counted."""
        self._recent: deque[bool] = deque(maxlen=RECENT)
        """Whether each of the last telegrams resolved was dead-lettered."""
        self._maybe_stored: dict[int, int] = {}
        """Failed attempts per telegram that may have reached the server's database."""
        self._delivered_ahead: set[int] = set()
        """Telegrams behind the head already stored (pipelining): confirmed, not resent."""
        self._window: dict[int, asyncio.Task[Answer]] = {}
        """Requests on their way (``max_in_flight`` > 1), by telegram."""

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for task in list(self._window.values()):
                task.cancel()
            self._report.flush()

    def report(self) -> None:
        """Log the dead letters not yet reported (the periodic summary calls this)."""
        self._report.flush()

    async def _run(self) -> None:
        head: int | None = None
        attempt = strikes = 0
        while not self._stopping.is_set():
            item = await self.queue.head()
            if self._stopping.is_set():
                return
            if item.seq != head:
                head, attempt, strikes = item.seq, 0, 0
            if item.seq in self._delivered_ahead:  # stored by a pipelined send
                self._delivered_ahead.discard(item.seq)
                await self._delivered(item)
                continue
            answer = await self._send_from(item)
            self._delivered_ahead.discard(item.seq)  # the window's note of its own head
            verdict = answer.verdict
            if verdict is Verdict.DELIVERED:
                await self._delivered(item)
                continue
            if verdict is Verdict.REJECTED:
                refusal = await self._whose_refusal(answer)
                if refusal is None:
                    await self._dead_letter(item, answer, answer.error or "the server refused it")
                    continue
                self._failed(answer, fix=refusal)
                await self._pause(self.retry_max)
                continue
            self._failed(answer)
            if verdict is Verdict.MISCONFIGURED:
                await self._pause(self.retry_max)
                continue
            self.stats.retries += 1
            if verdict is Verdict.SUSPECT and await self._server_answers():
                strikes += 1
                if strikes >= POISON_STRIKES:
                    reason = (
                        f"server error for this telegram {strikes} times while the server "
                        "answered other requests (poison)"
                    )
                    await self._dead_letter(item, answer, reason)
                    continue
                await self._pause(self.retry_initial / 4)
                continue
            attempt += 1
            await self._pause(self._backoff(attempt, answer.retry_after))

    async def stop(self, grace: float) -> None:
        """Finish an in-flight request (up to ``grace`` seconds), then send nothing more."""
        self._stopping.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()

    async def _whose_refusal(self, answer: Answer) -> str | None:
        """None if a refusal is about the telegram; else what to fix in the sink.

        Refused by the daemon itself (no HTTP status: it cannot be mapped), it is the telegram's.
        A server's refusal is, if the server shows by its health probe that it is DSMR-reader.
        """
        if answer.status is None:
            return None
        if not isinstance(self.sink, Probing):
            return "the sink refuses every telegram; check its configuration"
        probe = await self.sink.probe()
        if probe.verdict is Verdict.DELIVERED:
            return None
        return (
            "the server refuses every telegram and does not answer like DSMR-reader "
            f"(its health probe got: {probe.describe()}); check the sink's url (a proxy or "
            "another web server at that address?)"
        )

    async def _server_answers(self) -> bool:
        """The health probe: does the server work otherwise? (No probe: cannot tell, so no.)"""
        if not isinstance(self.sink, Probing):
            return False
        return (await self.sink.probe()).verdict is Verdict.DELIVERED

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
            answer = await self.sink.send(item)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        if answer.maybe_stored:
            self._maybe_stored[item.seq] = self._maybe_stored.get(item.seq, 0) + 1
        return answer

    async def _delivered(self, item: Item) -> None:
        await self.queues.confirm(self.sink.name, item)
        self.stats.delivered += 1
        self.stats.possible_duplicates += self._maybe_stored.pop(item.seq, 0)
        self.stats.refused_in_a_row = 0
        self._resolved(refused=False)
        if self.stats.failing_since is not None:
            if self._episode_logged or self.stats.misconfigured:
                self._log.info(
                    "sink recovered",
                    failing_for=round(self._clock() - (self.failing_began or 0.0), 1),
                    backlog=len(self.queue),
                )
            self.stats.failing_since = self.failing_began = None
            self.stats.misconfigured = False
            self.stats.fix = None

    async def _dead_letter(self, item: Item, answer: Answer, reason: str) -> None:
        await self.queues.dead_letter(
            self.sink.name, item, status=answer.status, body=answer.body, reason=reason
        )
        self._maybe_stored.pop(item.seq, None)
        self.stats.dead_letters += 1
        self.stats.refused_in_a_row += 1
        self._resolved(refused=True)
        self.stats.last_error = answer.describe()
        self.stats.last_error_at = self._wall()
        self._report.add(reason, answer.describe())

    def _resolved(self, *, refused: bool) -> None:
        if len(self._recent) == RECENT and self._recent[0]:
            self.stats.refused_recently -= 1
        self._recent.append(refused)
        self.stats.refused_recently += refused
        self.stats.resolved_recently = len(self._recent)

    def _failed(self, answer: Answer, *, fix: str | None = None) -> None:
        """Note a failed attempt; log a state change once. ``fix``: the sink is misconfigured."""
        now = self._wall()
        description = answer.describe()
        first = self.stats.failing_since is None
        changed = description != self.stats.last_error
        self.stats.last_error = description
        self.stats.last_error_at = now
        if first:
            self.stats.failing_since, self.failing_began = now, self._clock()
        if answer.verdict is Verdict.MISCONFIGURED and fix is None:
            fix = advice(answer)
        if fix is not None:
            if not self.stats.misconfigured or changed:
                self._log.error(
                    "sink misconfigured; nothing is dead-lettered, telegrams stay queued until "
                    "it is fixed",
                    answer=description,
                    fix=fix,
                    url=getattr(self.sink, "endpoint", None),
                    next_probe_in=self.retry_max,
                    backlog=len(self.queue),
                )
            self.stats.misconfigured = True
            self.stats.fix = fix
        elif first or changed:
            self.stats.misconfigured = False
            self.stats.fix = None
            if first:
                self._episode_logged = self._report.may_log_failure()
            if self._episode_logged:
                self._log.warning(
                    "delivery failing, retrying",
                    answer=description,
                    backlog=len(self.queue),
                    **self._report.unlogged_failures(),
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
