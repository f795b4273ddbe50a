"""A meter behind HTTP: poll a URL that serves the raw telegram, at ``interval``, forever.

ESP P1 loggers (the DSMR-logger family), and the HomeWizard P1 Meter (``homewizard.py``, which
supplies its own fetch), keep the meter's latest telegram and hand it out on request. Polling once
a second over one keep-alive connection costs a request of a few hundred bytes; a DSMR 5 meter
sends a telegram a second, so every poll brings about one new telegram, and a DSMR 4 meter's
(every 10 s) nine polls in ten bring a repeat, which ``Intake`` skips and counts.

Like the P1 reader it never exits because of the meter, logs each change of link state once (not
once per poll), and tells apart what a user must fix (``Misconfigured``: a refused token, a wrong
address or certificate; retried only every ``reconnect_max``) from what passes (``PollFailed``:
the device unreachable, backing off from ``reconnect_initial``) and from a device that answers
but has nothing new (``MeterSilent``: polled on at ``interval``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog

from dsmr_logger.config import HomeWizardConfig, HttpMeterConfig
from dsmr_logger.net.http import HttpClient, HttpError, Response, basic_auth, tls_context
from dsmr_logger.sources import MeterState, MeterStatus
from dsmr_logger.sources.intake import Intake, LastTaken
from dsmr_logger.sources.link import LinkTracker, LinkWording, ReconnectBackoff, RejectReport
from dsmr_logger.sources.p1.framing import Frame, FramingCounters

MAX_BODY = 64 * 1024
"""A telegram is 0.5-3 KiB; an answer larger than this is cut (and then fails its CRC)."""


class PollFailed(Exception):
    """This poll brought no telegram for a reason that may pass (unreachable, 5xx, timeout)."""


class MeterSilent(PollFailed):
    """The device answered: it has no telegram from the meter (P1 cable, meter's P1 port off)."""


class Misconfigured(PollFailed):
    """The device refuses us for a reason retrying will not fix; the message says what to do."""


WORDING = LinkWording(
    up="meter device answers",
    down="meter device unreachable, retrying",
    refused="meter device refuses us",
    silent="no new telegram from the meter; check the dongle sits in the meter's P1 port "
    "(and that the port is enabled)",
    no_valid_frames="the device answers, but with no valid telegram; check meter.url",
)


class Fetcher(Protocol):
    """Gets the device's current payload; raises ``PollFailed`` (or a subclass) when it can't."""

    async def fetch(self) -> bytes: ...

    async def close(self) -> None: ...


PolledConfig = HomeWizardConfig | HttpMeterConfig


class PollingSource:
    """Polls ``fetcher`` every ``config.interval`` s and feeds each payload to one ``Intake``.

    Invariant: at most one request is in flight; every payload fetched goes through the intake,
    so each distinct telegram reaches ``on_frame`` once, in the order fetched.
    """

    def __init__(
        self,
        config: PolledConfig,
        fetcher: Fetcher,
        on_frame: Callable[[Frame], None],
        *,
        wall_clock: Callable[[], float] = time.time,
        state_path: Path | None = None,
        jitter: Callable[[], float] = random.random,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.config = config
        self.status = MeterStatus(port=config.where)
        self._fetcher = fetcher
        self._wall = wall_clock
        self._jitter = jitter
        self._log = log or structlog.get_logger("dsmr_logger.meter")
        self._last_taken = LastTaken(state_path)
        self.intake = Intake(
            on_frame,
            require_crc=config.require_crc,
            last_key=self._last_taken.load(),
            log=self._log,
            where=config.where,
        )
        self._link = LinkTracker(self.status, WORDING, log=self._log, wall_clock=wall_clock)
        self._rejects = RejectReport(self._log)
        self._last_new = 0.0  # loop time of the last new telegram (or of start)

    @property
    def counters(self) -> FramingCounters:
        return self.intake.counters

    def rejected(self) -> dict[str, int]:
        return self.intake.assembler.counters.rejected_counts()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_new = loop.time()
        backoff = ReconnectBackoff(
            self.config.reconnect_initial, self.config.reconnect_max, self._jitter
        )
        try:
            while True:
                started = loop.time()
                pause = await self._poll_once(loop.time)
                if pause is None:  # a good poll: the next one an interval after this one began
                    backoff.reset()
                    pause = max(0.0, self.config.interval - (loop.time() - started))
                elif pause < 0:  # a passing failure: back off
                    pause = backoff.pause()
                await asyncio.sleep(pause)
        finally:
            self._last_taken.save(self.intake.last_key)
            await self._fetcher.close()

    async def _poll_once(self, now: Callable[[], float]) -> float | None:
        """Poll; None after an answer with a telegram, else the pause before the next poll
        (negative: back off)."""
        self.status.polls += 1
        self.status.attempts += 1
        try:
            payload = await self._fetcher.fetch()
        except asyncio.CancelledError:
            raise
        except MeterSilent as exc:
            self._link.up()
            self._no_news(str(exc), now(), at_once=True)
            return self.config.interval
        except Misconfigured as exc:
            self._link.down(str(exc), MeterState.MISCONFIGURED)
            return self.config.reconnect_max
        except PollFailed as exc:
            self._link.down(str(exc))
            return -1.0
        self._link.up()
        self._take(payload, now())
        return None

    def _take(self, payload: bytes, now: float) -> None:
        received_at = self._wall()
        self.status.last_byte_at = received_at
        taken, repeats = self.intake.feed(payload, received_at)
        self.status.repeats = self.intake.repeats
        if taken:
            self.status.last_frame_at = received_at
            self._last_new = now
            self._link.enter(MeterState.OK)
        elif repeats:
            self._no_news("the device serves the same telegram over and over", now)
        elif now - self._last_new > self.config.idle_timeout:
            self._link.enter(MeterState.NO_VALID_FRAMES)
        self._rejects.frames(self.rejected(), self.intake.assembler.last_rejected, now)

    def _no_news(self, reason: str, now: float, *, at_once: bool = False) -> None:
        """Nothing new this poll: a state once it lasts ``idle_timeout`` (at once when the
        device itself says the meter is silent)."""
        if at_once or now - self._last_new > self.config.idle_timeout:
            self.status.failed(reason, self._wall())
            self._link.enter(MeterState.SILENT, reason=reason)


# --- type = "http": any endpoint serving the raw telegram -------------------------------------


def failure_of(response: Response, where: str) -> PollFailed:
    """What a non-200 answer from a telegram endpoint means for the user."""
    status = response.status
    if status in (401, 403):
        return Misconfigured(
            f"HTTP {status} from {where}: credentials refused; check meter.username/password "
            "or meter.token"
        )
    if status == 404:
        return Misconfigured(f"HTTP 404 from {where}: no such path; check meter.url")
    if 300 <= status < 400:
        target = response.headers.get("location", "?")
        return Misconfigured(
            f"HTTP {status} from {where}: redirected to {target[:200]}; set meter.url to "
            "where it points (redirects are not followed)"
        )
    if status == 503:
        return MeterSilent(f"HTTP 503 from {where}: the device has no telegram")
    return PollFailed(f"HTTP {status} from {where}")


class HttpFetcher:
    """GET the configured URL over one keep-alive connection; 200 → the body."""

    def __init__(self, config: HttpMeterConfig) -> None:
        self.config = config
        base, self._path = _split(config.url)
        headers: dict[str, str] = {"Accept": "text/plain, */*"}
        headers.update(config.headers or ())
        if config.token is not None:
            headers["Authorization"] = f"Bearer {config.token}"
        elif config.username is not None:
            headers["Authorization"] = basic_auth(config.username, config.password or "")
        context = None
        if base.startswith("https:"):
            context = tls_context(ca_file=str(config.ca_file) if config.ca_file else None)
        self._client = HttpClient(
            base,
            timeout=config.timeout,
            headers=headers,
            max_body=MAX_BODY,
            ssl_context=context,
            idle_timeout=max(5.0, 2 * config.interval),
        )

    async def fetch(self) -> bytes:
        try:
            response = await self._client.get(self._path)
        except HttpError as exc:
            raise PollFailed(f"{self.config.url}: {exc}") from exc
        if response.status != 200:
            raise failure_of(response, self.config.url)
        return response.body

    async def close(self) -> None:
        await self._client.close()


def _split(url: str) -> tuple[str, str]:
    """(scheme://host[:port], /path?query) of a URL."""
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host}", f"/{path}" if slash else "/"


def http_source(
    config: HttpMeterConfig,
    on_frame: Callable[[Frame], None],
    *,
    wall_clock: Callable[[], float] = time.time,
    state_path: Path | None = None,
) -> PollingSource:
    return PollingSource(
        config, HttpFetcher(config), on_frame, wall_clock=wall_clock, state_path=state_path
    )
