"""Is it working? One pure verdict from a snapshot, shared by /healthz, /status and ``status``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsmr_logger.config import HttpConfig
from dsmr_logger.runtime.snapshot import Snapshot
from dsmr_logger.telegram.glance import glance


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reasons: tuple[str, ...]


def judge(snap: Snapshot, now: float, limits: HttpConfig) -> Health:
    """Healthy: a valid frame within ``frame_window``, the meter's device not refusing us (a
    token, a certificate), and no sink failing past ``sink_failing``."""
    reasons = []
    if snap.last_frame_at is None or now - snap.last_frame_at > limits.frame_window:
        since = "yet" if snap.last_frame_at is None else f"for {now - snap.last_frame_at:.0f} s"
        state = snap.meter_state.replace("_", " ")
        if snap.meter_error and snap.meter_state != "ok":
            state = f"{state}: {snap.meter_error}"
        reasons.append(f"no valid telegram {since} (meter state: {state})")
    elif snap.meter_state == "misconfigured":  # refused for good: no need to wait for the window
        reasons.append(f"meter misconfigured: {snap.meter_error}")
    for sink in snap.sinks:
        if sink.failing_since is not None and now - sink.failing_since > limits.sink_failing:
            reasons.append(
                f"sink {sink.name} failing for {now - sink.failing_since:.0f} s: {sink.last_error}"
            )
    return Health(not reasons, tuple(reasons))


def status_document(snap: Snapshot, now: float, limits: HttpConfig) -> dict[str, Any]:
    """The JSON of ``GET /status`` (and of ``dsmr-logger status --json``)."""
    health = judge(snap, now, limits)
    reading = glance(snap.last_telegram) if snap.last_telegram else None
    return {
        "healthy": health.ok,
        "reasons": list(health.reasons),
        "time": now,
        "meter": {
            "port": snap.port,
            "connected": snap.connected,
            "state": snap.meter_state,
            "last_frame_at": snap.last_frame_at,
            "frames": snap.frames,
            "rejected": snap.rejected,
            "bytes": snap.bytes_in,
            "garbage_bytes": snap.garbage_bytes,
            "reconnects": snap.reconnects,
            "last_error": snap.meter_error,
            "polls": snap.polls,
            "repeats": snap.repeats,
        },
        "reading": None
        if reading is None
        else {"meter": reading.header, "power": reading.power(), **reading.values},
        "sinks": [
            {
                "name": sink.name,
                "delivered": sink.delivered,
                "backlog": sink.backlog,
                "oldest_age": sink.oldest_age,
                "retries": sink.retries,
                "dead_letters": sink.dead_letters,
                "dropped": sink.dropped,
                "throttled": sink.throttled,
                "failing_since": sink.failing_since,
                "misconfigured": sink.misconfigured,
                "last_error": sink.last_error,
                "last_error_at": sink.last_error_at,
            }
            for sink in snap.sinks
        ],
    }
