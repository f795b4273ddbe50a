"""The v1 form body: ``v1_form`` must be byte for byte what ``urllib.parse.urlencode`` produced.

DSMR-reader checks the telegram's CRC on what it decodes from the form, so a single byte
escaped differently (a space, a '+', a '~', a byte above 0x7F) would lose that telegram.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import MANIFEST, require_corpus

from dsmr_logger.config import DsmrReaderSinkConfig
from dsmr_logger.delivery.sinks.dsmr_reader import DsmrReaderV1Sink, v1_form


def urlencoded(telegram: bytes) -> bytes:
    """The body as the v1 sink built it before ``v1_form``: the reference."""
    return urllib.parse.urlencode({"telegram": telegram}).encode("ascii")


@pytest.mark.parametrize("byte", range(256), ids=lambda byte: f"{byte:02X}")
def test_every_byte_value(byte: int) -> None:
    alone = bytes([byte])
    assert v1_form(alone) == urlencoded(alone)
    surrounded = b"a" + alone + b" %+" + alone * 3
    assert v1_form(surrounded) == urlencoded(surrounded)


def test_all_bytes_at_once_and_nothing() -> None:
    everything = bytes(range(256)) * 2
    assert v1_form(everything) == urlencoded(everything)
    assert v1_form(b"") == urlencoded(b"") == b"telegram="


def test_spot_values() -> None:
    """The quote_plus rules spelled out: unreserved kept, space '+', the rest upper-case %XX."""
    assert v1_form(b"Az09_.-~") == b"telegram=Az09_.-~"
    assert v1_form(b"a b+c%d") == b"telegram=a+b%2Bc%25d"
    assert v1_form(b"/\\(*):!\r\n\xab\xff") == b"telegram=%2F%5C%28%2A%29%3A%21%0D%0A%AB%FF"


@pytest.mark.parametrize("entry", [pytest.param(e, id=e["file"]) for e in MANIFEST])
def test_every_corpus_file(entry: dict[str, Any]) -> None:
    """Telegrams, streams, captures and encrypted frames alike (any bytes, any size)."""
    data = (require_corpus() / entry["file"]).read_bytes()
    assert v1_form(data) == urlencoded(data)


def test_the_v1_sink_posts_it() -> None:
    """``DsmrReaderV1Sink.form`` is ``v1_form`` of the queued telegram (no connection needed)."""

    @dataclass(frozen=True)
    class Item:
        seq: int
        telegram: bytes
        received_at: float

    telegram = b"/ISK5\\2M550T-1012\r\n\r\n1-0:1.8.1(001581.123*kWh)\r\n!ABCD\r\n"
    sink = DsmrReaderV1Sink(
        DsmrReaderSinkConfig(name="home", url="http://127.0.0.1:1", api_key="k")
    )
    assert sink.form(Item(1, telegram, 0.0)) == urlencoded(telegram)
