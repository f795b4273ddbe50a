"""``dsmr-logger backfill``: send recorded telegrams (archive or capture) to a DSMR-reader sink.

In time order, with the same answers table as the daemon (transient failures retried, refused
telegrams dead-lettered into the spool, a misconfigured sink stops the run), resumable (a progress
file next to the spool: Ctrl-C and rerun continues), and for API v2 it first asks DSMR-reader
which timestamps it already holds and sends only the gaps. DSMR-reader does not rebuild day
statistics for readings inserted afterwards, so it ends by printing the command that does.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

import aiohttp

from dsmr_logger.config import Config, DsmrReaderSinkConfig
from dsmr_logger.delivery.answers import Answer, Verdict
from dsmr_logger.delivery.sinks.dsmr_reader import (
    V2_PATH,
    DsmrReaderSink,
    DsmrReaderV1Sink,
    DsmrReaderV2Sink,
)
from dsmr_logger.delivery.spool import Spool, StoredTelegram
from dsmr_logger.telegram.capture import frames_in
from dsmr_logger.telegram.obis import parse_timestamp

REBUILD_COMMAND = "./manage.py dsmr_stats_reconstruct_missing_day_statistics"
REBUILD_HINT = (
    "DSMR-reader does not rebuild statistics of days it already processed; on the "
    f"DSMR-reader host run (as its user, in its folder): {REBUILD_COMMAND}"
)
SAVE_EVERY = 50
SUSPECT_LIMIT = 3
PAGE_LIMIT = 1000


class BackfillError(Exception):
    """The run cannot go on (misconfigured sink, unreadable source); the message says why."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """A recorded telegram with the meter's own timestamp (None for DSMR 2.2: no timestamp)."""

    timestamp: datetime | None
    telegram: bytes


def source_files(source: Path) -> list[Path]:
    """A capture file, or an archive directory's day files (``YYYY-MM-DD.log[.gz]``) in order."""
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.name.endswith((".log", ".log.gz")))
    return [source]


def read_recorded(files: Iterable[Path], zone: ZoneInfo) -> Iterator[Recorded]:
    for path in files:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        for telegram in frames_in(data):
            yield Recorded(meter_time(telegram, zone), telegram)


def meter_time(telegram: bytes, zone: ZoneInfo) -> datetime | None:
    marker = telegram.find(b"\n0-0:1.0.0(")
    if marker < 0:
        return None
    raw = telegram[marker + 11 : telegram.find(b")", marker)].decode("ascii", "replace")
    return parse_timestamp(raw, zone)


def plan(
    recorded: Iterable[Recorded],
    *,
    since: datetime | None,
    until: datetime | None,
    done_until: datetime | None,
    present: set[datetime],
) -> tuple[list[Recorded], int]:
    """What to send, oldest first: in range, after the saved progress, not already stored.

    Returns the telegrams and how many were skipped because the server already has them.
    """
    chosen: dict[datetime, Recorded] = {}
    already = 0
    for item in recorded:
        stamp = item.timestamp
        if stamp is None:
            continue
        if (since and stamp < since) or (until and stamp > until):
            continue
        if done_until is not None and stamp <= done_until:
            continue
        if stamp in present:
            already += 1
            continue
        chosen.setdefault(stamp, item)  # one per instant: overlapping files repeat telegrams
    return [chosen[stamp] for stamp in sorted(chosen)], already


async def stored_timestamps(
    session: aiohttp.ClientSession, config: DsmrReaderSinkConfig, start: datetime, end: datetime
) -> set[datetime]:
    """Every reading DSMR-reader has between start and end (v2 list, paginated)."""
    found: set[datetime] = set()
    offset = 0
    while True:
        query = urllib.parse.urlencode(  # '+' in the offset must be encoded, or DSMR-reader 400s
            {
                "timestamp__gte": start.isoformat(),
                "timestamp__lte": end.isoformat(),
                "ordering": "timestamp",
                "limit": PAGE_LIMIT,
                "offset": offset,
            }
        )
        async with session.get(f"{config.url}{V2_PATH}?{query}") as answer:
            if answer.status != 200:
                body = (await answer.text())[:200]
                raise BackfillError(f"listing stored readings failed: HTTP {answer.status} {body}")
            page = await answer.json()
        for reading in page["results"]:
            found.add(datetime.fromisoformat(reading["timestamp"]))
        offset += len(page["results"])
        if not page["results"] or offset >= page["count"]:
            return found


class Progress:
    """Where a backfill got to, per sink and source, saved atomically next to the spool."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key

    def load(self) -> datetime | None:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        stamp = saved.get(self.key)
        return datetime.fromisoformat(stamp) if stamp else None

    def save(self, stamp: datetime) -> None:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            saved = {}
        saved[self.key] = stamp.isoformat()
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(saved, indent=1))
        temporary.replace(self.path)


class Bar:
    """Progress with rate and ETA: redrawn in place on a terminal, a line every 5 s otherwise."""

    def __init__(self, total: int, out: TextIO, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.out = out
        self.clock = clock
        self.started = clock()
        self.shown = 0.0

    def update(self, done: int, *, final: bool = False, detail: str = "") -> None:
        now = self.clock()
        live = self.out.isatty()
        if not final and now - self.shown < (0.2 if live else 5.0):
            return
        self.shown = now
        rate = done / max(now - self.started, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * done / max(self.total, 1))
        text = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"{rate:.1f}/s ETA {timedelta(seconds=int(eta)) if eta != float('inf') else '-'}"
        ) + (f"  {detail}" if detail else "")
        print(
            ("\r" + text) if live else text,
            end="" if live and not final else "\n",
            file=self.out,
            flush=True,
        )


async def send_one(
    sink: DsmrReaderSink, item: StoredTelegram, *, retry_max: float, log: TextIO
) -> Answer:
    """Send until the answer is final: delivered, refused for good, or the sink misconfigured."""
    attempt = 0
    while True:
        answer = await sink.send(item)
        if answer.verdict in (Verdict.DELIVERED, Verdict.REJECTED, Verdict.MISCONFIGURED):
            return answer
        attempt += 1
        if answer.verdict is Verdict.SUSPECT and attempt >= SUSPECT_LIMIT:
            return answer  # the caller dead-letters it: backfills are not probed
        if attempt == 1:
            print(f"\nretrying: {answer.describe()}", file=log, flush=True)
        delay = answer.retry_after or min(retry_max, 0.5 * 2 ** min(attempt, 10))
        await asyncio.sleep(delay * (0.5 + random.random() / 2))


async def backfill(
    config: Config,
    sink_name: str,
    source: Path,
    *,
    since: datetime | None,
    until: datetime | None,
    out: TextIO = sys.stdout,
) -> int:
    sink_config = next((s for s in config.sinks if s.name == sink_name), None)
    if not isinstance(sink_config, DsmrReaderSinkConfig):
        names = [s.name for s in config.sinks if isinstance(s, DsmrReaderSinkConfig)]
        raise BackfillError(f"--sink {sink_name!r}: not a dsmr-reader sink (have: {names})")
    files = source_files(source)
    if not files:
        raise BackfillError(f"{source}: no .log or .log.gz files in it")
    zone = ZoneInfo(config.meter.timezone)
    recorded = list(read_recorded(files, zone))
    undated = sum(1 for r in recorded if r.timestamp is None)
    progress = Progress(
        config.spool.path.with_name("backfill-progress.json"), f"{sink_name}:{source.resolve()}"
    )
    done_until = progress.load()
    sink: DsmrReaderSink = (
        DsmrReaderV2Sink(sink_config, zone=zone)
        if sink_config.api == "v2"
        else DsmrReaderV1Sink(sink_config)
    )
    await sink.start()
    try:
        present: set[datetime] = set()
        dated = [r.timestamp for r in recorded if r.timestamp is not None]
        if sink_config.api == "v2" and dated:
            async with aiohttp.ClientSession(
                headers=sink.headers(),
                connector=aiohttp.TCPConnector(ssl=sink_config.verify_tls),
                timeout=aiohttp.ClientTimeout(total=sink_config.timeout),
            ) as session:
                present = await stored_timestamps(session, sink_config, min(dated), max(dated))
        else:
            print(
                "note: API v1 cannot ask which readings DSMR-reader already has; a telegram it "
                "already stored is stored twice. If DSMR-reader's 'override telegram timestamp' "
                'is on, v1 readings are dated by arrival: use an api = "v2" sink to backfill.',
                file=out,
            )
        todo, already = plan(
            recorded, since=since, until=until, done_until=done_until, present=present
        )
        print(
            f"{len(recorded)} telegrams in {len(files)} file(s); {already} already stored, "
            f"{undated} without timestamp (skipped), "
            f"{'resuming after ' + done_until.isoformat() + ', ' if done_until else ''}"
            f"{len(todo)} to send to {sink_name}",
            file=out,
            flush=True,
        )
        return await _send_all(config, sink, sink_config, todo, progress, out)
    finally:
        await sink.close()


class DeadLetters:
    """Telegrams a sink refused for good, kept in the spool's dead letters (opened at the first)."""

    def __init__(self, config: Config, label: str = "backfill") -> None:
        self.config = config
        self.label = label
        self.count = 0
        self._spool: Spool | None = None

    def add(self, sink: str, stored: StoredTelegram, answer: Answer) -> None:
        if self._spool is None:
            self._spool = Spool(self.config.spool.path, max_bytes=self.config.spool.max_bytes)
            self._spool.open(shared=True)
        self._spool.dead_letter(
            sink,
            stored,
            status=answer.status,
            body=answer.body,
            reason=f"{self.label}: {answer.error or answer.describe()}",
        )
        self.count += 1

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


async def deliver(
    sink: DsmrReaderSink,
    sink_config: DsmrReaderSinkConfig,
    item: Recorded,
    dead_letters: DeadLetters,
    out: TextIO,
) -> bool:
    """Send one dated telegram until its answer is final; False when it was dead-lettered.

    A misconfigured sink ends the run (``BackfillError``).
    """
    assert item.timestamp is not None
    stored = StoredTelegram(0, item.telegram, item.timestamp.timestamp())
    answer = await send_one(sink, stored, retry_max=sink_config.retry_max, log=out)
    if answer.verdict is Verdict.MISCONFIGURED:
        raise BackfillError(f"sink {sink.name}: {answer.describe()}")
    if answer.verdict is not Verdict.DELIVERED:
        dead_letters.add(sink.name, stored, answer)
        return False
    return True


async def _send_all(
    config: Config,
    sink: DsmrReaderSink,
    sink_config: DsmrReaderSinkConfig,
    todo: list[Recorded],
    progress: Progress,
    out: TextIO,
) -> int:
    bar = Bar(len(todo), out)
    dead_letters = DeadLetters(config)
    last_done: datetime | None = None
    try:
        for index, item in enumerate(todo, 1):
            await deliver(sink, sink_config, item, dead_letters, out)
            assert item.timestamp is not None
            last_done = item.timestamp
            if index % SAVE_EVERY == 0:
                progress.save(last_done)
            bar.update(index, final=index == len(todo))
    finally:  # also on Ctrl-C: a rerun continues after the last answered telegram
        if last_done is not None:
            progress.save(last_done)
        dead_letters.close()
    dead = dead_letters.count
    sent = len(todo) - dead
    print(f"done: {sent} stored, {dead} dead-lettered (see: dsmr-logger spool list)", file=out)
    print(REBUILD_HINT, file=out)
    return 0 if dead == 0 else 1


def parse_moment(text: str, zone: ZoneInfo) -> datetime:
    """--since/--until: ISO 8601 date or date-time; without an offset, in the meter's zone."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=zone)
