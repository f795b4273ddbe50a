"""MeterReader against real links: a pty opened by pyserial and a TCP server on 127.0.0.1.

Nothing is mocked. Short timeouts are injected through MeterConfig so that reconnects, idle
watchdogs and backoff happen in tenths of a second, and every wait is bounded by
``asyncio.wait_for`` so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import require_corpus
from structlog.testing import capture_logs
from waiting import wait_until

from dsmr_logger.config import MeterConfig
from dsmr_logger.sources import MeterState
from dsmr_logger.sources.p1.framing import Frame, Rejection
from dsmr_logger.sources.p1.port import Link, open_link
from dsmr_logger.sources.p1.reader import MeterReader
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort

CAPTURE_566 = "nielsbasjes-dsmr-tools/ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"
IDLE = 0.4
LINK_DOWN = "meter link down, retrying"
LINK_OPEN = "meter link open"
NO_VALID = "receiving bytes but no valid telegram"
NO_BYTES = "no bytes from the meter"
REJECTED = "frames rejected"


Logs = list[dict[str, Any]]


@pytest.fixture(autouse=True)
def logs() -> Iterator[Logs]:
    """Every test runs inside ``capture_logs``: the events can be checked, and a structlog set-up
    left behind by another test (e.g. the CLI's, printing to a capsys stream closed since) cannot
    make the reader's logging raise."""
    with capture_logs() as captured:
        yield captured


def meter_config(port: str | Path, *, idle_timeout: float = IDLE) -> MeterConfig:
    return MeterConfig(
        port=str(port),
        idle_timeout=idle_timeout,
        reconnect_initial=0.05,
        reconnect_max=0.2,
    )


def capture_566() -> bytes:
    return (require_corpus() / CAPTURE_566).read_bytes()


def events(logs: Logs, prefix: str) -> Logs:
    return [entry for entry in logs if entry["event"].startswith(prefix)]


async def play(port: VirtualSerialPort, telegrams: Sequence[bytes]) -> None:
    """Write the telegrams as recorded, as fast as the reader takes them."""
    simulator = MeterSimulator(port, telegrams, interval=0, as_recorded=True)
    await asyncio.wait_for(simulator.run(len(telegrams)), 4.0)


class CountingOpen:
    """The real ``open_link``, counting the attempts (to tell retries from log lines)."""

    def __init__(self) -> None:
        self.attempts = 0

    async def __call__(self, config: MeterConfig) -> Link:
        self.attempts += 1
        return await open_link(config)


@contextlib.asynccontextmanager
async def running(reader: MeterReader) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(reader.run())
    try:
        yield task
        assert not task.done(), "the reader task exited on its own"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)


class Ports:
    """Opens VirtualSerialPorts and closes each exactly once (``close`` is not idempotent)."""

    def __init__(self) -> None:
        self._open: list[VirtualSerialPort] = []

    def __enter__(self) -> Ports:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._open:
            self._open.pop().close()

    def __call__(self, link: Path | None = None) -> VirtualSerialPort:
        port = VirtualSerialPort(link)
        self._open.append(port)
        return port

    def close(self, port: VirtualSerialPort) -> None:
        self._open.remove(port)
        port.close()


def corrupt(telegram: bytes) -> bytes:
    """Flip one bit of a digit in the body: still a well-formed frame, but the CRC fails."""
    data = bytearray(telegram)
    pos = data.index(b"1-0:1.8.1(") + len(b"1-0:1.8.1(")
    data[pos] ^= 0x01  # '0' <-> '1', '2' <-> '3', ...: still a digit
    return bytes(data)


# 1. The 566-frame capture through a pty -------------------------------------------------------


async def test_566_frame_capture_through_pty_arrives_complete_in_order() -> None:
    expected = frames_in(capture_566())
    assert len(expected) == 566
    frames: list[Frame] = []
    with Ports() as make:
        port = make()
        reader = MeterReader(meter_config(port.path), frames.append)
        async with running(reader):
            # pyserial flushes the input queue on open: start playing once the port is open.
            await wait_until(lambda: reader.status.connected, "the pty to be opened")
            await play(port, expected)
            await wait_until(lambda: len(frames) >= len(expected), "566 frames")
    assert [frame.raw for frame in frames] == expected
    counters = reader.assembler.counters
    assert counters.frames == 566
    assert counters.rejected_total == 0
    assert counters.garbage_bytes == 0
    assert reader.status.state is MeterState.OK
    assert reader.status.connects == 1


async def test_a_finished_simulator_closes_its_port_only_once_the_reader_has_everything() -> None:
    """``simulate --count N`` then exit: the port vanishing must not swallow the last telegrams.

    Most of a fast burst waits in the kernel, not yet counted as readable; closing the port
    the moment the readable queue looks empty would discard it.
    """
    expected = frames_in(capture_566())[:200]
    frames: list[Frame] = []
    with Ports() as make:
        port = make()
        reader = MeterReader(meter_config(port.path), frames.append)
        async with running(reader):
            await wait_until(lambda: reader.status.connected, "the pty to be opened")
            await play(port, expected)
            await port.drained()
            make.close(port)
            received = len(frames)
    assert received == len(expected)


async def test_drained_gives_up_when_nobody_reads() -> None:
    with Ports() as make:
        port = make()
        await play_unread(port, frames_in(default_capture()))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(port.drained(settle=0.1, patience=0.3), 5.0)
        assert port.unread() > 0
        assert loop.time() - started >= 0.3


async def play_unread(port: VirtualSerialPort, telegrams: Sequence[bytes]) -> None:
    """Write into the port with nobody reading (fits in the pty's buffer)."""
    for telegram in telegrams:
        os.write(port.master, telegram)


# 2. The pty disappears and comes back at the same path ----------------------------------------


async def test_reconnects_when_the_pty_disappears_and_comes_back(
    tmp_path: Path, logs: Logs
) -> None:
    link = tmp_path / "meter"
    telegrams = frames_in(default_capture())
    frames: list[Frame] = []
    opener = CountingOpen()
    with Ports() as make:
        first = make(link)
        reader = MeterReader(
            meter_config(link),
            frames.append,
            open_link=opener,
            log=structlog.get_logger("dsmr_logger.meter"),
        )
        async with running(reader) as task:
            await wait_until(lambda: reader.status.connected, "the first pty to be opened")
            await play(first, telegrams[:3])
            await wait_until(lambda: len(frames) == 3, "frames from the first pty")

            make.close(first)  # the device and its symlink disappear
            assert not link.exists()
            await wait_until(lambda: not reader.status.connected, "the reader to notice")
            lost_at = opener.attempts
            await wait_until(lambda: opener.attempts >= lost_at + 4, "several failed reopens")
            assert not task.done()
            assert reader.status.state is MeterState.DISCONNECTED

            second = make(link)
            await wait_until(lambda: reader.status.connected, "the reader to reconnect")
            await play(second, telegrams[3:7])
            await wait_until(lambda: len(frames) == 7, "frames from the second pty")

    assert [frame.raw for frame in frames] == telegrams[:7]
    assert reader.status.connects >= 2
    assert reader.status.disconnects >= 1
    assert reader.status.state is MeterState.OK
    downs = events(logs, LINK_DOWN)
    # One warning when the link broke (the read failed) and one when reopening started failing;
    # not one per retry although there were several.
    failed_opens = opener.attempts - reader.status.connects
    assert failed_opens >= 3
    assert len(downs) == 2, downs
    assert downs[1]["reason"].startswith("cannot open"), downs
    assert downs[0]["reason"] != downs[1]["reason"]
    assert all(entry["log_level"] == "warning" for entry in downs)
    assert len(events(logs, LINK_OPEN)) == 2


# 3. socket://: a half-open link is reopened by the idle watchdog ------------------------------


async def test_socket_half_open_link_is_reopened_by_the_idle_watchdog() -> None:
    capture = capture_566()
    expected = frames_in(capture)
    again = frames_in(default_capture())[:5]
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = not writers
        writers.append(writer)
        writer.write(capture if first else b"".join(again))
        await writer.drain()
        # Then go silent but keep the connection open (a half-open ser2net link), until the
        # client gives up on it.
        with contextlib.suppress(ConnectionError):
            await reader.read()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    frames: list[Frame] = []
    reader = MeterReader(meter_config(f"socket://{host}:{port}"), frames.append)
    try:
        async with running(reader):
            await wait_until(lambda: len(frames) >= len(expected), "the capture over TCP")
            assert [frame.raw for frame in frames] == expected
            assert reader.status.idle_reconnects == 0

            await wait_until(lambda: len(writers) >= 2, "the watchdog to reconnect", timeout=2.0)
            assert reader.status.idle_reconnects >= 1
            await wait_until(
                lambda: len(frames) >= len(expected) + len(again), "frames on the new connection"
            )
            assert reader.status.state is MeterState.OK
    finally:
        for writer in writers:
            writer.close()
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)
    assert [frame.raw for frame in frames] == expected + again
    assert writers[0].is_closing()
    assert reader.status.connects >= 2


# 4. "No bytes at all" vs "bytes but no valid frame" -------------------------------------------


async def test_silent_pty_is_reported_as_no_bytes(logs: Logs) -> None:
    with Ports() as make:
        port = make()
        reader = MeterReader(
            meter_config(port.path, idle_timeout=0.3),
            lambda frame: None,
            log=structlog.get_logger("dsmr_logger.meter"),
        )
        async with running(reader):
            await wait_until(
                lambda: reader.status.state is MeterState.NO_BYTES, "state no_bytes", 1.5
            )
            assert reader.status.last_byte_at is None
            await wait_until(lambda: reader.status.idle_reconnects >= 3, "idle reconnects")
    assert reader.status.state is MeterState.NO_BYTES
    assert reader.status.connects >= 3
    warnings = events(logs, NO_BYTES)
    assert len(warnings) == 1, warnings
    assert "cable" in warnings[0]["event"]
    assert not events(logs, NO_VALID)


async def test_silent_pty_logs_link_down_once_not_once_per_idle_reconnect(logs: Logs) -> None:
    """A meter that stays silent is one state change, not a warning every idle_timeout.

    Fails: ``_came_up`` forgets the reason last logged (``LinkTracker.up`` not ``quiet``) on
    every successful open, so each idle cycle logs "meter link down, retrying" (and "meter link
    open") again, i.e. once per retry.
    """
    with Ports() as make:
        port = make()
        reader = MeterReader(
            meter_config(port.path, idle_timeout=0.3),
            lambda frame: None,
            log=structlog.get_logger("dsmr_logger.meter"),
        )
        async with running(reader):
            await wait_until(lambda: reader.status.idle_reconnects >= 3, "idle reconnects")
    downs = events(logs, LINK_DOWN)
    assert len(downs) == 1, [entry["reason"] for entry in downs]
    assert len(events(logs, LINK_OPEN)) == 1


async def test_garbage_bytes_are_reported_as_no_valid_frames_then_ok(logs: Logs) -> None:
    rng = random.Random(20240601)
    telegrams = frames_in(default_capture())
    frames: list[Frame] = []

    async def garbage(port: VirtualSerialPort) -> None:
        # What a wrong baud rate looks like: a steady stream of bytes with no frame start in it.
        while True:
            chunk = bytes(rng.randrange(256) for _ in range(64)).replace(b"/", b"")
            os.write(port.master, chunk)
            await asyncio.sleep(0.02)

    with Ports() as make:
        port = make()
        reader = MeterReader(
            meter_config(port.path),
            frames.append,
            log=structlog.get_logger("dsmr_logger.meter"),
        )
        async with running(reader):
            await wait_until(lambda: reader.status.connected, "the pty to be opened")
            noise = asyncio.create_task(garbage(port))
            try:
                await wait_until(
                    lambda: reader.status.state is MeterState.NO_VALID_FRAMES,
                    "state bytes_but_no_valid_frames",
                    2.0,
                )
                await asyncio.sleep(2.5 * IDLE)  # garbage keeps coming: no second warning
                assert reader.status.state is MeterState.NO_VALID_FRAMES
            finally:
                noise.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await noise
            assert reader.status.idle_reconnects == 0  # bytes did arrive: no idle reopen
            assert reader.status.last_byte_at is not None
            assert reader.status.last_frame_at is None
            assert frames == []

            await play(port, telegrams)
            await wait_until(lambda: len(frames) == len(telegrams), "valid telegrams")
            assert reader.status.state is MeterState.OK

    assert [frame.raw for frame in frames] == telegrams
    assert reader.assembler.counters.garbage_bytes > 0
    warnings = events(logs, NO_VALID)
    assert len(warnings) == 1, warnings
    assert "baudrate" in warnings[0]["event"]
    assert "profile" in warnings[0]["event"]
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["bytes_without_frame"] > 0
    assert not events(logs, NO_BYTES)
    assert len(events(logs, "reading valid telegrams")) == 1


# 5. A port path that does not exist (yet) -----------------------------------------------------


async def test_missing_port_is_retried_quietly_until_it_appears(tmp_path: Path, logs: Logs) -> None:
    link = tmp_path / "meter"
    telegrams = frames_in(default_capture())
    frames: list[Frame] = []
    opener = CountingOpen()
    with Ports() as make:
        reader = MeterReader(
            meter_config(link),
            frames.append,
            open_link=opener,
            log=structlog.get_logger("dsmr_logger.meter"),
        )
        async with running(reader) as task:
            await wait_until(lambda: opener.attempts >= 6, "several backoff periods")
            assert not task.done()
            assert reader.status.connects == 0
            assert reader.status.state is MeterState.DISCONNECTED
            assert reader.status.last_error is not None
            assert reader.status.last_error.startswith("cannot open")

            port = make(link)  # the device (a symlink to a pty) appears later
            await wait_until(lambda: reader.status.connected, "the reader to open the new port")
            await play(port, telegrams[:4])
            await wait_until(lambda: len(frames) == 4, "frames from the new port")

    assert [frame.raw for frame in frames] == telegrams[:4]
    assert reader.status.connects == 1
    downs = events(logs, LINK_DOWN)
    assert len(downs) == 1, downs
    assert downs[0]["reason"].startswith("cannot open")
    assert str(link) in downs[0]["port"]
    assert len(events(logs, LINK_OPEN)) == 1


# 6. CRC storm ---------------------------------------------------------------------------------


async def test_crc_storm_is_dropped_counted_and_summarised_once(logs: Logs) -> None:
    telegrams = frames_in(default_capture())
    broken = [corrupt(telegram) for telegram in telegrams]
    assert frames_in(b"".join(broken)) == []
    frames: list[Frame] = []
    with Ports() as make:
        port = make()
        reader = MeterReader(
            meter_config(port.path),
            frames.append,
            log=structlog.get_logger("dsmr_logger.meter"),
        )
        counters = reader.assembler.counters
        async with running(reader):
            await wait_until(lambda: reader.status.connected, "the pty to be opened")
            await play(port, broken * 5)
            await wait_until(
                lambda: counters.rejected[Rejection.CRC_MISMATCH] == 50, "50 rejections"
            )
            assert frames == []

            await play(port, telegrams)  # good frames in between do not reset the rate limit
            await wait_until(lambda: len(frames) == len(telegrams), "the valid telegrams")
            await play(port, broken * 5)
            await wait_until(
                lambda: counters.rejected[Rejection.CRC_MISMATCH] == 100, "100 rejections"
            )

    assert [frame.raw for frame in frames] == telegrams
    assert counters.frames == len(telegrams)
    assert counters.rejected_total == 100
    warnings = events(logs, REJECTED)
    assert len(warnings) == 1, warnings
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["last_reason"] == Rejection.CRC_MISMATCH.value
    assert warnings[0]["total"][Rejection.CRC_MISMATCH.value] >= 1
