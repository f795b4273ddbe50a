"""A fake DSMR-reader speaking the datalogger API v1 and v2 over real HTTP on 127.0.0.1, for tests.

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
        server.readings          # API v2 readings stored (201): dicts of the posted fields
        server.v2_reject = lambda fields: {"timestamp": ["..."]} if ... else None  # per-reading 400

API v2 (``V2_PATH``, a DRF view in DSMR-reader; same key check and the same modes):
``POST`` validates like DSMR-reader's ``DsmrReading`` serializer (:func:`v2_errors`): required
``timestamp``, ``electricity_currently_delivered/returned``, ``electricity_delivered_1/2``,
``electricity_returned_1/2``; energy, power and gas decimals at most 9 digits with 3 decimals,
``phase_voltage_l*`` 4 digits with 1 decimal, ``phase_power_current_l*`` an integer 0..999,
datetimes ISO-8601. Stricter than the real server on one point: a timestamp without a UTC offset
is refused (DSMR-reader would quietly read it in its own time zone). Unknown fields are ignored.
Invalid → ``400`` JSON ``{"field": ["message"]}`` with DRF's messages; stored → the posted fields
(strings, as posted, unknown ones included) are appended to ``server.readings`` and the answer is
``201`` with the reading as DSMR-reader renders it (``id``, every known field, decimals at their
precision, datetimes in the server's ``zone`` with an offset). ``GET`` lists ``server.readings``
with ``timestamp__gte``/``timestamp__lte`` (compared as instants; naive ones read in ``zone``),
``ordering`` (``timestamp`` | ``-timestamp``), ``limit`` (default 25) and ``offset``, answering
``{"count", "next", "previous", "results"}``; an unencoded ``+`` in a timestamp arrives as a
space and gets ``400 {"timestamp__gte": ["Enter a valid date/time."]}`` as on the real server.
Tests may preload readings with ``server.readings.extend(...)`` (see :func:`v2_reading`); a
reading's ``id`` is its position in ``readings`` plus one.

Modes: ``ok``; ``refuse`` closes the listening socket and every open connection at once (the
client sees connection refused; leaving ``refuse`` re-listens on the same port); ``hang`` accepts
and never answers until the mode changes (then, with ``hang_outcome="drop"``, the default, the
connection is closed unanswered and nothing is stored; with ``"process"`` the request is handled
under the new mode, the "timed out but stored anyway" duplicate case); ``html500`` (500 HTML
page; ``html500_page`` = ``"plain"`` Django production page or ``"debug"`` Django technical
traceback page), ``parse_failure``, ``bad_request``, ``forbidden``, ``disabled`` (405),
``rate_limited`` (429 with ``Retry-After: <retry_after>``), ``redirect`` (301 to the same path
under ``redirect_to``, by default ``https://`` + the server's own address: what an http → https
redirect looks like), ``proxy_bad_request`` (400 with nginx's own HTML page to every request on
every path, GETs too: a reverse proxy that passes nothing on), ``captive_portal`` (200 with a
login page to every request: a router or portal that stores nothing and says "OK"). Forced modes
answer every request.
``flapping`` answers each request (a post or a v2 list) with the HTML 500 page with probability
``flap_rate`` and normally otherwise, drawing from ``random.Random(flap_seed)``: a server failing
at random, the same way on every run of a test that sends the same requests in the same order.

As a process (daemon tests)::

    python tests/dsmr_reader_server.py --port 0 --api-key K --mode ok

prints the API port on the first stdout line and a control port on the second, then serves until
SIGTERM/SIGINT. The control port (never refused) takes ``POST /_control`` with JSON
``{"mode", "poison_substring", "poison_answer", "delay", "retry_after", "hang_outcome",
"v2_reject_timestamps", "flap_rate", "flap_seed", "redirect_to", "hang_after", "reset"}`` (all
optional; answers the state) and ``GET /_control`` (state), ``GET /_received`` (JSON list of stored
telegrams), ``GET /_readings`` (JSON list of stored v2 readings); the API port serves the same
too. ``DsmrReaderProcess`` below wraps all of that for synchronous use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, DecimalException
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

try:
    from dsmr_logger.sources.p1.crc import crc16
except ImportError:  # run as a script from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dsmr_logger.sources.p1.crc import crc16

V1_PATH = "/api/v1/datalogger/dsmrreading"
V2_PATH = "/api/v2/datalogger/dsmrreading"
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
    "flapping",
    "redirect",
    "proxy_bad_request",
    "captive_portal",
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

# What nginx answers itself to a request it will not pass on (a misconfigured reverse proxy).
PROXY_400_PAGE = """<html>
<head><title>400 Bad Request</title></head>
<body>
<center><h1>400 Bad Request</h1></center>
<hr><center>nginx</center>
</body>
</html>
"""

# What a captive portal or a router's login page answers to any request, whatever its method.
PORTAL_PAGE = """<!DOCTYPE html>
<html><head><title>Sign in to the network</title></head>
<body><form method="post" action="/login"><input name="password" type="password"></form></body>
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


# --- API v2: DSMR-reader's DsmrReading serializer (Django REST framework) ------------------------

REQUIRED = "This field is required."
NOT_NULL = "This field may not be null."
DATETIME_INVALID = (
    "Datetime has wrong format. Use one of these formats instead: "
    "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]."
)
DATETIME_NAIVE = "Datetime has no UTC offset (this fake server requires one)."
NUMBER_INVALID = "A valid number is required."
INTEGER_INVALID = "A valid integer is required."
FILTER_DATETIME_INVALID = "Enter a valid date/time."
DEFAULT_LIMIT = 25

# Django's parse_datetime fallback (after datetime.fromisoformat) and forms.DateTimeField formats.
_DJANGO_DATETIME = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{1,2})-(?P<day>\d{1,2})"
    r"[T ](?P<hour>\d{1,2}):(?P<minute>\d{1,2})"
    r"(?::(?P<second>\d{1,2})(?:[.,](?P<microsecond>\d{1,6})\d{0,6})?)?"
    r"\s*(?P<tzinfo>Z|[+-]\d{2}(?::?\d{2})?)?$"
)
_FORM_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M", "%Y-%m-%d")
_INTEGER_SUFFIX = re.compile(r"\.0*\s*$")  # DRF's IntegerField accepts "3.0"


@dataclass(frozen=True, slots=True)
class V2Field:
    """One serializer field: its kind, and the model column's limits."""

    kind: str  # "datetime" | "decimal" | "integer"
    required: bool = False
    max_digits: int = 9
    places: int = 3
    minimum: int | None = None
    maximum: int | None = None


_ENERGY = V2Field("decimal", required=True)
# In DSMR-reader's model (and its JSON) order; the newer phase fields come last.
V2_FIELDS: dict[str, V2Field] = {
    "timestamp": V2Field("datetime", required=True),
    "electricity_delivered_1": _ENERGY,
    "electricity_returned_1": _ENERGY,
    "electricity_delivered_2": _ENERGY,
    "electricity_returned_2": _ENERGY,
    "electricity_currently_delivered": _ENERGY,
    "electricity_currently_returned": _ENERGY,
    **{f"phase_currently_delivered_l{n}": V2Field("decimal") for n in (1, 2, 3)},
    "extra_device_timestamp": V2Field("datetime"),
    "extra_device_delivered": V2Field("decimal"),
    **{f"phase_currently_returned_l{n}": V2Field("decimal") for n in (1, 2, 3)},
    **{f"phase_voltage_l{n}": V2Field("decimal", max_digits=4, places=1) for n in (1, 2, 3)},
    **{f"phase_power_current_l{n}": V2Field("integer", minimum=0, maximum=999) for n in (1, 2, 3)},
}
V2_REQUIRED = tuple(name for name, spec in V2_FIELDS.items() if spec.required)


def v2_reading(timestamp: str, **fields: str) -> dict[str, str]:
    """A valid v2 reading (all required fields, zeros) for preloading ``server.readings``."""
    reading = {name: "0.000" for name in V2_REQUIRED}
    reading["timestamp"] = timestamp
    return reading | fields


def parse_datetime(text: str) -> datetime | None:
    """Django's ``parse_datetime``: ``fromisoformat``, then its own regex; None if neither."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        pass
    match = _DJANGO_DATETIME.match(text)
    if match is None:
        return None
    parts = match.groupdict()
    tz = parts.pop("tzinfo")
    micro = parts.pop("microsecond")
    numbers = {key: int(value) for key, value in parts.items() if value is not None}
    if micro:
        numbers["microsecond"] = int(micro.ljust(6, "0"))
    try:
        moment = datetime(**numbers)
        if tz:
            offset = "+00:00" if tz == "Z" else tz
            moment = datetime.fromisoformat(moment.isoformat() + _colon(offset))
    except ValueError:
        return None
    return moment


def _colon(offset: str) -> str:
    digits = offset[1:].replace(":", "")
    return f"{offset[0]}{digits[:2]}:{digits[2:] or '00'}"


def _decimal_errors(text: str, spec: V2Field) -> tuple[Decimal | None, str | None]:
    """DRF's DecimalField.to_internal_value + validate_precision (no rounding: more places fail)."""
    text = text.strip()
    if len(text) > 1000:
        return None, "String value too large."
    try:
        value = Decimal(text)
    except DecimalException:
        return None, NUMBER_INVALID
    if not value.is_finite():
        return None, NUMBER_INVALID
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    if exponent >= 0:
        total = whole = len(digits) + exponent
        places = 0
    elif len(digits) > -exponent:
        total, places = len(digits), -exponent
        whole = total - places
    else:
        total = places = -exponent
        whole = 0
    if total > spec.max_digits:
        return None, f"Ensure that there are no more than {spec.max_digits} digits in total."
    if places > spec.places:
        return None, f"Ensure that there are no more than {spec.places} decimal places."
    if whole > spec.max_digits - spec.places:
        limit = spec.max_digits - spec.places
        return None, f"Ensure that there are no more than {limit} digits before the decimal point."
    return value.quantize(Decimal(1).scaleb(-spec.places)), None


def _integer_errors(text: str, spec: V2Field) -> tuple[int | None, str | None]:
    if len(text) > 1000:
        return None, "String value too large."
    try:
        value = int(_INTEGER_SUFFIX.sub("", text))
    except ValueError:
        return None, INTEGER_INVALID
    if spec.maximum is not None and value > spec.maximum:
        return None, f"Ensure this value is less than or equal to {spec.maximum}."
    if spec.minimum is not None and value < spec.minimum:
        return None, f"Ensure this value is greater than or equal to {spec.minimum}."
    return value, None


def clean_v2(fields: Mapping[str, str | None]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The serializer's validated values (known fields only) and its errors, field by field."""
    values: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for name, spec in V2_FIELDS.items():
        text = fields.get(name)
        if text is None or (text == "" and not spec.required):
            if name not in fields and spec.required:
                errors[name] = [REQUIRED]
            elif spec.required:
                errors[name] = [NOT_NULL]
            else:
                values[name] = None
            continue
        value: Any
        if spec.kind == "datetime":
            value = parse_datetime(text)
            error = DATETIME_INVALID if value is None else None
            if value is not None and value.tzinfo is None:
                error = DATETIME_NAIVE
        elif spec.kind == "integer":
            value, error = _integer_errors(text, spec)
        else:
            value, error = _decimal_errors(text, spec)
        if error is not None:
            errors[name] = [error]
        else:
            values[name] = value
    return values, errors


def v2_errors(fields: Mapping[str, str | None]) -> dict[str, list[str]]:
    """What DSMR-reader's v2 POST would answer with 400 for these fields ({} = it stores them)."""
    return clean_v2(fields)[1]


def render_datetime(moment: datetime, zone: ZoneInfo) -> str:
    """DRF's DateTimeField output: in the server's time zone, ``Z`` for UTC."""
    text = moment.astimezone(zone).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _replace_query(url: str, key: str, value: object | None) -> str:
    """DRF's replace_query_param / remove_query_param (sorted keys)."""
    scheme, netloc, path, query, fragment = urllib.parse.urlsplit(url)
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if value is None:
        params.pop(key, None)
    else:
        params[key] = [str(value)]
    query = urllib.parse.urlencode(sorted(params.items()), doseq=True)
    return urllib.parse.urlunsplit((scheme, netloc, path, query, fragment))


def _positive_int(text: str | None, default: int, *, strict: bool) -> int:
    try:
        value = int(text) if text is not None else default
    except ValueError:
        return default
    if value < 0 or (strict and value == 0):
        return default
    return value


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
    fields: dict[str, str] | None = None
    """API v2 POST: the posted fields; GET: the query parameters."""
    path: str = V1_PATH


class DsmrReaderServer:
    """DSMR-reader's datalogger API v1 and v2 on 127.0.0.1, in the running loop (see module doc)."""

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
        zone: str = "Europe/Amsterdam",
        v2_reject: Callable[[dict[str, str]], dict[str, list[str]] | None] | None = None,
        flap_rate: float = 0.2,
        flap_seed: int | str = 0,
        redirect_to: str | None = None,
    ) -> None:
        self._check_mode(mode)
        self.api_key = api_key
        self.host = host
        self.port = port
        self.delay = delay
        self.workers: int | None = None
        """At most this many requests processed at once (like DSMR-reader's web workers); None:
        no limit. With ``delay`` it makes a server whose capacity a client can be measured by."""
        self._worker_slots: asyncio.Semaphore | None = None
        self.retry_after = retry_after
        self.poison = poison
        self.poison_answer = poison_answer
        self.html500_page = html500_page
        self.hang_outcome = hang_outcome
        self.received: list[str] = []
        self.readings: list[dict[str, str]] = []
        self.zone = ZoneInfo(zone)
        self.v2_reject = v2_reject
        """Called with a valid reading's fields: an error body to answer 400 with, or None."""
        self.flap_rate = flap_rate
        self._flaps = random.Random(flap_seed)
        self.redirect_to = redirect_to
        self.answers: list[Served] = []
        self.requests = 0
        self.hanging = 0
        self._mode = mode
        self.hang_after: int | None = None
        """Once this many telegrams and readings are stored, the mode becomes ``hang``: a test
        that must interrupt a client mid-run gets it held there, however slow the machine."""
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
        self.app.router.add_route("*", V2_PATH, self._datalogger_v2)
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
        """Forget what arrived (received, readings, answers, request count); the mode stays."""
        self.received.clear()
        self.readings.clear()
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
        async with self._worker():
            await self._delay_or_hang(request)
        redirect = self._redirect(request)
        if redirect is not None:
            status, body, location = redirect
            self.answers.append(Served(status, body, telegram, auth, "redirect"))
            return web.Response(
                status=status, text=body, headers=location, content_type="text/html"
            )
        status, body, reason = self._decide(auth, telegram)
        headers: dict[str, str] = {}
        content_type = "text/html"
        if status == 201:
            assert telegram is not None
            self.received.append(telegram)
            self._maybe_hang()
        elif status == 405:
            headers["Allow"] = "POST"
        elif status == 429:
            headers["Retry-After"] = str(self.retry_after)
            content_type = "text/plain"
        self.answers.append(Served(status, body, telegram, auth, reason))
        return web.Response(
            status=status, text=body, headers=headers, content_type=content_type, charset="utf-8"
        )

    def _worker(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A worker slot for one request's processing (see ``workers``)."""
        if self.workers is None:
            return contextlib.nullcontext()
        if self._worker_slots is None:
            self._worker_slots = asyncio.Semaphore(self.workers)
        return self._worker_slots

    async def _delay_or_hang(self, request: web.Request) -> None:
        """Apply ``delay``; in ``hang`` wait for release, then drop the request or go on."""
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

    def _decide(self, auth: str | None, telegram: str | None) -> tuple[int, str, str]:
        forced = {
            "html500": (500, self._html500(), "html500"),
            "parse_failure": (500, PARSE_FAILURE, "parse_failure"),
            "bad_request": (400, INVALID_DATA, "bad_request"),
            "forbidden": (403, INVALID_AUTH, "forbidden"),
            "disabled": (405, API_DISABLED, "disabled"),
            "rate_limited": (429, "Too Many Requests", "rate_limited"),
            "proxy_bad_request": (400, PROXY_400_PAGE, "proxy_bad_request"),
            "captive_portal": (200, PORTAL_PAGE, "captive_portal"),
        }
        if self._mode in forced:
            return forced[self._mode]
        if self._flapped():
            return 500, self._html500(), "flapping"
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

    def seed(self, flap_seed: int | str) -> None:
        """Restart the ``flapping`` draws from this seed."""
        self._flaps = random.Random(flap_seed)

    def _flapped(self) -> bool:
        """In ``flapping`` mode: does this request fail? (One draw per request, in order.)"""
        return self._mode == "flapping" and self._flaps.random() < self.flap_rate

    def _redirect(self, request: web.Request) -> tuple[int, str, dict[str, str]] | None:
        if self._mode != "redirect":
            return None
        base = self.redirect_to or f"https://{self.host}:{self.port}"
        return 301, "<h1>301 Moved Permanently</h1>", {"Location": base + request.path_qs}

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

    # --- API v2 (Django REST framework view) ----------------------------------------------------

    async def _datalogger_v2(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if request.method not in ("GET", "POST"):
            detail = {"detail": f'Method "{request.method}" not allowed.'}
            body = json.dumps(detail)
            self.answers.append(
                Served(405, body, None, None, f"method {request.method}", path=V2_PATH)
            )
            return web.json_response(detail, status=405, headers={"Allow": "GET, POST"})
        auth = self._auth(request)
        if request.method == "POST":
            fields = await self._v2_form(request)
        else:
            fields = self._v2_query(request)
        await self._delay_or_hang(request)
        redirect = self._redirect(request)
        if redirect is not None:
            status, text, location = redirect
            self.answers.append(Served(status, text, None, auth, "redirect", fields, V2_PATH))
            return web.Response(
                status=status, text=text, headers=location, content_type="text/html"
            )
        forced = self._v2_forced()
        if forced is not None:
            status, text, reason, content_type = forced
        elif auth is None:
            status, text, reason = 403, json.dumps({"detail": INVALID_AUTH}), "bad or missing key"
            content_type = "application/json"
        elif request.method == "POST":
            status, text, reason = self._v2_create(fields)
            content_type = "application/json"
        else:
            status, text, reason = self._v2_list(request, fields)
            content_type = "application/json"
        headers: dict[str, str] = {}
        if status == 405:
            headers["Allow"] = "GET, POST"
        elif status == 429:
            headers["Retry-After"] = str(self.retry_after)
        self.answers.append(Served(status, text, None, auth, reason, fields, V2_PATH))
        return web.Response(
            status=status, text=text, headers=headers, content_type=content_type, charset="utf-8"
        )

    def _v2_forced(self) -> tuple[int, str, str, str] | None:
        html, text, data = "text/html", "text/plain", "application/json"
        forced = {
            "html500": (500, self._html500(), "html500", html),
            "parse_failure": (500, PARSE_FAILURE, "parse_failure", html),
            "bad_request": (
                400,
                json.dumps({"non_field_errors": [INVALID_DATA]}),
                "bad_request",
                data,
            ),
            "forbidden": (403, json.dumps({"detail": INVALID_AUTH}), "forbidden", data),
            "disabled": (405, API_DISABLED, "disabled", html),
            "rate_limited": (429, "Too Many Requests", "rate_limited", text),
            "proxy_bad_request": (400, PROXY_400_PAGE, "proxy_bad_request", html),
            "captive_portal": (200, PORTAL_PAGE, "captive_portal", html),
        }
        if self._flapped():
            return 500, self._html500(), "flapping", html
        return forced.get(self._mode)

    def _v2_create(self, fields: dict[str, str]) -> tuple[int, str, str]:
        errors = v2_errors(fields)
        if not errors and self.v2_reject is not None:
            errors = self.v2_reject(dict(fields)) or {}
        if errors:
            return 400, json.dumps(errors), "invalid: " + ", ".join(errors)
        self.readings.append(dict(fields))
        self._maybe_hang()
        return 201, json.dumps(self.render(len(self.readings) - 1)), ""

    def _maybe_hang(self) -> None:
        if (
            self.hang_after is not None
            and len(self.received) + len(self.readings) >= self.hang_after
        ):
            self.hang_after = None
            self._set_mode("hang")

    def render(self, index: int) -> dict[str, Any]:
        """Reading ``index`` of ``readings`` as DSMR-reader's JSON shows it."""
        fields = self.readings[index]
        values, _ = clean_v2(fields)
        shown: dict[str, Any] = {"id": index + 1}
        for name in V2_FIELDS:
            value = values.get(name, fields.get(name))
            if isinstance(value, datetime) and value.tzinfo is not None:
                value = render_datetime(value, self.zone)
            elif isinstance(value, Decimal):
                value = f"{value:f}"
            shown[name] = value
        return shown

    def _instant(self, index: int) -> datetime | None:
        value = clean_v2(self.readings[index])[0].get("timestamp")
        return value if isinstance(value, datetime) else None

    def _filter_time(self, text: str) -> datetime | None:
        """django-filter's forms.DateTimeField: ISO-8601 or Django's input formats, naive = zone."""
        text = text.strip()
        moment = parse_datetime(text)
        if moment is None:
            for pattern in _FORM_FORMATS:
                with contextlib.suppress(ValueError):
                    moment = datetime.strptime(text, pattern)
                    break
        if moment is None:
            return None
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=self.zone)

    def _v2_list(self, request: web.Request, query: dict[str, str]) -> tuple[int, str, str]:
        bounds: dict[str, datetime] = {}
        errors: dict[str, list[str]] = {}
        for name in ("timestamp__gte", "timestamp__lte"):
            text = query.get(name, "")
            if not text:
                continue
            moment = self._filter_time(text)
            if moment is None:
                errors[name] = [FILTER_DATETIME_INVALID]
            else:
                bounds[name] = moment
        if errors:
            return 400, json.dumps(errors), "invalid filter: " + ", ".join(errors)
        chosen: list[tuple[datetime, int]] = []
        for index in range(len(self.readings)):
            instant = self._instant(index)
            if instant is None:
                continue
            if "timestamp__gte" in bounds and instant < bounds["timestamp__gte"]:
                continue
            if "timestamp__lte" in bounds and instant > bounds["timestamp__lte"]:
                continue
            chosen.append((instant, index))
        terms = [t.strip() for t in query.get("ordering", "").split(",")]
        valid = [t for t in terms if t in ("timestamp", "-timestamp")]
        descending = bool(valid) and valid[0] == "-timestamp"
        chosen.sort(key=lambda pair: pair[0], reverse=descending)
        limit = _positive_int(query.get("limit"), DEFAULT_LIMIT, strict=True)
        offset = _positive_int(query.get("offset"), 0, strict=False)
        count = len(chosen)
        page = chosen[offset : offset + limit]
        url = f"{request.scheme}://{request.host}{request.raw_path}"
        following = None
        if offset + limit < count:
            following = _replace_query(
                _replace_query(url, "limit", limit), "offset", offset + limit
            )
        previous = None
        if offset > 0:
            previous = _replace_query(url, "limit", limit)
            back = offset - limit
            previous = _replace_query(previous, "offset", back if back > 0 else None)
        answer = {
            "count": count,
            "next": following,
            "previous": previous,
            "results": [self.render(index) for _, index in page],
        }
        return 200, json.dumps(answer), "list"

    @staticmethod
    async def _v2_form(request: web.Request) -> dict[str, str]:
        """The posted fields as DRF's parsers give them (form, multipart or JSON; last wins)."""
        if request.content_type == "multipart/form-data":
            form = await request.post()
            return {key: value for key, value in form.items() if isinstance(value, str)}
        body = await request.read()
        if request.content_type == "application/json":
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                return {}
            if not isinstance(data, dict):
                return {}
            return {k: v if v is None else str(v) for k, v in data.items()}  # type: ignore[misc]
        if request.content_type != "application/x-www-form-urlencoded":
            return {}
        pairs = urllib.parse.parse_qsl(
            body.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="replace"
        )
        return dict(pairs)

    @staticmethod
    def _v2_query(request: web.Request) -> dict[str, str]:
        """The query string decoded as Django does: ``+`` is a space, last value wins."""
        query = request.raw_path.partition("?")[2]
        return dict(urllib.parse.parse_qsl(query, keep_blank_values=True))

    # --- control (process mode) ------------------------------------------------------------

    def _control_app(self) -> web.Application:
        app = web.Application()
        self._add_control_routes(app)
        return app

    def _add_control_routes(self, app: web.Application) -> None:
        app.router.add_post("/_control", self._control_post)
        app.router.add_get("/_control", self._control_get)
        app.router.add_get("/_received", self._received_get)
        app.router.add_get("/_readings", self._readings_get)

    def state(self) -> dict[str, Any]:
        return {
            "mode": self._mode,
            "port": self.port,
            "control_port": self.control_port,
            "requests": self.requests,
            "received": len(self.received),
            "readings": len(self.readings),
            "hanging": self.hanging,
            "delay": self.delay,
            "workers": self.workers,
            "retry_after": self.retry_after,
            "hang_outcome": self.hang_outcome,
            "flap_rate": self.flap_rate,
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
            needle = changes["poison_substring"]  # a string, or a list: any of them
            needles = [needle] if isinstance(needle, str) else needle
            self.poison = (
                None if needle is None else (lambda telegram: any(n in telegram for n in needles))
            )
        if "v2_reject_timestamps" in changes:
            self.v2_reject = _reject_timestamps(changes["v2_reject_timestamps"])
        for key in (
            "poison_answer",
            "delay",
            "retry_after",
            "hang_outcome",
            "flap_rate",
            "hang_after",
        ):
            if key in changes:
                setattr(self, key, changes[key])
        if "redirect_to" in changes:
            self.redirect_to = changes["redirect_to"]
        if "flap_seed" in changes:
            self.seed(changes["flap_seed"])
        if "workers" in changes:
            self.workers, self._worker_slots = changes["workers"], None
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

    async def _readings_get(self, request: web.Request) -> web.Response:
        return web.json_response(self.readings)


def _reject_timestamps(
    stamps: list[str] | None,
) -> Callable[[dict[str, str]], dict[str, list[str]] | None] | None:
    """A ``v2_reject`` refusing readings with these exact timestamps (process-mode control)."""
    if not stamps:
        return None
    refused = set(stamps)

    def reject(fields: dict[str, str]) -> dict[str, list[str]] | None:
        if fields.get("timestamp") in refused:
            return {"timestamp": ["Rejected by the test (v2_reject_timestamps)."]}
        return None

    return reject


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
        """POST /_control: mode=, poison_substring=, v2_reject_timestamps=, reset=True, ..."""
        return self._call("/_control", changes)

    def state(self) -> dict[str, Any]:
        return self._call("/_control")

    def received(self) -> list[str]:
        return self._call("/_received")

    def readings(self) -> list[dict[str, str]]:
        return self._call("/_readings")

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
