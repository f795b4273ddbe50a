"""The daemon's hold on its spool: one thread for every call, and whether the spool works.

Every spool call blocks (SQLite, fsync), so all of them run, in order, on one thread of their
own. Whether the spool can be written is a state with a start, an end and a cause, not an error
per attempt: ``Trouble`` logs one line when it starts, a reminder every ``REMIND`` seconds with
the number of failures since (whatever their text: two errors alternating once made 59 lines in
30 s), and one line when it ends. The snapshot shows it, and health turns it into a reason.

Invariant: calls run one at a time in the order made, and a call already running is never
cancelled (it may hold telegrams being committed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

REMIND = 300.0
"""Seconds between reminders while a trouble lasts (the summary interval's default)."""


class Trouble:
    """One condition that may last ("the spool cannot be written"), logged per change."""

    def __init__(
        self,
        log: Any,
        what: str,
        *,
        remind: float = REMIND,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._log = log
        self.what = what
        self._remind = remind
        self._clock = clock
        self._wall = wall
        self.since: float | None = None
        """Wall-clock time it started; None while all is well."""
        self.error: str | None = None
        self._started = self._reminded = 0.0
        self._failures = 0
        self._errors: Counter[str] = Counter()

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, error: str, **context: Any) -> None:
        now = self._clock()
        self.error = error
        self._failures += 1
        self._errors[error] += 1
        if self.since is None:
            self.since, self._started, self._reminded = self._wall(), now, now
            self._log.error(self.what, error=error, **context)
            self._failures, self._errors = 0, Counter()
        elif now - self._reminded >= self._remind:
            self._log.error(
                f"still: {self.what}",
                for_seconds=round(now - self._started),
                failures=self._failures,
                errors=dict(self._errors),
                **context,
            )
            self._reminded = now
            self._failures, self._errors = 0, Counter()

    def ended(self, message: str, **context: Any) -> None:
        if self.since is None:
            return
        self._log.info(message, after_seconds=round(self._clock() - self._started, 1), **context)
        self.since = self.error = None
        self._failures, self._errors = 0, Counter()


class SpoolLink:
    """Runs spool calls on the spool's own thread."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        # Shielded: a cancelled caller (shutdown) must not cancel a commit that holds telegrams.
        return await asyncio.shield(job)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
