"""A meter on a virtual serial port: plays recorded telegrams into a pty, as a real meter would.

Each telegram gets the current time in ``0-0:1.0.0`` and a recomputed CRC unless played as
recorded. It is the demo's meter and the test suite's: the daemon reads it through pyserial exactly
as it reads ``/dev/ttyUSB0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dsmr_logger.telegram.build import meter_timestamp, restamp
from dsmr_logger.telegram.capture import frames_in


class VirtualSerialPort:
    """A pty whose slave side looks like a serial device; optionally reachable at a symlink."""

    def __init__(self, link: Path | None = None) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no CR/LF translation: bytes arrive as written
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._slave)
        self.link = link
        if link is not None:
            temporary = link.with_name(f".{link.name}.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            temporary.symlink_to(self.path)
            temporary.replace(link)

    def unread(self) -> int:
        """Bytes written but not yet read by whoever has the device open."""
        count: int = struct.unpack("i", fcntl.ioctl(self._slave, termios.FIONREAD, b"\0\0\0\0"))[0]
        return count

    async def drained(self, settle: float = 0.5, patience: float = 5.0) -> None:
        """Wait until the reader has taken everything written, so closing loses nothing.

        The kernel moves written bytes into the readable queue a few KiB at a time, and what
        waits to be moved is not counted by ``unread``: an empty queue proves nothing until it
        stays empty for ``settle`` seconds. Gives up when nothing moved for ``patience`` seconds
        (nobody is reading).
        """
        loop = asyncio.get_running_loop()
        last, moved_at, empty_since = self.unread(), loop.time(), None
        while True:
            await asyncio.sleep(0.05)
            now, unread = loop.time(), self.unread()
            if unread != last:
                last, moved_at = unread, now
            if unread:
                empty_since = None
            elif empty_since is None:
                empty_since = now
            if (empty_since is not None and now - empty_since >= settle) or (
                now - moved_at >= patience
            ):
                return

    def close(self) -> None:
        """Make the port disappear (as an unplugged meter cable would); safe to call twice."""
        if self.master < 0:
            return
        if self.link is not None and self.link.is_symlink():
            with contextlib.suppress(OSError):
                if os.readlink(self.link) == self.path:
                    self.link.unlink()
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.master = self._slave = -1


@dataclass(slots=True)
class SimulatorStats:
    sent: int = 0
    skipped: int = 0
    """Telegrams not written because nobody read the port and its buffer was full."""


class MeterSimulator:
    """Writes telegrams to a port at ``interval`` seconds (0: as fast as the reader takes them)."""

    def __init__(
        self,
        port: VirtualSerialPort,
        telegrams: Sequence[bytes],
        *,
        interval: float = 1.0,
        as_recorded: bool = False,
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        if not telegrams:
            raise ValueError("the capture holds no valid telegram")
        self.port = port
        self.telegrams = telegrams
        self.interval = interval
        self.as_recorded = as_recorded
        self.stats = SimulatorStats()
        self._now = now

    def stream(self, count: int | None = None) -> Iterator[bytes]:
        """The telegrams to send, looping over the capture, ``count`` of them (None: forever)."""
        sent = 0
        while count is None or sent < count:
            for telegram in self.telegrams:
                if count is not None and sent >= count:
                    return
                yield (
                    telegram
                    if self.as_recorded
                    else restamp(telegram, meter_timestamp(self._now()))
                )
                sent += 1

    async def run(self, count: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        for telegram in self.stream(count):
            if self.interval > 0:
                next_at += self.interval
                if not self._try_write(telegram):
                    self.stats.skipped += 1
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
                    continue
            else:
                await self._write_all(telegram)
            self.stats.sent += 1
            if self.interval > 0:
                await asyncio.sleep(max(0.0, next_at - loop.time()))

    def _try_write(self, telegram: bytes) -> bool:
        """Start a telegram only if the port has room, like a meter nobody listens to."""
        try:
            written = os.write(self.port.master, telegram)
        except BlockingIOError:
            return False
        if written < len(telegram):
            self._finish_later(telegram[written:])
        return True

    def _finish_later(self, rest: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._write_all(rest))
        task.add_done_callback(lambda t: t.exception())

    async def _write_all(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.port.master, view) :]
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(self.port.master, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_writer(self.port.master)


async def simulate(
    capture: bytes,
    *,
    interval: float,
    link: Path | None,
    count: int | None,
    as_recorded: bool,
    announce: Callable[[str], None],
) -> SimulatorStats:
    """Open a virtual port, announce its path, and play until ``count`` telegrams or cancel."""
    port = VirtualSerialPort(link)
    try:
        simulator = MeterSimulator(
            port, frames_in(capture), interval=interval, as_recorded=as_recorded
        )
        announce(port.path)
        await simulator.run(count)
        await port.drained()
        return simulator.stats
    finally:
        port.close()
