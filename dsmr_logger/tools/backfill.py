"""``dsmr-logger backfill``: send recorded telegrams (archive or capture) to a DSMR-reader sink.

In time order, with the same answers table as the daemon (transient failures retried, refused
telegrams dead-lettered into the spool, a misconfigured sink stops the run), resumable (a progress
file next to the spool, per request: sink, source, --since and --until; Ctrl-C and the same
command continues, another range starts afresh, ``--restart`` forgets the saved progress), and
for API v2 it asks DSMR-reader which timestamps it already holds and sends only the gaps.
DSMR-reader does not rebuild day statistics for readings inserted afterwards, so it ends by
printing the command that does.

Memory stays flat however big the archive is: only day files that can hold the window are read,
a chunk at a time, and telegrams are passed on as they are found (reading a whole day into memory
took 237 MiB for a 10 s window; ``bench/backfill_memory.py``). The archive is written in the order
telegrams were read, so a small reordering buffer puts the stream in time order. A first pass
counts the window (for the progress bar) and finds where in each file it lies; sending then reads
only those parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import heapq
import io
import json
import random
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from dsmr_logger.config import Config, DsmrReaderSinkConfig
from dsmr_logger.delivery.answers import Answer, Verdict
from dsmr_logger.delivery.sinks.dsmr_reader import (
    V2_PATH,
    DsmrReaderSink,
    DsmrReaderV1Sink,
    DsmrReaderV2Sink,
    answer_text,
)
from dsmr_logger.delivery.spool import Spool, StoredTelegram
from dsmr_logger.delivery.worker import POISON_STRIKES
from dsmr_logger.net.http import HttpClient, parse_json
from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.telegram.obis import parse_timestamp

REBUILD_COMMAND = "./manage.py dsmr_stats_reconstruct_missing_day_statistics"
REBUILD_HINT = (
    "DSMR-reader does not rebuild statistics of days it already processed; on the "
    f"DSMR-reader host run (as its user, in its folder): {REBUILD_COMMAND}"
)
SAVE_EVERY = 50
PAGE_LIMIT = 1000
STRIKE_PAUSE = 0.25
"""Seconds between the posts of a telegram the server refuses while it answers its probe."""
READ_SIZE = 256 * 1024
REORDER = 3600
"""Telegrams held to put the stream in time order: an hour of DSMR 5 (about 2.8 MB). Only a
telegram written again after a crash (within seconds) or a meter clock step is out of order."""
DAY_MARGIN = timedelta(days=1)
"""A day file is named by the local date of the machine that wrote it, which may not be the
meter's zone (UTC-12 to UTC+14): it is read if the window meets its day widened by a day."""
LOOKUP_SPAN = timedelta(hours=1)
"""API v2: stored readings are listed an hour at a time, just ahead of the telegrams sent."""


class BackfillError(Exception):
    """The run cannot go on (misconfigured sink, unreadable source); the message says why."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """A recorded telegram with the meter's own timestamp (None for DSMR 2.2: no timestamp)."""

    timestamp: datetime | None
    telegram: bytes


@dataclass(frozen=True, slots=True)
class Window:
    """The request's --since and --until (either may be open), as instants."""

    since: datetime | None
    until: datetime | None

    def contains(self, stamp: datetime) -> bool:
        return (self.since is None or stamp >= self.since) and (
            self.until is None or stamp <= self.until
        )

    def may_hold(self, day: date) -> bool:
        """Can a day file of ``day`` hold a telegram of the window (see DAY_MARGIN)?"""
        first = datetime(day.year, day.month, day.day, tzinfo=UTC) - DAY_MARGIN
        last = first + timedelta(days=1) + 2 * DAY_MARGIN
        return (self.until is None or first <= self.until) and (
            self.since is None or last > self.since
        )


@dataclass(frozen=True, slots=True)
class Source:
    """A file to read, and which part of it (offsets in its uncompressed bytes): a plain day file
    still being written is read only as far as it was when the run began, so counting and sending
    see the same telegrams; sending reads only the part where the count found the window."""

    path: Path
    stop: int | None  # None: to its end
    start: int = 0

    @property
    def day(self) -> date | None:
        """The day of an archive file ``YYYY-MM-DD.log[.gz]``; None for other names."""
        try:
            return date.fromisoformat(self.path.name.split(".", 1)[0])
        except ValueError:
            return None

    @property
    def gzipped(self) -> bool:
        return self.path.name.endswith(".gz")


@dataclass(slots=True)
class StreamStats:
    """What reading the sources met besides the telegrams passed on."""

    telegrams: int = 0
    undated: int = 0
    """Without a timestamp (DSMR 2.2): cannot be placed in time, skipped."""
    repeated: int = 0
    """The same instant again (written twice around a crash): sent once."""
    late: int = 0
    """Older than a telegram already passed on by more than REORDER telegrams: skipped."""
    spans: dict[Path, tuple[int, int]] = field(default_factory=dict)
    """Per file, the offsets to read between to see all its telegrams of the window again."""

    def narrowed(self, sources: Iterable[Source]) -> list[Source]:
        """The sources again, each only where it holds telegrams of the window."""
        return [
            Source(s.path, self.spans[s.path][1], self.spans[s.path][0])
            for s in sources
            if s.path in self.spans
        ]


def source_files(source: Path) -> list[Source]:
    """A capture file, or an archive directory's day files (``YYYY-MM-DD.log[.gz]``) in order.

    A path that is not there is a BackfillError (a usage mistake, named); one that cannot be
    read is the OSError the caller reports as a failure."""
    try:
        source.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise BackfillError(f"--from {source}: no such file or folder") from None
    paths = (
        sorted(p for p in source.iterdir() if p.name.endswith((".log", ".log.gz")))
        if source.is_dir()
        else [source]
    )
    return [Source(p, None if p.name.endswith(".gz") else p.stat().st_size) for p in paths]


def frames_of(source: Source) -> Iterator[tuple[bytes, int, int]]:
    """The valid frames of one file, read a chunk at a time; with each, the offsets to read
    between to see it whole again (from the start of the read before the one that ended it:
    a frame is far shorter than a read)."""
    assembler = FrameAssembler()
    file: io.BufferedIOBase
    with gzip.open(source.path, "rb") if source.gzipped else source.path.open("rb") as file:
        if source.start:
            file.seek(source.start)
        previous = position = source.start
        while source.stop is None or position < source.stop:
            wanted = READ_SIZE if source.stop is None else min(READ_SIZE, source.stop - position)
            chunk = file.read(wanted)
            if not chunk:
                return
            end = position + len(chunk)
            for frame in assembler.feed(chunk, 0.0):
                yield frame.raw, previous, end
            previous, position = position, end


def in_window(
    sources: Iterable[Source], zone: ZoneInfo, window: Window, stats: StreamStats
) -> Iterator[Recorded]:
    """The dated telegrams of the window, oldest first, one per instant."""
    held: list[tuple[datetime, int, bytes]] = []
    last: datetime | None = None

    def passed_on(entry: tuple[datetime, int, bytes]) -> Recorded | None:
        nonlocal last
        stamp = entry[0]
        if last is not None and stamp <= last:
            if stamp == last:
                stats.repeated += 1
            else:
                stats.late += 1
            return None
        last = stamp
        return Recorded(stamp, entry[2])

    order = 0
    for source in sources:
        for telegram, start, stop in frames_of(source):
            stats.telegrams += 1
            stamp = meter_time(telegram, zone)
            if stamp is None:
                stats.undated += 1
                continue
            if not window.contains(stamp):
                continue
            first, _ = stats.spans.get(source.path, (start, stop))
            stats.spans[source.path] = (first, stop)
            order += 1
            heapq.heappush(held, (stamp, order, telegram))
            if len(held) > REORDER and (item := passed_on(heapq.heappop(held))):
                yield item
    while held:
        if item := passed_on(heapq.heappop(held)):
            yield item


def meter_time(telegram: bytes, zone: ZoneInfo) -> datetime | None:
    marker = telegram.find(b"\n0-0:1.0.0(")
    if marker < 0:
        return None
    raw = telegram[marker + 11 : telegram.find(b")", marker)].decode("ascii", "replace")
    return parse_timestamp(raw, zone)


def after(recorded: Iterable[Recorded], done_until: datetime | None) -> Iterator[Recorded]:
    """What a resumed request still has to do: the telegrams after its saved progress."""
    for item in recorded:
        assert item.timestamp is not None
        if done_until is None or item.timestamp > done_until:
            yield item


LISTING_MAX_BODY = 16 * 1024 * 1024
"""A page of PAGE_LIMIT readings is about 0.6 MiB of JSON; a larger answer is not a listing."""


def listing_client(sink: DsmrReaderSink, config: DsmrReaderSinkConfig) -> HttpClient:
    """The project's HTTP client, for asking DSMR-reader what it holds (the sink's key)."""
    return HttpClient(
        config.url,
        timeout=config.timeout,
        headers=sink.headers(),
        verify_tls=config.verify_tls,
        max_body=LISTING_MAX_BODY,
    )


async def stored_timestamps(
    client: HttpClient, config: DsmrReaderSinkConfig, start: datetime, end: datetime
) -> set[datetime]:
    """Every reading DSMR-reader has between start and end (v2 list, paginated).

    An answer that is not a listing (a redirect, an error page, a proxy's HTML) is a
    ``BackfillError`` with its status and the start of its body; a failed request an ``OSError``.
    """
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
        answer = await client.get(f"{V2_PATH}?{query}", headers={"Accept": "application/json"})
        text = answer_text(answer.body, config.api_key)
        if answer.status != 200:
            where = answer.headers.get("location")
            moved = f" (redirected to {where}: use that as the sink's url)" if where else ""
            raise BackfillError(
                f"listing stored readings failed: HTTP {answer.status}{moved} "
                f"{' '.join(text.split())[:200]}"
            )
        try:
            page = parse_json(answer.body)
            stamps = [datetime.fromisoformat(r["timestamp"]) for r in page["results"]]
            count = int(page["count"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BackfillError(
                f"listing stored readings: not DSMR-reader's v2 list ({type(exc).__name__}: "
                f"{' '.join(text.split())[:120]!r})"
            ) from None
        found.update(stamps)
        offset += len(stamps)
        if not stamps or offset >= count:
            return found


class StoredReadings:
    """The readings DSMR-reader holds, listed an hour at a time just ahead of a sorted stream."""

    def __init__(self, client: HttpClient, config: DsmrReaderSinkConfig) -> None:
        self._client = client
        self._config = config
        self._listed_until: datetime | None = None
        self._found: set[datetime] = set()

    async def has(self, stamp: datetime) -> bool:
        """Asked in ascending order of ``stamp``."""
        if self._listed_until is None or stamp > self._listed_until:
            self._listed_until = stamp + LOOKUP_SPAN
            self._found = await stored_timestamps(
                self._client, self._config, stamp, self._listed_until
            )
        return stamp in self._found


def request_key(sink: str, source: Path, window: Window) -> str:
    """The progress of one request: the same sink, source, --since and --until."""
    bounds = [b.astimezone(UTC).isoformat() if b else "" for b in (window.since, window.until)]
    return "|".join([sink, str(source.resolve()), *bounds])


class Progress:
    """Where a backfill request got to (see ``request_key``), saved atomically next to the spool."""

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

    def save(self, stamp: datetime | None) -> None:
        """Record ``stamp`` as done; None forgets the request's progress (``--restart``)."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            saved = {}
        if stamp is None:
            if self.key not in saved:
                return
            del saved[self.key]
        else:
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
    """Send until the answer is final: delivered, refused for good, or the sink misconfigured.

    An HTML 500 follows the daemon's poison rule (``delivery/worker.py``): it is a strike only
    when the server answers its health probe meanwhile, and ``POISON_STRIKES`` strikes make the
    telegram poison (the caller dead-letters it); a DSMR-reader that is down or flapping never
    gets a good telegram dead-lettered by a backfill or an import.
    """
    attempt = strikes = 0
    while True:
        answer = await sink.send(item)
        if answer.verdict in (Verdict.DELIVERED, Verdict.REJECTED, Verdict.MISCONFIGURED):
            return answer
        attempt += 1
        if answer.verdict is Verdict.SUSPECT and (await sink.probe()).verdict is Verdict.DELIVERED:
            strikes += 1
            if strikes >= POISON_STRIKES:
                return answer
            await asyncio.sleep(STRIKE_PAUSE)  # the server works: no backoff, ask again soon
            continue
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
    restart: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    sink_config = next((s for s in config.sinks if s.name == sink_name), None)
    if not isinstance(sink_config, DsmrReaderSinkConfig):
        names = [s.name for s in config.sinks if isinstance(s, DsmrReaderSinkConfig)]
        raise BackfillError(f"--sink {sink_name!r}: not a dsmr-reader sink (have: {names})")
    every = source_files(source)
    if not every:
        raise BackfillError(f"{source}: no .log or .log.gz files in it")
    window = Window(since, until)
    sources = [f for f in every if f.day is None or window.may_hold(f.day)]
    zone = ZoneInfo(config.meter.timezone)
    progress = Progress(
        config.spool.path.with_name("backfill-progress.json"),
        request_key(sink_name, source, window),
    )
    if restart:
        progress.save(None)
    done_until = progress.load()
    stats = StreamStats()
    total = sum(1 for _ in after(in_window(sources, zone, window, stats), done_until))
    sink: DsmrReaderSink = (
        DsmrReaderV2Sink(sink_config, zone=zone)
        if sink_config.api == "v2"
        else DsmrReaderV1Sink(sink_config)
    )
    await sink.start()
    try:
        async with _stored_readings(sink, sink_config) as stored:
            if stored is None:
                print(
                    "note: API v1 cannot ask which readings DSMR-reader already has; a telegram "
                    "it already stored is stored twice. If DSMR-reader's 'override telegram "
                    'timestamp\' is on, v1 readings are dated by arrival: use an api = "v2" '
                    "sink to backfill.",
                    file=out,
                )
            print(
                f"{stats.telegrams} telegrams in {len(sources)} of {len(every)} file(s) (the "
                f"others cannot hold the range); {stats.undated} without timestamp (skipped), "
                f"{stats.repeated} written twice (sent once), {stats.late} out of order "
                "(skipped); "
                f"{'resuming after ' + done_until.isoformat() + ', ' if done_until else ''}"
                f"{total} to send to {sink_name}"
                f"{' unless DSMR-reader already has them' if stored is not None else ''}",
                file=out,
                flush=True,
            )
            todo = after(
                in_window(stats.narrowed(sources), zone, window, StreamStats()), done_until
            )
            return await _send_all(config, sink, sink_config, todo, total, stored, progress, out)
    finally:
        await sink.close()


@contextlib.asynccontextmanager
async def _stored_readings(
    sink: DsmrReaderSink, config: DsmrReaderSinkConfig
) -> AsyncIterator[StoredReadings | None]:
    """API v2: DSMR-reader's stored readings, asked over a connection of their own; v1: None."""
    if config.api != "v2":
        yield None
        return
    client = listing_client(sink, config)
    try:
        yield StoredReadings(client, config)
    finally:
        await client.close()


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
    todo: Iterator[Recorded],
    total: int,
    stored: StoredReadings | None,
    progress: Progress,
    out: TextIO,
) -> int:
    bar = Bar(total, out)
    dead_letters = DeadLetters(config)
    already = done = 0
    last_done: datetime | None = None
    try:
        for done, item in enumerate(todo, 1):
            assert item.timestamp is not None
            if stored is not None and await stored.has(item.timestamp):
                already += 1
            else:
                await deliver(sink, sink_config, item, dead_letters, out)
            last_done = item.timestamp
            if done % SAVE_EVERY == 0:
                progress.save(last_done)
            bar.update(done, final=done == total)
    finally:  # also on Ctrl-C: a rerun continues after the last answered telegram
        if last_done is not None:
            progress.save(last_done)
        dead_letters.close()
    dead = dead_letters.count
    sent = done - dead - already
    print(
        f"done: {sent} stored, {already} already stored (skipped), {dead} dead-lettered "
        "(see: dsmr-logger spool list)",
        file=out,
    )
    print(REBUILD_HINT, file=out)
    return 0 if dead == 0 else 1


EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
"""--since and --until lie between these: far from datetime's ends, so that moving a window by
an hour or a day, or into another zone, never overflows."""


def parse_moment(text: str, zone: ZoneInfo, *, latest: bool = False) -> datetime:
    """--since/--until: ISO 8601 date or date-time; without an offset, in the meter's zone.

    A wall-clock time the autumn change shows twice (02:30 in Amsterdam on its last Sunday of
    October) or the spring change skips stands for two instants an hour apart: the range is read
    widely, ``--since`` from the earlier and ``--until`` (``latest``) to the later, so both
    readings of a twice-shown half hour are in, and around a skipped one nothing is missed.
    The answer carries a fixed offset, so comparing it with a meter's timestamp never depends
    on ``fold`` (which comparisons within one zone ignore).
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 date or time (e.g. 2026-11-01, 2026-11-01T06:00 or "
            "2026-11-01T06:00+01:00)"
        ) from None
    if moment.tzinfo is None:
        try:
            instants = sorted(moment.replace(tzinfo=zone, fold=f).astimezone(UTC) for f in (0, 1))
        except OverflowError:  # 0001-01-01 in a zone east of UTC is before the year 1
            raise ValueError(
                f"{text!r} is out of range (from {EARLIEST.year} to {LATEST.year})"
            ) from None
        chosen = instants[-1] if latest else instants[0]
        moment = chosen.astimezone(timezone(chosen.astimezone(zone).utcoffset() or timedelta()))
    try:
        within = EARLIEST <= moment.astimezone(UTC) < LATEST
    except OverflowError:  # 0001-01-01 in a zone east of UTC is before the year 1
        within = False
    if not within:
        raise ValueError(f"{text!r} is out of range (from {EARLIEST.year} to {LATEST.year})")
    return moment


def parse_range(
    since: str | None, until: str | None, zone: ZoneInfo
) -> tuple[datetime | None, datetime | None]:
    """``--since`` and ``--until`` as moments (both included); ValueError naming the option at
    fault, also when the range is empty (``--since`` after ``--until``)."""
    moments: list[datetime | None] = []
    for option, text in (("--since", since), ("--until", until)):
        try:
            moments.append(parse_moment(text, zone, latest=option == "--until") if text else None)
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None
    start, end = moments
    if start is not None and end is not None and start > end:
        raise ValueError(f"--since {since} is after --until {until}: nothing in between")
    return start, end
