"""One ``backfill`` and one ``import`` at a time beside a spool.

Two runs of the same command share a progress file (an import also its clouds' request budgets
and cached answers); run together, each rewrote what the other had saved. The second run now
stops before it sends or asks anything, with one line; the first is not disturbed, and once it
is done the same command runs (and has nothing left to do).
"""

from __future__ import annotations

import asyncio
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

from aiohttp import web
from cli_process import dsmr_logger, one_clear_line
from cloud_fakes import (
    CopperFake,
    RealClock,
)
from dsmr_reader_server import DsmrReaderServer
from test_backfill import KEY, archive, capture, write_config
from test_import_copper import (
    CLIENT_ID,
    ELECTRIC,
    ENTERPRISE,
    GAS,
    METERS,
    SECRET,
    WEEK_END,
    WEEK_START,
    electric_week,
    gas_week,
)
from waiting import wait_until


async def test_a_second_backfill_beside_a_running_one_stops_at_once(tmp_path: Path) -> None:
    folder = archive(tmp_path, capture()[:40])
    async with DsmrReaderServer(api_key=KEY, hang_outcome="process") as server:
        config = write_config(tmp_path, server.url, api="v1")
        command = ["backfill", "--config", config, "--from", folder, "--sink", "home"]
        server.mode = "hang"
        first = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dsmr_logger", *map(str, command), stdout=PIPE, stderr=PIPE
        )
        try:
            await wait_until(lambda: server.hanging > 0, "the first backfill's post held", 60)
            asked = server.requests

            second = await asyncio.to_thread(dsmr_logger, *command)
            assert second.returncode == 1
            one_clear_line(second, "another `dsmr-logger backfill` is running", "backfill.lock")
            assert server.requests == asked, "the second run sent nothing"

            server.mode = "ok"
            _, errors = await asyncio.wait_for(first.communicate(), 60)
            assert first.returncode == 0, errors
        finally:
            if first.returncode is None:
                first.kill()
                await first.wait()
        assert len(server.received) == 40

        again = await asyncio.to_thread(dsmr_logger, *command)
        assert again.returncode == 0, again.stderr
        assert len(server.received) == 40, "the finished request is not sent again"


async def test_a_second_import_beside_a_running_one_spends_no_budget(tmp_path: Path) -> None:
    class Holding(CopperFake):
        """Holds the first readings request until released."""

        holding = asyncio.Event()
        release = asyncio.Event()

        async def _readings(self, request: web.Request) -> web.Response:
            if not self.release.is_set():
                self.holding.set()
                await self.release.wait()
            return await super()._readings(request)

    points = electric_week()
    fake = Holding(
        RealClock(),
        client_id=CLIENT_ID,
        client_secret=SECRET,
        enterprise=ENTERPRISE,
        meters=METERS,
        data={ELECTRIC: points, GAS: gas_week()},
    )
    async with fake:
        config = tmp_path / "config.toml"
        config.write_text(
            '[meter]\nport = "/dev/null"\ntimezone = "Europe/Amsterdam"\n'
            f'[spool]\npath = "{tmp_path / "state" / "spool.sqlite3"}"\n'
            f'[import.copper]\nclient_id = "{CLIENT_ID}"\nclient_secret = "{SECRET}"\n'
            f'enterprise_id = "{ENTERPRISE}"\nmeter = "{ELECTRIC}"\ngas_meter = "{GAS}"\n'
            f'base_url = "{fake.api_url}"\nauth_url = "{fake.auth_url}"\n'
        )
        command = [
            *("import", "copper", "--config", str(config)),
            *("--to-archive", str(tmp_path / "archive")),
            *("--since", WEEK_START.isoformat(), "--until", WEEK_END.isoformat()),
        ]
        first = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dsmr_logger", *command, stdout=PIPE, stderr=PIPE
        )
        try:
            await wait_until(fake.holding.is_set, "the first import's request held", timeout=60)
            spent = len(fake.history)

            second = await asyncio.to_thread(dsmr_logger, *command)
            assert second.returncode == 1
            one_clear_line(second, "another `dsmr-logger import` is running")
            assert SECRET not in second.stderr
            assert len(fake.history) == spent, "the second run asked the cloud nothing"

            fake.release.set()
            _, errors = await asyncio.wait_for(first.communicate(), 120)
            assert first.returncode == 0, errors
        finally:
            if first.returncode is None:
                first.kill()
                await first.wait()
        assert fake.violations == []
        written = sorted(p.name for p in (tmp_path / "archive").iterdir())
        assert written, "the first import wrote its day files"
