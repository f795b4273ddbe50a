"""The MQTT 5 publisher (``net/mqtt.py``) against a real Mosquitto: every way a broker says no.

Each case is one the sink's promise rests on: an acknowledged message is one the broker took; a
refusal (ACL, size, credentials) comes back as the broker's reason code, not as a success; a
connection that breaks fails the publishes waiting on it at once instead of after a timeout.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mosquitto import Mosquitto, Subscriber, TestCA

from dsmr_logger.net import mqtt

USER, PASSWORD = "logger", "correct horse battery"
LONG = 30.0
"""A timeout no test should reach: a publish failing with AckTimeout here waited it out."""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(
        tmp_path / "broker",
        users={USER: PASSWORD, "reader": "reader-pw"},
        acl={USER: ["meter/#"], "reader": ["#"]},
        message_size_limit=2000,
    ) as running:
        yield running


def client(port: int, **options: object) -> mqtt.MqttClient:
    settings: dict[str, object] = {
        "client_id": "test-publisher",
        "username": USER,
        "password": PASSWORD,
        "timeout": LONG,
    }
    settings.update(options)
    return mqtt.MqttClient("127.0.0.1", port, **settings)  # type: ignore[arg-type]


async def test_an_acknowledged_message_reached_the_broker(broker: Mosquitto) -> None:
    with Subscriber(broker.port, "meter/#", username="reader", password="reader-pw") as sub:
        publisher = client(broker.port)
        connack = await publisher.connect()
        assert connack.receive_maximum >= 1
        answers = await asyncio.gather(
            *(publisher.publish("meter/n", str(i).encode()) for i in range(200))
        )
        assert all(a.accepted and a.reason == 0 for a in answers)
        await publisher.close()
        sub.wait_for(lambda got: len(got) >= 200, 10.0, "200 messages")
        assert sub.payloads("meter/n") == [str(i).encode() for i in range(200)]


async def test_a_topic_the_acl_forbids_is_refused_not_acknowledged(broker: Mosquitto) -> None:
    """MQTT 3.1.1 would get a plain PUBACK here and the message would be gone."""
    publisher = client(broker.port)
    await publisher.connect()
    answer = await publisher.publish("elsewhere/x", b"1")
    assert not answer.accepted
    assert answer.reason == 0x87
    assert "not authorized" in answer.describe()
    assert (await publisher.publish("meter/x", b"1")).accepted, "the connection stays usable"
    await publisher.close()


async def test_a_message_over_the_size_limit_is_refused_with_its_reason(
    broker: Mosquitto,
) -> None:
    publisher = client(broker.port)
    await publisher.connect()
    answer = await publisher.publish("meter/big", b"x" * 3000)
    assert (answer.accepted, answer.reason) == (False, 0x95)
    assert (await publisher.publish("meter/small", b"x")).accepted
    await publisher.close()


async def test_a_packet_over_the_announced_maximum_is_not_sent(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "b", max_packet_size=1000) as broker:
        publisher = client(broker.port, username=None, password=None)
        connack = await publisher.connect()
        assert connack.max_packet_size == 1000
        with pytest.raises(mqtt.TooLarge) as raised:
            await publisher.publish("meter/big", b"x" * 1000)
        assert raised.value.maybe_sent is False
        assert "at most 1000 bytes" in str(raised.value)
        assert (await publisher.publish("meter/small", b"x")).accepted, "still connected"
        await publisher.close()


@pytest.mark.parametrize(
    ("username", "password"),
    [(USER, "wrong"), ("nobody", PASSWORD), (None, None)],
    ids=["wrong-password", "unknown-user", "anonymous"],
)
async def test_refused_credentials_are_a_refusal_with_the_brokers_reason(
    broker: Mosquitto, username: str | None, password: str | None
) -> None:
    publisher = client(broker.port, username=username, password=password)
    with pytest.raises(mqtt.Refused) as raised:
        await publisher.connect()
    assert raised.value.reason in (0x86, 0x87)  # Mosquitto 2.0 answers 0x87 for both
    assert raised.value.maybe_sent is False
    assert "wrong" not in str(raised.value) and PASSWORD not in str(raised.value)
    assert not publisher.connected


async def test_a_broker_killed_mid_publish_fails_it_at_once(broker: Mosquitto) -> None:
    """The PUBACK can no longer come: the publish fails with ConnectionLost, it does not sit
    out its 30 s timeout (aiomqtt 2.5.1 waits the whole timeout here)."""
    publisher = client(broker.port)
    await publisher.connect()
    broker.pause()
    waiting = asyncio.create_task(publisher.publish("meter/x", b"1"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    broker.kill()
    with pytest.raises(mqtt.ConnectionLost) as raised:
        await waiting
    assert raised.value.maybe_sent is True
    assert not publisher.connected
    with pytest.raises(mqtt.NotConnected):
        await publisher.publish("meter/x", b"2")


async def test_no_puback_in_time_ends_the_connection(broker: Mosquitto) -> None:
    publisher = client(broker.port, timeout=0.3)
    await publisher.connect()
    broker.pause()
    try:
        with pytest.raises(mqtt.AckTimeout):
            await publisher.publish("meter/x", b"1")
        assert not publisher.connected, "a late PUBACK on that connection must not count"
    finally:
        broker.resume()


async def test_nothing_listening_is_a_connect_error(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    publisher = client(port)
    with pytest.raises(mqtt.ConnectError) as raised:
        await publisher.connect()
    assert raised.value.maybe_sent is False
    assert f"127.0.0.1:{port}" in str(raised.value)


async def test_an_idle_connection_is_kept_alive_by_pings(broker: Mosquitto) -> None:
    """Keepalive 1 s: the broker drops a client silent for 1.5 s; PINGREQ keeps this one."""
    publisher = client(broker.port, keepalive=1, timeout=5.0)
    await publisher.connect()
    await asyncio.sleep(2.5)
    assert publisher.connected
    assert (await publisher.publish("meter/x", b"1")).accepted
    await publisher.close()


async def test_a_silent_broker_is_noticed_by_the_keepalive(broker: Mosquitto) -> None:
    publisher = client(broker.port, keepalive=1, timeout=0.5)
    await publisher.connect()
    broker.pause()
    try:
        for _ in range(100):
            if not publisher.connected:
                break
            await asyncio.sleep(0.05)
        assert not publisher.connected, "no PINGRESP, yet still taken for connected"
    finally:
        broker.resume()


async def test_the_will_is_published_when_the_client_vanishes(broker: Mosquitto) -> None:
    with Subscriber(broker.port, "meter/#", username="reader", password="reader-pw") as sub:
        will = mqtt.Will("meter/status", b"offline", qos=1, retain=True)
        vanishing = client(broker.port, will=will)
        await vanishing.connect()
        assert (await vanishing.publish("meter/status", b"online", retain=True)).accepted
        vanishing._end(mqtt.ConnectionLost("test: socket closed without DISCONNECT"))
        # The loop must run for the socket to close: wait in a thread.
        await asyncio.to_thread(sub.wait_for, lambda got: len(got) >= 2, 10.0, "the will")
        assert sub.payloads("meter/status") == [b"online", b"offline"]
        polite = client(broker.port, client_id="polite", will=will)
        await polite.connect()
        assert (await polite.publish("meter/status", b"online", retain=True)).accepted
        await polite.close()  # DISCONNECT: no will
        await asyncio.to_thread(sub.wait_for, lambda got: len(got) >= 3, 10.0, "online again")
    with Subscriber(
        broker.port, "meter/#", client_id="late", username="reader", password="reader-pw"
    ) as late:
        late.wait_for(lambda got: len(got) >= 1, 10.0, "the retained status")
        assert late.received()[0].retain and late.payloads("meter/status") == [b"online"]


class TestTls:
    async def test_verified_against_the_test_ca(self, tmp_path: Path) -> None:
        ca = TestCA(tmp_path / "ca")
        with Mosquitto(tmp_path / "b", tls=ca) as broker:
            assert broker.tls_port is not None
            context = ssl.create_default_context(cafile=str(ca.ca_file))
            publisher = client(broker.tls_port, username=None, password=None, tls=context)
            await publisher.connect()
            assert (await publisher.publish("meter/x", b"1")).accepted
            await publisher.close()

    async def test_an_untrusted_certificate_is_refused(self, tmp_path: Path) -> None:
        ca = TestCA(tmp_path / "ca")
        with Mosquitto(tmp_path / "b", tls=ca) as broker:
            assert broker.tls_port is not None
            publisher = client(
                broker.tls_port, username=None, password=None, tls=ssl.create_default_context()
            )
            with pytest.raises(mqtt.ConnectError, match="certificate not trusted"):
                await publisher.connect()

    async def test_a_certificate_for_another_host_is_refused(self, tmp_path: Path) -> None:
        ca = TestCA(tmp_path / "ca", hosts=("broker.example.org",))
        with Mosquitto(tmp_path / "b", tls=ca) as broker:
            assert broker.tls_port is not None
            context = ssl.create_default_context(cafile=str(ca.ca_file))
            publisher = client(broker.tls_port, username=None, password=None, tls=context)
            with pytest.raises(mqtt.ConnectError, match="certificate not trusted"):
                await publisher.connect()


class _Mqtt311Broker:
    """What an MQTT 3.1.1-only broker answers a level-5 CONNECT: CONNACK return code 1."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(bytes((0x20, 0x02, 0x00, 0x01)))

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


async def test_a_broker_without_mqtt5_is_refused_with_a_clear_reason() -> None:
    old = _Mqtt311Broker()
    try:
        publisher = client(old.port, username=None, password=None)
        with pytest.raises(mqtt.Refused) as raised:
            await publisher.connect()
        assert raised.value.reason == 0x84
        assert "only MQTT 3.1.1" in str(raised.value)
    finally:
        old.close()


def test_packets_are_encoded_as_the_standard_says() -> None:
    assert mqtt.varint(0) == b"\x00"
    assert mqtt.varint(127) == b"\x7f"
    assert mqtt.varint(128) == b"\x80\x01"
    assert mqtt.varint(16_383) == b"\xff\x7f"
    assert mqtt.varint(268_435_455) == b"\xff\xff\xff\x7f"
    with pytest.raises(ValueError):
        mqtt.varint(268_435_456)
    # MQTT 5.0 section 3.3: PUBLISH QoS 1 retained, topic "a/b", id 10, no properties.
    assert mqtt.publish_packet("a/b", b"hi", qos=1, retain=True, packet_id=10) == (
        b"\x33\x0a\x00\x03a/b\x00\x0a\x00hi"
    )
    assert mqtt.parse_puback(b"\x00\x0a") == (10, mqtt.PubAck(0))
    assert mqtt.parse_puback(b"\x00\x0a\x87") == (10, mqtt.PubAck(0x87))
    assert mqtt.parse_puback(b"\x00\x0a\x95\x06\x1f\x00\x03big") == (10, mqtt.PubAck(0x95, "big"))
