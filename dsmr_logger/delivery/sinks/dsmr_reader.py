"""DSMR-reader's datalogger API: v1 (the raw telegram) and v2 (parsed fields).

``POST {url}/api/v1/datalogger/dsmrreading`` takes ``telegram=`` form-encoded byte for byte (every
CR and LF kept), so DSMR-reader's own parser and CRC check see exactly what the meter sent.
``POST {url}/api/v2/datalogger/dsmrreading`` takes the reading's fields with an explicit
timestamp: it serves meters DSMR-reader cannot parse itself (Swedish, Austrian, ...) and backfills.
A success is DSMR-reader's own: v1 answers 201 (200 before v1.6) with an empty body, v2 the stored
reading as a JSON object (with its ``timestamp``). A 2xx with any other body (a captive portal's
login page, a JSON error from some gateway) stored nothing: confirming it would lose the telegram,
so the sink is misconfigured.
Each sink holds its own keep-alive connections (``net/http.py``): a telegram a second for years
is the whole workload, so every microsecond and MiB of the client counts on a Raspberry Pi.
"""

from __future__ import annotations

import re
import urllib.parse
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import structlog

from dsmr_logger import __version__
from dsmr_logger.config import DsmrReaderSinkConfig
from dsmr_logger.delivery.answers import (
    Answer,
    Verdict,
    absolute_location,
    classify,
    no_answer,
)
from dsmr_logger.delivery.sinks import Telegram
from dsmr_logger.net.http import HttpClient, parse_json
from dsmr_logger.telegram.obis import ParseError, parse
from dsmr_logger.telegram.v2 import MappingError, to_v2

_DIGITS = re.compile(r"\d+")

V1_PATH = "/api/v1/datalogger/dsmrreading"
V2_PATH = "/api/v2/datalogger/dsmrreading"
MAX_BODY = 64 * 1024
FORM = "application/x-www-form-urlencoded"
PROBE_QUERY = V2_PATH + "?timestamp__gte=2999-01-01T00:00:00Z&limit=1"
NOT_DSMR = (
    "the server answered success with a body DSMR-reader never sends, so nothing counts as "
    "stored: not DSMR-reader (a captive portal, a router's login page or another web server at "
    "that address?); check the sink's url"
)

_UNRESERVED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~"
_ESCAPED = [b"%%%02X" % byte for byte in range(256)]


def v1_form(telegram: bytes) -> bytes:
    """``telegram=<telegram>`` form-encoded, byte-identical to ``urlencode({"telegram": ...})``.

    ``urlencode`` escapes byte by byte in Python. A telegram holds only a dozen distinct bytes
    that need escaping (CR, LF, ``/()*:!``...), so this finds them with one C-level
    ``translate`` and replaces each with one C-level ``replace``: ``%`` first (the escapes
    bring in new ones), space last (its ``+`` must not be escaped). About 40 -> 10 µs for a
    778-byte telegram (``bench/hot_paths.py``); at worst one pass per byte value present.
    """
    unsafe = set(telegram.translate(None, _UNRESERVED))
    body = telegram.replace(b"%", b"%25") if 0x25 in unsafe else telegram
    for byte in unsafe - {0x25, 0x20}:
        body = body.replace(bytes((byte,)), _ESCAPED[byte])
    if 0x20 in unsafe:
        body = body.replace(b" ", b"+")
    return b"telegram=" + body


def answer_text(body: bytes, api_key: str) -> str:
    """An answer's body as text, without the API key: a proxy's or a debug page may echo the
    request's headers, and the body goes on to logs, ``/status`` and dead letters."""
    return body.decode("utf-8", "replace").replace(api_key, "****")


class DsmrReaderSink:
    """Shared by both API versions: connections, headers, posting, and reading the answer."""

    path = V1_PATH

    def __init__(self, config: DsmrReaderSinkConfig) -> None:
        self.name = config.name
        self.config = config
        self.endpoint = config.url + self.path
        self._client: HttpClient | None = None

    def headers(self) -> dict[str, str]:
        key = self.config.api_key
        auth = (
            {"X-AUTHKEY": key}
            if self.config.auth_header == "x-authkey"
            else {"Authorization": f"Token {key}"}
        )
        return {**auth, "User-Agent": f"dsmr-logger/{__version__}"}

    async def start(self) -> None:
        self._client = HttpClient(
            self.config.url,
            timeout=self.config.timeout,
            max_connections=self.config.max_in_flight + 1,  # + the health probe
            headers=self.headers(),
            verify_tls=self.config.verify_tls,  # True: verify certificates (the default)
            max_body=MAX_BODY,
        )

    def form(self, item: Telegram) -> bytes | Answer:
        """The request body, or the answer that it cannot be sent at all."""
        return v1_form(item.telegram)

    async def send(self, item: Telegram) -> Answer:
        assert self._client is not None, "start() first"
        body = self.form(item)
        if isinstance(body, Answer):
            return body
        try:
            response = await self._client.post(self.path, body, FORM)
        except (TimeoutError, OSError) as exc:
            return no_answer(exc)
        text = answer_text(response.body, self.config.api_key)
        answer = classify(
            response.status,
            text,
            response.headers.get("retry-after"),
            location=absolute_location(self.endpoint, response.headers.get("location")),
            api_path=self.path,
        )
        if answer.verdict is Verdict.DELIVERED and not self.stored(text):
            # A captive portal's or a router's page: stored nowhere, so it must not be
            # confirmed (it would be gone). Kept queued until DSMR-reader itself answers.
            return Answer(
                Verdict.MISCONFIGURED,
                response.status,
                text[:2000],
                maybe_stored=True,
                hint=NOT_DSMR,
            )
        return answer

    def stored(self, text: str) -> bool:
        """A success answer DSMR-reader sends: v1's is empty (201; 200 before v1.6)."""
        return not text.strip()

    async def probe(self) -> Answer:
        """Does DSMR-reader answer, database included? DELIVERED if so; stores nothing.

        A read of API v2's reading list, narrowed to readings after the year 2999 (none, found by
        an indexed column): the same key, the same API switch and the same database as a post.
        The worker asks it after an ambiguous HTML 500, to tell a poison telegram (the server
        answers this) from an outage (it does not).
        """
        assert self._client is not None, "start() first"
        try:
            response = await self._client.get(PROBE_QUERY)
        except (TimeoutError, OSError) as exc:
            return no_answer(exc)
        text = answer_text(response.body, self.config.api_key)
        if response.status == 200 and _is_reading_list(text):
            return Answer(Verdict.DELIVERED, 200)
        answer = classify(response.status, text)
        if answer.verdict is Verdict.DELIVERED:
            return Answer(Verdict.RETRY, response.status, text[:2000], error="not DSMR-reader")
        return answer

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _is_reading(text: str) -> bool:
    try:
        document = parse_json(text.encode())
    except ValueError:
        return False
    return isinstance(document, dict) and "timestamp" in document


def _is_reading_list(text: str) -> bool:
    try:
        document = parse_json(text.encode())
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("results"), list)


class DsmrReaderV1Sink(DsmrReaderSink):
    path = V1_PATH


class DsmrReaderV2Sink(DsmrReaderSink):
    """Parses and maps each telegram itself; one that cannot be mapped is dead-lettered."""

    path = V2_PATH

    def stored(self, text: str) -> bool:
        """v2's success answer is the stored reading: a JSON object with its timestamp."""
        return _is_reading(text)

    def __init__(self, config: DsmrReaderSinkConfig, *, zone: ZoneInfo) -> None:
        super().__init__(config)
        self.zone = zone
        self._told: set[str] = set()
        self._log = structlog.get_logger("dsmr_logger.delivery").bind(sink=config.name)

    def form(self, item: Telegram) -> bytes | Answer:
        received = datetime.fromtimestamp(item.received_at, UTC)
        try:
            mapped = to_v2(
                parse(item.telegram, zone=self.zone),
                gas_channel=self.config.gas_channel,
                received_at=received,
            )
        except (ParseError, MappingError) as exc:
            return Answer(Verdict.REJECTED, error=f"cannot map to API v2: {exc}")
        for note in mapped.notes:
            kind = _DIGITS.sub("#", note)  # a note carrying a changing value is still one note
            if kind not in self._told:  # e.g. "no timestamp: using the receive time", once
                self._told.add(kind)
                self._log.info("v2 mapping note", note=note)
        return urllib.parse.urlencode(mapped.fields).encode("ascii")
