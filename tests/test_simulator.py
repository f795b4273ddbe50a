"""The simulated meter: the meter's wall clock and season flag, never a repeated timestamp, and an
encrypted meter played or made from a capture."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cli_process import environment
from conftest import require_corpus

from dsmr_logger.sources.p1.decrypt import Decryptor
from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.telegram.glance import glance
from dsmr_logger.tools.simulate import (
    Encryptor,
    MeterSimulator,
    VirtualSerialPort,
    capture_spacing,
    prepare,
)

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
TELEGRAMS = frames_in(default_capture())
SAGEMCOM = "encrypted/esphome-libs-encrypted-packet-sagemcom-t210"
DSMR5_CAPTURE = "nielsbasjes-dsmr-tools/ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"


def stamp(telegram: bytes) -> str:
    return glance(telegram).values["meter_timestamp"]


def stamps(simulator: MeterSimulator, count: int) -> list[str]:
    return [stamp(telegram) for telegram in simulator.stream(count)]


@pytest.fixture
def port() -> VirtualSerialPort:
    port = VirtualSerialPort()
    yield port  # type: ignore[misc]
    port.close()


@pytest.mark.parametrize(
    ("utc", "expected"),
    [
        (datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC), "260601140000S"),  # CEST: UTC+2
        (datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC), "260105130000W"),  # CET: UTC+1
        (datetime(2026, 10, 25, 0, 30, 0, tzinfo=UTC), "261025023000S"),  # the first 02:30
        (datetime(2026, 10, 25, 1, 30, 0, tzinfo=UTC), "261025023000W"),  # the second one
    ],
)
def test_18_stamped_in_the_meters_zone_with_its_season_flag(
    port: VirtualSerialPort, utc: datetime, expected: str
) -> None:
    """A host on UTC must not send Dutch readings an hour or two in the past."""
    simulator = MeterSimulator(port, TELEGRAMS, zone=AMSTERDAM, now=lambda: utc)
    assert stamps(simulator, 1) == [expected]


def test_18_a_burst_carries_distinct_increasing_timestamps(port: VirtualSerialPort) -> None:
    frozen = datetime(2026, 6, 1, 12, 0, 0, 400_000, tzinfo=UTC)  # --interval 0: no time passes
    simulator = MeterSimulator(port, TELEGRAMS, interval=0, zone=AMSTERDAM, now=lambda: frozen)
    got = stamps(simulator, 25)
    assert got == [f"2606011400{second:02d}S" for second in range(25)]


def test_18_the_clock_follows_real_time_when_it_is_ahead(port: VirtualSerialPort) -> None:
    times = iter(
        datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC) + timedelta(seconds=s) for s in (0, 0, 10, 10)
    )
    simulator = MeterSimulator(port, TELEGRAMS, zone=AMSTERDAM, now=lambda: next(times))
    assert stamps(simulator, 4) == [
        "260601140000S",
        "260601140001S",  # same second: one spacing on
        "260601140010S",  # real time is later: real time
        "260601140011S",
    ]


def test_18_the_spacing_is_the_captures_own() -> None:
    assert capture_spacing(TELEGRAMS) == timedelta(seconds=1)  # DSMR 5: one a second
    five_hundred = frames_in((require_corpus() / DSMR5_CAPTURE).read_bytes())
    assert capture_spacing(five_hundred) == timedelta(seconds=1)
    unreadable = [t.replace(b"0-0:1.0.0(", b"0-0:1.0.0(X", 1) for t in TELEGRAMS]
    assert capture_spacing(unreadable) == timedelta(seconds=1)  # cannot tell: the default


def test_18_a_capture_ten_seconds_apart_advances_ten_seconds(port: VirtualSerialPort) -> None:
    from dsmr_logger.telegram.build import meter_timestamp, restamp

    start = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
    dsmr4 = [
        restamp(t, meter_timestamp(start + timedelta(seconds=10 * i), AMSTERDAM))
        for i, t in enumerate(TELEGRAMS)
    ]
    assert capture_spacing(dsmr4) == timedelta(seconds=10)
    simulator = MeterSimulator(port, dsmr4, interval=0, zone=AMSTERDAM, now=lambda: start)
    assert stamps(simulator, 3) == ["260105130000W", "260105130010W", "260105130020W"]


def _play(args: list[str], count: int, decrypt_with: str | None = None) -> list[bytes]:
    """Run ``dsmr-logger simulate ARGS``, open the port it prints, read ``count`` telegrams."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dsmr_logger", "simulate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    assert process.stdout is not None
    try:
        path = process.stdout.readline().strip()
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
        decryptor = Decryptor(bytes.fromhex(decrypt_with)) if decrypt_with else None
        assembler = FrameAssembler()
        telegrams: list[bytes] = []
        deadline = time.monotonic() + 30
        try:
            while len(telegrams) < count:
                assert time.monotonic() < deadline, f"read {len(telegrams)} of {count}"
                if not select.select([fd], [], [], 1.0)[0]:
                    continue
                chunk = os.read(fd, 65536)
                plain = b"".join(decryptor.feed(chunk, 0.0)) if decryptor else chunk
                telegrams += [frame.raw for frame in assembler.feed(plain, 0.0)]
        finally:
            os.close(fd)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        assert process.stderr is not None
        errors = process.stderr.read()
        process.stderr.close()
    assert "Traceback" not in errors, errors
    return telegrams


def test_18_the_command_sends_increasing_stamps_in_the_zone_given() -> None:
    telegrams = _play(["--interval", "0", "--count", "12", "--timezone", "Europe/Lisbon"], 12)
    got = [stamp(telegram) for telegram in telegrams]
    assert got == sorted(got) and len(set(got)) == 12
    lisbon = datetime.now(ZoneInfo("Europe/Lisbon"))
    assert got[0][-1] == ("S" if lisbon.dst() else "W")
    first = datetime.strptime(got[0][:12], "%y%m%d%H%M%S").replace(tzinfo=ZoneInfo("Europe/Lisbon"))
    assert abs((first - datetime.now(UTC)).total_seconds()) < 120


def _sagemcom() -> tuple[Path, str, bytes]:
    root = require_corpus()
    key = json.loads((root / f"{SAGEMCOM}.json").read_text())["key"]
    plaintext = (root / f"{SAGEMCOM}.plaintext.txt").read_bytes()
    return root / f"{SAGEMCOM}.frame.hex", key, plaintext


def test_15_an_encrypted_capture_with_its_key_is_an_encrypted_meter_with_fresh_stamps() -> None:
    capture, key, plaintext = _sagemcom()
    telegrams = _play(
        ["--capture", str(capture), "--decryption-key", key, "--interval", "0", "--count", "3"],
        3,
        decrypt_with=key,
    )
    assert len(telegrams) == 3
    got = [stamp(telegram) for telegram in telegrams]
    assert got == sorted(got) and len(set(got)) == 3
    assert got[0] != stamp(plaintext)  # restamped
    assert all(t.split(b"\r\n", 1)[0] == plaintext.split(b"\r\n", 1)[0] for t in telegrams)


def test_15_an_encrypted_capture_without_its_key_plays_as_recorded() -> None:
    capture, key, plaintext = _sagemcom()
    telegrams = _play(
        ["--capture", str(capture), "--interval", "0", "--count", "2"], 2, decrypt_with=key
    )
    assert telegrams == [plaintext, plaintext]


def test_15_the_encryptor_is_the_decryptors_inverse() -> None:
    key = bytes(range(16))
    for auth in (None, bytes(16), b"\x11" * 16):
        encrypt = Encryptor(key, auth, counter=0xFFFFFFFE)
        frames = b"".join(encrypt(telegram) for telegram in TELEGRAMS[:3])
        decryptor = Decryptor(key, auth)
        assert decryptor.feed(frames, 0.0) == TELEGRAMS[:3]
        assert encrypt.counter == 1  # wrapped, as a 4-byte counter does
        assert Decryptor(key, b"\x22" * 16).feed(frames, 0.0) == []  # the tag is checked


def test_15_prepare_refuses_what_it_cannot_play() -> None:
    capture, key, _ = _sagemcom()
    from dsmr_logger.telegram.capture import read_capture
    from dsmr_logger.tools.simulate import NoTelegrams

    data = read_capture(capture)
    with pytest.raises(NoTelegrams, match="do not decrypt with this --decryption-key"):
        prepare(data, decryption_key=bytes(16))
    with pytest.raises(NoTelegrams, match="no valid telegram and no encrypted frame"):
        prepare(b"noise")
    playlist = prepare(data)
    assert playlist.as_recorded and playlist.note and "--decryption-key" in playlist.note
    assert prepare(default_capture(), decryption_key=bytes.fromhex(key)).encrypt is not None
