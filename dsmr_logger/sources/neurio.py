"""A Neurio / Generac PWRview sensor as a live source: its samples, written as DSMR 5 telegrams.

The sensor (a clamp meter in the electrical panel) computes a sample about once a second and
answers ``GET http://<sensor>/current-sample`` on the LAN with the latest one as JSON: per
channel (``NET``, ``CONSUMPTION``, ``GENERATION``, ``PHASE_A_CONSUMPTION``, ...) the energy
imported and exported since installation in watt-seconds, the power in watts and the voltage
(``v_V``; the vendor's document writes ``V_V``), and the sample's UTC time (``NOT_SYNCHRONIZED``
while the sensor has no clock). Newer firmware asks for HTTP Basic auth.

Each new sample becomes a telegram (``telegram.build``) fed through the same ``FrameAssembler``
as bytes from a P1 cable, so the spool, the sinks, ``parse`` and ``status`` see one kind of
record. The pure core here reads a sample (``parse_sample``), maps it (``to_reading``) and judges
it against the last one passed on (``SampleGuard``); ``NeurioSource`` is the thin shell that polls,
backs off and reports the link like the P1 reader does. Reading a solar sample (1 KB of JSON) and
writing it as a telegram costs about 125 µs, once per poll: the event loop, and so the sinks,
never wait on it; a sensor slow to answer only holds its own task, for at most ``timeout``.

The guards, and the figure behind the jump limit: a counter may grow by at most
``2 x max(|p_W| of both samples) x Δt + 50 kW x Δt + 1 Wh``. Twice the power absorbs a load that
switched between two polls; 50 kW is more than a 200 A, 240 V service (48 kW), the usual largest
house connection, can carry, so only a broken reading passes it. A counter that goes
back, or grows past that, is rejected; if the sensor's counters really restarted (a reset), the
new series is followed once ``REBASE_AFTER`` samples in a row agree with each other, with a
warning, instead of rejecting everything forever.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from dsmr_logger.config import NeurioMeterConfig
from dsmr_logger.net.http import HttpClient, basic_auth, parse_json
from dsmr_logger.sources import MeterState, MeterStatus
from dsmr_logger.sources.link import LinkTracker, LinkWording, RejectReport
from dsmr_logger.sources.p1.framing import Frame, FrameAssembler, FramingCounters
from dsmr_logger.telegram.build import MeterReading, build_telegram, kwh_from_ws

SAMPLE_PATH = "/current-sample"
NOT_SYNCHRONIZED = "NOT_SYNCHRONIZED"
PHASES = ("A", "B", "C")
WATTS_PER_KW = Decimal(1000)
HEADROOM_W = Decimal(50_000)
"""Power no household panel carries (a 200 A, 240 V service tops out at 48 kW)."""
FIXED_MARGIN_WS = Decimal(3_600)
"""1 Wh: rounding in the sensor and a sample computed a moment before its timestamp."""
REBASE_AFTER = 5
"""Rejected samples in a row, each consistent with the one before, that make a new baseline."""
RETRY_MAX = 60.0
"""Longest pause between polls of a sensor that does not answer (the first is ``interval``)."""
MAX_SAMPLE_BYTES = 256 * 1024
LARGEST = Decimal(10) ** 15
"""No measurement reaches this: 10^15 Ws is a 48 kW service (see ``HEADROOM_W``) running for
660 years. A value beyond it is a broken sample, and arithmetic on one (``1e999999``) overflows."""
YEARS = range(2000, 2100)
"""The years a telegram can state: its timestamp is ``YYMMDDhhmmss``, read as 20YY."""
_HEADER_ID = re.compile(r"[^A-Za-z0-9_.:-]")


class Rejected(enum.StrEnum):
    """Why an answer of the sensor was not passed on (the ``rejected`` counters' names)."""

    DUPLICATE = "duplicate_sample"
    """The same sample as the last one (same timestamp): the sensor had no new one yet."""
    OUT_OF_ORDER = "sample_out_of_order"
    """Dated before the last sample passed on (the sensor's clock stepped back)."""
    FROM_THE_FUTURE = "sample_from_the_future"
    """Dated more than ``FUTURE_LIMIT`` ahead of this machine's clock: passed on, it would make
    every later (true) sample look out of order until real time caught up with it."""
    REGRESSION = "counter_regression"
    JUMP = "counter_jump"
    NO_GRID_CHANNEL = "no_grid_channel"
    MALFORMED = "malformed_sample"
    NOT_JSON = "not_json"


GUARDED = (Rejected.OUT_OF_ORDER, Rejected.FROM_THE_FUTURE, Rejected.REGRESSION, Rejected.JUMP)
FUTURE_LIMIT = 3600.0
"""Seconds a sample may be dated ahead of this machine's clock (clocks drift; an hour does not)."""
"""Samples a guard refused: warned about (at most once a minute)."""
WORDING = LinkWording(
    down="sensor unreachable, retrying",
    refused="sensor refuses access",
    unusable="sensor answers without a usable sample, retrying",
    ok="reading samples",
)
"""Coming up is not said: the first sample is ("reading samples")."""


class SampleError(ValueError):
    """An answer that is not a usable sample; ``reason`` names the counter it goes to."""

    def __init__(self, reason: Rejected, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# --- the sample ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Channel:
    """One channel of a sample, values exactly as the sensor wrote them (None: not given)."""

    type: str
    imported_ws: Decimal | None = None
    exported_ws: Decimal | None = None
    power_w: Decimal | None = None
    voltage_v: Decimal | None = None
    problems: tuple[str, ...] = ()
    """Values that are not numbers (or negative counters), left out above: an error only for a
    channel that is written into the telegram, so an odd channel nobody uses harms nothing."""


@dataclass(frozen=True, slots=True)
class Sample:
    sensor_id: str
    timestamp: datetime | None
    """UTC; None when the sensor said ``NOT_SYNCHRONIZED``."""
    channels: Mapping[str, Channel]
    """By type; the first channel of a type when the sensor lists one twice."""
    fingerprint: str
    """The channels as sent, canonical: tells a repeated sample from a new one without a clock."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_sample(body: bytes) -> Sample:
    """The sensor's JSON answer as a ``Sample``; ``SampleError`` says why it is not one."""
    try:
        document = parse_json(body, parse_float=Decimal, parse_constant=_no_constant)
    except ValueError as exc:
        start = body[:60].decode("utf-8", "replace")
        raise SampleError(Rejected.NOT_JSON, f"not JSON ({exc}): {start!r}") from None
    if not isinstance(document, dict):
        raise SampleError(Rejected.MALFORMED, f"a JSON {type(document).__name__}, not an object")
    raw_channels = document.get("channels")
    if not isinstance(raw_channels, list):
        raise SampleError(Rejected.MALFORMED, "no 'channels' list")
    channels: dict[str, Channel] = {}
    for raw in raw_channels:
        channel = _channel(raw)
        channels.setdefault(channel.type, channel)
    sensor_id = document.get("sensorId")
    return Sample(
        sensor_id=sensor_id if isinstance(sensor_id, str) else "",
        timestamp=_timestamp(document.get("timestamp")),
        channels=channels,
        fingerprint=json.dumps(raw_channels, sort_keys=True, default=str),
    )


def _channel(raw: Any) -> Channel:
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise SampleError(Rejected.MALFORMED, f"a channel without a type: {str(raw)[:80]}")
    kind = raw["type"]
    problems: list[str] = []

    def number(key: str, *, signed: bool = False) -> Decimal | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            problems.append(f"{kind}.{key} is {value!r}, not a number")
            return None
        amount = Decimal(value)
        if not signed and amount < 0:
            problems.append(f"{kind}.{key} is negative ({value})")
            return None
        if abs(amount) >= LARGEST:
            problems.append(f"{kind}.{key} is {value}, beyond any measurement")
            return None
        return amount

    return Channel(
        type=kind,
        imported_ws=number("eImp_Ws"),
        exported_ws=number("eExp_Ws"),
        power_w=number("p_W", signed=True),
        voltage_v=number("v_V" if "v_V" in raw else "V_V"),
        problems=tuple(problems),
    )


def _timestamp(value: Any) -> datetime | None:
    if value == NOT_SYNCHRONIZED:
        return None
    if not isinstance(value, str):
        raise SampleError(Rejected.MALFORMED, f"timestamp {value!r} is not a time")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise SampleError(Rejected.MALFORMED, f"timestamp {value!r} is not ISO 8601") from None
    # The sensor writes UTC ("...Z"); a time without an offset is read as UTC too.
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+05:00 is before the first time there is
        raise SampleError(Rejected.MALFORMED, f"timestamp {value!r} is out of range") from None


# --- the mapping ----------------------------------------------------------------------------------


def grid_channel(sample: Sample, choice: str) -> str:
    """Which channel is the grid meter: ``NET`` or ``CONSUMPTION``; ``auto``: NET when present."""
    if choice == "auto":
        return "NET" if "NET" in sample.channels else "CONSUMPTION"
    return choice


def split_power(watts: Decimal) -> tuple[Decimal, Decimal]:
    """Signed watts → (kW delivered, kW returned), as a meter's two power registers."""
    kilowatts = watts / WATTS_PER_KW
    return (kilowatts, Decimal(0)) if kilowatts > 0 else (Decimal(0), -kilowatts)


def to_reading(sample: Sample, *, grid: str, when: datetime) -> MeterReading:
    """The sample in DSMR-reader's units, dated ``when`` (an aware time).

    The grid channel's counters are tariff 1 (a sensor knows no tariffs; tariff 2 stays 0), its
    signed power is split into delivered and returned. Per-phase power comes from the phases of the
    same kind as the grid channel (``PHASE_A_NET`` with ``NET``, ``PHASE_A_CONSUMPTION`` with
    ``CONSUMPTION``), so L1 + L2 + L3 adds up to the total as on a real meter; the voltage of a
    phase from that channel, else from any channel of that phase.
    """
    channel = sample.channels.get(grid)
    if channel is None:
        present = ", ".join(sorted(sample.channels)) or "none"
        raise SampleError(
            Rejected.NO_GRID_CHANNEL,
            f"the sample has no {grid} channel (it has: {present}); check meter.grid_channel",
        )
    _usable(channel)
    imported, exported, power = channel.imported_ws, channel.exported_ws, channel.power_w
    if imported is None or exported is None or power is None:
        given = {"eImp_Ws": imported, "eExp_Ws": exported, "p_W": power}
        missing = ", ".join(name for name, value in given.items() if value is None)
        raise SampleError(Rejected.MALFORMED, f"the {grid} channel has no {missing}")
    delivered, returned = split_power(power)
    phase_delivered: list[Decimal | None] = []
    phase_returned: list[Decimal | None] = []
    phase_voltage: list[Decimal | None] = []
    for letter in PHASES:
        phase = sample.channels.get(f"PHASE_{letter}_{grid}")
        if phase is not None:
            _usable(phase)
        if phase is not None and phase.power_w is not None:
            plus, minus = split_power(phase.power_w)
            phase_delivered.append(plus)
            phase_returned.append(minus)
        else:
            phase_delivered.append(None)
            phase_returned.append(None)
        phase_voltage.append(_phase_voltage(sample, letter, phase))
    return MeterReading(
        timestamp=when,
        delivered_1=kwh_from_ws(imported),
        returned_1=kwh_from_ws(exported),
        power_delivered=delivered,
        power_returned=returned,
        phase_power_delivered=_three(phase_delivered),
        phase_power_returned=_three(phase_returned),
        phase_voltage=_three(phase_voltage),
        equipment_id=sample.sensor_id,
    )


def _usable(channel: Channel) -> None:
    if channel.problems:
        raise SampleError(Rejected.MALFORMED, "; ".join(channel.problems))


def _phase_voltage(sample: Sample, letter: str, preferred: Channel | None) -> Decimal | None:
    if preferred is not None and preferred.voltage_v is not None:
        return preferred.voltage_v
    prefix = f"PHASE_{letter}_"
    for channel in sample.channels.values():
        if channel.type.startswith(prefix) and channel.voltage_v is not None:
            return channel.voltage_v
    return None


def _three(values: list[Decimal | None]) -> tuple[Decimal | None, Decimal | None, Decimal | None]:
    return values[0], values[1], values[2]


def stateable(moment: datetime, zone: ZoneInfo) -> datetime:
    """``moment``, if a telegram written in ``zone`` can state it (``YEARS``); else the sample
    is malformed (9999-12-31 is not even a time in Amsterdam: ``OverflowError``)."""
    try:
        year: int | None = moment.astimezone(zone).year
    except OverflowError:
        year = None
    if year not in YEARS:
        raise SampleError(
            Rejected.MALFORMED,
            f"dated {moment.isoformat()}: a telegram states only the years 2000-2099",
        )
    return moment


def telegram_header(sensor_id: str) -> str:
    """``NEU5\\NeurioLocal-<sensorId>``: the identification line that names the source."""
    cleaned = _HEADER_ID.sub("", sensor_id)[:52]
    return f"NEU5\\NeurioLocal-{cleaned}" if cleaned else "NEU5\\NeurioLocal"


# --- the guards ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mark:
    """What the guard keeps of a sample: its second and the grid channel's values."""

    second: int
    imported_ws: Decimal
    exported_ws: Decimal
    power_w: Decimal
    fingerprint: str = ""


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REBASED = "rebased"
    """Accepted as a new baseline: the counters restarted and stayed consistent since."""


class SampleGuard:
    """Passes a sample only if it is newer than, and consistent with, the last one passed.

    Invariant: the marks it accepts have strictly increasing seconds, and each counter of an
    accepted mark is at least the previous accepted one's and grew by no more than the power
    could explain (see the module's docstring), except a rebase after ``REBASE_AFTER``
    consistent rejected samples in a row.
    """

    def __init__(self) -> None:
        self.last: Mark | None = None
        self._candidates: list[Mark] = []

    def check(self, mark: Mark) -> Verdict:
        """``Verdict`` when passed (and remembered); raises ``SampleError`` when not."""
        newest = self._candidates[-1] if self._candidates else self.last
        if newest is not None and (
            mark.second == newest.second
            or (mark.fingerprint and mark.fingerprint == newest.fingerprint)
        ):
            raise SampleError(Rejected.DUPLICATE, f"the same sample again ({mark.second})")
        if self.last is None:
            self.last = mark
            return Verdict.ACCEPT
        if mark.second < self.last.second:
            raise SampleError(
                Rejected.OUT_OF_ORDER,
                f"dated {mark.second - self.last.second} s before the last sample passed on",
            )
        problem = implausible(self.last, mark)
        if problem is None:
            self.last, self._candidates = mark, []
            return Verdict.ACCEPT
        if self._candidates and implausible(self._candidates[-1], mark) is None:
            self._candidates.append(mark)
        else:
            self._candidates = [mark]
        if len(self._candidates) >= REBASE_AFTER:
            self.last, self._candidates = mark, []
            return Verdict.REBASED
        raise problem


def implausible(before: Mark, after: Mark) -> SampleError | None:
    """Why ``after`` cannot follow ``before`` (a counter went back or outran the power)."""
    seconds = Decimal(after.second - before.second)
    if seconds <= 0:
        return SampleError(Rejected.OUT_OF_ORDER, "not later than the sample before")
    power = max(abs(before.power_w), abs(after.power_w))
    limit = 2 * power * seconds + HEADROOM_W * seconds + FIXED_MARGIN_WS
    for name, old, new in (
        ("eImp_Ws", before.imported_ws, after.imported_ws),
        ("eExp_Ws", before.exported_ws, after.exported_ws),
    ):
        if new < old:
            return SampleError(Rejected.REGRESSION, f"{name} went back from {old} to {new}")
        if new - old > limit:
            return SampleError(
                Rejected.JUMP,
                f"{name} grew by {new - old} Ws in {seconds} s at {power} W "
                f"(at most {limit} Ws is plausible)",
            )
    return None


# --- the source --------------------------------------------------------------------------------


@dataclass(slots=True)
class NeurioStats:
    polls: int = 0
    """Requests sent to the sensor."""
    samples: int = 0
    """Samples passed on as telegrams."""
    rejected: dict[str, int] = field(default_factory=dict)


class PollSchedule:
    """When to ask the sensor next, in loop time.

    While it answers: every ``interval`` on a fixed grid (a slow answer does not shift the ones
    after it; one later than a whole interval is followed at once). After a failure: a pause of
    50-100 % (jitter) of a delay that starts at ``interval`` and doubles up to ``retry_max``,
    never shorter than ``interval``; the first answer resets it.
    """

    def __init__(
        self, interval: float, retry_max: float, jitter: Callable[[], float], now: float
    ) -> None:
        self.interval, self.retry_max, self._jitter = interval, max(retry_max, interval), jitter
        self.delay = interval
        self.due = now

    def answered(self, now: float) -> float:
        self.delay = self.interval
        self.due = max(self.due + self.interval, now)
        return self.due

    def failed(self, now: float) -> float:
        pause = max(self.delay * (0.5 + self._jitter() / 2), self.interval)
        self.delay = min(self.delay * 2, self.retry_max)
        self.due = now + pause
        return self.due


class NeurioSource:
    """Polls ``config.where`` every ``config.interval`` s; each new sample → ``on_frame``.

    Invariant: ``on_frame`` gets each sample the sensor answered at most once, oldest first, as
    one CRC-valid telegram out of the ``FrameAssembler``, never with a counter below one already
    passed on; every answer not passed on is counted in ``rejected()`` by reason. It never exits
    because of the sensor: failures back off (``PollSchedule``), and each change of state is logged
    once.
    """

    def __init__(
        self,
        config: NeurioMeterConfig,
        on_frame: Callable[[Frame], None],
        *,
        wall_clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        retry_max: float = RETRY_MAX,
        stale_after: float | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.config = config
        self.zone = ZoneInfo(config.timezone)
        self.assembler = FrameAssembler(require_crc=True)
        self.guard = SampleGuard()
        self.stats = NeurioStats()
        self.status = MeterStatus(port=config.where)
        self._on_frame = on_frame
        self._wall = wall_clock
        self._jitter = jitter
        self._stale_after = stale_after or max(30.0, 3 * config.interval)
        self._retry_max = max(retry_max, config.interval)
        self._log = log or structlog.get_logger("dsmr_logger.meter")
        self._headers = {"Accept": "application/json"}
        if config.username is not None and config.password is not None:
            self._headers["Authorization"] = basic_auth(config.username, config.password)
        # A sample passed on keeps the last failure shown, as the P1 reader's frames do.
        self._link = LinkTracker(
            self.status, WORDING, log=self._log, wall_clock=wall_clock, keeps_error=True
        )
        self._rejects = RejectReport(self._log)
        self._unsynchronized = False
        self._last_progress = 0.0
        self._last_rejection: SampleError | None = None

    @property
    def counters(self) -> FramingCounters:
        return self.assembler.counters

    def rejected(self) -> dict[str, int]:
        """Answers not passed on, by reason (and frames the assembler refused: none expected)."""
        counts = self.assembler.counters.rejected_counts()
        return {**counts, **{reason: n for reason, n in self.stats.rejected.items() if n}}

    async def run(self) -> None:
        client = HttpClient(self.config.url, timeout=self.config.timeout, max_body=MAX_SAMPLE_BYTES)
        loop = asyncio.get_running_loop()
        self._last_progress = loop.time()
        schedule = PollSchedule(self.config.interval, self._retry_max, self._jitter, loop.time())
        try:
            while True:
                answered = await self.poll(client)
                now = loop.time()
                due = schedule.answered(now) if answered else schedule.failed(now)
                await asyncio.sleep(max(0.0, due - now))
        finally:
            await client.close()

    async def poll(self, client: HttpClient) -> bool:
        """One request; True when the sensor answered with a sample (new, repeated or refused
        by a guard), False when it should be asked again only after a backoff."""
        self.stats.polls += 1
        self.status.polls += 1
        self.status.attempts += 1
        try:
            response = await client.get(SAMPLE_PATH, headers=self._headers)
        except OSError as exc:  # HttpError and its kinds are OSErrors
            self._link.down(f"no answer: {_describe(exc)}")
            return False
        self._answered()
        if response.status in (401, 403):
            self._unauthorized(response.status)
            return False
        if response.status != 200:
            self._link.failing(
                f"HTTP {response.status} from the sensor: {_snippet(response.body)}",
                MeterState.NO_VALID_FRAMES,
            )
            return False
        received_at = self.status.last_byte_at or self._wall()
        try:
            sample = parse_sample(response.body)
            grid = grid_channel(sample, self.config.grid_channel)
            reading = to_reading(sample, grid=grid, when=self._date(sample, received_at))
        except SampleError as exc:
            self._count(exc)
            self._link.failing(f"answer is not a usable sample: {exc}", MeterState.NO_VALID_FRAMES)
            return False
        self._take(sample, reading, sample.channels[grid], received_at)
        return True

    def _take(self, sample: Sample, reading: MeterReading, grid: Channel, at: float) -> None:
        """Guard, then pass on the reading of ``sample`` (grid channel ``grid``, read ``at``)."""
        ahead = reading.timestamp.timestamp() - at
        if sample.timestamp is not None and ahead > FUTURE_LIMIT:
            self._count(SampleError(Rejected.FROM_THE_FUTURE, f"dated {ahead:.0f} s ahead of now"))
            self._stale_check()
            return
        try:
            verdict = self.guard.check(
                Mark(
                    second=int(reading.timestamp.timestamp()),
                    imported_ws=grid.imported_ws or Decimal(0),  # to_reading checked all three
                    exported_ws=grid.exported_ws or Decimal(0),
                    power_w=grid.power_w or Decimal(0),
                    fingerprint=sample.fingerprint if sample.timestamp is None else "",
                )
            )
        except SampleError as exc:
            self._count(exc)
            self._stale_check()
            return
        if verdict is Verdict.REBASED:
            self._log.warning(
                "the sensor's counters restarted; following the new values",
                port=self.config.where,
                consistent_samples=REBASE_AFTER,
            )
        telegram = build_telegram(reading, header=telegram_header(sample.sensor_id), zone=self.zone)
        for frame in self.assembler.feed(telegram, at):
            self._on_frame(frame)
            self.stats.samples += 1
            self.status.last_frame_at = at
        self._last_progress = asyncio.get_running_loop().time()
        self._link.forget()
        self._link.enter(MeterState.OK)
        self._report_rejects()

    def _date(self, sample: Sample, received_at: float) -> datetime:
        """The sample's own time; the daemon's clock while the sensor has none (logged once)."""
        if sample.timestamp is not None:
            if self._unsynchronized:
                self._unsynchronized = False
                self._log.info("the sensor's clock is synchronised again", port=self.config.where)
            return stateable(sample.timestamp, self.zone)
        if not self._unsynchronized:
            self._unsynchronized = True
            self._log.warning(
                "the sensor's clock is not synchronised (timestamp NOT_SYNCHRONIZED); dating "
                "its samples by this machine's clock",
                port=self.config.where,
            )
        return stateable(datetime.fromtimestamp(int(received_at), UTC), self.zone)

    def _count(self, exc: SampleError) -> None:
        reason = exc.reason.value
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        if exc.reason in GUARDED:
            self._last_rejection = exc
            self._report_rejects()

    def _report_rejects(self) -> None:
        """At most one warning a minute about samples a guard refused. Duplicates are normal and
        unusable answers are logged as a change of the link's state: both left out."""
        now = asyncio.get_running_loop().time()
        total = sum(self.stats.rejected.get(reason.value, 0) for reason in GUARDED)
        since = self._rejects.due(total, now)
        if since is None:
            return
        last = self._last_rejection
        self._log.warning(
            "samples rejected",
            port=self.config.where,
            since_last_report=since,
            total=self.rejected(),
            last_reason=last.reason.value if last else None,
            last_detail=str(last) if last else None,
        )

    def _stale_check(self) -> None:
        """Answers but nothing new for a while: say so, as the P1 reader does for garbage."""
        idle = asyncio.get_running_loop().time() - self._last_progress
        if self.status.state is MeterState.OK and idle > self._stale_after:
            self.status.failed(f"no new sample for {idle:.0f} s", self._wall())
            self._link.enter(MeterState.NO_VALID_FRAMES)
            self._log.warning(
                "the sensor answers but gives no new sample; see the rejected counts",
                port=self.config.where,
                reason=self.status.last_error,
                rejected=self.rejected(),
            )

    def _answered(self) -> None:
        self.status.last_byte_at = self._wall()
        if not self.status.connected:
            self._link.up()
            self._last_progress = asyncio.get_running_loop().time()

    def _unauthorized(self, status: int) -> None:
        if "Authorization" in self._headers:
            reason = (
                f"HTTP {status}: the sensor refused meter.username / meter.password; "
                "check them (the login of the sensor's local page)"
            )
        else:
            reason = (
                f"HTTP {status}: the sensor asks for a login; set meter.username and "
                "meter.password in the configuration"
            )
        self._link.failing(reason, MeterState.UNAUTHORIZED)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"


def _snippet(body: bytes) -> str:
    text = body[:80].decode("utf-8", "replace").strip()
    return repr(text) if text else "(empty body)"
