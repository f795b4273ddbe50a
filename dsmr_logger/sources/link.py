"""A source's link as its ``MeterStatus`` shows it and its log tells it: each change said once.

Every source (the P1 reader, the polled HTTP and HomeWizard sources, the MQTT subscriber, the
Neurio sensor) keeps the same books on its link: connects and disconnects counted, the latest
failure with its time, the state, and a log that says each change once, not once per retry. A
device unreachable for a night is retried every ``reconnect_max`` (60 s by default): 480 retries
in 8 hours, one warning. What differs between sources is only the wording (a port, a device, a
broker, a sensor), passed in as a ``LinkWording``, and whether the last failure stays shown once
the link is back (the P1 reader and Neurio keep it, with its time; the others clear it).

``RejectReport`` is the other half every source shares: a warning about rejected frames at most
once a minute, and only when there are new ones (a DSMR 5 meter whose every telegram fails its
CRC, one a second, is one line a minute, not 60). ``ReconnectBackoff`` paces the attempts of the
P1 reader, the polled sources and the MQTT subscriber alike (Neurio polls on its own grid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from dsmr_logger.sources import MeterState, MeterStatus
from dsmr_logger.sources.p1.framing import RejectedFrame

REJECT_LOG_INTERVAL = 60.0

TO_FIX = frozenset({MeterState.MISCONFIGURED, MeterState.UNAUTHORIZED})
"""Failures a user must fix (logged as errors), not ones that pass by waiting."""


@dataclass(frozen=True, slots=True)
class LinkWording:
    """What a source's log says about its link. Every line carries ``port=status.port``."""

    down: str
    """Warning, once a reason, when the link fails and is retried ("meter link down, retrying");
    the line carries ``reason``."""
    refused: str | None = None
    """Error, once a reason, instead of ``down`` for a failure to fix (misconfigured,
    unauthorized)."""
    unusable: str | None = None
    """Warning, once a reason, instead of ``down`` for an answer with nothing usable in it."""
    up: str | None = None
    """Info when the link comes up the first time, and again after a failure; None: not said."""
    ok: str = "reading valid telegrams"
    """Info on entering ``ok``, with ``was`` (the state before)."""
    silent: str | None = None
    """Warning on entering ``meter_silent``; None: entered without a line."""
    no_valid_frames: str | None = None
    """Warning on entering ``bytes_but_no_valid_frames``; None: entered without a line."""
    no_bytes: str | None = None
    """Warning on entering ``no_bytes``; None: entered without a line."""


class LinkTracker:
    """Tracks a source's link state in its ``MeterStatus`` and logs each change once.

    Invariant: ``status.connects`` and ``status.disconnects`` count the changes of
    ``status.connected`` (``up`` while up, ``down`` while down count nothing); every failure is
    recorded in ``status`` (``last_error``, ``last_error_at``) when it happens, but logged only
    when its reason differs from the last one logged since the link was last up (or since
    ``forget``); a state is logged on entering it, never while it lasts. Entering ``ok`` clears
    the last failure unless ``keeps_error`` (the P1 reader and Neurio: shown, with its time,
    until the next one).
    """

    def __init__(
        self,
        status: MeterStatus,
        wording: LinkWording,
        *,
        log: structlog.typing.FilteringBoundLogger,
        wall_clock: Callable[[], float],
        keeps_error: bool = False,
    ) -> None:
        self.status = status
        self.wording = wording
        self.keeps_error = keeps_error
        self._log = log
        self._wall = wall_clock
        self._down_reason: str | None = None
        """The reason last logged for a failure; None once the link was up since."""

    def up(self, *, quiet: bool = False, **fields: object) -> None:
        """The link is up (no-op if it already is): counted, and said the first time and after a
        failure. ``quiet``: counted only, the failure still the one last said (a reopening by a
        watchdog, while the same failure lasts)."""
        if self.status.connected:
            return
        self.status.connected = True
        self.status.connects += 1
        if quiet:
            return
        if self.wording.up is not None and (
            self._down_reason is not None or self.status.connects == 1
        ):
            self._log.info(self.wording.up, port=self.status.port, **fields)
        self._down_reason = None

    def down(self, reason: str, state: MeterState = MeterState.DISCONNECTED) -> None:
        """The link is lost (or could not be made) for ``reason``; the source retries."""
        if self.status.connected:
            self.status.disconnects += 1
        self.status.connected = False
        self.failing(reason, state)

    def failing(self, reason: str, state: MeterState) -> None:
        """A failure in ``state``, the link left as it is: for a device that answered, but
        not usably (refused, or nothing usable in the answer)."""
        self.status.failed(reason, self._wall())
        self.enter(state)
        if reason == self._down_reason:
            return
        self._down_reason = reason
        if state in TO_FIX:
            self._log.error(
                self.wording.refused or self.wording.down, port=self.status.port, reason=reason
            )
        elif state is MeterState.NO_VALID_FRAMES and self.wording.unusable is not None:
            self._log.warning(self.wording.unusable, port=self.status.port, reason=reason)
        else:
            self._log.warning(self.wording.down, port=self.status.port, reason=reason)

    def forget(self) -> None:
        """Data came: a failure after this is news, even for the reason said last."""
        self._down_reason = None

    def enter(self, state: MeterState, **fields: object) -> None:
        """``state`` is the link's state now: said (with ``fields``) if it is a change."""
        if state is self.status.state:
            return
        previous, self.status.state = self.status.state, state
        if state is MeterState.OK:
            if not self.keeps_error:
                self.status.last_error = self.status.last_error_at = None
            self._log.info(self.wording.ok, port=self.status.port, was=previous.value)
            return
        event = {
            MeterState.SILENT: self.wording.silent,
            MeterState.NO_VALID_FRAMES: self.wording.no_valid_frames,
            MeterState.NO_BYTES: self.wording.no_bytes,
        }.get(state)
        if event is not None:
            self._log.warning(event, port=self.status.port, **fields)


class RejectReport:
    """When to warn about what a source did not pass on: at most once an ``interval``, and only
    when the count of rejections has grown since the last warning.

    Invariant: the ``since_last_report`` of successive warnings add up to the total warned about.
    """

    def __init__(
        self,
        log: structlog.typing.FilteringBoundLogger,
        *,
        interval: float = REJECT_LOG_INTERVAL,
    ) -> None:
        self.interval = interval
        self._log = log
        self._logged = 0
        self._logged_at = -interval

    def due(self, total: int, now: float) -> int | None:
        """How many more were rejected since the last warning, when one is due at loop time
        ``now`` (and then counted as given); None when not."""
        if total == self._logged or now - self._logged_at < self.interval:
            return None
        since, self._logged, self._logged_at = total - self._logged, total, now
        return since

    def frames(
        self,
        counts: dict[str, int],
        last: RejectedFrame | None,
        now: float,
        **fields: object,
    ) -> None:
        """Warn "frames rejected" (``counts`` by reason, the ``last`` one), if due."""
        since = self.due(sum(counts.values()), now)
        if since is None:
            return
        self._log.warning(
            "frames rejected",
            since_last_report=since,
            total=counts,
            last_reason=last.reason.value if last else None,
            last_detail=last.detail if last else None,
            **fields,
        )


class ReconnectBackoff:
    """Pauses between attempts on a failing link: ``initial`` doubling up to ``maximum``, each
    50-100 % of the delay (jitter), back to ``initial`` after ``reset`` (the link worked)."""

    def __init__(self, initial: float, maximum: float, jitter: Callable[[], float]) -> None:
        self.initial, self.maximum, self._jitter = initial, maximum, jitter
        self.delay = initial

    def reset(self) -> None:
        self.delay = self.initial

    def pause(self) -> float:
        """The pause before the next attempt; the delay after it is doubled (up to ``maximum``)."""
        pause = self.delay * (0.5 + self._jitter() / 2)
        self.delay = min(self.delay * 2, self.maximum)
        return pause


def describe_failure(exc: BaseException) -> str:
    """An exception as a link's last error shows it: its kind, then its text (once when the
    text is only the kind)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
