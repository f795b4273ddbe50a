"""Attacks on ``dsmr-logger import``: what a failing disk, a moving clock or a late cloud does.

Each test sets up one hostile condition against the documented fakes (``cloud_fakes``) and the
project's DSMR-reader test server, and checks the promise the import makes: every reading once,
nothing skipped, the cloud's rules kept, one clear line when it cannot go on.
"""

from __future__ import annotations

import asyncio
import io
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from cli_process import dsmr_logger, one_clear_line
from cloud_fakes import (
    ClimkitFake,
    CopperFake,
    NeurioFake,
    RealClock,
    VirtualClock,
    neurio_series,
)
from dsmr_reader_server import DsmrReaderServer
from test_import_climkit import (
    KEY,
    METER,
    METERS,
    PASSWORD,
    SITE,
    USER,
    ZONE,
    climkit,
    make_config,
    spring_series,
)
from test_import_copper import CLIENT_ID as COPPER_ID
from test_import_copper import ELECTRIC, ENTERPRISE, GAS, WEEK_END, WEEK_START
from test_import_copper import KEY as COPPER_KEY
from test_import_copper import METERS as COPPER_METERS
from test_import_copper import SECRET as COPPER_SECRET
from test_import_copper import ZONE as ZONE_NL
from test_import_copper import electric_week as copper_week
from test_import_copper import gas_week as copper_gas_week
from test_import_copper import make_config as copper_config
from test_import_garbage import VALID
from test_import_garbage import config_file as garbage_config
from test_import_neurio import CLIENT_ID as NEURIO_ID
from test_import_neurio import KEY as NEURIO_KEY
from test_import_neurio import SECRET as NEURIO_SECRET
from test_import_neurio import SENSOR
from test_import_neurio import START as NEURIO_START
from test_import_neurio import imported as neurio_imported
from test_import_neurio import make_config as neurio_config
from waiting import wait_until

from dsmr_logger.imports.cloud import CloudError
from dsmr_logger.imports.command import import_history
from dsmr_logger.telegram.capture import frames_in, read_capture
from dsmr_logger.tools.backfill import meter_time


async def test_an_archive_day_that_cannot_be_written_leaves_the_others_written_once(
    tmp_path: Path,
) -> None:
    """A window's telegrams land in two day files (its last slot, 00:00, is the next day's);
    when the second cannot be written the import stops, and the first holds each telegram
    once, not once more for the retry on the way out. The rerun completes, still once each."""
    points = spring_series()
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    since, until = datetime(2024, 3, 29, tzinfo=ZONE), datetime(2024, 3, 30, tzinfo=ZONE)
    wanted = [p.at for p in points if since <= p.at <= until]
    folder = tmp_path / "archive"
    blocker = folder / "2024-03-30.log"
    blocker.mkdir(parents=True)  # not a file: writing the day fails
    async with climkit(clock, points) as fake:
        config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")

        async def run() -> int:
            return await import_history(
                "climkit",
                config,
                sink=None,
                archive=folder,
                since=since,
                until=until,
                out=io.StringIO(),
                clock=clock,
            )

        with pytest.raises(CloudError, match=r"2024-03-30\.log"):
            await run()
        first_day = [
            meter_time(t, ZONE) for t in frames_in(read_capture(folder / "2024-03-29.log"))
        ]
        assert first_day == wanted[:-1], "a telegram written twice (or lost)"

        blocker.rmdir()
        assert await run() == 0
        assert fake.violations == []
    written = [
        meter_time(t, ZONE)
        for day in ("2024-03-29", "2024-03-30")
        for t in frames_in(read_capture(folder / f"{day}.log"))
    ]
    assert written == wanted


class SkewedClock:
    """The client's wall clock: the server's plus ``offset`` (set back when NTP steps it)."""

    def __init__(self, base: VirtualClock) -> None:
        self.base = base
        self.offset = 0.0

    def time(self) -> float:
        return self.base.time() + self.offset

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)


async def test_a_clock_set_back_an_hour_mid_import_does_not_stall_it(tmp_path: Path) -> None:
    """NTP steps the Pi's clock back an hour after the second day's request: the requests made
    are as old as they were, so the import goes on at one a second instead of waiting for the
    hour to come round again (the server's clock never moved, and the fake checks its 1/s)."""
    points = spring_series()
    server_clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    clock = SkewedClock(server_clock)
    since, until = datetime(2024, 3, 29, tzinfo=ZONE), datetime(2024, 4, 3, tzinfo=ZONE)

    class SteppedBack(ClimkitFake):
        async def _data(self, request: web.Request) -> web.Response:
            if self.data_requests == 2:
                clock.offset = -3600.0
            return await super()._data(request)

    fake = SteppedBack(
        server_clock,
        username=USER,
        password=PASSWORD,
        site=SITE,
        meters=METERS,
        data={METER: points},
        zone=ZONE,
    )
    started = server_clock.time()
    async with fake:
        config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")
        status = await import_history(
            "climkit",
            config,
            sink=None,
            archive=tmp_path / "archive",
            since=since,
            until=until,
            out=io.StringIO(),
            clock=clock,
        )
        assert status == 0
        assert clock.offset == -3600.0, "the clock was not set back: the test proves nothing"
        assert fake.violations == []
        assert len(fake.windows) == 6
    # Nine requests at one a second: well under a minute of the server's time, not an hour.
    assert server_clock.time() - started < 60


async def test_a_client_clock_behind_the_servers_still_renews_the_token_in_time(
    tmp_path: Path,
) -> None:
    """The Pi's clock is an hour behind Climkit's: the token's ``valid_until`` then looks 75
    minutes away. Climkit's tokens live 15 minutes (its document), so the client renews within
    those and never sends an expired token (the fake flags one), through a run of 20 minutes
    (each day's answer is followed by two and a half minutes elsewhere)."""
    points = spring_series()
    server_clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    clock = SkewedClock(server_clock)
    clock.offset = -3600.0

    class Slow(ClimkitFake):
        async def _data(self, request: web.Request) -> web.Response:
            answer = await super()._data(request)
            server_clock.now += 150.0  # two and a half minutes to the next day's request
            return answer

    fake = Slow(
        server_clock,
        username=USER,
        password=PASSWORD,
        site=SITE,
        meters=METERS,
        data={METER: points},
        zone=ZONE,
    )
    started = server_clock.time()
    async with fake:
        config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")
        status = await import_history(
            "climkit",
            config,
            sink=None,
            archive=tmp_path / "archive",
            since=datetime(2024, 3, 28, tzinfo=ZONE),
            until=datetime(2024, 4, 4, tzinfo=ZONE),
            out=io.StringIO(),
            clock=clock,
        )
        assert status == 0
        assert server_clock.time() - started > 900, "the run outlived no token: proves nothing"
        assert fake.violations == []
        assert fake.unauthorised == 0


async def test_history_the_cloud_fills_in_late_is_fetched_by_the_next_run(tmp_path: Path) -> None:
    """A run at 10:00 finds yesterday's afternoon missing (the gateway uploads it later) but
    this morning there. History younger than a day is asked for again by the next run, so the
    run at 12:00 brings the afternoon in, each slot once; it is not skipped because a later
    slot had arrived first."""
    points = spring_series()
    since = datetime(2024, 3, 29, tzinfo=ZONE)
    late = (datetime(2024, 3, 29, 14, tzinfo=ZONE), datetime(2024, 3, 30, tzinfo=ZONE))
    clock = VirtualClock(datetime(2024, 3, 30, 10, tzinfo=ZONE))
    visible = [p for p in points if not late[0] < p.at <= late[1]]
    async with (
        climkit(clock, visible) as fake,
        DsmrReaderServer(api_key=KEY, zone="Europe/Zurich") as dsmr,
    ):
        config = make_config(tmp_path, fake.api_url, dsmr.url)

        async def run() -> int:
            return await import_history(
                "climkit",
                config,
                sink="home",
                archive=None,
                since=since,
                until=None,
                out=io.StringIO(),
                clock=clock,
            )

        assert await run() == 0
        first = [p.at for p in visible if since <= p.at <= clock.datetime()]
        assert [datetime.fromisoformat(r["timestamp"]) for r in dsmr.readings] == first
        fake.data[METER] = points  # the gateway's upload arrives
        clock.now += 2 * 3600
        assert await run() == 0
        assert fake.violations == []
    stamps = [datetime.fromisoformat(r["timestamp"]) for r in dsmr.readings]
    assert len(stamps) == len(set(stamps)), "a slot sent twice"
    assert sorted(stamps) == [p.at for p in points if since <= p.at <= clock.datetime()]


@pytest.mark.parametrize("reset", ["absent", "in the past"])
async def test_neurio_budget_spent_without_a_usable_reset_waits_the_documented_hour(
    tmp_path: Path, reset: str
) -> None:
    """``RateLimit-Remaining: 0`` says the budget is gone; a ``RateLimit-Reset`` missing, or an
    epoch already past (the server's clock behind), says nothing of when it comes back. The
    client then waits the document's hour rather than sending into a sure 429 (a violation the
    fake records) and giving up after its retries."""
    samples = neurio_series(NEURIO_START, NEURIO_START + timedelta(days=2))
    clock = VirtualClock(datetime(2024, 11, 20, 8, tzinfo=UTC))

    class Unclear(NeurioFake):
        def _budget(self) -> tuple[dict[str, str], bool]:
            headers, over = super()._budget()
            if reset == "absent":
                del headers["RateLimit-Reset"]
            else:
                headers["RateLimit-Reset"] = str(int((clock.time() - 600) * 1000))
            return headers, over

    fake = Unclear(
        clock,
        client_id=NEURIO_ID,
        client_secret=NEURIO_SECRET,
        sensor=SENSOR,
        samples=samples,
    )
    fake.LIMIT = 30
    async with fake, DsmrReaderServer(api_key=NEURIO_KEY) as dsmr:
        config = neurio_config(tmp_path, fake, dsmr.url)
        out = io.StringIO()
        status = await neurio_imported(
            config, clock, out, per_page=12, until=NEURIO_START + timedelta(days=2)
        )
        assert status == 0, out.getvalue()
        assert fake.violations == []
        assert len(dsmr.readings) == 2 * 288


@asynccontextmanager
async def raw_cloud(odd: dict[str, tuple[int, str, str]]) -> AsyncIterator[str]:
    """``test_import_garbage``'s cloud, with the odd answers (status, content type, text) as
    raw text: a number no float can hold (``1e10000000``) is valid JSON only text can carry,
    and a proxy's error page is HTML."""

    async def answer(request: web.Request) -> web.Response:
        if request.path in odd:
            status, kind, text = odd[request.path]
            return web.Response(status=status, text=text, content_type=kind)
        return web.json_response(VALID[request.path]())

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("name", "path", "text", "said"),
    [
        (
            "copper",
            "/api/partner/e/meter/m/readings",
            '{"results": [{"time": "2026-03-28T01:00:00Z", "actual": 1, "value": 1e10000000}]}',
            "value: implausibly large",
        ),
        (
            "neurio",
            "/samples",
            '[{"timestamp": "2026-03-28T00:05:00Z", "consumptionEnergy": 1e10000000}]',
            "consumptionEnergy: implausibly large",
        ),
        (
            "neurio",
            "/samples",
            '[{"timestamp": 1e10000000, "consumptionEnergy": 5}]',
            "timestamp: out of range",
        ),
    ],
)
async def test_a_number_past_decimals_range_is_one_line_and_exit_1(
    tmp_path: Path, name: str, path: str, text: str, said: str
) -> None:
    """JSON numbers are read exactly (as Decimal); one whose exponent is past what arithmetic
    on it allows is a value that cannot be read, named in one line, not a traceback."""
    async with raw_cloud({path: (200, "application/json", text)}) as url:
        result = await asyncio.to_thread(
            dsmr_logger,
            "import",
            name,
            "--to-archive",
            tmp_path / "archive",
            "--since",
            "2026-03-28",
            "--until",
            "2026-03-29",
            "--config",
            garbage_config(tmp_path, name, url),
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert said in one_clear_line(result, "dsmr-logger: import:")


PROXY_PAGE = """<html>
<head><title>403 Forbidden</title></head>
<body>
<center><h1>403 Forbidden</h1></center>
<hr><center>nginx</center>
</body>
</html>
"""


@pytest.mark.parametrize(
    ("name", "path"),
    [("copper", "/api/partner/e/meter/m/readings"), ("neurio", "/samples")],
)
async def test_a_proxys_html_error_page_is_one_line(tmp_path: Path, name: str, path: str) -> None:
    """A proxy in front of the cloud refuses with its HTML page: the error names the endpoint
    and the status, and shows the page's text on the same single line."""
    async with raw_cloud({path: (403, "text/html", PROXY_PAGE)}) as url:
        result = await asyncio.to_thread(
            dsmr_logger,
            "import",
            name,
            "--to-archive",
            tmp_path / "archive",
            "--since",
            "2026-03-28",
            "--until",
            "2026-03-29",
            "--config",
            garbage_config(tmp_path, name, url),
        )
    assert result.returncode == 1, result.stderr
    line = one_clear_line(result, f"{name}: GET {path.removeprefix('/api')}", "HTTP 403")
    assert "<title>403 Forbidden</title></head> <body>" in line


async def test_a_garbled_answer_marked_fresh_is_not_served_from_the_cache_again(
    tmp_path: Path,
) -> None:
    """Copper (or a proxy before it) answers one window with a cut-off body, yet with its usual
    ``Cache-Control: max-age`` of a year. The import stops naming it; the next run, the cloud
    answering well again, asks again and completes, instead of reading the same garbage back
    from its cache for a year."""
    points, gas = copper_week(), copper_gas_week()
    clock = VirtualClock(datetime(2024, 3, 1, 9, tzinfo=UTC))

    class Cut(CopperFake):
        cut = 1
        garbled = ""

        async def _readings(self, request: web.Request) -> web.Response:
            answer = await super()._readings(request)
            if self.cut and answer.status == 200 and request.match_info["mid"] == ELECTRIC:
                self.cut -= 1
                self.garbled = request.path_qs
                assert answer.text is not None
                return web.Response(
                    text=answer.text[:100],
                    content_type="application/json",
                    headers={"Cache-Control": answer.headers["Cache-Control"]},
                )
            return answer

    fake = Cut(
        clock,
        client_id=COPPER_ID,
        client_secret=COPPER_SECRET,
        enterprise=ENTERPRISE,
        meters=COPPER_METERS,
        data={ELECTRIC: points, GAS: gas},
    )
    async with fake, DsmrReaderServer(api_key=COPPER_KEY) as dsmr:
        config = copper_config(tmp_path, fake, dsmr.url)

        async def run() -> int:
            return await import_history(
                "copper",
                config,
                sink="home",
                archive=None,
                since=WEEK_START,
                until=WEEK_END,
                out=io.StringIO(),
                clock=clock,
            )

        with pytest.raises(CloudError, match="answer is not JSON"):
            await run()
        assert fake.cut == 0
        clock.now += 120  # the recent answers' minute of freshness is over
        assert await run() == 0
        # The garbled window was fetched again: a fresh answer the client could read was not.
        assert fake.refetched_while_fresh == [fake.garbled]
        assert fake.violations == [f"{fake.garbled} fetched again while fresh"]
    stamps = [datetime.fromisoformat(r["timestamp"]) for r in dsmr.readings]
    assert stamps == [p.at for p in points if WEEK_START <= p.at <= WEEK_END]


async def test_a_copper_import_killed_mid_request_has_counted_that_request(tmp_path: Path) -> None:
    """``python -m dsmr_logger import copper`` is killed with SIGKILL while a request is on its
    way (the fake holds the answer): the request counts against the hour, as it does at
    Copper, and the same command then completes; its closing line says exactly the budget the
    fake has left, every request of both runs counted."""
    points, gas = copper_week(), copper_gas_week()
    hold_at = 6  # the meter list, then the fifth readings request

    class Holding(CopperFake):
        holding = asyncio.Event()
        release = asyncio.Event()

        async def _readings(self, request: web.Request) -> web.Response:
            if len(self.history) == hold_at - 1 and not self.release.is_set():
                self.history.append(self.clock.time())  # counted on arrival, never answered
                self.holding.set()
                await self.release.wait()
                return web.json_response({"detail": "gone"}, status=503)
            return await super()._readings(request)

    fake = Holding(
        RealClock(),
        client_id=COPPER_ID,
        client_secret=COPPER_SECRET,
        enterprise=ENTERPRISE,
        meters=COPPER_METERS,
        data={ELECTRIC: points, GAS: gas},
    )
    async with fake:
        config = tmp_path / "config.toml"
        config.write_text(
            '[meter]\nport = "/dev/null"\ntimezone = "Europe/Amsterdam"\n'
            f'[spool]\npath = "{tmp_path / "state" / "spool.sqlite3"}"\n'
            f'[import.copper]\nclient_id = "{COPPER_ID}"\nclient_secret = "{COPPER_SECRET}"\n'
            f'enterprise_id = "{ENTERPRISE}"\nmeter = "{ELECTRIC}"\ngas_meter = "{GAS}"\n'
            f'base_url = "{fake.api_url}"\nauth_url = "{fake.auth_url}"\n'
        )
        command = [
            *("-m", "dsmr_logger", "import", "copper", "--config", str(config)),
            *("--to-archive", str(tmp_path / "archive")),
            *("--since", WEEK_START.isoformat(), "--until", WEEK_END.isoformat()),
        ]
        first = await asyncio.create_subprocess_exec(sys.executable, *command)
        await wait_until(fake.holding.is_set, "a request held on its way", timeout=60)
        first.kill()
        await asyncio.wait_for(first.wait(), 30)
        fake.release.set()
        assert len(fake.history) == hold_at

        second = await asyncio.create_subprocess_exec(sys.executable, *command, stdout=PIPE)
        out, _ = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 0
        assert fake.violations == []
    left = 100 - len(fake.history)
    assert f"budget left: {left} of 100/hour, {900 + left} of 1000/day" in out.decode()
    written = [
        meter_time(t, ZONE_NL)
        for day in sorted((tmp_path / "archive").iterdir())
        for t in frames_in(read_capture(day))
    ]
    assert written == [p.at for p in points if WEEK_START <= p.at <= WEEK_END]


async def test_a_token_with_a_space_is_masked_whole(tmp_path: Path) -> None:
    """A token server hands out ``access_token: "tok-Alpha9 tok-Beta7"`` (a space, which
    RFC 6750 does not allow, yet it goes out as given); the API refuses it with a 401 that
    echoes the header. Neither half of the token reaches the user's screen."""
    token = "tok-Alpha9 tok-Beta7"

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/oauth2/token":
            return web.json_response(
                {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
            )
        shown = request.headers.get("Authorization", "")
        return web.json_response({"message": f"bad authorization {shown!r}"}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        result = await asyncio.to_thread(
            dsmr_logger,
            "import",
            "neurio",
            "--to-archive",
            tmp_path / "archive",
            "--since",
            "2026-03-28",
            "--config",
            garbage_config(tmp_path, "neurio", url),
        )
    finally:
        await runner.cleanup()
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dsmr-logger:")]
    assert len(errors) == 1 and "HTTP 401 again with a new token" in errors[0], result.stderr
    assert "****" in errors[0]
    for half in token.split():
        assert half not in result.stdout + result.stderr, result.stderr
