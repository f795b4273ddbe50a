"""``dsmr-logger backfill``: recorded telegrams into DSMR-reader, only the gaps, resumable."""

from __future__ import annotations

import asyncio
import gzip
import io
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import CORPUS, require_corpus
from dsmr_reader_server import DsmrReaderProcess, DsmrReaderServer, v2_reading

from dsmr_logger.config import Config, from_mapping
from dsmr_logger.telegram.build import restamp
from dsmr_logger.telegram.capture import frames_in
from dsmr_logger.tools.backfill import (
    REORDER,
    Source,
    StreamStats,
    Window,
    backfill,
    in_window,
    meter_time,
)

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
        "timeout = 2.0\nretry_max = 0.2\n"
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
        # The 51st post is held, so the SIGINT lands mid-run however slow the machine is.
        server.control(hang_after=50)
        config = write_config(tmp_path, server.url)
        command = [sys.executable, "-m", "dsmr_logger", "backfill", "--config", str(config)]
        command += ["--from", str(folder), "--sink", "home"]
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while server.state()["hanging"] == 0 and first.poll() is None:
            assert time.monotonic() < deadline, "the 51st post never arrived"
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=20)
        assert first.returncode == 130, err
        assert b"run the same command again" in err
        assert len(server.readings()) == 50

        server.control(mode="ok")
        second = subprocess.run(command, capture_output=True, timeout=60)
        assert second.returncode == 0, second.stderr
        readings = server.readings()
    sent = stamps(readings)
    assert sent == sorted(set(sent)), "twice or out of order"
    assert sent == [meter_time(t, ZONE) for t in telegrams]


# --- progress belongs to one request -------------------------------------------------------------


def v1_config(tmp_path: Path, url: str) -> Config:
    return from_mapping(
        {
            "meter": {"port": "/dev/null"},
            "spool": {"path": str(tmp_path / "spool.sqlite3")},
            "sink": [{"name": "home", "url": url, "api_key": KEY, "retry_max": 0.2}],
        }
    )


async def test_an_earlier_range_is_not_skipped_after_a_later_one(tmp_path: Path) -> None:
    """Issue 19's case: after 15:10-15:11, 15:06-15:07 said "resuming after 15:11, 0 to send"."""
    telegrams = capture()[:40]
    times = [meter_time(t, ZONE) for t in telegrams]
    folder = archive(tmp_path, telegrams)
    async with DsmrReaderServer(api_key=KEY) as server:
        config = v1_config(tmp_path, server.url)
        await backfill(config, "home", folder, since=times[20], until=times[25], out=io.StringIO())
        out = io.StringIO()
        await backfill(config, "home", folder, since=times[6], until=times[11], out=out)
        assert [t.encode() for t in server.received] == telegrams[20:26] + telegrams[6:12]
        assert "resuming" not in out.getvalue()
        assert "6 to send" in out.getvalue()


async def test_the_same_request_resumes_and_restart_starts_it_afresh(tmp_path: Path) -> None:
    """Interrupted, another range in between, the same request again: it continues where it
    stopped, each telegram once and in order; run again it has nothing left; --restart (the
    real command) sends the range again."""
    telegrams = capture()[:60]
    times = [meter_time(t, ZONE) for t in telegrams]
    assert None not in times
    folder = archive(tmp_path, telegrams)
    async with DsmrReaderServer(api_key=KEY) as server:
        config = v1_config(tmp_path, server.url)
        server.delay = 0.02
        first = asyncio.create_task(
            backfill(config, "home", folder, since=times[10], until=times[50], out=io.StringIO())
        )
        while len(server.received) < 8:
            await asyncio.sleep(0.01)
        first.cancel()  # what Ctrl-C does to asyncio.run
        await asyncio.gather(first, return_exceptions=True)
        server.delay = 0
        await asyncio.sleep(0.3)  # the post in flight at the interruption is stored meanwhile
        interrupted = len(server.received)
        assert 8 <= interrupted < 41
        await backfill(config, "home", folder, since=times[0], until=times[3], out=io.StringIO())
        resumed = io.StringIO()
        await backfill(config, "home", folder, since=times[10], until=times[50], out=resumed)
        # Answered ones are done; the one in flight, stored but not answered, comes again.
        for answered in (interrupted, interrupted - 1):
            if f"resuming after {times[9 + answered].isoformat()}," in resumed.getvalue():
                break
        else:
            pytest.fail(f"not resumed after the last answered telegram: {resumed.getvalue()}")
        sent = [t.encode() for t in server.received]
        assert sent == (
            telegrams[10 : 10 + interrupted] + telegrams[0:4] + telegrams[10 + answered : 51]
        )

        # The same request, its bounds written in UTC: nothing left to do.
        again = io.StringIO()
        utc = [times[10].astimezone(ZoneInfo("UTC")), times[50].astimezone(ZoneInfo("UTC"))]
        await backfill(config, "home", folder, since=utc[0], until=utc[1], out=again)
        assert "0 to send" in again.getvalue()
        assert len(server.received) == len(sent)

        config_file = write_config(tmp_path, server.url, api="v1")
        command = [sys.executable, "-m", "dsmr_logger", "backfill", "--config", str(config_file)]
        command += ["--from", str(folder), "--sink", "home", "--restart"]
        command += ["--since", times[10].isoformat(), "--until", times[50].isoformat()]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        output, errors = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, errors
        assert b"resuming" not in output
        assert [t.encode() for t in server.received[len(sent) :]] == telegrams[10:51]


# --- a window in a big archive -------------------------------------------------------------------


def stamped(telegram: bytes, when: datetime) -> bytes:
    """``telegram`` with the meter timestamp of ``when`` in the meter's zone (and a fresh CRC)."""
    local = when.astimezone(ZONE)
    flag = b"S" if local.dst() else b"W"
    return restamp(telegram, local.strftime("%y%m%d%H%M%S").encode() + flag)


def day_files(folder: Path, telegrams: list[bytes], *, gzipped: set[str]) -> None:
    """Day files named by the meter's local date, as the archive sink on a Pi in its zone."""
    days: dict[str, list[bytes]] = {}
    for telegram in telegrams:
        moment = meter_time(telegram, ZONE)
        assert moment is not None
        days.setdefault(moment.date().isoformat(), []).append(telegram)
    for day, content in days.items():
        data = b"".join(content)
        if day in gzipped:
            (folder / f"{day}.log.gz").write_bytes(gzip.compress(data))
        else:
            (folder / f"{day}.log").write_bytes(data)


async def test_a_window_in_a_big_archive_is_exactly_its_telegrams_in_order(
    tmp_path: Path,
) -> None:
    """Four days of archive, a window across a midnight: exactly its telegrams, oldest first,
    each once (a telegram written twice around a crash, one written a little out of order); a
    damaged file of a day far from the window is never even opened."""
    base = capture()
    start = datetime(2024, 3, 8, tzinfo=ZONE)
    step = timedelta(seconds=97)
    written = [stamped(base[i % len(base)], start + i * step) for i in range(4 * 891)]  # 8-12 March
    order = list(written)
    order[1500], order[1503] = order[1503], order[1500]  # read out of order (a clock blip)
    order.insert(2001, written[2000])  # written again after a restart
    folder = tmp_path / "archive"
    folder.mkdir()
    day_files(folder, order, gzipped={"2024-03-09"})
    (folder / "2024-03-01.log.gz").write_bytes(b"not gzip: reading this file fails")
    since, until = start + 1100 * step, start + 2400 * step
    expected = written[1100:2401]
    assert {meter_time(t, ZONE).date() for t in expected} == {  # type: ignore[union-attr]
        datetime(2024, 3, 9).date(),
        datetime(2024, 3, 10).date(),
    }

    async with DsmrReaderServer(api_key=KEY) as server:
        out = io.StringIO()
        status = await backfill(
            v1_config(tmp_path, server.url), "home", folder, since=since, until=until, out=out
        )
        assert status == 0, out.getvalue()
        assert [t.encode() for t in server.received] == expected
    assert "in 4 of 6 file(s)" in out.getvalue()  # not 1 March, nor 12 March (one telegram)
    assert "1 written twice (sent once), 0 out of order (skipped)" in out.getvalue()
    assert f"{len(expected)} to send" in out.getvalue()


def test_the_stream_holds_at_most_the_reorder_buffer(tmp_path: Path) -> None:
    """Telegrams are passed on while the file is still being read: after the first one comes
    out, at most REORDER more have been read (memory does not follow the archive)."""
    base = capture()
    start = datetime(2024, 3, 8, tzinfo=ZONE)
    count = REORDER + 500
    path = tmp_path / "2024-03-08.log"
    path.write_bytes(
        b"".join(
            stamped(base[i % len(base)], start + i * timedelta(seconds=1)) for i in range(count)
        )
    )
    stats = StreamStats()
    stream = in_window([Source(path, path.stat().st_size)], ZONE, Window(None, None), stats)
    first = next(stream)
    assert meter_time(first.telegram, ZONE) == start
    assert stats.telegrams <= REORDER + 1 + 400  # plus what one read of the file held
    assert len(list(stream)) == count - 1
    assert stats.telegrams == count


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (302, {"Location": "https://dsmr.example/"}, b"", "redirected to https://dsmr.example/"),
        (200, {"Content-Type": "text/html"}, b"<html>Proxy login</html>", "not DSMR-reader's"),
        (200, {"Content-Type": "application/json"}, b'{"detail": "x"}', "not DSMR-reader's"),
        (200, {"Content-Type": "application/json"}, b"[" * 100_000, "not DSMR-reader's"),
    ],
    ids=["redirect", "html", "other-json", "nested-too-deep"],
)
def test_a_listing_that_is_not_dsmr_readers_is_one_clear_line_not_a_traceback(
    tmp_path: Path, status: int, headers: dict[str, str], body: bytes, expected: str
) -> None:
    """A proxy or a wrong URL in front of DSMR-reader answers the v2 listing with something
    else: the command says what came back, with exit 2, and sends nothing."""
    from aiohttp import web

    posts: list[str] = []

    async def listing(request: web.Request) -> web.Response:
        if request.method == "POST":
            posts.append(request.path)
        return web.Response(status=status, headers=headers, body=body)

    async def run() -> subprocess.CompletedProcess[str]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", listing)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        config = write_config(tmp_path, f"http://127.0.0.1:{port}")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dsmr_logger", "backfill", "--config", str(config),
                "--from", str(archive(tmp_path, capture()[:20])), "--sink", "home",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(process.communicate(), 60)
        finally:
            await runner.cleanup()
        assert process.returncode is not None
        return subprocess.CompletedProcess([], process.returncode, out.decode(), err.decode())

    result = asyncio.run(run())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert posts == []


async def test_backfill_dead_letters_poison_but_never_a_good_telegram_of_a_flapping_server(
    tmp_path: Path,
) -> None:
    """The daemon's poison rule in backfill too: two telegrams DSMR-reader chokes on (its HTML
    500 page every time) are dead-lettered, while a server failing 30 % of all requests at
    random (the same HTML page) gets every good telegram, in order. The old rule (three 500s,
    dead-letter) dead-lettered good telegrams of a flapping server."""
    telegrams = capture()[:60]
    poison = {meter_time(t, ZONE) for t in telegrams[20:22]}
    async with DsmrReaderServer(
        api_key=KEY,
        mode="flapping",
        flap_rate=0.3,
        flap_seed="backfill-poison",
        poison=lambda text: meter_time(text.encode(), ZONE) in poison,
    ) as server:
        config = from_mapping(
            {
                "meter": {"port": "/dev/null"},
                "spool": {"path": str(tmp_path / "spool.sqlite3")},
                "sink": [{"name": "home", "url": server.url, "api_key": KEY, "retry_max": 0.05}],
            }
        )
        out = io.StringIO()
        status = await backfill(
            config, "home", archive(tmp_path, telegrams), since=None, until=None, out=out
        )
        flapped = sum(1 for answer in server.answers if answer.reason == "flapping")
    assert flapped > 10, "the server did flap"
    assert status == 1  # dead letters, listed by `spool list`
    assert [t.encode() for t in server.received] == telegrams[:20] + telegrams[22:]
    assert "58 stored" in out.getvalue() and "2 dead-lettered" in out.getvalue()
