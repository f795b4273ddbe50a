"""``dsmr-logger simulate``: what a person can get wrong, and a simulated meter that stays one.

The real command runs as a subprocess for what it prints and its exit status; the simulator's
writing is driven in process against a real pty read by a slow reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path

import pytest
from cli_process import dsmr_logger, one_clear_line
from waiting import wait_until

from dsmr_logger.sources.p1.crc import crc16
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort


@pytest.mark.parametrize("kind", ["file", "folder", "link to a file"])
def test_link_never_replaces_what_the_user_has_there(tmp_path: Path, kind: str) -> None:
    """--link is replaced by a symlink to the pty: a typo naming the configuration file (or a
    folder, or the user's own link) must not cost it."""
    precious = tmp_path / "config.toml"
    precious.write_text("[meter]\n")
    target = {"file": precious, "folder": tmp_path, "link to a file": tmp_path / "p1"}[kind]
    if kind == "link to a file":
        target.symlink_to(precious)
    result = dsmr_logger("simulate", "--count", "1", "--link", target)
    assert result.returncode == 2
    one_clear_line(result, f"--link: {target} already exists and is not a simulator's link")
    assert precious.read_text() == "[meter]\n"
    assert target.is_dir() if kind == "folder" else target.resolve() == precious


def test_a_link_left_by_a_killed_simulator_is_taken_over(tmp_path: Path) -> None:
    link = tmp_path / "dsmr-p1"
    link.symlink_to("/dev/pts/4242")  # a simulator's, its pty long gone
    port = VirtualSerialPort(link)
    try:
        assert os.readlink(link) == port.path
    finally:
        port.close()
    assert not os.path.lexists(link), "removed again when the simulator stopped"


async def test_a_reader_that_falls_behind_gets_whole_telegrams_only() -> None:
    """At a short --interval the pty fills and a telegram is written in part, the rest when
    there is room. The next one must wait for that rest: a meter never interleaves two
    telegrams, and a daemon reading the simulator must see no CRC error it did not cause."""
    telegrams = frames_in(default_capture())
    port = VirtualSerialPort()
    received = bytearray()
    reader = os.open(port.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)

    async def read_slowly() -> None:
        while True:
            await asyncio.sleep(0.002)
            with contextlib.suppress(BlockingIOError):
                received.extend(os.read(reader, 300))

    simulator = MeterSimulator(port, telegrams, interval=0.0002)
    slow = asyncio.create_task(read_slowly())
    try:
        await simulator.run(1500)
        # Every telegram the simulator started is in the pty whole once run() returns; the
        # kernel hands it to the reader in steps, so wait for the last one's end, not for an
        # empty queue (which can be empty for a moment between two steps).
        await wait_until(
            lambda: len(re.findall(rb"![0-9A-F]{4}\r\n", bytes(received))) >= simulator.stats.sent,
            "the reader to catch up",
            timeout=60,
        )
    finally:
        slow.cancel()
        os.close(reader)
        port.close()
    assert simulator.stats.skipped > 0, "the reader did fall behind"
    frames = re.findall(rb"/[^/!]*![0-9A-F]{4}\r\n", bytes(received))
    assert len(frames) >= 10
    whole = sum(map(len, frames))
    assert whole == len(received), f"{len(received) - whole} bytes outside whole telegrams"
    bad = sum(1 for f in frames if crc16(f[: f.index(b"!") + 1]) != int(f[-6:-2], 16))
    assert bad == 0, f"{bad} of {len(frames)} telegrams with a wrong CRC"


def test_stopping_while_a_telegram_is_half_written_is_not_a_traceback(tmp_path: Path) -> None:
    """The demo's simulated meter, stopped while its pty is full, printed an asyncio
    'Exception in callback ... CancelledError' traceback."""
    result = dsmr_logger(
        "demo", "--dir", tmp_path / "demo", "--interval", "0.0001", "--duration", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "rejected" not in result.stdout, "the simulated meter sent only whole telegrams"
