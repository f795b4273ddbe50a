"""A meter behind an MQTT broker: subscribe to the topic a P1 dongle publishes raw telegrams to.

ESPHome's ``dsmr`` telegram text sensor (and any P1 reader with an MQTT client: a Tasmota script, a
home-made ESP) publishes each telegram as one message. dsmr-logger subscribes at QoS 1 in a session
the broker keeps (MQTT 5: Clean Start 0 and a Session Expiry Interval, ``session_expiry``, a day by
default), so what the dongle publishes while dsmr-logger is stopped, restarting or cut off is queued
by the broker and sent when it is back: in ``tests/test_mqtt_source.py`` the 566-frame capture, a
stretch of it published while the daemon was stopped and another around a broker restart, reaches
DSMR-reader complete, in order, none twice.

A message is acknowledged (PUBACK) only after its telegrams were handed to the daemon's queue
(``on_frame``); one that could not be taken is not acknowledged, and the broker sends it again on
the next connection. The queue commits to the spool later (``flush_interval``), and offers the
source no signal when it has, so a crash between the PUBACK and that commit can lose what a
SIGKILL of a P1 reader loses (README, "The spool and durability"); in ``strict`` durability the
window is the milliseconds before the commit. A clean stop loses nothing.

Every payload goes through ``Intake``: the same framing and CRC check as bytes from a serial
port, so two telegrams in one message or garbage around one come out as on a wire. A broker sends
again the messages whose PUBACKs a broken connection lost (at most ``RECEIVE_MAXIMUM``, the window
this client allows), so the intake skips (and counts) a telegram whose meter timestamp is among
the last ``REMEMBER`` taken, not only the last one.

Link states, as for the other sources: connected and subscribed, ``ok`` once a telegram came;
the broker refusing the login (CONNACK 0x86, 0x87) or the subscription (SUBACK 0x87: its ACL
denies the topic) is ``misconfigured``, one clear error, tried again every ``reconnect_max``; a
broker unreachable or gone is ``disconnected``, retried with backoff; subscribed with no new
telegram for ``idle_timeout`` is ``meter_silent`` (Mosquitto with an ``acl_file`` grants a denied
subscription and then delivers nothing, so there this is how a denied topic shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import structlog

from dsmr_logger.config import MqttMeterConfig
from dsmr_logger.net import mqtt
from dsmr_logger.net.http import tls_context
from dsmr_logger.sources import MeterState, MeterStatus
from dsmr_logger.sources.intake import Intake, LastTaken
from dsmr_logger.sources.link import LinkTracker, LinkWording, ReconnectBackoff, RejectReport
from dsmr_logger.sources.p1.framing import Frame, FramingCounters

KEEPALIVE = 60
RECEIVE_MAXIMUM = 32
"""QoS 1 messages the broker may send before their PUBACK: a backlog drains without waiting for
each round trip, and at most this many come again after a connection breaks."""
REMEMBER = 2 * RECEIVE_MAXIMUM
"""Meter timestamps of the telegrams last taken, against which a message sent again is checked."""
CLOSE_GRACE = 2.0

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

CONNACK_FIXES: dict[int, str] = {
    0x84: "the broker does not speak MQTT 5 (Mosquitto >= 1.6, EMQX, HiveMQ do)",
    0x85: "check meter.client_id",
    0x86: "check meter.username and meter.password",
    0x87: "check meter.username and meter.password",
    0x8A: "the broker has banned this client",
    0x8C: "check meter.username and meter.password",
    0x9C: "check meter.url: the broker says to use another server",
    0x9D: "check meter.url: the broker has moved",
}
"""CONNACK reason codes that retrying will not fix, and what to change."""
SUBACK_FIX = "check meter.topic, and that the broker's ACL lets this account read it"

WORDING = LinkWording(
    up="subscribed to the meter's topic",
    down="meter broker connection lost, retrying",
    refused="meter broker refuses us",
    silent="no new telegram from the dongle",
    no_valid_frames="messages, but no valid telegram in them; check meter.topic",
)


def default_client_id(hostname: str) -> str:
    """``dsmr-logger-<host>``: stable across restarts (the broker keeps the session under it), and
    never equal to an MQTT sink's default on this machine (``dsmr-logger-<host>-<sink>``)."""
    host = _UNSAFE.sub("-", hostname.split(".")[0]).strip("-")[:40] or "host"
    return f"dsmr-logger-{host}"


class MqttSource:
    """Subscribes to ``config.topic`` and feeds every message on it to one ``Intake``.

    Invariant: a QoS 1 message is acknowledged only after the intake took it (each new valid
    telegram in it handed to ``on_frame``); messages are taken one connection at a time, in the
    order the broker sent them; a message on any other topic (a subscription the broker kept
    from an earlier ``topic``) is never taken.
    """

    def __init__(
        self,
        config: MqttMeterConfig,
        on_frame: Callable[[Frame], None],
        *,
        wall_clock: Callable[[], float] = time.time,
        state_path: Path | None = None,
        hostname: Callable[[], str] = socket.gethostname,
        jitter: Callable[[], float] = random.random,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.config = config
        self.status = MeterStatus(port=config.where)
        parsed = urllib.parse.urlsplit(config.url)
        self.host = parsed.hostname or ""
        self.port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
        self.client_id = config.client_id or default_client_id(hostname())
        self.messages = 0
        """Messages received on ``config.topic``."""
        self._wall = wall_clock
        self._jitter = jitter
        self._log = log or structlog.get_logger("dsmr_logger.meter")
        self._last_taken = LastTaken(state_path)
        self.intake = Intake(
            on_frame,
            require_crc=config.require_crc,
            last_key=self._last_taken.load(),
            log=self._log,
            where=config.where,
            remember=REMEMBER,
        )
        self._ran_before = self.intake.last_key is not None
        self.client: mqtt.MqttClient | None = None
        """The connection, while one is open."""
        self._tls: ssl.SSLContext | None = None
        self._link = LinkTracker(self.status, WORDING, log=self._log, wall_clock=wall_clock)
        self._rejects = RejectReport(self._log)
        self._last_new = 0.0  # loop time of the last new telegram (or of start)
        self._since_new = 0  # messages since then
        self._repeats_at_new = 0  # the intake's repeats then
        self._told_qos0 = False
        self._foreign: set[str] = set()
        self._unsubscribed: set[str] = set()

    @property
    def counters(self) -> FramingCounters:
        return self.intake.counters

    def rejected(self) -> dict[str, int]:
        return self.intake.assembler.counters.rejected_counts()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_new = loop.time()
        backoff = ReconnectBackoff(
            self.config.reconnect_initial, self.config.reconnect_max, self._jitter
        )
        try:
            while True:
                outcome = await self._connection()
                if outcome is None:  # refused: a configuration to fix
                    await asyncio.sleep(self.config.reconnect_max)
                    continue
                if outcome:  # it was subscribed: back off afresh
                    backoff.reset()
                await asyncio.sleep(backoff.pause())
        finally:
            self._last_taken.save(self.intake.last_key)

    # --- one connection ---------------------------------------------------------------------

    async def _connection(self) -> bool | None:
        """Connect, subscribe, take messages until the connection ends. True if it got as far as
        subscribed, False if it failed before, None if the broker refused us for good."""
        try:
            tls = self._tls_context()
        except (OSError, ValueError) as exc:
            self._link.down(
                f"meter.ca_file: cannot load {self.config.ca_file}: {exc}", MeterState.MISCONFIGURED
            )
            return None
        client = mqtt.MqttClient(
            self.host,
            self.port,
            client_id=self.client_id,
            username=self.config.username,
            password=self.config.password,
            tls=tls,
            keepalive=KEEPALIVE,
            timeout=self.config.timeout,
            clean_start=False,
            session_expiry=self.config.session_expiry,
            receive_maximum=RECEIVE_MAXIMUM,
            on_message=self._on_message,
        )
        self.client = client
        self.status.attempts += 1
        try:
            try:
                connack = await client.connect()
                answer = await client.subscribe(self.config.topic, qos=1, retain_handling=1)
            except mqtt.Refused as exc:
                fix = CONNACK_FIXES.get(exc.reason or 0)
                if fix is None:  # busy, unavailable, rate-limited: it passes
                    self._link.down(str(exc))
                    return False
                self._link.down(f"{exc}: {fix}", MeterState.MISCONFIGURED)
                return None
            except mqtt.MqttError as exc:
                self._link.down(str(exc))
                return False
            if not answer.accepted:
                self._link.down(
                    f"{self.config.where}: broker refused the subscription: "
                    f"{answer.describe()}: {SUBACK_FIX}",
                    MeterState.MISCONFIGURED,
                )
                return None
            self._came_up(connack, answer)
            self._link.down(self._why_lost(await self._serve(client)))
            return True
        finally:
            self.client = None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_GRACE):
                    await client.close()

    def _tls_context(self) -> ssl.SSLContext | None:
        """For ``mqtts://``: the broker's certificate verified, against ``ca_file`` if given."""
        if not self.config.url.startswith("mqtts:"):
            return None
        if self._tls is None:
            cafile = str(self.config.ca_file) if self.config.ca_file is not None else None
            self._tls = tls_context(ca_file=cafile)
        return self._tls

    async def _serve(self, client: mqtt.MqttClient) -> mqtt.MqttError:
        """While connected: unsubscribe foreign topics, watch for silence; what ended it."""
        loop = asyncio.get_running_loop()
        check_every = max(0.05, self.config.idle_timeout / 4)
        while True:
            for topic in sorted(self._foreign - self._unsubscribed):
                try:
                    await client.unsubscribe(topic)
                except mqtt.MqttError as exc:
                    return exc
                self._unsubscribed.add(topic)
            self._check_idle(loop.time())
            try:
                async with asyncio.timeout(check_every):
                    return await client.wait_lost()
            except TimeoutError:
                continue

    def _why_lost(self, lost: mqtt.MqttError) -> str:
        if lost.reason == 0x8E:
            return (
                f"{lost}: another client connected with client id {self.client_id}; give each "
                "its own (meter.client_id)"
            )
        return str(lost)

    # --- messages ---------------------------------------------------------------------------

    def _on_message(self, message: mqtt.Message) -> None:
        """Called by the client for each PUBLISH, in order; it acknowledges after this returns."""
        if message.topic != self.config.topic:
            if message.topic not in self._foreign:
                self._log.warning(
                    "a message on another topic than meter.topic: a subscription this client id "
                    "kept from an earlier configuration; ignored, and unsubscribed",
                    port=self.config.where,
                    topic=message.topic,
                )
                self._foreign.add(message.topic)
            return
        now = asyncio.get_running_loop().time()
        self.messages += 1
        self._since_new += 1
        if message.qos == 0 and not self._told_qos0:
            self._told_qos0 = True
            self._log.warning(
                "the dongle publishes at QoS 0: the broker keeps nothing for dsmr-logger while "
                "it is away; set QoS 1 on the dongle",
                port=self.config.where,
            )
        received_at = self._wall()
        self.status.last_byte_at = received_at
        taken, _ = self.intake.feed(message.payload, received_at)
        self.status.repeats = self.intake.repeats
        if taken:
            self.status.last_frame_at = received_at
            self._last_new = now
            self._since_new = 0
            self._repeats_at_new = self.intake.repeats
            self._link.enter(MeterState.OK)
        self._rejects.frames(self.rejected(), self.intake.assembler.last_rejected, now)

    def _check_idle(self, now: float) -> None:
        """No new telegram for ``idle_timeout``: say why, in the state and its last error."""
        silent_for = now - self._last_new
        if silent_for <= self.config.idle_timeout or not self.status.connected:
            return
        if self._since_new and self.intake.repeats - self._repeats_at_new >= self._since_new:
            reason = "the dongle publishes the same telegram over and over"
            state = MeterState.SILENT
        elif self._since_new:
            reason = f"{self._since_new} messages on {self.config.topic}, no valid telegram in them"
            state = MeterState.NO_VALID_FRAMES
        else:
            reason = (
                f"no message on {self.config.topic} for {silent_for:.0f} s: {SUBACK_FIX}, and "
                "that the dongle publishes there"
            )
            state = MeterState.SILENT
        if state is self.status.state and self.status.last_error is not None:
            return  # said when it began (the reason names how long it had been silent then)
        self.status.failed(reason, self._wall())
        self._link.enter(state, reason=reason)

    # --- state ------------------------------------------------------------------------------

    def _came_up(self, connack: mqtt.ConnAck, answer: mqtt.SubAck) -> None:
        reconnect = self.status.connects > 0
        if not connack.session_present and (reconnect or self._ran_before):
            self._log.warning(
                "the broker kept no session for this client: telegrams published while "
                "dsmr-logger was away are lost (the broker restarted without persistence, the "
                "session expired, or the client id changed)",
                port=self.config.where,
                client_id=self.client_id,
            )
        if answer.reason == 0:
            self._log.warning(
                "the broker grants only QoS 0: it keeps nothing for dsmr-logger while it is away",
                port=self.config.where,
            )
        expiry = connack.session_expiry
        if expiry is not None and expiry < self.config.session_expiry:
            self._log.warning(
                "the broker keeps the session for less than meter.session_expiry",
                port=self.config.where,
                seconds=expiry,
            )
        self._link.up(client_id=self.client_id, session_present=connack.session_present)
        if self.status.state is not MeterState.OK:  # connected; no telegram on it yet
            self._link.enter(MeterState.NO_BYTES)


def mqtt_source(
    config: MqttMeterConfig,
    on_frame: Callable[[Frame], None],
    *,
    wall_clock: Callable[[], float] = time.time,
    state_path: Path | None = None,
) -> MqttSource:
    return MqttSource(config, on_frame, wall_clock=wall_clock, state_path=state_path)
