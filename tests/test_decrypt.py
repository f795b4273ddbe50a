"""Encrypted P1: which plaintexts leave an encrypted byte stream, whatever the read boundaries are.

What must hold: every published frame decrypts to its published plaintext byte for byte, nothing
that fails the GCM tag ever comes out (wrong key, flipped bit, noise), the framer finds frames by
their length field wherever they sit in the stream, its buffer stays bounded, and read boundaries
never change the result.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import pytest
from conftest import CORPUS, corpus_entries, require_corpus
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmr_logger.sources.p1.crc import crc16, format_crc
from dsmr_logger.sources.p1.decrypt import (
    DEFAULT_AUTH_KEY,
    DEFAULT_MAX_FRAME_BYTES,
    PREFIX_BYTES,
    DecryptionError,
    Decryptor,
    EncryptedFrame,
    EncryptedFrameAssembler,
    EncryptedRejection,
    decrypt,
    parse_key,
    terminate,
)
from dsmr_logger.sources.p1.framing import FrameAssembler, Rejection

KEY = bytes(range(16))
OTHER_KEY = bytes(range(1, 17))
TITLE = b"TESTMETR"


# --- helpers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vector:
    """One published encrypted frame with the parameters and plaintext published alongside."""

    name: str
    raw: bytes
    key: bytes
    auth_key: bytes | None
    plaintext: bytes
    meta: dict[str, Any]

    @property
    def is_p1(self) -> bool:
        return self.meta["security_control"] == "30"

    @property
    def telegram(self) -> bytes:
        """What the Decryptor hands on: the plaintext, its final CRLF restored if missing."""
        return self.plaintext if self.plaintext.endswith(b"\r\n") else self.plaintext + b"\r\n"


def _auth_key(aad: str) -> bytes | None:
    """The authentication key inside the published AAD (SC byte + key), None for no AAD."""
    if aad.startswith("("):
        return None
    data = bytes.fromhex(aad)
    assert data[0] == 0x30, "the AAD starts with the security control byte"
    return data[1:]


@functools.cache
def load(file: str) -> Vector:
    meta = json.loads((CORPUS / file.replace(".frame.hex", ".json")).read_text())
    plain = (CORPUS / meta["plaintext_file"]).read_bytes()
    if meta["plaintext_file"].endswith(".hex"):
        plain = bytes.fromhex(plain.decode())
    return Vector(
        name=file,
        raw=bytes.fromhex((CORPUS / file).read_text()),
        key=bytes.fromhex(meta["key"]),
        auth_key=_auth_key(meta["aad"]) if meta["security_control"] == "30" else None,
        plaintext=plain,
        meta=meta,
    )


def vector_params(*, p1: bool) -> list[Any]:
    files = [entry["file"] for entry in corpus_entries("encrypted")]
    return [pytest.param(file, id=file) for file in files if load(file).is_p1 == p1]


P1_VECTORS = vector_params(p1=True)
MBUS_VECTORS = vector_params(p1=False)


def make_telegram(n: int = 0) -> bytes:
    """A small synthetic telegram with a correct CRC, different for each ``n``."""
    head = b"/XMX5TEST\r\n\r\n1-0:1.8.1(%06d.000*kWh)\r\n!" % n
    return head + format_crc(crc16(head)) + b"\r\n"


def encrypt(
    plaintext: bytes,
    key: bytes = KEY,
    *,
    title: bytes = TITLE,
    counter: int = 1,
    auth_key: bytes | None = DEFAULT_AUTH_KEY,
) -> bytes:
    """A Smarty frame built independently of the module under test (test side of the spec)."""
    iv = title + counter.to_bytes(4, "big")
    encryptor = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    if auth_key is not None:
        encryptor.authenticate_additional_data(b"\x30" + auth_key)
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    body = b"\x30" + counter.to_bytes(4, "big") + ciphertext + encryptor.tag[:12]
    return b"\xdb\x08" + title + b"\x82" + len(body).to_bytes(2, "big") + body


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ (1 << bit)]) + data[index + 1 :]


def chunked(data: bytes, seed: str) -> list[bytes]:
    rng = random.Random(seed)
    chunks, i = [], 0
    while i < len(data):
        size = rng.choice((rng.randint(1, 8), rng.randint(1, 300), rng.randint(1, 3000)))
        chunks.append(data[i : i + size])
        i += size
    return chunks


def run(
    chunks: Iterable[bytes], key: bytes = KEY, auth_key: bytes | None = DEFAULT_AUTH_KEY, **kw: Any
) -> tuple[list[bytes], Decryptor]:
    decryptor = Decryptor(key, auth_key, **kw)
    out: list[bytes] = []
    for t, chunk in enumerate(chunks):
        out += decryptor.feed(chunk, float(t))
    return out, decryptor


def rejected(assembler: EncryptedFrameAssembler) -> dict[EncryptedRejection, int]:
    return {reason: n for reason, n in assembler.counters.rejected.items() if n}


def assert_accounted(decryptor: Decryptor, decrypted_frames: Sequence[bytes]) -> None:
    """Every byte read is in a decrypted frame, counted as garbage, or still buffered."""
    c = decryptor.assembler.counters
    framed = sum(map(len, decrypted_frames))
    assert c.bytes_in == framed + c.garbage_bytes + decryptor.assembler.buffered


# --- the published vectors -----------------------------------------------------------------------


def test_corpus_has_encrypted_vectors() -> None:
    require_corpus()
    assert len(P1_VECTORS) >= 3
    assert len(MBUS_VECTORS) >= 2


@pytest.mark.parametrize("file", P1_VECTORS)
def test_published_frame_decrypts_to_published_plaintext(file: str) -> None:
    v = load(file)
    frame = EncryptedFrame(v.raw, 0.0)
    assert frame.system_title.hex().upper() == v.meta["system_title"]
    assert frame.frame_counter == int(v.meta["frame_counter"], 16)
    assert frame.iv.hex().upper() == v.meta["iv"]
    assert decrypt(frame, v.key, v.auth_key) == v.plaintext
    out, decryptor = run([v.raw], v.key, v.auth_key)
    assert out == [v.telegram]
    assert decryptor.counters.decrypted == 1
    assert decryptor.counters.auth_failed == 0
    assert decryptor.counters.crlf_added == (v.telegram != v.plaintext)
    assert_accounted(decryptor, [v.raw])


@pytest.mark.parametrize("file", P1_VECTORS)
def test_test_encryptor_reproduces_published_frame(file: str) -> None:
    """The synthetic frames below are built the way the published ones were."""
    v = load(file)
    title, counter = bytes.fromhex(v.meta["system_title"]), int(v.meta["frame_counter"], 16)
    rebuilt = encrypt(v.plaintext, v.key, title=title, counter=counter, auth_key=v.auth_key)
    assert rebuilt == v.raw


def test_smarty_default_authentication_key() -> None:
    require_corpus()
    v = load("encrypted/esphome-libs-encrypted-packet-sagemcom-t210.frame.hex")
    assert v.auth_key == DEFAULT_AUTH_KEY
    assert run([v.raw], v.key)[0] == [v.telegram]


@pytest.mark.parametrize("file", P1_VECTORS)
def test_plaintext_goes_through_frame_assembler(file: str) -> None:
    """Decrypted telegrams get the ordinary CRC check: valid ones pass, the spec's bad CRC not."""
    v = load(file)
    plaintexts, _ = run([v.raw[:7], v.raw[7:]], v.key, v.auth_key)
    assembler = FrameAssembler()
    frames = [f for p in plaintexts for f in assembler.feed(p, 1.0)]
    if v.meta["plaintext_crc_valid"]:
        assert [f.raw for f in frames] == [v.telegram]
        assert frames[0].crc == int(v.meta["plaintext_crc_given"], 16)
    else:
        assert frames == []
        assert assembler.counters.rejected[Rejection.CRC_MISMATCH] == 1


@pytest.mark.parametrize("file", P1_VECTORS)
def test_split_at_every_byte_boundary(file: str) -> None:
    v = load(file)
    for cut in range(1, len(v.raw)):
        out, decryptor = run([v.raw[:cut], v.raw[cut:]], v.key, v.auth_key)
        assert out == [v.telegram], cut
        assert decryptor.assembler.buffered == 0
    assert run([bytes([b]) for b in v.raw], v.key, v.auth_key)[0] == [v.telegram]


# Offsets into a frame: ciphertext first/middle/last byte, tag first/last byte, frame counter and
# system title (both feed the IV) and the security control byte (part of the AAD).
TAMPER = {
    "ciphertext-first": 18,
    "ciphertext-middle": 200,
    "ciphertext-last": -13,
    "tag-first": -12,
    "tag-last": -1,
    "frame-counter": 17,
    "system-title": 5,
}


@pytest.mark.parametrize("where", TAMPER)
@pytest.mark.parametrize("file", P1_VECTORS)
def test_flipped_bit_fails_tag_check(file: str, where: str) -> None:
    v = load(file)
    bad = flip(v.raw, TAMPER[where] % len(v.raw), bit=3)
    with pytest.raises(DecryptionError, match="tag check failed"):
        decrypt(EncryptedFrame(bad, 0.0), v.key, v.auth_key)
    out, decryptor = run([bad], v.key, v.auth_key)
    assert out == []
    assert (decryptor.counters.decrypted, decryptor.counters.auth_failed) == (0, 1)
    assert decryptor.assembler.counters.frames == 1
    assert_accounted(decryptor, [])


@pytest.mark.parametrize("file", P1_VECTORS)
def test_wrong_key_fails_tag_check_without_revealing_it(file: str) -> None:
    v = load(file)
    wrong = flip(v.key, 0)
    out, decryptor = run([v.raw, v.raw], wrong, v.auth_key)
    assert out == []
    assert decryptor.counters.auth_failed == 2
    error = decryptor.last_error
    assert error is not None
    message = str(error)
    assert "meter.decryption_key" in message
    assert v.meta["system_title"] in message
    for secret in (wrong, v.key):
        assert secret.hex() not in message.lower()
    assert wrong.hex() not in repr(decryptor).lower()


@pytest.mark.parametrize("file", P1_VECTORS)
def test_wrong_authentication_key_fails_tag_check(file: str) -> None:
    v = load(file)
    others = [None, DEFAULT_AUTH_KEY, bytes(16)]
    for auth_key in (k for k in others if k != v.auth_key):
        with pytest.raises(DecryptionError):
            decrypt(EncryptedFrame(v.raw, 0.0), v.key, auth_key)


@pytest.mark.parametrize("file", MBUS_VECTORS)
def test_wired_mbus_dlms_is_rejected_with_reason(file: str) -> None:
    """Austrian wired M-Bus: DLMS split over M-Bus frames, no tag, not P1: refused, said why."""
    v = load(file)
    for chunks in ([v.raw], [bytes([b]) for b in v.raw]):
        out, decryptor = run(chunks, v.key, None)
        assert out == []
        assembler = decryptor.assembler
        assert rejected(assembler) == {EncryptedRejection.UNSUPPORTED_SECURITY: 1}
        assert assembler.last_rejected is not None
        detail = assembler.last_rejected.detail
        assert f"security control 0x{v.meta['security_control'].lower()}" in detail
        assert "M-Bus" in detail
        assert "not P1" in detail
        assert assembler.counters.frames == 0
        assert assembler.counters.garbage_bytes == len(v.raw)


# --- synthetic streams ---------------------------------------------------------------------------


def frames_and_plaintexts(n: int) -> tuple[list[bytes], list[bytes]]:
    plain = [make_telegram(i) for i in range(n)]
    return [encrypt(p, counter=i + 1) for i, p in enumerate(plain)], plain


@pytest.mark.parametrize("seed", range(5))
def test_back_to_back_frames(seed: int) -> None:
    frames, plain = frames_and_plaintexts(6)
    data = b"".join(frames)
    out, decryptor = run(chunked(data, f"b2b{seed}"))
    assert out == plain
    assert decryptor.assembler.counters.garbage_bytes == 0
    assert decryptor.assembler.buffered == 0


# Garbage that looks like the start of a frame, or is a real but unsupported or impossible header.
DECOYS = (
    b"\xdb",
    b"\xdb\xdb\x08",
    b"\xdb\x08" + TITLE,
    b"\xdb\x08" + TITLE + b"\x82\x00",
    b"\xdb\x08" + TITLE + b"\x82\x01\x00",  # SC missing: the next byte decides (0xDB: not SC)
    b"\xdb\x08" + TITLE + b"\x82\x01\x00\x31",  # suite 1
    b"\xdb\x08" + TITLE + b"\x81\xf8\x20",  # Austrian M-Bus style
    b"\xdb\x08" + TITLE + b"\x82\xff\xff\x30",  # oversize
    b"\xdb\x08" + TITLE + b"\x82\x00\x05\x30",  # too short
    b"\xdb\x09" + TITLE,
    b"noise\r\n/ISK5\\2M550T-1012\r\n",
)


@pytest.mark.parametrize("seed", range(8))
def test_frames_embedded_in_garbage(seed: int) -> None:
    rng = random.Random(seed)
    frames, plain = frames_and_plaintexts(5)
    parts: list[bytes] = []
    garbage = 0
    for frame in frames:
        junk = b"".join(rng.choice(DECOYS) for _ in range(rng.randint(0, 6)))
        parts += [junk, frame]
        garbage += len(junk)
    tail = rng.choice(DECOYS[2:4])  # an unfinished header stays buffered
    data = b"".join([*parts, tail])

    out, decryptor = run(chunked(data, f"garbage{seed}"))

    assert out == plain
    assert decryptor.counters.auth_failed == 0
    assert decryptor.assembler.counters.garbage_bytes == garbage
    assert decryptor.assembler.buffered == len(tail)
    assert_accounted(decryptor, [encrypt(p) for p in out])


def test_oversize_length_is_rejected_and_resyncs() -> None:
    frame, plain = encrypt(make_telegram()), make_telegram()
    bogus = b"\xdb\x08" + TITLE + b"\x82\x40\x01\x30"  # 16385 > 16 KiB
    out, decryptor = run([bogus + frame])
    assert out == [plain]
    assembler = decryptor.assembler
    assert rejected(assembler) == {EncryptedRejection.OVERSIZE: 1}
    assert assembler.last_rejected is not None
    assert assembler.last_rejected.data == bogus
    assert assembler.counters.garbage_bytes == len(bogus)


def test_cap_bounds_the_buffer() -> None:
    """A real frame above a small cap is refused at its header, not buffered."""
    frame = encrypt(make_telegram() * 4)
    out, decryptor = run([bytes([b]) for b in frame], max_frame_bytes=100)
    assert out == []
    assert rejected(decryptor.assembler) == {EncryptedRejection.OVERSIZE: 1}
    assert decryptor.assembler.buffered < 14


def test_too_short_length_is_rejected() -> None:
    frame, plain = encrypt(make_telegram()), make_telegram()
    bogus = b"\xdb\x08" + TITLE + b"\x82\x00\x11\x30"  # 17: no room for any ciphertext
    out, decryptor = run([bogus, frame])
    assert out == [plain]
    assert rejected(decryptor.assembler) == {EncryptedRejection.TOO_SHORT: 1}


def test_header_in_noise_cannot_swallow_real_frames() -> None:
    """A plausible header in noise claims the real frames behind it; the failed tag frees them."""
    frames, plain = frames_and_plaintexts(3)
    bogus = b"\xdb\x08" + TITLE + b"\x82\x04\x00\x30"  # claims the next 1024 bytes
    filler = bytes(1024)
    data = bogus + b"".join(frames) + filler

    alone = EncryptedFrameAssembler().feed(data, 0.0)
    assert len(alone[0].raw) == PREFIX_BYTES + 1024  # the framer alone cannot know

    out, decryptor = run(chunked(data, "swallow"))
    assert out == plain
    assert (decryptor.counters.decrypted, decryptor.counters.auth_failed) == (3, 1)
    assert_accounted(decryptor, [encrypt(p) for p in out])


def test_failed_frame_between_good_ones() -> None:
    frames, plain = frames_and_plaintexts(3)
    frames[1] = flip(frames[1], 30)
    out, decryptor = run(chunked(b"".join(frames), "between"))
    assert out == [plain[0], plain[2]]
    assert (decryptor.counters.decrypted, decryptor.counters.auth_failed) == (2, 1)
    assert_accounted(decryptor, [encrypt(p) for p in out])


def test_missing_final_crlf_is_restored() -> None:
    """A sender that stops at the CRC still gets its telegram through the plain assembler."""
    full = make_telegram(7)
    frames = [encrypt(full[:-2], counter=1), encrypt(full[:-1], counter=2), encrypt(full)]
    out, decryptor = run([b"".join(frames)])
    assert out == [full, full, full]
    assert decryptor.counters.crlf_added == 2
    assembler = FrameAssembler()
    assert [f.raw for p in out for f in assembler.feed(p, 0.0)] == [full] * 3


@pytest.mark.parametrize(
    "text", [b"", b"!", b"abc", b"/X\r\n!12345", b"/X\r\n!12G4", b"/X\r\n1-0:1.8.1(1)\r\n"]
)
def test_terminate_leaves_other_endings_alone(text: bytes) -> None:
    assert terminate(text) == text


def test_no_aad_option() -> None:
    frame = encrypt(make_telegram(), auth_key=None)
    assert run([frame], auth_key=None)[0] == [make_telegram()]
    assert run([frame])[0] == []


def test_reset_drops_partial_frame() -> None:
    frame, plain = encrypt(make_telegram()), make_telegram()
    decryptor = Decryptor(KEY)
    assert decryptor.feed(frame[:40], 0.0) == []
    decryptor.reset(1.0)
    assert rejected(decryptor.assembler) == {EncryptedRejection.INTERRUPTED: 1}
    assert decryptor.assembler.buffered == 0
    assert decryptor.feed(frame[40:] + frame, 2.0) == [plain]


def test_rescan_takes_only_the_frame_just_returned() -> None:
    assembler = EncryptedFrameAssembler()
    first, second = frames_and_plaintexts(2)[0]
    first_frame, _ = assembler.feed(first + second, 0.0)
    with pytest.raises(RuntimeError):
        assembler.rescan(first_frame)


def test_frame_records_receive_time_and_exact_bytes() -> None:
    frame = encrypt(make_telegram())
    assembler = EncryptedFrameAssembler()
    assert assembler.feed(frame[:-1], 5.0) == []
    (got,) = assembler.feed(frame[-1:], 6.0)
    assert (got.raw, got.received_at) == (frame, 6.0)


def test_encrypted_frame_validates_its_bytes() -> None:
    frame = encrypt(make_telegram())
    for bad in (frame[:-1], flip(frame, 0), flip(frame, 13), frame[:30]):
        with pytest.raises(ValueError):
            EncryptedFrame(bad, 0.0)


def test_keys_must_be_16_bytes() -> None:
    frame = EncryptedFrame(encrypt(make_telegram()), 0.0)
    with pytest.raises(ValueError, match="16 bytes"):
        decrypt(frame, bytes(24))
    with pytest.raises(ValueError, match="authentication key"):
        Decryptor(KEY, bytes(8))


# --- configuration keys --------------------------------------------------------------------------


def test_parse_key_accepts_hex() -> None:
    assert parse_key("000102030405060708090A0B0C0D0E0F", "meter.decryption_key") == KEY
    assert parse_key(" 000102030405060708090a0b0c0d0e0f\n", "meter.decryption_key") == KEY


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0001020304050607",
        "000102030405060708090A0B0C0D0E0F00",
        "000102030405060708090A0B0C0D0EZZ",
        "secret-passphrase-of-32-chars!!!",
        12345,
        None,
    ],
)
def test_parse_key_error_names_setting_not_value(text: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_key(text, "meter.authentication_key")
    message = str(info.value)
    assert message.startswith("meter.authentication_key: must be")
    assert "32 hex digits" in message
    if isinstance(text, str) and text:
        assert text not in message
        assert "ZZ" not in message


# --- properties ----------------------------------------------------------------------------------


@settings(deadline=None)
@given(data=st.binary(max_size=4000), cuts=st.lists(st.integers(0, 4000), max_size=20))
def test_random_bytes_never_crash_nor_yield(data: bytes, cuts: list[int]) -> None:
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in pairwise(points)]
    out, decryptor = run(chunks)
    assert out == []
    assert decryptor.counters.decrypted == 0
    assert decryptor.assembler.buffered <= PREFIX_BYTES + DEFAULT_MAX_FRAME_BYTES
    assert_accounted(decryptor, [encrypt(p) for p in out])


@settings(deadline=None)
@given(data=st.binary(min_size=18, max_size=2000))
def test_random_bytes_after_a_header_never_yield(data: bytes) -> None:
    """Even bytes the framer accepts as a frame do not pass the tag check."""
    length = len(data).to_bytes(2, "big")
    stream = b"\xdb\x08" + TITLE + b"\x82" + length + b"\x30" + data[1:]
    out, decryptor = run([stream])
    assert out == []
    assert decryptor.counters.auth_failed >= 1


# Plausible headers whose length claims the frames behind them (freed by the failed tag check).
SWALLOWERS = (b"\xdb\x08" + TITLE + b"\x82\x00\x40\x30", b"\xdb\x08" + TITLE + b"\x82\x02\x00\x30")
_JUNK = st.one_of(st.binary(max_size=40), st.sampled_from(DECOYS + SWALLOWERS))
_GARBAGE = st.lists(_JUNK, max_size=4).map(b"".join)


@settings(deadline=None)
@given(
    layout=st.lists(st.tuples(_GARBAGE, st.integers(0, 9)), min_size=1, max_size=5),
    seed=st.integers(0, 2**32),
)
def test_frames_found_in_any_garbage_and_any_chunking(
    layout: list[tuple[bytes, int]], seed: int
) -> None:
    frames, plain = frames_and_plaintexts(10)
    parts = [part for junk, i in layout for part in (junk, frames[i])]
    # Trailing filler completes any header the garbage happened to form, so its frame fails
    # and what it claimed is scanned again.
    data = b"".join(parts) + bytes(PREFIX_BYTES + DEFAULT_MAX_FRAME_BYTES)
    out, decryptor = run(chunked(data, str(seed)))
    assert out == [plain[i] for _, i in layout]
    assert_accounted(decryptor, [encrypt(p) for p in out])
