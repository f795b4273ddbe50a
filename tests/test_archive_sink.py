"""The archive sink on real files: day files by local date, buffered writes, retries, gzip."""

from __future__ import annotations

import gzip
import re
import resource
import shutil
import signal
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from dsmr_logger.config import ArchiveSinkConfig
from dsmr_logger.delivery.answers import Answer, Verdict
from dsmr_logger.delivery.sinks.archive import ArchiveSink, compress_day
from dsmr_logger.delivery.spool import StoredTelegram
from dsmr_logger.telegram.capture import default_capture, frames_in, read_capture

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
TELEGRAMS = frames_in(default_capture())
DELIVERED = Answer(Verdict.DELIVERED)
TODAY = "2024-06-10T12:00:00+02:00"


class Clock:
    """A monotonic clock the test moves by hand: buffering is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def at(instant: str) -> float:
    """Unix time of an ISO instant; the explicit UTC offset says which side of a DST switch."""
    return datetime.fromisoformat(instant).timestamp()


def item(seq: int, instant: str) -> StoredTelegram:
    return StoredTelegram(seq, TELEGRAMS[seq % len(TELEGRAMS)], at(instant))


def archive(
    directory: Path, clock: Clock, *, compress_after_days: int | None = None
) -> ArchiveSink:
    config = ArchiveSinkConfig("archive", directory, compress_after_days=compress_after_days)
    return ArchiveSink(config, tz=AMSTERDAM, monotonic=clock, wall_clock=lambda: at(TODAY))


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_a_day_lands_in_one_file_byte_for_byte_and_logs_only_the_open(
    tmp_path: Path, clock: Clock
) -> None:
    sink = archive(tmp_path / "archive", clock)
    with capture_logs() as logs:
        await sink.start()
        for seq, hour in enumerate(range(0, 24, 3)):
            clock.now += 0.4
            assert await sink.send(item(seq, f"2024-06-10T{hour:02}:00:00+02:00")) == DELIVERED
        await sink.close()
    written = (tmp_path / "archive" / "2024-06-10.log").read_bytes()
    assert written == b"".join(TELEGRAMS[:8])
    assert frames_in(written) == TELEGRAMS[:8]
    assert [log["event"] for log in logs] == ["archive file opened"]


async def test_writes_are_buffered_for_a_second_and_all_on_disk_after_close(
    tmp_path: Path, clock: Clock
) -> None:
    sink = archive(tmp_path, clock)
    await sink.start()
    path = tmp_path / "2024-06-10.log"
    await sink.send(item(0, TODAY))
    assert path.read_bytes() == TELEGRAMS[0]  # the first one at once: a bad disk shows early
    for seq in range(1, 5):
        clock.now = seq * 0.2
        assert await sink.send(item(seq, TODAY)) == DELIVERED
    assert path.read_bytes() == TELEGRAMS[0]
    clock.now = 1.0
    await sink.send(item(5, TODAY))
    assert path.read_bytes() == b"".join(TELEGRAMS[:6])
    clock.now = 1.1
    await sink.send(item(6, TODAY))
    assert path.read_bytes() == b"".join(TELEGRAMS[:6])
    await sink.close()
    assert path.read_bytes() == b"".join(TELEGRAMS[:7])


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
    tmp_path: Path, clock: Clock, instants: list[str], days: list[str]
) -> None:
    sink = archive(tmp_path, clock)
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


async def test_leaving_a_day_writes_it_out_at_once(tmp_path: Path, clock: Clock) -> None:
    sink = archive(tmp_path, clock)
    await sink.start()
    await sink.send(item(0, "2024-06-09T23:59:58+02:00"))
    await sink.send(item(1, "2024-06-09T23:59:59+02:00"))  # buffered: same second
    await sink.send(item(2, "2024-06-10T00:00:00+02:00"))
    assert (tmp_path / "2024-06-09.log").read_bytes() == TELEGRAMS[0] + TELEGRAMS[1]
    await sink.close()


async def test_a_backlog_lands_in_the_days_it_was_read(tmp_path: Path, clock: Clock) -> None:
    (tmp_path / "2024-06-07.log").write_bytes(TELEGRAMS[9])  # written before an outage
    sink = archive(tmp_path, clock)  # the wall clock says 10 June
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


async def test_start_compresses_old_days_and_leaves_today(tmp_path: Path, clock: Clock) -> None:
    days = {f"2024-06-{day:02}.log": TELEGRAMS[day - 5 : day - 3] for day in range(7, 11)}
    for name, telegrams in days.items():
        (tmp_path / name).write_bytes(b"".join(telegrams))
    (tmp_path / "2024-13-45.log").write_bytes(b"not a date")
    (tmp_path / "notes.txt").write_bytes(b"not a day file")
    sink = archive(tmp_path, clock, compress_after_days=1)
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
    tmp_path: Path, clock: Clock, after_days: int, compressed: bool
) -> None:
    sink = archive(tmp_path, clock, compress_after_days=after_days)
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


async def test_a_day_written_again_after_compression_keeps_both_parts(
    tmp_path: Path, clock: Clock
) -> None:
    (tmp_path / "2024-06-01.log.gz").write_bytes(gzip.compress(TELEGRAMS[0]))
    (tmp_path / "2024-06-01.log").write_bytes(TELEGRAMS[1])
    sink = archive(tmp_path, clock, compress_after_days=1)
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
async def test_start_names_a_directory_it_cannot_create(
    tmp_path: Path, clock: Clock, where: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    directory = blocker if where == "directory is a file" else blocker / "archive"
    with pytest.raises(OSError, match=re.escape(f"cannot create its directory {directory}")):
        await archive(directory, clock).start()


async def test_an_unwritable_directory_asks_for_retries_and_recovers(
    tmp_path: Path, clock: Clock
) -> None:
    directory = tmp_path / "archive"
    path = directory / "2024-06-10.log"
    sink = archive(directory, clock)
    await sink.start()
    await sink.send(item(0, TODAY))
    clock.now = 0.5
    await sink.send(item(1, TODAY))  # buffered when the directory goes
    shutil.rmtree(directory)
    directory.write_bytes(b"")  # tests run as root: a file in its place stops even root
    with capture_logs() as logs:
        for now in (1.5, 1.6):  # each retry tries the disk, even within the second
            clock.now = now
            answer = await sink.send(item(2, TODAY))
            assert answer.verdict is Verdict.RETRY
            assert answer.error == f"cannot write {path}: Not a directory"
    assert [log["event"] for log in logs] == [
        "archive file was deleted; starting it again",
        "archive not writable; telegrams stay queued",  # once, not per retry
    ]
    directory.unlink()
    directory.mkdir()
    assert await sink.send(item(2, TODAY)) == DELIVERED
    await sink.close()
    assert path.read_bytes() == TELEGRAMS[1] + TELEGRAMS[2]  # the first went with the directory


async def test_a_deleted_day_file_is_started_again(tmp_path: Path, clock: Clock) -> None:
    sink = archive(tmp_path, clock)
    await sink.start()
    await sink.send(item(0, TODAY))
    (tmp_path / "2024-06-10.log").unlink()
    clock.now = 1.0
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
async def test_a_full_disk_loses_nothing_and_never_splits_a_telegram(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "2024-06-10.log"
    sink = archive(tmp_path, clock)
    await sink.start()
    await sink.send(item(0, TODAY))
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    with capture_logs():  # nothing but the archive may write while files are capped
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(TELEGRAMS[0]) + 100, hard))
        clock.now = 1.0
        # Written in part: the rest stays buffered, so the telegram counts as delivered.
        assert await sink.send(item(1, TODAY)) == DELIVERED
        clock.now = 1.1
        answer = await sink.send(item(2, TODAY))
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    assert answer.verdict is Verdict.RETRY
    assert answer.error == f"cannot write {path}: File too large"
    assert await sink.send(item(2, TODAY)) == DELIVERED
    await sink.close()
    assert path.read_bytes() == b"".join(TELEGRAMS[:3])
