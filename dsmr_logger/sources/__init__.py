"""Where readings come from. Every source ends in the same place: frames handed to the daemon.

A source reads (a P1 port in ``p1/``; other kinds of meter beside it) and passes every complete,
CRC-checked telegram to ``on_frame``; it never exits because of the meter, and it says how the
link is doing in a ``MeterStatus`` that the health verdict, ``/status`` and ``status`` show. A
source that does not speak P1 (a sensor's JSON, a cloud's readings) writes each reading as a DSMR
5 telegram (``telegram.build``) and feeds it through the same ``FrameAssembler`` as bytes from a
cable, so everything after the source carries one kind of record.

A new source: a module here with a class satisfying ``Source``, its configuration dataclass in
``config.METER_TYPES``, and a branch in ``build_source``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dsmr_logger.config import (
    HomeWizardConfig,
    HttpMeterConfig,
    MeterConfig,
    MeterTypeConfig,
    MqttMeterConfig,
    NeurioMeterConfig,
)
from dsmr_logger.sources.p1.framing import Frame, FramingCounters


class MeterState(enum.StrEnum):
    DISCONNECTED = "disconnected"
    NO_BYTES = "no_bytes"
    NO_VALID_FRAMES = "bytes_but_no_valid_frames"
    UNAUTHORIZED = "unauthorized"
    """The device refuses the login (HTTP 401/403): configuration to fix, not a link to wait for."""
    OK = "ok"
    SILENT = "meter_silent"
    """A polled device answers, but has no new telegram from the meter (a 503, or repeats)."""
    MISCONFIGURED = "misconfigured"
    """A polled device refuses us for a reason retrying will not fix (token, address, name)."""


@dataclass(slots=True)
class MeterStatus:
    """What a source knows about its link, for summaries and the status endpoint."""

    port: str
    """Where it reads: a device path, a ``socket://`` address or a URL (never with credentials)."""
    connected: bool = False
    attempts: int = 0
    """Times the link was opened or tried: a failed open counts (65 s of retrying is not "0")."""
    connects: int = 0
    disconnects: int = 0
    idle_reconnects: int = 0
    last_byte_at: float | None = None
    last_frame_at: float | None = None
    last_error: str | None = None
    """Why the link last failed ("cannot open: ...", "no bytes for 30 s, ..."). The P1 reader and
    the Neurio source keep it after the link is back, with ``last_error_at``; the HTTP, HomeWizard
    and MQTT sources clear both when ok (``link.LinkTracker``, ``keeps_error``)."""
    last_error_at: float | None = None
    state: MeterState = MeterState.DISCONNECTED
    polls: int = 0
    """Requests made to a polled device (0 for a port, which is read, not polled)."""
    repeats: int = 0
    """Telegrams fetched again that were already taken (same meter timestamp): skipped."""

    def failed(self, reason: str, at: float) -> None:
        """The link's latest failure and when it happened (shown until the next one)."""
        self.last_error, self.last_error_at = reason, at


class Source(Protocol):
    """Reads forever, handing each valid frame to the ``on_frame`` it was built with."""

    status: MeterStatus

    @property
    def counters(self) -> FramingCounters: ...

    def rejected(self) -> dict[str, int]:
        """What was not passed on, by reason (CRC mismatch, decryption failed, ...)."""
        ...

    async def run(self) -> None: ...


def build_source(
    config: MeterTypeConfig,
    on_frame: Callable[[Frame], None],
    *,
    wall_clock: Callable[[], float] = time.time,
    state_path: Path | None = None,
) -> Source:
    """The source a ``[meter]`` section describes.

    ``state_path``: where a polled source (or the MQTT one) keeps the last telegram it took across
    a restart, so a device still serving that telegram after the restart (or a broker sending it
    again as retained) does not get it delivered twice.
    """
    if isinstance(config, MeterConfig):
        from dsmr_logger.sources.p1.reader import MeterReader

        return MeterReader(config, on_frame, wall_clock=wall_clock)
    if isinstance(config, NeurioMeterConfig):
        from dsmr_logger.sources.neurio import NeurioSource

        return NeurioSource(config, on_frame, wall_clock=wall_clock)
    if isinstance(config, HomeWizardConfig):
        from dsmr_logger.sources.homewizard import homewizard_source

        return homewizard_source(config, on_frame, wall_clock=wall_clock, state_path=state_path)
    if isinstance(config, HttpMeterConfig):
        from dsmr_logger.sources.http_poll import http_source

        return http_source(config, on_frame, wall_clock=wall_clock, state_path=state_path)
    if isinstance(config, MqttMeterConfig):
        from dsmr_logger.sources.mqtt_in import mqtt_source

        return mqtt_source(config, on_frame, wall_clock=wall_clock, state_path=state_path)
    raise ValueError(f"no source for meter type {config.type!r}")  # config validated the type
