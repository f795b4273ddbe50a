"""Frame assembly: which telegrams leave the P1 byte stream, whatever the read boundaries are.

A serial read may end anywhere, the port may open mid-telegram, gateways add junk and noise
corrupts bytes. What must hold: every CRC-valid telegram comes out byte for byte, nothing with a
wrong CRC ever comes out, the buffer stays bounded, and read boundaries never change the result.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import pytest
from conftest import MANIFEST, corpus_entries, require_corpus
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmr_logger.sources.p1.crc import crc16, format_crc
from dsmr_logger.sources.p1.framing import Frame, FrameAssembler, Rejection

DSMR5 = "ndokter-dsmr_parser/v5__isk52mt382-1000.txt"  # CRC 6EEE
DSMR22 = "ndokter-dsmr_parser/v2_2__isk52mt382-1004.txt"  # no CRC
LOWERCASE_CRC = "esphome-libs-dsmr_parser/packet_accumulator_example_test__kfm5kaifa-meter.txt"
UNPADDED_CRC = "ndokter-dsmr_parser/unpadded_crc__nwa-warmtelink.txt"
# A handful of valid real telegrams for the property tests: DSMR 5, DSMR 4.2, Belgian, no CRC,
# lower-case CRC and 3-digit CRC.
SAMPLE_FILES = (
    DSMR5,
    "ndokter-dsmr_parser/v4_2__kfm5kaifa-meter.txt",
    "dsmrreader-dsmr-reader/fluvius__flu5s456789_a.txt",
    DSMR22,
    LOWERCASE_CRC,
    UNPADDED_CRC,
)
CHUNKINGS = ("whole", "bytewise", "random")


# --- helpers -------------------------------------------------------------------------------------


@functools.cache
def corpus_bytes(name: str) -> bytes:
    return (require_corpus() / name).read_bytes()


def chunked(data: bytes, how: str, seed: str = "") -> list[bytes]:
    """The same bytes as one read, one byte per read, or seeded random read sizes."""
    if how == "whole":
        return [data]
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(f"{how}:{seed}")
    chunks, i = [], 0
    while i < len(data):
        size = rng.choice((rng.randint(1, 8), rng.randint(1, 700), rng.randint(1, 5000)))
        chunks.append(data[i : i + size])
        i += size
    return chunks


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in pairwise(points)]


def run(chunks: Sequence[bytes], **kwargs: Any) -> tuple[list[Frame], FrameAssembler]:
    """Feed the chunks in order; chunk number n is received at time n."""
    assembler = FrameAssembler(**kwargs)
    frames: list[Frame] = []
    for t, chunk in enumerate(chunks):
        frames += assembler.feed(chunk, float(t))
    return frames, assembler


def raws(frames: Iterable[Frame]) -> list[bytes]:
    return [frame.raw for frame in frames]


def rejected(assembler: FrameAssembler) -> dict[Rejection, int]:
    """Only the non-zero rejection counters, so comparisons name exactly what was rejected."""
    return {reason: n for reason, n in assembler.counters.rejected.items() if n}


def outcome(frames: list[Frame], assembler: FrameAssembler) -> tuple[Any, ...]:
    """Everything observable except receive times, to compare different read boundaries."""
    last = assembler.last_rejected
    return (
        [(f.raw, f.crc) for f in frames],
        assembler.counters.bytes_in,
        assembler.counters.frames,
        assembler.counters.garbage_bytes,
        rejected(assembler),
        None if last is None else (last.reason, last.data),
        assembler.buffered,
    )


def assert_verified(frame: Frame) -> None:
    """The frame is one telegram and its CRC really is CRC-16/ARC of '/' through '!'."""
    raw = frame.raw
    assert raw.startswith(b"/")
    assert raw.endswith(b"\r\n")
    bang = raw.rindex(b"!")
    assert raw.count(b"\n!") == 1
    assert raw.find(b"\n!") == bang - 1
    digits = raw[bang + 1 : -2]
    if frame.crc is None:
        assert digits == b""
    else:
        assert int(digits, 16) == frame.crc == crc16(raw[: bang + 1])


def crc_ok(raw: bytes) -> bool:
    bang = raw.rindex(b"!")
    digits = raw[bang + 1 : -2]
    return not digits or int(digits, 16) == crc16(raw[: bang + 1])


def make_telegram(lines: Iterable[bytes], *, header: bytes = b"/XMX5TEST") -> bytes:
    """A synthetic telegram with a correct CRC (for shapes the corpus does not have)."""
    head = header + b"\r\n\r\n" + b"".join(line + b"\r\n" for line in lines) + b"!"
    return head + format_crc(crc16(head)) + b"\r\n"


def entry_params(*kinds: str) -> list[Any]:
    return [pytest.param(entry, id=entry["file"]) for entry in corpus_entries(*kinds)]


# --- the corpus ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", CHUNKINGS)
@pytest.mark.parametrize("entry", entry_params("telegram"))
def test_single_telegram_file(entry: dict[str, Any], how: str) -> None:
    """A valid (or CRC-less) telegram comes out unchanged; a bad CRC never comes out."""
    data = corpus_bytes(entry["file"])
    frames, assembler = run(chunked(data, how, entry["file"]))

    if entry["has_crc"] and not entry["crc_valid"]:
        assert frames == []
        assert rejected(assembler) == {Rejection.CRC_MISMATCH: 1}
        assert assembler.last_rejected is not None
        assert assembler.last_rejected.reason is Rejection.CRC_MISMATCH
        assert assembler.last_rejected.data == data
    else:
        assert raws(frames) == [data]
        assert frames[0].crc == (int(entry["crc_given"], 16) if entry["has_crc"] else None)
        assert_verified(frames[0])
        assert rejected(assembler) == {}
        assert assembler.last_rejected is None
    assert assembler.counters.frames == len(frames)
    assert assembler.counters.garbage_bytes == 0
    assert assembler.counters.bytes_in == len(data)
    assert assembler.buffered == 0


# Independent reading of a capture: a frame is a line-start '/' through the first "!xxxx\r\n".
_CAPTURE_FRAME = re.compile(rb"^/.*?\r\n![0-9A-Fa-f]{0,4}\r\n", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("how", CHUNKINGS)
@pytest.mark.parametrize("entry", entry_params("capture"))
def test_capture(entry: dict[str, Any], how: str) -> None:
    """A serial capture yields exactly its CRC-valid frames; the rest is counted, not passed on."""
    data = corpus_bytes(entry["file"])
    found = list(_CAPTURE_FRAME.finditer(data))
    valid = [m.group() for m in found if crc_ok(m.group())]
    # The oracle agrees with the manifest, so the expectations below are the corpus's own.
    assert len(found) == entry["frames"]
    assert len(valid) == entry["frames_crc_valid"]
    assert len(found) - len(valid) == len(entry["frames_crc_invalid"])
    assert found[0].start() == entry["leading_partial_bytes"]
    tail = data[found[-1].end() :]
    slash = tail.find(b"/")
    gaps = sum(b.start() - a.end() for a, b in pairwise(found))
    expected_garbage = found[0].start() + gaps + (len(tail) if slash < 0 else slash)

    frames, assembler = run(chunked(data, how, entry["file"]))

    assert raws(frames) == valid
    for frame in frames:
        assert_verified(frame)
    invalid = len(entry["frames_crc_invalid"])
    assert rejected(assembler) == ({Rejection.CRC_MISMATCH: invalid} if invalid else {})
    assert assembler.counters.frames == entry["frames_crc_valid"]
    assert assembler.counters.garbage_bytes == expected_garbage
    assert assembler.buffered == (0 if slash < 0 else len(tail) - slash)  # a started next frame


@pytest.mark.parametrize("how", CHUNKINGS)
@pytest.mark.parametrize(
    "entry", [p for p in entry_params("capture") if p.values[0]["leading_partial_bytes"]]
)
def test_capture_leading_partial_is_garbage(entry: dict[str, Any], how: str) -> None:
    """Opening the port mid-telegram: the tail seen first is garbage, never a frame or a reject."""
    data = corpus_bytes(entry["file"])
    lead = entry["leading_partial_bytes"]
    frames, assembler = run(chunked(data[:lead], how, entry["file"]))
    assert frames == []
    assert assembler.counters.garbage_bytes == lead
    assert rejected(assembler) == {}
    assert assembler.buffered == 0
    first = _CAPTURE_FRAME.search(data, lead)
    assert first is not None
    assert raws(assembler.feed(data[lead : first.end()], 99.0)) == [first.group()]


def _bare_telegram_for(entry: dict[str, Any]) -> str:
    """The .txt file holding the same telegram as a gateway stream (same upstream fixture)."""
    matches = [
        other["file"]
        for other in MANIFEST
        if other["kind"] == "telegram" and other.get("fixture_name") == entry["fixture_name"]
    ]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.mark.parametrize("how", CHUNKINGS)
@pytest.mark.parametrize("entry", entry_params("stream"))
def test_gateway_stream(entry: dict[str, Any], how: str) -> None:
    """Gateway junk after '!' (0xFF runs, serial number) is dropped; the bare telegram comes out."""
    data = corpus_bytes(entry["file"])
    telegram = corpus_bytes(_bare_telegram_for(entry))
    assert data.startswith(telegram) and len(data) > len(telegram)
    frames, assembler = run(chunked(data, how, entry["file"]))
    assert raws(frames) == [telegram]
    assert rejected(assembler) == {}
    assert assembler.counters.garbage_bytes == len(data) - len(telegram)
    assert assembler.buffered == 0


# --- Frame.telegram ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sent", "canonical"),
    [(LOWERCASE_CRC, b"60e5", b"60E5"), (UNPADDED_CRC, b"B9F", b"0B9F")],
    ids=["lowercase", "three-digits"],
)
def test_noncanonical_crc_accepted_and_canonicalised(
    name: str, sent: bytes, canonical: bytes
) -> None:
    """Valid but odd CRCs are accepted; DSMR-reader gets four upper-case digits, same value."""
    data = corpus_bytes(name)
    assert data.endswith(b"!" + sent + b"\r\n")
    (frame,) = FrameAssembler().feed(data, 0.0)
    assert frame.raw == data
    assert frame.crc == int(sent, 16)
    body = data[: -len(sent) - 2]
    assert frame.telegram == body + canonical + b"\r\n"
    assert crc16(body) == int(canonical, 16)


@pytest.mark.parametrize("name", [DSMR5, DSMR22], ids=["canonical-crc", "no-crc"])
def test_telegram_unchanged_when_nothing_to_fix(name: str) -> None:
    """An upper-case 4-digit CRC, or no CRC at all, is delivered exactly as received."""
    data = corpus_bytes(name)
    (frame,) = FrameAssembler().feed(data, 0.0)
    assert frame.telegram == frame.raw == data


def test_require_crc_rejects_telegrams_without_crc() -> None:
    """With require_crc a DSMR 2.2 telegram is rejected as no_crc; a DSMR 5 one still passes."""
    old, new = corpus_bytes(DSMR22), corpus_bytes(DSMR5)
    assembler = FrameAssembler(require_crc=True)
    assert assembler.feed(old, 1.0) == []
    assert rejected(assembler) == {Rejection.NO_CRC: 1}
    assert assembler.last_rejected is not None
    assert assembler.last_rejected.reason is Rejection.NO_CRC
    assert assembler.last_rejected.data == old
    assert raws(assembler.feed(new, 2.0)) == [new]


# --- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", CHUNKINGS)
def test_garbage_between_frames_is_dropped_and_counted(how: str) -> None:
    """Noise before, between and after telegrams is discarded without losing a telegram."""
    t5, t22 = corpus_bytes(DSMR5), corpus_bytes(DSMR22)
    junk = [b"\x00\xff\xfejunk\r\n", b"noise 123\r\n\r\n!!\r\n", b"\xff" * 33]
    stream = junk[0] + t5 + junk[1] + t22 + junk[2]
    frames, assembler = run(chunked(stream, how, "garbage"))
    assert raws(frames) == [t5, t22]
    assert rejected(assembler) == {}
    assert assembler.counters.garbage_bytes == sum(map(len, junk))
    assert assembler.buffered == 0


@pytest.mark.parametrize("how", CHUNKINGS)
def test_new_frame_at_line_start_interrupts_partial(how: str) -> None:
    """A telegram cut off after a line (meter reset) is dropped; the next telegrams survive."""
    t5, t22 = corpus_bytes(DSMR5), corpus_bytes(DSMR22)
    partial = t5[: t5.index(b"\r\n", 300) + 2]
    stream = partial + t22 + t5
    frames, assembler = run(chunked(stream, how, "interrupt"))
    assert raws(frames) == [t22, t5]
    assert rejected(assembler) == {Rejection.INTERRUPTED: 1}
    assert assembler.last_rejected is not None
    assert assembler.last_rejected.reason is Rejection.INTERRUPTED
    assert assembler.last_rejected.data == partial
    assert assembler.counters.garbage_bytes == 0


def test_slash_inside_a_line_does_not_interrupt() -> None:
    """A '/' inside a value is ordinary content, with or without a CRC."""
    telegram = make_telegram([b"0-0:96.13.0(see a/b)", b"1-0:1.8.1(000001.000*kWh)"])
    for how in ("whole", "bytewise"):
        frames, assembler = run(chunked(telegram, how))
        assert raws(frames) == [telegram]
        assert rejected(assembler) == {}


@pytest.mark.parametrize("how", CHUNKINGS)
@pytest.mark.parametrize(
    "after_bang",
    [b"junk\r\n", b"6EEE0\r\n", b"6EEE\n", b"6EEE\r", b"6E E\r\n"],
    ids=["junk", "five-digits", "lf-only", "cr-without-lf", "space-in-crc"],
)
def test_bang_followed_by_junk_is_malformed_end(after_bang: bytes, how: str) -> None:
    """'!' not followed by 0-4 hex digits and CRLF is rejected; the next telegram comes out."""
    t5, t22 = corpus_bytes(DSMR5), corpus_bytes(DSMR22)
    head = t5[: t5.rindex(b"!") + 1]
    frames, assembler = run(chunked(head + after_bang + t22, how, "malformed"))
    assert raws(frames) == [t22]
    assert rejected(assembler) == {Rejection.MALFORMED_END: 1}
    assert assembler.last_rejected is not None
    assert assembler.last_rejected.reason is Rejection.MALFORMED_END
    assert assembler.last_rejected.data == head
    assert assembler.counters.garbage_bytes == len(after_bang)


def _oversize_stream() -> tuple[bytes, bytes, bytes, int]:
    cap = 1000
    big = make_telegram([b"0-0:96.13.0(" + b"41" * 100 + b")"] * 15)
    assert len(big) > 3 * cap
    return big, corpus_bytes(DSMR5), corpus_bytes(DSMR22), cap


@pytest.mark.parametrize("how", ["bytewise", "64-byte-reads"])
def test_oversize_frame_dropped_and_next_frame_survives(how: str) -> None:
    """A frame over max_frame_bytes is dropped (memory stays bounded); normal frames follow."""
    big, t5, t22, cap = _oversize_stream()
    stream = big + t5 + t22
    chunks = chunked(stream, how) if how == "bytewise" else split_at(stream, range(64, 9999, 64))
    frames, assembler = run(chunks, max_frame_bytes=cap)
    assert raws(frames) == [t5, t22]
    assert rejected(assembler) == {Rejection.OVERSIZE: 1}
    assert assembler.last_rejected is not None
    assert assembler.last_rejected.reason is Rejection.OVERSIZE
    assert len(assembler.last_rejected.data) <= cap
    assert big.startswith(assembler.last_rejected.data)


def test_oversize_frame_dropped_even_when_read_in_one_chunk() -> None:
    """Whether a frame is over the cap must not depend on where the reads happened to end."""
    big, t5, _, cap = _oversize_stream()
    frames, assembler = run([big + t5], max_frame_bytes=cap)
    assert raws(frames) == [t5]
    assert rejected(assembler) == {Rejection.OVERSIZE: 1}


@pytest.mark.parametrize("name", [DSMR5, DSMR22], ids=["dsmr5", "dsmr2.2"])
def test_every_split_point_yields_the_same_frame(name: str) -> None:
    """A read may end anywhere: after '!', inside the CRC digits, between CR and LF, ..."""
    telegram = corpus_bytes(name)
    size = len(telegram)
    for cut in range(size + 1):
        assembler = FrameAssembler()
        frames = assembler.feed(telegram[:cut], 1.0) + assembler.feed(telegram[cut:], 2.0)
        assert raws(frames) == [telegram], cut
        assert frames[0].received_at == (2.0 if cut < size else 1.0)
        assert rejected(assembler) == {} and assembler.buffered == 0, cut
    # Two read boundaries anywhere in the end marker "\r\n!XXXX\r\n".
    tail_start = telegram.rindex(b"\r\n!")
    for a in range(tail_start, size + 1):
        for b in range(a, size + 1):
            frames, assembler = run(split_at(telegram, (a, b)))
            assert raws(frames) == [telegram], (a, b)
            assert rejected(assembler) == {}, (a, b)


def test_received_at_is_time_of_completing_chunk() -> None:
    """A frame is stamped with the receive time of the read that delivered its last byte."""
    t5, t22 = corpus_bytes(DSMR5), corpus_bytes(DSMR22)
    assembler = FrameAssembler()
    assert assembler.feed(t5[:500], 100.0) == []
    first = assembler.feed(t5[500:] + t22[:100], 200.0)
    second = assembler.feed(t22[100:], 300.0)
    assert [(f.raw, f.received_at) for f in first + second] == [(t5, 200.0), (t22, 300.0)]


def test_no_single_bit_error_is_passed_on() -> None:
    """One flipped bit anywhere in a DSMR 5 telegram (body, CRC, CR/LF) is never delivered.

    The one harmless flip is the case bit of a CRC hex letter ('E' -> 'e'): same value, so the
    frame is valid and its canonical telegram is the original again.
    """
    original = corpus_bytes(DSMR5)
    telegram = bytearray(original)
    for i in range(len(telegram)):
        for bit in range(8):
            telegram[i] ^= 1 << bit
            frames = FrameAssembler().feed(bytes(telegram), 0.0)
            assert [f.telegram for f in frames] in ([], [original]), (i, bit)
            telegram[i] ^= 1 << bit


# --- properties ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples() -> list[bytes]:
    """The property tests' telegrams (module scope: hypothesis reuses it across examples)."""
    require_corpus()
    telegrams = [corpus_bytes(name) for name in SAMPLE_FILES]
    assert all(crc_ok(t) for t in telegrams)
    return telegrams


_FRAGMENTS = st.sampled_from(
    [b"/", b"\r\n", b"\n", b"\n/", b"\n!", b"!", b"!\r\n", b"6EEE", b"\xff" * 33, b"  25803103\r\n"]
)
_GARBAGE = st.lists(_FRAGMENTS | st.binary(max_size=12), max_size=8).map(b"".join)
# Without '/', garbage cannot open a candidate frame, so every telegram after it must come out.
_SLASH_FREE_GARBAGE = _GARBAGE.map(lambda g: g.replace(b"/", b""))


@st.composite
def _layouts(draw: st.DrawFn, garbage: st.SearchStrategy[bytes]) -> tuple[list[int], list[bytes]]:
    """Distinct sample telegrams in random order with garbage before, between and after them."""
    order = draw(st.permutations(range(len(SAMPLE_FILES))))
    picked = order[: draw(st.integers(1, len(order)))]
    return picked, [draw(garbage) for _ in range(len(picked) + 1)]


def _cuts(data: st.DataObject, size: int) -> list[int]:
    return data.draw(st.lists(st.integers(0, size), max_size=25), label="cuts")


@settings(max_examples=200, deadline=None)
@given(layout=_layouts(_SLASH_FREE_GARBAGE), data=st.data())
def test_property_frames_in_slash_free_garbage_all_recovered(
    samples: list[bytes], layout: tuple[list[int], list[bytes]], data: st.DataObject
) -> None:
    """Telegrams among '/'-free junk, read at arbitrary boundaries: all recovered, in order."""
    picked, gaps = layout
    telegrams = [samples[i] for i in picked]
    stream = gaps[0] + b"".join(t + g for t, g in zip(telegrams, gaps[1:], strict=True))
    frames, assembler = run(split_at(stream, _cuts(data, len(stream))))
    assert raws(frames) == telegrams
    assert rejected(assembler) == {}
    assert assembler.counters.garbage_bytes == sum(map(len, gaps))
    assert assembler.buffered == 0


@settings(max_examples=200, deadline=None)
@given(layout=_layouts(_GARBAGE), data=st.data())
def test_property_frames_in_garbage_with_slashes(
    samples: list[bytes], layout: tuple[list[int], list[bytes]], data: st.DataObject
) -> None:
    """Junk containing '/' (a candidate start) never costs a telegram, wherever it falls.

    The junk may itself hold frame-like bytes that come out (a CRC-less "/\r\n!\r\n"), but
    every telegram comes out exactly once, whole and in order, read boundaries never change the
    outcome, and nothing with a wrong CRC ever comes out.
    """
    picked, gaps = layout
    telegrams = [samples[i] for i in picked]
    stream = gaps[0] + b"".join(t + g for t, g in zip(telegrams, gaps[1:], strict=True))

    whole = run([stream])
    frames, assembler = run(split_at(stream, _cuts(data, len(stream))))
    assert outcome(frames, assembler) == outcome(*whole)

    for frame in frames:
        assert_verified(frame)
        assert frame.raw in stream
    assert [raw for raw in raws(frames) if raw in telegrams] == telegrams


_NOISE = st.lists(
    _FRAGMENTS
    | st.binary(max_size=20)
    | st.sampled_from([make_telegram([b"1-0:1.7.0(00.123*kW)"]), b"/X\r\n!\r\n"]),
    max_size=40,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(
    noise=_NOISE,
    data=st.data(),
    max_frame_bytes=st.integers(8, 200),
    require_crc=st.booleans(),
)
def test_property_random_bytes_never_yield_an_unverified_frame(
    noise: bytes, data: st.DataObject, max_frame_bytes: int, require_crc: bool
) -> None:
    """Whatever arrives: no crash, every frame's CRC verifies, and the buffer stays bounded."""
    assembler = FrameAssembler(max_frame_bytes=max_frame_bytes, require_crc=require_crc)
    largest = 0
    total = 0
    for t, chunk in enumerate(split_at(noise, _cuts(data, len(noise)))):
        largest = max(largest, len(chunk))
        frames = assembler.feed(chunk, float(t))
        total += len(frames)
        for frame in frames:
            assert_verified(frame)
            assert frame.received_at == float(t)
            assert frame.crc is not None or not require_crc
        assert assembler.buffered <= max_frame_bytes + largest
        if assembler.last_rejected is not None:
            assert len(assembler.last_rejected.data) <= max_frame_bytes
    assert assembler.counters.frames == total
    assert assembler.counters.bytes_in == len(noise)


# --- a cut frame costs only itself ---------------------------------------------------------------


def assert_only_the_telegram_after(
    cut_frame: bytes, telegram: bytes, frames: list[Frame], assembler: FrameAssembler
) -> None:
    """The telegram comes out whole; every byte of the cut frame is junk or one rejected frame."""
    assert raws(frames) == [telegram]
    assert assembler.counters.frames == 1
    assert assembler.buffered == 0
    reasons = rejected(assembler)
    assert set(reasons) <= {Rejection.INTERRUPTED, Rejection.MALFORMED_END}
    assert sum(reasons.values()) <= 1
    kept = 0 if assembler.last_rejected is None else len(assembler.last_rejected.data)
    assert assembler.counters.garbage_bytes + kept == len(cut_frame)


@pytest.mark.parametrize("entry", entry_params("telegram"))
def test_a_frame_cut_at_any_byte_costs_only_itself(
    samples: list[bytes], entry: dict[str, Any]
) -> None:
    """A corpus frame cut at every byte (its rest lost on the wire, a meter reset), followed at
    once by a telegram, with and without CRC in turn: only the cut frame is lost."""
    frame = corpus_bytes(entry["file"])
    for cut in range(len(frame)):
        telegram = samples[cut % len(samples)]
        frames, assembler = run([frame[:cut] + telegram])
        assert_only_the_telegram_after(frame[:cut], telegram, frames, assembler)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_property_cut_frame_then_telegram_at_any_read_boundaries(
    samples: list[bytes], data: st.DataObject
) -> None:
    """The same at arbitrary read boundaries, which never change the outcome."""
    name = data.draw(st.sampled_from([e["file"] for e in corpus_entries("telegram")]))
    frame = corpus_bytes(name)
    cut_frame = frame[: data.draw(st.integers(0, len(frame) - 1), label="cut")]
    telegram = data.draw(st.sampled_from(samples))
    stream = cut_frame + telegram
    frames, assembler = run(split_at(stream, _cuts(data, len(stream))))
    assert outcome(frames, assembler) == outcome(*run([stream]))
    assert_only_the_telegram_after(cut_frame, telegram, frames, assembler)


@pytest.mark.parametrize("how", CHUNKINGS)
@pytest.mark.parametrize("following", [DSMR5, DSMR22], ids=["crc", "no-crc"])
def test_a_header_cut_short_does_not_take_the_next_telegram(how: str, following: str) -> None:
    """Issue 19's case: a header cut mid-line, then a whole telegram; it used to yield nothing.

    The cut header never got its line end, so it is junk, not a rejected frame.
    """
    cut = b"/ISK5\\2M550T-10"
    telegram = corpus_bytes(following)
    frames, assembler = run(chunked(cut + telegram, how, "cut-header"))
    assert raws(frames) == [telegram]
    assert rejected(assembler) == {}
    assert assembler.counters.garbage_bytes == len(cut)


@pytest.mark.parametrize("how", CHUNKINGS)
def test_a_cut_frame_with_its_header_is_counted_as_interrupted(how: str) -> None:
    """A frame cut after its header line is a rejected frame (INTERRUPTED), kept for diagnosis."""
    t5, t22 = corpus_bytes(DSMR5), corpus_bytes(DSMR22)
    cut = t5[: t5.index(b"(", 300) + 4]  # inside a value
    frames, assembler = run(chunked(cut + t22 + cut + t5, how, "interrupted"))
    assert raws(frames) == [t22, t5]
    assert rejected(assembler) == {Rejection.INTERRUPTED: 2}
    assert assembler.last_rejected is not None
    assert assembler.last_rejected.data == cut
    assert assembler.counters.garbage_bytes == 0


@pytest.mark.parametrize("crc", [True, False], ids=["crc", "no-crc"])
def test_a_slash_in_a_value_after_a_cut_frame_costs_nothing(crc: bool) -> None:
    """A '/' inside a value is never taken for a start, even when a cut frame came before it."""
    telegram = make_telegram([b"0-0:96.13.0(see a/b)", b"1-0:1.8.1(000001.000*kWh)"])
    if not crc:
        telegram = telegram[: telegram.rindex(b"!") + 1] + b"\r\n"
    t5 = corpus_bytes(DSMR5)
    for how in ("whole", "bytewise"):
        frames, assembler = run(chunked(t5[:400] + telegram + telegram, how))
        assert raws(frames) == [telegram, telegram]
        assert rejected(assembler) == {Rejection.INTERRUPTED: 1}


@pytest.mark.parametrize("how", ["whole", "random"])
def test_a_mebibyte_of_random_bytes_then_a_telegram(how: str) -> None:
    """After 1 MiB of noise (no line end before the telegram) the telegram comes out; so may
    frames the noise happens to form, but only CRC-verified ones, and memory stays bounded."""
    noise = random.Random(19).randbytes(1 << 20).rstrip(b"\r\n")
    for name in (DSMR5, DSMR22):
        telegram = corpus_bytes(name)
        stream = noise + telegram
        frames, assembler = run(chunked(stream, how, "noise"))
        assert raws(frames)[-1:] == [telegram]
        assert raws(frames).count(telegram) == 1
        for frame in frames:
            assert_verified(frame)
        assert assembler.buffered == 0


_JUNK = st.lists(_FRAGMENTS | st.binary(max_size=300), max_size=12).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(junk=_JUNK, data=st.data())
def test_property_random_junk_then_a_telegram(
    samples: list[bytes], junk: bytes, data: st.DataObject
) -> None:
    """Whatever junk came before, the telegram after it comes out, once, as the last frame."""
    telegram = data.draw(st.sampled_from(samples))
    stream = junk + telegram
    frames, assembler = run(split_at(stream, _cuts(data, len(stream))))
    assert outcome(frames, assembler) == outcome(*run([stream]))
    assert raws(frames)[-1:] == [telegram]
    for frame in frames[:-1]:
        assert_verified(frame)
        assert frame.raw in junk
    assert assembler.buffered == 0


@settings(max_examples=300, deadline=None)
@given(
    noise=_NOISE,
    data=st.data(),
    max_frame_bytes=st.integers(8, 300),
    require_crc=st.booleans(),
)
def test_property_read_boundaries_never_change_the_outcome(
    noise: bytes, data: st.DataObject, max_frame_bytes: int, require_crc: bool
) -> None:
    """Frames, rejections (with the data kept), junk and what stays buffered depend only on the
    bytes: one read, byte-wise reads and random reads agree, at any cap, whatever arrives."""
    settings_ = {"max_frame_bytes": max_frame_bytes, "require_crc": require_crc}
    whole = outcome(*run([noise], **settings_))
    assert outcome(*run(chunked(noise, "bytewise"), **settings_)) == whole
    assert outcome(*run(split_at(noise, _cuts(data, len(noise))), **settings_)) == whole
