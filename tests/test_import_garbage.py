"""An energy cloud answering garbage: one clear line and exit 1, never a traceback or a secret.

Clouds change, proxies rewrite answers, and a server in trouble says odd things with a 200. Each
test serves one odd answer from a real HTTP server on 127.0.0.1 (the other endpoints answer as
the cloud's document says) and runs the real ``dsmr-logger import`` as a subprocess: exit 1, one
line naming what was wrong, no traceback, neither the client secret nor a token in the output.
Climkit allows one request a second, so its cases run in process on a virtual clock instead,
where the same errors reach ``import``'s exit-code mapping as ``CloudError``.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cli_process import dsmr_logger, one_clear_line
from cloud_fakes import VirtualClock

from dsmr_logger.config import from_mapping
from dsmr_logger.imports.cloud import CloudError
from dsmr_logger.imports.command import import_history

SECRET = "client-secret-Zq8s3cr3t"
TOKEN = "token-Xy7bearer0123456789"
Answer = tuple[int, dict[str, str], Any]

VALID: dict[str, Callable[[], Any]] = {
    # Neurio
    "/oauth2/token": lambda: {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600},
    "/users/current": lambda: {
        "createdAt": "2026-03-01T00:00:00Z",
        "locations": [{"sensors": [{"sensorId": "0x1", "id": "0x1"}]}],
    },
    "/samples": lambda: [
        {"timestamp": "2026-03-28T00:05:00Z", "consumptionEnergy": 1_000_000, "consumptionPower": 5}
    ],
    # Copper
    "/oauth/token": lambda: {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600},
    "/api/partner/e/meter/m/readings": lambda: {
        "results": [{"time": "2026-03-28T01:00:00Z", "actual": 1, "value": 1.5}]
    },
    "/api/partner/e/meter": lambda: [{"id": "m", "type": "power"}],
    # Climkit
    "/auth": lambda: {"access_token": TOKEN},
    "/meter_info/s": lambda: [{"id": "m", "type": "electricity"}],
    "/installation_infos/s": lambda: {"name": "x", "creation_date": "2026-03-27T00:00:00"},
    "/meter_data_raw/s/m": lambda: [
        {"timestamp": "2026-03-28T00:15:00", "en_im": "1.5", "en_ex": "0"}
    ],
}


@asynccontextmanager
async def cloud(odd: dict[str, Answer]) -> AsyncIterator[str]:
    """A cloud on 127.0.0.1 answering ``odd`` where given, as its document says elsewhere."""

    async def answer(request: web.Request) -> web.Response:
        if request.path in odd:
            status, headers, body = odd[request.path]
            return web.json_response(body, status=status, headers=headers)
        return web.json_response(VALID[request.path]())

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def sections(url: str) -> dict[str, dict[str, str]]:
    return {
        "neurio": {"client_id": "c", "client_secret": SECRET, "sensor_id": "0x1", "base_url": url},
        "copper": {
            "client_id": "c",
            "client_secret": SECRET,
            "enterprise_id": "e",
            "meter": "m",
            "base_url": url + "/api",
            "auth_url": url + "/oauth/token",
        },
        "climkit": {
            "username": "u",
            "password": SECRET,
            "site": "s",
            "meter": "m",
            "base_url": url,
        },
    }


def config_file(tmp_path: Path, name: str, url: str) -> Path:
    section = "".join(f"{k} = {json.dumps(v)}\n" for k, v in sections(url)[name].items())
    path = tmp_path / "config.toml"
    path.write_text(
        '[meter]\nport = "/dev/null"\n'
        f"[spool]\npath = {json.dumps(str(tmp_path / 'state' / 'spool.sqlite3'))}\n"
        f"[import.{name}]\n{section}"
    )
    return path


@pytest.mark.parametrize(
    ("name", "odd", "said"),
    [
        (
            "neurio",
            {"/users/current": (200, {}, {"locations": ["home"]})},
            "neurio: GET /users/current: locations of the user is not a list of objects",
        ),
        (
            "neurio",
            {"/users/current": (200, {}, {"locations": [{"sensors": 5}]})},
            "neurio: GET /users/current: sensors of a location is not a list of objects",
        ),
        (
            "neurio",
            {"/oauth2/token": (200, {}, {"access_token": "abc\r\nX-Injected: 1"})},
            "neurio: the token it gave contains a line break or NUL; not usable",
        ),
        (
            "neurio",
            {
                "/oauth2/token": (
                    200,
                    {},
                    {"access_token": TOKEN, "token_type": "Bearer\nX-Injected: 1"},
                )
            },
            "neurio: the token it gave contains a line break or NUL; not usable",
        ),
        (
            "copper",
            {"/oauth/token": (200, {}, {"access_token": "t\u20acken", "expires_in": 60})},
            "copper: the token it gave contains a character outside Latin-1",
        ),
        (
            "neurio",
            {
                "/users/current": (
                    200,
                    {"RateLimit-Remaining": "0", "RateLimit-Reset": "9" * 5000},
                    VALID["/users/current"](),
                )
            },
            "neurio: the hour's budget is spent, and RateLimit-Reset (999",
        ),
        (
            "neurio",
            {
                "/samples": (
                    200,
                    {},
                    [{"timestamp": "2026-03-28T00:05:00Z", "consumptionEnergy": "1e40"}],
                )
            },
            "neurio: sample 2026-03-28T00:05:00+00:00: consumptionEnergy: implausibly large",
        ),
        (
            "neurio",
            {"/samples": (200, {}, [{"timestamp": "9999-12-31T23:30:00-01:00"}])},
            "neurio: GET /samples: timestamp: out of range: '9999-12-31T23:30:00-01:00'",
        ),
        (
            "copper",
            {
                "/api/partner/e/meter/m/readings": (
                    200,
                    {},
                    {"results": [{"time": "2026-03-28T01:00:00Z", "value": "1e40"}]},
                )
            },
            "value: implausibly large: '1e40'",
        ),
    ],
)
async def test_an_odd_answer_is_one_line_and_exit_1(
    tmp_path: Path, name: str, odd: dict[str, Answer], said: str
) -> None:
    async with cloud(odd) as url:
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
            config_file(tmp_path, name, url),
        )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dsmr-logger:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert said in errors[0]
    assert SECRET not in result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr


async def climkit(tmp_path: Path, odd: dict[str, Answer], *, since: datetime | None) -> str:
    """An in-process Climkit import (1 request a second: on a virtual clock) to an archive."""
    async with cloud(odd) as url:
        config = from_mapping(
            {
                "meter": {"port": "/dev/null"},
                "spool": {"path": str(tmp_path / "state" / "spool.sqlite3")},
                "import": {"climkit": sections(url)["climkit"]},
            }
        )
        out = io.StringIO()
        code = await import_history(
            "climkit",
            config,
            sink=None,
            archive=tmp_path / "archive",
            since=since,
            until=datetime(2026, 3, 29, tzinfo=UTC),
            out=out,
            clock=VirtualClock(datetime(2026, 4, 2, tzinfo=UTC)),
        )
        assert code == 0
        return out.getvalue()


async def test_climkit_indices_no_register_can_hold_are_a_cloud_error(tmp_path: Path) -> None:
    rows = [{"timestamp": "2026-03-28T00:15:00", "en_im": "1e40", "en_ex": "0"}]
    with pytest.raises(CloudError, match=r"en_im: implausibly large: '1e40'"):
        await climkit(
            tmp_path,
            {"/meter_data_raw/s/m": (200, {}, rows)},
            since=datetime(2026, 3, 28, tzinfo=UTC),
        )


async def test_climkit_dates_past_the_calendar_are_not_believed(tmp_path: Path) -> None:
    """A token said to expire in the year 10000 (in UTC) lives the document's 15 minutes; a
    site created in the year 0 states no start, so --since is asked for."""
    login = {"access_token": TOKEN, "valid_until": "9999-12-31T23:59:59-01:00"}
    shown = await climkit(
        tmp_path, {"/auth": (200, {}, login)}, since=datetime(2026, 3, 28, tzinfo=UTC)
    )
    assert "done: 1 readings" in shown
    created = {"name": "x", "creation_date": "0001-01-01T00:00:00+05:00"}
    with pytest.raises(CloudError, match="does not say when the data starts: give --since"):
        await climkit(tmp_path, {"/installation_infos/s": (200, {}, created)}, since=None)


async def test_an_error_answer_echoing_the_secret_never_shows_it(tmp_path: Path) -> None:
    """A 422 that repeats the request it refused, as frameworks do (the form as sent, the
    value JSON-escaped): the client secret is masked in every form it may take there."""
    secret = 'sëcret with "quotes" & spaces-Zq8'

    async def refuse(request: web.Request) -> web.Response:
        form = (await request.read()).decode()
        posted = await request.post()
        detail = {"detail": [{"input": posted.get("client_secret"), "raw": form}]}
        return web.json_response(detail, status=422)

    app = web.Application()
    app.router.add_post("/oauth2/token", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    path = config_file(tmp_path, "neurio", url)
    path.write_text(path.read_text().replace(json.dumps(SECRET), json.dumps(secret)))
    try:
        result = await asyncio.to_thread(
            dsmr_logger, "import", "neurio", "--to-archive", tmp_path / "a", "--config", path
        )
    finally:
        await runner.cleanup()
    assert result.returncode == 1, result.stderr
    line = one_clear_line(result, "neurio (auth): POST /oauth2/token: HTTP 422")
    assert "****" in line
    for shown in ("quotes", "s\\u00ebcret", "s%C3%ABcret", "sëcret"):
        assert shown not in result.stdout + result.stderr, line
