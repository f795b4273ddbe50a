"""``dsmr-logger parse``: each telegram's reading and v2 fields, or the exact reason it fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import dsmr_logger
from conftest import require_corpus

from dsmr_logger.cli import main
from dsmr_logger.telegram.capture import frames_in
from dsmr_logger.telegram.obis import parse
from dsmr_logger.telegram.v2 import to_v2

FLUVIUS = "ndokter-dsmr_parser/fluvius_v171__flu5253769484_a.txt"
CAPTURE = "nielsbasjes-dsmr-tools/ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"
SAGEMCOM = "esphome-libs-encrypted-packet-sagemcom-t210"
LUXEMBOURG_AAD = "athombv-luxembourg-spec-example-with-aad"
BAD_CRC = "wassasin-dsmr5/overflow.txt"
HEAT = "ndokter-dsmr_parser/unpadded_crc__nwa-warmtelink.txt"


def documents(text: str) -> list[dict[str, object]]:
    """parse's output, which is one JSON document: a telegram's, or an array of them."""
    parsed = json.loads(text)
    return parsed if isinstance(parsed, list) else [parsed]


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


# --- 15: output a program can read, and encrypted captures --------------------------------------


def test_one_telegram_prints_one_indented_document_as_before(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = require_corpus() / FLUVIUS
    assert main(["parse", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == json.dumps(json.loads(out), indent=2) + "\n"
    assert json.loads(out)["status"] == "ok"


def test_several_telegrams_are_one_json_array_or_json_lines(tmp_path: Path) -> None:
    capture = require_corpus() / CAPTURE
    expected = len(frames_in(capture.read_bytes()))
    array = dsmr_logger("parse", capture)
    assert array.returncode == 0, array.stderr
    docs = json.loads(array.stdout)
    assert isinstance(docs, list) and len(docs) == expected
    assert all(doc["status"] == "ok" for doc in docs)

    lines = dsmr_logger("parse", capture, "--jsonl")
    assert lines.returncode == 0
    parsed = [json.loads(line) for line in lines.stdout.splitlines()]
    assert parsed == docs
    stamps = [doc["v2"]["timestamp"] for doc in parsed]
    assert stamps == sorted(stamps) and len(set(stamps)) == expected


def _vector(name: str) -> tuple[Path, str, bytes]:
    root = require_corpus() / "encrypted"
    key = json.loads((root / f"{name}.json").read_text())["key"]
    return root / f"{name}.frame.hex", key, (root / f"{name}.plaintext.txt").read_bytes()


def test_an_encrypted_capture_is_read_with_its_key_and_the_key_never_shown() -> None:
    frame, key, plaintext = _vector(SAGEMCOM)
    result = dsmr_logger("parse", frame, "--decryption-key", key)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "ok"
    assert doc["header"] == plaintext.split(b"\r\n", 1)[0].decode()
    assert doc["v2"]["electricity_delivered_1"] == "5017.120"  # 1-0:1.8.1(005017120*Wh)
    assert key not in result.stdout + result.stderr


def test_an_encrypted_capture_without_or_with_a_wrong_key_says_what_to_do() -> None:
    frame, _, _ = _vector(SAGEMCOM)
    without = dsmr_logger("parse", frame)
    assert without.returncode == 1
    doc = json.loads(without.stdout)
    assert (doc["status"], "--decryption-key" in doc["reason"]) == ("encrypted", True)

    wrong_key = "0F" * 16
    wrong = dsmr_logger("parse", frame, "--decryption-key", wrong_key)
    assert wrong.returncode == 1
    doc = json.loads(wrong.stdout)
    assert doc["status"] == "undecryptable"
    assert "GCM tag check" in doc["reason"]
    assert wrong_key not in wrong.stdout + wrong.stderr


def test_the_authentication_key_option_reads_a_meter_with_its_own() -> None:
    frame, key, plaintext = _vector(LUXEMBOURG_AAD)
    auth = json.loads((require_corpus() / "encrypted" / f"{LUXEMBOURG_AAD}.json").read_text())[
        "aad"
    ][2:]
    result = dsmr_logger(
        "parse", frame, "--decryption-key", key, "--authentication-key", auth, "--jsonl"
    )
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    # The specification's example carries a wrong CRC: decrypted, then rejected for it.
    assert [doc["status"] for doc in docs] == ["rejected"]
    assert docs[0]["reason"] == "crc_mismatch"
    assert plaintext.split(b"\n", 1)[0].decode().strip() == docs[0]["header"]


@pytest.mark.parametrize(
    ("registers", "shown"),
    [
        (b"1-0:1.7.0(00.378*kW)\r\n1-0:2.7.0(00.000*kW)\r\n", "0.378 kW"),
        (b"1-0:1.7.0(00.000*kW)\r\n1-0:2.7.0(01.189*kW)\r\n", "1.189 kW returned"),
        (b"1-0:1.7.0(00.000*kW)\r\n1-0:2.7.0(00.000*kW)\r\n", "0 kW"),
        (b"1-0:1.7.0(00.000*kW)\r\n", "0 kW"),
        (b"1-0:2.7.0(00.250*kW)\r\n", "0.25 kW returned"),
        (b"1-0:1.7.0(0378*W)\r\n", "378 W"),
    ],
)
def test_the_headline_power_shows_what_a_solar_house_sends_back(
    registers: bytes, shown: str
) -> None:
    """``status`` and the demo show one power figure: while the panels send power back to the
    grid, 1.7.0 is 0 and the figure is the power returned, said so."""
    from dsmr_logger.telegram.glance import glance

    telegram = b"/ISK5\\2M550T-1012\r\n\r\n0-0:1.0.0(190324150519W)\r\n" + registers + b"!0000\r\n"
    assert glance(telegram).power() == shown
