"""Wires the pipeline — meter reader → per-sink queues and spool → sink workers — and runs it.

Lifecycle: on stop (SIGTERM/SIGINT) reading stops first, each sink may finish the request in flight
(bounded), everything still undelivered is committed to the spool, and the process exits 0 well
within 10 s; the next start delivers that backlog before anything new.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
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


STOP_GRACE = 5.0
"""Seconds a sink may take to finish its in-flight request at shutdown."""


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
        notifier: Notifier | None = None,
        log: Any = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        self.sink_configs = default_sinks(config)
        self._wall = wall_clock
        self._log = log or structlog.get_logger("dsmr_logger")
        self.queues = Queues(
            Spool(
                config.spool.path,
                max_bytes=config.spool.max_bytes,
                strict=config.spool.durability == "strict",
                sync_interval=SYNC_FLUSHES * config.spool.flush_interval,
            ),
            {sink.name: sink.min_interval for sink in self.sink_configs},
            flush_interval=config.spool.flush_interval,
            strict=config.spool.durability == "strict",
        )
        strict = config.spool.durability == "strict"
        self.sinks = [build_sink(sink, config.meter, strict=strict) for sink in self.sink_configs]
        self.workers = [
            SinkWorker(
                sink,
                self.queues,
                retry_initial=getattr(cfg, "retry_initial", 1.0),
                retry_max=getattr(cfg, "retry_max", 60.0),
                max_in_flight=getattr(cfg, "max_in_flight", 1),
                wall_clock=wall_clock,
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
        self._last_telegram: bytes | None = None
        self._debug = config.log.level == "debug"

    def _on_frame(self, frame: Frame) -> None:
        self._last_telegram = frame.telegram
        self.queues.accept(frame)
        if self._debug:  # glance costs ~20 µs a telegram: only for the debug line
            self._log.debug("telegram", **glance(frame.telegram).values, bytes=len(frame.raw))

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the process exit status."""
        orphans = await self.queues.open()
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
                await self.queues.close()
                raise StartupError(f"sink {sink.name!r}: {exc}") from exc
        self._log.info(
            "started",
            port=self.config.meter.where,
            sinks=[s.name for s in self.sinks],
            spool=str(self.config.spool.path),
            durability=self.config.spool.durability,
        )
        reader = asyncio.create_task(self.source.run(), name="source")
        workers = [asyncio.create_task(w.run(), name=f"sink:{w.sink.name}") for w in self.workers]
        helpers = [
            asyncio.create_task(self.queues.run_flusher(), name="flusher"),
            asyncio.create_task(self._summaries(), name="summary"),
        ]
        if self.queues.strict:
            helpers.append(asyncio.create_task(self.queues.run_strict_committer(), name="strict"))
        if self.status_server is not None:
            await self.status_server.start()
            host = str(self.config.http.listen).rpartition(":")[0]
            self._log.info("status endpoint", url=f"http://{host}:{self.status_server.port}/status")
        self.notifier.ready(self.status_line())
        if self.notifier.enabled:
            helpers.append(asyncio.create_task(self._notify(), name="notify"))
        everything = [reader, *workers, *helpers]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([stopper, *everything], return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in done if t is not stopper and not t.cancelled() and t.exception()]
        for task in crashed:
            self._log.error("task failed", task=task.get_name(), error=repr(task.exception()))
        stopper.cancel()
        await self._shutdown(reader, workers, helpers)
        return 1 if crashed else 0

    async def _shutdown(
        self,
        reader: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
        helpers: list[asyncio.Task[None]],
    ) -> None:
        self.notifier.stopping()
        await _cancel([reader])
        await asyncio.gather(*(w.stop(STOP_GRACE) for w in self.workers))
        await _cancel([*workers, *helpers])
        await self.queues.close()
        if self.status_server is not None:
            await self.status_server.stop()
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                await sink.close()
        self._log.info("stopped", undelivered=self.queues.undelivered())

    def snapshot(self) -> Snapshot:
        now = self._wall()
        counters = self.source.counters
        status = self.source.status
        sinks = []
        for worker in self.workers:
            queue = worker.queue
            oldest = queue.oldest_received_at()
            sinks.append(
                SinkSnapshot(
                    name=worker.sink.name,
                    delivered=worker.stats.delivered,
                    backlog=len(queue),
                    oldest_age=None if oldest is None else max(0.0, now - oldest),
                    retries=worker.stats.retries,
                    dead_letters=worker.stats.dead_letters,
                    dropped=queue.stats.dropped,
                    throttled=queue.stats.throttled,
                    last_error=worker.stats.last_error,
                    last_error_at=worker.stats.last_error_at,
                    failing_since=worker.stats.failing_since,
                    misconfigured=worker.stats.misconfigured,
                )
            )
        return Snapshot(
            port=self.config.meter.where,
            meter_state=status.state.value,
            connected=status.connected,
            frames=counters.frames,
            rejected=self.source.rejected(),
            bytes_in=counters.bytes_in,
            garbage_bytes=counters.garbage_bytes,
            reconnects=max(0, status.connects - 1),
            last_frame_at=status.last_frame_at,
            last_telegram=self._last_telegram,
            sinks=tuple(sinks),
            meter_error=status.last_error,
            polls=status.polls,
            repeats=status.repeats,
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
        for sink in snap.sinks:
            self._log.info(
                "sink summary",
                sink=sink.name,
                delivered=sink.delivered,
                backlog=sink.backlog,
                oldest_age=None if sink.oldest_age is None else round(sink.oldest_age, 1),
                retries=sink.retries,
                dead_letters=sink.dead_letters,
                dropped=sink.dropped,
                last_error=sink.last_error,
            )


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
