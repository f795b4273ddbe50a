"""The MQTT meter source (``[meter] type = "mqtt"``) against a real Mosquitto.

A P1 dongle is played by an independent client (paho-mqtt, as ESPHome and Tasmota speak MQTT
3.1.1) publishing one raw telegram per message at QoS 1. The first part drives the client's
subscriber side and the source in the test's event loop: a kept session, a message not taken
being sent again, framing as on a wire, repeats, every way the broker says no, TLS. The second
runs the daemon as a real process into the DSMR-reader test server: the 566-frame capture,
including a stretch published while the daemon is stopped and one around a broker restart; a
wrong password, then the fix.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish
import pytest
import structlog
from conftest import REPO_ROOT
from dsmr_reader_server import DsmrReaderServer
from mosquitto import Mosquitto, TestCA
from test_homewizard_daemon import (  # the daemon-process harness of the Wi-Fi P1 sources
    API_KEY,
    capture_telegrams,
    daemon,
    delivered,
    named,
    write_config,
)
from waiting import wait_until

from dsmr_logger import config
from dsmr_logger.net import mqtt
from dsmr_logger.sources import MeterState
from dsmr_logger.sources.intake import Intake
from dsmr_logger.sources.mqtt_in import RECEIVE_MAXIMUM, REMEMBER, MqttSource, default_client_id
from dsmr_logger.sources.p1.framing import Frame, FrameAssembler

USER, PASSWORD = "logger", "mqtt-meter-password"
DONGLE, DONGLE_PASSWORD = "dongle", "dongle-password"
TOPIC = "p1meter/sensor/telegram/state"
SHIPPED_CA = Path(__file__).resolve().parent.parent / "dsmr_logger/sources/data/homewizard-ca.pem"
FAST = {"reconnect_initial": 0.02, "reconnect_max": 0.2, "timeout": 5.0}


def broker_at(directory: Path, **options: Any) -> Mosquitto:
    options.setdefault("users", {USER: PASSWORD, DONGLE: DONGLE_PASSWORD})
    options.setdefault("acl", {USER: ["p1meter/#"], DONGLE: ["p1meter/#", "elsewhere/#"]})
    return Mosquitto(directory, **options)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with broker_at(tmp_path / "broker") as running:
        yield running


def publish(
    broker: Mosquitto,
    payloads: list[bytes],
    *,
    topic: str = TOPIC,
    qos: int = 1,
    retain: bool = False,
) -> None:
    """The dongle: each payload one message, in order; returns once the broker took them all."""
    paho.mqtt.publish.multiple(
        [(topic, payload, qos, retain) for payload in payloads],
        hostname="127.0.0.1",
        port=broker.port,
        client_id="dongle",
        auth={"username": DONGLE, "password": DONGLE_PASSWORD},
    )


async def published(broker: Mosquitto, payloads: list[bytes], **options: Any) -> None:
    await asyncio.to_thread(publish, broker, payloads, **options)


def meter(broker: Mosquitto, **keys: Any) -> config.MqttMeterConfig:
    settings: dict[str, Any] = {
        "url": broker.url,
        "topic": TOPIC,
        "username": USER,
        "password": PASSWORD,
        "client_id": "test-meter",
        **FAST,
    }
    settings.update(keys)
    return config.MqttMeterConfig(**settings)


@contextlib.asynccontextmanager
async def running(
    settings: config.MqttMeterConfig, frames: list[Frame], state_path: Path | None = None
) -> AsyncIterator[MqttSource]:
    source = MqttSource(settings, frames.append, state_path=state_path)
    task = asyncio.create_task(source.run())
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def subscribed(source: MqttSource) -> None:
    await wait_until(lambda: source.status.connected, "the source to subscribe", 10.0)


def telegrams(frames: list[Frame]) -> list[bytes]:
    return [frame.telegram for frame in frames]


# --- 1. the client as a subscriber ---------------------------------------------------------------


def subscriber(port: int, received: list[mqtt.Message], **options: Any) -> mqtt.MqttClient:
    settings: dict[str, Any] = {
        "client_id": "test-subscriber",
        "username": USER,
        "password": PASSWORD,
        "timeout": 10.0,
        "clean_start": False,
        "session_expiry": 3600,
        "on_message": received.append,
    }
    settings.update(options)
    return mqtt.MqttClient("127.0.0.1", port, **settings)


async def test_a_kept_session_holds_what_was_published_while_the_client_was_away(
    broker: Mosquitto,
) -> None:
    first: list[mqtt.Message] = []
    client = subscriber(broker.port, first)
    assert not (await client.connect()).session_present
    assert (await client.subscribe(TOPIC, qos=1)).reason == 1, "QoS 1 granted"
    await client.close()
    await published(broker, [b"%d" % i for i in range(50)])

    later: list[mqtt.Message] = []
    again = subscriber(broker.port, later)
    assert (await again.connect()).session_present
    await wait_until(lambda: len(later) >= 50, "50 messages queued by the broker")
    await again.close()
    assert [m.payload for m in later] == [b"%d" % i for i in range(50)], "all, in order"
    assert all(m.qos == 1 and m.packet_id and m.topic == TOPIC for m in later)
    assert first == []


async def test_a_message_the_handler_could_not_take_is_not_acknowledged_and_comes_again(
    broker: Mosquitto,
) -> None:
    seen: list[mqtt.Message] = []
    client = subscriber(broker.port, seen)
    await client.connect()
    await client.subscribe(TOPIC, qos=1)
    await client.close()
    await published(broker, [b"first", b"second"])

    def refuse(message: mqtt.Message) -> None:
        raise RuntimeError("the queue is gone")

    failing = subscriber(broker.port, [], on_message=refuse)
    await failing.connect()
    lost = await asyncio.wait_for(failing.wait_lost(), 10.0)
    assert isinstance(lost, mqtt.NotTaken) and "not acknowledged" in str(lost)
    assert isinstance(lost.__cause__, RuntimeError)

    client = subscriber(broker.port, seen)
    await client.connect()
    await wait_until(lambda: len(seen) >= 2, "both messages again")
    await client.close()
    assert [m.payload for m in seen] == [b"first", b"second"]
    assert seen[0].dup, "sent before without a PUBACK: the broker marks it a duplicate"

    client = subscriber(broker.port, seen)
    await client.connect()
    await asyncio.sleep(0.3)  # anything arriving now would have been acknowledged and resent
    await client.close()
    assert len(seen) == 2, "acknowledged once taken: not sent a third time"


async def test_unsubscribing_stops_the_messages_and_says_when_there_was_nothing(
    broker: Mosquitto,
) -> None:
    seen: list[mqtt.Message] = []
    client = subscriber(broker.port, seen, clean_start=True, session_expiry=0)
    await client.connect()
    await client.subscribe(TOPIC)
    await published(broker, [b"one"])
    await wait_until(lambda: len(seen) == 1, "one message")
    assert (await client.unsubscribe(TOPIC)).reason == 0
    assert (await client.unsubscribe(TOPIC)).describe() == "UNSUBACK 0x11 no subscription existed"
    await published(broker, [b"two"])
    await client.subscribe("p1meter/other")  # a round trip after the publish: "two" was routed
    await client.close()
    assert [m.payload for m in seen] == [b"one"]


def test_subscriber_packets_are_encoded_and_read_as_the_standard_says() -> None:
    # MQTT 5.0 section 3.8: SUBSCRIBE id 1, no properties, "a/b", QoS 1, Retain Handling 1.
    assert mqtt.subscribe_packet("a/b", qos=1, packet_id=1, retain_handling=1) == (
        b"\x82\x09\x00\x01\x00\x00\x03a/b\x11"
    )
    assert mqtt.unsubscribe_packet("a/b", packet_id=2) == b"\xa2\x08\x00\x02\x00\x00\x03a/b"
    assert mqtt.puback_packet(7) == b"\x40\x02\x00\x07"
    assert mqtt.parse_suback(b"\x00\x01\x00\x01") == (1, mqtt.SubAck(1))
    assert mqtt.parse_suback(b"\x00\x01\x00\x87")[1].describe() == "SUBACK 0x87 not authorized"
    # PUBLISH QoS 1, DUP, retained, topic "a/b", id 10, a user property, payload "hi".
    body = b"\x00\x03a/b\x00\x0a\x07\x26\x00\x01k\x00\x01vhi"
    assert mqtt.parse_publish(0x3B, body) == mqtt.Message("a/b", b"hi", 1, True, True, 10)
    with pytest.raises(mqtt.ProtocolError, match="QoS 2"):
        mqtt.parse_publish(0x34, body)
    # The publisher's CONNECT is unchanged: Clean Start, no properties.
    assert (
        mqtt.connect_packet("c", keepalive=60)
        == b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01c"
    )
    # A subscriber's: no Clean Start; Session Expiry 86400, Receive Maximum 32, Max Packet 65536.
    kept = mqtt.connect_packet(
        "c",
        keepalive=60,
        clean_start=False,
        session_expiry=86400,
        receive_maximum=32,
        maximum_packet_size=65536,
    )
    assert kept == (
        b"\x10\x1b\x00\x04MQTT\x05\x00\x00\x3c\x0d\x11\x00\x01\x51\x80\x21\x00\x20"
        b"\x27\x00\x01\x00\x00\x00\x01c"
    )


# --- 2. the source in the test's loop ----------------------------------------------------------


async def test_garbage_and_two_telegrams_in_one_message_behave_as_on_a_wire(
    broker: Mosquitto,
) -> None:
    t = capture_telegrams()[:6]
    bad_crc = t[3].replace(b"1-0:1.7.0(0", b"1-0:1.7.0(9", 1)
    assert bad_crc != t[3]
    messages = [
        b"\x00\xffboot noise\r\n" + t[0] + b"trailing junk",
        t[1] + t[2],  # two telegrams in one message
        bad_crc,
        t[4][:300],  # cut off: the message ends inside the telegram
        t[5],
    ]
    frames: list[Frame] = []
    async with running(meter(broker), frames) as source:
        await subscribed(source)
        await published(broker, messages)
        await wait_until(lambda: source.messages >= 5, "five messages")
    assert telegrams(frames) == [t[0], t[1], t[2], t[5]]
    on_a_wire = FrameAssembler().feed(b"".join(messages[:3]), 0.0)
    assert telegrams(frames)[:3] == [f.telegram for f in on_a_wire], "the same as from a cable"
    assert source.rejected() == {"crc_mismatch": 1, "interrupted": 1}
    assert source.counters.garbage_bytes >= len(b"\x00\xffboot noise\r\n") + len(b"trailing junk")
    assert source.counters.frames == 4
    assert source.status.state is MeterState.OK and source.status.last_frame_at is not None


async def test_a_telegram_published_again_is_skipped_and_counted(broker: Mosquitto) -> None:
    t = capture_telegrams()[:4]
    frames: list[Frame] = []
    async with running(meter(broker), frames) as source:
        await subscribed(source)
        await published(broker, [t[0], t[1], t[1], t[2], t[1], t[3], t[3]])
        await wait_until(lambda: source.messages >= 7, "seven messages")
    assert telegrams(frames) == t
    assert source.status.repeats == 3 == source.intake.repeats


def test_a_broker_sending_its_last_window_again_brings_no_telegram_twice() -> None:
    """After a broken connection the broker sends again what it had not seen acknowledged: at
    most RECEIVE_MAXIMUM messages, all among the last REMEMBER telegrams taken."""
    t = capture_telegrams()[:120]
    frames: list[Frame] = []
    intake = Intake(frames.append, require_crc=False, remember=REMEMBER)
    for telegram in t[:100]:
        intake.feed(telegram, 0.0)
    for telegram in t[100 - RECEIVE_MAXIMUM :]:  # the window again, then what is new
        intake.feed(telegram, 0.0)
    assert telegrams(frames) == t
    assert intake.repeats == RECEIVE_MAXIMUM


async def test_a_broker_restart_sends_again_what_it_sent_unacknowledged_and_none_is_taken_twice(
    broker: Mosquitto,
) -> None:
    """Messages in the source's socket when the broker stops are taken, and their PUBACKs go
    nowhere; the broker (persistence on) sends them again after its restart."""
    t = capture_telegrams()[:60]
    frames: list[Frame] = []
    async with running(meter(broker), frames) as source:
        await subscribed(source)
        await published(broker, t[:10])
        await wait_until(lambda: len(frames) == 10, "ten telegrams")
        assert source.client is not None
        sock = source.client._writer.get_extra_info("socket")  # type: ignore[union-attr]
        # The loop is held from here until the broker is stopped: what it sends stays unread.
        publish(broker, t[10:40])
        deadline = time.monotonic() + 10.0
        while _unread(sock) < len(t[10]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _unread(sock) >= len(t[10]), "the broker sent messages to the source"
        broker.stop()
        broker.start()
        await published(broker, t[40:])
        await wait_until(lambda: len(frames) >= 60, "all 60 telegrams", 20.0)
        await asyncio.sleep(0.3)  # a duplicate would arrive now
    assert telegrams(frames) == t, "each once, in order"
    assert source.status.repeats >= 1, "messages sent again were skipped"
    assert source.status.connects == 2 and source.status.state is MeterState.OK


def _unread(sock: Any) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


async def test_a_wrong_password_is_misconfigured_with_one_clear_error(broker: Mosquitto) -> None:
    frames: list[Frame] = []
    with structlog.testing.capture_logs() as logs:
        async with running(meter(broker, password="not-the-password"), frames) as source:
            await wait_until(lambda: source.status.state is MeterState.MISCONFIGURED, "refused")
            await asyncio.sleep(0.5)  # retried every reconnect_max (0.2 s): still one error
    errors = [e for e in logs if e["event"] == "meter broker refuses us"]
    assert len(errors) == 1
    assert errors[0]["reason"] == (
        "broker refused the connection: CONNACK 0x87 not authorized: "
        "check meter.username and meter.password"
    )
    assert source.status.last_error == errors[0]["reason"] and not source.status.connected
    assert "not-the-password" not in repr(logs)


def _dynsec_client(user: str, password: str, role: str) -> dict[str, Any]:
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return {
        "username": user,
        "roles": [{"rolename": role}],
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
    }


def dynamic_security_plugin() -> Path:
    """Mosquitto's dynamic-security plugin (in Debian's mosquitto package since 2.0); missing,
    it fails the test under CI and skips it elsewhere, as a missing broker does."""
    found = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    if not found:
        message = "mosquitto_dynamic_security.so not found (Debian: apt-get install mosquitto)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found[0]


async def test_a_topic_the_brokers_acl_denies_is_misconfigured(tmp_path: Path) -> None:
    """Mosquitto's dynamic-security plugin (like EMQX and HiveMQ) refuses the subscription:
    SUBACK 0x87. (With an ``acl_file`` it grants it and delivers nothing: the next test.)"""
    plugin = dynamic_security_plugin()
    directory = tmp_path / "broker"
    directory.mkdir()
    rules = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [_dynsec_client(USER, PASSWORD, "reader")],
        "groups": [],
        "roles": [
            {
                "rolename": "reader",
                "acls": [{"acltype": "subscribeLiteral", "topic": "other/telegram", "allow": True}],
            }
        ],
    }
    (directory / "dynsec.json").write_text(json.dumps(rules))
    extra = [f"plugin {plugin}", f"plugin_opt_config_file {directory / 'dynsec.json'}"]
    with Mosquitto(directory, extra=extra) as denying:
        frames: list[Frame] = []
        with structlog.testing.capture_logs() as logs:
            async with running(meter(denying), frames) as source:
                await wait_until(
                    lambda: source.status.state is MeterState.MISCONFIGURED, "the refusal"
                )
                await asyncio.sleep(0.5)
    errors = [e for e in logs if e["event"] == "meter broker refuses us"]
    assert len(errors) == 1
    assert errors[0]["reason"] == (
        f"{source.config.where}: broker refused the subscription: SUBACK 0x87 not authorized: "
        "check meter.topic, and that the broker's ACL lets this account read it"
    )


async def test_a_topic_nothing_arrives_on_is_meter_silent_with_the_hint(broker: Mosquitto) -> None:
    frames: list[Frame] = []
    settings = meter(broker, topic="elsewhere/telegram", idle_timeout=0.3)  # not in USER's ACL
    async with running(settings, frames) as source:
        await subscribed(source)
        await published(broker, capture_telegrams()[:2], topic="elsewhere/telegram")
        await wait_until(lambda: source.status.state is MeterState.SILENT, "silent", 10.0)
    assert frames == [] and source.status.connected
    assert source.status.last_error is not None
    assert "no message on elsewhere/telegram for" in source.status.last_error
    assert "the broker's ACL lets this account read it" in source.status.last_error


async def test_a_topic_from_an_earlier_configuration_is_ignored_and_unsubscribed(
    broker: Mosquitto,
) -> None:
    t = capture_telegrams()[:6]
    old, new = "p1meter/old/telegram", TOPIC
    frames: list[Frame] = []
    async with running(meter(broker, topic=old), frames) as source:
        await subscribed(source)
    await published(broker, t[:2], topic=old)  # queued in the session for the old subscription
    with structlog.testing.capture_logs() as logs:
        async with running(meter(broker, topic=new), frames) as source:
            await subscribed(source)
            await published(broker, t[2:4], topic=new)
            await wait_until(lambda: len(frames) >= 2, "the new topic's telegrams")
            await wait_until(lambda: old in source._unsubscribed, "the old topic unsubscribed")
            await published(broker, t[4:5], topic=old)
            await published(broker, t[5:6], topic=new)
            await wait_until(lambda: len(frames) >= 3, "the last telegram")
    assert telegrams(frames) == [t[2], t[3], t[5]]
    warnings = [e for e in logs if e["event"].startswith("a message on another topic")]
    assert len(warnings) == 1 and warnings[0]["topic"] == old


async def test_a_dongle_publishing_at_qos_0_is_told_once(broker: Mosquitto) -> None:
    frames: list[Frame] = []
    with structlog.testing.capture_logs() as logs:
        async with running(meter(broker), frames) as source:
            await subscribed(source)
            await published(broker, capture_telegrams()[:3], qos=0)
            await wait_until(lambda: len(frames) == 3, "three telegrams")
    told = [e for e in logs if e["event"].startswith("the dongle publishes at QoS 0")]
    assert len(told) == 1


async def test_a_retained_telegram_sent_again_to_a_new_session_is_not_taken_twice(
    broker: Mosquitto, tmp_path: Path
) -> None:
    t = capture_telegrams()[:2]
    state = tmp_path / "last-taken"
    await published(broker, t[:1], retain=True)
    frames: list[Frame] = []
    async with running(meter(broker), frames, state_path=state) as source:
        await wait_until(lambda: len(frames) == 1, "the retained telegram")
    with structlog.testing.capture_logs() as logs:
        # Another client id: a new session, so the broker sends its retained telegram again.
        async with running(meter(broker, client_id="new-id"), frames, state) as source:
            await subscribed(source)
            await wait_until(lambda: source.status.repeats == 1, "the retained one, skipped")
            await published(broker, t[1:])
            await wait_until(lambda: len(frames) == 2, "the next telegram")
    assert telegrams(frames) == t
    assert any(e["event"].startswith("the broker kept no session") for e in logs)


async def test_tls_is_verified_against_the_ca_file(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    with broker_at(tmp_path / "broker", tls=ca) as secure:
        frames: list[Frame] = []
        async with running(meter(secure, url=secure.tls_url, ca_file=ca.ca_file), frames) as src:
            await subscribed(src)
            await published(secure, capture_telegrams()[:1])
            await wait_until(lambda: len(frames) == 1, "a telegram over TLS")
        async with running(meter(secure, url=secure.tls_url), []) as untrusting:
            await wait_until(lambda: untrusting.status.last_error is not None, "the refusal")
        assert "TLS certificate not trusted" in (untrusting.status.last_error or "")
        assert not untrusting.status.connected


async def test_a_ca_file_that_holds_no_certificate_is_misconfigured(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    garbage = tmp_path / "not-a-ca.pem"
    garbage.write_text("not a certificate\n")
    with broker_at(tmp_path / "broker", tls=ca) as secure:
        settings = meter(secure, url=secure.tls_url, ca_file=garbage)
        async with running(settings, []) as source:
            await wait_until(lambda: source.status.state is MeterState.MISCONFIGURED, "refused")
    assert (source.status.last_error or "").startswith(f"meter.ca_file: cannot load {garbage}")


def test_configuration_checks_and_defaults() -> None:
    def load(**meter: Any) -> config.Config:
        return config.from_mapping({"meter": {"type": "mqtt", **meter}})

    loaded = load(url="mqtt://192.168.1.10", topic=TOPIC).meter
    assert isinstance(loaded, config.MqttMeterConfig)
    assert loaded.where == f"mqtt://192.168.1.10:1883/{TOPIC}"
    assert loaded.session_expiry == 86400 and loaded.client_id is None
    tls = load(url="MQTTS://broker.lan", topic="t").meter
    assert isinstance(tls, config.MqttMeterConfig) and tls.where == "mqtts://broker.lan:8883/t"
    problems = {
        "meter.topic: 'p1/+/telegram': the one topic": {
            "url": "mqtt://h",
            "topic": "p1/+/telegram",
        },
        "meter.url: put the credentials": {"url": "mqtt://u:pw@h", "topic": "t"},
        "meter.topic: is required": {"url": "mqtt://h"},
        "meter.session_expiry: must be between 0 and 4294967295": {
            "url": "mqtt://h",
            "topic": "t",
            "session_expiry": -1,
        },
        "meter.ca_file: only for mqtts://": {
            "url": "mqtt://h",
            "topic": "t",
            "ca_file": str(SHIPPED_CA),
        },
        "meter.password: is used only with meter.username": {
            "url": "mqtt://h",
            "topic": "t",
            "password": "x",
        },
    }
    for expected, keys in problems.items():
        with pytest.raises(config.ConfigError) as raised:
            load(**keys)
        assert any(p.startswith(expected) for p in raised.value.problems), raised.value.problems
        assert "pw@" not in str(raised.value)
    shown = config.effective_toml(
        load(url="mqtt://h", topic="t", username="u", password="hunter22")
    )
    assert 'password = "****"' in shown and "hunter22" not in shown
    assert default_client_id("meterkast.local") == "dsmr-logger-meterkast"


def test_a_meter_topic_the_logger_itself_publishes_to_is_refused() -> None:
    """A dongle topic that is an MQTT sink's own ``<topic>/telegram`` on the same broker: the
    logger would take back each telegram it publishes, and a backlog older than the last
    REMEMBER taken would come in as new, again and again. Another broker, or another prefix,
    is fine."""

    def load(meter_url: str, sink_url: str, sink_topic: str = "dsmr") -> config.Config:
        return config.from_mapping(
            {
                "meter": {"type": "mqtt", "url": meter_url, "topic": "dsmr/telegram"},
                "sink": [{"name": "ha", "type": "mqtt", "url": sink_url, "topic": sink_topic}],
            }
        )

    with pytest.raises(config.ConfigError) as raised:
        load("mqtt://broker.lan", "mqtt://broker.lan:1883")
    assert any(
        p.startswith("meter.topic: 'dsmr/telegram' is where sink (ha) publishes")
        for p in raised.value.problems
    ), raised.value.problems
    load("mqtt://broker.lan", "mqtt://other.lan")
    load("mqtt://broker.lan", "mqtt://broker.lan", sink_topic="dsmr/ha")


# --- 3. the daemon as a process -------------------------------------------------------------


def mqtt_meter(broker: Mosquitto, **keys: Any) -> dict[str, Any]:
    return {
        "type": "mqtt",
        "url": broker.url,
        "topic": TOPIC,
        "username": USER,
        "password": PASSWORD,
        "client_id": "dsmr-logger-test",
        "reconnect_initial": 0.05,
        "reconnect_max": 0.5,
        "timeout": 5.0,
        **keys,
    }


def dongle_messages(telegrams: list[bytes]) -> tuple[list[bytes], int]:
    """The capture as a dongle publishes it, one telegram per message, with the oddities a
    dongle has: now and then two telegrams in one message, garbage around one, or one sent
    again. (messages, telegrams sent again)"""
    messages: list[bytes] = []
    again = 0
    i = 0
    while i < len(telegrams):
        if i % 50 == 49 and i + 1 < len(telegrams):
            messages.append(telegrams[i] + telegrams[i + 1])
            i += 2
            continue
        if i % 37 == 36:
            messages.append(b"\r\n\x00junk " + telegrams[i] + b" more junk")
        else:
            messages.append(telegrams[i])
        if i % 41 == 40:
            messages.append(telegrams[i])
            again += 1
        i += 1
    return messages, again


async def subscribed_daemon(run: Any) -> None:
    await wait_until(
        lambda: len(named(run.log, "subscribed to the meter's topic")) >= 1,
        "the daemon to subscribe",
        20.0,
    )


async def test_the_capture_arrives_complete_in_order_across_a_daemon_stop_and_a_broker_restart(
    tmp_path: Path, broker: Mosquitto
) -> None:
    expected = capture_telegrams()
    assert len(expected) == 566
    parts = [expected[:150], expected[150:300], expected[300:420], expected[420:]]
    plans = [dongle_messages(part) for part in parts]
    async with DsmrReaderServer(API_KEY) as server:
        config_file = write_config(tmp_path, mqtt_meter(broker), server)

        def arrived(count: int) -> bool:
            return len(server.received) >= count

        async with daemon(tmp_path, config_file) as run:
            await subscribed_daemon(run)
            await published(broker, plans[0][0])
            await wait_until(lambda: arrived(150), "the first 150", 60.0)
            assert await run.stop() == 0

        # The daemon is stopped: the broker keeps what the dongle publishes for its session.
        await published(broker, plans[1][0])
        async with daemon(tmp_path, config_file) as run:
            await wait_until(lambda: arrived(300), "the 150 published while stopped", 60.0)
            # The broker restarts while it has messages out to the daemon (held by SIGSTOP):
            # they wait in the daemon's socket, are taken when it resumes, and their PUBACKs
            # go nowhere; the broker, persistence on, sends them again after its restart.
            run.process.send_signal(signal.SIGSTOP)
            try:
                await published(broker, plans[2][0])
                broker.stop()
            finally:
                run.process.send_signal(signal.SIGCONT)
            broker.start()
            await wait_until(lambda: arrived(420), "the 120 around the broker restart", 60.0)
            await published(broker, plans[3][0])
            await wait_until(lambda: arrived(566), "all 566", 60.0)
            await asyncio.sleep(0.3)  # anything still arriving would be a duplicate
            _, body = await run.get("/status")
            _, metrics = await run.get("/metrics")
            code, health = await run.healthz()
            assert await run.stop() == 0
    got = delivered(server)
    assert got == expected, "every telegram once, in order"
    meter_status = json.loads(body)["meter"]
    assert code == 200 and health["healthy"]
    assert meter_status["port"] == f"mqtt://127.0.0.1:{broker.port}/{TOPIC}"
    assert meter_status["state"] == "ok" and meter_status["connected"]
    deliberate = sum(again for _, again in plans[2:])
    assert meter_status["repeats"] >= deliberate
    assert b"dsmr_logger_meter_repeats_total" in metrics
    for log in tmp_path.glob("daemon-*.log"):
        assert PASSWORD not in log.read_text() and "Traceback" not in log.read_text()
    messages = sum(len(plan[0]) for plan in plans)
    print(
        f"MQTT in, 566-frame capture: {messages} messages published "
        f"({len(plans[1][0])} while the daemon was stopped, {len(plans[2][0])} around the broker "
        f"restart), {sum(a for _, a in plans)} telegrams published twice; {len(got)} telegrams "
        f"delivered, {len(set(got))} distinct; repeats skipped by the last daemon run: "
        f"{meter_status['repeats']} ({deliberate} published twice, the rest sent again by the "
        f"broker after its restart); reconnects {meter_status['reconnects']}"
    )


async def test_a_wrong_password_is_one_clear_error_and_after_the_fix_nothing_is_lost(
    tmp_path: Path, broker: Mosquitto
) -> None:
    expected = capture_telegrams()[:60]
    async with DsmrReaderServer(API_KEY) as server:
        good = write_config(tmp_path, mqtt_meter(broker), server)
        async with daemon(tmp_path, good) as run:  # the session exists from here on
            await subscribed_daemon(run)
            await published(broker, expected[:20])
            await wait_until(lambda: len(server.received) >= 20, "the first 20", 30.0)
            assert await run.stop() == 0

        wrong = "wrong-mqtt-password"
        good.write_text(good.read_text().replace(PASSWORD, wrong))
        async with daemon(tmp_path, good) as run:
            await wait_until(
                lambda: bool(named(run.log, "meter broker refuses us")), "the refusal", 20.0
            )
            await published(broker, expected[20:50])  # kept by the broker for the session
            await asyncio.sleep(1.0)  # refused again every reconnect_max (0.5 s)
            code, health = await run.healthz()
            status = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "dsmr_logger", "status", "--config", str(good)],
                capture_output=True,
                text=True,
                cwd=REPO_ROOT,
                timeout=20,
            )
            assert await run.stop() == 0
        refused_log = run.log
        refusals = named(refused_log, "meter broker refuses us")
        assert len(refusals) == 1, "one clear error, not one per attempt"
        assert "CONNACK 0x87 not authorized" in refusals[0]["reason"]
        assert "check meter.username and meter.password" in refusals[0]["reason"]
        assert code == 503 and any("misconfigured" in r for r in health["reasons"])
        assert status.returncode == 1
        assert f"meter mqtt://127.0.0.1:{broker.port}/{TOPIC}: misconfigured" in status.stdout
        assert len(server.received) == 20

        good.write_text(good.read_text().replace(wrong, PASSWORD))
        async with daemon(tmp_path, good) as run:
            await wait_until(lambda: len(server.received) >= 50, "the 30 kept meanwhile", 30.0)
            await published(broker, expected[50:])
            await wait_until(lambda: len(server.received) >= 60, "the rest", 30.0)
            await asyncio.sleep(0.3)
            assert await run.stop() == 0
        for log in tmp_path.glob("daemon-*.log"):
            assert wrong not in log.read_text() and PASSWORD not in log.read_text()
    assert delivered(server) == expected
    print(
        f"MQTT in, wrong password: refused with one error logged; 30 telegrams published "
        f"meanwhile kept by the broker; {len(server.received)} delivered of {len(expected)}, "
        "none twice"
    )
