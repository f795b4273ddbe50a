"""A meter on a virtual serial port: plays recorded telegrams into a pty, as a real meter would.

Each telegram gets a fresh ``0-0:1.0.0`` and a recomputed CRC unless played as recorded. The stamp
is the meter's wall clock, in the meter's zone with its S/W flag (a UTC host would otherwise send
Dutch readings an hour in the past), from a simulated clock: it follows real time, but never
repeats or goes back, advancing by the capture's own spacing (1 s for DSMR 5) when telegrams go
out faster than that (``--interval 0``), because DSMR-reader keys readings by their timestamp.
An encrypted meter (Luxembourg Smarty) is simulated by sealing each telegram in a DLMS 0xDB frame
with AES-128-GCM, as the meter does, with a frame counter that counts up.

It is the demo's meter and the test suite's: the daemon reads it through the serial layer exactly
as it reads ``/dev/ttyUSB0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import os
import re
import struct
import termios
import tty
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dsmr_logger.sources.p1.decrypt import (
    DEFAULT_AUTH_KEY,
    LONG_LENGTH,
    SC_AUTH_ENC,
    START,
    TAG_BYTES,
    TITLE_LENGTH,
    DecryptionError,
    EncryptedFrameAssembler,
    decrypt,
    terminate,
)
from dsmr_logger.telegram.build import meter_timestamp, restamp
from dsmr_logger.telegram.capture import frames_in
from dsmr_logger.telegram.obis import parse_timestamp

METER_ZONE = ZoneInfo("Europe/Amsterdam")
DEFAULT_SPACING = timedelta(seconds=1)
SIMULATED_TITLE = b"SIMULATR"
"""The system title of a meter the simulator encrypts for (8 bytes, as DLMS wants)."""
_STAMP = re.compile(rb"\n0-0:1\.0\.0\((\d{12}[SW]?)\)")


def link_problem(link: Path) -> str | None:
    """Why ``link`` cannot be the port's symlink, or None. Only a path that is free, or holds a
    symlink to a pty (a simulator's, maybe left by one that was killed), is replaced: anything
    else there (a file, a folder, a device, a link to one) is the user's and would be lost."""
    if not os.path.lexists(link):
        return None if link.parent.is_dir() else f"the folder {link.parent} does not exist"
    if link.is_symlink() and os.readlink(link).startswith(PTY_DIRECTORY):
        return None
    return f"{link} already exists and is not a simulator's link; name a new path"


PTY_DIRECTORY = "/dev/pts/"


class VirtualSerialPort:
    """A pty whose slave side looks like a serial device; optionally reachable at a symlink
    (see ``link_problem``: nothing but an earlier simulator's link is ever replaced)."""

    def __init__(self, link: Path | None = None) -> None:
        if link is not None and (problem := link_problem(link)) is not None:
            raise FileExistsError(errno.EEXIST, problem, str(link))
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


class Encryptor:
    """Seals telegrams as an encrypted P1 meter does: one 0xDB frame each, counter counting up.

    The inverse of :func:`dsmr_logger.sources.p1.decrypt.decrypt`: IV = system title + frame
    counter, AAD = security control + authentication key, the GCM tag cut to 12 bytes (a
    shortened GCM tag is the full tag's first bytes).
    """

    def __init__(
        self,
        key: bytes,
        auth_key: bytes | None = DEFAULT_AUTH_KEY,
        *,
        system_title: bytes = SIMULATED_TITLE,
        counter: int = 0,
    ) -> None:
        if len(system_title) != 8:
            raise ValueError("a system title is 8 bytes")
        self._aead = AESGCM(key)
        self._aad = bytes([SC_AUTH_ENC]) + auth_key if auth_key is not None else None
        self.system_title = system_title
        self.counter = counter

    def __repr__(self) -> str:  # never show the keys
        return f"<Encryptor counter={self.counter}>"

    def __call__(self, telegram: bytes) -> bytes:
        self.counter = (self.counter + 1) & 0xFFFFFFFF
        counter = self.counter.to_bytes(4, "big")
        sealed = self._aead.encrypt(self.system_title + counter, telegram, self._aad)
        body = bytes([SC_AUTH_ENC]) + counter + sealed[:-16] + sealed[-16 : -16 + TAG_BYTES]
        head = bytes([START, TITLE_LENGTH]) + self.system_title + bytes([LONG_LENGTH])
        return head + len(body).to_bytes(2, "big") + body


class NoTelegrams(ValueError):
    """The capture holds nothing the simulator can play; the message says why."""


@dataclass(frozen=True, slots=True)
class Playlist:
    """What a simulated meter plays: telegrams, sealed by ``encrypt`` when set; ``note`` says
    what the user should know about how they are played."""

    telegrams: tuple[bytes, ...]
    encrypt: Encryptor | None = None
    as_recorded: bool = False
    """Encrypted frames without their key: they can only be sent exactly as recorded."""
    note: str | None = None


def prepare(
    capture: bytes,
    *,
    decryption_key: bytes | None = None,
    authentication_key: bytes | None = DEFAULT_AUTH_KEY,
) -> Playlist:
    """A capture as a playlist: its telegrams, or its encrypted frames (decrypted with the key,
    to be restamped and sealed again; else as recorded). With a key, a plain capture is
    encrypted too: the bundled capture becomes an encrypted meter."""
    plain = frames_in(capture)
    if plain:
        if decryption_key is None:
            return Playlist(tuple(plain))
        return Playlist(tuple(plain), Encryptor(decryption_key, authentication_key))
    frames = EncryptedFrameAssembler().feed(capture, 0.0)
    if not frames:
        raise NoTelegrams("no valid telegram and no encrypted frame in it")
    if decryption_key is None:
        return Playlist(
            tuple(frame.raw for frame in frames),
            as_recorded=True,
            note="encrypted frames played as recorded (their timestamps repeat); give "
            "--decryption-key to restamp them",
        )
    try:
        telegrams = [terminate(decrypt(f, decryption_key, authentication_key)) for f in frames]
    except DecryptionError:
        raise NoTelegrams(
            "its frames do not decrypt with this --decryption-key (and --authentication-key)"
        ) from None
    encrypt = Encryptor(
        decryption_key,
        authentication_key,
        system_title=frames[0].system_title,
        counter=max(frame.frame_counter for frame in frames),
    )
    return Playlist(tuple(telegrams), encrypt)


def capture_spacing(telegrams: Sequence[bytes]) -> timedelta:
    """How far apart the capture's own timestamps are, most often (1 s when it cannot tell)."""
    stamps = [
        parse_timestamp(match.group(1).decode(), METER_ZONE)
        for telegram in telegrams
        if (match := _STAMP.search(telegram))
    ]
    gaps = Counter(
        later - earlier
        for earlier, later in itertools.pairwise(stamps)
        if earlier is not None and later is not None and later > earlier
    )
    if not gaps:
        return DEFAULT_SPACING
    gap = gaps.most_common(1)[0][0]
    return max(DEFAULT_SPACING, timedelta(seconds=round(gap.total_seconds())))


def _utc_now() -> datetime:
    return datetime.now(UTC)


class MeterSimulator:
    """Writes telegrams to a port at ``interval`` seconds (0: as fast as the reader takes them).

    Invariant: unless played as recorded, every telegram carries a timestamp later than the one
    before it, in ``zone`` with the S/W flag of that instant.
    """

    def __init__(
        self,
        port: VirtualSerialPort,
        telegrams: Sequence[bytes],
        *,
        interval: float = 1.0,
        as_recorded: bool = False,
        zone: tzinfo = METER_ZONE,
        now: Callable[[], datetime] = _utc_now,
        spacing: timedelta | None = None,
        encrypt: Callable[[bytes], bytes] | None = None,
    ) -> None:
        if not telegrams:
            raise ValueError("the capture holds no valid telegram")
        self.port = port
        self.telegrams = telegrams
        self.interval = interval
        self.as_recorded = as_recorded
        self.zone = zone
        self.spacing = spacing if spacing is not None else capture_spacing(telegrams)
        self.encrypt = encrypt
        self.stats = SimulatorStats()
        self._now = now
        self._clock: datetime | None = None
        self._rest: asyncio.Task[None] | None = None
        """The rest of a telegram the port took only in part: written before the next starts."""

    def tick(self) -> datetime:
        """The next telegram's time: now, but never earlier than the last one plus the spacing."""
        now = self._now().replace(microsecond=0)
        if self._clock is not None and now < self._clock + self.spacing:
            now = self._clock + self.spacing
        self._clock = now
        return now

    def stream(self, count: int | None = None) -> Iterator[bytes]:
        """The telegrams to send, looping over the capture, ``count`` of them (None: forever)."""
        sent = 0
        while count is None or sent < count:
            for telegram in self.telegrams:
                if count is not None and sent >= count:
                    return
                if not self.as_recorded:
                    telegram = restamp(telegram, meter_timestamp(self.tick(), self.zone))
                yield self.encrypt(telegram) if self.encrypt is not None else telegram
                sent += 1

    async def run(self, count: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
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
            if self._rest is not None:
                await self._rest  # the last telegram whole, before the caller closes the port
        finally:
            if self._rest is not None and not self._rest.done():
                self._rest.cancel()

    def _try_write(self, telegram: bytes) -> bool:
        """Start a telegram only if the port has room and the one before is out whole, like a
        meter nobody listens to (it never interleaves two telegrams)."""
        if self._rest is not None and not self._rest.done():
            return False
        try:
            written = os.write(self.port.master, telegram)
        except BlockingIOError:
            return False
        if written < len(telegram):
            self._finish_later(telegram[written:])
        return True

    def _finish_later(self, rest: bytes) -> None:
        self._rest = asyncio.get_running_loop().create_task(self._write_all(rest))
        # Retrieved, so a port closed under it is not "never retrieved"; cancelled is fine.
        self._rest.add_done_callback(lambda t: t.cancelled() or t.exception())

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
    playlist: Playlist,
    *,
    interval: float,
    link: Path | None,
    count: int | None,
    as_recorded: bool,
    zone: tzinfo,
    announce: Callable[[str], None],
) -> SimulatorStats:
    """Open a virtual port, announce its path, and play until ``count`` telegrams or cancel."""
    port = VirtualSerialPort(link)
    try:
        simulator = MeterSimulator(
            port,
            playlist.telegrams,
            interval=interval,
            as_recorded=as_recorded or playlist.as_recorded,
            zone=zone,
            encrypt=playlist.encrypt,
        )
        announce(port.path)
        await simulator.run(count)
        await port.drained()
        return simulator.stats
    finally:
        port.close()
