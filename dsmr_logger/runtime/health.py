"""Is it working? One pure verdict from a snapshot, shared by /healthz, /status and ``status``.

Healthy means telegrams are read and delivered. Unhealthy names each reason: no valid telegram for
``frame_window`` (with the link's last error: what a user needs to fix it), a meter device or a
sink misconfigured (at once: it will not fix itself), a sink failing for longer than
``sink_failing``, or a sink whose last ``REFUSED_RUN`` telegrams were all dead-lettered (a server
refusing everything must not look healthy), or that dead-lettered ``REFUSED_RUN`` of its last 100
(every other one refused forms no run, yet half the readings are not stored). Right after a
start the meter has had no time to send a telegram: for ``frame_window`` the state is "starting"
and healthy, so monitoring does not flap on every restart (measured before: 503 "no valid
telegram for ever" 0.3 s after each restart). While it stops (the sinks finishing their
requests, up to 5 s) it reads nothing: "stopping", a reason, not "healthy".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsmr_logger.config import HttpConfig
from dsmr_logger.runtime.snapshot import SinkSnapshot, Snapshot, SpoolSnapshot
from dsmr_logger.telegram.glance import glance

REFUSED = frozenset({"misconfigured", "unauthorized"})
"""Meter states that are configuration to fix (a device refusing a token or login): a reason at
once, even while starting."""
REFUSED_RUN = 10
"""Telegrams dead-lettered in a row (nothing delivered between), or among the last 100 resolved,
that make a sink unhealthy."""


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reasons: tuple[str, ...]
    state: str = "healthy"
    """"starting" (no telegram yet, within ``frame_window`` of the start), "healthy",
    "unhealthy", or "stopping" (told to stop: unhealthy, so a monitor or a load balancer
    stops counting on it while it finishes, up to ``STOP_GRACE``)."""


def judge(snap: Snapshot, now: float, limits: HttpConfig) -> Health:
    """Healthy: a valid frame within ``frame_window`` (or still starting), the meter's device
    not refusing us (a token, a certificate), and every sink delivering or failing for less than
    ``sink_failing``."""
    reasons = []
    starting = (
        snap.last_frame_at is None
        and snap.started_at is not None
        and now - snap.started_at <= limits.frame_window
    )
    stale = snap.last_frame_at is None or now - snap.last_frame_at > limits.frame_window
    if stale and not starting:
        reasons.append(_meter_reason(snap, now))
    elif snap.meter_state in REFUSED:  # refused for good: no need to wait for the window
        reasons.append(f"meter {snap.meter_state}: {snap.meter_error}")
    for sink in snap.sinks:
        reasons.extend(_sink_reasons(sink, now, limits))
    if snap.spool is not None and not snap.spool.writable:
        reasons.append(_spool_reason(snap.spool, now))
    if snap.stopping:
        reasons.insert(0, "stopping: no telegram is read any more")
        return Health(False, tuple(reasons), "stopping")
    state = "unhealthy" if reasons else "starting" if starting else "healthy"
    return Health(not reasons, tuple(reasons), state)


def _meter_reason(snap: Snapshot, now: float) -> str:
    if snap.last_frame_at is not None:
        silence = f"for {now - snap.last_frame_at:.0f} s"
    elif snap.started_at is not None:
        silence = f"since the start {now - snap.started_at:.0f} s ago"
    else:
        silence = "since the start"
    state = snap.meter_state.replace("_", " ")
    link = ""
    if snap.meter_error is not None and snap.meter_state != "ok":
        at = snap.meter_error_at
        when = "" if at is None else f" {max(0.0, now - at):.0f} s ago"
        attempts = f"; {snap.meter_attempts} attempts" if snap.meter_attempts else ""
        link = f"; last error{when}: {snap.meter_error}{attempts}"
    return f"no valid telegram {silence} (meter state: {state}{link})"


def _sink_reasons(sink: SinkSnapshot, now: float, limits: HttpConfig) -> list[str]:
    reasons = []
    if sink.misconfigured:
        fix = f"; fix: {sink.fix}" if sink.fix else ""
        reasons.append(f"sink {sink.name} misconfigured: {sink.last_error}{fix}")
    elif sink.failing_since is not None and now - sink.failing_since > limits.sink_failing:
        reasons.append(
            f"sink {sink.name} failing for {now - sink.failing_since:.0f} s: {sink.last_error}"
        )
    if sink.refused_in_a_row >= REFUSED_RUN:
        reasons.append(
            f"sink {sink.name}: the last {sink.refused_in_a_row} telegrams were all "
            f"dead-lettered ({sink.last_error}); see dsmr-logger spool list"
        )
    elif sink.refused_recently >= REFUSED_RUN:
        reasons.append(
            f"sink {sink.name}: {sink.refused_recently} of the last {sink.resolved_recently} "
            f"telegrams were dead-lettered ({sink.last_error}); see dsmr-logger spool list"
        )
    return reasons


def _spool_reason(spool: SpoolSnapshot, now: float) -> str:
    """A spool that cannot be written: nothing new survives a restart (issue 12, item 1)."""
    since = "" if spool.failing_since is None else f" for {now - spool.failing_since:.0f} s"
    return (
        f"spool cannot be written{since}: {spool.error}; "
        f"{spool.in_memory} telegrams held only in memory"
    )


def status_document(snap: Snapshot, now: float, limits: HttpConfig) -> dict[str, Any]:
    """The JSON of ``GET /status`` (and of ``dsmr-logger status --json``)."""
    health = judge(snap, now, limits)
    reading = glance(snap.last_telegram) if snap.last_telegram else None
    return {
        "healthy": health.ok,
        "state": health.state,
        "reasons": list(health.reasons),
        "time": now,
        "started_at": snap.started_at,
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
            "attempts": snap.meter_attempts,
            "last_error": snap.meter_error,
            "last_error_at": snap.meter_error_at,
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
                "refused_in_a_row": sink.refused_in_a_row,
                "refused_recently": sink.refused_recently,
                "possible_duplicates": sink.possible_duplicates,
                "dropped": sink.dropped,
                "throttled": sink.throttled,
                "failing_since": sink.failing_since,
                "misconfigured": sink.misconfigured,
                "fix": sink.fix,
                "last_error": sink.last_error,
                "last_error_at": sink.last_error_at,
            }
            for sink in snap.sinks
        ],
        "spool": None
        if snap.spool is None
        else {
            "writable": snap.spool.writable,
            "error": snap.spool.error,
            "failing_since": snap.spool.failing_since,
            "in_memory": snap.spool.in_memory,
            "lost": dict(snap.spool.lost),
        },
    }
