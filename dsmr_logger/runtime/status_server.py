"""The status endpoint: ``/healthz`` (200/503), ``/status`` (JSON), ``/metrics`` (Prometheus).

Served by aiohttp in the daemon's own event loop; every answer is computed from one snapshot at
request time, so it costs nothing between requests.

Every connection holds a file, and a service may hold 1,024 of them (systemd's default): clients
that connect and never finish a request (slowloris), or a flood of them, must not take the ones
the meter, the spool and the sinks need. So at most ``MAX_CLIENTS`` connections are served at
once (more are closed as soon as they are accepted) and one sending no whole request within
``IDLE_TIMEOUT`` is closed. Measured before: 120 half-sent requests under a limit of 128 files
held every file; the sink could not connect again and delivery stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsmr_logger.config import HttpConfig
from dsmr_logger.runtime.health import judge, status_document
from dsmr_logger.runtime.snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_CLIENTS = 16
"""Connections served at once (a monitoring system, Prometheus and ``status`` need a few)."""
IDLE_TIMEOUT = 10.0
"""Seconds a connection may wait for a whole request, or sit idle between two."""


class _Turned(asyncio.Protocol):
    """A connection past ``MAX_CLIENTS``: closed at once, its file given back."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class SnapshotCollector(Collector):
    """Prometheus metrics read from the daemon's snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        frames = CounterMetricFamily(
            "dsmr_logger_frames", "Frames from the meter, by result", labels=["result"]
        )
        frames.add_metric(["valid"], snap.frames)
        for reason, count in snap.rejected.items():
            frames.add_metric([reason], count)
        yield frames
        yield CounterMetricFamily(
            "dsmr_logger_meter_bytes", "Bytes read from the meter", value=snap.bytes_in
        )
        yield CounterMetricFamily(
            "dsmr_logger_meter_reconnects",
            "Attempts to reopen the meter link, failed ones included (a polled device: "
            "times it stopped answering)",
            value=snap.reconnects,
        )
        if snap.meter_error_at is not None:
            yield GaugeMetricFamily(
                "dsmr_logger_meter_last_error_timestamp_seconds",
                "Unix time the meter link last failed (the reason is in /status)",
                value=snap.meter_error_at,
            )
        yield GaugeMetricFamily(
            "dsmr_logger_meter_connected", "1 while the meter link is open", value=snap.connected
        )
        if snap.polls:  # a polled device (HomeWizard, HTTP): a port has no polls
            yield CounterMetricFamily(
                "dsmr_logger_meter_polls", "Requests made to the meter's device", value=snap.polls
            )
        yield CounterMetricFamily(  # 0 for a port; polled devices and MQTT brokers repeat
            "dsmr_logger_meter_repeats",
            "Telegrams received again (a device polled, a broker resending), skipped",
            value=snap.repeats,
        )
        source = GaugeMetricFamily(
            "dsmr_logger_meter_info",
            "Where telegrams come from, and its state",
            labels=["where", "state"],
        )
        source.add_metric([snap.port, snap.meter_state], 1)
        yield source
        if snap.last_frame_at is not None:
            yield GaugeMetricFamily(
                "dsmr_logger_last_frame_timestamp_seconds",
                "Unix time of the last valid frame",
                value=snap.last_frame_at,
            )
        per_sink = {
            "delivered": (CounterMetricFamily, "Telegrams the sink confirmed"),
            "retries": (CounterMetricFamily, "Failed attempts that will be retried"),
            "dead_letters": (CounterMetricFamily, "Telegrams the server refused for good"),
            "possible_duplicates": (
                CounterMetricFamily,
                "Failed attempts that may have stored a telegram that was then stored again",
            ),
            "dropped": (CounterMetricFamily, "Telegrams lost to the spool size cap"),
            "backlog": (GaugeMetricFamily, "Telegrams waiting for the sink"),
        }
        for field, (family, help_text) in per_sink.items():
            metric = family(f"dsmr_logger_sink_{field}", help_text, labels=["sink"])
            for sink in snap.sinks:
                metric.add_metric([sink.name], getattr(sink, field))
            yield metric
        age = GaugeMetricFamily(
            "dsmr_logger_sink_oldest_age_seconds",
            "Age of the oldest waiting telegram",
            labels=["sink"],
        )
        failing = GaugeMetricFamily(
            "dsmr_logger_sink_failing", "1 while the sink's last attempt failed", labels=["sink"]
        )
        misconfigured = GaugeMetricFamily(
            "dsmr_logger_sink_misconfigured",
            "1 while the sink needs its configuration fixed (nothing is dead-lettered)",
            labels=["sink"],
        )
        for sink in snap.sinks:
            age.add_metric([sink.name], sink.oldest_age or 0.0)
            failing.add_metric([sink.name], 0 if sink.failing_since is None else 1)
            misconfigured.add_metric([sink.name], 1 if sink.misconfigured else 0)
        yield age
        yield failing
        yield misconfigured
        if snap.spool is not None:
            yield GaugeMetricFamily(
                "dsmr_logger_spool_writable",
                "1 while the spool can be written (0: telegrams are held only in memory)",
                value=int(snap.spool.writable),
            )
            yield GaugeMetricFamily(
                "dsmr_logger_spool_in_memory",
                "Telegrams held only in memory (not yet spooled, some sink still waiting)",
                value=snap.spool.in_memory,
            )
            lost = CounterMetricFamily(
                "dsmr_logger_sink_lost",
                "Telegrams lost to a damaged or deleted spool file",
                labels=["sink"],
            )
            for name in sorted({s.name for s in snap.sinks} | set(snap.spool.lost)):
                lost.add_metric([name], snap.spool.lost.get(name, 0))
            yield lost


class StatusServer:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        config: HttpConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._snapshot = snapshot
        self._config = config
        self._wall = wall_clock
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(SnapshotCollector(snapshot))
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        assert self._config.address is not None
        host, port = self._config.address
        runner = web.AppRunner(self.app(), access_log=None, keepalive_timeout=IDLE_TIMEOUT)
        await runner.setup()
        self._runner = runner
        try:
            # A backlog of MAX_CLIENTS: asyncio accepts at most that many in one go, before
            # any of them is counted in ``connections``.
            self._listener = await asyncio.get_running_loop().create_server(
                self._accepted, host, port, backlog=MAX_CLIENTS
            )
        except BaseException:  # the port is taken: nothing may stay half-open
            await self.stop()
            raise
        self.port = self._listener.sockets[0].getsockname()[1]

    def _accepted(self) -> asyncio.BaseProtocol:
        assert self._runner is not None and self._runner.server is not None
        if len(self._runner.server.connections) >= MAX_CLIENTS:
            return _Turned()
        return self._runner.server()

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()  # closes the connections still open
            self._runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None

    async def _healthz(self, _: web.Request) -> web.Response:
        health = judge(self._snapshot(), self._wall(), self._config)
        body = {"healthy": health.ok, "state": health.state, "reasons": list(health.reasons)}
        return web.json_response(body, status=200 if health.ok else 503)

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(status_document(self._snapshot(), self._wall(), self._config))

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry),
            content_type=None,
            headers={"Content-Type": CONTENT_TYPE},
        )
