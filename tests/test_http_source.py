"""``[meter] type = "http"``: any endpoint serving the raw telegram (ESP P1 loggers and the like).

A fake endpoint on 127.0.0.1 (aiohttp) plays such a logger: ``GET /api/v2/sm/telegram`` answers
the meter's current telegram as ``text/plain``, each served ``repeat`` times, the cursor moving
only on a telegram served; optional Basic authentication or a bearer token (401 otherwise); a
``status`` to force (404, 302, 500, ...). The source runs in the test's loop; the last test runs
the daemon as a real process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from conftest import CORPUS, REPO_ROOT, require_corpus
from dsmr_reader_server import DsmrReaderServer
from waiting import wait_until

from dsmr_logger import config as config_module
from dsmr_logger.config import ConfigError, HttpMeterConfig, from_mapping
from dsmr_logger.sources import MeterState, build_source
from dsmr_logger.sources.http_poll import PollingSource
from dsmr_logger.sources.p1.framing import Frame, FrameAssembler
from dsmr_logger.telegram.capture import frames_in

CAPTURE = CORPUS / "nielsbasjes-dsmr-tools" / "ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"
PATH = "/api/v2/sm/telegram"
FAST = {"interval": 0.01, "reconnect_initial": 0.01, "reconnect_max": 0.05, "timeout": 2.0}


def capture(count: int | None = None) -> list[bytes]:
    require_corpus()
    return frames_in(CAPTURE.read_bytes())[:count]


class FakeLogger:
    """An ESP P1 logger's telegram endpoint (see the module doc)."""

    def __init__(
        self,
        telegrams: list[bytes],
        *,
        repeat: int = 1,
        basic: tuple[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self.telegrams, self.repeat = telegrams, repeat
        self.basic, self.token = basic, token
        self.status: int | None = None
        self.location = "http://192.168.1.30/api/v2/sm/telegram"
        self.body: bytes | None = None
        self.position = self._times = 0
        self.polls = self.served = self.refused = 0
        self.requests: list[web.Request] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    def authorised(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization")
        if self.basic is not None:
            pair = f"{self.basic[0]}:{self.basic[1]}".encode()
            return given == f"Basic {base64.b64encode(pair).decode()}"
        if self.token is not None:
            return given == f"Bearer {self.token}"
        return True

    async def handle(self, request: web.Request) -> web.Response:
        self.polls += 1
        self.requests.append(request)
        if not self.authorised(request):
            self.refused += 1
            return web.Response(status=401, text="Unauthorized")
        if self.status == 302:
            return web.Response(status=302, headers={"Location": self.location})
        if self.status is not None:
            return web.Response(status=self.status, text="nope")
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        telegram = self.telegrams[min(self.position, len(self.telegrams) - 1)]
        self.served += 1
        self._times += 1
        if self._times >= self.repeat and self.position < len(self.telegrams):
            self.position, self._times = self.position + 1, 0
        return web.Response(body=telegram, content_type="text/plain")

    async def start(self, port: int = 0) -> FakeLogger:
        app = web.Application()
        app.router.add_get(PATH, self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", port))
        await web.SockSite(self._runner, sock).start()
        self.port = sock.getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLogger:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"


def meter(**table: Any) -> HttpMeterConfig:
    config = from_mapping({"meter": {"type": "http", **table}}).meter
    assert isinstance(config, HttpMeterConfig)
    return config


@contextlib.asynccontextmanager
async def running(config: HttpMeterConfig) -> AsyncIterator[tuple[PollingSource, list[Frame]]]:
    frames: list[Frame] = []
    source = build_source(config, frames.append)
    assert isinstance(source, PollingSource)
    task = asyncio.create_task(source.run())
    try:
        yield source, frames
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_basic_auth_and_extra_headers_are_sent_and_each_telegram_taken_once() -> None:
    telegrams = capture(20)
    async with FakeLogger(telegrams, repeat=3, basic=("p1", "s3cret pass")) as device:
        config = meter(
            url=device.url + "?format=raw",
            username="p1",
            password="s3cret pass",
            headers={"X-Client": "dsmr-logger"},
            **FAST,
        )
        async with running(config) as (source, frames):
            await wait_until(lambda: len(frames) == 20, "twenty telegrams")
    assert [f.raw for f in frames] == telegrams
    assert source.status.repeats >= 38 and source.status.state is MeterState.OK
    request = device.requests[0]
    assert request.query_string == "format=raw"
    assert request.headers["X-Client"] == "dsmr-logger"
    assert "text/plain" in request.headers["Accept"]
    assert device.refused == 0
    assert len({r.transport for r in device.requests[:-1]}) == 1, "one keep-alive connection"


async def test_refused_credentials_are_one_clear_error_and_fixed_by_the_user_only() -> None:
    with structlog.testing.capture_logs() as logs:
        async with FakeLogger(capture(3), token="right-token") as device:
            config = meter(url=device.url, token="wrong-token", **FAST)
            async with running(config) as (source, frames):
                await wait_until(lambda: device.refused >= 4, "four refusals")
    assert frames == [] and source.status.state is MeterState.MISCONFIGURED
    assert "HTTP 401" in (source.status.last_error or "")
    assert "meter.username/password or meter.token" in (source.status.last_error or "")
    assert len([e for e in logs if e["event"] == "meter device refuses us"]) == 1
    assert device.requests[0].headers["Authorization"] == "Bearer wrong-token"
    assert all("wrong-token" not in repr(e) for e in logs)


@pytest.mark.parametrize(
    ("status", "state", "message"),
    [
        (404, MeterState.MISCONFIGURED, "HTTP 404 from http://127.0.0.1:"),
        (302, MeterState.MISCONFIGURED, "redirected to http://192.168.1.30/api/v2/sm/telegram"),
        (500, MeterState.DISCONNECTED, "HTTP 500 from"),
        (503, MeterState.SILENT, "the device has no telegram"),
    ],
)
async def test_each_failing_answer_says_what_it_means_and_reading_resumes(
    status: int, state: MeterState, message: str
) -> None:
    telegrams = capture(4)
    async with (
        FakeLogger(telegrams) as device,
        running(meter(url=device.url, **FAST)) as (source, frames),
    ):
        await wait_until(lambda: len(frames) >= 1, "a first telegram")
        device.status = status
        await wait_until(lambda: source.status.state is state, f"state {state.value}")
        assert message in (source.status.last_error or "")
        device.status = None
        await wait_until(lambda: len(frames) == 4, "the rest", 5.0)
    assert [f.raw for f in frames] == telegrams
    assert source.status.state is MeterState.OK


async def test_an_unreachable_logger_is_retried_until_it_is_back() -> None:
    telegrams = capture(3)
    device = FakeLogger(telegrams)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}{PATH}"
    async with running(meter(url=url, **FAST)) as (source, frames):
        await wait_until(lambda: source.status.polls >= 3, "three failed polls")
        assert source.status.state is MeterState.DISCONNECTED
        assert "ConnectionRefusedError" in (source.status.last_error or "")
        assert source.status.last_error_at is not None  # status shows "N s ago"
        assert source.status.attempts == source.status.polls >= 3  # failed polls are attempts
        await device.start(port)
        try:
            await wait_until(lambda: len(frames) == 3, "the telegrams once it is back")
        finally:
            await device.stop()
    assert source.status.connects == 1


async def test_an_answer_that_is_no_telegram_turns_into_a_state_after_idle_timeout() -> None:
    async with FakeLogger(capture(1)) as device:
        device.body = json.dumps({"telegram": capture(1)[0].decode()}).encode()  # JSON, not raw
        config = meter(url=device.url, idle_timeout=0.2, **FAST)
        async with running(config) as (source, frames):
            await wait_until(
                lambda: source.status.state is MeterState.NO_VALID_FRAMES, "no valid frames"
            )
    assert frames == [] and source.status.connected


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"url": "http://user:pw@192.168.1.30/t"}, "meter.url: put credentials in username"),
        ({"url": "ftp://192.168.1.30/t"}, "meter.url: must be an http:// or https:// URL"),
        ({"url": "http://h/t", "username": "u"}, "meter.username: Basic authentication needs"),
        (
            {"url": "http://h/t", "username": "u", "password": "p", "token": "t"},
            "meter.token: either a token or username and password",
        ),
        (
            {"url": "http://h/t", "token": "t", "headers": {"Authorization": "x"}},
            "meter.headers: Authorization is already set",
        ),
        ({"url": "http://h/t", "headers": {"Host": "x"}}, "meter.headers: 'Host' is set by"),
        ({"url": "http://h/t", "headers": {"X-A": "a\nb"}}, "meter.headers: X-A: the value"),
        ({"url": "http://h/t", "headers": "X-A: b"}, "meter.headers: must be a table"),
    ],
)
def test_each_http_meter_mistake_names_its_key(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping({"meter": {"type": "http", **table}})
    assert any(p.startswith(problem) for p in error.value.problems), error.value.problems


def test_check_config_shows_headers_and_masks_the_password() -> None:
    config = from_mapping(
        {
            "meter": {
                "type": "http",
                "url": "http://h/t",
                "username": "u",
                "password": "a-long-password",
                "headers": {"X-A": "b"},
            }
        }
    )
    shown = config_module.effective_toml(config)
    assert 'password = "****rd"' in shown and "a-long-password" not in shown
    assert 'headers = { "X-A" = "b" }' in shown
    import tomllib

    assert tomllib.loads(shown)["meter"]["headers"] == {"X-A": "b"}


# --- the daemon as a real process --------------------------------------------------------------


async def test_the_daemon_polls_an_http_logger_and_delivers_the_capture_once_in_order(
    tmp_path: Path,
) -> None:
    expected = [f.telegram for f in FrameAssembler().feed(CAPTURE.read_bytes(), 0.0)]
    require_corpus()
    async with (
        DsmrReaderServer("k") as server,
        FakeLogger(capture(), basic=("admin", "hunter2-secret")) as device,
    ):
        config = tmp_path / "config.toml"
        config.write_text(
            "\n".join(
                [
                    "[meter]",
                    'type = "http"',
                    f'url = "{device.url}"',
                    'username = "admin"',
                    'password = "hunter2-secret"',
                    *(f"{k} = {v}" for k, v in FAST.items()),
                    "[spool]",
                    f'path = "{tmp_path / "spool.sqlite3"}"',
                    "flush_interval = 0.2",
                    "[log]",
                    'format = "json"',
                    "[[sink]]",
                    'name = "dsmr"',
                    f'url = "{server.url}"',
                    'api_key = "k"',
                    "retry_initial = 0.02",
                    "",
                ]
            )
        )
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        log = tmp_path / "daemon.log"
        with log.open("wb") as stderr:
            daemon = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dsmr_logger", "run", "--config", str(config),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
            )  # fmt: skip
        try:
            await wait_until(lambda: len(server.received) >= 566, "the capture", 90.0)
            daemon.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                assert await daemon.wait() == 0
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
    assert [t.encode() for t in server.received] == expected
    assert "hunter2-secret" not in log.read_text()
    assert base64.b64encode(b"admin:hunter2-secret").decode() not in log.read_text()
    print(
        f"HTTP logger, 566-frame capture: {device.polls} polls, {device.served} served, "
        f"{device.served - len(server.received)} repeats skipped, {len(server.received)} delivered"
    )


def test_a_credential_in_a_header_or_the_query_is_shown_masked_everywhere() -> None:
    """An ESP logger's API key may travel in a header of its own or in ``?token=``: check-config,
    the logs and ``/status`` (``where``) mask it; harmless headers and parameters stay readable."""
    config = from_mapping(
        {
            "meter": {
                "type": "http",
                "url": "http://h/api/telegram?format=raw&token=abcdef123456",
                "headers": {"Accept": "text/plain", "X-Api-Key": "supersecretkey123"},
            }
        }
    )
    shown = config_module.effective_toml(config)
    assert "supersecretkey123" not in shown and "abcdef123456" not in shown
    assert '"X-Api-Key" = "****23"' in shown and '"Accept" = "text/plain"' in shown
    assert config.meter.where == "http://h/api/telegram?format=raw&token=****56"
    assert config.meter.url.endswith("token=abcdef123456")  # what is sent is unchanged
