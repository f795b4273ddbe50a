"""Being watched: /healthz, /status, /metrics, systemd notify, and ``dsmr-logger status``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from dsmr_reader_server import DsmrReaderServer
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_until

from dsmr_logger.config import Config, HttpConfig, from_mapping
from dsmr_logger.daemon import Daemon
from dsmr_logger.delivery.spool import Spool, StoredTelegram, telegram_dir
from dsmr_logger.delivery.spool.scan import Segment, scan
from dsmr_logger.runtime.health import judge, status_document
from dsmr_logger.runtime.notify import Notifier
from dsmr_logger.runtime.snapshot import Snapshot
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort
from dsmr_logger.tools.status import render, status

KEY = "ops-test-key-0123456789"
TELEGRAMS = frames_in(default_capture())


def make_config(tmp_path: Path, port: str, url: str, **http: float | str) -> Config:
    config = from_mapping(
        {
            "meter": {"port": port, "idle_timeout": 5.0, "reconnect_initial": 0.05},
            "spool": {"path": str(tmp_path / "spool.sqlite3"), "flush_interval": 0.1},
            "sink": [
                {
                    "name": "home",
                    "url": url,
                    "api_key": KEY,
                    "timeout": 0.5,
                    "retry_initial": 0.01,
                    "retry_max": 0.05,
                }
            ],
        }
    )
    limits = {"listen": "127.0.0.1:0", "frame_window": 0.5, "sink_failing": 0.3} | http
    return dataclasses.replace(config, http=HttpConfig(**limits))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[Daemon]:
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await wait_until(lambda: daemon.source.status.connects > 0, "the daemon to start")
    try:
        yield daemon
    finally:
        stop.set()
        async with asyncio.timeout(10):
            assert await task == 0


async def get(daemon: Daemon, path: str) -> tuple[int, str]:
    assert daemon.status_server is not None and daemon.status_server.port
    url = f"http://127.0.0.1:{daemon.status_server.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        return answer.status, await answer.text()


async def healthz_until(daemon: Daemon, wanted: int, timeout: float = 10.0) -> list[str]:
    """Poll /healthz (every 20 ms) until it answers ``wanted``; returns that answer's reasons."""
    async with asyncio.timeout(timeout):
        while True:
            status, body = await get(daemon, "/healthz")
            if status == wanted:
                reasons: list[str] = json.loads(body)["reasons"]
                return reasons
            await asyncio.sleep(0.02)


async def test_healthz_follows_the_meter_and_the_sink(tmp_path: Path) -> None:
    port = VirtualSerialPort()
    try:
        async with (
            DsmrReaderServer(api_key=KEY) as server,
            running(
                Daemon(make_config(tmp_path, port.path, server.url, frame_window=2.0))
            ) as daemon,
        ):
            # Just started: no telegram yet, and none expected yet (frame_window is 2 s).
            status, body = await get(daemon, "/healthz")
            assert (status, json.loads(body)["state"]) == (200, "starting")
            reasons = await healthz_until(daemon, 503)  # past frame_window without a telegram
            assert "no valid telegram since the start" in reasons[0]

            meter = asyncio.create_task(MeterSimulator(port, TELEGRAMS, interval=0.05).run())
            await wait_until(lambda: len(server.received) >= 2, "deliveries")
            status, body = await get(daemon, "/healthz")
            assert (status, json.loads(body)) == (
                200,
                {"healthy": True, "state": "healthy", "reasons": []},
            )

            server.mode = "refuse"  # the sink fails past sink_failing (0.3 s)
            reasons = await healthz_until(daemon, 503)
            assert "sink home failing" in " ".join(reasons)
            await server.set_mode("ok")
            await wait_until(lambda: daemon.workers[0].stats.failing_since is None, "recovery")
            assert (await get(daemon, "/healthz"))[0] == 200

            meter.cancel()  # the meter falls silent: past frame_window (2 s) → 503
            reasons = await healthz_until(daemon, 503)
            assert "no valid telegram for" in reasons[0]
    finally:
        port.close()


async def test_status_and_metrics_report_what_was_sent(tmp_path: Path) -> None:
    port = VirtualSerialPort()
    try:
        async with (
            DsmrReaderServer(api_key=KEY) as server,
            running(Daemon(make_config(tmp_path, port.path, server.url))) as daemon,
        ):
            garbage = TELEGRAMS[0].replace(b"1-0:1.8.1(003", b"1-0:1.8.1(103")  # CRC now wrong
            await MeterSimulator(port, [*TELEGRAMS[:5], garbage], interval=0, as_recorded=True).run(
                6
            )
            await wait_until(lambda: len(server.received) == 5, "five deliveries")
            await wait_until(lambda: daemon.source.counters.rejected_total == 1, "reject")

            code, body = await get(daemon, "/status")
            doc = json.loads(body)
            assert code == 200
            assert doc["meter"]["frames"] == 5
            assert doc["meter"]["rejected"] == {"crc_mismatch": 1}
            assert doc["meter"]["state"] == "ok"
            assert doc["reading"]["power"] == "0.388 kW"
            assert doc["reading"]["delivered_tariff1"] == "003432.827*kWh"
            (sink,) = doc["sinks"]
            assert (sink["name"], sink["delivered"], sink["backlog"]) == ("home", 5, 0)

            code, text = await get(daemon, "/metrics")
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            assert samples[("dsmr_logger_frames_total", (("result", "valid"),))] == 5
            assert samples[("dsmr_logger_frames_total", (("result", "crc_mismatch"),))] == 1
            assert samples[("dsmr_logger_sink_delivered_total", (("sink", "home"),))] == 5
            assert samples[("dsmr_logger_sink_backlog", (("sink", "home"),))] == 0
            assert samples[("dsmr_logger_meter_connected", ())] == 1

            out = io.StringIO()
            listen = f"127.0.0.1:{daemon.status_server.port}"  # type: ignore[union-attr]
            live = dataclasses.replace(daemon.config, http=HttpConfig(listen=listen))
            assert await asyncio.to_thread(status, live, as_json=False, out=out) == 0
            assert "dsmr-logger: healthy" in out.getvalue()
            assert "sink home: 5 delivered, backlog 0" in out.getvalue()
    finally:
        port.close()


async def test_metrics_count_telegrams_lost_to_a_damaged_spool(tmp_path: Path) -> None:
    """``spool list`` and ``status`` say how many telegrams a damaged spool cost each sink;
    /metrics did not, so monitoring saw every reading delivered, dead-lettered or dropped but
    never these. It counts them now, and what waits only in memory."""
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_bytes=1 << 20)
    spool.open()
    spool.commit([(StoredTelegram(i + 1, t, 1_700_000_000.0 + i), ["home"]) for i, t in
                  enumerate(TELEGRAMS[:5])])  # fmt: skip
    spool.close()
    (segment,) = telegram_dir(path).glob("*.seg")
    victim = [e for e in scan(Segment(1, segment, segment.stat().st_size)) if e.seq == 3]
    data = bytearray(segment.read_bytes())
    data[victim[0].end - 20] ^= 0x08  # inside telegram 3
    segment.write_bytes(bytes(data))
    port = VirtualSerialPort()
    try:
        async with (
            DsmrReaderServer(api_key=KEY) as server,
            running(Daemon(make_config(tmp_path, port.path, server.url))) as daemon,
        ):
            await wait_until(lambda: len(server.received) == 4, "the four readable ones")
            _, text = await get(daemon, "/metrics")
    finally:
        port.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("dsmr_logger_sink_lost_total", (("sink", "home"),))] == 1
    assert samples[("dsmr_logger_spool_in_memory", ())] == 0


async def test_status_without_a_daemon_reads_the_spool(tmp_path: Path) -> None:
    port = VirtualSerialPort()
    try:
        async with DsmrReaderServer(api_key=KEY) as server:
            server.mode = "refuse"
            config = make_config(tmp_path, port.path, server.url)
            async with running(Daemon(config)) as daemon:
                await MeterSimulator(port, TELEGRAMS[:3], interval=0, as_recorded=True).run(3)
                await wait_until(lambda: len(daemon.queues.sinks["home"]) == 3, "a backlog")
    finally:
        port.close()
    out = io.StringIO()
    offline = dataclasses.replace(config, http=HttpConfig(listen="127.0.0.1:9"))
    assert status(offline, as_json=True, out=out) == 3
    doc = json.loads(out.getvalue())
    assert "does not answer" in doc["daemon"]
    assert doc["sinks"][0]["name"] == "home"
    assert doc["sinks"][0]["backlog"] == 3


async def test_systemd_notify_ready_status_and_watchdog(tmp_path: Path) -> None:
    """READY once started, STATUS lines, WATCHDOG pings that stop while the loop is blocked."""
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval == 0.05

    def drain() -> list[str]:
        messages = []
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(receiver.recv(4096).decode())
        return messages

    port = VirtualSerialPort()
    try:
        async with DsmrReaderServer(api_key=KEY) as server:
            daemon = Daemon(make_config(tmp_path, port.path, server.url), notifier=notifier)
            async with running(daemon):
                first: list[str] = []

                def three_pings() -> bool:
                    first.extend(drain())
                    return sum(m.startswith("WATCHDOG=1") for m in first) >= 3

                await wait_until(three_pings, "three watchdog pings")
                assert first[0].startswith("READY=1\nSTATUS=")
                assert f"{port.path}, 1/1 sinks ok, backlog 0" in first[0]
                pings = [m for m in first[1:] if m.startswith("WATCHDOG=1")]
                assert all("\nSTATUS=" in m for m in pings)

                drain()
                time.sleep(0.4)  # a wedged event loop: no pings may be sent meanwhile
                blocked_at = time.monotonic()
                during = [m for m in drain() if m.startswith("WATCHDOG=1")]
                assert len(during) <= 1, during  # at most one that was already due
                await wait_until(
                    lambda: any(m.startswith("WATCHDOG=1") for m in drain()), "pings again"
                )
                assert time.monotonic() - blocked_at < 5
            assert "STOPPING=1" in " ".join(drain())
    finally:
        port.close()
        receiver.close()


def test_no_notify_socket_means_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("fine")  # must not raise


def test_the_verdict_over_a_start_that_never_sees_the_meter() -> None:
    """The pure verdict with a clock: "starting" for frame_window, then unhealthy with the
    link's last error, its age and the attempts; ``status`` renders each as a person reads it."""
    limits = HttpConfig(frame_window=60.0, sink_failing=900.0)
    t0 = 1_800_000_000.0

    def snapshot(now: float) -> Snapshot:
        return Snapshot(
            port="/dev/ttyUSB0",
            meter_state="disconnected",
            connected=False,
            frames=0,
            rejected={},
            bytes_in=0,
            garbage_bytes=0,
            reconnects=8,
            last_frame_at=None,
            last_telegram=None,
            sinks=(),
            started_at=t0,
            meter_error="cannot open: FileNotFoundError: [Errno 2] No such file: '/dev/ttyUSB0'",
            meter_error_at=now - 2,
            meter_attempts=9,
        )

    early = judge(snapshot(t0 + 1), t0 + 1, limits)
    assert (early.ok, early.state, early.reasons) == (True, "starting", ())
    text = render(status_document(snapshot(t0 + 1), t0 + 1, limits))
    assert text.splitlines()[0] == "dsmr-logger: starting (started 1 s ago, no telegram yet)"
    late = judge(snapshot(t0 + 61), t0 + 61, limits)
    assert (late.ok, late.state) == (False, "unhealthy")
    assert late.reasons == (
        "no valid telegram since the start 61 s ago (meter state: disconnected; last error 2 s "
        "ago: cannot open: FileNotFoundError: [Errno 2] No such file: '/dev/ttyUSB0'; 9 attempts)",
    )
    lines = render(status_document(snapshot(t0 + 61), t0 + 61, limits)).splitlines()
    assert lines[0] == "dsmr-logger: UNHEALTHY"
    assert lines[3] == (
        "  last error: cannot open: FileNotFoundError: [Errno 2] No such file: '/dev/ttyUSB0' "
        "(2 s ago)"
    )
