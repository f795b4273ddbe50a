"""MQTT: every telegram to a broker (Mosquitto, EMQX, HiveMQ), for Home Assistant and others.

Per telegram two messages: ``<topic>/reading``, a JSON object of the fields DSMR-reader's API v2
mapping produces (``telegram/v2.py``, the one mapping; ``timestamp`` is the meter's own clock)
plus ``received_at``, and ``<topic>/telegram``, the raw telegram for consumers that parse it
themselves. A telegram is delivered when the broker acknowledged both (PUBACK at QoS 1; at QoS 0
once written); until then it stays queued and spooled like for any sink, and a broker that is
down or unreachable is retried with backoff, the backlog drained oldest first.

No retained per-field topics (``<topic>/state/<field>``): Home Assistant's MQTT sensors read a
field out of one JSON state topic with a ``value_template``, as Zigbee2MQTT and Tasmota devices
do, and that is what the discovery configs here say. Per-field topics would turn one
acknowledged unit into twenty (every one of which must be acknowledged before the telegram
leaves the queue: twenty round trips a second on a Pi, and half-delivered telegrams to explain),
and retaining them buys nothing for a meter that speaks every 1-10 s.

With ``discovery``, each field the meter actually measures (``sensors``: not the zeros the
mapping fills in for DSMR-reader) gets a retained config message under
``<discovery_prefix>/sensor/<meter>/<field>/config`` (device class, state class, unit; one device
per meter id), sent again after every reconnect (a broker without persistence forgets retained
messages). ``<topic>/status`` says ``online`` (retained) while the logger is connected and
``offline`` when it stops or vanishes (the last will).

How the broker's answers map (``answer_for``): a refused login (CONNACK 0x86/0x87) is a
misconfigured sink (one clear error, keep spooling, probe slowly); PUBACK 0x87 (the account may
not write the topic) and 0x90 too; a message over the broker's size limit (announced Maximum
Packet Size, or PUBACK 0x95) is dead-lettered; anything else transient is retried. A telegram
sent again after a publish went unanswered (``AckTimeout``, ``ConnectionLost``), or after the
broker took its reading but not its raw telegram, may reach subscribers twice: the worker counts
it in ``possible_duplicates``, as for the HTTP sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import structlog

from dsmr_logger import __version__
from dsmr_logger.config import MqttSinkConfig
from dsmr_logger.delivery.answers import Answer, Verdict
from dsmr_logger.delivery.sinks import Telegram
from dsmr_logger.net import http, mqtt
from dsmr_logger.telegram.obis import ParseError, Reading, parse
from dsmr_logger.telegram.v2 import MappingError, to_v2

KEEPALIVE = 60
CLOSE_GRACE = 2.0
"""Seconds ``close`` may take to say ``offline`` and DISCONNECT."""
ONLINE, OFFLINE = b"online", b"offline"

_DIGITS = re.compile(r"\d+")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_JSON_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?")
_TIMESTAMPS = frozenset({"timestamp", "extra_device_timestamp"})


# --- what the broker's answers mean --------------------------------------------------------------

CONNACK_MISCONFIGURED: dict[int, str] = {
    0x84: "the broker does not speak MQTT 5 (Mosquitto >= 1.6, EMQX, HiveMQ do)",
    0x85: "check the sink's client_id",
    0x86: "check the sink's username and password",
    0x87: "check the sink's username and password (and the broker's ACL)",
    0x8A: "the broker has banned this client",
    0x8C: "check the sink's username and password",
    0x9A: "the broker keeps no retained messages, which the sink's status and discovery need "
    "(Mosquitto: retain_available true)",
    0x9B: "the broker takes only QoS 0: set the sink's qos = 0, or allow QoS 1 "
    "(Mosquitto: max_qos)",
    0x9C: "check the sink's url: the broker says to use another server",
    0x9D: "check the sink's url: the broker has moved",
}
PUBACK_VERDICTS: dict[int, tuple[Verdict, str]] = {
    0x87: (Verdict.MISCONFIGURED, "allow this account to publish to that topic (the broker's ACL)"),
    0x90: (Verdict.MISCONFIGURED, "check the sink's topic and discovery_prefix"),
    0x95: (Verdict.REJECTED, "larger than the broker takes (its message_size_limit)"),
    0x99: (Verdict.REJECTED, "the broker refused the payload's format"),
    0x91: (Verdict.RETRY, "packet identifier in use"),
    0x97: (Verdict.RETRY, "the broker's quota is exceeded"),
}
DISCONNECT_MISCONFIGURED: dict[int, str] = {
    0x87: "allow this account to publish under the sink's topic (and discovery_prefix)",
    0x90: "check the sink's topic and discovery_prefix",
    0x8A: "the broker has banned this client",
}
SEVERITY = (
    Verdict.MISCONFIGURED,
    Verdict.REJECTED,
    Verdict.RETRY,
    Verdict.SUSPECT,
    Verdict.DELIVERED,
)


def answer_for(outcome: mqtt.PubAck | BaseException, topic: str | None = None) -> Answer:
    """One message's fate as the worker's verdict; errors say what to fix, never a secret.
    A refusal names the message's ``topic``: the sink's topic and discovery_prefix are two
    places an ACL may deny."""
    if isinstance(outcome, mqtt.PubAck):
        if outcome.accepted:
            return Answer(Verdict.DELIVERED)
        verdict, fix = PUBACK_VERDICTS.get(outcome.reason, (Verdict.SUSPECT, ""))
        which = f" {topic}" if topic else ""
        return Answer(verdict, error=_join(f"broker refused{which}: {outcome.describe()}", fix))
    if isinstance(outcome, mqtt.Refused) and outcome.reason in CONNACK_MISCONFIGURED:
        fix = CONNACK_MISCONFIGURED[outcome.reason]
        return Answer(Verdict.MISCONFIGURED, error=_join(str(outcome), fix))
    if isinstance(outcome, mqtt.TooLarge):
        return Answer(Verdict.REJECTED, error=str(outcome))
    if isinstance(outcome, mqtt.ConnectionLost) and outcome.reason is not None:
        if outcome.reason in DISCONNECT_MISCONFIGURED:
            fix = DISCONNECT_MISCONFIGURED[outcome.reason]
            return Answer(Verdict.MISCONFIGURED, error=_join(str(outcome), fix))
        if outcome.reason in (0x95, 0x99):
            # Which in-flight message did it? The worker's strikes tell: one that makes the
            # broker hang up every time while it takes the connection (``probe``) is poison.
            return Answer(Verdict.SUSPECT, error=str(outcome))
        if outcome.reason == 0x8E:
            return Answer(
                Verdict.RETRY,
                error=_join(str(outcome), "another client connected with this client_id"),
            )
    if isinstance(outcome, OSError):
        # Sent and unanswered (``AckTimeout``, ``ConnectionLost``): the broker may have it.
        return Answer(
            Verdict.RETRY,
            error=f"{type(outcome).__name__}: {outcome}"[:300],
            maybe_stored=bool(getattr(outcome, "maybe_sent", True)),
        )
    raise outcome


def worst(answers: list[Answer]) -> Answer:
    """The answer for a telegram whose messages got these answers: the most severe decides."""
    return min(answers, key=lambda a: SEVERITY.index(a.verdict))


def _join(text: str, fix: str) -> str:
    return f"{text}: {fix}" if fix else text


# --- what is published ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """How Home Assistant shows one reading field."""

    name: str
    device_class: str
    state_class: str
    unit: str


def _fields() -> dict[str, Field]:
    energy = ("energy", "total_increasing", "kWh")
    power = ("power", "measurement", "kW")
    table = {
        "electricity_delivered_1": Field("Energy delivered tariff 1", *energy),
        "electricity_delivered_2": Field("Energy delivered tariff 2", *energy),
        "electricity_returned_1": Field("Energy returned tariff 1", *energy),
        "electricity_returned_2": Field("Energy returned tariff 2", *energy),
        "electricity_currently_delivered": Field("Power delivered", *power),
        "electricity_currently_returned": Field("Power returned", *power),
        "extra_device_delivered": Field("Gas delivered", "gas", "total_increasing", "m³"),
    }
    for phase in ("l1", "l2", "l3"):
        upper = phase.upper()
        table[f"phase_currently_delivered_{phase}"] = Field(f"Power delivered {upper}", *power)
        table[f"phase_currently_returned_{phase}"] = Field(f"Power returned {upper}", *power)
        table[f"phase_voltage_{phase}"] = Field(f"Voltage {upper}", "voltage", "measurement", "V")
        table[f"phase_power_current_{phase}"] = Field(
            f"Current {upper}", "current", "measurement", "A"
        )
    return table


FIELDS = _fields()


def sensors(reading: Reading, mapped: list[str]) -> dict[str, Field]:
    """The ``mapped`` fields this meter really measures, as Home Assistant shows them.

    DSMR-reader's mapping fills what a meter lacks: tariff 2 = 0 beside a total (``1.8.0``,
    Luxembourg, Austria, EasyMeter, Kamstrup), returned energy = 0 without ``2.8.x``. Those
    zeros stay in the reading (it is the one mapping), but get no sensor, and a total is not
    called tariff 1.
    """
    dropped: set[str] = set()
    renamed: dict[str, str] = {}
    for code, kind in (("1", "delivered"), ("2", "returned")):
        if _register(reading, f"{code}.8.1") and _register(reading, f"{code}.8.2"):
            continue
        dropped.add(f"electricity_{kind}_2")
        if _register(reading, f"{code}.8.0"):
            renamed[f"electricity_{kind}_1"] = f"Energy {kind}"
        else:
            dropped.add(f"electricity_{kind}_1")
    return {
        name: replace(FIELDS[name], name=renamed.get(name, FIELDS[name].name))
        for name in mapped
        if name in FIELDS and name not in dropped
    }


def _register(reading: Reading, code: str) -> bool:
    """The meter sends ``1-0:<code>`` (or ``1-1:<code>``, as the v2 mapping reads it)."""
    values = (reading.value(f"{prefix}:{code}") for prefix in ("1-0", "1-1"))
    return any(value is not None and value.number is not None for value in values)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Meter:
    """Which meter a telegram came from, as Home Assistant's device registry keys it."""

    key: str
    """``[A-Za-z0-9_-]``: part of topics and unique ids."""
    label: str
    model: str


def meter_of(reading: Reading, fallback: str) -> Meter:
    """The meter's equipment id (``0-0:96.1.1``, hex-encoded on DSMR 4+), else ``fallback``."""
    value = reading.value("0-0:96.1.1")
    ident = value.raw.strip() if value is not None else ""
    with contextlib.suppress(ValueError):
        text = bytes.fromhex(ident).decode("ascii")
        if text.isprintable() and text.strip():
            ident = text.strip()
    key = _UNSAFE.sub("_", ident).strip("_")[:64]
    model = reading.header.lstrip("/").strip()[:64]
    if not key:
        return Meter(_UNSAFE.sub("_", fallback), fallback, model)
    return Meter(key, ident, model)


def reading_payload(fields: dict[str, str], received_at: float) -> bytes:
    """The v2 fields as one JSON object, numbers as JSON numbers, plus ``received_at``."""
    parts = []
    for name, value in fields.items():
        number = name not in _TIMESTAMPS and _JSON_NUMBER.fullmatch(value)
        parts.append(f"{json.dumps(name)}: {value if number else json.dumps(value)}")
    received = datetime.fromtimestamp(received_at, UTC).isoformat(timespec="milliseconds")
    parts.append(f'"received_at": "{received.replace("+00:00", "Z")}"')
    return ("{" + ", ".join(parts) + "}").encode()


def discovery_messages(
    meter: Meter, fields: dict[str, Field], *, topic: str, prefix: str, node: str
) -> list[Message]:
    """Retained Home Assistant discovery configs, one per field this meter sends."""
    device = {
        "identifiers": [node],
        "name": f"Smart meter {meter.label}",
        "model": meter.model or "P1",
        "sw_version": f"dsmr-logger {__version__}",
    }
    messages = []
    for name, info in fields.items():
        config = {
            "name": info.name,
            "unique_id": f"{node}_{name}",
            "state_topic": f"{topic}/reading",
            "value_template": f"{{{{ value_json.{name} }}}}",
            "device_class": info.device_class,
            "state_class": info.state_class,
            "unit_of_measurement": info.unit,
            "availability_topic": f"{topic}/status",
            "payload_available": ONLINE.decode(),
            "payload_not_available": OFFLINE.decode(),
            "device": device,
            "origin": {"name": "dsmr-logger", "sw_version": __version__},
        }
        messages.append(
            Message(
                f"{prefix}/sensor/{node}/{name}/config",
                json.dumps(config, ensure_ascii=False).encode(),
                retain=True,
            )
        )
    return messages


def default_client_id(hostname: str, sink: str) -> str:
    host = _UNSAFE.sub("-", hostname.split(".")[0]).strip("-")[:40] or "host"
    return f"dsmr-logger-{host}-{sink}"


def tls_context(config: MqttSinkConfig) -> ssl.SSLContext | None:
    """For ``mqtts://``: verified against ``ca_file`` (or the system's CAs) unless turned off."""
    if not config.url.startswith("mqtts:"):
        return None
    ca_file = str(config.ca_file) if config.ca_file is not None else None
    return http.tls_context(config.verify_tls, ca_file)


# --- the sink ------------------------------------------------------------------------------------


class _Unusable(Exception):
    """The broker took the connection but refused its ``online`` status: ``answer`` says why."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.error)
        self.answer = answer


class MqttSink:
    """Publishes telegrams to one broker over one connection, opened when needed.

    Invariant: a telegram is DELIVERED only when every message it needed on the current
    connection (its discovery configs the first time its meter is seen there, then its reading
    and raw telegram) got a PUBACK below 0x80 (QoS 1) or was written (QoS 0). A connection that
    failed is dropped; the next send opens a new one, and what was not acknowledged is sent again.
    """

    def __init__(
        self,
        config: MqttSinkConfig,
        *,
        zone: ZoneInfo,
        hostname: Callable[[], str] = socket.gethostname,
    ) -> None:
        self.name = config.name
        self.config = config
        self.zone = zone
        parsed = urllib.parse.urlsplit(config.url)
        self.host = parsed.hostname or ""
        self.port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
        self.endpoint = f"{parsed.scheme}://{self.host}:{self.port}"
        self.client_id = config.client_id or default_client_id(hostname(), config.name)
        self.topic = config.topic
        self._tls: ssl.SSLContext | None = None
        self._client: mqtt.MqttClient | None = None
        self._connecting = asyncio.Lock()
        self._announced: set[str] = set()
        """Discovery topics published on the current connection."""
        self._told: set[str] = set()
        self._log = structlog.get_logger("dsmr_logger.delivery").bind(sink=config.name)

    async def start(self) -> None:
        """Load the CA file now, so a missing one stops the start with its path; no connection."""
        self._tls = tls_context(self.config)

    async def send(self, item: Telegram) -> Answer:
        try:
            client = await self._connection()
        except _Unusable as exc:
            return exc.answer
        except (mqtt.MqttError, OSError) as exc:
            return answer_for(exc)
        messages = self._messages(item)
        outcomes = await asyncio.gather(
            *(self._publish(client, message) for message in messages), return_exceptions=True
        )
        answers = [answer_for(o, m.topic) for o, m in zip(outcomes, messages, strict=True)]
        answer = worst(answers)
        if answer.verdict is not Verdict.DELIVERED and any(
            a.verdict is Verdict.DELIVERED or a.maybe_stored
            for a, m in zip(answers, messages, strict=True)
            if not m.retain
        ):  # its reading (or raw telegram) reached the broker: sending it again repeats that
            answer = replace(answer, maybe_stored=True)
        if answer.verdict is Verdict.DELIVERED:
            self._announced.update(m.topic for m in messages if m.retain)
        if not client.connected:
            self._forget(client)
        return answer

    async def probe(self) -> Answer:
        """Does the broker take messages from this client? DELIVERED if, connected, it
        acknowledges ``online`` on ``<topic>/status`` (retained: it says nothing new). The worker
        asks after an ambiguous answer (SUSPECT) to tell a message the broker chokes on from a
        broker that is down, or that refuses everything (PUBACK 0x80 to every message once its
        storage or a plugin failed: a connection alone would pass, and strike every telegram)."""
        try:
            client = await self._connection()
            ack = await self._publish(client, Message(f"{self.topic}/status", ONLINE, retain=True))
        except _Unusable as exc:
            return exc.answer
        except (mqtt.MqttError, OSError) as exc:
            return answer_for(exc)
        finally:
            if self._client is not None and not self._client.connected:
                self._forget(self._client)
        return answer_for(ack, f"{self.topic}/status")

    async def _publish(self, client: mqtt.MqttClient, message: Message) -> mqtt.PubAck:
        return await client.publish(
            message.topic, message.payload, qos=self.config.qos, retain=message.retain
        )

    def _messages(self, item: Telegram) -> list[Message]:
        """Discovery configs not yet sent on this connection, the reading, the raw telegram."""
        messages: list[Message] = []
        fields = self._map(item)
        if fields is not None:
            mapped, reading = fields
            if self.config.discovery:
                meter = meter_of(reading, fallback=self.client_id)
                node = f"dsmr_logger_{meter.key}"
                wanted = discovery_messages(
                    meter,
                    sensors(reading, list(mapped)),
                    topic=self.topic,
                    prefix=self.config.discovery_prefix,
                    node=node,
                )
                messages += [m for m in wanted if m.topic not in self._announced]
            messages.append(
                Message(f"{self.topic}/reading", reading_payload(mapped, item.received_at))
            )
        messages.append(Message(f"{self.topic}/telegram", item.telegram))
        return messages

    def _map(self, item: Telegram) -> tuple[dict[str, str], Reading] | None:
        """The v2 fields, or None (said once per kind of problem): the raw telegram still goes."""
        received = datetime.fromtimestamp(item.received_at, UTC)
        try:
            reading = parse(item.telegram, zone=self.zone)
            mapped = to_v2(reading, gas_channel=self.config.gas_channel, received_at=received)
        except (ParseError, MappingError) as exc:
            self._note(f"no {self.topic}/reading for this telegram, only its raw telegram: {exc}")
            return None
        for note in mapped.notes:
            self._note(note)
        return mapped.fields, reading

    def _note(self, note: str) -> None:
        kind = _DIGITS.sub("#", note)  # a note carrying a changing value is still one note
        if kind not in self._told:
            self._told.add(kind)
            self._log.info("mqtt mapping note", note=note)

    async def _connection(self) -> mqtt.MqttClient:
        async with self._connecting:
            if self._client is not None and self._client.connected:
                return self._client
            client = mqtt.MqttClient(
                self.host,
                self.port,
                client_id=self.client_id,
                username=self.config.username,
                password=self.config.password,
                tls=self._tls,
                keepalive=KEEPALIVE,
                timeout=self.config.timeout,
                will=mqtt.Will(f"{self.topic}/status", OFFLINE, qos=self.config.qos, retain=True),
            )
            await client.connect()
            try:
                ack = await client.publish(
                    f"{self.topic}/status", ONLINE, qos=self.config.qos, retain=True
                )
            except BaseException:
                await client.close()
                raise
            answer = answer_for(ack, f"{self.topic}/status")
            if answer.verdict is not Verdict.DELIVERED:  # e.g. the ACL forbids <topic>/status
                await client.close()
                raise _Unusable(answer)
            self._client = client
            self._announced = set()
            self._log.info("mqtt connected", broker=self.endpoint, client_id=self.client_id)
            return client

    def _forget(self, client: mqtt.MqttClient) -> None:
        if self._client is client:
            self._client = None

    async def close(self) -> None:
        """Say ``offline`` (retained) and DISCONNECT, within CLOSE_GRACE seconds."""
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_GRACE):
                if client.connected:
                    await client.publish(
                        f"{self.topic}/status", OFFLINE, qos=self.config.qos, retain=True
                    )
        await client.close()
