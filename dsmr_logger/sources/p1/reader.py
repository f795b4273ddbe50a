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
from dsmr_logger.sources.link import (
    LinkTracker,
    LinkWording,
    ReconnectBackoff,
    RejectReport,
    describe_failure,
)
from dsmr_logger.sources.p1.framing import Frame, FrameAssembler, FramingCounters
from dsmr_logger.sources.p1.port import READ_SIZE, Link, open_link

if TYPE_CHECKING:
    from dsmr_logger.sources.p1.decrypt import Decryptor


def wording(config: MeterConfig) -> LinkWording:
    """What the reader says about its link: where to look depends on a cable or ser2net."""
    return LinkWording(
        up="meter link open",
        down="meter link down, retrying",
        no_valid_frames="receiving bytes but no valid telegram; check meter.baudrate/profile "
        "(DSMR 2.2/3 meters need profile = 'dsmr22') and "
        + ("ser2net's serial settings" if config.is_network else "the cable"),
        no_bytes="no bytes from the meter; check "
        + (
            "that ser2net on that host reads the meter's cable"
            if config.is_network
            else "the cable"
        )
        + ", that the P1 port is enabled, and meter.port",
    )


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
        # Keeps the last error once the link is back: "what went wrong at 3 am" stays shown.
        self._link = LinkTracker(
            self.status, wording(config), log=self._log, wall_clock=wall_clock, keeps_error=True
        )
        self._rejects = RejectReport(self._log)
        self._bytes_since_frame = 0
        self._last_progress = 0.0  # loop time of the last valid frame or of the connect

    @property
    def counters(self) -> FramingCounters:
        return self.assembler.counters

    async def run(self) -> None:
        backoff = ReconnectBackoff(
            self.config.reconnect_initial, self.config.reconnect_max, self._jitter
        )
        while True:
            self.status.attempts += 1
            try:
                async with asyncio.timeout(max(self.config.idle_timeout, 10.0)):
                    link = await self._open(self.config)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._link.down(f"cannot open: {describe_failure(exc)}")
            else:
                productive = await self._read_until_lost(link)
                if productive:
                    backoff.reset()
            await asyncio.sleep(backoff.pause())

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
                    self._link.down(
                        f"no bytes for {self.config.idle_timeout:g} s, reopening the link",
                        MeterState.NO_BYTES,
                    )
                    break
                if not chunk:
                    self._link.down("link closed by the other side")
                    break
                self._take(chunk, loop.time())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._link.down(f"read failed: {describe_failure(exc)}")
        finally:
            await link.close()
        return self.assembler.counters.frames > frames_before

    def _take(self, chunk: bytes, now: float) -> None:
        self._link.forget()
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
            self._link.enter(MeterState.OK)
        else:
            self._bytes_since_frame += len(chunk)
            if now - self._last_progress > self.config.idle_timeout:
                self._link.enter(
                    MeterState.NO_VALID_FRAMES, bytes_without_frame=self._bytes_since_frame
                )
        failure = self.decryptor.last_error if self.decryptor is not None else None
        self._rejects.frames(
            self.rejected(),
            self.assembler.last_rejected,
            now,
            decryption=str(failure) if failure else None,
        )

    def rejected(self) -> dict[str, int]:
        """Frames not passed on, by reason (tag check failures of encrypted frames included)."""
        counts = self.assembler.counters.rejected_counts()
        if self.decryptor is not None and self.decryptor.counters.auth_failed:
            counts["decryption_failed"] = self.decryptor.counters.auth_failed
        return counts

    def _came_up(self) -> None:
        reopened = self.status.state is MeterState.NO_BYTES
        self._link.up(quiet=reopened)
        if reopened:
            # Reopened by the idle watchdog: still the same "no bytes" state, not news.
            self._log.debug("meter port reopened", port=self.config.port)
