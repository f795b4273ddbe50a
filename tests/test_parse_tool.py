"""``dsmr-logger parse``: each telegram's reading and v2 fields, or the exact reason it fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_corpus

from dsmr_logger.cli import main
from dsmr_logger.telegram.obis import parse
from dsmr_logger.telegram.v2 import to_v2

FLUVIUS = "ndokter-dsmr_parser/fluvius_v171__flu5253769484_a.txt"
BAD_CRC = "wassasin-dsmr5/overflow.txt"
HEAT = "ndokter-dsmr_parser/unpadded_crc__nwa-warmtelink.txt"


def documents(text: str) -> list[dict[str, object]]:
    decoder = json.JSONDecoder()
    docs, at = [], 0
    text = text.strip()
    while at < len(text):
        doc, end = decoder.raw_decode(text, at)
        docs.append(doc)
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return docs


def test_a_belgian_telegram_shows_reading_and_exact_v2_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = require_corpus() / FLUVIUS
    assert main(["parse", str(path)]) == 0
    (doc,) = documents(capsys.readouterr().out)
    assert doc["status"] == "ok"
    assert doc["v2"] == to_v2(parse(path.read_bytes())).fields
    assert doc["v2"]["extra_device_delivered"] == "112.384"  # Belgian gas on 0-1:24.2.3
    assert doc["reading"]["objects"]["1-0:1.8.2"][0]["number"] == "15.758"


def test_bad_crc_and_unmappable_telegrams_say_why_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = require_corpus()
    data = (root / BAD_CRC).read_bytes() + (root / HEAT).read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "dsmr_logger", "parse", "-"],
        input=data,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1
    first, second = documents(result.stdout.decode())
    assert (first["status"], first["reason"]) == ("rejected", "crc_mismatch")
    assert "computed 55BD" in str(first["detail"])
    assert second["status"] == "unmappable"
    assert "electricity" in str(second["reason"]).lower()


def test_no_telegram_at_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "noise.log"
    path.write_bytes(b"\xff" * 100)
    assert main(["parse", str(path)]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "empty"
