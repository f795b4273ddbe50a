"""NeurioSource against the fake sensor over real HTTP on 127.0.0.1, in one event loop.

The source is built in-process with a 20 ms interval (the configuration's minimum is 1 s; the
daemon-process tests use that), so a test of twenty polls takes a fraction of a second. Every
value checked is worked out from the JSON the fake sensor actually served.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from structlog.testing import capture_logs
from waiting import wait_until

from dsmr_logger.config import NeurioMeterConfig
from dsmr_logger.sources import MeterState
from dsmr_logger.sources.neurio import NeurioSource, PollSchedule
from dsmr_logger.sources.p1.framing import Frame
from dsmr_logger.telegram.glance import glance
from dsmr_logger.telegram.obis import parse
from dsmr_logger.tools.simulate_neurio import FakeSensor, iso_z

START = 1_782_900_000  # 2026-07-01T10:00:00Z
PASSWORD = "s3cret-Sensor-pw"
AMSTERDAM = ZoneInfo("Europe/Amsterdam")
UNSYNCHRONIZED = (
    "the sensor's clock is not synchronised (timestamp NOT_SYNCHRONIZED); dating its samples by "
    "this machine's clock"
)
VOLTAGES = ("32.7.0", "52.7.0", "72.7.0")
STALE = "the sensor answers but gives no new sample; see the rejected counts"
Logs = list[dict[str, Any]]


@pytest.fixture(autouse=True)
def logs() -> Iterator[Logs]:
    with capture_logs() as captured:
        yield captured


def events(logs: Logs, name: str) -> Logs:
    return [entry for entry in logs if entry["event"] == name]


def meter(sensor: FakeSensor, **changes: Any) -> NeurioMeterConfig:
    settings: dict[str, Any] = {"url": sensor.url, "interval": 0.02, "timeout": 0.5}
    return NeurioMeterConfig(**(settings | changes))


@contextlib.asynccontextmanager
async def running(source: NeurioSource) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def source_for(config: NeurioMeterConfig, frames: list[Frame], **kwargs: Any) -> NeurioSource:
    return NeurioSource(config, frames.append, retry_max=0.1, **kwargs)


def quantize(number: Decimal, places: str) -> Decimal:
    return number.quantize(Decimal(places), ROUND_HALF_UP)


def expected_values(document: dict[str, Any]) -> dict[str, Decimal]:
    """The registers a served sample must become, worked out here from its JSON."""
    channels = {c["type"]: c for c in document["channels"]}
    grid = "NET" if "NET" in channels else "CONSUMPTION"
    net = channels[grid]
    watts = Decimal(str(net["p_W"]))
    values = {
        "1-0:1.8.1": quantize(Decimal(net["eImp_Ws"]) / 3_600_000, "0.001"),
        "1-0:2.8.1": quantize(Decimal(net["eExp_Ws"]) / 3_600_000, "0.001"),
        "1-0:1.8.2": Decimal("0.000"),
        "1-0:2.8.2": Decimal("0.000"),
        "1-0:1.7.0": quantize(max(watts, Decimal(0)) / 1000, "0.001"),
        "1-0:2.7.0": quantize(max(-watts, Decimal(0)) / 1000, "0.001"),
    }
    for letter, plus, minus, volts in (("A", 21, 22, 32), ("B", 41, 42, 52), ("C", 61, 62, 72)):
        phase = channels.get(f"PHASE_{letter}_{grid}")
        if phase is None:
            continue
        watts = Decimal(str(phase["p_W"]))
        values[f"1-0:{plus}.7.0"] = quantize(max(watts, Decimal(0)) / 1000, "0.001")
        values[f"1-0:{minus}.7.0"] = quantize(max(-watts, Decimal(0)) / 1000, "0.001")
        voltage = phase.get("v_V", phase.get("V_V"))
        values[f"1-0:{volts}.7.0"] = quantize(Decimal(str(voltage)), "0.1")
    return values


def registers(frame: Frame) -> dict[str, Decimal | None]:
    reading = parse(frame.telegram)
    return {code: values[0].number for code, values in reading.objects.items() if values}


def sample_times(frames: list[Frame]) -> list[str]:
    return [glance(frame.telegram).values["meter_timestamp"] for frame in frames]


def served_second(document: dict[str, Any]) -> str:
    """A served sample's timestamp as the telegram writes it (Amsterdam time, S/W)."""
    moment = datetime.fromisoformat(document["timestamp"]).astimezone(AMSTERDAM)
    return moment.strftime("%y%m%d%H%M%S") + ("S" if moment.dst() else "W")


@pytest.mark.parametrize("shape", ["eu3", "split", "solar"])
async def test_every_sample_arrives_once_in_order_with_exact_values(shape: str) -> None:
    async with FakeSensor(shape, tick="request", start=START) as sensor:
        frames: list[Frame] = []
        source = source_for(meter(sensor), frames)
        async with running(source):
            await wait_until(lambda: len(frames) >= 12, "12 samples")
        assert source.status.state is MeterState.OK
        served = sensor.served[: len(frames)]
        assert sample_times(frames) == [served_second(d) for d in served]
        assert len(set(sample_times(frames))) == len(frames)
        for frame, document in zip(frames, served, strict=True):
            assert frame.crc is not None
            got = registers(frame)
            for code, value in expected_values(document).items():
                assert got.get(code) == value, f"{shape} {document['timestamp']} {code}"
        voltages = [code for code in registers(frames[0]) if code.endswith(VOLTAGES)]
        assert len(voltages) == {"eu3": 3, "split": 2, "solar": 2}[shape]
        assert source.rejected() == {}
        assert source.stats.samples == len(frames)


async def test_the_first_solar_sample_is_the_issues_example() -> None:
    async with FakeSensor("solar", tick="request", start=START) as sensor:
        frames: list[Frame] = []
        async with running(source_for(meter(sensor), frames)):
            await wait_until(lambda: len(frames) >= 1, "a sample")
    telegram = frames[0].telegram
    assert b"\r\n1-0:1.8.1(044357.634*kWh)\r\n" in telegram
    assert b"\r\n1-0:1.7.0(00.000*kW)\r\n1-0:2.7.0(01.189*kW)\r\n" in telegram


async def test_repeated_samples_are_skipped_and_counted(logs: Logs) -> None:
    async with FakeSensor("split", tick="request", start=START) as sensor:
        frames: list[Frame] = []
        source = source_for(meter(sensor), frames)
        async with running(source):
            await wait_until(lambda: len(frames) >= 2, "two samples")
            sensor.repeat = 4
            await wait_until(lambda: sensor.repeat == 0 and len(frames) >= 5, "past the repeats")
        assert source.rejected() == {"duplicate_sample": 4}
        assert len(set(sample_times(frames))) == len(frames)
        assert (
            sample_times(frames) == [served_second(d) for d in dedupe(sensor.served)][: len(frames)]
        )
        assert source.status.state is MeterState.OK
        assert not events(logs, "samples rejected"), "duplicates are normal, not warned"


def dedupe(served: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    return [d for d in served if not (d["timestamp"] in seen or seen.add(d["timestamp"]))]


@pytest.mark.parametrize(
    ("offset", "reason"), [(-5_000_000, "counter_regression"), (10**9, "counter_jump")]
)
async def test_a_counter_glitch_is_rejected_counted_and_warned(
    logs: Logs, offset: int, reason: str
) -> None:
    async with FakeSensor("solar", tick="request", start=START) as sensor:
        frames: list[Frame] = []
        source = source_for(meter(sensor), frames)
        async with running(source):
            await wait_until(lambda: len(frames) >= 2, "two samples")
            sensor.offset_next = offset
            await wait_until(lambda: source.rejected().get(reason) == 1, f"one {reason}")
            await wait_until(lambda: len(frames) >= 5, "samples after the glitch")
        glitch = next(
            d
            for d, before in zip(sensor.served[1:], sensor.served, strict=False)
            if _net(d) - _net(before) not in range(0, 10**7)
        )
        taken = sample_times(frames)
        assert served_second(glitch) not in taken
        assert taken == [served_second(d) for d in sensor.served if d is not glitch][: len(taken)]
        imported = [registers(f)["1-0:1.8.1"] for f in frames]
        assert imported == sorted(imported)
        warning = events(logs, "samples rejected")
        assert len(warning) == 1
        assert warning[0]["last_reason"] == reason
        assert "eImp_Ws" in warning[0]["last_detail"]
        assert source.status.state is MeterState.OK


def _net(document: dict[str, Any]) -> int:
    return next(c["eImp_Ws"] for c in document["channels"] if c["type"] == "NET")


async def test_a_login_is_asked_for_clearly_refused_clearly_and_then_works(logs: Logs) -> None:
    async with FakeSensor("eu3", tick="request", username="owner", password=PASSWORD) as sensor:
        frames: list[Frame] = []
        without = source_for(meter(sensor), frames)
        async with running(without):
            await wait_until(lambda: sensor.requests >= 4, "four refused polls")
        assert without.status.state is MeterState.UNAUTHORIZED
        assert without.status.last_error is not None
        assert "set meter.username and meter.password" in without.status.last_error
        refused = events(logs, "sensor refuses access")
        assert len(refused) == 1, "one error, not one per poll"
        assert refused[0]["log_level"] == "error"
        assert "set meter.username and meter.password" in refused[0]["reason"]

        wrong = source_for(meter(sensor, username="owner", password="guess"), frames)
        async with running(wrong):
            await wait_until(lambda: wrong.status.state is MeterState.UNAUTHORIZED, "refusal")
        assert "refused meter.username / meter.password" in str(wrong.status.last_error)
        assert frames == []

        right = source_for(meter(sensor, username="owner", password=PASSWORD), frames)
        async with running(right):
            await wait_until(lambda: len(frames) >= 3, "samples with the login")
        assert right.status.state is MeterState.OK
    token = base64.b64encode(f"owner:{PASSWORD}".encode()).decode()
    shown = repr(logs) + repr(right.status) + repr(right.config)
    assert PASSWORD not in shown and token not in shown
    assert right.status.port == f"{sensor.url}/current-sample"


async def test_a_sensor_that_goes_away_is_shown_retried_and_followed_again(logs: Logs) -> None:
    async with FakeSensor("solar", tick="request", start=START) as sensor:
        frames: list[Frame] = []
        source = source_for(meter(sensor), frames)
        async with running(source):
            await wait_until(lambda: len(frames) >= 2, "two samples")
            await sensor.set_mode("refuse")
            await wait_until(lambda: not source.status.connected, "the link down")
            polls = source.stats.polls
            await wait_until(lambda: source.stats.polls >= polls + 3, "three more attempts")
            assert source.status.state is MeterState.DISCONNECTED
            assert "ConnectError" in str(source.status.last_error)
            assert source.status.last_error_at is not None  # status shows "N s ago"
            assert source.status.attempts == source.status.polls == source.stats.polls
            taken = len(frames)
            await sensor.set_mode("ok")
            await wait_until(lambda: len(frames) >= taken + 3, "samples again")
        assert source.status.state is MeterState.OK
        assert (source.status.connects, source.status.disconnects) == (2, 1)
        # Once per reason (a poll on the closing connection may time out before the refusals).
        reasons = [entry["reason"] for entry in events(logs, "sensor unreachable, retrying")]
        assert len(reasons) == len(set(reasons)) < 3
        assert "ConnectError" in reasons[-1]
        assert len(events(logs, "reading samples")) == 2
        assert sample_times(frames) == [served_second(d) for d in sensor.served][: len(frames)]


async def test_a_hanging_sensor_times_out_and_is_asked_again() -> None:
    async with FakeSensor("split", tick="request", start=START) as sensor:
        frames: list[Frame] = []
        source = source_for(meter(sensor, timeout=0.1), frames)
        async with running(source):
            await wait_until(lambda: len(frames) >= 1, "a sample")
            await sensor.set_mode("hang")
            await wait_until(lambda: "ReadTimeout" in str(source.status.last_error), "timeout")
            assert source.status.state is MeterState.DISCONNECTED
            await sensor.set_mode("ok")
            await wait_until(lambda: source.status.state is MeterState.OK, "answers again")


@pytest.mark.parametrize(
    ("mode", "detail", "counted"),
    [
        ("not_json", "not JSON", {"not_json": 1}),
        ("error", "HTTP 500 from the sensor: 'Internal Server Error'", {}),
    ],
)
async def test_an_answer_without_a_sample_is_shown_and_retried(
    logs: Logs, mode: str, detail: str, counted: dict[str, int]
) -> None:
    async with FakeSensor("split", tick="request", start=START) as sensor:
        frames: list[Frame] = []
        source = source_for(meter(sensor), frames)
        async with running(source):
            await wait_until(lambda: len(frames) >= 1, "a sample")
            await sensor.set_mode(mode)
            await wait_until(lambda: source.status.state is MeterState.NO_VALID_FRAMES, mode)
            assert detail in str(source.status.last_error)
            assert source.status.connected, "the sensor answers: the link is up"
            await sensor.set_mode("ok")
            await wait_until(lambda: source.status.state is MeterState.OK, "samples again")
        for reason, least in counted.items():
            assert source.rejected()[reason] >= least
        warned = events(logs, "sensor answers without a usable sample, retrying")
        assert len(warned) == 1
        assert detail in warned[0]["reason"]


async def test_a_grid_channel_the_sensor_lacks_is_a_clear_state(logs: Logs) -> None:
    async with FakeSensor("eu3", tick="request", start=START) as sensor:
        frames: list[Frame] = []
        source = source_for(meter(sensor, grid_channel="NET"), frames)
        async with running(source):
            await wait_until(lambda: source.rejected().get("no_grid_channel", 0) >= 2, "refusals")
        assert frames == []
        assert source.status.state is MeterState.NO_VALID_FRAMES
        assert "no NET channel" in str(source.status.last_error)
        assert "meter.grid_channel" in str(source.status.last_error)


async def test_a_sensor_without_a_clock_is_dated_by_ours_and_it_is_said_once(
    logs: Logs,
) -> None:
    ticks = [START - 1_000]  # behind the sensor, as drifting clocks are (within the hour)

    def clock() -> float:  # a second per call: each answer lands in a new second
        ticks[0] += 1
        return ticks[0] + 0.25

    async with FakeSensor("split", tick="request", start=START) as sensor:
        sensor.unsynchronized = True
        frames: list[Frame] = []
        source = source_for(meter(sensor), frames, wall_clock=clock)
        async with running(source):
            await wait_until(lambda: len(frames) >= 3, "three samples")
            sensor.repeat = 3  # same content again, though our clock moved on
            await wait_until(lambda: source.rejected().get("duplicate_sample") == 3, "repeats")
            await wait_until(lambda: len(frames) >= 5, "more samples")
            sensor.unsynchronized = False
            await wait_until(lambda: len(frames) >= 8, "samples with the sensor's time")
        stamps = [parse(f.telegram).timestamp for f in frames]
        assert all(s is not None for s in stamps)
        ours = [s for s in stamps if s is not None and s.timestamp() < START]
        theirs = [s for s in stamps if s is not None and s.timestamp() >= START]
        assert len(ours) >= 5 and len(theirs) >= 3
        assert all(s.timestamp() == int(s.timestamp()) for s in ours)
        assert stamps == sorted(stamps)  # type: ignore[type-var]
        assert len(events(logs, UNSYNCHRONIZED)) == 1
        assert len(events(logs, "the sensor's clock is synchronised again")) == 1


async def test_a_sensor_repeating_itself_for_long_is_no_longer_ok(logs: Logs) -> None:
    async with FakeSensor("split", tick="request", start=START) as sensor:
        frames: list[Frame] = []
        source = source_for(meter(sensor), frames, stale_after=0.2)
        async with running(source):
            await wait_until(lambda: len(frames) >= 1, "a sample")
            sensor.repeat = 10**6
            await wait_until(lambda: source.status.state is MeterState.NO_VALID_FRAMES, "stale")
            assert "no new sample for" in str(source.status.last_error)
            sensor.repeat = 0
            await wait_until(lambda: source.status.state is MeterState.OK, "new samples")
        assert len(events(logs, STALE)) == 1


def test_polls_keep_a_fixed_grid_and_back_off_after_failures() -> None:
    schedule = PollSchedule(interval=1.0, retry_max=8.0, jitter=lambda: 1.0, now=100.0)
    assert schedule.answered(100.3) == 101.0  # a slow answer does not shift the grid
    assert schedule.answered(103.5) == 103.5  # a whole interval late: at once
    assert [schedule.failed(t) for t in (104.0, 105.0, 107.0, 111.0, 119.0)] == [
        105.0,
        107.0,
        111.0,
        119.0,
        127.0,  # capped at retry_max
    ]
    assert schedule.answered(127.1) == 128.0  # the first answer resets it
    assert schedule.failed(128.0) == 129.0
    early = PollSchedule(interval=1.0, retry_max=8.0, jitter=lambda: 0.0, now=0.0)
    # Jitter takes half the delay at most, and a pause is never under the interval.
    assert [early.failed(t) for t in (0.0, 1.0, 2.0, 4.0)] == [1.0, 2.0, 4.0, 8.0]


# --- a hostile answer: counted and skipped, never the end of the source -------------------------

BASE_WS = 159_687_481_246


def sample_text(stamp: str, imported_ws: str = str(BASE_WS), **grid: str) -> bytes:
    """A one-channel sample, every value written as the JSON text given (``1e999999`` too)."""
    channel = {"type": '"CONSUMPTION"', "eImp_Ws": imported_ws, "eExp_Ws": "0", "p_W": "500"}
    fields = ", ".join(f'"{key}": {value}' for key, value in (channel | grid).items())
    text = f'{{"sensorId": "0x1", "timestamp": "{stamp}", "channels": [{{{fields}}}]}}'
    return text.encode()


class ScriptedSensor:
    """A sensor on 127.0.0.1 answering ``bodies`` in turn, then the last one on and on."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.answered = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _sample(self, request: web.Request) -> web.Response:
        body = self.bodies[min(self.answered, len(self.bodies) - 1)]
        self.answered += 1
        return web.Response(body=body, content_type="application/json")

    async def __aenter__(self) -> ScriptedSensor:
        app = web.Application()
        app.router.add_get("/current-sample", self._sample)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


HOSTILE = {
    # Numbers no sensor measures; each ended the source (decimal.InvalidOperation or Overflow in
    # the guard's arithmetic or in writing the register), and so the daemon, again at each start.
    "a counter of 1e999999 Ws": (sample_text(iso_z(START + 1), "1e999999"), "malformed_sample"),
    "a counter beyond what Decimal holds": (
        sample_text(iso_z(START + 1), "1e99999999999999999999999"),
        "not_json",
    ),
    "a power of 1e40 W": (sample_text(iso_z(START + 1), p_W="1e40"), "malformed_sample"),
    "a phase voltage of 1e40 V": (
        sample_text(iso_z(START + 1)).replace(
            b"}]", b'}, {"type": "PHASE_A_CONSUMPTION", "p_W": 500, "v_V": 1e40}]'
        ),
        "malformed_sample",
    ),
    # Dates a telegram cannot state (YYMMDDhhmmss): out of datetime's range once written in the
    # meter's zone (OverflowError), or after 2099, which the telegram would state as 2000.
    "dated 9999-12-31": (sample_text("9999-12-31T23:59:59Z"), "malformed_sample"),
    "dated 0001-01-01 at +05:00": (sample_text("0001-01-01T00:00:00+05:00"), "malformed_sample"),
    "dated 2100": (sample_text("2100-01-01T12:00:00Z"), "malformed_sample"),
    # A clock glitch into the future: passed on, it made every later sample "out of order"
    # until real time caught up with it (a stall until a restart).
    "dated a day ahead of this machine's clock": (
        sample_text(iso_z(int(time.time()) + 86_400)),
        "sample_from_the_future",
    ),
    # JSON nested deeper than Python's decoder recurses (RecursionError).
    "JSON nested 100,000 deep": (
        b'{"channels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "not_json",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_answer_is_counted_and_the_next_sample_still_taken(case: str) -> None:
    body, reason = HOSTILE[case]
    later = [sample_text(iso_z(START + n), str(BASE_WS + 500 * n)) for n in (2, 3, 4)]
    async with ScriptedSensor([sample_text(iso_z(START)), body, *later]) as sensor:
        frames: list[Frame] = []
        config = NeurioMeterConfig(url=sensor.url, interval=0.02, timeout=2.0)
        source = NeurioSource(config, frames.append, retry_max=0.05)
        task = asyncio.create_task(source.run())
        try:
            await wait_until(lambda: len(frames) >= 4 or task.done(), "the samples after it")
            assert not task.done(), f"the source ended: {task.exception()!r}"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    rejected = source.rejected()
    # Past its script the sensor repeats the last sample; a poll that lands there (a loaded
    # machine polls more often than the test looks) is a duplicate, rightly: only those.
    repeats = rejected.pop("duplicate_sample", 0)
    assert repeats <= max(0, sensor.answered - 5)
    assert rejected == {reason: 1}
    assert source.status.state is MeterState.OK
    assert [registers(f)["1-0:1.8.1"] for f in frames] == [
        quantize(Decimal(BASE_WS + 500 * n) / 3_600_000, "0.001") for n in (0, 2, 3, 4)
    ]
