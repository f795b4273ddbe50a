"""Raw archive: every telegram appended, byte for byte, to ``<directory>/YYYY-MM-DD.log``.

The day is the local date on which the telegram was *read* (``received_at``), not the day it is
written, so a backlog replayed after an outage lands in the day it belongs to. A file is the
telegrams concatenated: the capture format that ``frames_in()`` and ``dsmr-logger simulate
--capture`` read back (``.log.gz`` too).

A telegram is answered DELIVERED only once it is in the file: written to the OS, which keeps it
through a SIGKILL of the daemon, and under ``durability = "strict"`` also fsynced, which keeps it
through a power cut. Confirming telegrams still buffered in memory lost 86 of 419 over ten
SIGKILLs even under strict durability. A write per telegram costs the SD card nothing more than a
write per second did: the page cache gathers appends to the same page, so both charge 778 bytes a
778-byte telegram to the disk (``bench/archive_writes.py``); it costs about 2 µs of CPU more. An
fsync per telegram (strict only) rewrites the file's last page each time (about 6 x the bytes):
that is what strict asks for, as the spool does. In ``batched`` durability the kernel writes the
pages out within its own writeback delay (30 s by default), as the spool syncs every 30 s.

The day's file stays open. A telegram the disk refuses (full, read-only, directory gone) is
answered RETRY and stays queued; a write that got only part of it out is cut back, so the file
holds whole telegrams only; the file is reopened on the next attempt, so the sink recovers by
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
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


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark an fsync's outcome seen: a cancelled send's caller no longer awaits it."""
    if not future.cancelled():
        future.exception()


class ArchiveSink:
    """Appends each telegram to its day's file before confirming it.

    Invariant: a telegram answered DELIVERED is whole in its day's file (fsynced under strict
    durability), and the file holds whole telegrams only; one send runs at a time.
    """

    def __init__(
        self,
        config: ArchiveSinkConfig,
        *,
        strict: bool = False,
        tz: tzinfo | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = config.name
        self.config = config
        self.strict = strict
        self._tz = tz
        self._wall = wall_clock
        self._log = structlog.get_logger("dsmr_logger.archive")
        self._day: date | None = None
        self._path: Path | None = None
        self._file: FileIO | None = None
        self._size = 0  # of the open file: where the telegram being written began
        self._sending = asyncio.Lock()
        self._syncing: asyncio.Future[None] | None = None
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
        async with self._sending:
            await self._synced()
            day = local_date(item.received_at, self._tz)
            if day != self._day:
                await self._wait_for_compression_of(day)
                try:
                    self._end_day()
                except OSError as exc:
                    return self._failed(exc)
                self._begin_day(day)
            try:
                file = self._append(item.telegram)
                if self.strict:
                    await self._fsync(file)
            except OSError as exc:
                return self._failed(exc)
            self._failing = False
            return DELIVERED

    async def _fsync(self, file: FileIO) -> None:
        """Fsync in a thread (an SD card may take tens of ms). Shielded: a send cancelled at
        shutdown leaves it running, and close() waits for it before closing the file."""
        loop = asyncio.get_running_loop()
        self._syncing = loop.run_in_executor(None, os.fsync, file.fileno())
        self._syncing.add_done_callback(_retrieve)
        await asyncio.shield(self._syncing)

    async def _synced(self) -> None:
        if self._syncing is not None and not self._syncing.done():
            await asyncio.wait({self._syncing})

    async def close(self) -> None:
        """Stop a compression pass (the next start resumes it), then fsync and close the day."""
        self._stop.set()
        await self.compression_done()
        async with self._sending:
            await self._synced()
            try:
                self._end_day()
            except OSError as exc:
                self._log.error(
                    "archive not synced at close: its last telegrams may not survive a power cut",
                    sink=self.name,
                    file=str(self._path),
                    error=exc.strerror or str(exc),
                )
                self._drop_file()

    async def compression_done(self) -> None:
        """Wait for the running compression pass, if any (a caller that reads the archive)."""
        if self._compressor is not None:
            await asyncio.wait({self._compressor})

    def _begin_day(self, day: date) -> None:
        self._day = day
        self._path = day_file(self.config.directory, day)
        self._compress_old_days(day)

    def _end_day(self) -> None:
        """Fsync and close the day being left: nothing will be appended to it soon."""
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _append(self, telegram: bytes) -> FileIO:
        """Write the whole telegram to the day's file, or raise with the file as it was."""
        file = self._open()
        view = memoryview(telegram)
        written = 0
        try:
            while written < len(view):
                written += file.write(view[written:]) or 0
        except OSError:
            if written:
                self._cut_back(file)
            raise
        self._size += written
        return file

    def _cut_back(self, file: FileIO) -> None:
        """Remove the start of a telegram a failed write left behind (a full disk)."""
        try:
            os.ftruncate(file.fileno(), self._size)
        except OSError as exc:
            # Read back, the torn start is rejected and costs no other telegram (framing).
            self._log.warning(
                "archive file ends in part of a telegram; reading it back skips it",
                sink=self.name,
                file=str(self._path),
                error=exc.strerror or str(exc),
            )

    def _open(self) -> FileIO:
        """The day's file, opened again after an error or after it was deleted under us.

        Writes to a deleted file succeed and vanish with it, hence the link count check.
        """
        assert self._path is not None, "a day is begun before anything is written"
        if self._file is not None and os.fstat(self._file.fileno()).st_nlink == 0:
            self._log.warning(
                "archive file was deleted; starting it again", sink=self.name, file=str(self._path)
            )
            self._drop_file()
        if self._file is None:
            self._file = open(self._path, "ab", buffering=0)  # noqa: SIM115 (kept open all day)
            self._size = os.fstat(self._file.fileno()).st_size
            self._log.info("archive file opened", sink=self.name, file=str(self._path))
        return self._file

    def _failed(self, exc: OSError) -> Answer:
        """Close the file (the next send reopens it), log once per outage, and ask for a retry."""
        self._drop_file()
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
