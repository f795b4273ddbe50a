#!/usr/bin/env python3
"""The archive sink's cost per telegram: bytes charged to the disk, write calls, CPU, time.

Why: the archive used to confirm telegrams still buffered in memory (written to the OS once a
second), to spare the SD card; a SIGKILL then lost up to a second of them. It now writes each
telegram before confirming it (``batched``), and fsyncs it too (``strict``). This measures what
that costs against the old policy, kept here as the baseline (``OneWritePerSecond``: buffer, and
hand to the OS at most once per second).

How: in this process, ``ArchiveSink.send`` on real files in a fresh directory on a block device
(``/var/tmp``: on tmpfs ``write_bytes`` stays 0), at two paces: a backlog drained as fast as the
sink takes it (where the old policy gathers many telegrams per write), and a DSMR 5 meter's pace
(one telegram a second, where the old policy also wrote each telegram: a second had passed).
Per telegram: ``write_bytes`` and ``syscw`` from ``/proc/self/io`` (Linux charges
``write_bytes`` when a page-cache page is first dirtied; a page dirtied again before writeback is
not charged again; an fsync cleans the pages, so the next append is charged its page again),
process CPU, and wall time. Nothing else writes in the window: logging is off.

Not a test, and no budget is asserted. Usage: ``.venv/bin/python bench/archive_writes.py``
(about 70 s; ``--telegrams N`` drained, ``--paced N`` at 1 Hz).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import fs_type, io_counters, machine, real_disk_dir

from dsmr_logger.config import ArchiveSinkConfig
from dsmr_logger.delivery.answers import Answer, Verdict
from dsmr_logger.delivery.sinks import Telegram
from dsmr_logger.delivery.sinks.archive import ArchiveSink, day_file, local_date
from dsmr_logger.delivery.spool import StoredTelegram
from dsmr_logger.telegram.capture import default_capture, frames_in

DELIVERED = Answer(Verdict.DELIVERED)


class OneWritePerSecond:
    """The policy replaced: confirm at once, hand the buffer to the OS at most once a second.

    It does per telegram and per write what the old ``ArchiveSink`` did (the day of each
    telegram; before each write, the check that the file was not deleted), without its error
    handling, which costs nothing while the disk works.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: BinaryIO | None = None
        self._pending = bytearray()
        self._flushed_at = -1e9

    async def send(self, item: Telegram) -> Answer:
        day = local_date(item.received_at, None)
        if self._file is None:
            path = day_file(self.directory, day)
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed in close())
        self._pending += item.telegram
        if time.monotonic() - self._flushed_at >= 1.0:
            self._flushed_at = time.monotonic()
            self._write()
        return DELIVERED

    def _write(self) -> None:
        assert self._file is not None
        assert os.fstat(self._file.fileno()).st_nlink > 0
        self._file.write(self._pending)
        self._pending.clear()

    async def close(self) -> None:
        if self._file is not None:
            self._write()
            os.fsync(self._file.fileno())
            self._file.close()


Policy = ArchiveSink | OneWritePerSecond


async def measure(make: Callable[[], Policy], count: int, period: float) -> list[float]:
    """Per telegram: write_bytes, write calls, CPU µs, wall µs, over the sends and the close that
    hands the rest to the OS (the first send, which opens the file, is left out). At meter pace
    only the sends are timed, not the sleeps between them."""
    sink = make()
    if isinstance(sink, ArchiveSink):
        await sink.start()
    telegrams = frames_in(default_capture())
    now = time.time()
    items = [StoredTelegram(i, telegrams[i % len(telegrams)], now) for i in range(count + 1)]
    assert await sink.send(items[0]) == DELIVERED
    before = io_counters(os.getpid())
    cpu = wall = 0.0
    for item in [*items[1:], None]:
        cpu_at, wall_at = time.process_time(), time.perf_counter()
        if item is None:
            await sink.close()
        else:
            assert await sink.send(item) == DELIVERED
        cpu += time.process_time() - cpu_at
        wall += time.perf_counter() - wall_at
        if period:
            await asyncio.sleep(period)
    after = io_counters(os.getpid())
    return [
        (after["write_bytes"] - before["write_bytes"]) / count,
        (after["syscw"] - before["syscw"]) / count,
        cpu / count * 1e6,
        wall / count * 1e6,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--telegrams", type=int, default=3000, help="per drained run")
    parser.add_argument("--paced", type=int, default=20, help="per run at one a second")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    base = real_disk_dir("archive-writes-")
    size = len(frames_in(default_capture())[0])
    print(machine())
    print(f"files in {base} ({fs_type(base)}); telegrams of {size} bytes\n")
    header = "write_bytes/telegram  write calls/telegram  CPU µs/telegram  wall µs/telegram"
    print(f"{'policy':<44} {header}")
    paces = [("drain", args.telegrams, 0.0), ("1 Hz", args.paced, 1.0)]
    for pace, count, period in paces:
        policies: list[tuple[str, Callable[[Path], Policy]]] = [
            ("old: one write per second (baseline)", OneWritePerSecond),
            ("batched: a write per telegram", lambda d: ArchiveSink(ArchiveSinkConfig("a", d))),
            (
                "strict: a write and an fsync per telegram",
                lambda d: ArchiveSink(ArchiveSinkConfig("a", d), strict=True),
            ),
        ]
        for label, make in policies:
            directory = base / f"{pace}-{label.split(':')[0]}".replace(" ", "-")
            directory.mkdir()
            written, calls, cpu, wall = asyncio.run(
                measure(lambda make=make, d=directory: make(d), count, period)
            )
            print(
                f"{pace + ', ' + label:<44} {written:>20.0f}  {calls:>20.2f}  {cpu:>15.1f}"
                f"  {wall:>16.1f}"
            )
        print()


if __name__ == "__main__":
    main()
