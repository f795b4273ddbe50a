"""``dsmr-logger status`` asks the daemon on ``[http] listen``, and only the daemon.

What answers on that port may be something else (a port typed wrong, another service), and the
user's environment may name an internet proxy (``http_proxy``) that cannot see this machine's
ports. Either way the command must say what it knows: 0 healthy, 1 unhealthy, 3 unknown, one
clear reason, never a traceback. The real command runs as a subprocess against a real daemon.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from cli_process import dsmr_logger
from dsmr_reader_server import DsmrReaderServer
from test_ops import KEY, make_config, running

from dsmr_logger.daemon import Daemon
from dsmr_logger.tools.simulate import VirtualSerialPort


def config_file(tmp_path: Path, listen: str) -> Path:
    path = tmp_path / "status.toml"
    path.write_text(
        '[meter]\nport = "/dev/null"\n'
        f"[spool]\npath = {json.dumps(str(tmp_path / 'spool.sqlite3'))}\n"
        f'[http]\nlisten = "{listen}"\n'
    )
    return path


@asynccontextmanager
async def serving(document: object) -> AsyncIterator[int]:
    """Another program's HTTP service on the status port, answering JSON that is not ours."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/status", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_another_service_on_the_status_port_is_unknown_not_a_traceback(
    tmp_path: Path,
) -> None:
    foreign = {"healthy": True, "meter": 5, "sinks": 1}  # JSON, just not dsmr-logger's
    async with serving(foreign) as port:
        path = config_file(tmp_path, f"127.0.0.1:{port}")
        text = await asyncio.to_thread(dsmr_logger, "status", "--config", path)
        as_json = await asyncio.to_thread(dsmr_logger, "status", "--json", "--config", path)
    assert text.returncode == 3, text.stderr
    assert "Traceback" not in text.stderr + text.stdout
    assert "not dsmr-logger's /status" in text.stdout
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["healthy"] is None  # not the other service's "true"


async def test_an_internet_proxy_in_the_environment_does_not_hide_the_daemon(
    tmp_path: Path,
) -> None:
    """http_proxy names a proxy (here one that is down): the daemon is still asked directly."""
    port = VirtualSerialPort()
    try:
        async with (
            DsmrReaderServer(api_key=KEY) as server,
            running(Daemon(make_config(tmp_path, port.path, server.url))) as daemon,
        ):
            assert daemon.status_server is not None
            path = config_file(tmp_path, f"127.0.0.1:{daemon.status_server.port}")
            proxy = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
            result = await asyncio.to_thread(
                dsmr_logger, "status", "--json", "--config", path, env=proxy
            )
    finally:
        port.close()
    assert "Traceback" not in result.stderr
    document = json.loads(result.stdout)
    assert "daemon" not in document, document  # the daemon's own answer, not the offline one
    assert document["meter"]["port"] == port.path
    assert result.returncode in (0, 1)  # asked: healthy or not, but known
