"""What the daemon is doing, captured at one instant: the values status pages and logs show."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SinkSnapshot:
    name: str
    delivered: int
    backlog: int
    oldest_age: float | None
    retries: int
    dead_letters: int
    dropped: int
    throttled: int
    last_error: str | None
    last_error_at: float | None
    failing_since: float | None
    misconfigured: bool
    fix: str | None = None
    """What to change in the sink's configuration, while it is misconfigured."""
    possible_duplicates: int = 0
    """Failed attempts that may have stored a telegram that was then stored again."""
    refused_in_a_row: int = 0
    """Telegrams dead-lettered since the last delivery."""
    refused_recently: int = 0
    """Telegrams dead-lettered among the last ``resolved_recently`` delivered or dead-lettered."""
    resolved_recently: int = 0


@dataclass(frozen=True, slots=True)
class SpoolSnapshot:
    """Whether the spool can be written, and what waits in memory meanwhile."""

    writable: bool
    error: str | None
    failing_since: float | None
    in_memory: int
    """Telegrams held only in memory (not yet spooled, some sink still waiting)."""
    lost: Mapping[str, int] = field(default_factory=dict)
    """Telegrams lost to a damaged spool, per sink."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a summary line, the demo or a status page shows, taken at one instant."""

    port: str
    meter_state: str
    connected: bool
    frames: int
    rejected: dict[str, int]
    bytes_in: int
    garbage_bytes: int
    reconnects: int
    last_frame_at: float | None
    last_telegram: bytes | None
    sinks: tuple[SinkSnapshot, ...]
    meter_error: str | None = None
    """Why the meter link last failed. A polled device clears it once it is ok again; the P1
    reader keeps it, with ``meter_error_at``, so "why was it down?" has an answer later."""
    polls: int = 0
    """Requests to a polled device (HomeWizard, HTTP); 0 for a port."""
    repeats: int = 0
    """Telegrams a polled device served again, skipped."""
    meter_error_at: float | None = None
    """When ``meter_error`` happened (Unix time)."""
    meter_attempts: int = 0
    """Times the link was opened or tried, failed opens included (0 for a polled device)."""
    started_at: float | None = None
    """When the daemon started (Unix time): health allows ``frame_window`` for a first frame."""
    spool: SpoolSnapshot | None = None
    stopping: bool = False
    """Told to stop (SIGTERM, SIGINT, SIGHUP): no telegram is read any more while the sinks
    finish (up to ``STOP_GRACE``) and the spool is committed."""
