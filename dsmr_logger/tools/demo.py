"""``dsmr-logger demo``: the real pipeline on a machine with no meter and no server.

A simulated meter plays the bundled capture into a virtual serial port (or, with ``--neurio``, a
simulated Neurio sensor answers on 127.0.0.1); the daemon reads it like a real P1 cable (or
sensor) and delivers to an archive folder (and to DSMR-reader when one is given), while a live
line shows what flows. Logs go to a file in the demo folder so they do not scramble the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from dsmr_logger.config import ConfigError, from_mapping
from dsmr_logger.daemon import Daemon, StartupError
from dsmr_logger.delivery.spool import SpoolError
from dsmr_logger.logsetup import configure
from dsmr_logger.runtime.snapshot import Snapshot
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.telegram.glance import glance
from dsmr_logger.tools import printable
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort
from dsmr_logger.tools.simulate_neurio import FakeSensor

_OPTIONS = {
    "sink[1] (dsmr-reader).url": "--dsmr-reader",
    "sink[1] (dsmr-reader).api_key": "--api-key",
}
"""Configuration keys the demo's options become, as the user wrote them."""


def run_demo(
    directory: Path,
    *,
    interval: float,
    dsmr_reader: str | None,
    api_key: str | None,
    duration: float | None,
    neurio: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """``neurio``: a simulated Neurio sensor (solar shape) on 127.0.0.1, polled over HTTP,
    instead of a meter on a virtual serial port."""
    directory = directory.resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"dsmr-logger: demo: cannot use --dir {directory}: {exc.strerror}", file=sys.stderr)
        return 2
    port: VirtualSerialPort | None = None
    sensor_socket: socket.socket | None = None
    if neurio:
        sensor_socket = socket.create_server(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sensor_socket.getsockname()[1]}"
        meter: dict[str, Any] = {"type": "neurio", "url": url, "interval": max(1.0, interval)}
        source = f"simulated Neurio sensor at {url}/current-sample"
    else:
        port = VirtualSerialPort()
        meter, source = {"port": port.path}, f"simulated meter on {port.path}"
    document: dict[str, Any] = {
        "meter": meter,
        "spool": {"path": str(directory / "spool.sqlite3"), "flush_interval": 5.0},
        "sink": [{"name": "archive", "type": "archive", "directory": str(directory / "archive")}],
        "log": {"format": "keyvalue"},
    }
    if dsmr_reader:
        document["sink"].append(
            {"name": "dsmr-reader", "url": dsmr_reader, "api_key": api_key, "timeout": 5.0}
        )

    def release() -> None:
        if port is not None:
            port.close()
        if sensor_socket is not None:
            sensor_socket.close()

    try:
        config = from_mapping(document)
    except ConfigError as exc:
        release()
        for problem in exc.problems:
            for key, option in _OPTIONS.items():
                problem = problem.replace(key, option)
            print(f"dsmr-logger: demo: {problem}", file=sys.stderr)
        return 2
    if port is not None:
        simulator = MeterSimulator(port, frames_in(default_capture()), interval=interval)
        play: Callable[[], Awaitable[None]] = simulator.run
    else:
        assert sensor_socket is not None
        play = functools.partial(_serve_sensor, FakeSensor("solar", sock=sensor_socket))
    log_path = directory / "dsmr-logger.log"
    with log_path.open("a", encoding="utf-8") as log_file:
        configure(config.log, stream=log_file)
        print(f"demo: {source}, working folder {directory}", file=out)
        print(f"demo: log in {log_path}; Ctrl-C stops", file=out, flush=True)
        try:
            status = asyncio.run(_demo(config, play, duration, out))
        except (SpoolError, StartupError) as exc:
            # A second demo in the same folder finds the first one's spool locked.
            print(f"dsmr-logger: demo: cannot start: {exc}", file=sys.stderr)
            print(
                "dsmr-logger: demo: is another demo running? --dir DIR picks another folder",
                file=sys.stderr,
            )
            return 1
        finally:
            release()
    archive = directory / "archive"
    print(f"\ndemo: stopped. Raw telegrams archived in {archive}:", file=out)
    for day in sorted(archive.glob("*.log*")):
        print(f"  {day}  ({day.stat().st_size} bytes)", file=out)
    print(f"demo: replay them with: dsmr-logger simulate --capture {archive}/<day>.log", file=out)
    return status


async def _serve_sensor(sensor: FakeSensor) -> None:
    await sensor.start()
    try:
        await asyncio.Event().wait()  # until cancelled
    finally:
        await sensor.stop()


async def _demo(
    config: Any, play: Callable[[], Awaitable[None]], duration: float | None, out: TextIO
) -> int:
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if duration is not None:
        loop.call_later(duration, stop.set)
    meter = asyncio.ensure_future(play())
    progress = asyncio.create_task(_show_progress(daemon, out))
    try:
        status = await daemon.run(stop)
    finally:
        for task in (meter, progress):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    print("\n" + progress_line(daemon.snapshot()), file=out, flush=True)
    return status


async def _show_progress(daemon: Daemon, out: TextIO) -> None:
    live = out.isatty()
    last_printed: float | None = None
    while True:
        await asyncio.sleep(0.5)
        snap = daemon.snapshot()
        line = progress_line(snap)
        if live:
            print("\r\033[K" + line, end="", file=out, flush=True)
        elif snap.frames and (last_printed is None or time.monotonic() - last_printed >= 5.0):
            print(line, file=out, flush=True)  # the first telegrams at once, then every 5 s
            last_printed = time.monotonic()


def progress_line(snap: Snapshot) -> str:
    seen = glance(snap.last_telegram) if snap.last_telegram else None
    parts = [f"frames {snap.frames}", f"power {(seen.power() if seen else None) or '-'}"]
    if snap.rejected:
        parts.append(f"rejected {sum(snap.rejected.values())}")
    for sink in snap.sinks:
        text = f"{sink.name}: {sink.delivered} delivered, backlog {sink.backlog}"
        if sink.failing_since is not None and sink.last_error:
            text += f", last error {sink.last_error}"
        parts.append(text)
    return printable(" | ".join(parts))  # a sink's last error quotes what its server sent
