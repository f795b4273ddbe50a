"""``dsmr-logger status``: one glance at whether it reads and delivers; non-zero when it doesn't.

Asks the running daemon's ``/status`` when ``[http] listen`` is set. Otherwise (or when the
daemon does not answer) it reads the spool file directly, which is safe while the daemon holds it,
and says what it cannot know from there.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

from dsmr_logger.config import Config
from dsmr_logger.delivery.spool import Spool, SpoolError
from dsmr_logger.tools import printable

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_UNKNOWN = 3


class SpoolUnreadable(Exception):
    """The daemon could not be asked, and the spool cannot be read either: both are the answer
    (a user not allowed into the spool's folder must still learn that the daemon is down)."""

    def __init__(self, daemon: str, cause: Exception) -> None:
        super().__init__(f"{daemon}; {cause}")
        self.daemon = daemon
        self.cause = cause


def fetch_status(listen: str, timeout: float = 3.0) -> dict[str, Any]:
    """The daemon's ``/status``; ValueError when what answers there is not a dsmr-logger.

    Asked directly, never through a proxy: ``http_proxy`` in the environment (a proxy for the
    internet) would otherwise carry the question to a machine that cannot see this one's port.
    """
    host, _, port = listen.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "", "[::]", "::") else host
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"http://{host}:{port}/status", timeout=timeout) as answer:
        document: dict[str, Any] = json.load(answer)
    try:
        if not isinstance(document.get("healthy"), bool):
            raise TypeError("no healthy: true/false")
        render(document)  # every field the summary reads is there, of its type
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"what answers there is not dsmr-logger's /status ({exc!r})") from None
    return document


def _ago(timestamp: float | None, now: float) -> str:
    return "never" if timestamp is None else f"{max(0.0, now - timestamp):.0f} s ago"


def _spool_line(spool: dict[str, Any], now: float) -> str:
    if spool["writable"]:
        text = "spool: writable"
    else:
        text = (
            f"spool: CANNOT BE WRITTEN since {_ago(spool['failing_since'], now)}: "
            f"{spool['error']}; {spool['in_memory']} telegrams held only in memory"
        )
    lost = ", ".join(f"{sink} {count}" for sink, count in sorted(spool["lost"].items()))
    return text + (f"; lost to a damaged spool: {lost}" if lost else "")


def render(doc: dict[str, Any]) -> str:
    now = doc["time"]
    meter = doc["meter"]
    state = doc.get("state") or ("healthy" if doc["healthy"] else "unhealthy")
    headline = {"healthy": "healthy", "unhealthy": "UNHEALTHY"}.get(state, state)
    if state == "starting" and doc.get("started_at") is not None:
        headline += f" (started {_ago(doc['started_at'], now)}, no telegram yet)"
    lines = [f"dsmr-logger: {headline}"]
    lines += [f"  ! {reason}" for reason in doc["reasons"]]
    rejected = sum(meter["rejected"].values())
    lines.append(
        f"meter {meter['port']}: {meter['state'].replace('_', ' ')}, last telegram "
        f"{_ago(meter['last_frame_at'], now)}, {meter['frames']} frames, {rejected} rejected, "
        f"{meter['reconnects']} reconnects"
        + (f", {meter['polls']} polls" if meter.get("polls") else "")
        + (
            f", {meter['repeats']} repeats skipped"
            if meter.get("polls") or meter.get("repeats")
            else ""
        )
    )
    if meter.get("last_error"):  # kept once the link is back, with its time
        when = f" ({_ago(meter['last_error_at'], now)})" if meter.get("last_error_at") else ""
        lines.append(f"  last error: {meter['last_error']}{when}")
    reading = doc.get("reading")
    if reading:
        parts = [f"power {reading.get('power') or '-'}"]
        for key in ("delivered_tariff1", "delivered_tariff2", "delivered_total", "mbus_reading"):
            if reading.get(key):
                parts.append(f"{key.replace('_', ' ')} {reading[key]}")
        lines.append("reading: " + ", ".join(parts))
    for sink in doc["sinks"]:
        text = (
            f"sink {sink['name']}: {sink['delivered']} delivered, backlog {sink['backlog']}"
            f", dead-lettered since start {sink['dead_letters']}"
        )
        if sink.get("possible_duplicates"):
            text += f", possibly sent twice {sink['possible_duplicates']}"
        if sink["oldest_age"]:
            text += f", oldest waiting {sink['oldest_age']:.0f} s"
        if sink.get("misconfigured"):
            text += f"; MISCONFIGURED: {sink['last_error']}"
            if sink.get("fix"):
                text += f"; fix: {sink['fix']}"
        elif sink["failing_since"] is not None:
            text += f"; failing since {_ago(sink['failing_since'], now)}: {sink['last_error']}"
        lines.append(text)
    if doc.get("spool"):
        lines.append(_spool_line(doc["spool"], now))
    return "\n".join(lines)


def offline_document(config: Config, reason: str) -> dict[str, Any]:
    """What the spool file alone tells: backlog and dead letters per sink."""
    doc: dict[str, Any] = {"healthy": None, "daemon": reason, "spool": str(config.spool.path)}
    if not config.spool.path.is_file():
        doc["sinks"] = []
        return doc
    spool = Spool(config.spool.path, max_bytes=config.spool.max_bytes)
    spool.open(shared=True)
    try:
        backlogs = spool.backlogs()
        letters = spool.dead_letters()
        counters = spool.counters()
        names = sorted({s.name for s in config.sinks} | set(backlogs) | {d.sink for d in letters})
        doc["sinks"] = [
            {
                "name": name,
                "backlog": backlogs[name].count if name in backlogs else 0,
                "oldest_received_at": backlogs[name].oldest_received_at
                if name in backlogs
                else None,
                "dead_letters": sum(1 for d in letters if d.sink == name),
                "lost": counters.get(name, {}).get("lost", 0),
            }
            for name in names
        ]
    finally:
        spool.close()
    return doc


def render_offline(doc: dict[str, Any]) -> str:
    now = time.time()
    lines = [f"dsmr-logger: state unknown ({doc['daemon']})", f"spool {doc['spool']}:"]
    for sink in doc["sinks"]:
        oldest = sink["oldest_received_at"]
        waiting = f", oldest read {_ago(oldest, now)}" if oldest else ""
        lost = f", lost to a damaged spool {sink['lost']}" if sink.get("lost") else ""
        lines.append(
            f"sink {sink['name']}: backlog {sink['backlog']}{waiting}, "
            f"dead letters held {sink['dead_letters']}{lost}"
        )
    if not doc["sinks"]:
        lines.append("  (no spool file, or nothing in it)")
    return "\n".join(lines)


def status(config: Config, *, as_json: bool, out: TextIO) -> int:
    listen = config.http.listen
    reason = "no [http] listen configured, so the daemon cannot be asked"
    if listen:
        try:
            doc = fetch_status(listen)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            reason = f"the daemon does not answer on {listen}: {_unanswered(exc)}"
        else:
            print(json.dumps(doc, indent=2) if as_json else printable(render(doc)), file=out)
            return EXIT_HEALTHY if doc["healthy"] else EXIT_UNHEALTHY
    try:
        offline = offline_document(config, reason)
    except (SpoolError, OSError, sqlite3.Error) as exc:
        raise SpoolUnreadable(reason, exc) from exc
    print(
        json.dumps(offline, indent=2) if as_json else printable(render_offline(offline)), file=out
    )
    return EXIT_UNKNOWN


def _unanswered(exc: Exception) -> str:
    """Why the daemon's port did not answer, in words ("<urlopen error [Errno 111] ...>" is not)."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError):
        return "nothing listens there (is the daemon running?)"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)
