"""A Neurio sensor on 127.0.0.1, answering ``GET /current-sample`` as the real one does.

The demo's sensor and the tests': real HTTP, so the daemon polls it exactly as it polls a sensor in
a panel. Three shapes, as real installs have them:

- ``eu3``: a European three-phase house measured by consumption clamps only
  (``PHASE_A/B/C_CONSUMPTION``, ``CONSUMPTION``), 230 V, written ``V_V`` as in the vendor's
  document;
- ``split``: a North American split-phase house (``PHASE_A/B_CONSUMPTION``, ``CONSUMPTION``),
  120 V, written ``v_V`` as sensors send it;
- ``solar``: split-phase with panels (``PHASE_A/B_CONSUMPTION``, ``CONSUMPTION``, ``GENERATION``,
  ``NET``, ``PHASE_A/B_NET``); this fake reports generation as positive power.

Every counter advances by ``p_W`` x 1 s per sample, and the power follows a fixed pattern, so a run
is reproducible: the first solar sample is the README's example (``NET`` at 159,687,481,246 Ws
imported while exporting 1,189 W).

Samples come either each wall-clock second, dated then (``tick="clock"``, the default, like the
sensor), or one per request, each dated a second after the one before (``tick="request"``: a test
then knows exactly which samples it was served).

With ``control=True`` a second port takes ``POST /_control`` with JSON ``{"mode", "repeat",
"regress_ws", "jump_ws", "unsynchronized", "delay", "username", "password", "reset"}`` (all
optional; answers the state), ``GET /_control`` (state) and ``GET /_served`` (every sample
answered with 200, in order). Modes: ``ok``; ``refuse`` (the port and its idle connections are
closed: connection refused, as a sensor that is off; an answer being sent is finished first);
``hang`` (accepts, never answers); ``error`` (500); ``not_json`` (a 200 HTML page, as a wrong
device at that address). ``repeat: n``: the next n answers repeat the last sample;
``regress_ws``/``jump_ws``: the next new sample's grid import counters are that much lower/higher
(the one after is normal again).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from aiohttp import web

SHAPES = ("eu3", "split", "solar")
MODES = ("ok", "refuse", "hang", "error", "not_json")
TICKS = ("clock", "request")
DEFAULT_SENSOR_ID = "0x0000C47F510179CF"
CATCH_UP_LIMIT = 3600
"""Seconds a stopped clock-driven sensor replays one by one; a longer gap is one step."""
NOT_JSON_PAGE = "<!doctype html><html><body><h1>Router login</h1></body></html>"

# Power added to every phase's consumption at step k (W): a fixed pattern, first value 0.
_WAVE = (0, 35, 80, 140, 95, 40, -20, -60, -35, -10, 15, 220, 180, 60)
_SUN = (0, -15, -40, -10, 25, 30, 5, -25)  # added to each phase's generation


@dataclass(slots=True)
class _Counter:
    """One channel: counters in Ws, power in W, voltage in V."""

    type: str
    ch: int
    imported: int
    exported: int
    power: int = 0
    voltage: Decimal | None = None

    def run(self, power: int, seconds: int) -> None:
        self.power = power
        self.imported += max(power, 0) * seconds
        self.exported += max(-power, 0) * seconds


@dataclass(frozen=True, slots=True)
class _Phase:
    letter: str
    consumption: int  # W at step 0
    generation: int
    volts: Decimal


_SHAPES: Mapping[str, tuple[_Phase, ...]] = MappingProxyType(
    {
        "eu3": (
            _Phase("A", 230, 0, Decimal("230.1")),
            _Phase("B", 480, 0, Decimal("231.4")),
            _Phase("C", 150, 0, Decimal("229.8")),
        ),
        "split": (_Phase("A", 520, 0, Decimal("120.3")), _Phase("B", 310, 0, Decimal("121.1"))),
        "solar": (
            _Phase("A", 400, 1000, Decimal("121.419")),
            _Phase("B", 411, 1000, Decimal("120.874")),
        ),
    }
)
_START_COUNTERS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "NET": (159_687_481_246, 61_234_567_890),
        "CONSUMPTION": (210_532_119_004, 0),
        "GENERATION": (112_078_205_644, 0),
    }
)


class SensorModel:
    """The channels of one sensor and how they advance: a pure model, no clock and no I/O.

    Invariant: each ``advance`` moves every counter by exactly its new power x the seconds
    (imports by positive power, exports by negative), so counters never go back.
    """

    def __init__(self, shape: str, sensor_id: str = DEFAULT_SENSOR_ID) -> None:
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, not {shape!r}")
        self.shape = shape
        self.sensor_id = sensor_id
        self.voltage_key = "V_V" if shape == "eu3" else "v_V"
        self.phases = _SHAPES[shape]
        self.step = 0
        solar = shape == "solar"
        kinds = ["CONSUMPTION"] + (["GENERATION", "NET"] if solar else [])
        self.channels: list[_Counter] = []
        for number, phase in enumerate(self.phases):
            base = 40_000_000_000 + 7_000_000_000 * number
            self.channels.append(_Counter(f"PHASE_{phase.letter}_CONSUMPTION", 0, base, 0))
            if solar:
                self.channels.append(_Counter(f"PHASE_{phase.letter}_NET", 0, base // 2, base // 5))
        for kind in kinds:
            imported, exported = _START_COUNTERS[kind]
            self.channels.append(_Counter(kind, 0, imported, exported))
        for number, channel in enumerate(self.channels, start=1):
            channel.ch = number
        self._set_power(seconds=0)

    def advance(self, seconds: int = 1) -> None:
        """The next sample, ``seconds`` later: counters grow by the new power x ``seconds``."""
        self.step += 1
        self._set_power(seconds)

    def _set_power(self, seconds: int) -> None:
        k = self.step
        by_type = {channel.type: channel for channel in self.channels}
        consumption = generation = 0
        for number, phase in enumerate(self.phases):
            used = phase.consumption + _WAVE[k * (number + 1) % len(_WAVE)]
            made = phase.generation + _SUN[k * (number + 2) % len(_SUN)] if phase.generation else 0
            consumption, generation = consumption + used, generation + made
            volts = phase.volts + Decimal(round(400 * math.sin(k / 5 + number))) / 1000
            by_type[f"PHASE_{phase.letter}_CONSUMPTION"].run(used, seconds)
            by_type[f"PHASE_{phase.letter}_CONSUMPTION"].voltage = volts
            if f"PHASE_{phase.letter}_NET" in by_type:
                by_type[f"PHASE_{phase.letter}_NET"].run(used - made, seconds)
                by_type[f"PHASE_{phase.letter}_NET"].voltage = volts
        by_type["CONSUMPTION"].run(consumption, seconds)
        if "NET" in by_type:
            by_type["GENERATION"].run(generation, seconds)
            by_type["NET"].run(consumption - generation, seconds)

    def document(self, timestamp: str, *, grid_offset_ws: int = 0) -> dict[str, Any]:
        """The sample as the sensor's JSON; ``grid_offset_ws`` shifts the NET and CONSUMPTION
        counters of this one answer (a glitch for the guards to catch)."""
        channels = []
        for channel in self.channels:
            offset = grid_offset_ws if channel.type in ("NET", "CONSUMPTION") else 0
            entry: dict[str, Any] = {
                "type": channel.type,
                "ch": channel.ch,
                "eImp_Ws": channel.imported + offset,
                "eExp_Ws": channel.exported,
                "p_W": channel.power,
                "q_VAR": channel.power // 12,
            }
            if channel.voltage is not None:
                entry[self.voltage_key] = float(channel.voltage)
            channels.append(entry)
        clamps = [c for c in self.channels if c.type.endswith("_CONSUMPTION")]
        cts = [
            {"ct": n, "p_W": c.power, "q_VAR": c.power // 12, "v_V": float(c.voltage or 0)}
            for n, c in enumerate(clamps, start=1)
        ]
        return {
            "sensorId": self.sensor_id,
            "timestamp": timestamp,
            "channels": channels,
            "cts": cts,
        }


def iso_z(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeSensor:
    """The model served over HTTP on ``host`` (see the module docstring for the knobs).

    Invariant: ``served`` holds every sample answered with 200, in the order answered; a sample
    is served again only by ``repeat`` (or, with ``tick="clock"``, within its second).
    """

    def __init__(
        self,
        shape: str = "solar",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        username: str | None = None,
        password: str | None = None,
        tick: str = "clock",
        start: int | None = None,
        control: bool = False,
        clock: Callable[[], float] = time.time,
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: a listening socket to serve on (its port known before the loop runs)."""
        if tick not in TICKS:
            raise ValueError(f"tick must be one of {', '.join(TICKS)}, not {tick!r}")
        self.model = SensorModel(shape)
        self.host, self.port = host, port
        self.username, self.password = username, password
        self.tick = tick
        self.clock = clock
        self.second = int(clock()) if start is None else start
        self.mode = "ok"
        self.repeat = 0
        self.offset_next = 0
        self.unsynchronized = False
        self.delay = 0.0
        self.requests = 0
        self.hanging = 0
        self.served: list[dict[str, Any]] = []
        self._last: dict[str, Any] | None = None
        self._control = control
        self.control_port: int | None = None
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._control_runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._sock = sock
        if sock is not None:
            self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FakeSensor:
        app = web.Application()
        app.router.add_get("/current-sample", self._sample)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        if self._sock is None:
            self._sock = socket.create_server((self.host, self.port))
            self.port = self._sock.getsockname()[1]
        await self._listen()
        if self._control:
            control = web.Application()
            control.router.add_post("/_control", self._control_post)
            control.router.add_get("/_control", self._control_get)
            control.router.add_get("/_served", self._served_get)
            self._control_runner = web.AppRunner(control, access_log=None)
            await self._control_runner.setup()
            await web.TCPSite(self._control_runner, self.host, 0).start()
            self.control_port = self._control_runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._release.set()
        self._close_listener()
        for runner in (self._runner, self._control_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._control_runner = None

    async def __aenter__(self) -> FakeSensor:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def set_mode(self, mode: str) -> None:
        """Switch at once: ``refuse`` closes the port and its connections, leaving it reopens."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        old, self.mode = self.mode, mode
        if old == "hang":
            self._release.set()
            self._release = asyncio.Event()
        if mode == "refuse" and old != "refuse" and self._runner is not None:
            self._close_listener()
            for connection in list(self._runner.server.connections):  # type: ignore[union-attr]
                # Idle ones at once; an answer being sent is finished first (aiohttp keeps no
                # public flag for "busy": its own shutdown reads the same attribute).
                if getattr(connection, "_request_in_progress", False):
                    connection.close()
                else:
                    connection.force_close()
        elif old == "refuse" and mode != "refuse":
            self._sock = socket.create_server((self.host, self.port))
            await self._listen()

    def state(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "shape": self.model.shape,
            "port": self.port,
            "requests": self.requests,
            "hanging": self.hanging,
            "served": len(self.served),
            "repeat": self.repeat,
            "unsynchronized": self.unsynchronized,
        }

    # --- the sensor's endpoint -------------------------------------------------------------------

    async def _sample(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "hang":
            self.hanging += 1
            try:
                await self._release.wait()
            finally:
                self.hanging -= 1
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing is answered
        if self.username is not None and request.headers.get("Authorization") != basic(
            self.username, self.password or ""
        ):
            challenge = {"WWW-Authenticate": 'Basic realm="Neurio"'}
            return web.Response(status=401, text="Unauthorized", headers=challenge)
        if self.mode == "error":
            return web.Response(status=500, text="Internal Server Error")
        if self.mode == "not_json":
            return web.Response(text=NOT_JSON_PAGE, content_type="text/html")
        document = self._next_document()
        self.served.append(document)
        return web.json_response(document)

    def _next_document(self) -> dict[str, Any]:
        if self.repeat and self._last is not None:
            self.repeat -= 1
            return self._last
        if self.tick == "request":
            if self._last is not None:
                self.second += 1
                self.model.advance()
        else:
            behind = int(self.clock()) - self.second
            if behind > CATCH_UP_LIMIT:
                self.model.advance(behind)
            else:
                for _ in range(behind):
                    self.model.advance()
            self.second += max(behind, 0)
        stamp = "NOT_SYNCHRONIZED" if self.unsynchronized else iso_z(self.second)
        document = self.model.document(stamp, grid_offset_ws=self.offset_next)
        if self.offset_next:  # a one-sample glitch: the next answer is consistent again
            self.offset_next = 0
            self._last = self.model.document(stamp)
        else:
            self._last = document
        return document

    # --- control -------------------------------------------------------------------------------

    async def _control_post(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="JSON object expected") from None
        if not isinstance(changes, dict):
            raise web.HTTPBadRequest(text="JSON object expected")
        if changes.get("reset"):
            self.served.clear()
            self.requests = 0
        if "regress_ws" in changes:
            self.offset_next = -int(changes["regress_ws"])
        if "jump_ws" in changes:
            self.offset_next = int(changes["jump_ws"])
        for name in ("repeat", "unsynchronized", "delay", "username", "password"):
            if name in changes:
                setattr(self, name, changes[name])
        if "mode" in changes:
            try:
                await self.set_mode(changes["mode"])
            except ValueError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response(self.state())

    async def _control_get(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _served_get(self, request: web.Request) -> web.Response:
        return web.json_response(self.served)

    # --- the listening socket ------------------------------------------------------------------

    async def _listen(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        assert self._sock is not None
        self._listener = await asyncio.get_running_loop().create_server(
            self._runner.server, sock=self._sock
        )

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


async def serve(
    sensor: FakeSensor, announce: Callable[[FakeSensor], None], stop: asyncio.Event
) -> None:
    """Run ``sensor`` until ``stop`` is set, announcing it once it listens."""
    await sensor.start()
    try:
        announce(sensor)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await sensor.stop()


def simulate_command(
    *,
    shape: str,
    port: int,
    username: str | None,
    password: str | None,
    unsynchronized: bool,
    tick: str,
    control: bool,
) -> int:
    """``dsmr-logger simulate-neurio``: prints the URL (and the control port), serves until
    SIGTERM or Ctrl-C."""
    sensor = FakeSensor(
        shape, port=port, username=username, password=password, tick=tick, control=control
    )
    sensor.unsynchronized = unsynchronized

    def announce(ready: FakeSensor) -> None:
        try:
            print(ready.url, flush=True)
            if ready.control_port is not None:
                print(ready.control_port, flush=True)
        except BrokenPipeError:  # nobody reads the URL (`| head -0`): the sensor serves on
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        where = f"{ready.url}/current-sample"
        print(f"simulated Neurio sensor ({shape}) at {where}; Ctrl-C stops", file=sys.stderr)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(sensor, announce, stop)

    try:
        asyncio.run(run())
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"dsmr-logger: cannot serve on port {port}: {reason}", file=sys.stderr)
        return 1
    return 0
