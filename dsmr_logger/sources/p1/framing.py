"""Pure, incremental assembly of P1 telegrams from arbitrary byte chunks.

A frame runs from its header (``/`` and the meter's identification line) to the CRLF after ``!``
plus 0-4 hex CRC digits. Serial reads cut telegrams anywhere, the port may open in the middle of
one, gateways append junk between them, and interference corrupts or cuts them. The assembler
holds the bytes from the first ``/`` it sees and decides where the frame began only when its end
arrives: at the latest header before the end (a ``/`` whose line has no parenthesis and no other
``/``: every data line has a parenthesis, so a ``/`` inside a value is never taken for a start).
With a CRC, that start must verify; if it does not, earlier starts are tried, back to the first
``/``. A cut frame followed directly by the next telegram therefore costs only itself, wherever
the cut fell (restarting only at a ``/`` at a line start lost both; peers that restart on any
``/`` lose a telegram with a ``/`` in a value). Without a CRC (DSMR 2.2/3) nothing can verify,
and the latest header starts the frame. Looking for the end is the only per-chunk scan, so the
clean path costs no more than the line-start rule did (25.7 vs 25.8 µs a 778-byte telegram read
whole, 30.5 vs 33.2 in 64-byte reads; ``bench/hot_paths.py``). It bounds its buffer, never passes
on a frame whose CRC does not match, does no I/O and reads no clock: the caller passes the
receive time in. Read boundaries never change what comes out (a property test holds it to that).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from dsmr_logger.sources.p1.crc import crc16, format_crc

DEFAULT_MAX_FRAME_BYTES = 16 * 1024

HEADER_MAX = 128
"""Longest identification line taken for a header (the corpus's longest is 23 bytes)."""
RETRIES = 8
"""Later headers tried when a frame fails its CRC: bounds the CPU that noise can cost."""

# After "\n!": up to four hex digits (meters send lower case and unpadded ones too) and CRLF.
_END = re.compile(rb"([0-9A-Fa-f]{0,4})\r\n")
_END_SO_FAR = re.compile(rb"[0-9A-Fa-f]{0,4}\r?")
# A '/' that begins a header: its line ends without a parenthesis (every data line has one) and
# without another '/' (so the scan for headers in a run of junk stops at each '/').
_HEADER = re.compile(rb"/(?=[^\r\n()/]{0,%d}\r\n)" % HEADER_MAX)


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

    def rejected_counts(self) -> dict[str, int]:
        """Frames rejected, by reason name, the reasons with none left out (``rejected()``)."""
        return {reason.value: n for reason, n in self.rejected.items() if n}


class FrameAssembler:
    """Feed it chunks as they arrive; it returns the complete, CRC-valid frames they finish.

    Invariant: while a frame is being assembled, the buffer starts at its first ``/`` and holds
    at most ``max_frame_bytes`` bytes plus the chunk being worked through; a byte is dropped only
    once no frame within the cap can contain it.
    """

    def __init__(
        self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, require_crc: bool = False
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.require_crc = require_crc
        self.counters = FramingCounters()
        self.last_rejected: RejectedFrame | None = None
        self._buf = bytearray()
        self._in_frame = False
        self._scan = 1  # where to resume looking for "\n!" inside the current frame

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame (never above the cap plus a chunk)."""
        return len(self._buf)

    def reset(self, received_at: float, why: str = "link reopened") -> None:
        """Forget a partial frame (the link was reopened: its rest will never come)."""
        if self._in_frame:
            self._drop(0, len(self._buf), Rejection.INTERRUPTED, received_at, why)
        self._buf.clear()
        self._in_frame = False
        self._scan = 1

    def feed(self, chunk: bytes, received_at: float) -> list[Frame]:
        self.counters.bytes_in += len(chunk)
        buf = self._buf
        buf += chunk
        cap = self.max_frame_bytes
        frames: list[Frame] = []
        base = 0  # the current frame's '/' (or where to look for one); bytes before it are done
        scan = self._scan  # where to resume looking for "\n!"
        while True:
            if not self._in_frame:
                start = buf.find(b"/", base)
                if start < 0:
                    self.counters.garbage_bytes += len(buf) - base
                    buf.clear()
                    return frames
                self.counters.garbage_bytes += start - base
                base, scan = start, start + 1
                self._in_frame = True

            # Each outcome below happens at a byte of the stream; the earliest one wins, so read
            # boundaries cannot change which: an end within the cap, a malformed end, or the byte
            # that takes the frame over the cap.
            end = buf.find(b"\n!", scan)
            if end >= 0:
                tail = end + 2
                match = _END.match(buf, tail)
                if match is not None:
                    if match.end() - base <= cap:
                        frame = self._complete(base, tail, match.end(), match.group(1), received_at)
                        if frame is not None:
                            self.counters.frames += 1
                            frames.append(frame)
                        base = match.end()
                        self._in_frame = False
                        continue
                else:
                    so_far = _END_SO_FAR.match(buf, tail)  # matches, if only the empty string
                    broken_at = tail if so_far is None else so_far.end()
                    if broken_at < len(buf) and broken_at - base < cap:
                        detail = "no CRC/CRLF after '!'"
                        self._reject(Rejection.MALFORMED_END, buf[base:tail], received_at, detail)
                        base = tail
                        self._in_frame = False
                        continue
            if len(buf) - base > cap:
                base = self._overflow(base, end, received_at)
                # Nothing before a found end, or before the buffer's last byte, is an end.
                scan = max(end if end >= 0 else len(buf) - 1, base + 1)
                continue
            # "\n!" may straddle this read's end: look again from its last byte.
            self._scan = (end if end >= 0 else len(buf) - 1) - base
            if base:
                del buf[:base]
            return frames

    def _complete(
        self, base: int, tail: int, stop: int, digits: bytes, received_at: float
    ) -> Frame | None:
        """``buf[base:stop]`` ends a frame (its '!' ends at ``tail``): find where it began,
        and check it."""
        data = bytes(self._buf[base:stop])
        tail -= base
        headers = (
            [m.start() for m in _HEADER.finditer(data, 1, tail)]
            if data.find(b"/", 1, tail) > 0  # a C scan first: most frames have one '/'
            else []
        )
        if not digits:
            start = headers[-1] if headers else 0
            if self.require_crc:
                self._cut(data, start, received_at)
                self._reject(Rejection.NO_CRC, data[start:], received_at, "require_crc is set")
                return None
            return Frame(self._cut(data, start, received_at), received_at, None)
        given = int(digits, 16)
        for start in (*reversed(headers[-RETRIES:]), 0):
            if crc16(memoryview(data)[start:tail]) == given:
                return Frame(self._cut(data, start, received_at), received_at, given)
        computed = crc16(memoryview(data)[:tail])
        detail = f"telegram says {digits.decode()}, computed {computed:04X}"
        self._reject(Rejection.CRC_MISMATCH, data, received_at, detail)
        return None

    def _cut(self, data: bytes, start: int, received_at: float) -> bytes:
        """The frame from ``start``; what came before it was a frame cut short (or junk)."""
        if not start:
            return data
        if _HEADER.match(data, 0, start):
            self._reject(Rejection.INTERRUPTED, data[:start], received_at, "new frame")
        else:
            self.counters.garbage_bytes += start
        return data[start:]

    def _overflow(self, base: int, end: int, received_at: float) -> int:
        """The frame at ``base`` outgrew the cap: drop starts until one fits; where to go on.

        Byte by byte this drops the start, and a later '/' within the cap begins the frame (or
        none does: all is dropped). With no end in the buffer (``end`` < 0) every '/' before its
        last ``max_frame_bytes`` bytes would be dropped the same way, so they go in one step:
        a flood of '/' costs one pass, not a step per byte.
        """
        buf = self._buf
        cap = self.max_frame_bytes
        if end < 0:
            restart = buf.find(b"/", len(buf) - cap)
            stop = restart if restart > 0 else len(buf)
        else:
            restart = buf.find(b"/", base + 1, base + cap + 1)
            stop = restart if restart > 0 else base + cap + 1
        dropped_in_frames = 0
        for header in _HEADER.finditer(buf, base, stop):
            start = header.start()
            following = buf.find(b"/", start + 1, start + cap + 1)
            span = following if following > 0 else start + cap + 1
            if _HEADER.match(buf, start, span):  # its line ended within the cap
                self._reject(Rejection.OVERSIZE, buf[start:span], received_at, f"over {cap} B")
                dropped_in_frames += span - start
        self.counters.garbage_bytes += stop - base - dropped_in_frames
        if restart < 0:
            self._in_frame = False
        return stop

    def _drop(
        self, base: int, stop: int, reason: Rejection, received_at: float, detail: str
    ) -> None:
        """Count ``buf[base:stop]``: a rejected frame if it begins with a header, else junk."""
        buf = self._buf
        if _HEADER.match(buf, base, stop):
            self._reject(reason, buf[base:stop], received_at, detail)
        else:
            self.counters.garbage_bytes += stop - base

    def _reject(
        self, reason: Rejection, data: bytes | bytearray, received_at: float, detail: str
    ) -> None:
        self.counters.rejected[reason] += 1
        kept = bytes(data[: self.max_frame_bytes])
        self.last_rejected = RejectedFrame(reason, kept, received_at, detail)
