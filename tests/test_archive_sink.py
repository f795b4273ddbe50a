"""The archive sink on real files: day files by local date, written before confirmed, gzip."""

from __future__ import annotations

import collections
import gzip
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import REPO_ROOT
from structlog.testing import capture_logs
from test_daemon_process import (
    Processes,
    log_events,
    pending_in_spool,
    reads,
    stamp,
    terminate,
    unique_capture,
    wait_until,
)

from dsmr_logger.config import ArchiveSinkConfig
from dsmr_logger.delivery.answers import Answer, Verdict
from dsmr_logger.delivery.sinks.archive import ArchiveSink, compress_day
from dsmr_logger.delivery.spool import StoredTelegram
from dsmr_logger.telegram.capture import default_capture, frames_in, read_capture

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
TELEGRAMS = frames_in(default_capture())
DELIVERED = Answer(Verdict.DELIVERED)
TODAY = "2024-06-10T12:00:00+02:00"


def at(instant: str) -> float:
    """Unix time of an ISO instant; the explicit UTC offset says which side of a DST switch."""
    return datetime.fromisoformat(instant).timestamp()


def item(seq: int, instant: str) -> StoredTelegram:
    return StoredTelegram(seq, TELEGRAMS[seq % len(TELEGRAMS)], at(instant))


def archive(
    directory: Path, *, compress_after_days: int | None = None, strict: bool = False
) -> ArchiveSink:
    config = ArchiveSinkConfig("archive", directory, compress_after_days=compress_after_days)
    return ArchiveSink(config, strict=strict, tz=AMSTERDAM, wall_clock=lambda: at(TODAY))


async def test_a_day_lands_in_one_file_byte_for_byte_and_logs_only_the_open(tmp_path: Path) -> None:
    sink = archive(tmp_path / "archive")
    with capture_logs() as logs:
        await sink.start()
        for seq, hour in enumerate(range(0, 24, 3)):
            assert await sink.send(item(seq, f"2024-06-10T{hour:02}:00:00+02:00")) == DELIVERED
        await sink.close()
    written = (tmp_path / "archive" / "2024-06-10.log").read_bytes()
    assert written == b"".join(TELEGRAMS[:8])
    assert frames_in(written) == TELEGRAMS[:8]
    assert [log["event"] for log in logs] == ["archive file opened"]


@pytest.mark.parametrize("strict", [False, True], ids=["batched", "strict"])
async def test_every_telegram_is_in_the_file_when_it_is_confirmed(
    tmp_path: Path, strict: bool
) -> None:
    """DELIVERED means in the file (the OS has it: it survives a SIGKILL), never in memory."""
    sink = archive(tmp_path, strict=strict)
    await sink.start()
    path = tmp_path / "2024-06-10.log"
    for seq in range(len(TELEGRAMS)):
        assert await sink.send(item(seq, TODAY)) == DELIVERED
        assert path.read_bytes() == b"".join(TELEGRAMS[: seq + 1])
    await sink.close()
    assert path.read_bytes() == b"".join(TELEGRAMS)


_WRITE_BYTES_PROBE = """
import asyncio, sys, time
from pathlib import Path
from dsmr_logger.config import ArchiveSinkConfig
from dsmr_logger.delivery.sinks.archive import ArchiveSink
from dsmr_logger.delivery.spool import StoredTelegram
from dsmr_logger.telegram.capture import default_capture, frames_in

def written() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise SystemExit("no write_bytes")

async def main(directory: str, strict: bool) -> None:
    telegrams = frames_in(default_capture())[:40]
    sink = ArchiveSink(ArchiveSinkConfig("archive", Path(directory)), strict=strict)
    await sink.start()
    now = time.time()
    await sink.send(StoredTelegram(0, telegrams[0], now))  # opens the file
    before = written()
    for seq, telegram in enumerate(telegrams[1:], 1):
        await sink.send(StoredTelegram(seq, telegram, now))
    print((written() - before) / (len(telegrams) - 1), len(telegrams[0]))
    await sink.close()

asyncio.run(main(sys.argv[1], sys.argv[2] == "strict"))
"""


@pytest.mark.parametrize("strict", [False, True], ids=["batched", "strict"])
def test_strict_durability_puts_each_telegram_on_the_disk_before_confirming(
    tmp_path: Path, strict: bool
) -> None:
    """Seen in the bytes the kernel charges for writing (``/proc/self/io``, in a process of its
    own): an fsync cleans the file's last page, so under strict each telegram dirties (and so is
    charged) a whole page again; batched, appends to a dirty page are charged once per page."""
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_BYTES_PROBE, str(tmp_path), "strict" if strict else ""],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    per_telegram, size = map(float, done.stdout.splitlines()[-1].split())  # after log lines
    if per_telegram == 0:
        pytest.skip(f"{tmp_path} is on a file system that charges no write_bytes (tmpfs)")
    if strict:
        assert per_telegram >= 4096
    else:
        assert per_telegram < 2 * size


@pytest.mark.parametrize(
    ("instants", "days"),
    [
        pytest.param(
            ["2024-01-15T23:59:59+01:00", "2024-01-16T00:00:00+01:00"],
            ["2024-01-15", "2024-01-16"],
            id="winter",
        ),
        pytest.param(
            [
                "2024-03-30T23:59:59+01:00",
                "2024-03-31T00:00:00+01:00",
                "2024-03-31T03:30:00+02:00",  # clocks went from 02:00 to 03:00
                "2024-03-31T23:59:59+02:00",
                "2024-04-01T00:30:00+02:00",  # 31 March 23:30 at a fixed winter offset
            ],
            ["2024-03-30", "2024-03-31", "2024-03-31", "2024-03-31", "2024-04-01"],
            id="spring-forward",
        ),
        pytest.param(
            [
                "2024-10-26T23:59:59+02:00",
                "2024-10-27T00:30:00+02:00",  # 26 October 23:30 at a fixed winter offset
                "2024-10-27T02:30:00+02:00",
                "2024-10-27T02:30:00+01:00",  # the same wall-clock time once more
                "2024-10-27T23:59:59+01:00",
                "2024-10-28T00:00:00+01:00",
            ],
            ["2024-10-26", "2024-10-27", "2024-10-27", "2024-10-27", "2024-10-27", "2024-10-28"],
            id="fall-back",
        ),
    ],
)
async def test_local_midnight_starts_a_new_file(
    tmp_path: Path, instants: list[str], days: list[str]
) -> None:
    sink = archive(tmp_path)
    await sink.start()
    for seq, instant in enumerate(instants):
        assert await sink.send(item(seq, instant)) == DELIVERED
    await sink.close()
    expected: dict[str, list[bytes]] = {}
    for seq, day in enumerate(days):
        expected.setdefault(f"{day}.log", []).append(TELEGRAMS[seq])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    for name, telegrams in expected.items():
        assert frames_in((tmp_path / name).read_bytes()) == telegrams


async def test_leaving_a_day_writes_it_out_at_once(tmp_path: Path) -> None:
    sink = archive(tmp_path)
    await sink.start()
    await sink.send(item(0, "2024-06-09T23:59:58+02:00"))
    await sink.send(item(1, "2024-06-09T23:59:59+02:00"))  # buffered: same second
    await sink.send(item(2, "2024-06-10T00:00:00+02:00"))
    assert (tmp_path / "2024-06-09.log").read_bytes() == TELEGRAMS[0] + TELEGRAMS[1]
    await sink.close()


async def test_a_backlog_lands_in_the_days_it_was_read(tmp_path: Path) -> None:
    (tmp_path / "2024-06-07.log").write_bytes(TELEGRAMS[9])  # written before an outage
    sink = archive(tmp_path)  # the wall clock says 10 June
    await sink.start()
    backlog = [
        "2024-06-07T21:00:00+02:00",
        "2024-06-08T09:00:00+02:00",
        "2024-06-08T10:00:00+02:00",
    ]
    for seq, instant in enumerate([*backlog, TODAY]):
        assert await sink.send(item(seq, instant)) == DELIVERED
    await sink.close()
    assert frames_in((tmp_path / "2024-06-07.log").read_bytes()) == [TELEGRAMS[9], TELEGRAMS[0]]
    assert frames_in((tmp_path / "2024-06-08.log").read_bytes()) == TELEGRAMS[1:3]
    assert frames_in((tmp_path / "2024-06-10.log").read_bytes()) == [TELEGRAMS[3]]


async def test_start_compresses_old_days_and_leaves_today(tmp_path: Path) -> None:
    days = {f"2024-06-{day:02}.log": TELEGRAMS[day - 5 : day - 3] for day in range(7, 11)}
    for name, telegrams in days.items():
        (tmp_path / name).write_bytes(b"".join(telegrams))
    (tmp_path / "2024-13-45.log").write_bytes(b"not a date")
    (tmp_path / "notes.txt").write_bytes(b"not a day file")
    sink = archive(tmp_path, compress_after_days=1)
    await sink.start()
    await sink.compression_done()
    await sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "2024-06-07.log.gz",
        "2024-06-08.log.gz",
        "2024-06-09.log.gz",
        "2024-06-10.log",
        "2024-13-45.log",
        "notes.txt",
    ]
    for name, telegrams in days.items():
        if name != "2024-06-10.log":
            gz = tmp_path / f"{name}.gz"
            assert gzip.decompress(gz.read_bytes()) == b"".join(telegrams)
            assert frames_in(read_capture(gz)) == telegrams  # what ``simulate --capture`` reads


@pytest.mark.parametrize(("after_days", "compressed"), [(1, True), (2, False)])
async def test_a_day_change_compresses_days_old_enough(
    tmp_path: Path, after_days: int, compressed: bool
) -> None:
    sink = archive(tmp_path, compress_after_days=after_days)
    await sink.start()
    await sink.send(item(0, "2024-06-10T23:59:59+02:00"))
    await sink.send(item(1, "2024-06-11T00:00:01+02:00"))
    await sink.compression_done()
    await sink.close()
    if compressed:
        assert gzip.decompress((tmp_path / "2024-06-10.log.gz").read_bytes()) == TELEGRAMS[0]
        assert not (tmp_path / "2024-06-10.log").exists()
    else:
        assert (tmp_path / "2024-06-10.log").read_bytes() == TELEGRAMS[0]
    assert (tmp_path / "2024-06-11.log").read_bytes() == TELEGRAMS[1]


async def test_a_day_written_again_after_compression_keeps_both_parts(tmp_path: Path) -> None:
    (tmp_path / "2024-06-01.log.gz").write_bytes(gzip.compress(TELEGRAMS[0]))
    (tmp_path / "2024-06-01.log").write_bytes(TELEGRAMS[1])
    sink = archive(tmp_path, compress_after_days=1)
    await sink.start()
    await sink.compression_done()
    await sink.close()
    assert frames_in(read_capture(tmp_path / "2024-06-01.log.gz")) == TELEGRAMS[:2]
    assert not (tmp_path / "2024-06-01.log").exists()


def test_a_stopped_compression_leaves_the_day_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "2024-06-01.log"
    path.write_bytes(TELEGRAMS[0])
    stop = threading.Event()
    stop.set()
    assert compress_day(path, stop) is False
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes() == TELEGRAMS[0]


@pytest.mark.parametrize("where", ["directory is a file", "parent is a file"])
async def test_start_names_a_directory_it_cannot_create(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    directory = blocker if where == "directory is a file" else blocker / "archive"
    with pytest.raises(OSError, match=re.escape(f"cannot create its directory {directory}")):
        await archive(directory).start()


async def test_an_unwritable_directory_asks_for_retries_and_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "archive"
    path = directory / "2024-06-10.log"
    sink = archive(directory)
    await sink.start()
    await sink.send(item(0, TODAY))
    shutil.rmtree(directory)
    directory.write_bytes(b"")  # tests run as root: a file in its place stops even root
    with capture_logs() as logs:
        for _ in range(2):
            answer = await sink.send(item(1, TODAY))
            assert answer.verdict is Verdict.RETRY
            assert answer.error == f"cannot write {path}: Not a directory"
    assert [log["event"] for log in logs] == [
        "archive file was deleted; starting it again",
        "archive not writable; telegrams stay queued",  # once, not per retry
    ]
    directory.unlink()
    directory.mkdir()
    assert await sink.send(item(1, TODAY)) == DELIVERED
    await sink.close()
    assert path.read_bytes() == TELEGRAMS[1]  # the first went with the directory


async def test_a_deleted_day_file_is_started_again(tmp_path: Path) -> None:
    sink = archive(tmp_path)
    await sink.start()
    await sink.send(item(0, TODAY))
    (tmp_path / "2024-06-10.log").unlink()
    assert await sink.send(item(1, TODAY)) == DELIVERED
    await sink.close()
    assert (tmp_path / "2024-06-10.log").read_bytes() == TELEGRAMS[1]


@pytest.fixture
def file_size_limit() -> Iterator[None]:
    """Lets a test cap file sizes (EFBIG, a real short write) and restores the limit after it."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.usefixtures("file_size_limit")
async def test_a_full_disk_loses_nothing_and_never_splits_a_telegram(tmp_path: Path) -> None:
    """A write that gets only part of a telegram out (a real short write) is cut back: the
    telegram is answered RETRY, and the file holds whole telegrams only, each once."""
    path = tmp_path / "2024-06-10.log"
    sink = archive(tmp_path)
    await sink.start()
    await sink.send(item(0, TODAY))
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    with capture_logs():  # nothing but the archive may write while files are capped
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(TELEGRAMS[0]) + 100, hard))
        answer = await sink.send(item(1, TODAY))
        on_disk = path.read_bytes()
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    assert answer.verdict is Verdict.RETRY
    assert answer.error == f"cannot write {path}: File too large"
    assert on_disk == TELEGRAMS[0]
    assert await sink.send(item(1, TODAY)) == DELIVERED
    assert await sink.send(item(2, TODAY)) == DELIVERED
    await sink.close()
    assert path.read_bytes() == b"".join(TELEGRAMS[:3])


# --- the daemon as a real process: SIGKILLs with the archive as the only sink --------------------

KILLS = 6
INTERVAL = 0.015
METER_FRAMES = 4000
"""A minute of telegrams at INTERVAL: far more than the runs take, even on a loaded machine."""
STRICT_WINDOW = 0.25
"""Strict durability loses only a telegram read in the instant before a kill, before its commit
(measured: a few ms); the archive's old one-second buffer lost telegrams up to a second old."""


def archived(directory: Path) -> list[bytes]:
    """Every telegram in the archive's day files, oldest file first."""
    return [t for path in sorted(directory.glob("*.log")) for t in frames_in(path.read_bytes())]


def strict_archive_only_config(tmp_path: Path) -> Path:
    """No ``[[sink]]``: the daemon archives next to the spool; strict durability, debug log."""
    path = tmp_path / "config.toml"
    path.write_text(
        "\n".join(
            [
                "[meter]",
                f'port = "{tmp_path / "meter"}"',
                "idle_timeout = 1",
                "reconnect_initial = 0.05",
                "reconnect_max = 0.2",
                "[spool]",
                f'path = "{tmp_path / "spool.sqlite3"}"',
                'durability = "strict"',
                "flush_interval = 0.2",
                "[log]",
                'level = "debug"',
                'format = "json"',
                "",
            ]
        )
    )
    return path


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """The daemon and meter processes of a test; whatever still runs at teardown is killed."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


def test_sigkill_loses_no_telegram_the_archive_confirmed(tmp_path: Path, procs: Processes) -> None:
    """Strict durability, the archive the only sink, SIGKILL at random moments: every telegram
    read is in the archive or still in the spool's backlog, except one read in the instant before
    a kill; after a clean restart and stop every one of them is in the archive."""
    rng = random.Random("archive-sigkill")
    config = strict_archive_only_config(tmp_path)
    spool, directory = tmp_path / "spool.sqlite3", tmp_path / "archive"
    played = unique_capture(tmp_path / "capture.log", METER_FRAMES)
    sent = {stamp(t) for t in frames_in(played.read_bytes())}
    meter = procs.meter(interval=INTERVAL, count=METER_FRAMES, capture=played)
    runs: list[Path] = []
    kill_times: list[float] = []
    for _ in range(KILLS):
        daemon, log = procs.daemon(config)
        runs.append(log)
        wait_until(lambda log=log: reads(log), 10.0, "a run to read a telegram")
        time.sleep(rng.uniform(0.1, 0.8))
        kill_times.append(time.time())
        daemon.kill()
        daemon.wait(timeout=5)

    # After the kills, before any restart: the archive, the spool's backlog, what was read.
    read_when = {s: at for run in runs for s, at in reads(run)}
    in_archive = collections.Counter(stamp(t) for t in archived(directory))
    backlog = {stamp(t) for t in pending_in_spool(spool, "archive")}
    lost = set(read_when) - set(in_archive) - backlog
    ages = sorted(
        min(k - read_when[s] for k in kill_times if k >= read_when[s]) for s in lost
    )  # how long before the next kill each lost telegram was read
    print(
        f"{len(read_when)} read in {KILLS} killed runs; {sum(in_archive.values())} archived "
        f"({len(in_archive)} distinct); {len(backlog)} in the spool's backlog; {len(lost)} lost, "
        f"read {[round(a, 3) for a in ages]} s before a kill"
    )
    assert set(in_archive) <= set(read_when) <= sent
    assert all(age <= STRICT_WINDOW for age in ages), ages

    daemon, log = procs.daemon(config)
    runs.append(log)
    wait_until(lambda: len(reads(log)) >= 20, 10.0, "the last run to read")
    assert meter.poll() is None, "the meter ran out before the last run: raise METER_FRAMES"
    meter.terminate()
    assert meter.wait(timeout=10) == 0
    read_when = {s: at for run in runs for s, at in reads(run)}
    wait_until(
        lambda: set(read_when) - lost <= {stamp(t) for t in archived(directory)},
        20.0,
        "the last run to archive what was read",
    )
    status, _ = terminate(daemon)
    assert status == 0
    stopped = [e for e in log_events(log) if e.get("event") == "stopped"]
    assert stopped and stopped[0]["undelivered"] == {"archive": 0}, stopped
    assert pending_in_spool(spool, "archive") == []
    in_archive = collections.Counter(stamp(t) for t in archived(directory))
    assert set(in_archive) == set(read_when) - lost
    # At most the telegram being written when a kill came is written again after the restart.
    assert sum(n - 1 for n in in_archive.values()) <= KILLS
