"""The project's MQTT client: MQTT 5, where every message is acknowledged or fails.

Why not aiomqtt or paho-mqtt (measured against Mosquitto 2.0.11; ``bench/RESULTS.md``, issue 17):

- aiomqtt 2.5.1 drops the reason code of a PUBACK. A publish the broker refuses (MQTT 5 PUBACK
  ``0x87 not authorized``: the account may not write that topic) returns like a stored one, so a
  reading would leave the spool and be lost without a word.
- aiomqtt does not fail a publish awaiting its PUBACK when the connection breaks: after the broker
  was killed, the publish waited out its whole 15 s timeout.
- paho-mqtt 2.2.0 (which aiomqtt wraps) takes Mosquitto's answer to a message over its
  ``message_size_limit`` (PUBACK ``0x95``) for a malformed packet and drops the connection: the
  telegram would be retried forever instead of dead-lettered, blocking the queue behind it.
- MQTT 3.1.1 cannot say no at all: Mosquitto acknowledges an ACL-denied or oversized PUBLISH like
  a stored one and drops it. So this client speaks MQTT 5 only (Mosquitto >= 1.6, EMQX, HiveMQ,
  VerneMQ, NanoMQ, the Home Assistant add-on).

What a telegram sink needs is small: CONNECT (clean start, last will, credentials), PUBLISH at QoS
0 or 1, PUBACK with its reason code, PINGREQ to keep an idle connection alive, DISCONNECT, and TLS.
A publisher keeps no session state: the spool is the session, so a message not acknowledged on
this connection is simply sent again on the next one.

What the MQTT meter source (``sources/mqtt_in.py``) adds is as small: CONNECT without Clean Start
and with a Session Expiry Interval (the broker keeps the subscription, and queues QoS 1 messages
while the client is away), SUBSCRIBE and UNSUBSCRIBE with the broker's reason codes (a topic its
ACL denies is SUBACK 0x87, not a silence), and PUBLISH received at QoS 0 or 1, handed to
``on_message`` in the order the broker sent them and acknowledged (PUBACK) only after
``on_message`` returned: a message it could not take stays with the broker, which sends it again
on the next connection. No QoS 2 either way (the broker downgrades a QoS 2 message to the
subscription's QoS 1).

Failures are mapped, as ``net/http.py`` does, into a small hierarchy of ``OSError``s that says what
at-least-once delivery needs to know: ``ConnectError`` (never sent: no connection, TLS failed, no
CONNACK in time), ``Refused`` (the broker said no to the connection: credentials, client id,
protocol), ``TooLarge`` (never sent: larger than the broker's announced Maximum Packet Size),
``ConnectionLost`` (sent, the connection ended before its PUBACK: maybe stored) and ``AckTimeout``
(sent, no PUBACK in time: maybe stored; the connection is closed, since its state is unknown).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROTOCOL_LEVEL = 5
MAX_INCOMING = 64 * 1024
"""A publisher gets only CONNACK, PUBACK, PINGRESP and DISCONNECT (small packets); a subscriber
announces this as its Maximum Packet Size, and the broker sends no larger PUBLISH (it drops it)."""

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 0x82, 0x90, 0xA2, 0xB0
PINGREQ, PINGRESP, DISCONNECT = 0xC0, 0xD0, 0xE0

REASONS: dict[int, str] = {
    0x00: "success",
    0x01: "granted QoS 1",
    0x02: "granted QoS 2",
    0x10: "no matching subscribers",
    0x11: "no subscription existed",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x98: "administrative action",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}


def reason_text(code: int) -> str:
    return f"0x{code:02X} {REASONS.get(code, 'unknown reason')}"


class MqttError(OSError):
    """No acknowledgement. The subclass says whether the message may have reached the broker."""

    maybe_sent = True
    reason: int | None = None
    """The broker's reason code, when it gave one (CONNACK or DISCONNECT)."""


class ConnectError(MqttError):
    """Not sent: no connection (refused, unreachable, name unknown, TLS failed, no CONNACK)."""

    maybe_sent = False


class ConnectTimeout(ConnectError, TimeoutError):
    """Not sent: no connection or no CONNACK within the timeout."""


class Refused(ConnectError):
    """The broker answered CONNECT with a reason code of 0x80 or more (``reason``)."""

    def __init__(self, reason: int, detail: str | None = None) -> None:
        text = f"broker refused the connection: CONNACK {reason_text(reason)}"
        super().__init__(f"{text} ({detail})" if detail else text)
        self.reason = reason


class NotConnected(MqttError):
    """Not sent: the connection had already ended."""

    maybe_sent = False


class TooLarge(MqttError):
    """Not sent: the packet exceeds the Maximum Packet Size the broker announced."""

    maybe_sent = False


class ConnectionLost(MqttError):
    """Sent, and the connection ended before the PUBACK came: the broker may have stored it."""

    def __init__(self, message: str, reason: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class AckTimeout(MqttError, TimeoutError):
    """Sent, and no PUBACK within the timeout: the broker may have stored it."""


class ProtocolError(MqttError):
    """The broker broke MQTT 5 (a packet this client cannot read)."""


class NotTaken(MqttError):
    """``on_message`` raised: the message was not acknowledged, and the connection was ended so
    that the broker sends it again (its cause is the handler's exception)."""


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes when this client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool
    """The broker kept this client id's session (its subscriptions and queued messages)."""
    max_packet_size: int | None
    receive_maximum: int
    maximum_qos: int
    retain_available: bool
    assigned_client_id: str | None
    session_expiry: int | None = None
    """The broker's own Session Expiry Interval, when it overrides the one asked for."""


@dataclass(frozen=True, slots=True)
class PubAck:
    """The broker's answer to one PUBLISH: below 0x80 it took the message."""

    reason: int
    reason_string: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason < 0x80

    def describe(self) -> str:
        text = f"PUBACK {reason_text(self.reason)}"
        return f"{text} ({self.reason_string})" if self.reason_string else text


@dataclass(frozen=True, slots=True)
class SubAck:
    """The broker's answer to one SUBSCRIBE (SUBACK) or UNSUBSCRIBE (UNSUBACK) of one topic
    filter: below 0x80 done (for a SUBSCRIBE, the QoS granted); 0x80 and above refused."""

    reason: int
    reason_string: str | None = None
    packet: str = "SUBACK"

    @property
    def accepted(self) -> bool:
        return self.reason < 0x80

    def describe(self) -> str:
        text = f"{self.packet} {reason_text(self.reason)}"
        return f"{text} ({self.reason_string})" if self.reason_string else text


@dataclass(frozen=True, slots=True)
class Message:
    """One PUBLISH the broker sent this client."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    """The broker sent it before, on an earlier connection, without getting its PUBACK."""
    packet_id: int | None
    """Set for QoS 1: the identifier its PUBACK carries."""


# --- encoding ------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """MQTT's Variable Byte Integer (at most 268,435,455)."""
    if not 0 <= value <= 268_435_455:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError("string longer than 65,535 bytes")
    return len(data).to_bytes(2, "big") + data


def binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65,535 bytes")
    return len(data).to_bytes(2, "big") + data


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


NO_PROPERTIES = b"\x00"


def connect_packet(
    client_id: str,
    *,
    keepalive: int,
    username: str | None = None,
    password: str | None = None,
    will: Will | None = None,
    clean_start: bool = True,
    session_expiry: int = 0,
    receive_maximum: int | None = None,
    maximum_packet_size: int | None = None,
) -> bytes:
    """CONNECT; by default with Clean Start and no session kept (Session Expiry Interval 0).

    A subscriber that wants what was published while it was away asks for ``clean_start=False``
    and a ``session_expiry`` in seconds (0xFFFFFFFF: never expires).
    """
    flags = 0x02 if clean_start else 0x00
    payload = utf8(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += NO_PROPERTIES + utf8(will.topic) + binary(will.payload)
    if username is not None:
        flags |= 0x80
        payload += utf8(username)
    if password is not None:
        flags |= 0x40
        payload += binary(password.encode("utf-8"))
    header = utf8("MQTT") + bytes((PROTOCOL_LEVEL, flags)) + keepalive.to_bytes(2, "big")
    props = b""
    if session_expiry:
        props += bytes((SESSION_EXPIRY,)) + session_expiry.to_bytes(4, "big")
    if receive_maximum is not None:
        props += bytes((RECEIVE_MAXIMUM,)) + receive_maximum.to_bytes(2, "big")
    if maximum_packet_size is not None:
        props += bytes((MAXIMUM_PACKET_SIZE,)) + maximum_packet_size.to_bytes(4, "big")
    return packet(CONNECT, header + varint(len(props)) + props + payload)


def publish_packet(topic: str, payload: bytes, *, qos: int, retain: bool, packet_id: int) -> bytes:
    first = PUBLISH | (qos << 1) | (1 if retain else 0)
    ident = packet_id.to_bytes(2, "big") if qos else b""
    return packet(first, utf8(topic) + ident + NO_PROPERTIES + payload)


def subscribe_packet(
    topic_filter: str, *, qos: int, packet_id: int, retain_handling: int = 0
) -> bytes:
    """SUBSCRIBE to one filter. ``retain_handling`` 1: the broker sends its retained message only
    when the subscription is new (not again on every reconnect to a kept session)."""
    options = qos | (retain_handling << 4)
    body = packet_id.to_bytes(2, "big") + NO_PROPERTIES + utf8(topic_filter) + bytes((options,))
    return packet(SUBSCRIBE, body)


def unsubscribe_packet(topic_filter: str, *, packet_id: int) -> bytes:
    return packet(UNSUBSCRIBE, packet_id.to_bytes(2, "big") + NO_PROPERTIES + utf8(topic_filter))


def puback_packet(packet_id: int) -> bytes:
    """PUBACK for a received QoS 1 message; without a reason code, which means success."""
    return packet(PUBACK, packet_id.to_bytes(2, "big"))


# --- decoding ------------------------------------------------------------------------------------

# Property identifier → how its value is encoded (MQTT 5.0, section 2.2.2.2).
_PROPERTY_KINDS: dict[int, str] = {
    0x01: "byte",
    0x02: "four",
    0x03: "str",
    0x08: "str",
    0x09: "bin",
    0x0B: "var",
    0x11: "four",
    0x12: "str",
    0x13: "two",
    0x15: "str",
    0x16: "bin",
    0x17: "byte",
    0x18: "four",
    0x19: "byte",
    0x1A: "str",
    0x1C: "str",
    0x1F: "str",
    0x21: "two",
    0x22: "two",
    0x23: "two",
    0x24: "byte",
    0x25: "byte",
    0x26: "pair",
    0x27: "four",
    0x28: "byte",
    0x29: "byte",
    0x2A: "byte",
}
MAXIMUM_PACKET_SIZE, RECEIVE_MAXIMUM, MAXIMUM_QOS, RETAIN_AVAILABLE = 0x27, 0x21, 0x24, 0x25
ASSIGNED_CLIENT_ID, REASON_STRING, SESSION_EXPIRY = 0x12, 0x1F, 0x11


class _Reader:
    """Reads the fields of one packet's body; running past its end is a ProtocolError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("broker sent a truncated packet")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def integer(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise ProtocolError("broker sent a malformed variable byte integer")

    def string(self) -> str:
        try:
            return self.take(self.integer(2)).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("broker sent a string that is not UTF-8") from None

    def properties(self) -> dict[int, Any]:
        end = self.varint() + self.pos
        found: dict[int, Any] = {}
        while self.pos < end:
            ident = self.varint()
            kind = _PROPERTY_KINDS.get(ident)
            if kind is None:
                raise ProtocolError(f"broker sent unknown property 0x{ident:02X}")
            if kind == "byte":
                found[ident] = self.byte()
            elif kind == "two":
                found[ident] = self.integer(2)
            elif kind == "four":
                found[ident] = self.integer(4)
            elif kind == "var":
                found[ident] = self.varint()
            elif kind == "str":
                found[ident] = self.string()
            elif kind == "bin":
                found[ident] = self.take(self.integer(2))
            else:
                found[ident] = (self.string(), self.string())
        if self.pos != end:
            raise ProtocolError("broker sent properties that overrun their length")
        return found


def parse_connack(body: bytes) -> tuple[int, ConnAck]:
    """(reason code, what the broker announced) from a CONNACK body."""
    if len(body) == 2 and body[1] != 0:
        # An MQTT 3.1.1 broker answers a level-5 CONNECT in its own format: return code 1,
        # "unacceptable protocol version".
        return 0x84, ConnAck(False, None, 0, 0, False, None)
    reader = _Reader(body)
    flags, reason = reader.byte(), reader.byte()
    props = reader.properties() if reader.left() else {}
    return reason, ConnAck(
        session_present=bool(flags & 0x01),
        max_packet_size=props.get(MAXIMUM_PACKET_SIZE),
        receive_maximum=props.get(RECEIVE_MAXIMUM, 65535),
        maximum_qos=props.get(MAXIMUM_QOS, 2),
        retain_available=bool(props.get(RETAIN_AVAILABLE, 1)),
        assigned_client_id=props.get(ASSIGNED_CLIENT_ID),
        session_expiry=props.get(SESSION_EXPIRY),
    )


def parse_puback(body: bytes) -> tuple[int, PubAck]:
    """(packet identifier, answer); a PUBACK of only an identifier means success (0x00)."""
    reader = _Reader(body)
    ident = reader.integer(2)
    reason = reader.byte() if reader.left() else 0
    props = reader.properties() if reader.left() else {}
    return ident, PubAck(reason, props.get(REASON_STRING))


def parse_suback(body: bytes, packet: str = "SUBACK") -> tuple[int, SubAck]:
    """(packet identifier, answer) from a SUBACK or UNSUBACK of one topic filter."""
    reader = _Reader(body)
    ident = reader.integer(2)
    props = reader.properties()
    if reader.left() != 1:
        raise ProtocolError(f"broker sent a {packet} for {reader.left()} topic filters, not 1")
    return ident, SubAck(reader.byte(), props.get(REASON_STRING), packet)


def parse_publish(first: int, body: bytes) -> Message:
    """A PUBLISH the broker sent: flags from the first byte, then topic, id, properties, payload."""
    qos = (first >> 1) & 0x03
    if qos > 1:
        raise ProtocolError(f"broker sent a QoS {qos} PUBLISH; this client subscribes at QoS 1")
    reader = _Reader(body)
    topic = reader.string()
    packet_id = reader.integer(2) if qos else None
    if packet_id == 0:
        raise ProtocolError("broker sent a QoS 1 PUBLISH with packet identifier 0")
    reader.properties()  # topic aliases are off (this client allows none), the rest is not needed
    if not topic:
        raise ProtocolError("broker sent a PUBLISH without a topic name")
    payload = reader.take(reader.left())
    return Message(topic, payload, qos, bool(first & 0x01), bool(first & 0x08), packet_id)


# --- the connection ------------------------------------------------------------------------------


class MqttClient:
    """One connection to one broker, for publishing and (with ``on_message``) subscribing.

    Invariant: every QoS 1 publish awaiting its PUBACK is in ``_pending`` (every SUBSCRIBE or
    UNSUBSCRIBE awaiting its answer in ``_requests``), and the moment the connection ends (broker
    gone, DISCONNECT, keepalive or acknowledgement timeout, ``close``) every one of them fails
    with :class:`ConnectionLost`. A message received is acknowledged only after ``on_message``
    returned, in the order received. A client connects once; after it is lost, make a new one.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: int = 60,
        timeout: float = 10.0,
        will: Will | None = None,
        clock: Callable[[], float] = time.monotonic,
        clean_start: bool = True,
        session_expiry: int = 0,
        receive_maximum: int | None = None,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        """``on_message``: called with each PUBLISH received, on the reading task (it must not
        block); when it returns, a QoS 1 message is acknowledged; when it raises, the connection
        ends with :class:`NotTaken` and the message stays with the broker. Give it to receive
        what a kept session (``clean_start=False``) holds: the broker sends that right after
        CONNACK. ``receive_maximum``: QoS 1 messages the broker may send before their PUBACK."""
        self.host = host
        self.port = port
        self.client_id = client_id
        self._username = username
        self._password = password
        self._tls = tls
        self.keepalive = keepalive
        self.timeout = timeout
        self._will = will
        self._clock = clock
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._receive_maximum = receive_maximum
        self._on_message = on_message
        self.connack: ConnAck | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[PubAck]] = {}
        self._requests: dict[int, asyncio.Future[SubAck]] = {}
        self._ended = asyncio.Event()
        self._closing = False
        self._next_id = 0
        self._window: asyncio.Semaphore | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lost: MqttError | None = None
        self._last_out = 0.0
        self._last_in = 0.0

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._lost is None

    async def connect(self) -> ConnAck:
        """Open the connection and complete CONNECT/CONNACK within ``timeout`` seconds."""
        if self._writer is not None or self._lost is not None:
            raise RuntimeError("an MqttClient connects once; make a new one")
        error: MqttError | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self._open()
                self._writer = writer
                writer.write(
                    connect_packet(
                        self.client_id,
                        keepalive=self.keepalive,
                        username=self._username,
                        password=self._password,
                        will=self._will,
                        clean_start=self._clean_start,
                        session_expiry=self._session_expiry,
                        receive_maximum=self._receive_maximum,
                        maximum_packet_size=MAX_INCOMING if self._on_message else None,
                    )
                )
                first, body = await _read_packet(reader)
            if first & 0xF0 != CONNACK:
                raise ProtocolError(f"{self.where}: expected CONNACK, got packet type {first >> 4}")
            reason, connack = parse_connack(body)
            if reason >= 0x80:
                detail = "it speaks only MQTT 3.1.1 or older" if reason == 0x84 else None
                raise Refused(reason, detail)
        except TimeoutError:
            error = ConnectTimeout(f"{self.where}: no CONNACK within {self.timeout:g} s")
        except asyncio.IncompleteReadError:
            error = ConnectError(f"{self.where}: broker closed the connection before CONNACK")
        except MqttError as exc:
            error = exc
        except OSError as exc:
            error = ConnectError(f"{self.where}: {_os_text(exc)} before CONNACK")
        if error is not None:
            self._end(error)
            raise error
        self.connack = connack
        self._window = asyncio.Semaphore(max(1, connack.receive_maximum))
        self._last_in = self._last_out = self._clock()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop(reader), name="mqtt-read")]
        if self.keepalive:
            self._tasks.append(loop.create_task(self._pinger(), name="mqtt-ping"))
        return connack

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self._tls,
                server_hostname=self.host if self._tls is not None else None,
                limit=MAX_INCOMING,
            )
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(
                f"{self.where}: TLS certificate not trusted: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise ConnectError(f"{self.where}: TLS failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ConnectError(f"{self.where}: {_os_text(exc)}") from None

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PubAck:
        """Send one message; returns the broker's PUBACK (QoS 1) or a success once written (0)."""
        if self._writer is None or self._lost is not None or self.connack is None:
            raise NotConnected(f"{self.where}: not connected") from self._lost
        if qos == 0:
            data = publish_packet(topic, payload, qos=0, retain=retain, packet_id=0)
            self._check_size(data)
            await self._write(data)
            return PubAck(0)
        assert self._window is not None
        async with self._window:  # the broker's Receive Maximum
            ident = self._allocate()
            data = publish_packet(topic, payload, qos=qos, retain=retain, packet_id=ident)
            self._check_size(data)
            answer: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
            self._pending[ident] = answer
            try:
                await self._write(data)
                async with asyncio.timeout(self.timeout):
                    return await answer
            except TimeoutError:
                lost = AckTimeout(f"{self.where}: no PUBACK within {self.timeout:g} s")
                self._end(lost)  # its state is unknown now: a later PUBACK must not be trusted
                raise lost from None
            finally:
                self._pending.pop(ident, None)

    def _check_size(self, data: bytes) -> None:
        limit = self.connack.max_packet_size if self.connack is not None else None
        if limit is not None and len(data) > limit:
            raise TooLarge(
                f"{len(data)}-byte packet: the broker takes at most {limit} bytes "
                "(its Maximum Packet Size)"
            )

    async def subscribe(
        self, topic_filter: str, *, qos: int = 1, retain_handling: int = 0
    ) -> SubAck:
        """SUBSCRIBE to one topic filter; returns the broker's SUBACK (the QoS it granted, or
        its refusal: 0x87 when its ACL denies the filter to this account)."""
        ident = self._allocate()
        data = subscribe_packet(
            topic_filter, qos=qos, packet_id=ident, retain_handling=retain_handling
        )
        return await self._request(ident, data, "SUBACK")

    async def unsubscribe(self, topic_filter: str) -> SubAck:
        """UNSUBSCRIBE one topic filter; the UNSUBACK (0x11: there was no such subscription)."""
        ident = self._allocate()
        return await self._request(
            ident, unsubscribe_packet(topic_filter, packet_id=ident), "UNSUBACK"
        )

    async def _request(self, ident: int, data: bytes, answer_kind: str) -> SubAck:
        if self._writer is None or self._lost is not None or self.connack is None:
            raise NotConnected(f"{self.where}: not connected") from self._lost
        self._check_size(data)
        answer: asyncio.Future[SubAck] = asyncio.get_running_loop().create_future()
        self._requests[ident] = answer
        try:
            await self._write(data)
            async with asyncio.timeout(self.timeout):
                return await answer
        except TimeoutError:
            lost = AckTimeout(f"{self.where}: no {answer_kind} within {self.timeout:g} s")
            self._end(lost)
            raise lost from None
        finally:
            self._requests.pop(ident, None)

    async def wait_lost(self) -> MqttError:
        """Wait until the connection ends; what ended it (``NotConnected`` after ``close``)."""
        await self._ended.wait()
        assert self._lost is not None
        return self._lost

    def _allocate(self) -> int:
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self._pending and self._next_id not in self._requests:
                return self._next_id
        raise RuntimeError("no free packet identifier")  # bounded by the window: cannot happen

    async def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or self._lost is not None:
            raise NotConnected(f"{self.where}: not connected") from self._lost
        writer.write(data)
        self._last_out = self._clock()
        try:
            async with asyncio.timeout(self.timeout):
                await writer.drain()
        except TimeoutError:
            lost = AckTimeout(f"{self.where}: could not write within {self.timeout:g} s")
            self._end(lost)
            raise lost from None
        except (ConnectionError, OSError) as exc:
            broken = ConnectionLost(f"{self.where}: connection lost: {_os_text(exc)}")
            self._end(broken)
            raise broken from None

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        lost: MqttError
        try:
            quickack = _quickack(self._writer)
            while True:
                first, body = await _read_packet(reader)
                quickack()
                self._last_in = self._clock()
                kind = first & 0xF0
                if kind == PUBACK:
                    ident, ack = parse_puback(body)
                    waiter = self._pending.get(ident)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(ack)
                elif kind == PUBLISH and self._on_message is not None:
                    message = parse_publish(first, body)
                    if self._closing:  # neither taken nor acknowledged: the broker keeps it
                        continue
                    try:
                        self._on_message(message)
                    except Exception as exc:
                        lost = NotTaken(
                            f"{self.where}: a message on {message.topic} was not taken "
                            f"({type(exc).__name__}: {exc}); not acknowledged, so the broker "
                            "sends it again"
                        )
                        lost.__cause__ = exc
                        break
                    if message.packet_id is not None:
                        await self._write(puback_packet(message.packet_id))
                elif kind in (SUBACK, UNSUBACK):
                    ident, answer = parse_suback(body, "SUBACK" if kind == SUBACK else "UNSUBACK")
                    request = self._requests.get(ident)
                    if request is not None and not request.done():
                        request.set_result(answer)
                elif kind == PINGRESP:
                    continue
                elif kind == DISCONNECT:
                    reader_ = _Reader(body)
                    code = reader_.byte() if reader_.left() else 0
                    props = reader_.properties() if reader_.left() else {}
                    said = props.get(REASON_STRING)
                    text = f"{self.where}: broker disconnected: {reason_text(code)}"
                    lost = ConnectionLost(f"{text} ({said})" if said else text, reason=code)
                    break
                else:
                    lost = ProtocolError(f"{self.where}: unexpected packet type {first >> 4}")
                    break
        except asyncio.IncompleteReadError:
            lost = ConnectionLost(f"{self.where}: broker closed the connection")
        except MqttError as exc:  # a ProtocolError, or writing a PUBACK failed
            lost = exc
        except (ConnectionError, OSError) as exc:
            lost = ConnectionLost(f"{self.where}: connection lost: {_os_text(exc)}")
        self._end(lost)

    async def _pinger(self) -> None:
        """PINGREQ when nothing was sent for 3/4 of the keepalive; no answer in time → lost."""
        interval = self.keepalive * 0.75
        while self._lost is None:
            idle = self._clock() - self._last_out
            if idle < interval:
                await asyncio.sleep(interval - idle)
                continue
            asked = self._clock()
            with contextlib.suppress(MqttError):
                await self._write(bytes((PINGREQ, 0)))
            await asyncio.sleep(self.timeout)
            if self._lost is None and self._last_in < asked:
                self._end(ConnectionLost(f"{self.where}: no PINGRESP within {self.timeout:g} s"))

    def _end(self, lost: MqttError) -> None:
        """The connection is over: fail every publish awaiting its PUBACK, close the socket."""
        if self._lost is None:
            self._lost = lost
        failure = (
            self._lost
            if isinstance(self._lost, ConnectionLost | AckTimeout)
            else ConnectionLost(str(self._lost))
        )
        waiters: list[asyncio.Future[Any]] = [*self._pending.values(), *self._requests.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(failure)
        self._ended.set()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._drop()

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()

    async def close(self) -> None:
        """DISCONNECT (the will is then not published) and close; safe to call at any time.

        A message arriving from here on is not handed to ``on_message`` (nor acknowledged), so
        the broker, which keeps a session, sends it again on the next connection."""
        self._closing = True
        if self._writer is not None and self._lost is None:
            with contextlib.suppress(MqttError):
                await self._write(bytes((DISCONNECT, 0)))
        self._end(NotConnected(f"{self.where}: closed"))
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._writer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._writer.wait_closed()


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise ProtocolError("broker sent a malformed remaining length")
    if length > MAX_INCOMING:
        raise ProtocolError(
            f"broker sent a {length}-byte packet (this client takes {MAX_INCOMING})"
        )
    return first, await reader.readexactly(length) if length else b""


def _quickack(writer: asyncio.StreamWriter | None) -> Callable[[], None]:
    """Acknowledge what the broker sends at once (Linux ``TCP_QUICKACK``, re-armed per packet).

    Mosquitto leaves Nagle's algorithm on (``set_tcp_nodelay false``): with two PUBACKs due, it
    holds the second until this side ACKs the first, and a delayed ACK takes up to 40 ms here.
    """
    sock = writer.get_extra_info("socket") if writer is not None else None
    option = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return lambda: None

    def arm() -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)

    arm()
    return arm


def _os_text(exc: BaseException) -> str:
    """The OS's words (``Connection refused``), not asyncio's ``Connect call failed (...)``."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
