"""Wires the pipeline — meter reader → per-sink queues and spool → sink workers — and runs it.

The structure, in ``run``: an ``AsyncExitStack`` holds every resource as it is opened — the spool,
each sink's connections, the status port — so each is closed on every path out, a failed start
included; only then does one ``TaskGroup`` start the tasks (the reader, a worker per sink, the
helpers). The status port is bound before any task starts, so a port in use is one clear line
naming ``http.listen`` (exit 1, the spool closed), not a traceback after telegrams were read.

Every task runs under ``_supervised``: an ``OSError`` or SQLite operational error (a locked or
briefly unwritable spool, a socket hiccup) is logged once and the task restarted with backoff; any
other exception is a bug: it is logged once with its traceback, and the daemon stops cleanly with
exit status 1 (everything undelivered committed to the spool) so the service manager restarts it.

Lifecycle: on stop (SIGTERM, SIGINT, SIGHUP) reading stops first, each sink may finish the
request in flight (bounded), everything still undelivered is committed to the spool, and the
process exits 0 well within 10 s; the next start delivers that backlog before anything new.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import sqlite3
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog

from dsmr_logger.config import (
    ArchiveSinkConfig,
    Config,
    DsmrReaderSinkConfig,
    MeterTypeConfig,
    MqttSinkConfig,
    SinkConfig,
)
from dsmr_logger.delivery.queue import Queues
from dsmr_logger.delivery.sinks import Sink
from dsmr_logger.delivery.sinks.archive import ArchiveSink
from dsmr_logger.delivery.sinks.dsmr_reader import DsmrReaderV1Sink, DsmrReaderV2Sink
from dsmr_logger.delivery.spool import Spool
from dsmr_logger.delivery.worker import SinkWorker
from dsmr_logger.runtime.notify import Notifier
from dsmr_logger.runtime.snapshot import SinkSnapshot, Snapshot
from dsmr_logger.sources import build_source
from dsmr_logger.sources.p1.framing import Frame
from dsmr_logger.telegram.glance import glance

if TYPE_CHECKING:
    from dsmr_logger.runtime.status_server import StatusServer


class StartupError(Exception):
    """The daemon cannot start (a sink's directory is unusable, ...); the message says which."""


class TaskCrashed(Exception):
    """A task failed with an unexpected exception (a bug); already logged with its traceback."""


STOP_GRACE = 5.0
"""Seconds a sink may take to finish its in-flight request at shutdown."""
TRANSIENT = (OSError, sqlite3.OperationalError)
"""Errors a task is restarted after: the world failed (a socket, a locked spool), not the code."""
RESTART_INITIAL = 1.0
RESTART_MAX = 60.0
"""Pauses before restarting a task after a transient error, doubling; reset after a good hour."""


def default_sinks(config: Config) -> tuple[SinkConfig, ...]:
    """No sink configured: keep a raw archive next to the spool, so nothing read is lost."""
    if config.sinks:
        return config.sinks
    return (ArchiveSinkConfig(name="archive", directory=config.spool.path.parent / "archive"),)


def build_sink(config: SinkConfig, meter: MeterTypeConfig, *, strict: bool = False) -> Sink:
    if isinstance(config, DsmrReaderSinkConfig):
        if config.api == "v2":
            return DsmrReaderV2Sink(config, zone=ZoneInfo(meter.timezone))
        return DsmrReaderV1Sink(config)
    if isinstance(config, MqttSinkConfig):
        from dsmr_logger.delivery.sinks.mqtt import MqttSink  # only loaded when configured

        return MqttSink(config, zone=ZoneInfo(meter.timezone))
    return ArchiveSink(config, strict=strict)  # strict: fsync each telegram before confirming


SYNC_FLUSHES = 6
"""Spooled telegrams reach the card every 6 x ``flush_interval`` (30 s by default): each fsync
makes the next append rewrite a whole page, so fsyncing every flush would triple the writes."""


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        log: Any = None,
    ) -> None:
        """``clock`` measures how long ago things happened (the wall clock may jump)."""
        self.config = config
        self.notifier = notifier or Notifier({})
        self.sink_configs = default_sinks(config)
        self._wall = wall_clock
        self._clock = clock
        self._log = log or structlog.get_logger("dsmr_logger")
        strict = config.spool.durability == "strict"
        self.queues = Queues(
            Spool(
                config.spool.path,
                max_bytes=config.spool.max_bytes,
                strict=strict,
                sync_interval=SYNC_FLUSHES * config.spool.flush_interval,
            ),
            {sink.name: sink.min_interval for sink in self.sink_configs},
            flush_interval=config.spool.flush_interval,
            strict=strict,
        )
        self.sinks = [build_sink(sink, config.meter, strict=strict) for sink in self.sink_configs]
        self.workers = [
            SinkWorker(
                sink,
                self.queues,
                retry_initial=getattr(cfg, "retry_initial", 1.0),
                retry_max=getattr(cfg, "retry_max", 60.0),
                max_in_flight=getattr(cfg, "max_in_flight", 1),
                wall_clock=wall_clock,
                clock=clock,
            )
            for sink, cfg in zip(self.sinks, self.sink_configs, strict=True)
        ]
        spool = config.spool.path
        self.source = build_source(
            config.meter,
            self._on_frame,
            wall_clock=wall_clock,
            state_path=spool.with_name(f"{spool.name}-last-polled"),
        )
        self.status_server: StatusServer | None = None
        if config.http.listen:
            # Imported only here: aiohttp.web and prometheus_client cost 3.3 MiB of RAM.
            from dsmr_logger.runtime.status_server import StatusServer

            self.status_server = StatusServer(self.snapshot, config.http, wall_clock=wall_clock)
        self.started_at: float | None = None
        self._started: float | None = None
        self._last_frame: float | None = None
        """``clock`` at the start and at the last valid frame: ages the wall clock cannot skew."""
        self._last_telegram: bytes | None = None
        self._debug = config.log.level == "debug"
        self._stopping = False

    def _on_frame(self, frame: Frame) -> None:
        self._last_telegram = frame.telegram
        self._last_frame = self._clock()
        self.queues.accept(frame)
        if self._debug:  # glance costs ~20 µs a telegram: only for the debug line
            self._log.debug("telegram", **glance(frame.telegram).values, bytes=len(frame.raw))

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the process exit status (1 after a crash).

        Raises ``StartupError`` or ``SpoolError`` when it cannot start; whatever it had opened is
        closed by then.
        """
        self.started_at, self._started = self._wall(), self._clock()
        async with contextlib.AsyncExitStack() as opened:
            await self._open(opened)
            crashed = await self._serve(stop)
        self._log.info("stopped", undelivered=self.queues.undelivered())
        return 1 if crashed else 0

    async def _open(self, opened: contextlib.AsyncExitStack) -> None:
        """Open the spool, start each sink, bind the status port: each closed by ``opened``."""
        orphans = await self.queues.open()
        opened.push_async_callback(self.queues.close)  # commits everything undelivered
        for name, backlog in orphans.items():
            self._log.warning(
                "spool holds telegrams for a sink that is no longer configured; they are kept",
                sink=name,
                telegrams=backlog.count,
            )
        if not self.config.sinks:
            self._log.info("no sink configured: archiving raw telegrams", sink=self.sinks[0].name)
        for sink in self.sinks:
            try:
                await sink.start()
            except OSError as exc:
                raise StartupError(f"sink {sink.name!r}: {exc}") from exc
            opened.push_async_callback(_close_quietly, sink)
        if self.status_server is not None:
            listen = self.config.http.listen
            try:
                await self.status_server.start()
            except OSError as exc:
                raise StartupError(f"http.listen = {listen!r}: {_bind_error(exc)}") from exc
            opened.push_async_callback(self.status_server.stop)
            host = str(listen).rpartition(":")[0]
            self._log.info("status endpoint", url=f"http://{host}:{self.status_server.port}/status")
        self._log.info(
            "started",
            port=self.config.meter.where,
            sinks=[s.name for s in self.sinks],
            spool=str(self.config.spool.path),
            durability=self.config.spool.durability,
        )

    async def _serve(self, stop: asyncio.Event) -> bool:
        """Run every task until ``stop`` (then stop them in order); True if one crashed."""
        crashed = False
        try:
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._supervised("source", self.source.run))
                workers = [
                    group.create_task(self._supervised(f"sink:{w.sink.name}", w.run))
                    for w in self.workers
                ]
                helpers = [
                    group.create_task(self._supervised(name, job), name=name)
                    for name, job in self._helpers()
                ]
                self.notifier.ready(self.status_line())
                await stop.wait()
                self._stopping = True
                self.notifier.stopping()
                reader.cancel()
                await asyncio.gather(*(w.stop(STOP_GRACE) for w in self.workers))
                for task in (*workers, *helpers):
                    task.cancel()
        except* TaskCrashed:
            self._stopping = True
            self.notifier.stopping()
            crashed = True
        return crashed

    def _helpers(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        helpers: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("flusher", self.queues.run_flusher),
            ("summary", self._summaries),
        ]
        if self.queues.strict:
            helpers.append(("strict", self.queues.run_strict_committer))
        if self.notifier.enabled:
            helpers.append(("notify", self._notify))
        return helpers

    async def _supervised(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job``; restart it after a transient error, report any other once and crash."""
        loop = asyncio.get_running_loop()
        pause, told = RESTART_INITIAL, None
        while True:
            began = loop.time()
            try:
                await job()
                return
            except TRANSIENT as exc:
                error = f"{type(exc).__name__}: {exc}"
                if loop.time() - began > 3600:
                    pause = RESTART_INITIAL
                if error != told:
                    self._log.warning(
                        "task failed; restarting it", task=name, error=error, restart_in=pause
                    )
                    told = error
                await asyncio.sleep(pause)
                pause = min(pause * 2, RESTART_MAX)
            except Exception as exc:
                self._log.error(
                    "task crashed; stopping (the service manager restarts the daemon)",
                    task=name,
                    error=f"{type(exc).__name__}: {exc}",
                    traceback="".join(traceback.format_exception(exc)),
                )
                raise TaskCrashed(name) from exc

    def snapshot(self) -> Snapshot:
        """Times of the start, the last frame and a sink's failure are given as the wall
        clock now minus their age on ``clock``: health judges ages, so the wall clock set
        back an hour neither hides a silent meter nor makes a new one look stale."""
        now, mono = self._wall(), self._clock()

        def ago(at: float | None) -> float | None:
            return None if at is None else now - (mono - at)

        counters = self.source.counters
        status = self.source.status
        sinks = []
        for worker in self.workers:
            queue = worker.queue
            oldest = queue.oldest_received_at()
            stats = worker.stats
            sinks.append(
                SinkSnapshot(
                    name=worker.sink.name,
                    delivered=stats.delivered,
                    backlog=self.queues.backlog(worker.sink.name),
                    oldest_age=None if oldest is None else max(0.0, now - oldest),
                    retries=stats.retries,
                    dead_letters=stats.dead_letters,
                    dropped=queue.stats.dropped,
                    throttled=queue.stats.throttled,
                    last_error=stats.last_error,
                    last_error_at=stats.last_error_at,
                    failing_since=ago(worker.failing_began),
                    misconfigured=stats.misconfigured,
                    fix=stats.fix,
                    possible_duplicates=stats.possible_duplicates,
                    refused_in_a_row=stats.refused_in_a_row,
                    refused_recently=stats.refused_recently,
                    resolved_recently=stats.resolved_recently,
                )
            )
        attempts = max(status.attempts, status.connects)
        # A port or a broker is reopened only after a failure: every attempt past the first is a
        # reconnect. A polled device is asked again every interval, answered or not: there, a
        # reconnect is the link lost and asked for again (the polls are counted apart).
        reconnects = status.disconnects if status.polls else max(0, attempts - 1)
        return Snapshot(
            port=self.config.meter.where,
            meter_state=status.state.value,
            connected=status.connected,
            frames=counters.frames,
            rejected=self.source.rejected(),
            bytes_in=counters.bytes_in,
            garbage_bytes=counters.garbage_bytes,
            reconnects=reconnects,
            last_frame_at=ago(self._last_frame),
            last_telegram=self._last_telegram,
            sinks=tuple(sinks),
            started_at=ago(self._started),
            meter_error=status.last_error,
            meter_error_at=status.last_error_at,
            meter_attempts=attempts,
            polls=status.polls,
            repeats=status.repeats,
            spool=self.queues.spool_snapshot(),
            stopping=self._stopping,
        )

    def status_line(self) -> str:
        """One line for ``systemctl status``: "reading /dev/ttyUSB0, 2/2 sinks ok, backlog 0"."""
        snap = self.snapshot()
        state = "reading" if snap.meter_state == "ok" else snap.meter_state.replace("_", " ")
        ok = sum(1 for sink in snap.sinks if sink.failing_since is None)
        backlog = sum(sink.backlog for sink in snap.sinks)
        return f"{state} {snap.port}, {ok}/{len(snap.sinks)} sinks ok, backlog {backlog}"

    async def _notify(self) -> None:
        """STATUS updates, and WATCHDOG pings that stop by themselves if the loop wedges."""
        interval = self.notifier.watchdog_interval
        while True:
            await asyncio.sleep(interval or 10.0)
            self.notifier.status(self.status_line(), watchdog=interval is not None)

    async def _summaries(self) -> None:
        while True:
            await asyncio.sleep(self.config.log.summary_interval)
            self.log_summary()

    def log_summary(self) -> None:
        snap = self.snapshot()
        self._log.info(
            "meter summary",
            state=snap.meter_state,
            frames=snap.frames,
            rejected=snap.rejected,
            bytes=snap.bytes_in,
            reconnects=snap.reconnects,
            **({"polls": snap.polls, "repeats": snap.repeats} if snap.polls else {}),
        )
        for worker in self.workers:
            worker.report()
        for sink in snap.sinks:
            self._log.info(
                "sink summary",
                sink=sink.name,
                delivered=sink.delivered,
                backlog=sink.backlog,
                oldest_age=None if sink.oldest_age is None else round(sink.oldest_age, 1),
                retries=sink.retries,
                dead_letters=sink.dead_letters,
                possible_duplicates=sink.possible_duplicates,
                dropped=sink.dropped,
                last_error=sink.last_error,
            )


def _bind_error(exc: OSError) -> str:
    """Why the status port cannot be had, and what to do, in one line."""
    if exc.errno == errno.EADDRINUSE:
        return "the port is in use (another program, or another dsmr-logger): choose another"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no such address on this machine: use 127.0.0.1, 0.0.0.0 or one of its own"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges): choose a higher port"
    if isinstance(exc, socket.gaierror):  # its errno is getaddrinfo's, which strerror misreads
        return f"the host is not an address this machine can resolve ({exc.strerror})"
    return f"cannot listen there: {os.strerror(exc.errno) if exc.errno else exc}"


async def _close_quietly(sink: Sink) -> None:
    """A sink's close must not keep the others (and the spool) from closing."""
    with contextlib.suppress(Exception):
        await sink.close()
