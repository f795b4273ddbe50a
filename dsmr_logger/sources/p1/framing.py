"""Pure, incremental assembly of P1 telegrams from arbitrary byte chunks.

A frame starts at ``/`` and ends at the CRLF after ``!`` plus 0-4 hex CRC digits. Serial reads cut
telegrams anywhere, the port may open in the middle of one, gateways append junk between them, and
interference corrupts them; the assembler resynchronises on ``/``, bounds its buffer, and never
passes on a frame whose CRC does not match. It does no I/O and reads no clock: the caller passes
the receive time in.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from dsmr_logger.sources.p1.crc import crc16, format_crc

DEFAULT_MAX_FRAME_BYTES = 16 * 1024

# After "\n!": up to four hex digits (meters send lower case and unpadded ones too) and CRLF.
_END = re.compile(rb"([0-9A-Fa-f]{0,4})\r\n")
_END_SO_FAR = re.compile(rb"[0-9A-Fa-f]{0,4}\r?")


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete telegram as the meter sent it, with a verified CRC when it carries one."""

    raw: bytes
    """Exact bytes from ``/`` through the final CRLF."""
    received_at: float
    """Wall-clock time (Unix seconds) at which its last byte arrived."""
    crc: int | None
    """The verified CRC, or None for telegrams that carry none (DSMR 2.2/3, EasyMeter Q3D)."""

    @property
    def telegram(self) -> bytes:
        """The bytes to deliver: ``raw`` with the CRC written as four upper-case hex digits.

        DSMR-reader's parser rejects lower-case and unpadded CRCs although they are valid; the
        value is unchanged, so the telegram stays verifiable and is accepted.
        """
        if self.crc is None:
            return self.raw
        bang = self.raw.rindex(b"!")
        digits = format_crc(self.crc)
        if self.raw[bang + 1 : -2] == digits:
            return self.raw
        return self.raw[: bang + 1] + digits + b"\r\n"


class Rejection(enum.StrEnum):
    """Why bytes that looked like a frame were not passed on."""

    CRC_MISMATCH = "crc_mismatch"
    NO_CRC = "no_crc"
    MALFORMED_END = "malformed_end"
    INTERRUPTED = "interrupted"
    OVERSIZE = "oversize"


@dataclass(frozen=True, slots=True)
class RejectedFrame:
    """The last frame that was dropped, kept for diagnosis (bounded to the frame cap)."""

    reason: Rejection
    data: bytes
    received_at: float
    detail: str


@dataclass(slots=True)
class FramingCounters:
    """Running totals since start; the reader's status and summaries are built from them."""

    bytes_in: int = 0
    frames: int = 0
    garbage_bytes: int = 0
    rejected: dict[Rejection, int] = field(default_factory=lambda: dict.fromkeys(Rejection, 0))

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class FrameAssembler:
    """Feed it chunks as they arrive; it returns the complete, CRC-valid frames they finish."""

    def __init__(
        self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, require_crc: bool = False
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.require_crc = require_crc
        self.counters = FramingCounters()
        self.last_rejected: RejectedFrame | None = None
        self._buf = bytearray()
        self._in_frame = False
        self._scan = 1  # where to resume looking for "\n!" / "\n/" inside the current frame

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame (never above the cap plus a chunk)."""
        return len(self._buf)

    def reset(self, received_at: float, why: str = "link reopened") -> None:
        """Forget a partial frame (the link was reopened: its rest will never come)."""
        if self._in_frame:
            self._reject(Rejection.INTERRUPTED, self._buf, received_at, why)
        self._buf.clear()
        self._in_frame = False
        self._scan = 1

    def feed(self, chunk: bytes, received_at: float) -> list[Frame]:
        self.counters.bytes_in += len(chunk)
        buf = self._buf
        buf += chunk
        frames: list[Frame] = []
        while True:
            if not self._in_frame:
                start = buf.find(b"/")
                if start < 0:
                    self.counters.garbage_bytes += len(buf)
                    buf.clear()
                    return frames
                if start:
                    self.counters.garbage_bytes += start
                    del buf[:start]
                self._in_frame = True
                self._scan = 1

            end = buf.find(b"\n!", self._scan)
            restart = buf.find(b"\n/", self._scan, len(buf) if end < 0 else end)
            if restart >= 0:
                self._reject(Rejection.INTERRUPTED, buf[: restart + 1], received_at, "new '/'")
                del buf[: restart + 1]
                self._scan = 1
                continue
            if end < 0:
                if not self._within_cap(received_at):
                    continue
                self._scan = max(1, len(buf) - 1)
                return frames

            tail = end + 2
            match = _END.match(buf, tail)
            if match is None:
                if _END_SO_FAR.fullmatch(buf, tail) and self._within_cap(received_at):
                    self._scan = end
                    return frames
                if self._in_frame:
                    self._reject(
                        Rejection.MALFORMED_END, buf[:tail], received_at, "no CRC/CRLF after '!'"
                    )
                    del buf[:tail]
                    self._in_frame = False
                continue

            digits = match.group(1)  # read before the buffer below is shifted
            data = bytes(buf[: match.end()])
            del buf[: match.end()]
            self._in_frame = False
            frame = self._check(data, digits, tail, received_at)
            if frame is not None:
                self.counters.frames += 1
                frames.append(frame)

    def _within_cap(self, received_at: float) -> bool:
        """Drop the frame being assembled if it outgrew the cap; memory never follows garbage."""
        if len(self._buf) <= self.max_frame_bytes:
            return True
        self._reject(Rejection.OVERSIZE, self._buf, received_at, f"over {self.max_frame_bytes} B")
        self._buf.clear()
        self._in_frame = False
        return False

    def _check(self, data: bytes, digits: bytes, tail: int, received_at: float) -> Frame | None:
        if len(data) > self.max_frame_bytes:  # completed within the read that overflowed the cap
            self._reject(Rejection.OVERSIZE, data, received_at, f"over {self.max_frame_bytes} B")
            return None
        if not digits:
            if self.require_crc:
                self._reject(Rejection.NO_CRC, data, received_at, "require_crc is set")
                return None
            return Frame(data, received_at, None)
        given = int(digits, 16)
        computed = crc16(memoryview(data)[:tail])
        if given != computed:
            detail = f"telegram says {digits.decode()}, computed {computed:04X}"
            self._reject(Rejection.CRC_MISMATCH, data, received_at, detail)
            return None
        return Frame(data, received_at, given)

    def _reject(
        self, reason: Rejection, data: bytes | bytearray, received_at: float, detail: str
    ) -> None:
        self.counters.rejected[reason] += 1
        kept = bytes(data[: self.max_frame_bytes])
        self.last_rejected = RejectedFrame(reason, kept, received_at, detail)
