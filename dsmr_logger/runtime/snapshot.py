"""What the daemon is doing, captured at one instant: the values status pages and logs show."""

from __future__ import annotations

from dataclasses import dataclass


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
