"""Raw archive: every telegram appended, byte for byte, to ``<directory>/YYYY-MM-DD.log``.

The day is the local date on which the telegram was *read* (``received_at``), not the day it is
written, so a backlog replayed after an outage lands in the day it belongs to. A file is the
telegrams concatenated: the capture format that ``frames_in()`` and ``dsmr-logger simulate
--capture`` read back (``.log.gz`` too).

An SD card wears with every write, so the day's file stays open and telegrams collect in memory:
they go to the OS at most once per ``FLUSH_INTERVAL`` (checked when a telegram arrives) and are
fsynced only when the day ends and at close. A telegram the disk refuses (full, read-only,
directory gone) is answered RETRY and stays queued; the file is reopened on the next attempt, so
the sink recovers by itself. Telegrams already buffered when the disk fails stay buffered (they
were answered DELIVERED) and are written first once it works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta, tzinfo
from io import FileIO
from pathlib import Path
from typing import Any

import structlog

from dsmr_logger.config import ArchiveSinkConfig
from dsmr_logger.delivery.answers import Answer, Verdict
from dsmr_logger.delivery.sinks import Telegram

FLUSH_INTERVAL = 1.0
"""Seconds between writes to the OS: about one write per telegram period of a DSMR 5 meter."""
COPY_CHUNK = 1024 * 1024
"""Compression works in chunks this big, so that close() can stop it quickly."""
GZIP_LEVEL = 6
"""Nearly level 9's size on telegrams, at a fraction of the CPU (a day is ~80 MB on DSMR 5)."""

DELIVERED = Answer(Verdict.DELIVERED)


def local_date(timestamp: float, tz: tzinfo | None) -> date:
    """The date in ``tz`` (None: the machine's local time zone) at Unix time ``timestamp``."""
    return datetime.fromtimestamp(timestamp, tz).date()


def day_file(directory: Path, day: date) -> Path:
    return directory / f"{day.isoformat()}.log"


def files_to_compress(directory: Path, today: date, after_days: int) -> list[Path]:
    """Day files at least ``after_days`` days older than ``today`` by their names, oldest first.

    ``after_days`` is at least 1, so today's file (the one being written) is never among them.
    """
    found = []
    for path in directory.glob("????-??-??.log"):
        try:
            day = date.fromisoformat(path.stem)
        except ValueError:
            continue
        if (today - day).days >= after_days:
            found.append(path)
    return sorted(found)


def fsync_directory(directory: Path) -> None:
    """Make a rename durable before the file it replaces is removed."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compress_day(path: Path, stop: threading.Event) -> bool:
    """Gzip ``path`` to ``path.gz``; at no instant is the day's only complete copy in flux.

    The gzip is written to a temporary name, fsynced and renamed before the ``.log`` is removed.
    Returns False, leaving everything as it was, if ``stop`` is set meanwhile.
    """
    target = path.with_name(path.name + ".gz")
    temporary = path.with_name(path.name + ".gz.tmp")
    try:
        with temporary.open("wb") as out:
            if target.exists():
                # The day was written to again after it had been compressed (the clock went back):
                # keep the earlier member; gzip readers read concatenated members as one stream.
                with target.open("rb") as earlier:
                    shutil.copyfileobj(earlier, out, COPY_CHUNK)
            with (
                path.open("rb") as source,
                gzip.GzipFile(
                    filename=path.name, mode="wb", compresslevel=GZIP_LEVEL, fileobj=out
                ) as packed,
            ):
                while chunk := source.read(COPY_CHUNK):
                    if stop.is_set():
                        return False
                    packed.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
        fsync_directory(path.parent)
        path.unlink()
        return True
    finally:
        temporary.unlink(missing_ok=True)


def compress_old_days(
    directory: Path, today: date, after_days: int, stop: threading.Event, log: Any
) -> None:
    """One compression pass (run in a worker thread); a file that fails is retried next pass."""
    try:
        paths = files_to_compress(directory, today, after_days)
    except OSError as exc:
        log.warning("cannot list archive directory", directory=str(directory), error=str(exc))
        return
    for path in paths:
        if stop.is_set():
            return
        try:
            if compress_day(path, stop):
                log.info("archive day compressed", file=f"{path}.gz")
        except OSError as exc:
            log.warning("cannot compress archive day", file=str(path), error=str(exc))


class ArchiveSink:
    def __init__(
        self,
        config: ArchiveSinkConfig,
        *,
        tz: tzinfo | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = config.name
        self.config = config
        self._tz = tz
        self._monotonic = monotonic
        self._wall = wall_clock
        self._log = structlog.get_logger("dsmr_logger.archive")
        self._day: date | None = None
        self._path: Path | None = None
        self._file: FileIO | None = None
        self._pending = bytearray()  # answered DELIVERED, not yet handed to the OS
        self._flushed_at = -math.inf
        self._failing = False
        self._compressor: asyncio.Task[None] | None = None
        self._compress_against: date | None = None  # "today" of the next pass, if one is wanted
        self._compress_cutoff = date.min  # the newest day a running or wanted pass may compress
        self._stop = threading.Event()

    async def start(self) -> None:
        directory = self.config.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = (
                "it exists and is not a directory"
                if isinstance(exc, FileExistsError)
                else exc.strerror or str(exc)
            )
            raise OSError(
                f"archive sink {self.name!r} cannot create its directory {directory}: {reason}"
            ) from exc
        self._compress_old_days(local_date(self._wall(), self._tz))

    async def send(self, item: Telegram) -> Answer:
        day = local_date(item.received_at, self._tz)
        if day != self._day:
            await self._wait_for_compression_of(day)
            try:
                self._end_day()
            except OSError as exc:
                return self._failed(exc)
            self._begin_day(day)
        self._pending += item.telegram
        if self._monotonic() - self._flushed_at < FLUSH_INTERVAL:
            return DELIVERED
        try:
            self._flush()
        except OSError as exc:
            answer = self._failed(exc)
            return answer if self._withdraw(len(item.telegram)) else DELIVERED
        return DELIVERED

    async def close(self) -> None:
        """Stop a compression pass (the next start resumes it), then write out and fsync the day."""
        self._stop.set()
        await self.compression_done()
        try:
            self._end_day()
        except OSError as exc:
            self._log.error(
                "archive not writable at close: buffered telegrams are lost",
                sink=self.name,
                file=str(self._path),
                error=exc.strerror or str(exc),
                bytes=len(self._pending),
            )
            self._drop_file()

    async def compression_done(self) -> None:
        """Wait for the running compression pass, if any (a caller that reads the archive)."""
        if self._compressor is not None:
            await asyncio.wait({self._compressor})

    def _begin_day(self, day: date) -> None:
        self._day = day
        self._path = day_file(self.config.directory, day)
        self._flushed_at = -math.inf  # open the new file with its first telegram: errors show now
        self._compress_old_days(day)

    def _end_day(self) -> None:
        """Write out and fsync the day being left: nothing will be appended to it soon."""
        self._flush()
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _flush(self) -> None:
        """Hand the buffered telegrams to the OS; a short write leaves the rest buffered."""
        self._flushed_at = self._monotonic()
        if not self._pending:
            return
        file = self._open()
        while self._pending:
            del self._pending[: file.write(self._pending)]
        self._failing = False

    def _open(self) -> FileIO:
        """The day's file, opened again after an error or after it was deleted under us.

        Writes to a deleted file succeed and vanish with it, hence the link count check.
        """
        assert self._path is not None, "a day is begun before anything is buffered"
        if self._file is not None and os.fstat(self._file.fileno()).st_nlink == 0:
            self._log.warning(
                "archive file was deleted; starting it again", sink=self.name, file=str(self._path)
            )
            self._drop_file()
        if self._file is None:
            self._file = open(self._path, "ab", buffering=0)  # noqa: SIM115 (kept open all day)
            self._log.info("archive file opened", sink=self.name, file=str(self._path))
        return self._file

    def _withdraw(self, size: int) -> bool:
        """Take back the telegram just buffered, if none of it reached the file.

        One partly written must stay: its rest has to follow it, or the file would hold a broken
        frame that swallows the next telegram when read back. Like the telegrams buffered before
        it, it is then delivered, and written first when the disk works again.
        """
        if len(self._pending) < size:
            return False
        del self._pending[len(self._pending) - size :]
        return True

    def _failed(self, exc: OSError) -> Answer:
        """Close the file (the next send reopens it), log once per outage, and ask for a retry."""
        self._drop_file()
        self._flushed_at = -math.inf  # the retry must try the disk, not just fill the buffer
        error = f"cannot write {self._path}: {exc.strerror or exc}"
        if not self._failing:
            self._log.error(
                "archive not writable; telegrams stay queued", sink=self.name, error=error
            )
        self._failing = True
        return Answer(Verdict.RETRY, error=error)

    def _drop_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _compress_old_days(self, today: date) -> None:
        """Ask for a compression pass against ``today``; passes run one at a time in a thread."""
        after = self.config.compress_after_days
        if after is None:
            return
        self._compress_against = today
        self._compress_cutoff = max(self._compress_cutoff, today - timedelta(days=after))
        if self._compressor is None or self._compressor.done():
            self._compressor = asyncio.create_task(
                self._compress_passes(after), name=f"compress:{self.name}"
            )

    async def _compress_passes(self, after_days: int) -> None:
        """Run passes while one is wanted: a day that ends during a pass gets the next one."""
        while self._compress_against is not None and not self._stop.is_set():
            today, self._compress_against = self._compress_against, None
            await asyncio.to_thread(
                compress_old_days, self.config.directory, today, after_days, self._stop, self._log
            )

    async def _wait_for_compression_of(self, day: date) -> None:
        """Never append to a day file that a running pass may be gzipping and removing."""
        if self._compressor is not None and day <= self._compress_cutoff:
            await asyncio.wait({self._compressor})
