"""Delivery end to end: real queues, workers, spool files and HTTP to a real DSMR-reader v1 server.

Each test asserts what a user cares about: every telegram arrives, oldest first, once; a dead or
slow sink never delays another; a healthy setup writes nothing to the SD card; what is undelivered
survives in the spool file; the server's answers are honoured (poison, wrong key, Retry-After).
The spool is inspected as the ``spool`` tools see it, beside the daemon's own handle; where a test
must know whether a telegram was *ever* written, it reads the segment files themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import structlog
from aiohttp import web
from dsmr_reader_server import PARSE_FAILURE, V1_PATH, V2_PATH, DsmrReaderServer

from dsmr_logger.config import Config, DsmrReaderSinkConfig, MeterConfig, SpoolConfig
from dsmr_logger.daemon import Daemon
from dsmr_logger.delivery.queue import HOT_LIMIT, Queues
from dsmr_logger.delivery.segments import MAGIC, SUFFIX, SegmentLog, read_entries
from dsmr_logger.delivery.sinks.dsmr_reader import DsmrReaderV1Sink
from dsmr_logger.delivery.spool import Spool, StoredTelegram, telegram_dir
from dsmr_logger.delivery.worker import POISON_STRIKES, SinkWorker
from dsmr_logger.sources.p1.framing import Frame, FrameAssembler
from dsmr_logger.telegram.build import restamp
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort

KEY = "delivery-test-key-0123"
CAPTURE = frames_in(default_capture())  # ten telegrams of an Iskra AM550 (DSMR 5)
T0 = 1_795_000_000.0  # received_at of telegram 0; telegram i was read at T0 + i
BIG = 64 * 1024 * 1024


# --- telegrams ---------------------------------------------------------------------------------


def telegram(i: int) -> bytes:
    """Telegram ``i``: a real one from the capture, dated 2026-11-24 12:00:00 + i s (new CRC)."""
    when = datetime(2026, 11, 24, 12, 0, 0) + timedelta(seconds=i)
    return restamp(CAPTURE[i % len(CAPTURE)], when.strftime("%y%m%d%H%M%S").encode() + b"W")


def frame(i: int, received_at: float | None = None) -> Frame:
    (result,) = FrameAssembler().feed(telegram(i), T0 + i if received_at is None else received_at)
    return result


def texts(indexes: Sequence[int]) -> list[str]:
    """What DSMR-reader stores for these telegrams (its ``received`` list)."""
    return [telegram(i).decode() for i in indexes]


def test_telegrams_are_distinct_and_valid() -> None:
    assert len({telegram(i) for i in range(300)}) == 300
    assert all(frame(i).crc is not None and frame(i).telegram == telegram(i) for i in range(20))


# --- waiting -----------------------------------------------------------------------------------


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Poll ``condition`` (every 5 ms) until true; returns the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def settle(seconds: float) -> None:
    """A short, bounded pause (used only to show that something does NOT happen)."""
    await asyncio.sleep(seconds)


# --- the spool files, read directly ----------------------------------------------------------


def query(path: Path, sql: str, *args: object) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql, args).fetchall()


@contextlib.contextmanager
def beside(path: Path) -> Iterator[Spool]:
    """The spool as the ``spool`` tools see it, read beside the daemon's own handle."""
    spool = Spool(path, max_bytes=BIG)
    spool.open(shared=True)
    try:
        yield spool
    finally:
        spool.close()


def spooled_for(path: Path, sink: str) -> list[bytes]:
    """The telegrams the spool holds for ``sink`` (as last committed), in queue order."""
    with beside(path) as spool:
        return [t.telegram for t in spool.page(sink, 0, 2**62, 10**6)]


def pending(path: Path) -> int:
    """Telegram-sink pairs still waiting in the spool, as last committed."""
    with beside(path) as spool:
        return sum(backlog.count for backlog in spool.backlogs().values())


def ever_spooled(path: Path) -> list[bytes]:
    """Every telegram ever written to the spool's segment files (none is deleted while the
    segment being appended to is the only one, which is so below a megabyte)."""
    log = SegmentLog(telegram_dir(path), segment_bytes=BIG)
    log.open(writer=False, first_seq=1)
    return [entry.telegram for segment in log.segments for entry in read_entries(segment)]


# --- a queue-level pipeline: the daemon's delivery half, without the meter ---------------------


@dataclass
class SinkSpec:
    name: str
    url: str
    api_key: str = KEY
    min_interval: float = 0.0
    timeout: float = 0.3
    retry_initial: float = 0.01
    retry_max: float = 0.1
    max_in_flight: int = 1


@dataclass
class Pipeline:
    queues: Queues
    workers: dict[str, SinkWorker]
    path: Path
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def accept(self, *indexes: int) -> None:
        for i in indexes:
            self.queues.accept(frame(i))

    def backlog(self, sink: str) -> int:
        return self.queues.undelivered()[sink]

    async def dead_letters(self, sink: str | None = None) -> list:
        return await self.queues.in_spool(self.queues.spool.dead_letters, sink)

    def alive(self) -> bool:
        return not any(task.done() for task in self.tasks)


@contextlib.asynccontextmanager
async def pipeline(
    path: Path,
    sinks: Sequence[SinkSpec],
    *,
    flush_interval: float = 0.2,
    strict: bool = False,
    hot_limit: int = HOT_LIMIT,
    max_bytes: int = BIG,
) -> AsyncIterator[Pipeline]:
    """Queues + spool + one SinkWorker per sink, wired and stopped as the Daemon does."""
    queues = Queues(
        Spool(path, max_bytes=max_bytes, strict=strict),
        {spec.name: spec.min_interval for spec in sinks},
        flush_interval=flush_interval,
        strict=strict,
        hot_limit=hot_limit,
    )
    await queues.open()
    clients = [
        DsmrReaderV1Sink(
            DsmrReaderSinkConfig(
                name=spec.name,
                url=spec.url,
                api_key=spec.api_key,
                timeout=spec.timeout,
                min_interval=spec.min_interval,
                retry_initial=spec.retry_initial,
                retry_max=spec.retry_max,
                max_in_flight=spec.max_in_flight,
            )
        )
        for spec in sinks
    ]
    for client in clients:
        await client.start()
    workers = {
        spec.name: SinkWorker(
            client,
            queues,
            retry_initial=spec.retry_initial,
            retry_max=spec.retry_max,
            max_in_flight=spec.max_in_flight,
        )
        for spec, client in zip(sinks, clients, strict=True)
    }
    tasks = [asyncio.create_task(w.run(), name=f"sink:{n}") for n, w in workers.items()]
    tasks.append(asyncio.create_task(queues.run_flusher(), name="flusher"))
    if strict:
        tasks.append(asyncio.create_task(queues.run_strict_committer(), name="strict"))
    line = Pipeline(queues, workers, path, tasks)
    try:
        yield line
    finally:
        await asyncio.gather(*(w.stop(1.0) for w in workers.values()))
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await queues.close()
        for client in clients:
            await client.close()


def observe(server: DsmrReaderServer, hook: Callable[[float, web.Request, int], None]) -> None:
    """Call ``hook(monotonic time, request, status)`` after each answer, before it is sent.

    Must be installed before the server starts (the app freezes then).
    """

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        hook(time.monotonic(), request, response.status)
        return response

    server.app.middlewares.append(middleware)


# --- the whole daemon, reading a virtual meter -------------------------------------------------


def daemon_config(
    path: Path, port: str, url: str, *, key: str = KEY, flush_interval: float = 0.2
) -> Config:
    return Config(
        meter=MeterConfig(port=port, idle_timeout=5.0, reconnect_initial=0.05, reconnect_max=0.2),
        spool=SpoolConfig(path=path, flush_interval=flush_interval),
        sinks=(
            DsmrReaderSinkConfig(
                name="home",
                url=url,
                api_key=key,
                timeout=0.3,
                retry_initial=0.01,
                retry_max=0.1,
            ),
        ),
    )


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[Daemon]:
    daemon = Daemon(config)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_until(
            lambda: daemon.source.status.connected or task.done(), "the meter port", 3.0
        )
        assert not task.done(), "the daemon stopped by itself"
        yield daemon
    finally:
        stop.set()
        async with asyncio.timeout(4):
            assert await task == 0


async def play(port: VirtualSerialPort, indexes: Sequence[int], interval: float = 0.0) -> None:
    """The meter sends these telegrams (as recorded: our own distinct timestamps)."""
    telegrams = [telegram(i) for i in indexes]
    await MeterSimulator(port, telegrams, interval=interval, as_recorded=True).run(len(telegrams))


def accepted(daemon: Daemon, sink: str = "home") -> int:
    return daemon.queues.sinks[sink].stats.accepted


# --- 1. a sink down for a while ------------------------------------------------------------------


async def test_sink_down_then_up_delivers_everything_oldest_first_once(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    port = VirtualSerialPort()
    try:
        async with DsmrReaderServer(api_key=KEY, mode="refuse") as server:
            config = daemon_config(path, port.path, server.url, flush_interval=0.2)
            async with running(config) as daemon:
                await play(port, range(0, 12))
                await wait_until(lambda: accepted(daemon) == 12, "12 telegrams read")
                # Undelivered for longer than flush_interval: in the spool file, in order,
                # while the daemon runs (not only when it stops).
                await wait_until(lambda: len(spooled_for(path, "home")) == 12, "12 spooled")
                assert spooled_for(path, "home") == [telegram(i) for i in range(12)]
                await play(port, range(12, 20))
                await wait_until(lambda: accepted(daemon) == 20, "20 telegrams read")
                await wait_until(lambda: len(spooled_for(path, "home")) == 20, "all 20 spooled")
                assert server.received == []
                assert daemon.queues.undelivered() == {"home": 20}

                await server.set_mode("ok")
                await wait_until(lambda: len(server.received) >= 20, "the backlog delivered")
                await play(port, range(20, 25))  # live telegrams after the backlog
                await wait_until(lambda: len(server.received) >= 25, "live telegrams")
                await wait_until(lambda: pending(path) == 0, "acks committed")
                assert daemon.queues.undelivered() == {"home": 0}
                worker = daemon.workers[0]
                await wait_until(lambda: worker.stats.delivered == 25, "25 confirmations")
            assert server.received == texts(range(25))  # oldest first, nothing twice
    finally:
        port.close()
    assert pending(path) == 0


# --- 2. a healthy sink writes nothing -----------------------------------------------------------


async def test_healthy_sink_never_writes_a_telegram_to_the_spool(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    port = VirtualSerialPort()
    peak = 0
    try:
        async with DsmrReaderServer(api_key=KEY) as server:
            config = daemon_config(path, port.path, server.url, flush_interval=0.5)
            async with running(config) as daemon:
                with contextlib.closing(sqlite3.connect(path)) as monitor:
                    version = monitor.execute("PRAGMA data_version").fetchone()[0]

                    async def watch() -> None:
                        nonlocal peak
                        while True:
                            files = telegram_dir(path).glob("*" + SUFFIX)
                            peak = max(peak, sum(f.stat().st_size - len(MAGIC) for f in files))
                            await asyncio.sleep(0.01)

                    watcher = asyncio.create_task(watch())
                    try:
                        await play(port, range(60), interval=0.01)
                        await wait_until(lambda: len(server.received) == 60, "60 deliveries")
                        # Past flush_interval for every telegram: the flusher had its chances.
                        await settle(0.5 + 0.15)
                    finally:
                        watcher.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await watcher
                    assert daemon.queues.undelivered() == {"home": 0}
                    # No other connection committed anything to the file meanwhile.
                    assert monitor.execute("PRAGMA data_version").fetchone()[0] == version
            assert server.received == texts(range(60))
    finally:
        port.close()
    assert peak == 0
    assert ever_spooled(path) == []


# --- 3. one sink hanging does not delay another -------------------------------------------------


async def test_hanging_sink_never_delays_the_healthy_one(tmp_path: Path) -> None:
    async with (
        DsmrReaderServer(api_key=KEY) as healthy,
        DsmrReaderServer(api_key=KEY, mode="hang") as stuck,
    ):
        specs = [SinkSpec("healthy", healthy.url), SinkSpec("stuck", stuck.url, timeout=5.0)]
        async with pipeline(tmp_path / "spool.sqlite3", specs) as line:
            for i in range(20):
                line.accept(i)
                await asyncio.sleep(0.01)
            # All twenty reach the healthy sink while the stuck sink's first request still hangs
            # (it times out only after 5 s): nothing the stuck sink waits for holds them back.
            await wait_until(lambda: len(healthy.received) == 20, "all to the healthy sink", 4.0)
            stuck_worker = line.workers["stuck"]
            assert (stuck.hanging, stuck.requests, stuck_worker.stats.retries) == (1, 1, 0)
            assert healthy.received == texts(range(20))
            assert stuck.received == []
            await wait_until(lambda: stuck_worker.stats.retries >= 1, "a timeout")
            assert line.backlog("stuck") == 20
            assert line.backlog("healthy") == 0

            await stuck.set_mode("ok")
            await wait_until(lambda: len(stuck.received) >= 20, "the stuck sink's backlog")
            line.accept(20)
            await wait_until(lambda: len(stuck.received) >= 21, "live after backlog")
            await wait_until(lambda: len(healthy.received) >= 21, "live to the healthy one")
        assert stuck.received == texts(range(21))
        assert healthy.received == texts(range(21))


# --- 4. poison telegrams --------------------------------------------------------------------------


async def test_parse_failure_dead_letters_that_telegram_and_the_rest_flows(
    tmp_path: Path,
) -> None:
    poison = telegram(4).decode()
    async with DsmrReaderServer(api_key=KEY) as server:
        server.poison = lambda text: text == poison
        server.poison_answer = "parse_failure"
        async with pipeline(tmp_path / "spool.sqlite3", [SinkSpec("home", server.url)]) as line:
            line.accept(*range(10))
            await wait_until(lambda: len(server.received) == 9, "nine deliveries")
            await wait_until(lambda: line.backlog("home") == 0, "an empty queue")
            (letter,) = await line.dead_letters("home")
            await wait_until(lambda: line.workers["home"].stats.dead_letters == 1, "counted")
        assert (letter.status, letter.body, letter.telegram) == (500, PARSE_FAILURE, telegram(4))
        assert server.received == texts([0, 1, 2, 3, 5, 6, 7, 8, 9])
        sent = [a.telegram for a in server.answers]
        assert sent.count(poison) == 1  # permanent: never resent


async def test_html500_for_one_telegram_only_is_dead_lettered_after_its_strikes(
    tmp_path: Path,
) -> None:
    """Poison: the server answers this telegram's every post with its HTML 500 page while it
    answers its health probe. Dead-lettered after POISON_STRIKES strikes; nothing behind it is
    sent before (arrival order), and the one behind is sent once."""
    poison, behind = telegram(3).decode(), telegram(4).decode()
    async with DsmrReaderServer(api_key=KEY) as server:
        server.poison = lambda text: text == poison  # 500 with Django's HTML error page
        async with pipeline(tmp_path / "spool.sqlite3", [SinkSpec("home", server.url)]) as line:
            line.accept(*range(10))
            await wait_until(lambda: len(server.received) == 9, "nine deliveries")
            await wait_until(lambda: line.backlog("home") == 0, "an empty queue")
            (letter,) = await line.dead_letters("home")
        assert letter.telegram == telegram(3)
        assert letter.status == 500 and "Server Error (500)" in letter.body
        assert "poison" in letter.reason
        assert server.received == texts([0, 1, 2, 4, 5, 6, 7, 8, 9])
        posts = [a.telegram for a in server.answers if a.telegram is not None]
        assert posts.count(poison) == POISON_STRIKES
        assert posts.count(behind) == 1
        assert posts.index(behind) > max(i for i, t in enumerate(posts) if t == poison)
        probes = [a for a in server.answers if a.path == V2_PATH]
        assert len(probes) == POISON_STRIKES and all(a.status == 200 for a in probes)


async def test_html500_poison_in_a_spooled_backlog_read_back_from_disk(tmp_path: Path) -> None:
    """The probe also works when head and the telegram behind it come from the spool file."""
    poison = telegram(30).decode()
    async with DsmrReaderServer(api_key=KEY, mode="refuse") as server:
        server.poison = lambda text: text == poison
        spec = SinkSpec("home", server.url)
        async with pipeline(tmp_path / "spool.sqlite3", [spec], hot_limit=5) as line:
            for i in range(60):
                line.accept(i)
                await asyncio.sleep(0.002)
            await wait_until(lambda: pending(line.path) == 60, "a spooled backlog")
            # 30 and 31 are long out of the memory window: both are read back from the file.
            assert telegram(30) not in [r.telegram for r in line.queues.sinks["home"].hot]
            await server.set_mode("ok")
            await wait_until(lambda: len(server.received) == 59, "59 deliveries")
            await wait_until(lambda: line.backlog("home") == 0, "an empty queue")
            (letter,) = await line.dead_letters("home")
        assert letter.telegram == telegram(30)
        assert server.received == texts([i for i in range(60) if i != 30])
        assert [a.telegram for a in server.answers].count(telegram(31).decode()) == 1


async def test_html500_to_everything_for_a_while_dead_letters_nothing(tmp_path: Path) -> None:
    """An outage: the health probe fails too, so no 500 counts as a strike."""
    async with DsmrReaderServer(api_key=KEY, mode="html500") as server:
        async with pipeline(tmp_path / "spool.sqlite3", [SinkSpec("home", server.url)]) as line:
            line.accept(*range(8))
            # Well past POISON_STRIKES posts of the head, each followed by a failed probe.
            await wait_until(lambda: server.requests >= 4 * POISON_STRIKES, "many 500s", 20.0)
            await server.set_mode("ok")
            await wait_until(lambda: len(server.received) >= 8, "everything after recovery")
            assert await line.dead_letters() == []
            assert line.workers["home"].stats.dead_letters == 0
        assert server.received == texts(range(8))


async def test_outage_ending_between_a_500_and_the_probe_dead_letters_nothing(
    tmp_path: Path,
) -> None:
    """The database comes back right after a 500 to the head: the probe then succeeds (one
    strike), and the head, tried again, is stored first: nothing dead-lettered, order kept."""
    server = DsmrReaderServer(api_key=KEY, mode="html500")

    def end_outage_after_the_third_500(now: float, request: web.Request, status: int) -> None:
        if server.mode == "html500" and request.path == V1_PATH and server.requests >= 5:
            server.mode = "ok"  # the very next request (the probe) is answered

    observe(server, end_outage_after_the_third_500)
    spool = tmp_path / "spool.sqlite3"
    # (the pipeline is built after the server started: its url has the port then)
    async with server, pipeline(spool, [SinkSpec("home", server.url)]) as line:
        line.accept(*range(5))
        await wait_until(lambda: len(server.received) >= 5, "deliveries after recovery")
        await wait_until(lambda: line.backlog("home") == 0, "an empty queue")
        dead = await line.dead_letters()
    assert dead == []
    assert server.received == texts(range(5))
    assert [a.status for a in server.answers][:7] == [500, 500, 500, 500, 500, 200, 201]


# --- 5. wrong API key, then fixed ---------------------------------------------------------------


async def test_wrong_key_keeps_everything_then_fixed_key_delivers_the_backlog(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    async with DsmrReaderServer(api_key=KEY) as server:
        with structlog.testing.capture_logs() as logs:
            wrong = SinkSpec("home", server.url, api_key="not-the-key")
            async with pipeline(path, [wrong]) as line:
                line.accept(*range(10))
                await wait_until(lambda: server.requests >= 5, "several probes")
                await wait_until(lambda: len(spooled_for(path, "home")) == 10, "spooled")
                assert line.backlog("home") == 10
                assert line.workers["home"].stats.misconfigured
                assert [a.status for a in server.answers] == [403] * len(server.answers)
        errors = [e for e in logs if e["log_level"] == "error"]
        assert len(errors) == 1, errors
        assert errors[0]["sink"] == "home"
        assert "misconfigured" in errors[0]["event"]
        assert "api_key" in errors[0]["fix"]
        assert server.received == []
        assert spooled_for(path, "home") == [telegram(i) for i in range(10)]

        # "Restart" with the right key over the same spool file.
        async with pipeline(path, [SinkSpec("home", server.url)]) as line:
            assert line.backlog("home") == 10
            line.accept(*range(10, 13))  # live telegrams wait behind the backlog
            await wait_until(lambda: len(server.received) >= 13, "backlog, then live")
            await wait_until(lambda: pending(path) == 0, "acks committed")
        assert server.received == texts(range(13))
    assert pending(path) == 0


# --- 6. 429 with Retry-After --------------------------------------------------------------------


async def test_rate_limited_waits_for_retry_after_then_delivers(tmp_path: Path) -> None:
    server = DsmrReaderServer(api_key=KEY, mode="rate_limited", retry_after=0.2)  # type: ignore[arg-type]
    times: list[tuple[float, int]] = []

    def record(now: float, request: web.Request, status: int) -> None:
        times.append((now, status))
        if status == 429:
            server.mode = "ok"  # busy once; the next attempt succeeds

    observe(server, record)
    async with server:
        spec = SinkSpec("home", server.url, retry_initial=0.01, retry_max=30.0)
        async with pipeline(tmp_path / "spool.sqlite3", [spec]) as line:
            line.accept(0, 1)
            # Far sooner than retry_max: the wait was Retry-After's, not the backoff's cap.
            await wait_until(lambda: len(server.received) == 2, "both delivered", 10.0)
            assert line.workers["home"].stats.retries == 1
    assert [status for _, status in times] == [429, 201, 201]
    waited = times[1][0] - times[0][0]
    assert waited >= 0.19, waited  # not before Retry-After (the backoff alone: ~0.01 s)
    assert server.received == texts([0, 1])


# --- 7. the spool's size cap ----------------------------------------------------------------------


async def test_full_spool_drops_the_oldest_counts_warns_and_keeps_going(tmp_path: Path) -> None:
    size = len(telegram(0))
    path = tmp_path / "spool.sqlite3"
    async with DsmrReaderServer(api_key=KEY, mode="refuse") as server:
        with structlog.testing.capture_logs() as logs:
            spec = SinkSpec("home", server.url)
            async with pipeline(path, [spec], hot_limit=5, max_bytes=20 * size) as line:
                for i in range(60):
                    line.accept(i)
                    await asyncio.sleep(0.003)

                # The head being sent (telegram 0) is spared by the cap; the rest is the newest.
                # A cap of 20 telegrams holds 19 of them: records and files have headers.
                def full_of_the_newest() -> bool:
                    held = spooled_for(path, "home")
                    newest = [telegram(i) for i in range(61 - len(held), 60)]
                    return len(held) >= 18 and held == [telegram(0), *newest]

                await wait_until(full_of_the_newest, "a full spool")
                stats = line.queues.sinks["home"].stats
                # Counted when the commit returns to the loop (just after the file shows it).
                held = len(spooled_for(path, "home"))
                await wait_until(lambda: stats.dropped == 60 - held, "the oldest counted")
                assert line.alive()
                await server.set_mode("ok")
                await wait_until(lambda: line.backlog("home") == 0, "the rest delivered")
                line.accept(60)
                await wait_until(lambda: texts([60])[0] in server.received, "a live telegram")
                assert line.alive()
        warnings = [e for e in logs if e["event"].startswith("spool full")]
        assert warnings and all(w["log_level"] == "warning" for w in warnings)
        assert sum(w["dropped"] for w in warnings) == stats.dropped
    every = texts(range(61))
    indexes = [every.index(text) for text in server.received]
    assert indexes == sorted(set(indexes))  # in order, nothing twice
    assert indexes == [0, *range(indexes[1], 61)]  # the head spared by the cap, then the newest
    assert len(server.received) + stats.dropped == 61  # the counter is exactly what never came


async def test_dropped_counter_matches_what_never_arrives(tmp_path: Path) -> None:
    size = len(telegram(0))
    async with DsmrReaderServer(api_key=KEY, mode="refuse") as server:
        spec = SinkSpec("home", server.url)
        path = tmp_path / "spool.sqlite3"
        async with pipeline(path, [spec], max_bytes=20 * size) as line:  # default memory window
            for i in range(60):
                line.accept(i)
                await asyncio.sleep(0.003)
            stats = line.queues.sinks["home"].stats
            await wait_until(
                lambda: stats.dropped > 0 and telegram(59) in spooled_for(path, "home"),
                "a full spool holding the newest",
            )
            await server.set_mode("ok")
            await wait_until(lambda: line.backlog("home") == 0, "the rest delivered")
            stats = line.queues.sinks["home"].stats
    assert len(server.received) + stats.dropped == 60


async def test_the_cap_never_drops_a_telegram_a_sink_takes_while_it_commits(
    tmp_path: Path,
) -> None:
    """A sink confirming fast while a capped commit runs: each telegram delivered or dropped, once.

    The commit spares what was in flight when it began; a head taken during the commit could be
    dropped under the sink (sent, yet counted as lost, and its removal crashed the sink's task).
    """
    path = tmp_path / "spool.sqlite3"
    sizes = [len(telegram(i)) for i in range(10)]
    queues = Queues(
        # Room for seven telegrams with their record headers: the head in flight, the one behind
        # it (which a worker may send before the head's answer), and the five newest.
        Spool(path, max_bytes=sum(sizes[:7]) + 7 * 50),
        {"home": 0.0},
        flush_interval=60.0,
        strict=False,
    )
    await queues.open()
    try:
        for i in range(5):
            queues.accept(frame(i))
        await queues.flush(everything=True)  # telegrams 0-4 on disk, all of them fit
        queue = queues.sinks["home"]
        head = await queue.head()
        for i in range(5, 10):
            queues.accept(frame(i))
        commit = asyncio.create_task(queues.flush(everything=True))  # 5-9: the oldest must go
        await asyncio.sleep(0)
        assert queues.committing
        delivered = []
        while len(queue):
            delivered.append(head.telegram)
            await queues.confirm("home", head)
            head = await queue.head() if len(queue) else head
        await commit
    finally:
        await queues.close()
    dropped = query(path, "SELECT value FROM counters WHERE sink = 'home' AND name = 'dropped'")
    (counted,) = dropped[0]
    sent = [telegram(i) for i in range(10)]
    assert counted > 0, "the cap did not strike: the test shows nothing"
    assert [sent.index(t) for t in delivered] == sorted({sent.index(t) for t in delivered})
    assert len(delivered) + counted == 10, "a telegram both delivered and counted as dropped"
    assert delivered[-5:] == sent[5:], "the newest must all arrive"


async def test_after_a_restart_the_cap_counts_the_backlog_it_found(tmp_path: Path) -> None:
    """The spool's size is totted up after READY; the cap must still see it before new writes."""
    path = tmp_path / "spool.sqlite3"
    cap = sum(len(telegram(i)) + 50 for i in range(5, 15))  # ten, with their record headers
    before = Spool(path, max_bytes=cap)
    before.open()
    before.commit([(StoredTelegram(i + 1, telegram(i), T0 + i), ["home"]) for i in range(10)])
    before.close()
    queues = Queues(Spool(path, max_bytes=cap), {"home": 0.0}, flush_interval=60.0, strict=False)
    await queues.open()
    try:
        for i in range(10, 15):
            queues.accept(frame(i))
        await queues.flush(everything=True)
    finally:
        await queues.close()
    assert spooled_for(path, "home") == [telegram(i) for i in range(5, 15)]


# --- 8. the per-sink throttle ---------------------------------------------------------------------


async def test_throttled_sink_gets_every_fifth_and_throttled_ones_never_reach_the_spool(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    async with (
        DsmrReaderServer(api_key=KEY) as fast,
        DsmrReaderServer(api_key=KEY, mode="refuse") as slow,
    ):
        specs = [SinkSpec("fast", fast.url), SinkSpec("slow", slow.url, min_interval=5)]
        async with pipeline(path, specs, flush_interval=0.3) as line:
            line.accept(*range(23))  # read 1 s apart
            await wait_until(lambda: len(fast.received) == 23, "all to the fast sink")
            every_fifth = [0, 5, 10, 15, 20]
            await wait_until(lambda: pending(path) == 5, "the slow backlog spooled")
            assert spooled_for(path, "slow") == [telegram(i) for i in every_fifth]
            assert spooled_for(path, "fast") == []
            stats = line.queues.sinks["slow"].stats
            assert (stats.accepted, stats.throttled) == (5, 18)
            await slow.set_mode("ok")
            await wait_until(lambda: len(slow.received) == 5, "the slow sink's five")
            await wait_until(lambda: pending(path) == 0, "acks committed")
        assert fast.received == texts(range(23))
        assert slow.received == texts(every_fifth)
    assert ever_spooled(path) == [telegram(i) for i in every_fifth]


async def test_throttle_survives_a_clock_step_backwards(tmp_path: Path) -> None:
    async with DsmrReaderServer(api_key=KEY) as server:
        spec = SinkSpec("slow", server.url, min_interval=5)
        async with pipeline(tmp_path / "spool.sqlite3", [spec]) as line:
            line.queues.accept(frame(0, received_at=T0 + 3600))  # clock an hour fast
            for i in range(1, 12):  # corrected: one telegram a second, an hour earlier
                line.queues.accept(frame(i, received_at=T0 + i))
            await wait_until(lambda: line.backlog("slow") == 0, "delivery")
            await settle(0.05)
    assert len(server.received) >= 2  # not silent for an hour


# --- 9. the memory window -------------------------------------------------------------------------


async def test_small_memory_window_reads_the_backlog_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    limit = 20
    async with DsmrReaderServer(api_key=KEY, mode="refuse") as server:
        async with pipeline(path, [SinkSpec("home", server.url)], hot_limit=limit) as line:
            queue = line.queues.sinks["home"]
            peak = 0
            for i in range(200):
                line.accept(i)
                peak = max(peak, len(queue.hot))
                await asyncio.sleep(0.002)
                peak = max(peak, len(queue.hot))
            await wait_until(lambda: pending(path) == 200, "all 200 spooled")
            await wait_until(lambda: len(queue.hot) <= limit + 1, "the window evicted")
            assert peak < 3 * limit, peak  # bounded (about 2 x hot_limit), far below 200
            assert line.backlog("home") == 200
            await server.set_mode("ok")
            await wait_until(lambda: len(server.received) >= 200, "all 200 delivered")
            line.accept(200)
            await wait_until(lambda: len(server.received) >= 201, "a live one after")
            await wait_until(lambda: pending(path) == 0, "acks committed")
            assert line.backlog("home") == 0
        assert server.received == texts(range(201))


async def test_memory_window_stays_within_twice_hot_limit(tmp_path: Path) -> None:
    """The documented bound: a burst spools early once hot_limit telegrams wait unflushed, so
    memory holds about 2 x hot_limit at most, while commits stay batched."""
    limit = 20
    async with DsmrReaderServer(api_key=KEY, mode="refuse") as server:
        spec = SinkSpec("home", server.url)
        async with pipeline(tmp_path / "spool.sqlite3", [spec], hot_limit=limit) as line:
            queue = line.queues.sinks["home"]
            peak = 0
            for i in range(100):
                line.accept(i)
                peak = max(peak, len(queue.hot))
                await asyncio.sleep(0.003)  # far faster than a meter, far slower than a commit
                peak = max(peak, len(queue.hot))
    assert peak < 3 * limit, peak


# --- 10. strict durability ------------------------------------------------------------------------


async def test_strict_every_telegram_is_on_disk_before_the_server_sees_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    server = DsmrReaderServer(api_key=KEY)
    checked: list[bool] = []

    def on_disk_when_stored(now: float, request: web.Request, status: int) -> None:
        if status == 201:  # the answer is not sent yet: the logger cannot have confirmed it
            data = server.received[-1].encode()
            checked.append(spooled_for(path, "home").count(data) == 1)

    observe(server, on_disk_when_stored)
    async with server:
        spec = SinkSpec("home", server.url)
        async with pipeline(path, [spec], strict=True, flush_interval=10.0) as line:
            for i in range(30):
                line.accept(i)
                if i % 3 == 0:
                    await asyncio.sleep(0.005)
            await wait_until(lambda: len(server.received) == 30, "30 deliveries")
            # Each confirmation is committed before the next send.
            await wait_until(lambda: pending(path) == 0, "acks committed")
            assert pending(path) == 0
            assert line.backlog("home") == 0
    assert checked == [True] * 30
    assert server.received == texts(range(30))


async def test_strict_a_stop_and_restart_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    async with DsmrReaderServer(api_key=KEY, mode="refuse") as server:
        spec = SinkSpec("home", server.url)
        async with pipeline(path, [spec], strict=True, flush_interval=10.0) as line:
            line.accept(*range(10))
            # Committed before any send, long before flush_interval.
            await wait_until(lambda: pending(path) == 10, "all committed at once", 5.0)
        await server.set_mode("ok")
        async with pipeline(path, [spec], strict=True, flush_interval=10.0) as line:
            line.accept(10)
            await wait_until(lambda: len(server.received) >= 11, "backlog then live")
        assert server.received == texts(range(11))
    assert pending(path) == 0


# --- 11. pipelined draining -------------------------------------------------------------------


async def test_pipelined_drain_delivers_each_once_and_confirms_in_order(tmp_path: Path) -> None:
    """max_in_flight = 4: a spooled backlog and a poison telegram inside a window."""
    path = tmp_path / "spool.sqlite3"
    poison = telegram(13).decode()
    async with DsmrReaderServer(api_key=KEY, mode="refuse") as server:
        server.poison = lambda text: text == poison
        server.poison_answer = "parse_failure"
        spec = SinkSpec("home", server.url, max_in_flight=4)
        async with pipeline(path, [spec], hot_limit=10) as line:
            line.accept(*range(60))
            await wait_until(lambda: pending(path) == 60, "a spooled backlog")
            server.hang_outcome = "process"  # held requests are answered when the mode changes
            await server.set_mode("hang")
            await wait_until(lambda: server.hanging >= 4, "four requests in flight at once")
            await asyncio.sleep(0.05)
            assert server.hanging == 4  # never more than max_in_flight
            await server.set_mode("ok")
            await wait_until(lambda: line.backlog("home") == 0, "the backlog drained")
            await wait_until(lambda: pending(path) == 0, "every confirmation committed")
            (letter,) = await line.dead_letters("home")
    assert letter.telegram == telegram(13)
    expected = texts(i for i in range(60) if i != 13)
    assert sorted(server.received) == expected  # each once: sorted() keeps duplicates
    assert len(server.received) == len(expected)


async def test_a_slow_answer_does_not_stall_the_window(tmp_path: Path) -> None:
    """max_in_flight = 3 and telegram 2's answer held: the ones behind it keep going out."""
    held = telegram(2).decode()
    release = asyncio.Event()
    arrived: list[str] = []

    @web.middleware
    async def hold(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        text = (await request.post()).get("telegram")
        arrived.append(str(text))
        if text == held:
            await release.wait()
        return await handler(request)

    server = DsmrReaderServer(api_key=KEY)
    server.app.middlewares.append(hold)
    async with server:
        spec = SinkSpec("home", server.url, max_in_flight=3, timeout=10.0)  # held, not failed
        async with pipeline(tmp_path / "spool.sqlite3", [spec]) as line:
            line.accept(*range(20))
            # Telegram 0 and 1 answered, 2 held: the window slides on to 3 and 4 meanwhile.
            await wait_until(lambda: texts([3, 4])[1] in arrived, "telegrams behind the held one")
            assert texts([2])[0] not in server.received
            assert line.backlog("home") == 18  # confirmed in order: 0 and 1 only
            release.set()
            await wait_until(lambda: line.backlog("home") == 0, "the rest delivered")
    assert sorted(server.received) == texts(range(20))
    assert len(server.received) == 20
