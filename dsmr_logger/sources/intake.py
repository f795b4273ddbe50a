"""Telegrams that arrive as whole payloads (an HTTP answer, an MQTT message), not as a byte stream.

Every payload goes through the same ``FrameAssembler`` as bytes from a serial port, so two
telegrams in one payload, garbage around one, or a cut one behave exactly as on a wire. Three things
differ from a wire, and are handled here:

- A device that is polled serves its latest telegram until the meter sends the next, so most polls
  of a DSMR 4 meter (one telegram per 10 s) polled every second return a telegram already taken.
  A telegram with the same meter timestamp (``0-0:1.0.0``) as the previous one taken is skipped
  and counted; DSMR-reader stores a telegram sent twice twice, so skipping is the only defence.
  The last one taken survives a restart (``LastTaken``): a device still serving it then would
  otherwise have it delivered a second time. A broker that sends again what it sent before
  (MQTT: the messages whose acknowledgements a broken connection lost, at most the client's
  Receive Maximum of them) repeats more than the last one: such a source remembers the keys of
  the last ``remember`` telegrams taken, and skips a telegram matching any of them.
- A payload is complete, so a telegram at its very end needs no CRLF after ``!XXXX`` to be known
  complete (one is added), and one cut off at its end is dropped (counted as interrupted) rather
  than left to swallow the next payload's first telegram.
- Old HomeWizard firmware dropped the CRC altogether (the device checked it and then served
  ``...!``); DSMR-reader refuses a DSMR 4/5 telegram without one (its parser's
  checksum check, ``Failed to parse telegram``), so such a telegram, when it states a P1 version
  (``1-3:0.2.8``, ``0-0:96.1.4``) and so is DSMR 4 or later, gets its CRC computed here and is
  taken like any DSMR 4 telegram. A DSMR 2.2/3 telegram (no version line) never had one and is
  passed on without, as from a cable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections import deque
from collections.abc import Callable
from pathlib import Path

import structlog

from dsmr_logger.sources.p1.framing import Frame, FrameAssembler, FramingCounters
from dsmr_logger.telegram.build import with_crc

_TIMESTAMP = re.compile(rb"^0-0:1\.0\.0\(([^()]*)\)", re.MULTILINE)
_VERSION = re.compile(rb"^(?:1-3:0\.2\.8|0-0:96\.1\.4)\(", re.MULTILINE)
_OPEN_END = re.compile(rb"\n![0-9A-Fa-f]{0,4}\Z")


def repeat_key(telegram: bytes) -> bytes:
    """What makes a telegram the same as another: its meter timestamp, or (DSMR 2.2, which has
    none) all of its bytes."""
    stamp = _TIMESTAMP.search(telegram)
    return stamp.group(1) if stamp else telegram


def closed(payload: bytes) -> bytes:
    """The payload with the CRLF a telegram at its very end may lack (the payload ended there)."""
    body = payload.rstrip(b"\r\n")
    return body + b"\r\n" if _OPEN_END.search(body) else payload


class LastTaken:
    """The key of the last telegram taken, kept in a small file across restarts.

    Written once, when the source stops (not per telegram: the SD card), so after a SIGKILL one
    telegram may still be taken twice; read once at start. Holds a meter timestamp, no secret.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> bytes | None:
        if self.path is None:
            return None
        with contextlib.suppress(OSError):
            return self.path.read_bytes() or None
        return None

    def save(self, key: bytes | None) -> None:
        if self.path is None or key is None:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        with contextlib.suppress(OSError):
            temporary.write_bytes(key)
            os.replace(temporary, self.path)


class Intake:
    """Payload in, each new valid telegram out to ``on_frame`` exactly once (in arrival order).

    Invariant: ``taken`` counts the frames passed on; a frame whose ``repeat_key`` equals that of
    one of the last ``remember`` frames passed on (by default: the previous one) is never passed
    on, only counted in ``repeats``.
    """

    def __init__(
        self,
        on_frame: Callable[[Frame], None],
        *,
        require_crc: bool,
        last_key: bytes | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
        where: str = "",
        remember: int = 1,
    ) -> None:
        self.assembler = FrameAssembler(require_crc=require_crc)
        self.recent: deque[bytes] = deque(maxlen=remember)
        if last_key is not None:
            self.recent.append(last_key)
        self.taken = 0
        self.repeats = 0
        self.crc_added = 0
        self._on_frame = on_frame
        self._log = log or structlog.get_logger("dsmr_logger.meter")
        self._where = where

    @property
    def last_key(self) -> bytes | None:
        """The key of the last telegram passed on (what ``LastTaken`` keeps across a restart)."""
        return self.recent[-1] if self.recent else None

    @property
    def counters(self) -> FramingCounters:
        """The assembler's counters, with ``frames`` = telegrams passed on (repeats left out)."""
        return dataclasses.replace(self.assembler.counters, frames=self.taken)

    def feed(self, payload: bytes, received_at: float) -> tuple[int, int]:
        """(telegrams taken, repeats skipped) from this payload."""
        taken = repeats = 0
        for frame in self.assembler.feed(closed(payload), received_at):
            key = repeat_key(frame.raw)
            if key in self.recent:
                repeats += 1
                continue
            self.recent.append(key)
            if frame.crc is None and _VERSION.search(frame.raw):
                frame = self._completed(frame)
            self._on_frame(frame)
            taken += 1
        # A payload is whole: a telegram cut at its end is never continued by the next one.
        self.assembler.reset(received_at, "payload ended inside a telegram")
        self.taken += taken
        self.repeats += repeats
        return taken, repeats

    def _completed(self, frame: Frame) -> Frame:
        telegram = with_crc(frame.raw)
        if not self.crc_added:
            self._log.info(
                "the device serves telegrams without their CRC (old firmware); adding it, "
                "as DSMR-reader requires one from a DSMR 4/5 meter",
                port=self._where,
            )
        self.crc_added += 1
        return Frame(telegram, frame.received_at, int(telegram[-6:-2], 16))
