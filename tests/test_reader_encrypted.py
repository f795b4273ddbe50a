"""An encrypted P1 port (Luxembourg Smarty style) read through a real pty, decrypted."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

import pytest
from conftest import require_corpus
from waiting import wait_until

from dsmr_logger.config import from_mapping
from dsmr_logger.sources.p1.framing import Frame
from dsmr_logger.sources.p1.reader import MeterReader
from dsmr_logger.tools.simulate import VirtualSerialPort

VECTOR = "encrypted/esphome-libs-encrypted-packet-sagemcom-t210"


def vector() -> tuple[bytes, str, bytes]:
    root = require_corpus()
    frame = bytes.fromhex((root / f"{VECTOR}.frame.hex").read_text())
    key = json.loads((root / f"{VECTOR}.json").read_text())["key"]
    plaintext = (root / f"{VECTOR}.plaintext.txt").read_bytes()
    return frame, key, plaintext


async def read_through_pty(
    key: str, data: bytes, expect: Callable[[MeterReader], bool]
) -> tuple[MeterReader, list[Frame]]:
    port = VirtualSerialPort()
    frames: list[Frame] = []
    meter = from_mapping({"meter": {"port": port.path, "decryption_key": key}}).meter
    reader = MeterReader(meter, frames.append)
    task = asyncio.create_task(reader.run())
    try:
        await wait_until(lambda: reader.status.connected, "the port to open")
        for start in range(0, len(data), 37):  # arbitrary read boundaries
            os.write(port.master, data[start : start + 37])
            await asyncio.sleep(0)
        await wait_until(lambda: expect(reader), "the reader to finish")
    finally:
        task.cancel()
        port.close()
    return reader, frames


async def test_encrypted_frames_are_decrypted_verified_and_framed() -> None:
    frame, key, plaintext = vector()
    reader, frames = await read_through_pty(
        key, b"\x00noise" + frame + frame, lambda r: r.assembler.counters.frames == 2
    )
    assert [f.raw for f in frames] == [plaintext, plaintext]
    assert reader.rejected() == {}


async def test_wrong_key_forwards_nothing_and_is_counted() -> None:
    frame, _, _ = vector()
    reader, frames = await read_through_pty(
        "BB" * 16, frame + frame, lambda r: r.rejected().get("decryption_failed", 0) >= 2
    )
    assert frames == []
    assert reader.decryptor is not None
    assert "decryption_key" in str(reader.decryptor.last_error)
    assert "BBBB" not in str(reader.decryptor.last_error)


@pytest.mark.parametrize("bad", ["xyz", "AA" * 15, 1234])
def test_bad_key_in_config_names_the_key_without_echoing_it(bad: object) -> None:
    from dsmr_logger.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        from_mapping({"meter": {"port": "/dev/ttyUSB0", "decryption_key": bad}})
    (problem,) = caught.value.problems
    assert problem.startswith("meter.decryption_key: must be")
    assert str(bad) not in problem
