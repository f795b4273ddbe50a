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
    """Why the meter link is not ok (last failure), kept until it is ok again."""
    polls: int = 0
    """Requests to a polled device (HomeWizard, HTTP); 0 for a port."""
    repeats: int = 0
    """Telegrams a polled device served again, skipped."""
    spool: SpoolSnapshot | None = None
