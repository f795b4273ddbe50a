"""A fake DSMR-reader speaking the datalogger API v1 over real HTTP on 127.0.0.1, for tests.

It answers the way DSMR-reader's v1 view (``dsmr_api/views/v1.py``, a plain Django view, not DRF)
does, in its order: API disabled → ``405 API is disabled``; neither ``X-AUTHKEY: <key>`` nor
``Authorization: Token <key>`` → ``403 Invalid auth key``; no urlencoded/multipart form or a blank
``telegram`` field → ``400 Invalid data``; a telegram its parser refuses → ``500 Failed to parse
telegram``; stored → ``201`` with an empty body. "Refuses" here means: not starting with ``/``,
any line ending other than CRLF, more than one telegram, or not ending in ``!XXXX\\r\\n`` (four
UPPER-CASE hex digits, CRC-16/ARC over ``/`` through ``!``) or ``!\\r\\n`` (no CRC, DSMR 2.2/3).
The form is decoded like Django does (UTF-8, undecodable bytes replaced), so a telegram with
non-UTF-8 bytes fails its CRC here as it would there.

In a test (one event loop, no threads)::

    async with DsmrReaderServer(api_key="k") as server:      # port 0 → server.port, server.url
        ...post to server.url + V1_PATH...
        server.received          # telegrams stored (201), str, in arrival order
        server.mode = "hang"     # or any of MODES; takes effect at once (see below)
        server.poison = lambda t: "1-0:1.8.1(000001" in t   # per-telegram 500 (poison_answer)
        server.delay = 0.2       # seconds before every answer (a slow server)
        server.requests, server.answers, server.hanging

Modes: ``ok``; ``refuse`` closes the listening socket and every open connection at once (the
client sees connection refused; leaving ``refuse`` re-listens on the same port); ``hang`` accepts
and never answers until the mode changes (then, with ``hang_outcome="drop"``, the default, the
connection is closed unanswered and nothing is stored; with ``"process"`` the request is handled
under the new mode, the "timed out but stored anyway" duplicate case); ``html500`` (500 HTML
page; ``html500_page`` = ``"plain"`` Django production page or ``"debug"`` Django technical
traceback page), ``parse_failure``, ``bad_request``, ``forbidden``, ``disabled`` (405),
``rate_limited`` (429 with ``Retry-After: <retry_after>``). Forced modes answer every request.

As a process (daemon tests)::

    python tests/dsmr_reader_server.py --port 0 --api-key K --mode ok

prints the API port on the first stdout line and a control port on the second, then serves until
SIGTERM/SIGINT. The control port (never refused) takes ``POST /_control`` with JSON
``{"mode", "poison_substring", "poison_answer", "delay", "retry_after", "hang_outcome",
"reset"}`` (all optional; answers the state) and ``GET /_control`` (state), ``GET /_received``
(JSON list of stored telegrams); the API port serves the same three too. ``DsmrReaderProcess``
below wraps all of that for synchronous use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

try:
    from dsmr_logger.meter.crc import crc16
except ImportError:  # run as a script from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dsmr_logger.meter.crc import crc16

V1_PATH = "/api/v1/datalogger/dsmrreading"
MODES = (
    "ok",
    "refuse",
    "hang",
    "html500",
    "parse_failure",
    "bad_request",
    "forbidden",
    "disabled",
    "rate_limited",
)
PARSE_FAILURE = "Failed to parse telegram"
INVALID_AUTH = "Invalid auth key"
INVALID_DATA = "Invalid data"
API_DISABLED = "API is disabled"
REQUIRED_REGISTERS = ("1.8.1", "2.8.1", "1.7.0", "2.7.0")

_END = re.compile(r"\r\n!([0-9A-F]{4})?\r\n\Z")

# What Django answers with DEBUG off (DSMR-reader's default).
PLAIN_500_PAGE = """
<!doctype html>
<html lang="en">
<head>
  <title>Server Error (500)</title>
</head>
<body>
  <h1>Server Error (500)</h1><p></p>
</body>
</html>
"""

# Django's technical 500 page shows each frame's source with 7 lines of context: the v1 view's
# frame therefore quotes its own ``'Failed to parse telegram'`` line, a few lines below the call.
DEBUG_500_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta http-equiv="content-type" content="text/html; charset=utf-8">
  <title>OperationalError at /api/v1/datalogger/dsmrreading</title>
</head>
<body>
<div id="summary">
  <h1>OperationalError at /api/v1/datalogger/dsmrreading</h1>
  <pre class="exception_value">could not connect to server: Connection refused</pre>
</div>
<div id="traceback">
  <h2>Traceback</h2>
  <ul class="traceback">
    <li class="frame user">
      <code class="fname">/app/dsmr_api/views/v1.py</code>, line 33, in post
      <div class="context" id="c1">
        <ol start="32" class="pre-context" id="pre1">
          <li><pre>        try:</pre></li>
        </ol>
        <ol start="33" class="context-line">
          <li><pre>            dsmr_reading = dsmr_datalogger.services.telegram_to_reading(data=post_form.cleaned_data[&#x27;telegram&#x27;])</pre></li>
        </ol>
        <ol start="34" class="post-context" id="post1">
          <li><pre>        except InvalidTelegramError:</pre></li>
          <li><pre>            # The service called already logs the error.</pre></li>
          <li><pre>            pass</pre></li>
          <li><pre></pre></li>
          <li><pre>        if not dsmr_reading:</pre></li>
          <li><pre>            return HttpResponseServerError(content=&#x27;Failed to parse telegram&#x27;)</pre></li>
        </ol>
      </div>
    </li>
  </ul>
</div>
</body>
</html>
"""  # noqa: E501


def parse_failure(telegram: str) -> str | None:
    """Why DSMR-reader's v1 parser would refuse ``telegram`` (None: it would store it)."""
    if not telegram.startswith("/"):
        return "does not start with '/'"
    if telegram.count("\n") != telegram.count("\r\n") or telegram.count("\r") != telegram.count(
        "\r\n"
    ):
        return "line endings are not all CRLF"
    end = _END.search(telegram)
    if end is None:
        return "does not end with '!XXXX\\r\\n' (4 upper-case hex digits) or '!\\r\\n'"
    if telegram.count("\r\n!") != 1 or "\r\n/" in telegram:
        return "more than one telegram"
    if end.group(1) is None:
        return None
    given = int(end.group(1), 16)
    computed = crc16(telegram[: end.start() + 3].encode("utf-8"))
    if given != computed:
        return f"CRC says {end.group(1)}, computed {computed:04X}"
    return None


def lacks_required_registers(telegram: str) -> bool:
    """A poison predicate for what DSMR-reader 5.11 answers with a 500 HTML page over v1."""
    return any(
        re.search(rf"(?m)^\d+-\d+:{re.escape(obis)}\(", telegram) is None
        for obis in REQUIRED_REGISTERS
    )


@dataclass(frozen=True, slots=True)
class Served:
    """One answer the server sent (requests dropped while hanging are not answers)."""

    status: int
    body: str
    telegram: str | None
    auth: str | None
    """Which header authenticated the request: "token", "x-authkey", or None."""
    reason: str = ""
    """Why the telegram was refused (parse failure detail, "poison", the forced mode)."""


class DsmrReaderServer:
    """DSMR-reader's datalogger API v1 on 127.0.0.1, in the running event loop (see module doc)."""

    def __init__(
        self,
        api_key: str = "test-api-key",
        *,
        mode: str = "ok",
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        retry_after: int = 7,
        poison: Callable[[str], bool] | None = None,
        poison_answer: str = "html500",
        html500_page: str = "plain",
        hang_outcome: str = "drop",
        control: bool = False,
    ) -> None:
        self._check_mode(mode)
        self.api_key = api_key
        self.host = host
        self.port = port
        self.delay = delay
        self.retry_after = retry_after
        self.poison = poison
        self.poison_answer = poison_answer
        self.html500_page = html500_page
        self.hang_outcome = hang_outcome
        self.received: list[str] = []
        self.answers: list[Served] = []
        self.requests = 0
        self.hanging = 0
        self._mode = mode
        self._release = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._reopening: asyncio.Task[None] | None = None
        self._control_runner: web.AppRunner | None = None
        self.control_port: int | None = None
        self._control = control
        self.app = web.Application()
        self.app.router.add_route("*", V1_PATH, self._datalogger)
        if control:
            self._add_control_routes(self.app)

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> DsmrReaderServer:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.create_server((self.host, self.port))
        self.port = sock.getsockname()[1]
        if self._mode == "refuse":
            sock.close()  # the port is known; connections to it are refused until switched back
        else:
            self._sock = sock
            await self._serve(sock)
        if self._control:
            self._control_runner = web.AppRunner(self._control_app(), access_log=None)
            await self._control_runner.setup()
            site = web.TCPSite(self._control_runner, self.host, 0)
            await site.start()
            self.control_port = self._control_runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        self._release.set()
        self._close_listener()
        if self._reopening is not None:
            self._reopening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reopening
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._control_runner is not None:
            await self._control_runner.cleanup()
            self._control_runner = None

    async def __aenter__(self) -> DsmrReaderServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- behaviour switches ------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._set_mode(value)

    async def set_mode(self, value: str) -> None:
        """Like ``server.mode = value``, and also wait until a reopened port is serving again."""
        self._set_mode(value)
        if self._reopening is not None:
            await asyncio.shield(self._reopening)

    def reset(self) -> None:
        """Forget what arrived (received, answers, request count); the mode stays."""
        self.received.clear()
        self.answers.clear()
        self.requests = 0

    async def wait_for_requests(self, count: int, timeout: float = 2.0) -> None:
        """Wait until ``requests`` reaches ``count`` (e.g. the request now hanging arrived)."""
        deadline = time.monotonic() + timeout
        while self.requests < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.requests} requests after {timeout} s, wanted {count}")
            await asyncio.sleep(0.005)

    def _set_mode(self, value: str, spare: Any = None) -> None:
        self._check_mode(value)
        old, self._mode = self._mode, value
        if old == "hang" and value != "hang":
            self._release.set()
            self._release = asyncio.Event()
        if self._runner is None:
            return
        if value == "refuse" and old != "refuse":
            self._close_listener()
            for connection in list(self._runner.server.connections):  # type: ignore[union-attr]
                if connection is not spare:
                    connection.force_close()
        elif old == "refuse" and value != "refuse":
            sock = socket.create_server((self.host, self.port))  # listening from here on
            self._sock = sock
            self._reopening = asyncio.get_running_loop().create_task(self._serve(sock))

    @staticmethod
    def _check_mode(value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {value!r}")

    async def _serve(self, sock: socket.socket) -> None:
        assert self._runner is not None and self._runner.server is not None
        if sock.fileno() == -1:  # refused again before the reopening ran
            return
        self._listener = await asyncio.get_running_loop().create_server(
            self._runner.server, sock=sock
        )

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # --- the API -----------------------------------------------------------------------------

    async def _datalogger(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if request.method != "POST":  # Django's View: 405, empty body
            self.answers.append(Served(405, "", None, None, f"method {request.method}"))
            return web.Response(status=405, headers={"Allow": "POST"})
        auth = self._auth(request)
        telegram = await self._form_telegram(request)
        if self.delay:
            await self._pause(self.delay)
        if self._mode == "hang":
            release = self._release
            self.hanging += 1
            try:
                await release.wait()
            finally:
                self.hanging -= 1
            if self._stopping.is_set() or self.hang_outcome == "drop" or self._mode == "refuse":
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError  # nothing is sent; aiohttp ends the handler quietly
        status, body, reason = self._decide(auth, telegram)
        headers: dict[str, str] = {}
        content_type = "text/html"
        if status == 201:
            assert telegram is not None
            self.received.append(telegram)
        elif status == 405:
            headers["Allow"] = "POST"
        elif status == 429:
            headers["Retry-After"] = str(self.retry_after)
            content_type = "text/plain"
        self.answers.append(Served(status, body, telegram, auth, reason))
        return web.Response(
            status=status, text=body, headers=headers, content_type=content_type, charset="utf-8"
        )

    def _decide(self, auth: str | None, telegram: str | None) -> tuple[int, str, str]:
        forced = {
            "html500": (500, self._html500(), "html500"),
            "parse_failure": (500, PARSE_FAILURE, "parse_failure"),
            "bad_request": (400, INVALID_DATA, "bad_request"),
            "forbidden": (403, INVALID_AUTH, "forbidden"),
            "disabled": (405, API_DISABLED, "disabled"),
            "rate_limited": (429, "Too Many Requests", "rate_limited"),
        }
        if self._mode in forced:
            return forced[self._mode]
        if auth is None:
            return 403, INVALID_AUTH, "bad or missing key"
        if telegram is None or not telegram.strip():
            return 400, INVALID_DATA, "no telegram field"
        telegram = telegram.strip("\x00")
        if self.poison is not None and self.poison(telegram):
            if self.poison_answer == "parse_failure":
                return 500, PARSE_FAILURE, "poison"
            return 500, self._html500(), "poison"
        why = parse_failure(telegram)
        if why is not None:
            return 500, PARSE_FAILURE, why
        return 201, "", ""

    def _html500(self) -> str:
        return DEBUG_500_PAGE if self.html500_page == "debug" else PLAIN_500_PAGE

    def _auth(self, request: web.Request) -> str | None:
        if request.headers.get("X-AUTHKEY") == self.api_key:
            return "x-authkey"
        if request.headers.get("Authorization") == f"Token {self.api_key}":
            return "token"
        return None

    @staticmethod
    async def _form_telegram(request: web.Request) -> str | None:
        """The ``telegram`` form field as Django's ``request.POST`` would give it (last wins)."""
        if request.content_type == "multipart/form-data":
            form = await request.post()
            value = form.getall("telegram", [None])[-1]
            return value if isinstance(value, str) else None
        body = await request.read()
        if request.content_type != "application/x-www-form-urlencoded":
            return None
        pairs = urllib.parse.parse_qsl(
            body.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="replace"
        )
        values = [value for key, value in pairs if key == "telegram"]
        return values[-1] if values else None

    # --- control (process mode) ------------------------------------------------------------

    def _control_app(self) -> web.Application:
        app = web.Application()
        self._add_control_routes(app)
        return app

    def _add_control_routes(self, app: web.Application) -> None:
        app.router.add_post("/_control", self._control_post)
        app.router.add_get("/_control", self._control_get)
        app.router.add_get("/_received", self._received_get)

    def state(self) -> dict[str, Any]:
        return {
            "mode": self._mode,
            "port": self.port,
            "control_port": self.control_port,
            "requests": self.requests,
            "received": len(self.received),
            "hanging": self.hanging,
            "delay": self.delay,
            "retry_after": self.retry_after,
            "hang_outcome": self.hang_outcome,
            "statuses": [served.status for served in self.answers],
        }

    async def _control_post(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="JSON object expected") from None
        if not isinstance(changes, dict):
            raise web.HTTPBadRequest(text="JSON object expected")
        if changes.get("reset"):
            self.reset()
        if "poison_substring" in changes:
            needle = changes["poison_substring"]
            self.poison = None if needle is None else (lambda telegram: needle in telegram)
        for key in ("poison_answer", "delay", "retry_after", "hang_outcome"):
            if key in changes:
                setattr(self, key, changes[key])
        response = web.json_response(self.state())
        if "mode" in changes:
            try:
                # A request on the API port that refuses it must still get its own answer.
                self._set_mode(changes["mode"], spare=request.protocol)
            except ValueError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
            if self._reopening is not None:
                await asyncio.shield(self._reopening)
            response = web.json_response(self.state())
            if self._mode == "refuse":
                response.force_close()
        return response

    async def _control_get(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _received_get(self, request: web.Request) -> web.Response:
        return web.json_response(self.received)


class DsmrReaderProcess:
    """The server as a child process, driven synchronously (for tests of a daemon process)."""

    def __init__(self, api_key: str = "test-api-key", *, mode: str = "ok", port: int = 0) -> None:
        command = [sys.executable, str(Path(__file__).resolve())]
        command += ["--port", str(port), "--api-key", api_key, "--mode", mode]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        try:
            self.port = int(self.process.stdout.readline())
            self.control_port = int(self.process.stdout.readline())
        except ValueError:
            self.close()
            raise RuntimeError("dsmr_reader_server.py did not print its ports") from None
        self.url = f"http://127.0.0.1:{self.port}"

    def control(self, **changes: Any) -> dict[str, Any]:
        """POST /_control: mode=, poison_substring=, delay=, retry_after=, reset=True, ..."""
        return self._call("/_control", changes)

    def state(self) -> dict[str, Any]:
        return self._call("/_control")

    def received(self) -> list[str]:
        return self._call("/_received")

    def _call(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.control_port}{path}",
            data=data,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> DsmrReaderProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _run(args: argparse.Namespace) -> None:
    server = DsmrReaderServer(
        args.api_key,
        mode=args.mode,
        host=args.host,
        port=args.port,
        delay=args.delay,
        retry_after=args.retry_after,
        html500_page=args.html500_page,
        control=True,
    )
    if args.poison_substring is not None:
        needle = args.poison_substring
        server.poison = lambda telegram: needle in telegram
    await server.start()
    print(server.port, flush=True)
    print(server.control_port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="test-api-key")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--retry-after", type=int, default=7)
    parser.add_argument("--poison-substring", default=None)
    parser.add_argument("--html500-page", choices=("plain", "debug"), default="plain")
    asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
