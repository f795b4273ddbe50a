"""The import loop: a cloud's history, window by window, into DSMR-reader or an archive.

Window by window rather than all at once: a year of Climkit history is 35,040 readings behind 365
requests at one a second, and Copper's budget may spread one import over days; each window is
fetched, turned into telegrams (``telegram.build``), checked against what the target already
holds, delivered oldest first, and only then recorded as done. So Ctrl-C (or a crash) costs at
most the window in hand: the rerun fetches it again (Copper's from its cache) and sends only what
the target does not have yet, and nothing reaches DSMR-reader twice.

Delivery is backfill's (``tools.backfill``): v2 readings listed per window
(``stored_timestamps``), the same planning, the daemon's answers table, refused readings
dead-lettered into the spool, and the statistics-rebuild hint at the end. ``--to-archive``
writes the archive sink's day files (``YYYY-MM-DD.log``, the meter's local date) instead, which
``backfill`` and ``simulate`` replay; telegrams already in a day file are not written again.

A cloud fills its latest hours in late, and not always in order (a gateway back online uploads
its backlog after the live readings), so a window younger than ``SETTLE`` is not recorded as
done: the next run asks for it again and sends only what the target still lacks.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TextIO
from zoneinfo import ZoneInfo

from dsmr_logger.config import Config, DsmrReaderSinkConfig
from dsmr_logger.delivery.sinks.archive import day_file, fsync_directory
from dsmr_logger.delivery.sinks.dsmr_reader import DsmrReaderV2Sink
from dsmr_logger.imports.cloud import Clock, CloudError, write_atomically
from dsmr_logger.imports.series import Window
from dsmr_logger.net.http import HttpClient
from dsmr_logger.telegram.build import MeterReading, build_telegram
from dsmr_logger.tools.backfill import (
    REBUILD_HINT,
    Bar,
    DeadLetters,
    Recorded,
    Source,
    deliver,
    frames_of,
    listing_client,
    meter_time,
    stored_timestamps,
)

SETTLE = timedelta(days=1)
"""History younger than this may still grow in the cloud: fetched again by the next run."""

Carry = dict[str, Any]
"""What one window hands the next (the last index, for the power of the next period), as JSON."""


@dataclass(frozen=True, slots=True)
class Origin:
    """What a cloud says about the meter before the import starts."""

    key: str
    """Identifies the meter among the cloud's (part of the progress key)."""
    first: datetime | None
    """When its data starts (the default ``--since``), if the cloud says."""
    description: str


class Cloud(Protocol):
    """One cloud's history as readings (``imports.climkit``, ``copper``, ``neurio``)."""

    name: str
    header: str
    """The telegram's identification line after ``/``."""
    lead: timedelta
    """How far before ``--since`` the first window starts, for the first reading's power."""

    async def start(self, *, first_needed: bool = True) -> Origin: ...
    def windows(self, start: datetime, end: datetime) -> list[Window]: ...
    async def readings(self, window: Window, carry: Carry) -> tuple[list[MeterReading], Carry]: ...
    def budget(self) -> str: ...
    def requests(self) -> int: ...
    async def close(self) -> None: ...


class Target(Protocol):
    key: str
    description: str

    async def start(self) -> None: ...
    async def present(self, window: Window) -> set[datetime]: ...
    async def send(self, item: Recorded) -> bool: ...
    async def settle(self) -> None: ...
    async def close(self) -> None: ...
    def closing_lines(self) -> list[str]: ...


class DsmrReaderTarget:
    """A DSMR-reader sink over API v2, whatever its ``api``: only v2 can say what is stored."""

    def __init__(
        self,
        config: Config,
        sink_config: DsmrReaderSinkConfig,
        zone: ZoneInfo,
        out: TextIO,
        label: str = "import",
    ) -> None:
        self.sink_config = dataclasses.replace(sink_config, api="v2")
        self.key = f"sink:{sink_config.name}"
        self.description = f"DSMR-reader sink {sink_config.name!r} (API v2)"
        self.out = out
        self.sink = DsmrReaderV2Sink(self.sink_config, zone=zone)
        self.dead_letters = DeadLetters(config, label)
        self._client: HttpClient | None = None

    async def start(self) -> None:
        await self.sink.start()
        self._client = listing_client(self.sink, self.sink_config)

    async def present(self, window: Window) -> set[datetime]:
        assert self._client is not None, "start() first"
        return await stored_timestamps(self._client, self.sink_config, window.start, window.end)

    async def send(self, item: Recorded) -> bool:
        return await deliver(self.sink, self.sink_config, item, self.dead_letters, self.out)

    async def settle(self) -> None:
        """Every answer was final before ``send`` returned: nothing to wait for."""

    async def close(self) -> None:
        self.dead_letters.close()
        if self._client is not None:
            await self._client.close()
            self._client = None
        await self.sink.close()

    def closing_lines(self) -> list[str]:
        lines = [REBUILD_HINT]
        if self.dead_letters.count:
            lines.insert(0, "refused readings: dsmr-logger spool list")
        return lines


class ArchiveTarget:
    """Day files as the archive sink writes them; a window's telegrams are fsynced before the
    window counts as done."""

    def __init__(self, directory: Path, zone: ZoneInfo) -> None:
        self.directory = directory
        self.zone = zone
        self.key = f"archive:{directory.resolve()}"
        self.description = f"archive {directory}"
        self._pending: dict[date, bytearray] = {}

    async def start(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CloudError(f"--to-archive {self.directory}: {exc.strerror or exc}") from exc

    async def present(self, window: Window) -> set[datetime]:
        day = window.start.astimezone(self.zone).date()
        files = []
        while day <= window.end.astimezone(self.zone).date():
            for suffix in (".log", ".log.gz"):
                path = self.directory / f"{day.isoformat()}{suffix}"
                if path.is_file():
                    files.append(path)
            day += timedelta(days=1)
        try:
            stamps = {
                meter_time(telegram, self.zone)
                for path in files
                for telegram, _, _ in frames_of(Source(path, None))
            }
            return {stamp for stamp in stamps if stamp is not None}
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise CloudError(f"--to-archive: cannot read {self.directory}: {exc}") from exc

    async def send(self, item: Recorded) -> bool:
        assert item.timestamp is not None
        day = item.timestamp.astimezone(self.zone).date()
        self._pending.setdefault(day, bytearray()).extend(item.telegram)
        return True

    async def settle(self) -> None:
        """Append each day's telegrams; a day written leaves ``_pending`` at once, so a failure
        on a later day (and ``close`` settling again on the way out) never writes it twice."""
        wrote = False
        for day in sorted(self._pending):
            path = day_file(self.directory, day)
            try:
                with path.open("ab") as file:
                    file.write(self._pending[day])
                    file.flush()
                    os.fsync(file.fileno())
            except OSError as exc:
                raise CloudError(f"--to-archive: cannot write {path}: {exc.strerror}") from exc
            del self._pending[day]
            wrote = True
        if wrote:
            fsync_directory(self.directory)

    async def close(self) -> None:
        await self.settle()

    def closing_lines(self) -> list[str]:
        return [
            f"replay them: dsmr-logger backfill --from {self.directory} --sink NAME "
            f"(or dsmr-logger simulate --capture {self.directory}/YYYY-MM-DD.log)"
        ]


class ImportProgress:
    """Where each import got to: the end of its last finished window and what carries over,
    per cloud, meter, start and target, in one JSON file replaced atomically."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key

    def load(self) -> tuple[datetime, Carry] | None:
        try:
            entry = json.loads(self.path.read_text())[self.key]
            return datetime.fromisoformat(entry["until"]), dict(entry.get("carry") or {})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, until: datetime, carry: Carry) -> None:
        try:
            saved = json.loads(self.path.read_text())
            if not isinstance(saved, dict):
                saved = {}
        except (OSError, ValueError):
            saved = {}
        saved[self.key] = {"until": until.isoformat(), "carry": carry}
        write_atomically(self.path, json.dumps(saved, indent=1))


@dataclass(slots=True)
class Tally:
    """What a run did, for the progress line and the closing figures."""

    readings: int = 0
    sent: int = 0
    already: int = 0
    dead: int = 0
    gaps: int = 0
    windows: int = 0
    _filling: bool = field(default=False, repr=False)

    def count_gaps(self, readings: Sequence[Recorded], filled: set[datetime | None]) -> None:
        """A gap filled is a run of consecutive readings the target lacked and now has."""
        for item in readings:
            new = item.timestamp in filled
            if new and not self._filling:
                self.gaps += 1
            self._filling = new


def state_directory(config: Config) -> Path:
    """Progress, request budgets and cached answers live next to the spool."""
    return config.spool.path.parent / "import"


async def run_import(
    cloud: Cloud,
    target: Target,
    *,
    zone: ZoneInfo,
    progress_file: Path,
    since: datetime | None,
    until: datetime | None,
    clock: Clock,
    out: TextIO = sys.stdout,
) -> int:
    """Import ``cloud``'s history into ``target``; 0 when every reading arrived, 1 if some were
    dead-lettered. Raises ``CloudError`` (and ``BackfillError`` from delivery)."""
    started = clock.time()
    origin = await cloud.start(first_needed=since is None)
    if since is None:
        if origin.first is None:
            raise CloudError(f"{cloud.name} does not say when the data starts: give --since")
        since = origin.first
    now = datetime.fromtimestamp(clock.time(), UTC)
    until = min(until, now) if until is not None else now
    key = f"{cloud.name}:{origin.key}:{since.astimezone(UTC).isoformat()}:{target.key}"
    progress = ImportProgress(progress_file, key)
    saved = progress.load()
    done, carry = saved if saved is not None else (since - cloud.lead, {})
    windows = cloud.windows(done, until)
    print(
        f"{cloud.name}: {origin.description}; {since.astimezone(zone):%Y-%m-%d %H:%M} to "
        f"{until.astimezone(zone):%Y-%m-%d %H:%M} into {target.description}"
        + (f", resuming after {done.astimezone(zone):%Y-%m-%d %H:%M}" if saved else "")
        + f": {len(windows)} window(s)",
        file=out,
        flush=True,
    )
    tally = Tally()
    bar = Bar(len(windows), out, clock.time)
    await target.start()
    try:
        for window in windows:
            readings, next_carry = await cloud.readings(window, carry)
            recorded = [
                Recorded(r.timestamp, build_telegram(r, header=cloud.header, zone=zone))
                for r in readings
                if since <= r.timestamp <= until
            ]
            present = await target.present(window) if recorded else set()
            todo, already = _missing(recorded, present)
            tally.readings += len(recorded)
            tally.already += already
            delivered: set[datetime | None] = set()
            for item in todo:
                if await target.send(item):
                    delivered.add(item.timestamp)
                else:
                    tally.dead += 1
            await target.settle()
            tally.sent += len(delivered)
            tally.count_gaps(recorded, delivered)
            carry = next_carry
            if window.end <= datetime.fromtimestamp(clock.time(), UTC) - SETTLE:
                progress.save(window.end, carry)
            tally.windows += 1
            bar.update(
                tally.windows,
                final=tally.windows == len(windows),
                detail=f"{tally.readings} readings, {tally.sent} new; {cloud.budget()}",
            )
    finally:
        await target.close()
    elapsed = clock.time() - started
    print(
        f"done: {tally.readings} readings in {tally.windows} window(s): {tally.sent} new "
        f"({tally.gaps} gap(s) filled), {tally.already} already there, {tally.dead} refused; "
        f"{cloud.requests()} requests to {cloud.name}, {cloud.budget()}; {elapsed:.0f} s",
        file=out,
    )
    for line in target.closing_lines():
        print(line, file=out)
    return 0 if tally.dead == 0 else 1


def _missing(recorded: list[Recorded], present: set[datetime]) -> tuple[list[Recorded], int]:
    """What the target lacks, oldest first and one per instant; and how many it already has."""
    chosen: dict[datetime, Recorded] = {}
    already = 0
    for item in recorded:
        if item.timestamp is None:
            continue
        if item.timestamp in present:
            already += 1
        else:
            chosen.setdefault(item.timestamp, item)
    return [chosen[stamp] for stamp in sorted(chosen)], already
