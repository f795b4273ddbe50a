"""CRC-16/ARC: the checksum that decides whether a telegram is forwarded at all."""

from __future__ import annotations

import random
from typing import Any

import pytest
from conftest import corpus_entries, require_corpus
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmr_logger.sources.p1 import crc
from dsmr_logger.sources.p1.crc import crc16, format_crc


def reference_crc16(data: bytes) -> int:
    """CRC-16/ARC bit by bit, straight from the definition: the oracle for the table versions."""
    register = 0
    for byte in data:
        register ^= byte
        for _ in range(8):
            register = (register >> 1) ^ 0xA001 if register & 1 else register >> 1
    return register


def _random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_check_value() -> None:
    """The catalogue check value of CRC-16/ARC: a wrong table or init breaks every telegram."""
    assert crc16(b"123456789") == 0xBB3D


def test_empty_input_is_init_value() -> None:
    """Init 0 and no final xor (CRC-16/ARC, not MODBUS or X-25)."""
    assert crc16(b"") == 0


def test_accepts_the_buffer_types_the_assembler_passes() -> None:
    """The assembler hands in memoryview slices of a bytearray; the value must not change."""
    data = b"/ISK5\\2M550T-1012\r\n\r\n!"
    expected = crc16(data)
    assert crc16(bytearray(data)) == expected
    assert crc16(memoryview(bytearray(data))) == expected


def test_word_table_is_sixteen_shifts_of_every_register_value() -> None:
    """``_TABLE16[x]`` is ``x`` after feeding 16 zero bits: every one of the 65,536 entries."""
    assert crc._TABLE16.typecode == "H"
    assert len(crc._TABLE16) == 65536
    expected = []
    for x in range(65536):
        register = x
        for _ in range(16):
            register = (register >> 1) ^ 0xA001 if register & 1 else register >> 1
        expected.append(register)
    assert crc._TABLE16.tolist() == expected


@pytest.mark.parametrize("size", range(301))
def test_matches_bitwise_reference_for_every_length(size: int) -> None:
    """Even and odd lengths: the odd last byte goes through the byte table."""
    data = _random_bytes(size, size)
    assert crc16(data) == reference_crc16(data)


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_memoryview_slices_at_odd_and_even_offsets(offset: int) -> None:
    """The assembler passes ``memoryview(data)[:tail]``; an unaligned start must not matter."""
    data = _random_bytes(1000 + offset, 400)
    for kind in (bytes, bytearray):
        buffer = kind(data)
        for end in range(offset, 300):
            expected = reference_crc16(data[offset:end])
            assert crc16(memoryview(buffer)[offset:end]) == expected, (kind, offset, end)


def test_big_endian_fallback_is_the_byte_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where words are not little-endian the byte loop runs; it gives the same values."""
    monkeypatch.setattr(crc, "_WORDS_ARE_LITTLE_ENDIAN", False)
    assert crc16(b"123456789") == 0xBB3D
    for size in (0, 1, 2, 77, 778):
        data = _random_bytes(size, size)
        assert crc16(memoryview(data)[1:]) == reference_crc16(data[1:])


def _telegram_params() -> list[Any]:
    return [
        pytest.param(entry, id=entry["file"])
        for entry in corpus_entries("telegram")
        if entry["crc_computed"] is not None
    ]


@pytest.mark.parametrize("entry", _telegram_params())
def test_corpus_telegrams(entry: dict[str, Any]) -> None:
    """Every corpus telegram: '/' through '!' gives the manifest's CRC, and a valid one its own."""
    data = (require_corpus() / entry["file"]).read_bytes()
    bang = data.rindex(b"!")
    computed = crc16(data[: bang + 1])
    assert computed == reference_crc16(data[: bang + 1])
    assert computed == int(entry["crc_computed"], 16)
    digits = data[bang + 1 :].rstrip(b"\r\n")
    if entry["crc_valid"]:
        assert computed == int(digits, 16)
    elif entry["has_crc"]:
        assert computed != int(digits, 16)
    else:
        assert digits == b""


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_appending_the_crc_little_endian_leaves_zero_residue(data: bytes) -> None:
    """Algebraic property of a reflected CRC with init 0 and no xor-out, checked on any input."""
    assert crc16(data + crc16(data).to_bytes(2, "little")) == 0


@pytest.mark.parametrize(
    ("value", "wire"),
    [(0, b"0000"), (0xB9F, b"0B9F"), (0x60E5, b"60E5"), (0xFFFF, b"FFFF")],
    ids=["zero", "unpadded", "lowercase-source", "max"],
)
def test_format_crc_is_four_uppercase_hex_digits(value: int, wire: bytes) -> None:
    """DSMR-reader only accepts exactly four upper-case digits after '!'."""
    assert format_crc(value) == wire
