"""A sink's name can no longer break the spool: names are plain words, and the record format
holds any name whatever.

Format 1 joined a record's sink names with newlines, so a sink named "home\\nhouse" spooled its
backlog for two phantom sinks, "home" and "house": 100 of 100 telegrams lost to it. Format 2
writes each name with its length; the configuration allows 1-64 letters, digits, ``-``, ``_``
and ``.``, and names the key of any other.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from dsmr_reader_server import DsmrReaderServer

from dsmr_logger.cli import main
from dsmr_logger.config import DsmrReaderSinkConfig
from dsmr_logger.delivery.queue import Queues
from dsmr_logger.delivery.sinks.dsmr_reader import DsmrReaderV1Sink
from dsmr_logger.delivery.spool import Spool
from dsmr_logger.delivery.worker import SinkWorker
from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.telegram.build import restamp
from dsmr_logger.telegram.capture import default_capture, frames_in

KEY = "sink-name-test-key-0123"
ODD = "home\nhouse"
"""The name that split into two phantom sinks; spooled beside real sinks of those names."""


def config_text(name: str, spool: Path) -> str:
    return (
        f'[meter]\nport = "/dev/ttyUSB0"\n[spool]\npath = "{spool}"\n'
        f'[[sink]]\nname = {name}\nurl = "http://192.168.1.10/"\napi_key = "{KEY}"\n'
    )


@pytest.mark.parametrize(
    "name",
    ['"home\\nhouse"', '"my home"', '""', '"' + "x" * 65 + '"', '"thuis-ü"', '"-home"', "3"],
    ids=["newline", "space", "empty", "65-chars", "non-ascii", "leading-dash", "number"],
)
def test_a_sink_name_that_is_not_a_plain_word_is_refused_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config_text(name, tmp_path / "spool.sqlite3"))
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsmr-logger: config error: {path}: sink[0].name: "), err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", ["home", "DSMR-reader_2", "a", "pi.local", "x" * 64])
def test_plain_words_are_sink_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config_text(f'"{name}"', tmp_path / "spool.sqlite3"))
    assert main(["check-config", "--config", str(path)]) == 0, capsys.readouterr().err


def telegrams(count: int) -> list[bytes]:
    capture = frames_in(default_capture())
    return [restamp(capture[i % len(capture)], b"2611241200%02dW" % i) for i in range(count)]


async def test_a_backlog_for_a_sink_with_any_name_is_delivered_to_it_alone(tmp_path: Path) -> None:
    """Spooled across a restart for three sinks: "home\\nhouse", "home" and "house"; each
    gets exactly its own, from a real server, after the restart."""
    path = tmp_path / "spool.sqlite3"
    sinks = {ODD: 0.0, "home": 0.0, "house": 0.0}
    sent = telegrams(40)
    queues = Queues(Spool(path, max_bytes=1 << 24), sinks, flush_interval=0.0, strict=False)
    await queues.open()
    for frame in FrameAssembler().feed(b"".join(sent), 0.0):
        queues.accept(frame)
    await queues.close()  # everything spooled: all three sinks were down

    async with DsmrReaderServer(api_key=KEY) as server:
        queues = Queues(Spool(path, max_bytes=1 << 24), sinks, flush_interval=0.0, strict=False)
        assert await queues.open() == {}, "a phantom sink got a backlog"
        assert queues.undelivered() == dict.fromkeys(sinks, 40)
        workers = [
            SinkWorker(
                DsmrReaderV1Sink(DsmrReaderSinkConfig(name=name, url=server.url, api_key=KEY)),
                queues,
                retry_initial=0.01,
                retry_max=0.1,
            )
            for name in sinks
        ]
        for worker in workers:
            await worker.sink.start()
        tasks = [asyncio.create_task(w.run()) for w in workers]
        async with asyncio.timeout(20):
            while len(server.received) < 3 * 40:
                await asyncio.sleep(0.01)
        for worker in workers:
            await worker.stop(1.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await queues.close()
        for worker in workers:
            await worker.sink.close()
    assert sorted(server.received) == sorted(t.decode() for t in sent * 3)
    assert {w.sink.name: w.stats.delivered for w in workers} == dict.fromkeys(sinks, 40)
    reader = Spool(path, max_bytes=1 << 24)
    reader.open(shared=True)
    assert reader.backlogs() == {} and reader.counters() == {}
    reader.close()
