"""What a server or a device sends never drives the terminal of whoever reads it.

A sink's error (an answer's body) reaches ``dsmr-logger status``, and dead letters' answers and
telegrams reach ``spool list`` and ``spool show``. A body holding escape sequences (a hostile
or broken server, a proxy page) could retitle the window, clear the screen or, on some
terminals, write the clipboard: they are shown as their codes instead.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web
from cli_process import dsmr_logger
from test_import_garbage import config_file as cloud_config
from test_status_command import config_file, serving

from dsmr_logger.delivery.spool import Spool, StoredTelegram
from dsmr_logger.telegram.capture import default_capture, frames_in

EVIL = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mevil\x1b[0m\x9b"


def test_spool_list_and_show_never_print_an_escape_the_server_sent(tmp_path: Path) -> None:
    spool_path = tmp_path / "spool.sqlite3"
    spool = Spool(spool_path, max_bytes=1 << 20)
    spool.open()
    telegram = frames_in(default_capture())[0].replace(b"ISK5", b"IS\x1b[2J")
    spool.dead_letter(
        "home",
        StoredTelegram(1, telegram, 1_790_000_000.0),
        status=400,
        body=EVIL,
        reason=f"refused: {EVIL}",
    )
    spool.close()
    path = tmp_path / "config.toml"
    path.write_text(f'[meter]\nport = "/dev/null"\n[spool]\npath = {json.dumps(str(spool_path))}\n')
    for action in (["list"], ["show", "1"]):
        result = dsmr_logger("spool", *action, "--config", path)
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
        assert "\x9b" not in result.stdout
        assert "\\x1b]0;PWNED\\x07" in result.stdout  # shown, as codes
    assert "IS\\x1b[2J" in dsmr_logger("spool", "show", "1", "--config", path).stdout


async def test_status_never_prints_an_escape_from_a_sinks_error(tmp_path: Path) -> None:
    """The status document as a daemon serves it, a sink's last_error holding the server's
    body as sent (test_echoed_key shows the real daemon keeps it so)."""
    document = {
        "healthy": False,
        "reasons": [f"sink home misconfigured: HTTP 400 {EVIL}"],
        "time": 1_790_000_000.0,
        "meter": {
            "port": "/dev/ttyUSB0",
            "state": "ok",
            "last_frame_at": 1_790_000_000.0,
            "frames": 1,
            "rejected": {},
            "reconnects": 0,
        },
        "sinks": [
            {
                "name": "home",
                "delivered": 0,
                "backlog": 1,
                "dead_letters": 0,
                "oldest_age": None,
                "failing_since": None,
                "misconfigured": True,
                "last_error": f"HTTP 400 {EVIL}",
            }
        ],
    }
    async with serving(document) as port:
        path = config_file(tmp_path, f"127.0.0.1:{port}")
        result = await asyncio.to_thread(dsmr_logger, "status", "--config", path)
    assert result.returncode == 1, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "HTTP 400 \\x1b]0;PWNED\\x07" in result.stdout


async def test_an_import_error_line_never_prints_an_escape_the_cloud_sent(
    tmp_path: Path,
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=418, text=f"teapot {EVIL}")

    app = web.Application()
    app.router.add_post("/oauth2/token", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        result = await asyncio.to_thread(
            dsmr_logger,
            "import",
            "neurio",
            "--to-archive",
            tmp_path / "archive",
            "--config",
            cloud_config(tmp_path, "neurio", url),
        )
    finally:
        await runner.cleanup()
    assert result.returncode == 1
    assert "HTTP 418: teapot \\x1b]0;PWNED\\x07" in result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr


async def test_the_demos_live_line_never_prints_an_escape_a_server_sent(tmp_path: Path) -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=503, text=f"busy {EVIL}")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", busy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        result = await asyncio.to_thread(
            dsmr_logger,
            "demo",
            "--dir",
            tmp_path / "demo",
            "--duration",
            "3",
            "--dsmr-reader",
            url,
            "--api-key",
            "demo-key-0123456789",
        )
    finally:
        await runner.cleanup()
    assert result.returncode == 0, result.stderr
    assert "last error HTTP 503 busy \\x1b]0;PWNED\\x07" in result.stdout
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
