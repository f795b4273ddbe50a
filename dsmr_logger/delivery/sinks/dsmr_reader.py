"""DSMR-reader's datalogger API: v1 (the raw telegram) and v2 (parsed fields).

``POST {url}/api/v1/datalogger/dsmrreading`` takes ``telegram=`` form-encoded byte for byte (every
CR and LF kept), so DSMR-reader's own parser and CRC check see exactly what the meter sent.
``POST {url}/api/v2/datalogger/dsmrreading`` takes the reading's fields with an explicit
timestamp: it serves meters DSMR-reader cannot parse itself (Swedish, Austrian, ...) and backfills.
One keep-alive ``aiohttp`` session per sink.
"""

from __future__ import annotations

import re
import urllib.parse
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import aiohttp
import structlog

from dsmr_logger import __version__
from dsmr_logger.config import DsmrReaderSinkConfig
from dsmr_logger.delivery.answers import Answer, Verdict, classify, no_answer
from dsmr_logger.delivery.sinks import Telegram
from dsmr_logger.telegram.obis import ParseError, parse
from dsmr_logger.telegram.v2 import MappingError, to_v2

_DIGITS = re.compile(r"\d+")

V1_PATH = "/api/v1/datalogger/dsmrreading"
V2_PATH = "/api/v2/datalogger/dsmrreading"
MAX_BODY = 64 * 1024


class DsmrReaderSink:
    """Shared by both API versions: session, headers, posting, and reading the answer."""

    path = V1_PATH

    def __init__(self, config: DsmrReaderSinkConfig) -> None:
        self.name = config.name
        self.config = config
        self.endpoint = config.url + self.path
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() first"
        return self._session

    def headers(self) -> dict[str, str]:
        key = self.config.api_key
        auth = (
            {"X-AUTHKEY": key}
            if self.config.auth_header == "x-authkey"
            else {"Authorization": f"Token {key}"}
        )
        return {
            **auth,
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": f"dsmr-logger/{__version__}",
        }

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_in_flight + 1,  # + the poison probe
            ssl=self.config.verify_tls,  # True: verify certificates (the default)
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers(),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            raise_for_status=False,
        )

    def form(self, item: Telegram) -> str | Answer:
        """The request body, or the answer that it cannot be sent at all."""
        return urllib.parse.urlencode({"telegram": item.telegram})

    async def send(self, item: Telegram) -> Answer:
        assert self._session is not None, "start() first"
        body = self.form(item)
        if isinstance(body, Answer):
            return body
        try:
            async with self._session.post(self.endpoint, data=body) as response:
                text = (await response.content.read(MAX_BODY)).decode("utf-8", "replace")
                return classify(response.status, text, response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return no_answer(exc)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class DsmrReaderV1Sink(DsmrReaderSink):
    path = V1_PATH


class DsmrReaderV2Sink(DsmrReaderSink):
    """Parses and maps each telegram itself; one that cannot be mapped is dead-lettered."""

    path = V2_PATH

    def __init__(self, config: DsmrReaderSinkConfig, *, zone: ZoneInfo) -> None:
        super().__init__(config)
        self.zone = zone
        self._told: set[str] = set()
        self._log = structlog.get_logger("dsmr_logger.delivery").bind(sink=config.name)

    def form(self, item: Telegram) -> str | Answer:
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
        return urllib.parse.urlencode(mapped.fields)
