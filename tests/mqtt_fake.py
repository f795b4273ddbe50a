"""A scripted MQTT 5 broker on 127.0.0.1: what a real Mosquitto cannot be made to do.

Mosquitto answers a PUBLISH it takes with PUBACK 0x00 and one it refuses with 0x87 (ACL) or
0x95 (size). A broker whose storage or plugin fails after it took the connection answers
0x80 (unspecified) or 0x83 (implementation specific) to every message: EMQX and HiveMQ do when
a hook or an extension fails. ``ScriptedBroker`` takes CONNECT and PUBLISH packets like a broker
and answers each PUBLISH with the reason code ``answer(topic, payload)`` gives (None: no PUBACK at
all), recording what it was sent. Used with the project's real client and sink, never mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType

from dsmr_logger.net import mqtt


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length) if length else b""


class ScriptedBroker:
    """Accepts every CONNECT (CONNACK 0x00); answers each PUBLISH as ``answer`` says."""

    def __init__(self, answer: Callable[[str, bytes], int | None] = lambda t, p: 0) -> None:
        self.answer = answer
        self.published: list[tuple[str, bytes]] = []
        """Every PUBLISH received, in order, whatever it was answered."""
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> ScriptedBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.published]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            first, _ = await read_packet(reader)
            if first & 0xF0 != mqtt.CONNECT:
                return
            writer.write(mqtt.packet(mqtt.CONNACK, b"\x00\x00\x00"))
            while True:
                first, body = await read_packet(reader)
                kind = first & 0xF0
                if kind == mqtt.PUBLISH:
                    self._publish(first, body, writer)
                elif kind == mqtt.PINGREQ:
                    writer.write(bytes((mqtt.PINGRESP, 0)))
                elif kind == mqtt.DISCONNECT:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def _publish(self, first: int, body: bytes, writer: asyncio.StreamWriter) -> None:
        qos = (first >> 1) & 0x03
        fields = mqtt._Reader(body)
        topic = fields.string()
        ident = fields.integer(2) if qos else 0
        fields.properties()
        payload = fields.take(fields.left())
        self.published.append((topic, payload))
        code = self.answer(topic, payload)
        if qos and code is not None:
            writer.write(mqtt.packet(mqtt.PUBACK, ident.to_bytes(2, "big") + bytes((code, 0))))
