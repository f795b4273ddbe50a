"""DSMR-reader's datalogger API v1: ``POST {url}/api/v1/datalogger/dsmrreading``, ``telegram=``.

One keep-alive ``aiohttp`` session per sink. The raw telegram is form-encoded byte for byte (every
CR and LF kept), so DSMR-reader's own CRC check sees exactly what the meter sent.
"""

from __future__ import annotations

import urllib.parse

import aiohttp

from dsmr_logger import __version__
from dsmr_logger.config import DsmrReaderSinkConfig
from dsmr_logger.delivery.answers import Answer, classify, no_answer
from dsmr_logger.delivery.sinks import Telegram

V1_PATH = "/api/v1/datalogger/dsmrreading"
MAX_BODY = 64 * 1024


class DsmrReaderV1Sink:
    def __init__(self, config: DsmrReaderSinkConfig) -> None:
        self.name = config.name
        self.config = config
        self.endpoint = config.url + V1_PATH
        self._session: aiohttp.ClientSession | None = None

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
            limit=4, ssl=None if self.config.verify_tls else False, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers(),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            raise_for_status=False,
        )

    async def send(self, item: Telegram) -> Answer:
        assert self._session is not None, "start() first"
        body = urllib.parse.urlencode({"telegram": item.telegram})
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
