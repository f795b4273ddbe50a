"""A server whose error page echoes the request's headers never gets the API key shown.

Proxies' error pages and debug pages of web frameworks list the request's headers, the
``Authorization: Token <key>`` line included. That body goes on to the daemon's log lines, its
``/status`` (readable by anyone who reaches the status port), dead letters and the one line a
backfill ends with: each must carry ``****`` where the key was.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from cli_process import dsmr_logger, one_clear_line
from test_ops import KEY, get, make_config, running

from dsmr_logger.config import LogConfig
from dsmr_logger.daemon import Daemon
from dsmr_logger.logsetup import configure
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort


@asynccontextmanager
async def echoing(status: int) -> AsyncIterator[str]:
    """A server answering every request with ``status`` and a page listing its headers."""

    async def echo(request: web.Request) -> web.Response:
        listed = "\n".join(f"{name}: {value}" for name, value in request.headers.items())
        return web.Response(status=status, text=f"<html><pre>{listed}</pre></html>")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_the_daemon_never_logs_or_shows_an_echoed_key(tmp_path: Path) -> None:
    logged = io.StringIO()
    configure(LogConfig(level="debug", format="keyvalue"), logged)
    port = VirtualSerialPort()
    try:
        async with (
            echoing(500) as url,
            running(Daemon(make_config(tmp_path, port.path, url))) as daemon,
        ):
            await MeterSimulator(port, frames_in(default_capture())[:2], interval=0).run(2)

            sink: dict[str, object] = {}
            async with asyncio.timeout(10):  # until the sink has failed and says why
                while not sink.get("last_error"):
                    await asyncio.sleep(0.05)
                    sink = json.loads((await get(daemon, "/status"))[1])["sinks"][0]
            status = (await get(daemon, "/status"))[1]
    finally:
        port.close()
    assert "Token ****" in str(sink["last_error"]), sink  # the echo is there, the key is not
    assert KEY not in status
    assert "Token ****" in logged.getvalue()
    assert KEY not in logged.getvalue()


async def test_backfill_never_shows_an_echoed_key(tmp_path: Path) -> None:
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "2026-11-02.log").write_bytes(frames_in(default_capture())[0])
    async with echoing(401) as url:
        path = tmp_path / "config.toml"
        path.write_text(
            '[meter]\nport = "/dev/null"\n'
            f"[spool]\npath = {json.dumps(str(tmp_path / 'spool.sqlite3'))}\n"
            f'[[sink]]\nname = "home"\nurl = "{url}"\napi_key = "{KEY}"\napi = "v2"\n'
        )
        result = await asyncio.to_thread(
            dsmr_logger,
            "backfill",
            "--from",
            tmp_path / "archive",
            "--sink",
            "home",
            "--config",
            path,
        )
    assert result.returncode == 2
    one_clear_line(result, "listing stored readings failed: HTTP 401", "Token ****")
    assert KEY not in result.stdout + result.stderr
