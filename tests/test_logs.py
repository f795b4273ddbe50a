"""Log lines a person can read: times with their offset, no epochs, no wrong hints, no secrets."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import structlog
from cli_process import environment
from structlog.testing import capture_logs
from waiting import wait_until

from dsmr_logger.config import LogConfig, from_mapping
from dsmr_logger.logsetup import configure
from dsmr_logger.runtime.health import judge
from dsmr_logger.runtime.snapshot import Snapshot
from dsmr_logger.sources.p1.reader import MeterReader
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort

EPOCH = 1_793_538_187.25  # 2026-11-02 during the day
OFFSET = re.compile(r"[+-]\d\d:\d\d$")


def logged(**fields: object) -> dict[str, object]:
    stream = io.StringIO()
    configure(LogConfig(format="json"), stream, clock=lambda: EPOCH)
    structlog.get_logger("test").warning("something", **fields)
    event: dict[str, object] = json.loads(stream.getvalue())
    return event


def test_19_every_line_carries_its_time_with_the_utc_offset() -> None:
    stamp = str(logged()["timestamp"])
    assert OFFSET.search(stamp), stamp
    assert datetime.fromisoformat(stamp).timestamp() == EPOCH


def test_19_unix_times_are_shown_as_times() -> None:
    event = logged(received_at=EPOCH, failing_since=EPOCH, count=EPOCH, retry_after=3.0)
    for key in ("received_at", "failing_since"):
        shown = str(event[key])
        assert OFFSET.search(shown), shown
        assert datetime.fromisoformat(shown).timestamp() == int(EPOCH)
    assert event["count"] == EPOCH  # not a time key: left alone
    assert event["retry_after"] == 3.0


def test_19_secrets_are_masked_in_any_line() -> None:
    event = logged(url="http://admin:hunter2@192.168.1.10/api", api_key="abcdefghijklmnop12")
    assert event["url"] == "http://****@192.168.1.10/api"
    assert event["api_key"] == "****12"


def test_19_no_for_ever_before_the_first_telegram() -> None:
    snap = Snapshot(
        port="/dev/ttyUSB0",
        meter_state="no_bytes",
        connected=True,
        frames=0,
        rejected={},
        bytes_in=0,
        garbage_bytes=0,
        reconnects=0,
        last_frame_at=None,
        last_telegram=None,
        sinks=(),
    )
    health = judge(snap, EPOCH, from_mapping({"meter": {"port": "/dev/null"}}).http)
    (reason,) = health.reasons
    assert reason.startswith("no valid telegram since the start") and "ever" not in reason


@contextlib.asynccontextmanager
async def silent_ser2net() -> AsyncIterator[int]:
    """A TCP port that accepts and never sends a byte: ser2net with nothing on its cable."""
    connections: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def no_bytes_warning(port: str) -> str:
    meter = from_mapping({"meter": {"port": port, "idle_timeout": 0.2}}).meter
    reader = MeterReader(meter, lambda frame: None)
    with capture_logs() as logs:
        task = asyncio.create_task(reader.run())
        try:
            await wait_until(
                lambda: any("no bytes" in entry["event"] for entry in logs), "the warning"
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return next(str(entry["event"]) for entry in logs if "no bytes" in entry["event"])


async def test_19_the_cable_hint_is_for_cables_only() -> None:
    async with silent_ser2net() as tcp:
        remote = await no_bytes_warning(f"socket://127.0.0.1:{tcp}")
    assert "cable" not in remote.replace("meter's cable", "")
    assert "ser2net" in remote
    port = VirtualSerialPort()  # a serial device that stays silent
    try:
        local = await no_bytes_warning(port.path)
    finally:
        port.close()
    assert "check the cable" in local


def test_19_a_running_daemons_lines_carry_their_offset(tmp_path: Path) -> None:
    """The real process, logging JSON: every line's time says which zone it is in."""
    port = VirtualSerialPort()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[meter]\nport = "{port.path}"\n[spool]\npath = "{tmp_path / "spool.sqlite3"}"\n'
        '[log]\nformat = "json"\nlevel = "debug"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "dsmr_logger", "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    lines: list[str] = []

    def read_until(needle: str) -> None:
        assert process.stderr is not None
        while not lines or needle not in lines[-1]:
            lines.append(process.stderr.readline())
            assert lines[-1], f"the daemon ended before {needle!r}"

    try:
        read_until("meter link open")
        asyncio.run(MeterSimulator(port, frames_in(default_capture()), interval=0.05).run(3))
        read_until('"telegram"')
    finally:
        process.send_signal(signal.SIGTERM)
        lines += process.stderr.read().splitlines() if process.stderr else []
        process.wait(timeout=30)
        port.close()
    assert process.returncode == 0
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert {"started", "telegram", "stopped"} <= {event["event"] for event in events}
    assert all(OFFSET.search(event["timestamp"]) for event in events)
    assert not any("Traceback" in line for line in lines)
