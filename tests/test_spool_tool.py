"""``dsmr-logger spool ...`` against a spool that a running daemon holds open."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dsmr_reader_server import DsmrReaderServer
from waiting import wait_until

from dsmr_logger.cli import main
from dsmr_logger.config import load
from dsmr_logger.daemon import Daemon
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort

KEY = "spool-tool-test-key-0123"
TELEGRAMS = frames_in(default_capture())
POISON = TELEGRAMS[2]


def write_config(tmp_path: Path, port: str, url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[meter]
port = "{port}"
idle_timeout = 2.0
reconnect_initial = 0.05
reconnect_max = 0.2

[spool]
path = "{tmp_path / "spool.sqlite3"}"
flush_interval = 0.1

[[sink]]
name = "home"
url = "{url}"
api_key = "{KEY}"
timeout = 1.0
retry_initial = 0.01
retry_max = 0.1
"""
    )
    return path


@contextlib.asynccontextmanager
async def running(config_path: Path) -> AsyncIterator[Daemon]:
    daemon = Daemon(load(config_path))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        yield daemon
    finally:
        stop.set()
        async with asyncio.timeout(10):
            assert await task == 0


def cli(config: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["spool", "--config", str(config), *args])
    return status, capsys.readouterr().out


async def test_dead_letter_listed_shown_and_requeued_into_a_running_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = VirtualSerialPort()
    async with DsmrReaderServer(api_key=KEY) as server:
        server.poison = lambda telegram: telegram == POISON.decode()
        server.poison_answer = "parse_failure"
        config = write_config(tmp_path, port.path, server.url)
        try:
            async with running(config) as daemon:
                await wait_until(lambda: daemon.source.status.connected, "the meter port")
                await MeterSimulator(port, TELEGRAMS[:6], interval=0, as_recorded=True).run(6)
                await wait_until(lambda: len(server.received) == 5, "five deliveries")
                assert daemon.workers[0].stats.dead_letters == 1

                status, out = cli(config, "list", capsys=capsys)
                assert status == 0
                assert "dead letters held: 1" in out
                assert "#1 home" in out
                assert "HTTP 500 Failed to parse telegram" in out

                status, out = cli(config, "show", "1", capsys=capsys)
                assert status == 0
                assert POISON.decode().replace("\r\n", "\n").strip() in out

                status, out = cli(config, "export", str(tmp_path / "out.log"), capsys=capsys)
                assert status == 0
                assert frames_in((tmp_path / "out.log").read_bytes()) == [POISON]

                server.poison = None  # the server was fixed
                status, out = cli(config, "requeue", capsys=capsys)
                assert status == 0
                assert "requeued 1" in out
                await wait_until(lambda: len(server.received) == 6, "the requeued telegram")

                status, out = cli(config, "list", capsys=capsys)
                assert "dead letters held: none" in out
        finally:
            port.close()
    delivered = [t.encode() for t in server.received]
    assert delivered == [*TELEGRAMS[:2], *TELEGRAMS[3:6], POISON]


@contextlib.asynccontextmanager
async def holding_a_backlog(tmp_path: Path, count: int) -> AsyncIterator[tuple[Path, Daemon]]:
    """A running daemon whose sink refuses, with ``count`` telegrams of the capture waiting."""
    port = VirtualSerialPort()
    async with DsmrReaderServer(api_key=KEY) as server:
        server.mode = "refuse"
        config = write_config(tmp_path, port.path, server.url)
        try:
            async with running(config) as daemon:
                await wait_until(lambda: daemon.source.status.connected, "the meter port")
                play = MeterSimulator(port, TELEGRAMS[:count], interval=0, as_recorded=True)
                await play.run(count)
                await wait_until(lambda: daemon.queues.undelivered()["home"] == count, "a backlog")
                yield config, daemon
        finally:
            port.close()


async def test_purge_asks_first_and_deletes_the_backlog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with holding_a_backlog(tmp_path, 4) as (config, _):
        pass
    status, out = cli(config, "list", capsys=capsys)
    assert "backlog home: 4 telegrams" in out

    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    status, out = cli(config, "purge", capsys=capsys)
    assert status == 1
    assert "nothing deleted" in out
    status, out = cli(config, "purge", "--yes", capsys=capsys)
    assert status == 0
    assert "deleted 4 queued telegram(s)" in out
    status, out = cli(config, "list", capsys=capsys)
    assert "backlog: none" in out


async def test_purge_refuses_while_the_daemon_runs_and_list_reads_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with holding_a_backlog(tmp_path, 3) as (config, daemon):
        await daemon.queues.flush(everything=True)
        status, out = cli(config, "list", capsys=capsys)
        assert (status, "backlog home: 3 telegrams" in out) == (0, True)
        assert main(["spool", "--config", str(config), "purge", "--yes"]) == 1
        error = capsys.readouterr().err
        assert "in use by another dsmr-logger daemon (stop it first)" in error
        assert daemon.queues.undelivered()["home"] == 3


async def test_list_shows_a_small_spools_size_in_a_unit_that_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sixteen telegrams waiting (about 13 KB) were listed as "0.0 MiB of segment files": a
    spool that looked empty beside "backlog home: 16 telegrams"."""
    port = VirtualSerialPort()
    async with DsmrReaderServer(api_key=KEY) as server:
        server.mode = "refuse"
        config = write_config(tmp_path, port.path, server.url)
        try:
            async with running(config) as daemon:
                await wait_until(lambda: daemon.source.status.connected, "the meter port")
                await MeterSimulator(port, TELEGRAMS, interval=0).run(16)
                await wait_until(lambda: daemon.queues.undelivered()["home"] == 16, "a backlog")
                await daemon.queues.flush(everything=True)
                status, out = cli(config, "list", capsys=capsys)
        finally:
            port.close()
    assert status == 0
    assert "backlog home: 16 telegrams" in out
    segments = sum(f.stat().st_size for f in (tmp_path / "spool.sqlite3-telegrams").iterdir())
    assert segments > 12 * 1024
    shown = next(line for line in out.splitlines() if "of segment files" in line)
    assert shown.endswith(" KiB of segment files"), shown
    assert float(shown.split(": ")[1].split()[0]) >= 12.0, shown


def test_missing_spool_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "/dev/null", "http://127.0.0.1:9")
    assert main(["spool", "--config", str(config), "list"]) == 1
    assert "no spool at" in capsys.readouterr().err
