"""``dsmr-logger import neurio``: a Neurio sensor's 5-minute history into DSMR-reader.

Against ``NeurioFake``: client-credentials tokens, 144 authorised requests an hour with
``RateLimit-*`` headers counting down (429 past them is a violation), ``/samples`` paged and at
most one day per request (400 with the document's error body past that). The week imported
holds the autumn DST change: a 25-hour local day, which must go out as two requests.
"""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cloud_fakes import NEURIO_RANGE_ERROR, NeurioFake, NeurioSample, VirtualClock, neurio_series
from dsmr_reader_server import DsmrReaderServer, v2_reading
from waiting import wait_until

from dsmr_logger.config import Config, DsmrReaderSinkConfig, from_mapping
from dsmr_logger.imports.cloud import CloudError
from dsmr_logger.imports.neurio import NeurioCloud
from dsmr_logger.imports.run import DsmrReaderTarget, run_import, state_directory
from dsmr_logger.imports.series import Window

ZONE = ZoneInfo("Europe/Amsterdam")
KEY = "dsmr-reader-key-neurio-test"
CLIENT_ID, SECRET = "BVlMq9azS7abZyq2wc1gnA", "neurio-secret-XXXXrrXXXXzZZZoZZZZ"
SENSOR = "0x0000C47F510179FE"
START = datetime(2024, 10, 24, tzinfo=ZONE)
END = datetime(2024, 10, 31, tzinfo=ZONE)  # 27 October has 25 hours


def make_config(tmp_path: Path, fake: NeurioFake, dsmr_url: str) -> Config:
    return from_mapping(
        {
            "meter": {"port": "/dev/null"},
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
                "neurio": {
                    "client_id": CLIENT_ID,
                    "client_secret": SECRET,
                    "sensor_id": SENSOR,
                    "base_url": fake.api_url,
                    "timeout": 5.0,
                }
            },
        }
    )


def neurio(clock: VirtualClock, samples: list[NeurioSample], **options: Any) -> NeurioFake:
    return NeurioFake(
        clock, client_id=CLIENT_ID, client_secret=SECRET, sensor=SENSOR, samples=samples, **options
    )


async def imported(
    config: Config, clock: VirtualClock, out: io.StringIO, *, per_page: int, until: datetime = END
) -> int:
    section = config.imports.neurio
    assert section is not None
    cloud = NeurioCloud(
        section,
        zone=ZONE,
        clock=clock,
        draw=lambda: 0.5,
        state_directory=state_directory(config),
        per_page=per_page,
        notify=lambda text: print(text, file=out),
    )
    target = DsmrReaderTarget(config, sink(config), ZONE, out)
    try:
        return await run_import(
            cloud,
            target,
            zone=ZONE,
            progress_file=state_directory(config) / "progress.json",
            since=START,
            until=until,
            clock=clock,
            out=out,
        )
    finally:
        await cloud.close()


def sink(config: Config) -> DsmrReaderSinkConfig:
    found = config.sinks[0]
    assert isinstance(found, DsmrReaderSinkConfig)
    return found


def three(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.001"), ROUND_HALF_UP)


def expected(sample: NeurioSample) -> dict[str, Any]:
    return {
        "timestamp": sample.at,
        "electricity_delivered_1": three(Decimal(sample.consumption_ws) / 3_600_000),
        "electricity_returned_1": three(Decimal(sample.generation_ws) / 3_600_000),
        "electricity_currently_delivered": three(Decimal(sample.consumption_w) / 1000),
        "electricity_currently_returned": three(Decimal(sample.generation_w) / 1000),
    }


def received(reading: dict[str, str]) -> dict[str, Any]:
    shown: dict[str, Any] = {
        k: Decimal(reading[k])
        for k in (
            "electricity_delivered_1",
            "electricity_returned_1",
            "electricity_currently_delivered",
            "electricity_currently_returned",
        )
    }
    shown["timestamp"] = datetime.fromisoformat(reading["timestamp"])
    return shown


async def test_a_week_with_pages_and_the_hourly_budget_every_reading_once_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """12 samples a page: 25 requests a day, about 200 for the week, more than 144 an hour: the
    client pauses when the headers say the budget is spent, and never gets a 429."""
    samples = neurio_series(START - timedelta(hours=1), END + timedelta(hours=1))
    wanted = [s for s in samples if START <= s.at <= END]
    held = {wanted[0].at, *[s.at for s in wanted[500:520]], wanted[-1].at}
    clock = VirtualClock(datetime(2024, 11, 20, 8, tzinfo=UTC))
    async with neurio(clock, samples) as fake, DsmrReaderServer(api_key=KEY) as dsmr:
        dsmr.readings.extend(v2_reading(t.isoformat()) for t in sorted(held))
        config = make_config(tmp_path, fake, dsmr.url)
        out = io.StringIO()
        begun = clock.time()
        status = await imported(config, clock, out, per_page=12)
        text = out.getvalue()
        assert status == 0, text
        assert [received(r) for r in dsmr.readings[len(held) :]] == [
            expected(s) for s in wanted if s.at not in held
        ]
        assert fake.violations == []
        assert fake.unauthorised == 0
        # RateLimit-Remaining counted down to 0, then a new hour began (the client waited).
        assert fake.remaining_seen[:3] == [143, 142, 141] and 0 in fake.remaining_seen
        assert fake.remaining_seen.index(0) == 143
        assert fake.remaining_seen[144] == 143
        assert clock.time() - begun >= 3600
        assert "next request at" in text
        assert len(fake.issued) == 2  # the hour-long token was renewed across the wait
        # 288 samples a day: 24 full pages, and a 25th, empty, that says there is no more.
        assert max(page for _, page in fake.pages) == 25
        assert "\r" not in text  # plain lines when not on a terminal
    everything = text + "".join(capsys.readouterr())
    for secret in (SECRET, KEY, *fake.issued):
        assert secret not in everything


async def test_the_25_hour_autumn_day_is_asked_for_in_two_requests(tmp_path: Path) -> None:
    samples = neurio_series(START, END)
    clock = VirtualClock(datetime(2024, 11, 20, 8, tzinfo=UTC))
    async with neurio(clock, samples) as fake, DsmrReaderServer(api_key=KEY) as dsmr:
        config = make_config(tmp_path, fake, dsmr.url)
        assert await imported(config, clock, io.StringIO(), per_page=500) == 0
        assert fake.violations == []
        starts = [start for start, page in fake.pages]
        assert len(starts) == 8  # seven days, one of them in two
        assert len(dsmr.readings) == 7 * 288 + 12
    stamps = [datetime.fromisoformat(r["timestamp"]) for r in dsmr.readings]
    assert stamps == [s.at for s in samples if s.at >= START]


async def test_an_interrupted_import_resumes_and_sends_nothing_twice(tmp_path: Path) -> None:
    until = START + timedelta(days=3)
    samples = neurio_series(START, until)
    clock = VirtualClock(datetime(2024, 11, 20, 8, tzinfo=UTC))
    async with neurio(clock, samples) as fake, DsmrReaderServer(api_key=KEY) as dsmr:
        dsmr.delay = 0.002
        config = make_config(tmp_path, fake, dsmr.url)
        run = asyncio.create_task(imported(config, clock, io.StringIO(), per_page=100, until=until))
        await wait_until(lambda: len(dsmr.readings) >= 288 + 100, "a day and more")
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        dsmr.delay = 0.0
        out = io.StringIO()
        assert await imported(config, clock, out, per_page=100, until=until) == 0
        assert "resuming after" in out.getvalue()
        assert fake.violations == []
    stamps = [datetime.fromisoformat(r["timestamp"]) for r in dsmr.readings]
    assert stamps == sorted(set(stamps))
    assert stamps == [s.at for s in samples if s.at >= START]


async def test_the_servers_ratelimit_headers_are_obeyed_below_the_documented_144(
    tmp_path: Path,
) -> None:
    """A server announcing a smaller budget (RateLimit-Limit: 30) is obeyed: the client pauses
    until RateLimit-Reset when Remaining reaches 0, though its own 144/hour would allow more."""
    samples = neurio_series(START, START + timedelta(days=2))
    clock = VirtualClock(datetime(2024, 11, 20, 8, tzinfo=UTC))
    async with neurio(clock, samples) as fake, DsmrReaderServer(api_key=KEY) as dsmr:
        fake.LIMIT = 30
        config = make_config(tmp_path, fake, dsmr.url)
        begun = clock.time()
        out = io.StringIO()
        section = config.imports.neurio
        assert section is not None
        cloud = NeurioCloud(
            section, zone=ZONE, clock=clock, state_directory=state_directory(config), per_page=12
        )
        target = DsmrReaderTarget(config, sink(config), ZONE, out)
        try:
            status = await run_import(
                cloud,
                target,
                zone=ZONE,
                progress_file=tmp_path / "progress.json",
                since=START,
                until=START + timedelta(days=2),
                clock=clock,
                out=out,
            )
        finally:
            await cloud.close()
        assert status == 0
        assert fake.violations == []
        assert len(dsmr.readings) == 2 * 288
        assert clock.time() - begun >= 3600  # 51 requests at 30 an hour: it waited an hour


async def test_its_400_error_body_reaches_the_user_as_sent(tmp_path: Path) -> None:
    """A window longer than the document's day (never asked by the import itself) gets the
    documented 400 body, shown word for word."""
    clock = VirtualClock(datetime(2024, 11, 20, 8, tzinfo=UTC))
    async with neurio(clock, []) as fake:
        config = make_config(tmp_path, fake, "http://127.0.0.1:9")
        assert config.imports.neurio is not None
        cloud = NeurioCloud(
            config.imports.neurio, zone=ZONE, clock=clock, state_directory=state_directory(config)
        )
        try:
            with pytest.raises(CloudError) as raised:
                await cloud.readings(Window(START, START + timedelta(days=2)), {})
        finally:
            await cloud.close()
        assert json.dumps(NEURIO_RANGE_ERROR) in str(raised.value)
        assert "HTTP 400" in str(raised.value) and "GET /samples?" in str(raised.value)
        assert len(fake.violations) == 1 and "more than a day" in fake.violations[0]
