"""Health attacked: servers that are not DSMR-reader, and a daemon's clocks and ports abused.

Like ``test_health.py``: a real daemon process with ``[http] listen``, a fake DSMR-reader (or a
web server that is not one) on 127.0.0.1, ``/healthz`` polled the way a monitoring system does,
and the series of verdicts asserted together with what the server holds.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import waiting
from aiohttp import web
from dsmr_reader_server import DsmrReaderProcess, DsmrReaderServer
from test_daemon_process import (
    SINK,
    Processes,
    dead_letters_in_spool,
    log_events,
    log_tail,
    pending_in_spool,
    received_count,
    stamp,
    terminate,
    wait_until,
    write_config,
)
from test_full_disk import spool_counters
from test_health import (
    Monitor,
    a_meter,
    endpoint_up,
    events,
    fetch,
    free_port,
    procs,
    read_stamps,
    server,
    sink_status,
    wait_until_delivered,
)
from test_ops import KEY as OPS_KEY
from test_ops import get, make_config, running

from dsmr_logger.config import DsmrReaderSinkConfig
from dsmr_logger.daemon import Daemon
from dsmr_logger.delivery.answers import Verdict, advice
from dsmr_logger.delivery.queue import Queues
from dsmr_logger.delivery.sinks.dsmr_reader import DsmrReaderV1Sink, DsmrReaderV2Sink
from dsmr_logger.delivery.spool import Spool, StoredTelegram
from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort

TELEGRAMS = frames_in(default_capture())

__all__ = ["procs", "server"]  # fixtures


def test_a_captive_portal_answering_200_is_not_a_delivery(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """A router's login page answers 200 with HTML to every request (DSMR-reader answers 201
    with an empty body, or 200 on old versions). Nothing it "takes" may count as delivered:
    every telegram stays queued, /healthz is 503 naming the sink for as long as it lasts, and
    once the portal is gone every telegram read arrives, in order. (Before: each 200 was a
    delivery, the telegrams were confirmed and gone, and health said 200 throughout.)"""
    port = free_port()
    config = write_config(
        tmp_path,
        server.url,
        level="debug",
        sink={"retry_max": 0.5, "timeout": 10.0},
        http={"listen": f"127.0.0.1:{port}"},
    )
    daemon, log = procs.daemon(config)
    meter = a_meter(procs, tmp_path)
    wait_until(lambda: received_count(server) >= 10, 20.0, "10 deliveries")
    server.control(mode="captive_portal")
    with Monitor(port) as monitor:
        read_at_switch = len(read_stamps(log))
        wait_until(lambda: len(read_stamps(log)) >= read_at_switch + 30, 20.0, "30 more read")
        first_bad = wait_until(
            lambda: next((s for s in monitor.samples if s.status == 503), None), 10.0, "a 503"
        )
        wait_until(lambda: len(monitor.answered(first_bad.at)) >= 10, 10.0, "10 more samples")
        sink = sink_status(port)
        later = monitor.answered(first_bad.at)
    assert all(s.status == 503 for s in later), [s.status for s in later]
    assert all(f"sink {SINK} misconfigured: HTTP 200" in s.reasons for s in later)
    assert all("not DSMR-reader" in s.reasons for s in later)
    assert sink["delivered"] == received_count(server)  # what the server really holds
    assert sink["misconfigured"] is True and sink["dead_letters"] == 0
    assert sink["backlog"] >= 20
    errors = [e for e in log_events(log) if e.get("level") == "error"]
    assert len(errors) == 1 and errors[0]["sink"] == SINK, errors

    server.control(mode="ok")
    wait_until(lambda: fetch(port, "/healthz")[0] == 200, 10.0, "healthy again")
    meter.terminate()
    meter.wait(timeout=10)
    wait_until_delivered(server, log)
    assert terminate(daemon)[0] == 0
    delivered = [stamp(t) for t in server.received()]
    assert delivered == read_stamps(log), "not every telegram read, in order, once"
    assert dead_letters_in_spool(tmp_path / "spool.sqlite3") == []
    assert events(log, "telegrams dead-lettered") == []


def test_every_other_telegram_refused_is_unhealthy_though_no_run_forms(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """DSMR-reader refuses every telegram of an odd second ("Failed to parse telegram") and
    stores the others: half the readings are dead-lettered, yet never two in a row. /healthz
    is 503 naming the sink and the share refused, for as long as it lasts; once every telegram
    is taken again it is healthy. (Before: 200 throughout, only a run of ten in a row counted.)"""
    odd_seconds = [f"{digit}W)\r\n0-0:96.1.1" for digit in "13579"]  # the meter's timestamp
    server.control(poison_substring=odd_seconds, poison_answer="parse_failure")
    port = free_port()
    config = write_config(
        tmp_path,
        server.url,
        level="debug",
        sink={"timeout": 10.0},  # a loaded machine's slow answer is no failure here
        http={"listen": f"127.0.0.1:{port}"},
    )
    daemon, _ = procs.daemon(config)
    endpoint_up(port)
    meter = a_meter(procs, tmp_path)
    with Monitor(port) as monitor:
        wait_until(lambda: sink_status(port)["dead_letters"] >= 30, 30.0, "30 dead letters")
        first_bad = wait_until(
            lambda: next((s for s in monitor.samples if s.status == 503), None), 10.0, "a 503"
        )
        wait_until(lambda: len(monitor.answered(first_bad.at)) >= 10, 10.0, "10 more samples")
        sink = sink_status(port)
        server.control(poison_substring=None)
        wait_until(
            lambda: any(s.status == 200 for s in monitor.answered(first_bad.at)),
            30.0,
            "healthy again",
        )
        samples = monitor.answered(first_bad.at)
    meter.terminate()
    meter.wait(timeout=10)
    assert terminate(daemon)[0] == 0
    assert sink["refused_in_a_row"] <= 1 and sink["delivered"] >= 20
    run = samples[: next(i for i, s in enumerate(samples) if s.status == 200)]
    assert len(run) >= 10 and all(s.status == 503 for s in run)
    assert all(f"sink {SINK}: " in s.reasons and " of the last " in s.reasons for s in run)
    assert all("dead-lettered (HTTP 500 Failed to parse telegram)" in s.reasons for s in run)


PORTAL = "<!DOCTYPE html><html><title>Sign in</title></html>"


@pytest.mark.parametrize(
    ("api", "status", "content_type", "body", "verdict"),
    [
        ("v1", 201, "text/html", "", Verdict.DELIVERED),  # DSMR-reader since v1.6
        ("v1", 200, "text/html", "", Verdict.DELIVERED),  # older DSMR-reader
        ("v1", 200, "text/html", PORTAL, Verdict.MISCONFIGURED),
        ("v1", 200, "application/json", '{"error": "quota exceeded"}', Verdict.MISCONFIGURED),
        ("v2", 201, "application/json", '{"id": 7, "timestamp": "x"}', Verdict.DELIVERED),
        ("v2", 200, "text/html", PORTAL, Verdict.MISCONFIGURED),
        ("v2", 201, "text/html", "", Verdict.MISCONFIGURED),
        ("v2", 200, "application/json", '["not", "a", "reading"]', Verdict.MISCONFIGURED),
        ("v2", 200, "application/json", '{"error": "quota exceeded"}', Verdict.MISCONFIGURED),
    ],
)
async def test_a_success_only_dsmr_reader_would_send_counts_as_stored(
    api: str, status: int, content_type: str, body: str, verdict: Verdict
) -> None:
    """Which 2xx answers are a delivery: v1's empty 201 (or 200), v2's reading as a JSON
    object. Any other body under a success status comes from something that is not DSMR-reader
    and stored nothing: the telegram is kept, the sink misconfigured with the advice to check
    its url."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, text=body, content_type=content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        config = DsmrReaderSinkConfig(name=SINK, url=url, api_key="k", api=api, timeout=5.0)
        zone = ZoneInfo("Europe/Amsterdam")
        sink = DsmrReaderV2Sink(config, zone=zone) if api == "v2" else DsmrReaderV1Sink(config)
        await sink.start()
        try:
            got = await sink.send(StoredTelegram(1, TELEGRAMS[0], time.time()))
        finally:
            await sink.close()
    finally:
        await runner.cleanup()
    assert got.verdict is verdict, got
    if verdict is Verdict.MISCONFIGURED:
        assert "not DSMR-reader" in advice(got) and "url" in advice(got)
        assert got.describe().startswith(f"HTTP {status}")


# --- clock jumps: the wall clock set back or forward (no RTC on a Pi; NTP, a hand) ----------------


class SettableWall:
    """The wall clock, moved by hand: ``offset`` seconds from the real one."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def reasons_until(daemon: Daemon, wanted: str, timeout: float = 10.0) -> list[str]:
    """Poll /healthz until one of its reasons contains ``wanted``; returns them all."""
    async with asyncio.timeout(timeout):
        while True:
            status, body = await get(daemon, "/healthz")
            reasons: list[str] = json.loads(body)["reasons"]
            if any(wanted in reason for reason in reasons):
                assert status == 503
                return reasons
            await asyncio.sleep(0.02)


async def test_the_wall_clock_set_back_an_hour_hides_neither_a_silent_meter_nor_a_failing_sink(
    tmp_path: Path,
) -> None:
    """The meter falls silent and the clock is set back an hour: within ``frame_window`` of
    real silence /healthz is 503, and a sink refusing connections is 503 after
    ``sink_failing`` (real seconds, not the clock's). (Before: "the last telegram" was an hour
    in the future, so the silence and the failure were hidden for an hour.)"""
    meter = VirtualSerialPort()
    wall = SettableWall()
    try:
        async with DsmrReaderServer(api_key=OPS_KEY) as dsmr:
            config = make_config(tmp_path, meter.path, dsmr.url, frame_window=1.0)
            daemon = Daemon(config, wall_clock=wall)
            async with running(daemon):
                await MeterSimulator(meter, TELEGRAMS[:3], interval=0.02, as_recorded=True).run(3)
                await waiting.wait_until(lambda: len(dsmr.received) == 3, "three stored")
                assert (await get(daemon, "/healthz"))[0] == 200
                wall.offset = -3600.0
                (reason,) = await reasons_until(daemon, "no valid telegram")
                silence = float(reason.split("no valid telegram for ")[1].split(" s")[0])
                assert 1.0 <= silence < 600, reason  # real seconds of silence

                await dsmr.set_mode("refuse")
                await MeterSimulator(meter, TELEGRAMS[3:5], interval=0.02, as_recorded=True).run(2)
                await waiting.wait_until(
                    lambda: daemon.workers[0].stats.failing_since is not None, "a failure"
                )
                wall.offset -= 3600.0
                reasons = await reasons_until(daemon, "sink home failing for")
                failing = next(r for r in reasons if r.startswith("sink home failing for"))
                assert "failing for -" not in failing
                await dsmr.set_mode("ok")
    finally:
        meter.close()


async def test_the_wall_clock_set_forward_a_day_is_no_silence_and_no_long_failure(
    tmp_path: Path,
) -> None:
    """NTP sets a Pi's clock forward by a day after the daemon started: still "starting" (no
    telegram yet, well within ``frame_window`` of real time), and a sink refusing connections
    for a moment is not "failing for 86400 s". (Before: 503 "since the start 86400 s ago" and
    "sink home failing for 86400 s" at once.)"""
    meter = VirtualSerialPort()
    wall = SettableWall()
    try:
        async with DsmrReaderServer(api_key=OPS_KEY, mode="refuse") as dsmr:
            config = make_config(
                tmp_path, meter.path, dsmr.url, frame_window=120.0, sink_failing=120.0
            )
            daemon = Daemon(config, wall_clock=wall)
            async with running(daemon):
                wall.offset = 86400.0
                status, body = await get(daemon, "/healthz")
                assert (status, json.loads(body)["state"]) == (200, "starting"), body
                await MeterSimulator(meter, TELEGRAMS[:2], interval=0.02, as_recorded=True).run(2)
                await waiting.wait_until(
                    lambda: daemon.workers[0].stats.retries >= 2, "two refused attempts"
                )
                wall.offset += 86400.0
                status, body = await get(daemon, "/healthz")
                assert (status, json.loads(body)["reasons"]) == (200, []), body
                await dsmr.set_mode("ok")
                await waiting.wait_until(lambda: len(dsmr.received) == 2, "both stored")
    finally:
        meter.close()


# --- the status port flooded -------------------------------------------------------------------


def test_a_flood_of_slow_clients_on_the_status_port_does_not_stop_delivery(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """Under systemd a service may hold 1,024 files. Clients that open the status port and
    send half a request head, and never more (slowloris), must not take them all: the daemon
    keeps reading the meter and delivering, also over new connections to DSMR-reader, and
    /healthz answers again once they are gone. (Before: each slow client held a file for
    good; with 120 of them under a limit of 128 files the sink could not connect again and
    delivery stopped.)"""
    port = free_port()
    config = write_config(tmp_path, server.url, level="debug", http={"listen": f"127.0.0.1:{port}"})
    daemon, log = procs.daemon(config, prefix=["prlimit", "--nofile=128:128", "--"])
    meter = a_meter(procs, tmp_path)
    wait_until(lambda: received_count(server) >= 5, 20.0, "5 deliveries")
    slow: list[socket.socket] = []
    try:
        for _ in range(200):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            slow.append(client)
        server.control(mode="refuse")  # every connection to DSMR-reader closed: new ones needed
        read = len(read_stamps(log))
        wait_until(lambda: len(read_stamps(log)) >= read + 5, 20.0, "5 more telegrams read")
        server.control(mode="ok")
        stored = received_count(server)
        wait_until(
            lambda: received_count(server) >= stored + 20,
            20.0,
            "20 more deliveries, over a new connection",
            detail=lambda: log_tail(log),
        )
    finally:
        for client in slow:
            client.close()
    wait_until(lambda: fetch(port, "/healthz")[0] == 200, 20.0, "/healthz answering again")
    meter.terminate()
    meter.wait(timeout=10)
    wait_until_delivered(server, log)
    assert terminate(daemon)[0] == 0
    assert [stamp(t) for t in server.received()] == read_stamps(log)


# --- counters across a spool started anew ------------------------------------------------------


async def test_telegrams_counted_lost_stay_counted_when_the_spool_state_is_started_anew(
    tmp_path: Path,
) -> None:
    """``lost`` (in /status, ``status`` and ``dsmr_logger_sink_lost_total``) is a count since the
    spool was created: when its state file is deleted under the running daemon and started
    anew from the segment files, the telegrams counted lost before stay counted (and are
    written into the new file). (Before: the count fell back to 0, and a Prometheus counter
    went down within one process.)"""
    path = tmp_path / "state" / "spool.sqlite3"
    queues = Queues(
        Spool(path, max_bytes=1 << 20), {"home": 0.0}, flush_interval=0.0, strict=False, hot_limit=3
    )
    await queues.open()
    frames = FrameAssembler().feed(default_capture() * 3, 0.0)
    for frame in frames[:20]:
        queues.accept(frame)
    await queues.flush(everything=True)
    shutil.rmtree(path.parent)  # the files go: the backlog read back from disk is lost
    queues.accept(frames[20])
    await queues.flush(everything=True)
    queues.accept(frames[21])
    await queues.flush(everything=True)  # the loss is written into the new file
    before = queues.spool_snapshot().lost["home"]
    assert before > 0
    path.unlink()  # now only the state file goes; the segment files stay
    queues.accept(frames[22])
    await queues.flush(everything=True)
    assert list(path.parent.glob("spool.sqlite3.gone-*")), "not started anew"
    assert queues.spool_snapshot().lost.get("home", 0) >= before
    queues.accept(frames[23])
    await queues.flush(everything=True)
    await queues.close()
    assert spool_counters(path)["home"]["lost"] >= before


# --- a redirect to an address that is not one ----------------------------------------------------


def test_a_redirect_to_an_address_that_is_not_a_url_is_misconfigured_not_a_crash(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """A server (a proxy, a portal) answers 301 with ``Location: http://[::1/...`` (an IPv6
    bracket never closed). The sink is misconfigured (503 naming it), the daemon keeps
    reading and queueing, and after the fix everything arrives in order. (Before: reading the
    Location raised ValueError in the sink's task: "task crashed", exit 1, and the same crash
    at each restart by the service manager.)"""
    server.control(mode="redirect", redirect_to="http://[::1")
    port = free_port()
    config = write_config(
        tmp_path,
        server.url,
        level="debug",
        sink={"retry_max": 0.5, "timeout": 10.0},
        http={"listen": f"127.0.0.1:{port}"},
    )
    daemon, log = procs.daemon(config)
    meter = a_meter(procs, tmp_path)
    with Monitor(port) as monitor:
        wait_until(lambda: len(read_stamps(log)) >= 20, 20.0, "20 telegrams read")
        first_bad = wait_until(
            lambda: next((s for s in monitor.samples if s.status == 503), None),
            10.0,
            "a 503",
            detail=lambda: log_tail(log),
        )
        wait_until(lambda: len(monitor.answered(first_bad.at)) >= 10, 10.0, "10 more samples")
        later = monitor.answered(first_bad.at)
    assert daemon.poll() is None, log_tail(log)
    assert all(f"sink {SINK} misconfigured: HTTP 301" in s.reasons for s in later)
    assert all("not a valid URL" in s.reasons for s in later)
    assert not events(log, "task crashed; stopping (the service manager restarts the daemon)")
    server.control(mode="ok")
    wait_until(lambda: fetch(port, "/healthz")[0] == 200, 10.0, "healthy after the fix")
    meter.terminate()
    meter.wait(timeout=10)
    wait_until_delivered(server, log)
    assert terminate(daemon)[0] == 0
    assert [stamp(t) for t in server.received()] == read_stamps(log)


# --- a daemon told to stop ----------------------------------------------------------------------


def test_a_daemon_told_to_stop_is_not_healthy_while_it_finishes(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """SIGTERM with a request in flight: the daemon reads no more telegrams while its sink gets
    up to 5 s to finish. /healthz said 200 "healthy" all that time, so a monitor (or a load
    balancer in front of several loggers) kept counting on a daemon on its way out. It is now
    503 "stopping" until the port closes, and the telegram in flight stays spooled."""
    port = free_port()
    config = write_config(
        tmp_path, server.url, sink={"timeout": 30.0}, http={"listen": f"127.0.0.1:{port}"}
    )
    daemon, _ = procs.daemon(config)
    meter = a_meter(procs, tmp_path)
    wait_until(lambda: received_count(server) >= 3, 30.0, "a few deliveries")
    server.control(mode="hang")
    wait_until(lambda: server.state()["hanging"] > 0, 30.0, "a post held by the server")
    meter.terminate()
    meter.wait(timeout=10)
    with Monitor(port) as monitor:
        wait_until(lambda: monitor.answered(), 10.0, "a health sample")
        daemon.send_signal(signal.SIGTERM)
        stopping = wait_until(
            lambda: next((s for s in monitor.answered() if s.status == 503), None),
            10.0,
            "a 503 while stopping",
            detail=lambda: str([s.status for s in monitor.samples[-5:]]),
        )
        assert daemon.wait(timeout=30) == 0
    assert stopping.body["state"] == "stopping"
    assert "stopping: no telegram is read any more" in stopping.body["reasons"]
    signalled = next(s.at for s in monitor.samples if s is stopping)
    after = [s for s in monitor.answered() if s.at >= signalled]
    assert all(s.status == 503 for s in after), [s.status for s in after]
    assert pending_in_spool(tmp_path / "spool.sqlite3"), "the telegram in flight stays spooled"
