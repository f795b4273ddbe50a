"""``dsmr-logger backfill``: recorded telegrams into DSMR-reader, only the gaps, resumable."""

from __future__ import annotations

import gzip
import io
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from conftest import CORPUS, require_corpus
from dsmr_reader_server import DsmrReaderProcess, DsmrReaderServer, v2_reading

from dsmr_logger.config import from_mapping
from dsmr_logger.telegram.capture import frames_in
from dsmr_logger.tools.backfill import backfill, meter_time

KEY = "backfill-test-key-012345"
CAPTURE = "nielsbasjes-dsmr-tools/ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"
ZONE = ZoneInfo("Europe/Amsterdam")


def capture() -> list[bytes]:
    require_corpus()
    return frames_in((CORPUS / CAPTURE).read_bytes())


def archive(tmp_path: Path, telegrams: list[bytes]) -> Path:
    """An archive folder as the archive sink writes it: one plain and one gzipped day file."""
    folder = tmp_path / "archive"
    folder.mkdir()
    half = len(telegrams) // 2
    (folder / "2019-03-23.log.gz").write_bytes(gzip.compress(b"".join(telegrams[:half])))
    (folder / "2019-03-24.log").write_bytes(b"".join(telegrams[half:]))
    return folder


def write_config(tmp_path: Path, url: str, api: str = "v2") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[meter]\nport = "/dev/null"\n[spool]\npath = "{tmp_path / "spool.sqlite3"}"\n'
        f'[[sink]]\nname = "home"\nurl = "{url}"\napi_key = "{KEY}"\napi = "{api}"\n'
        "timeout = 2.0\nretry_initial = 0.02\nretry_max = 0.2\n"
    )
    return path


def stamps(readings: list[dict[str, str]]) -> list[datetime]:
    return [datetime.fromisoformat(r["timestamp"]) for r in readings]


async def test_v2_backfill_sends_exactly_the_missing_readings_in_order(tmp_path: Path) -> None:
    telegrams = capture()[:120]
    times = [meter_time(t, ZONE) for t in telegrams]
    assert None not in times
    present = set(range(10, 40)) | {70, 71, 119}
    async with DsmrReaderServer(api_key=KEY) as server:
        server.readings.extend(v2_reading(times[i].isoformat()) for i in sorted(present))
        config = from_mapping(
            {
                "meter": {"port": "/dev/null"},
                "spool": {"path": str(tmp_path / "spool.sqlite3")},
                "sink": [{"name": "home", "url": server.url, "api_key": KEY, "api": "v2"}],
            }
        )
        out = io.StringIO()
        status = await backfill(
            config, "home", archive(tmp_path, telegrams), since=None, until=None, out=out
        )
        assert status == 0, out.getvalue()
        sent = stamps(server.readings[len(present) :])
        assert sent == [times[i] for i in range(120) if i not in present]
        assert f"{len(present)} already stored" in out.getvalue()
        assert "dsmr_stats_reconstruct_missing_day_statistics" in out.getvalue()

        # A second run finds nothing missing.
        again = io.StringIO()
        await backfill(config, "home", tmp_path / "archive", since=None, until=None, out=again)
        assert len(server.readings) == 120
        assert "0 to send" in again.getvalue()


async def test_since_and_until_bound_what_is_sent(tmp_path: Path) -> None:
    telegrams = capture()[:30]
    times = [meter_time(t, ZONE) for t in telegrams]
    async with DsmrReaderServer(api_key=KEY) as server:
        config = from_mapping(
            {
                "meter": {"port": "/dev/null"},
                "spool": {"path": str(tmp_path / "spool.sqlite3")},
                "sink": [{"name": "home", "url": server.url, "api_key": KEY}],
            }
        )
        out = io.StringIO()
        await backfill(
            config, "home", archive(tmp_path, telegrams), since=times[5], until=times[9], out=out
        )
        assert [t.encode() for t in server.received] == telegrams[5:10]  # API v1: raw telegrams
        assert "stored twice" in out.getvalue()  # the v1 duplicate warning


def test_interrupted_backfill_continues_without_duplicates(tmp_path: Path) -> None:
    """A real process, a real SIGINT in the middle, and the same command again."""
    telegrams = capture()[:200]
    folder = archive(tmp_path, telegrams)
    with DsmrReaderProcess(KEY) as server:
        server.control(delay=0.01)  # about 100 posts/s: slow enough to interrupt
        config = write_config(tmp_path, server.url)
        command = [sys.executable, "-m", "dsmr_logger", "backfill", "--config", str(config)]
        command += ["--from", str(folder), "--sink", "home"]
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while len(server.readings()) < 50 and time.monotonic() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=20)
        assert first.returncode == 130, err
        assert b"run the same command again" in err
        interrupted_at = len(server.readings())
        assert 50 <= interrupted_at < 200

        second = subprocess.run(command, capture_output=True, timeout=60)
        assert second.returncode == 0, second.stderr
        readings = server.readings()
    sent = stamps(readings)
    assert sent == sorted(set(sent)), "twice or out of order"
    assert sent == [meter_time(t, ZONE) for t in telegrams]
