#!/usr/bin/env python3
"""Figures of ``dsmr-logger import`` per cloud, against the test fakes (``tests/cloud_fakes.py``).

Why: the import's cost is set by each cloud's rules, not by this machine: Climkit's 1 request a
second, Copper's 100 an hour and 1000 a day, Neurio's 144 an hour. This runs each import on a
virtual clock (the fakes enforce the rules against it, so the budgets bind as they would) into
the DSMR-reader test server already holding a few readings, and prints what a user would see at
the end: readings read, new ones, gaps filled, requests, the budget left, and the seconds the
import would take against the real cloud (virtual) next to the seconds it took here (real).

    python bench/imports.py [--days 30]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from cloud_fakes import (  # noqa: E402
    ClimkitFake,
    CopperFake,
    FakeCloud,
    NeurioFake,
    VirtualClock,
    climkit_series,
    copper_series,
    neurio_series,
)
from dsmr_reader_server import DsmrReaderServer, v2_reading  # noqa: E402

from dsmr_logger.config import Config, from_mapping  # noqa: E402
from dsmr_logger.imports.command import import_history  # noqa: E402

KEY = "bench-dsmr-reader-key"


def config(folder: Path, dsmr_url: str, zone: str, imports: dict[str, object]) -> Config:
    return from_mapping(
        {
            "meter": {"port": "/dev/null", "timezone": zone},
            "spool": {"path": str(folder / "spool.sqlite3")},
            "sink": [{"name": "home", "url": dsmr_url, "api_key": KEY, "api": "v2"}],
            "import": imports,
        }
    )


async def run(
    name: str,
    fake: FakeCloud,
    cfg: Config,
    since: datetime,
    until: datetime,
    clock: VirtualClock,
) -> None:
    out = io.StringIO()
    started_real, started_virtual = time.perf_counter(), clock.time()
    status = await import_history(
        name,
        cfg,
        sink="home",
        archive=None,
        since=since,
        until=until,
        out=out,
        clock=clock,
        draw=lambda: 0.5,
    )
    real = time.perf_counter() - started_real
    closing = next(line for line in out.getvalue().splitlines() if line.startswith("done:"))
    violations = fake.violations
    print(f"{name}: exit {status}; {closing}")
    print(
        f"{name}: {clock.time() - started_virtual:,.0f} s against the cloud's budget "
        f"(virtual), {real:.1f} s here; rules broken: {len(violations)}"
    )


async def climkit(days: int, folder: Path) -> None:
    zone = ZoneInfo("Europe/Zurich")
    first = date(2024, 3, 1)
    points = climkit_series(first, days + 1, zone, missing=lambda m: False)
    clock = VirtualClock(datetime(2024, 3, 1, tzinfo=UTC) + timedelta(days=days + 10))
    since = datetime.combine(first + timedelta(days=1), datetime.min.time(), zone)
    until = since + timedelta(days=days)
    meters = [{"id": "m1", "type": "electricity", "name": "main", "prim_ad": 1}]
    async with (
        ClimkitFake(
            clock,
            username="u",
            password="p",
            site="s",
            meters=meters,
            data={"m1": points},
            zone=zone,
        ) as fake,
        DsmrReaderServer(api_key=KEY) as dsmr,
    ):
        inside = [p for p in points if since <= p.at <= until]
        dsmr.readings.extend(v2_reading(p.at.isoformat()) for p in inside[500:600])
        cfg = config(
            folder / "climkit",
            dsmr.url,
            "Europe/Zurich",
            {
                "climkit": {
                    "username": "u",
                    "password": "p",
                    "site": "s",
                    "meter": "m1",
                    "base_url": fake.api_url,
                }
            },
        )
        await run("climkit", fake, cfg, since, until, clock)


async def copper(days: int, folder: Path) -> None:
    zone = ZoneInfo("Europe/Amsterdam")
    since = datetime(2024, 1, 1, tzinfo=zone)
    until = since + timedelta(days=days)
    electric = copper_series(
        since - timedelta(hours=2),
        until,
        timedelta(minutes=15),
        first=Decimal("1000.000"),
        rise=lambda i: Decimal(i % 90 + 10) / 1000,
    )
    gas = copper_series(
        since - timedelta(hours=2),
        until,
        timedelta(hours=1),
        first=Decimal("500.00"),
        rise=lambda i: Decimal(i % 4) / 100,
    )
    meters = [
        {"id": "e", "type": "power", "uom": "kwh", "created_at": "2023-01-01T00:00:00Z"},
        {"id": "g", "type": "gas", "uom": "ccf", "created_at": "2023-01-01T00:00:00Z"},
    ]
    clock = VirtualClock(until + timedelta(days=30))
    async with (
        CopperFake(
            clock,
            client_id="c",
            client_secret="s",
            enterprise="x",
            meters=meters,
            data={"e": electric, "g": gas},
        ) as fake,
        DsmrReaderServer(api_key=KEY) as dsmr,
    ):
        inside = [p for p in electric if since <= p.at <= until]
        dsmr.readings.extend(v2_reading(p.at.isoformat()) for p in inside[500:600])
        cfg = config(
            folder / "copper",
            dsmr.url,
            "Europe/Amsterdam",
            {
                "copper": {
                    "client_id": "c",
                    "client_secret": "s",
                    "enterprise_id": "x",
                    "meter": "e",
                    "gas_meter": "g",
                    "base_url": fake.api_url,
                    "auth_url": fake.auth_url,
                }
            },
        )
        await run("copper", fake, cfg, since, until, clock)


async def neurio(days: int, folder: Path) -> None:
    zone = ZoneInfo("Europe/Amsterdam")
    since = datetime(2024, 1, 1, tzinfo=zone)
    until = since + timedelta(days=days)
    samples = neurio_series(since, until)
    clock = VirtualClock(until + timedelta(days=30))
    async with (
        NeurioFake(clock, client_id="c", client_secret="s", sensor="0x01", samples=samples) as fake,
        DsmrReaderServer(api_key=KEY) as dsmr,
    ):
        dsmr.readings.extend(v2_reading(s.at.isoformat()) for s in samples[500:600])
        cfg = config(
            folder / "neurio",
            dsmr.url,
            "Europe/Amsterdam",
            {
                "neurio": {
                    "client_id": "c",
                    "client_secret": "s",
                    "sensor_id": "0x01",
                    "base_url": fake.api_url,
                }
            },
        )
        await run("neurio", fake, cfg, since, until, clock)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=30, help="days of history per cloud")
    parser.add_argument("--only", choices=("climkit", "copper", "neurio"), help="one cloud")
    args = parser.parse_args()
    benches = {"climkit": climkit, "copper": copper, "neurio": neurio}
    with tempfile.TemporaryDirectory() as folder:
        for name, bench in benches.items():
            if args.only in (None, name):
                await bench(args.days, Path(folder))


if __name__ == "__main__":
    asyncio.run(main())
