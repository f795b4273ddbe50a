"""CRC-16/ARC: the checksum that decides whether a telegram is forwarded at all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmr_logger.meter.crc import crc16, format_crc


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
