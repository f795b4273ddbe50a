"""The one task that reads the meter, forever: open, read continuously, reassemble, reconnect.

It never exits because of the meter. Each change of link state is logged once (not once per retry),
CRC storms are summarised at most once a minute, and the status tells "no bytes at all" (cable,
disabled P1 port, wrong device) apart from "bytes but no valid frame" (wrong baud rate or parity,
interference): the first two questions a user asks.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from dsmr_logger.config import MeterConfig
from dsmr_logger.sources import MeterState, MeterStatus
from dsmr_logger.sources.p1.framing import Frame, FrameAssembler, FramingCounters
from dsmr_logger.sources.p1.port import READ_SIZE, Link, open_link

if TYPE_CHECKING:
    from dsmr_logger.sources.p1.decrypt import Decryptor

REJECT_LOG_INTERVAL = 60.0


class MeterReader:
    """Reads ``config.port`` and hands every valid frame to ``on_frame`` (which must not block)."""

    def __init__(
        self,
        config: MeterConfig,
        on_frame: Callable[[Frame], None],
        *,
        wall_clock: Callable[[], float] = time.time,
        open_link: Callable[[MeterConfig], Awaitable[Link]] = open_link,
        jitter: Callable[[], float] = random.random,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.config = config
        self.assembler = FrameAssembler(
            max_frame_bytes=config.max_frame_bytes, require_crc=config.require_crc
        )
        self.decryptor: Decryptor | None = None
        if config.decryption_key:
            # Imported here: cryptography costs 6.6 MiB of RAM, and only encrypted meters need it.
            from dsmr_logger.sources.p1.decrypt import Decryptor

            self.decryptor = Decryptor(
                bytes.fromhex(config.decryption_key),
                bytes.fromhex(config.authentication_key) if config.authentication_key else None,
                max_frame_bytes=config.max_frame_bytes,
            )
        self.status = MeterStatus(port=config.port)
        self._on_frame = on_frame
        self._wall = wall_clock
        self._open = open_link
        self._jitter = jitter
        self._log = log or structlog.get_logger("dsmr_logger.meter")
        self._down_reason: str | None = None
        self._rejects_logged = 0
        self._rejects_logged_at = -REJECT_LOG_INTERVAL
        self._bytes_since_frame = 0
        self._last_progress = 0.0  # loop time of the last valid frame or of the connect

    @property
    def counters(self) -> FramingCounters:
        return self.assembler.counters

    async def run(self) -> None:
        delay = self.config.reconnect_initial
        while True:
            self.status.attempts += 1
            try:
                async with asyncio.timeout(max(self.config.idle_timeout, 10.0)):
                    link = await self._open(self.config)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._went_down(f"cannot open: {_describe(exc)}")
            else:
                productive = await self._read_until_lost(link)
                if productive:
                    delay = self.config.reconnect_initial
            pause = delay * (0.5 + self._jitter() / 2)
            delay = min(delay * 2, self.config.reconnect_max)
            await asyncio.sleep(pause)

    async def _read_until_lost(self, link: Link) -> bool:
        """Pump bytes into the assembler until the link fails or idles; True if frames came."""
        loop = asyncio.get_running_loop()
        self.assembler.reset(self._wall())
        if self.decryptor is not None:
            self.decryptor.reset(self._wall())
        self._came_up()
        self._last_progress = loop.time()
        self._bytes_since_frame = 0
        frames_before = self.assembler.counters.frames
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                    # that races with arriving data, and then shutdown never finishes.
                    async with asyncio.timeout(self.config.idle_timeout):
                        chunk = await link.reader.read(READ_SIZE)
                except TimeoutError:
                    self.status.idle_reconnects += 1
                    self._went_down(
                        f"no bytes for {self.config.idle_timeout:g} s, reopening the link",
                        MeterState.NO_BYTES,
                    )
                    break
                if not chunk:
                    self._went_down("link closed by the other side")
                    break
                self._take(chunk, loop.time())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._went_down(f"read failed: {_describe(exc)}")
        finally:
            await link.close()
        return self.assembler.counters.frames > frames_before

    def _take(self, chunk: bytes, now: float) -> None:
        self._down_reason = None
        received_at = self._wall()
        self.status.last_byte_at = received_at
        if self.decryptor is None:
            frames = self.assembler.feed(chunk, received_at)
        else:
            frames = [
                frame
                for telegram in self.decryptor.feed(chunk, received_at)
                for frame in self.assembler.feed(telegram, received_at)
            ]
        for frame in frames:
            self._on_frame(frame)
        if frames:
            self.status.last_frame_at = received_at
            self._last_progress = now
            self._bytes_since_frame = 0
            self._set_state(MeterState.OK)
        else:
            self._bytes_since_frame += len(chunk)
            if now - self._last_progress > self.config.idle_timeout:
                self._set_state(MeterState.NO_VALID_FRAMES)
        self._report_rejects(now)

    def rejected(self) -> dict[str, int]:
        """Frames not passed on, by reason (tag check failures of encrypted frames included)."""
        counts = {r.value: n for r, n in self.assembler.counters.rejected.items() if n}
        if self.decryptor is not None and self.decryptor.counters.auth_failed:
            counts["decryption_failed"] = self.decryptor.counters.auth_failed
        return counts

    def _report_rejects(self, now: float) -> None:
        counts = self.rejected()
        total = sum(counts.values())
        if total == self._rejects_logged or now - self._rejects_logged_at < REJECT_LOG_INTERVAL:
            return
        last = self.assembler.last_rejected
        failure = self.decryptor.last_error if self.decryptor is not None else None
        self._log.warning(
            "frames rejected",
            since_last_report=total - self._rejects_logged,
            total=counts,
            last_reason=last.reason.value if last else None,
            last_detail=last.detail if last else None,
            decryption=str(failure) if failure else None,
        )
        self._rejects_logged = total
        self._rejects_logged_at = now

    def _came_up(self) -> None:
        self.status.connected = True
        self.status.connects += 1
        if self.status.state is MeterState.NO_BYTES:
            # Reopened by the idle watchdog: still the same "no bytes" state, not news.
            self._log.debug("meter port reopened", port=self.config.port)
            return
        if self._down_reason is not None or self.status.connects == 1:
            self._log.info("meter link open", port=self.config.port)
        self._down_reason = None

    def _went_down(self, reason: str, state: MeterState = MeterState.DISCONNECTED) -> None:
        if self.status.connected:
            self.status.disconnects += 1
        self.status.connected = False
        self.status.last_error = reason
        self.status.last_error_at = self._wall()
        self._set_state(state)
        if reason != self._down_reason:
            self._log.warning("meter link down, retrying", port=self.config.port, reason=reason)
            self._down_reason = reason

    def _set_state(self, state: MeterState) -> None:
        if state is self.status.state:
            return
        previous, self.status.state = self.status.state, state
        if state is MeterState.NO_VALID_FRAMES:
            self._log.warning(
                "receiving bytes but no valid telegram; check meter.baudrate/profile "
                "(DSMR 2.2/3 meters need profile = 'dsmr22') and "
                + ("ser2net's serial settings" if self.config.is_network else "the cable"),
                port=self.config.port,
                bytes_without_frame=self._bytes_since_frame,
            )
        elif state is MeterState.NO_BYTES:
            self._log.warning(
                "no bytes from the meter; check "
                + (
                    "that ser2net on that host reads the meter's cable"
                    if self.config.is_network
                    else "the cable"
                )
                + ", that the P1 port is enabled, and meter.port",
                port=self.config.port,
            )
        elif state is MeterState.OK:
            self._log.info("reading valid telegrams", port=self.config.port, was=previous.value)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
