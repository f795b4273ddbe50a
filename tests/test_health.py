"""Health that cannot lie: a running daemon process, read through its status endpoint over time.

Each test starts ``dsmr-logger run`` as a process with ``[http] listen`` set and polls
``/healthz`` the way a monitoring system does (every 50 ms, from a thread, for the whole test),
then asserts on the series of verdicts and reasons, not on one sample: a sink that rejects
everything, the first seconds after a (re)start, a meter port that cannot be opened, a redirect,
what may have been stored twice, a status port in use, and SIGHUP.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import waiting
from aiohttp import web
from conftest import REPO_ROOT
from dsmr_reader_server import DsmrReaderProcess, DsmrReaderServer
from prometheus_client.parser import text_string_to_metric_families
from test_daemon_process import (
    API_KEY,
    SINK,
    Processes,
    dead_letters_in_spool,
    log_events,
    log_tail,
    pending_in_spool,
    received_count,
    stamp,
    started,
    terminate,
    unique_capture,
    wait_until,
    wait_until_quiet,
    write_config,
)
from test_http_client import dead_v4_live_v6

from dsmr_logger.config import Config, from_mapping
from dsmr_logger.daemon import Daemon
from dsmr_logger.delivery.spool import Spool
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort

TELEGRAMS = frames_in(default_capture())

INTERVAL = 0.05
"""Seconds between the simulated meter's telegrams."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fetch(port: int, path: str) -> tuple[int | None, Any]:
    """(HTTP status, JSON or text) of one GET; (None, error) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            status, data = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    except OSError as exc:
        return None, str(exc)
    text = data.decode()
    return status, json.loads(text) if text.startswith("{") else text


@dataclass(frozen=True)
class Sample:
    at: float
    status: int | None
    body: Any

    @property
    def reasons(self) -> str:
        return " | ".join(self.body["reasons"]) if isinstance(self.body, dict) else ""


class Monitor:
    """Polls ``/healthz`` every ``interval`` seconds from a thread, like a monitoring system."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.port = port
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = fetch(self.port, "/healthz")
            self.samples.append(Sample(time.monotonic(), status, body))
            self._stop.wait(self.interval)

    def answered(self, since: float = 0.0) -> list[Sample]:
        return [s for s in self.samples if s.status is not None and s.at >= since]

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture
def server() -> Iterator[DsmrReaderProcess]:
    with DsmrReaderProcess(API_KEY) as process:
        yield process


def status_of(port: int) -> dict[str, Any]:
    code, doc = fetch(port, "/status")
    assert code == 200, (code, doc)
    assert isinstance(doc, dict)
    return doc


def endpoint_up(port: int) -> None:
    wait_until(lambda: fetch(port, "/status")[0] == 200, 30.0, "the status endpoint")


def sink_status(port: int) -> dict[str, Any]:
    (sink,) = status_of(port)["sinks"]
    assert isinstance(sink, dict)
    return sink


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, text = fetch(port, "/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def a_meter(procs: Processes, tmp_path: Path, count: int = 4000) -> subprocess.Popen[Any]:
    """A meter that plays distinct telegrams until the test stops it (terminate())."""
    return procs.meter(
        interval=INTERVAL, count=count, capture=unique_capture(tmp_path / "capture.log", count)
    )


def read_stamps(log: Path) -> list[str]:
    return [e["meter_timestamp"] for e in log_events(log) if e.get("event") == "telegram"]


def wait_until_delivered(server: DsmrReaderProcess, log: Path, timeout: float = 60.0) -> None:
    """Wait until every telegram the daemon read (its log) is at the server: a condition, not a
    quiet spell, which a loaded machine can give while a backlog is still on its way."""

    def missing() -> list[str]:
        return sorted(set(read_stamps(log)) - {stamp(t) for t in server.received()})

    wait_until(
        lambda: not missing(),
        timeout,
        "every telegram read to be delivered",
        detail=lambda: f"missing {missing()[:5]}",
    )


def events(log: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(log) if e.get("event") == name]


# --- issue 12 item 2: a sink that rejects everything ---------------------------------------------


def test_a_proxy_refusing_everything_makes_the_sink_misconfigured_and_dead_letters_nothing(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """Telegrams flow; then a reverse proxy in front starts answering 400 with its own HTML page
    to every request. Nothing may be dead-lettered (the telegrams are fine; the sink is not),
    everything stays queued, one error names the sink, and /healthz says 503 naming the sink for
    as long as it lasts; once the proxy is fixed, the backlog arrives in order. (Before: 39 of 39
    dead-lettered, healthy.)"""
    port = free_port()
    config = write_config(
        tmp_path,
        server.url,
        level="debug",
        sink={"retry_max": 0.5},
        http={"listen": f"127.0.0.1:{port}"},
    )
    daemon, log = procs.daemon(config)
    meter = a_meter(procs, tmp_path)
    wait_until(lambda: received_count(server) >= 10, 20.0, "10 deliveries")
    server.control(mode="proxy_bad_request")
    with Monitor(port) as monitor:
        wait_until(
            lambda: len(read_stamps(log)) >= 50,
            20.0,
            "40 more telegrams read",
            detail=lambda: log_tail(log),
        )
        first_bad = wait_until(
            lambda: next((s for s in monitor.samples if s.status == 503), None), 10.0, "a 503"
        )
        wait_until(lambda: len(monitor.answered(first_bad.at)) >= 20, 10.0, "20 more samples")
        sink = sink_status(port)
        later = monitor.answered(first_bad.at)
    assert all(s.status == 503 for s in later), [s.status for s in later]
    assert all(f"sink {SINK} misconfigured: HTTP 400" in s.reasons for s in later)
    assert all("does not answer like DSMR-reader" in s.reasons for s in later)
    assert sink["dead_letters"] == 0 and sink["misconfigured"] is True
    assert sink["backlog"] >= 20  # kept, not dead-lettered
    errors = [e for e in log_events(log) if e.get("level") == "error"]
    assert len(errors) == 1 and errors[0]["sink"] == SINK, errors
    assert events(log, "telegrams dead-lettered") == []

    server.control(mode="ok")  # the proxy fixed: probed again within retry_max
    wait_until(lambda: fetch(port, "/healthz")[0] == 200, 10.0, "healthy again")
    meter.terminate()
    meter.wait(timeout=10)
    wait_until_delivered(server, log)
    assert terminate(daemon)[0] == 0
    delivered = [stamp(t) for t in server.received()]
    assert delivered == read_stamps(log), "not every telegram read, in order, once"
    assert dead_letters_in_spool(tmp_path / "spool.sqlite3") == []


def test_a_run_of_refusals_is_dead_lettered_summarised_and_unhealthy_while_it_lasts(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """DSMR-reader itself refuses every telegram ("Failed to parse telegram") while it answers
    its health probe: each is dead-lettered (kept, requeueable), the log says so in a line with
    a count (not a line per telegram), and /healthz is 503 naming the sink once ten in a row
    went; when telegrams are taken again, health is back (once fewer than ten of the last 100
    were refused)."""
    server.control(poison_substring="ISK5", poison_answer="parse_failure")  # every telegram
    port = free_port()
    config = write_config(tmp_path, server.url, level="debug", http={"listen": f"127.0.0.1:{port}"})
    daemon, log = procs.daemon(config)
    endpoint_up(port)
    meter = a_meter(procs, tmp_path)
    with Monitor(port) as monitor:
        wait_until(lambda: sink_status(port)["dead_letters"] >= 30, 20.0, "30 dead letters")
        first_bad = wait_until(
            lambda: next((s for s in monitor.samples if s.status == 503), None), 10.0, "a 503"
        )
        wait_until(lambda: len(monitor.answered(first_bad.at)) >= 10, 10.0, "10 more samples")
        lasting = monitor.answered(first_bad.at)
        server.control(poison_substring=None)
        wait_until(  # once the refusals fall out of the last 100 telegrams
            lambda: any(s.status == 200 for s in monitor.answered(first_bad.at)),
            30.0,
            "healthy again",
        )
        recovered = monitor.answered(first_bad.at)
    meter.terminate()
    meter.wait(timeout=10)
    wait_until_quiet(server, 1.0, 20.0)
    dead = sink_status(port)["dead_letters"]
    assert terminate(daemon)[0] == 0
    run = recovered[: next(i for i, s in enumerate(recovered) if s.status == 200)]
    assert len(run) >= 10 and all(s.status == 503 for s in run)
    assert all(f"sink {SINK}: the last" in s.reasons for s in lasting)
    assert all(
        "were all dead-lettered (HTTP 500 Failed to parse telegram)" in s.reasons for s in lasting
    )
    assert all(  # then "N of the last 100 were dead-lettered" until they are out of it
        "dead-lettered (HTTP 500 Failed to parse telegram)" in s.reasons for s in run
    )
    warnings = events(log, "telegrams dead-lettered")
    assert (
        sum(w["count"] for w in warnings)
        == dead
        == len(dead_letters_in_spool(tmp_path / "spool.sqlite3"))
    )
    assert len(warnings) <= 2, [w["count"] for w in warnings]
    print(f"{dead} dead-lettered in a run, {len(warnings)} warning lines, {len(run)} samples 503")


# --- issue 12 item 3: a grace period after a start -----------------------------------------------


def test_no_503_right_after_a_restart_and_no_for_ever(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """For frame_window after a start the daemon is "starting" (200); without a telegram by then
    it is 503 "no valid telegram since the start N s ago"; a restart with the meter running is
    never 503. (Before: 503 "no valid telegram for ever" 0.3 s after every restart.)"""
    port = free_port()
    config = write_config(
        tmp_path, server.url, level="debug", http={"listen": f"127.0.0.1:{port}", "frame_window": 4}
    )
    with Monitor(port) as monitor:
        daemon, log = procs.daemon(config)  # no meter yet
        wait_until(lambda: any(s.status == 503 for s in monitor.samples), 20.0, "a 503")
        silent = monitor.answered()
        meter = a_meter(procs, tmp_path)
        wait_until(lambda: fetch(port, "/healthz")[0] == 200, 10.0, "healthy with a meter")
        assert terminate(daemon)[0] == 0
        restart_at, before = time.monotonic(), received_count(server)
        daemon, log = procs.daemon(config)
        wait_until(lambda: received_count(server) >= before + 20, 20.0, "20 deliveries")
        wait_until(lambda: len(monitor.answered(restart_at)) >= 20, 10.0, "20 samples")
        restarted = monitor.answered(restart_at)
    meter.terminate()
    meter.wait(timeout=10)
    assert terminate(daemon)[0] == 0
    first_503 = next(i for i, s in enumerate(silent) if s.status == 503)
    assert first_503 > 0, "503 at the first answer: no grace"
    assert all(s.status == 200 and s.body["state"] == "starting" for s in silent[:first_503])
    assert all(s.status == 503 for s in silent[first_503:])
    assert "no valid telegram since the start" in silent[first_503].reasons
    assert [s.status for s in restarted] == [200] * len(restarted)
    assert {s.body["state"] for s in restarted} <= {"starting", "healthy"}
    everything = json.dumps([s.body for s in monitor.samples]) + log.read_text()
    assert "for ever" not in everything and "forever" not in everything


# --- issue 12 item 4: why is the meter down? -----------------------------------------------------


def test_the_meter_links_last_error_its_time_and_attempts_are_shown_everywhere(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """A port that cannot be opened: /status, /healthz's reason, /metrics and ``dsmr-logger
    status`` say why and when, and count the failed opens (before: "disconnected", reconnects 0
    after a minute of retrying, the reason only in the log)."""
    port = free_port()
    config = write_config(
        tmp_path, server.url, http={"listen": f"127.0.0.1:{port}", "frame_window": 1}
    )
    daemon, _ = procs.daemon(config)
    endpoint_up(port)
    with Monitor(port) as monitor:
        wait_until(lambda: status_of(port)["meter"]["attempts"] >= 5, 20.0, "5 attempts")
        first = status_of(port)
        wait_until(
            lambda: status_of(port)["meter"]["attempts"] >= first["meter"]["attempts"] + 3,
            10.0,
            "3 more",
        )
        second = status_of(port)

        def unhealthy() -> list[Sample]:
            return [s for s in monitor.answered() if s.status == 503]

        wait_until(lambda: len(unhealthy()) >= 5, 10.0, "5 samples past frame_window")
        samples = unhealthy()
    meter_path = str(tmp_path / "meter")
    for doc in (first, second):
        assert doc["meter"]["state"] == "disconnected"
        assert doc["meter"]["last_error"].startswith("cannot open: ")
        assert meter_path in doc["meter"]["last_error"]
        assert doc["meter"]["reconnects"] == doc["meter"]["attempts"] - 1
    assert second["meter"]["last_error_at"] > first["meter"]["last_error_at"]
    assert samples and all(
        "last error" in s.reasons and "cannot open" in s.reasons for s in samples[-5:]
    )
    assert "attempts" in samples[-1].reasons
    values = metrics(port)
    assert values[("dsmr_logger_meter_reconnects_total", ())] >= 7
    assert values[("dsmr_logger_meter_last_error_timestamp_seconds", ())] > 0
    command = [sys.executable, "-m", "dsmr_logger", "status", "--config", str(config)]
    shown = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=30)
    assert shown.returncode == 1, shown
    assert "  last error: cannot open: " in shown.stdout, shown.stdout
    assert "Traceback" not in shown.stderr

    meter = a_meter(
        procs, tmp_path
    )  # the cable is plugged in: healthy, the error kept with its time
    wait_until(lambda: fetch(port, "/healthz")[0] == 200, 20.0, "healthy")
    doc = status_of(port)
    assert doc["meter"]["state"] == "ok" and doc["meter"]["last_error"].startswith("cannot open")
    meter.terminate()
    meter.wait(timeout=10)
    assert terminate(daemon)[0] == 0


# --- issue 12 item 5: redirects ------------------------------------------------------------------


def test_a_redirect_is_misconfigured_with_the_url_to_use_and_nothing_is_lost(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """DSMR-reader moved to https: every post gets 301. The sink is misconfigured at once
    (503 naming the sink and "use https://... as url"), nothing is dead-lettered, and after the
    fix the backlog arrives in order. (Before: retried for ever, the Location never shown.)"""
    server.control(mode="redirect")
    port = free_port()
    config = write_config(
        tmp_path,
        server.url,
        level="debug",
        sink={"retry_max": 0.5},
        http={"listen": f"127.0.0.1:{port}"},
    )
    daemon, log = procs.daemon(config)
    meter = a_meter(procs, tmp_path)
    https = f"https://127.0.0.1:{server.port}"
    with Monitor(port) as monitor:
        first_bad = wait_until(
            lambda: next((s for s in monitor.samples if s.status == 503), None), 20.0, "a 503"
        )
        wait_until(lambda: len(monitor.answered(first_bad.at)) >= 20, 10.0, "20 samples")
        sink = sink_status(port)
        later = monitor.answered(first_bad.at)
    assert all(s.status == 503 for s in later)
    assert all(
        f"sink {SINK} misconfigured: HTTP 301 redirect to {https}" in s.reasons for s in later
    )
    assert all(f"use {https} as url" in s.reasons for s in later)
    assert sink["misconfigured"] and sink["dead_letters"] == 0 and sink["backlog"] > 0
    (error,) = [e for e in log_events(log) if e.get("level") == "error"]
    assert error["fix"].endswith(f"use {https} as url")
    command = [sys.executable, "-m", "dsmr_logger", "status", "--config", str(config)]
    shown = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=30)
    assert shown.returncode == 1 and shown.stdout.startswith("dsmr-logger: UNHEALTHY"), shown
    sink_line = next(line for line in shown.stdout.splitlines() if line.startswith("sink "))
    assert f"MISCONFIGURED: HTTP 301 redirect to {https}" in sink_line
    assert sink_line.endswith(f"use {https} as url")
    server.control(mode="ok")
    wait_until(lambda: fetch(port, "/healthz")[0] == 200, 10.0, "healthy after the fix")
    meter.terminate()
    meter.wait(timeout=10)
    wait_until_delivered(server, log)
    assert terminate(daemon)[0] == 0
    assert [stamp(t) for t in server.received()] == read_stamps(log)


# --- issue 12 item 7: "not sent" vs "maybe stored" -----------------------------------------------


def test_possible_duplicates_are_counted_and_bound_what_the_server_holds_twice(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """Refused connections never store a telegram: resent, they count no duplicate. Read
    timeouts on a server that stores the request anyway do: the count is an upper bound of the
    copies the server holds, and it is not zero when there are some."""
    port = free_port()
    config = write_config(
        tmp_path,
        server.url,
        level="debug",
        sink={"timeout": 0.3, "retry_max": 0.3},
        http={"listen": f"127.0.0.1:{port}"},
    )
    server.control(mode="refuse")
    daemon, log = procs.daemon(config)
    endpoint_up(port)
    meter = a_meter(procs, tmp_path)
    wait_until(lambda: sink_status(port)["retries"] >= 5, 20.0, "5 refused attempts")
    server.control(mode="ok")
    wait_until(lambda: sink_status(port)["backlog"] == 0, 20.0, "the backlog delivered")
    after_refusals = sink_status(port)["possible_duplicates"]
    copies = collections.Counter(stamp(t) for t in server.received())
    assert after_refusals == 0 and max(copies.values()) == 1

    server.control(hang_outcome="process", mode="hang")  # answers lost, requests stored later
    retries = sink_status(port)["retries"]
    wait_until(lambda: sink_status(port)["retries"] >= retries + 4, 20.0, "4 read timeouts")
    server.control(mode="ok")
    wait_until(lambda: sink_status(port)["backlog"] == 0, 20.0, "the backlog delivered")
    meter.terminate()
    meter.wait(timeout=10)
    wait_until_quiet(server, 1.0, 20.0)
    counted = sink_status(port)["possible_duplicates"]
    exported = metrics(port)[("dsmr_logger_sink_possible_duplicates_total", (("sink", SINK),))]
    assert terminate(daemon)[0] == 0
    copies = collections.Counter(stamp(t) for t in server.received())
    held_twice = sum(n - 1 for n in copies.values())
    print(f"{held_twice} extra copies at the server, {counted} counted as possible duplicates")
    assert exported == counted
    assert 0 < held_twice <= counted
    assert set(copies) == set(read_stamps(log))


# --- issue 11 item 2 / issue 13 item 2: the status port in use -----------------------------------


def test_status_port_in_use_is_one_clear_line_exit_1_and_the_spool_closed(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, server.url, http={"listen": f"127.0.0.1:{port}"})
        daemon, log = procs.daemon(config)
        assert daemon.wait(timeout=30) == 1
    text = log.read_text()
    lines = [line for line in text.splitlines() if "cannot start" in line]
    assert len(lines) == 1, text
    assert lines[0] == (
        f"dsmr-logger: cannot start: http.listen = '127.0.0.1:{port}': the port is in use "
        "(another program, or another dsmr-logger): choose another"
    )
    assert "Traceback" not in text
    spool = tmp_path / "spool.sqlite3"
    assert (
        spool.exists() and not Path(f"{spool}-shm").exists() and not Path(f"{spool}-wal").exists()
    )
    assert not events(log, "started")  # no task ever ran


# --- issue 13 item 8: SIGHUP ------------------------------------------------------------------


def test_sighup_stops_cleanly_like_sigterm(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """An SSH session closing on a foreground run sends SIGHUP: "stopped", exit 0, the spool
    closed (no -shm left), the backlog kept for the next start."""
    server.control(mode="refuse")
    config = write_config(tmp_path, server.url, level="debug")
    daemon, log = procs.daemon(config)
    wait_until(lambda: started(log), 20.0, "the daemon to start")
    meter = a_meter(procs, tmp_path)
    wait_until(lambda: len(read_stamps(log)) >= 10, 20.0, "10 telegrams read")
    meter.terminate()
    meter.wait(timeout=10)
    daemon.send_signal(signal.SIGHUP)
    assert daemon.wait(timeout=20) == 0
    (stopped,) = events(log, "stopped")
    assert stopped["undelivered"][SINK] == len(read_stamps(log))
    spool = tmp_path / "spool.sqlite3"
    assert not Path(f"{spool}-shm").exists() and not Path(f"{spool}-wal").exists()


# --- the daemon in this process: its structure ---------------------------------------------------


def in_process_config(tmp_path: Path, port: str, url: str, **sink: Any) -> Config:
    config = from_mapping(
        {
            "meter": {"port": port, "idle_timeout": 5.0, "reconnect_initial": 0.05},
            "spool": {"path": str(tmp_path / "spool.sqlite3"), "flush_interval": 0.25},
            "sink": [
                {
                    "name": SINK,
                    "url": url,
                    "api_key": API_KEY,
                    "timeout": 20.0,
                    "retry_initial": 0.02,
                    "retry_max": 0.2,
                    **sink,
                }
            ],
            "http": {"listen": f"127.0.0.1:{free_port()}"},
        }
    )
    return config


@contextlib.asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[asyncio.Task[int]]:
    """The daemon's run() as a task; stopped (and its exit status checked by the caller)."""
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await waiting.wait_until(
        lambda: daemon.source.status.connected or task.done(),
        "the daemon to open the meter's port",
        10.0,
    )
    try:
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await asyncio.wait([task])


async def get_json(daemon: Daemon, path: str) -> tuple[int | None, Any]:
    assert daemon.status_server is not None and daemon.status_server.port is not None
    return await asyncio.to_thread(fetch, daemon.status_server.port, path)


async def stored(_: Any) -> web.Response:
    return web.Response(status=201)


async def test_the_daemon_posts_past_a_dead_first_address_and_stays_healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink's host name resolves to a black-holed address first (a dead AAAA record) and a
    live one second: telegrams are delivered and /healthz stays 200, far within the sink's 20 s
    timeout (before Happy Eyeballs, each attempt cost the whole timeout)."""
    meter = VirtualSerialPort()
    try:
        async with dead_v4_live_v6(monkeypatch, stored) as (url, seen):
            daemon = Daemon(in_process_config(tmp_path, meter.path, url))
            async with running(daemon) as task:
                play = MeterSimulator(meter, TELEGRAMS, interval=0.05, as_recorded=True)
                player = asyncio.create_task(play.run(5))
                await waiting.wait_until(lambda: len(seen.bodies) == 5, "five posts", 5.0)
                code, body = await get_json(daemon, "/healthz")
                assert (code, body["state"]) == (200, "healthy")
                sink = (await get_json(daemon, "/status"))[1]["sinks"][0]
                assert (sink["delivered"], sink["retries"], sink["backlog"]) == (5, 0, 0)
                await player
            assert task.result() == 0
    finally:
        meter.close()


async def test_a_helpers_transient_error_is_retried_and_the_daemon_keeps_delivering(
    tmp_path: Path,
) -> None:
    """The flusher meets a locked spool (``spool requeue`` racing another writer): logged once,
    restarted after a pause; the daemon keeps reading and delivering and stops with 0. (Before:
    the flusher died and took the daemon down with exit status 1.)"""
    meter = VirtualSerialPort()
    path = tmp_path / "spool.sqlite3"
    try:
        async with DsmrReaderServer(api_key=API_KEY) as server:
            refused = TELEGRAMS[1].decode()
            server.poison = lambda text: text == refused
            server.poison_answer = "parse_failure"
            daemon = Daemon(in_process_config(tmp_path, meter.path, server.url))
            with structlog.testing.capture_logs() as logs:
                async with running(daemon) as task:
                    play = MeterSimulator(meter, TELEGRAMS, interval=0.05, as_recorded=True)
                    await play.run(3)
                    await waiting.wait_until(lambda: len(server.received) == 2, "two stored")
                    await waiting.wait_until(
                        lambda: daemon.workers[0].stats.dead_letters == 1, "a dead letter"
                    )
                    server.poison = None
                    spool = daemon.queues.spool  # a short busy timeout: the lock is news at once
                    await daemon.queues.in_spool(spool.db.execute, "PRAGMA busy_timeout = 50")
                    tool = Spool(path, max_bytes=1 << 30)
                    tool.open(shared=True)
                    try:
                        assert tool.requeue() == 1
                        tool.db.execute("BEGIN IMMEDIATE")  # another writer holds the spool
                        await waiting.wait_until(
                            lambda: any(e["event"].startswith("task failed") for e in logs),
                            "the flusher to meet the lock",
                            10.0,
                        )
                        await asyncio.sleep(0.3)
                        tool.db.execute("ROLLBACK")
                    finally:
                        tool.close()
                    await play.run(3)  # still reading and delivering
                    await waiting.wait_until(lambda: len(server.received) == 6, "six stored", 10.0)
                    assert not task.done()
                assert task.result() == 0
        failed = [e for e in logs if e["event"].startswith("task failed")]
        assert len(failed) == 1 and failed[0]["task"] == "flusher", failed
        assert "database is locked" in failed[0]["error"]
        assert not [e for e in logs if e["event"].startswith("task crashed")]
        # The requeued one arrived. (Adopted before its row could be forgotten, it may come
        # again: Queues.adopt_requeued is at-least-once by design.)
        assert server.received.count(refused) >= 1
    finally:
        meter.close()


async def test_a_crash_is_reported_once_with_its_traceback_and_everything_is_closed(
    tmp_path: Path,
) -> None:
    """A bug in a task (here the sink's send raising LookupError): one error line with the
    traceback, the daemon stops with 1, the undelivered telegrams are committed to the spool,
    the status port and the sink are closed."""
    meter = VirtualSerialPort()
    path = tmp_path / "spool.sqlite3"
    try:
        async with DsmrReaderServer(api_key=API_KEY) as server:
            daemon = Daemon(in_process_config(tmp_path, meter.path, server.url))
            sink = daemon.sinks[0]

            async def a_bug(item: Any) -> Any:
                raise LookupError("a bug in the sink")

            with structlog.testing.capture_logs() as logs:
                async with running(daemon) as task:
                    status_port = daemon.status_server.port  # type: ignore[union-attr]
                    sink.send = a_bug  # type: ignore[method-assign]
                    await MeterSimulator(meter, TELEGRAMS[:3], interval=0, as_recorded=True).run(3)
                    await waiting.wait_until(task.done, "the daemon to stop", 10.0)
                assert task.result() == 1
    finally:
        meter.close()
    (crash,) = [e for e in logs if e["event"].startswith("task crashed")]
    assert crash["task"] == f"sink:{SINK}" and crash["log_level"] == "error"
    assert (
        "Traceback" in crash["traceback"] and "LookupError: a bug in the sink" in crash["traceback"]
    )
    assert [e["event"] for e in logs].count("stopped") == 1
    assert len(pending_in_spool(path)) == 3  # nothing read was lost
    with socket.socket() as again:  # the status port was let go
        again.bind(("127.0.0.1", status_port))
    assert not Path(f"{path}-shm").exists()
    assert sink._client is None  # type: ignore[attr-defined]
