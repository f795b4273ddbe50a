"""``dsmr-logger import copper``: Copper Labs readings (and gas) into DSMR-reader, within budget.

Against ``CopperFake``: OAuth2 client credentials, 100 requests an hour and 1000 a day (sliding,
counted across runs; 429 past them is a violation), and ``Cache-Control: max-age`` on every
answer (a fresh resource fetched again is a violation). A virtual clock runs the budgets: the
hours this file waits pass in no real time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cloud_fakes import CopperFake, CopperPoint, RealClock, VirtualClock, copper_series
from dsmr_reader_server import DsmrReaderServer, v2_reading
from waiting import wait_until

from dsmr_logger import cli
from dsmr_logger.config import Config, from_mapping
from dsmr_logger.imports.cloud import CloudConfigError
from dsmr_logger.imports.command import import_history
from dsmr_logger.imports.copper import CopperCloud, window_days
from dsmr_logger.imports.run import state_directory
from dsmr_logger.imports.series import Window
from dsmr_logger.tools import backfill
from dsmr_logger.tools.backfill import StreamStats, in_window, source_files

ZONE = ZoneInfo("Europe/Amsterdam")
KEY = "dsmr-reader-key-copper-test"
CLIENT_ID, SECRET = "copper-client-1", "copper-secret-Qv93kd!"
ENTERPRISE = "ent-42"
ELECTRIC, GAS = "elec:0x0000c47f51", "gas:0x0000c47f52"
METERS = [
    {"id": ELECTRIC, "type": "power", "uom": "kwh", "created_at": "2024-02-01T00:00:00Z"},
    {"id": GAS, "type": "gas", "uom": "ccf", "created_at": "2024-02-01T00:00:00Z"},
    {"id": "water:0x09", "type": "water", "uom": "gal", "created_at": "2024-02-01T00:00:00Z"},
]
WEEK_START = datetime(2024, 2, 5, tzinfo=ZONE)
WEEK_END = datetime(2024, 2, 12, tzinfo=ZONE)


def electric_week() -> list[CopperPoint]:
    return copper_series(
        WEEK_START - timedelta(hours=2),
        WEEK_END,
        timedelta(minutes=15),
        first=Decimal("4321.125"),
        rise=lambda i: Decimal((i * 29) % 180 + 5) / 1000,
    )


def gas_week() -> list[CopperPoint]:
    points = copper_series(
        WEEK_START - timedelta(hours=2),
        WEEK_END,
        timedelta(hours=1),
        first=Decimal("812.34"),
        rise=lambda i: Decimal(i % 5) / 100,
    )
    return [CopperPoint(p.at, p.value, p.actual) for p in points]


def make_config(tmp_path: Path, fake: CopperFake, dsmr_url: str = "http://127.0.0.1:9") -> Config:
    return from_mapping(
        {
            "meter": {"port": "/dev/null", "timezone": "Europe/Amsterdam"},
            "spool": {"path": str(tmp_path / "state" / "spool.sqlite3")},
            "sink": [
                {
                    "name": "home",
                    "url": dsmr_url,
                    "api_key": KEY,
                    "api": "v2",
                    "timeout": 5.0,
                    "retry_max": 0.2,
                }
            ],
            "import": {
                "copper": {
                    "client_id": CLIENT_ID,
                    "client_secret": SECRET,
                    "enterprise_id": ENTERPRISE,
                    "meter": ELECTRIC,
                    "gas_meter": GAS,
                    "base_url": fake.api_url,
                    "auth_url": fake.auth_url,
                    "timeout": 5.0,
                }
            },
        }
    )


def copper(clock: VirtualClock, data: dict[str, list[CopperPoint]], **options: Any) -> CopperFake:
    return CopperFake(
        clock,
        client_id=CLIENT_ID,
        client_secret=SECRET,
        enterprise=ENTERPRISE,
        meters=METERS,
        data=data,
        **options,
    )


def three(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.001"), ROUND_HALF_UP)


def expected(points: list[CopperPoint], gas: list[CopperPoint], i: int) -> dict[str, Any]:
    point, before = points[i], points[i - 1]
    hours = Decimal(int((point.at - before.at).total_seconds())) / 3600
    latest_gas = max((g for g in gas if g.at <= point.at), key=lambda g: g.at)
    return {
        "timestamp": point.at,
        "electricity_delivered_1": point.value,
        "electricity_returned_1": Decimal(0),
        "electricity_delivered_2": Decimal(0),
        "electricity_currently_delivered": three((point.value - before.value) / hours),
        "extra_device_delivered": three(latest_gas.actual * Decimal("2.8316846592")),
        "extra_device_timestamp": latest_gas.at,
    }


def received(reading: dict[str, str]) -> dict[str, Any]:
    wanted = (
        "electricity_delivered_1",
        "electricity_returned_1",
        "electricity_delivered_2",
        "electricity_currently_delivered",
        "extra_device_delivered",
    )
    shown: dict[str, Any] = {k: Decimal(reading[k]) for k in wanted}
    shown["timestamp"] = datetime.fromisoformat(reading["timestamp"])
    shown["extra_device_timestamp"] = datetime.fromisoformat(reading["extra_device_timestamp"])
    return shown


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_a_week_into_dsmr_reader_every_reading_once_in_order_values_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    points, gas = electric_week(), gas_week()
    clock = VirtualClock(datetime(2024, 3, 1, 9, tzinfo=UTC))
    wanted = [i for i, p in enumerate(points) if WEEK_START <= p.at <= WEEK_END]
    held = set(wanted[100:150]) | {wanted[3], wanted[-1]}
    async with (
        copper(clock, {ELECTRIC: points, GAS: gas}) as fake,
        DsmrReaderServer(api_key=KEY) as dsmr,
    ):
        dsmr.readings.extend(v2_reading(points[i].at.isoformat()) for i in sorted(held))
        config = make_config(tmp_path, fake, dsmr.url)
        out = Terminal()
        status = await import_history(
            "copper",
            config,
            sink="home",
            archive=None,
            since=WEEK_START,
            until=WEEK_END,
            out=out,
            clock=clock,
            draw=lambda: 0.5,
        )
        text = out.getvalue()
        assert status == 0, text
        sent = [received(r) for r in dsmr.readings[len(held) :]]
        assert sent == [expected(points, gas, i) for i in wanted if i not in held]
        assert fake.violations == []
        assert "\r[" in text and "ETA" in text  # a bar redrawn in place on a terminal
        assert "budget left" in text and "next request" in text
        assert f"{len(wanted) - len(held)} new" in text
        # One token, the meter list, then one request per meter per day (7 days: daily windows).
        assert fake.token_requests == 1 and len(fake.history) == 1 + 2 * 7
    everything = text + "".join(capsys.readouterr())
    for secret in (SECRET, KEY, *fake.issued):
        assert secret not in everything


async def test_interrupted_import_resumes_from_the_cache_sending_nothing_twice(
    tmp_path: Path,
) -> None:
    points, gas = electric_week(), gas_week()
    clock = VirtualClock(datetime(2024, 3, 1, 9, tzinfo=UTC))
    async with (
        copper(clock, {ELECTRIC: points, GAS: gas}) as fake,
        DsmrReaderServer(api_key=KEY) as dsmr,
    ):
        dsmr.delay = 0.002  # slow enough to stop it in the middle of a day's window
        config = make_config(tmp_path, fake, dsmr.url)
        run = asyncio.create_task(
            import_history(
                "copper",
                config,
                sink="home",
                archive=None,
                since=WEEK_START,
                until=WEEK_END,
                out=io.StringIO(),
                clock=clock,
            )
        )
        await wait_until(lambda: len(dsmr.readings) >= 96 * 2 + 40, "two and a half days sent")
        run.cancel()  # what Ctrl-C does to asyncio.run's task
        with pytest.raises(asyncio.CancelledError):
            await run
        interrupted_at = len(dsmr.readings)
        assert interrupted_at < 96 * 7
        last = datetime.fromisoformat(dsmr.readings[-1]["timestamp"]).astimezone(ZONE)
        assert (last.hour, last.minute) != (0, 0), "stopped between windows, not in one"
        fetched = dict(fake.fetches)

        dsmr.delay = 0.0
        out = io.StringIO()
        status = await import_history(
            "copper",
            config,
            sink="home",
            archive=None,
            since=WEEK_START,
            until=WEEK_END,
            out=out,
            clock=clock,
        )
        assert status == 0, out.getvalue()
        assert "resuming after" in out.getvalue()
    stamps = [datetime.fromisoformat(r["timestamp"]) for r in dsmr.readings]
    assert stamps == sorted(set(stamps)), "a reading twice or out of order"
    assert stamps == [p.at for p in points if WEEK_START <= p.at <= WEEK_END]
    # The window in hand and the meter list were still fresh: read from the cache, not fetched.
    assert fake.violations == [] and fake.refetched_while_fresh == []
    assert all(count == 1 for count in fake.fetches.values())
    assert len(fake.fetches) > len(fetched)


async def test_the_hourly_budget_is_remembered_by_the_next_run(tmp_path: Path) -> None:
    """Two imports one after the other: the second finds most of the hour spent by the first,
    waits for the hour to free up instead of running into 429s, and says when it will go on;
    its token expires meanwhile and is renewed ahead of use."""
    start = datetime(2023, 6, 1, tzinfo=ZONE)
    hourly = copper_series(
        start - timedelta(hours=1),
        start + timedelta(days=160),
        timedelta(hours=1),
        first=Decimal(100),
        rise=lambda i: Decimal(i % 9) / 10,
    )
    gas = copper_series(
        start - timedelta(hours=1),
        start + timedelta(days=160),
        timedelta(hours=6),
        first=Decimal(10),
        rise=lambda i: Decimal(1) / 100,
    )
    clock = VirtualClock(datetime(2024, 3, 1, 9, tzinfo=UTC))
    async with copper(clock, {ELECTRIC: hourly, GAS: gas}, token_ttl=1800) as fake:
        config = make_config(tmp_path, fake)
        first = io.StringIO()
        begun = clock.time()
        await import_history(
            "copper",
            config,
            sink=None,
            archive=tmp_path / "a",
            since=start,
            until=start + timedelta(days=80),
            out=first,
            clock=clock,
        )
        spent = len(fake.history)
        assert 60 < spent <= 100, first.getvalue()  # windows sized to fit one hour
        second = io.StringIO()
        await import_history(
            "copper",
            config,
            sink=None,
            archive=tmp_path / "b",
            since=start + timedelta(days=80),
            until=start + timedelta(days=160),
            out=second,
            clock=clock,
        )
        assert fake.violations == []
        assert clock.time() - begun > 3600 - 60  # it waited for the first run's hour to end
        assert "next request at" in second.getvalue()
        # Half-hour tokens: the second run's first one ran out while it waited, and was
        # renewed before use (an expired token reaching the fake would be a violation).
        assert fake.token_requests == 3 and fake.unauthorised == 0
    every = [p.at for p in hourly if start <= p.at <= start + timedelta(days=160)]
    zone = ZONE
    imported = sorted(  # the instant both runs name (--until, then --since) is in both folders
        {
            r.timestamp
            for folder in ("a", "b")
            for r in in_window(
                source_files(tmp_path / folder), zone, backfill.Window(None, None), StreamStats()
            )
            if r.timestamp
        }
    )
    assert imported == every


async def test_the_daily_budget_holds_across_runs(tmp_path: Path) -> None:
    """1100 requests of distinct windows, in two runs of fresh clients sharing the state
    folder: the 1001st waits until the day's first request is 24 hours old."""
    clock = VirtualClock(datetime(2024, 3, 1, 9, tzinfo=UTC))
    base = datetime(2020, 1, 1, tzinfo=UTC)
    async with copper(clock, {ELECTRIC: [], GAS: []}) as fake:
        config = make_config(tmp_path, fake)
        assert config.imports.copper is not None
        section = dataclasses.replace(config.imports.copper, gas_meter=None)
        begun = clock.time()
        for first, count in ((0, 600), (600, 500)):
            cloud = CopperCloud(
                section, zone=ZONE, clock=clock, state_directory=state_directory(config)
            )
            try:
                for n in range(first, first + count):
                    day = base + timedelta(days=n)
                    await cloud.readings(Window(day, day + timedelta(days=1)), {})
            finally:
                await cloud.close()
        assert fake.violations == []
        assert len(fake.history) == 1100
        assert clock.time() - begun >= 86400  # the day's 1000 could not all go in 11 hours


async def test_a_wrong_secret_or_meter_is_a_configuration_error(tmp_path: Path) -> None:
    clock = VirtualClock(datetime(2024, 3, 1, 9, tzinfo=UTC))
    async with copper(clock, {}) as fake:
        config = make_config(tmp_path, fake)
        wrong = from_mapping(
            {
                **_raw(config, fake),
                "import": {"copper": {**_section(fake), "client_secret": "nope"}},
            }
        )
        with pytest.raises(CloudConfigError, match="client_id/client_secret") as refused:
            await import_history(
                "copper",
                wrong,
                sink="home",
                archive=None,
                since=WEEK_START,
                until=WEEK_END,
                out=io.StringIO(),
                clock=clock,
            )
        assert "nope" not in str(refused.value)
        water = from_mapping(
            {**_raw(config, fake), "import": {"copper": {**_section(fake), "meter": "water:0x09"}}}
        )
        with pytest.raises(CloudConfigError, match="'water' meter, not electric") as kind:
            await import_history(
                "copper",
                water,
                sink="home",
                archive=None,
                since=WEEK_START,
                until=WEEK_END,
                out=io.StringIO(),
                clock=clock,
            )
        assert ELECTRIC in str(kind.value)  # the meters are listed
        assert fake.violations == []


def _section(fake: CopperFake) -> dict[str, Any]:
    return {
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "enterprise_id": ENTERPRISE,
        "meter": ELECTRIC,
        "base_url": fake.api_url,
        "auth_url": fake.auth_url,
    }


def _raw(config: Config, fake: CopperFake) -> dict[str, Any]:
    return {
        "meter": {"port": "/dev/null"},
        "spool": {"path": str(config.spool.path)},
        "sink": [{"name": "home", "url": "http://127.0.0.1:9", "api_key": KEY}],
    }


def test_windows_widen_so_a_long_import_fits_the_hourly_budget() -> None:
    assert window_days(7, 2) == 1  # a week: a request per meter per day
    assert window_days(45, 2) == 1
    assert window_days(80, 2) == 2
    assert window_days(365, 1) == 5
    assert window_days(3650, 2) == 7  # never more than a week per request


async def test_a_dsmr_reader_refusing_the_key_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the command line (in a thread: it runs its own event loop, the fakes this one)."""
    points, gas = electric_week(), gas_week()
    async with (
        copper(RealClock(), {ELECTRIC: points, GAS: gas}) as fake,
        DsmrReaderServer(api_key="not-the-key-in-the-config") as dsmr,
    ):
        path = tmp_path / "config.toml"
        path.write_text(
            f'[meter]\nport = "/dev/null"\n[spool]\npath = "{tmp_path / "spool.sqlite3"}"\n'
            f'[[sink]]\nname = "home"\nurl = "{dsmr.url}"\napi_key = "{KEY}"\n'
            f'[import.copper]\nclient_id = "{CLIENT_ID}"\nclient_secret = "{SECRET}"\n'
            f'enterprise_id = "{ENTERPRISE}"\nmeter = "{ELECTRIC}"\n'
            f'base_url = "{fake.api_url}"\nauth_url = "{fake.auth_url}"\n'
        )
        status = await asyncio.to_thread(
            cli.main,
            [
                "import",
                "copper",
                "--config",
                str(path),
                "--sink",
                "home",
                "--since",
                WEEK_START.isoformat(),
                "--until",
                WEEK_END.isoformat(),
            ],
        )
        assert fake.violations == []
    assert status == 2
    err = capsys.readouterr().err
    assert "dsmr-logger: import: listing stored readings failed: HTTP 403" in err
    assert "Traceback" not in err and KEY not in err and SECRET not in err
