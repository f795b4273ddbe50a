"""Encrypted P1 (Luxembourg Smarty and kin): framing of 0xDB frames and AES-128-GCM decryption.

Such meters wrap every P1 telegram in a DLMS general-glo-ciphering frame::

    DB | 08 | system title (8) | 82 | length (2, big-endian) | SC 0x30 | frame counter (4)
       | ciphertext | GCM tag (12)

where ``length`` counts everything after itself. IV = system title + frame counter, AAD = SC +
the 16-byte authentication key. The frame is binary, so it is found by its header and cut by its
length field, never by a pattern over the payload. The tag is always verified: a frame that fails
it (wrong key, corruption, a header that was really noise) yields nothing, and its bytes are
scanned again so a bogus length can never swallow the real frames behind it. The plaintext is an
ordinary telegram for :class:`~dsmr_logger.sources.p1.framing.FrameAssembler` and its CRC check.

Like the plain assembler this does no I/O and reads no clock.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

DEFAULT_MAX_FRAME_BYTES = 16 * 1024
DEFAULT_AUTH_KEY = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
"""The authentication key the Smarty specification fixes for every meter."""

KEY_BYTES = 16
TAG_BYTES = 12
START = 0xDB  # DLMS general-glo-ciphering
TITLE_LENGTH = 0x08
LONG_LENGTH = 0x82  # the length follows in two bytes
SHORT_LENGTH = 0x81  # one length byte: not used by P1, seen on the Austrian wired M-Bus
SC_AUTH_ENC = 0x30  # security control: authenticated and encrypted, security suite 0
PREFIX_BYTES = 13  # DB, 08, title, 82, length: the bytes the length field does not count
MIN_LENGTH = 1 + 4 + 1 + TAG_BYTES  # SC, frame counter, at least one byte of ciphertext, tag

# A telegram that ends at its CRC without the final CRLF (as some test tools encrypt it).
_UNTERMINATED = re.compile(rb"\n![0-9A-Fa-f]{0,4}\r?\Z")

# Security controls of real DLMS frames we refuse, and why (anything else is not a header).
_UNSUPPORTED = {
    0x10: "authentication only (plaintext with a tag), not used by P1",
    0x11: "authentication only (plaintext with a tag), not used by P1",
    0x20: "encryption without an authentication tag, as DLMS over wired M-Bus sends it "
    "(e.g. the Austrian customer interface); not P1, and it cannot be verified",
    0x21: "encryption without an authentication tag, as DLMS over wired M-Bus sends it "
    "(e.g. the Austrian customer interface); not P1, and it cannot be verified",
    0x31: "security suite 1; P1 meters use suite 0 (0x30)",
}


class DecryptionError(Exception):
    """A frame failed the GCM tag check; its plaintext is untrustworthy and was discarded."""


def parse_key(text: object, name: str) -> bytes:
    """A 16-byte key from its config form (32 hex digits); errors name the setting, not the value.

    Keys are secrets: a message echoing a mistyped key would leak most of it into logs.
    """
    if not isinstance(text, str):
        raise ValueError(f"{name}: must be a string of 32 hex digits")
    digits = text.strip()
    if len(digits) != 2 * KEY_BYTES:
        raise ValueError(f"{name}: must be 32 hex digits, got {len(digits)} characters")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise ValueError(f"{name}: must be 32 hex digits (0-9, A-F)") from None


@dataclass(frozen=True, slots=True)
class EncryptedFrame:
    """One complete 0xDB frame exactly as received; the fields are views of ``raw``."""

    raw: bytes
    received_at: float
    """Wall-clock time (Unix seconds) at which its last byte arrived."""

    def __post_init__(self) -> None:
        raw = self.raw
        if not (
            len(raw) >= PREFIX_BYTES + MIN_LENGTH
            and raw[0] == START
            and raw[1] == TITLE_LENGTH
            and raw[10] == LONG_LENGTH
            and raw[13] == SC_AUTH_ENC
            and PREFIX_BYTES + int.from_bytes(raw[11:13], "big") == len(raw)
        ):
            raise ValueError("not one complete 0xDB frame with security control 0x30")

    @property
    def system_title(self) -> bytes:
        return self.raw[2:10]

    @property
    def security_control(self) -> int:
        return self.raw[13]

    @property
    def frame_counter(self) -> int:
        return int.from_bytes(self.raw[14:18], "big")

    @property
    def iv(self) -> bytes:
        return self.raw[2:10] + self.raw[14:18]

    @property
    def ciphertext(self) -> bytes:
        return self.raw[18:-TAG_BYTES]

    @property
    def tag(self) -> bytes:
        return self.raw[-TAG_BYTES:]

    def describe(self) -> str:
        """System title and frame counter, to tell meters and frames apart in messages."""
        title = self.system_title
        shown = title.decode("ascii") if title.isascii() and title.decode().isprintable() else ""
        label = f"{title.hex().upper()} {shown!r}" if shown else title.hex().upper()
        return f"system title {label}, frame counter {self.frame_counter:#010x}"


def _require_key(key: bytes, name: str) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"{name} must be {KEY_BYTES} bytes (AES-128), got {len(key)}")


def decrypt(frame: EncryptedFrame, key: bytes, auth_key: bytes | None = DEFAULT_AUTH_KEY) -> bytes:
    """The plaintext telegram of ``frame``, returned only once its 12-byte GCM tag verified.

    ``auth_key=None`` authenticates no AAD at all, which some test tools and meters use.
    Raises :class:`DecryptionError` (never mentioning a key) when the tag does not match.
    """
    _require_key(key, "decryption key")
    mode = modes.GCM(frame.iv, frame.tag, min_tag_length=TAG_BYTES)
    decryptor = Cipher(algorithms.AES(key), mode).decryptor()
    if auth_key is not None:
        _require_key(auth_key, "authentication key")
        decryptor.authenticate_additional_data(bytes([frame.security_control]) + auth_key)
    unverified = decryptor.update(frame.ciphertext)
    try:
        return unverified + decryptor.finalize()
    except InvalidTag:
        raise DecryptionError(
            f"GCM tag check failed ({frame.describe()}): wrong meter.decryption_key or "
            "meter.authentication_key, or the frame was corrupted; frame discarded"
        ) from None


class EncryptedRejection(enum.StrEnum):
    """Why a frame header that was found did not lead to a frame."""

    OVERSIZE = "oversize"
    TOO_SHORT = "too_short"
    UNSUPPORTED_SECURITY = "unsupported_security"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class RejectedHeader:
    """The last header dropped, kept for diagnosis (the header bytes only)."""

    reason: EncryptedRejection
    data: bytes
    received_at: float
    detail: str


@dataclass(slots=True)
class EncryptedFramingCounters:
    """Running totals since start, like :class:`~dsmr_logger.sources.p1.framing.FramingCounters`."""

    bytes_in: int = 0
    frames: int = 0
    """Frames cut by their length field, including any that then failed authentication."""
    garbage_bytes: int = 0
    rejected: dict[EncryptedRejection, int] = field(
        default_factory=lambda: dict.fromkeys(EncryptedRejection, 0)
    )

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class _Scan(enum.Enum):
    WAIT = "wait"
    NOT_HEADER = "not_header"


def _read_header(buf: bytearray, cap: int) -> int | _Scan | tuple[EncryptedRejection, str, int]:
    """Judge the header at ``buf[0] == 0xDB``: its length field, WAIT, NOT_HEADER or a rejection.

    A rejection carries the reason, a detail and the header size, for the diagnostic copy.
    """
    size = len(buf)
    if size > 1 and buf[1] != TITLE_LENGTH:
        return _Scan.NOT_HEADER
    if size <= 10:
        return _Scan.WAIT
    form = buf[10]
    if form == LONG_LENGTH:
        sc_at = 13
    elif form == SHORT_LENGTH:
        sc_at = 12
    else:
        return _Scan.NOT_HEADER
    if size <= sc_at:
        return _Scan.WAIT
    sc = buf[sc_at]
    if sc != SC_AUTH_ENC or form != LONG_LENGTH:
        why = _UNSUPPORTED.get(sc)
        if why is None:
            return _Scan.NOT_HEADER
        return EncryptedRejection.UNSUPPORTED_SECURITY, f"security control {sc:#04x}: {why}", sc_at
    length = int.from_bytes(buf[11:13], "big")
    if length > cap:
        return EncryptedRejection.OVERSIZE, f"length field {length} B over {cap} B", sc_at
    if length < MIN_LENGTH:
        return EncryptedRejection.TOO_SHORT, f"length field {length} B below {MIN_LENGTH}", sc_at
    return length


class EncryptedFrameAssembler:
    """Feed it chunks as they arrive; it returns the complete 0xDB frames they finish.

    Resynchronises on the next 0xDB whose header is plausible (08, 82, SC 0x30) and holds at
    most one frame of up to ``max_frame_bytes`` (its length field) plus the 13-byte prefix.
    """

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.counters = EncryptedFramingCounters()
        self.last_rejected: RejectedHeader | None = None
        self._buf = bytearray()
        self._last: EncryptedFrame | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, chunk: bytes, received_at: float) -> list[EncryptedFrame]:
        self.push(chunk)
        frames: list[EncryptedFrame] = []
        while (frame := self.next_frame(received_at)) is not None:
            frames.append(frame)
        return frames

    def push(self, chunk: bytes) -> None:
        """Append a chunk without extracting frames (see :meth:`next_frame`)."""
        self.counters.bytes_in += len(chunk)
        self._buf += chunk

    def next_frame(self, received_at: float) -> EncryptedFrame | None:
        """Cut the next complete frame from the buffer, or None until more bytes arrive."""
        buf = self._buf
        counters = self.counters
        self._last = None
        while True:
            start = buf.find(START)
            if start < 0:
                counters.garbage_bytes += len(buf)
                buf.clear()
                return None
            if start:
                counters.garbage_bytes += start
                del buf[:start]
            verdict = _read_header(buf, self.max_frame_bytes)
            if verdict is _Scan.WAIT:
                return None
            if isinstance(verdict, int):
                total = PREFIX_BYTES + verdict
                if len(buf) < total:
                    return None
                frame = EncryptedFrame(bytes(buf[:total]), received_at)
                del buf[:total]
                counters.frames += 1
                self._last = frame
                return frame
            if isinstance(verdict, tuple):
                reason, detail, sc_at = verdict
                self._reject(reason, buf[: sc_at + 1], received_at, detail)
            counters.garbage_bytes += 1  # this 0xDB led nowhere: look for the next one
            del buf[:1]

    def rescan(self, frame: EncryptedFrame) -> None:
        """Give back the frame just returned, minus its 0xDB, after it failed authentication.

        A header found in noise, or a corrupted length field, can claim bytes that belong to the
        real frames behind it; scanning them again means only the bad frame is lost.
        """
        if frame is not self._last:
            raise RuntimeError("rescan() takes only the frame next_frame() just returned")
        self._buf[0:0] = frame.raw[1:]
        self.counters.garbage_bytes += 1
        self._last = None

    def reset(self, received_at: float) -> None:
        """Forget a partial frame (the link was reopened: its rest will never come)."""
        buf = self._buf
        if buf[:1] == bytes([START]) and isinstance(_read_header(buf, self.max_frame_bytes), int):
            self._reject(EncryptedRejection.INTERRUPTED, buf[:18], received_at, "link reopened")
        else:
            self.counters.garbage_bytes += len(buf)
        buf.clear()
        self._last = None

    def _reject(
        self, reason: EncryptedRejection, header: bytearray, received_at: float, detail: str
    ) -> None:
        self.counters.rejected[reason] += 1
        self.last_rejected = RejectedHeader(reason, bytes(header), received_at, detail)


def terminate(plaintext: bytes) -> bytes:
    """``plaintext`` with the CRLF after its CRC restored if the sender left it out.

    The plain assembler waits for that CRLF, so without it the telegram would sit until the next
    one arrived and then be rejected as malformed. The CRC does not cover it.
    """
    if _UNTERMINATED.search(plaintext, max(0, len(plaintext) - 8)) is None:
        return plaintext
    return plaintext.removesuffix(b"\r") + b"\r\n"


@dataclass(slots=True)
class DecryptionCounters:
    decrypted: int = 0
    auth_failed: int = 0
    crlf_added: int = 0


class Decryptor:
    """Bytes from an encrypted P1 port in, verified plaintext telegrams out.

    Output goes to the ordinary FrameAssembler, which checks each telegram's own CRC; the only
    change to a plaintext is a missing final CRLF restored (see :func:`terminate`).
    """

    def __init__(
        self,
        key: bytes,
        auth_key: bytes | None = DEFAULT_AUTH_KEY,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        _require_key(key, "decryption key")
        if auth_key is not None:
            _require_key(auth_key, "authentication key")
        self._key = key
        self._auth_key = auth_key
        self.assembler = EncryptedFrameAssembler(max_frame_bytes=max_frame_bytes)
        self.counters = DecryptionCounters()
        self.last_error: DecryptionError | None = None

    def __repr__(self) -> str:  # never show the keys
        return f"<Decryptor decrypted={self.counters.decrypted} failed={self.counters.auth_failed}>"

    def feed(self, chunk: bytes, received_at: float) -> list[bytes]:
        assembler = self.assembler
        assembler.push(chunk)
        plaintexts: list[bytes] = []
        while (frame := assembler.next_frame(received_at)) is not None:
            try:
                plaintext = decrypt(frame, self._key, self._auth_key)
            except DecryptionError as error:
                self.counters.auth_failed += 1
                self.last_error = error
                assembler.rescan(frame)
                continue
            self.counters.decrypted += 1
            telegram = terminate(plaintext)
            if telegram is not plaintext:
                self.counters.crlf_added += 1
            plaintexts.append(telegram)
        return plaintexts

    def reset(self, received_at: float) -> None:
        """Forget a partial frame (the link was reopened)."""
        self.assembler.reset(received_at)
