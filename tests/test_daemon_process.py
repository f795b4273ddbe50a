"""The daemon as a real process: a simulated meter on a pty, a DSMR-reader server, real signals.

Every process here is a child of the test: ``python -m dsmr_logger run --config ...`` (the daemon),
``python -m dsmr_logger simulate ...`` (the meter, on a pseudo-terminal reached through a symlink)
and ``tests/dsmr_reader_server.py`` (the server, driven over its control port). Each daemon run
logs JSON to its own file; at ``log.level = "debug"`` it logs a ``telegram`` event for every frame
it read (with the meter's own timestamp), which tells exactly which telegrams a run took off the
port. The 566-frame capture has 566 distinct meter timestamps, so a timestamp names a telegram.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cli_process
import pytest
from conftest import CORPUS, REPO_ROOT, require_corpus
from dsmr_reader_server import DsmrReaderProcess, DsmrReaderServer

from dsmr_logger.delivery.queue import ACK_BATCH
from dsmr_logger.delivery.spool import Spool
from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.telegram.build import meter_timestamp, restamp
from dsmr_logger.telegram.capture import frames_in
from dsmr_logger.telegram.glance import glance

CAPTURE = CORPUS / "nielsbasjes-dsmr-tools" / "ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"
API_KEY = "process-test-api-key"
SINK = "dsmr"
STOP_LIMIT = 10.0
"""The lifecycle promise: SIGTERM → exit 0 well within this many seconds."""
FILLERS = 64
"""Telegrams played before the capture in test 1, more than the pty buffers (~23)."""


# --- helpers ------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            more = f"\n{detail()}" if detail is not None else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}{more}")
        time.sleep(interval)


def log_tail(log: Path, lines: int = 8) -> str:
    """What a run did, for a failure message: its telegram count and last non-telegram lines."""
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    other = [line[:300] for line in text if '"event": "telegram"' not in line]
    return f"{log.name}: {len(text) - len(other)} telegrams read; last lines:\n" + "\n".join(
        other[-lines:]
    )


def capture_telegrams() -> list[bytes]:
    """The capture's frames as the daemon must deliver them (CRC canonicalised, Frame.telegram)."""
    data = require_corpus() and CAPTURE.read_bytes()
    frames = FrameAssembler().feed(data, 0.0)
    assert [f.raw for f in frames] == frames_in(data)
    return [f.telegram for f in frames]


def stamp(telegram: bytes | str) -> str:
    """The meter's timestamp (``0-0:1.0.0``): unique per telegram of the capture."""
    data = telegram.encode() if isinstance(telegram, str) else telegram
    return glance(data).values["meter_timestamp"]


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON events of one daemon run (a line that is not JSON, e.g. a traceback, is skipped)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def reads(path: Path) -> list[tuple[str, float]]:
    """(meter timestamp, Unix time of the log line) of every telegram this run read, in order."""
    return [
        (e["meter_timestamp"], datetime.fromisoformat(e["timestamp"]).timestamp())
        for e in log_events(path)
        if e.get("event") == "telegram"
    ]


def has_event(path: Path, name: str) -> bool:
    return any(e.get("event") == name for e in log_events(path))


def pending_in_spool(spool: Path, sink: str = SINK) -> list[bytes]:
    """The telegrams waiting for ``sink`` in a spool (no daemon running), oldest first."""
    if not spool.exists():
        return []
    store = Spool(spool, max_bytes=1 << 40)
    store.open(shared=True)
    try:
        return [t.telegram for t in store.page(sink, 0, 2**62, 10**7)]
    finally:
        store.close()


def spool_counter(spool: Path, name: str, sink: str = SINK) -> int:
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT value FROM counters WHERE sink = ? AND name = ?", (sink, name)
        ).fetchone()
    finally:
        db.close()
    return row[0] if row else 0


def dead_letters_in_spool(spool: Path) -> list[bytes]:
    if not spool.exists():
        return []
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT data FROM dead_letters ORDER BY id").fetchall()
    finally:
        db.close()
    return [bytes(data) for (data,) in rows]


def write_config(
    tmp_path: Path,
    server_url: str,
    *,
    archive: Path | None = None,
    level: str = "info",
    spool: dict[str, Any] | None = None,
    sink: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
) -> Path:
    """A configuration for one run: ``spool``, ``sink`` and ``http`` override keys."""
    settings = {"flush_interval": 0.2, **(spool or {})}
    sink_settings = {"timeout": 0.5, "retry_initial": 0.02, "retry_max": 0.2, **(sink or {})}
    lines = [
        "[meter]",
        f'port = "{tmp_path / "meter"}"',
        "idle_timeout = 1",
        "reconnect_initial = 0.05",
        "reconnect_max = 0.2",
        "",
        "[spool]",
        f'path = "{tmp_path / "spool.sqlite3"}"',
        *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
        "",
        "[[sink]]",
        f'name = "{SINK}"',
        'type = "dsmr-reader"',
        f'url = "{server_url}"',
        f'api_key = "{API_KEY}"',
        *(f"{key} = {json.dumps(value)}" for key, value in sink_settings.items()),
        "",
    ]
    if http is not None:
        lines += ["[http]", *(f"{key} = {json.dumps(value)}" for key, value in http.items()), ""]
    if archive is not None:
        lines += ["[[sink]]", 'name = "archive"', 'type = "archive"', f'directory = "{archive}"']
        lines.append("")
    lines += ["[log]", f'level = "{level}"', 'format = "json"', ""]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines))
    return path


class Processes:
    """Every child process a test starts; whatever still runs at teardown is killed."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.children: list[subprocess.Popen[Any]] = []
        self.runs = 0

    def spawn(self, command: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, **kwargs)
        self.children.append(process)
        return process

    def daemon(
        self,
        config: Path | None,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        prefix: list[str] | None = None,
    ) -> tuple[subprocess.Popen[Any], Path]:
        """Start ``dsmr-logger run``; returns the process and the file its stderr goes to."""
        self.runs += 1
        log = self.tmp_path / f"daemon-{self.runs}.log"
        command = [*(prefix or []), sys.executable, "-m", "dsmr_logger", "run"]
        if config is not None:
            command += ["--config", str(config)]
        if env is None:
            env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        with log.open("ab") as stderr:
            process = self.spawn(
                command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=cwd or REPO_ROOT
            )
        return process, log

    def meter(
        self, *, interval: float, count: int, capture: Path = CAPTURE
    ) -> subprocess.Popen[Any]:
        """``dsmr-logger simulate`` playing a capture as recorded; waits for its link."""
        link = self.tmp_path / "meter"
        command = [sys.executable, "-m", "dsmr_logger", "simulate", "--capture", str(capture)]
        command += ["--interval", str(interval), "--link", str(link), "--count", str(count)]
        command += ["--as-recorded"]
        process = self.spawn(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO_ROOT
        )
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10.0)
        assert ready, "the simulator printed no port path within 10 s"
        first = process.stdout.readline().decode().strip()
        assert first.startswith("/dev/"), first
        wait_until(link.is_symlink, 5.0, "the simulator's link")
        assert os.readlink(link) == first
        return process

    def endless_meter(self, *, interval: float, count: int = 4000) -> subprocess.Popen[Any]:
        """A meter playing ``count`` distinct telegrams, far more than a test waits for: the test
        stops it (``stop_meter``) once what it waits on happened. Opening the port discards what
        waited in it, so a short meter races the daemon's (re)open; this one cannot."""
        played = unique_capture(self.tmp_path / "endless.log", count)
        return self.meter(interval=interval, count=count, capture=played)

    def close(self) -> None:
        for process in self.children:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            if process.stdout is not None:
                process.stdout.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture
def server() -> Iterator[DsmrReaderProcess]:
    require_corpus()
    with DsmrReaderProcess(API_KEY) as process:
        yield process


def received_count(server: DsmrReaderProcess) -> int:
    return server.state()["received"]


def wait_until_quiet(server: DsmrReaderProcess, quiet: float, timeout: float) -> int:
    """Wait until the server has stored nothing new for ``quiet`` seconds; returns the count."""
    deadline = time.monotonic() + timeout
    count, since = received_count(server), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            pytest.fail(f"the server was still receiving after {timeout} s")
        time.sleep(0.05)
        now = received_count(server)
        if now != count:
            count, since = now, time.monotonic()
    return count


def terminate(process: subprocess.Popen[Any], limit: float = STOP_LIMIT) -> tuple[int, float]:
    """SIGTERM; returns (exit status, seconds until it exited)."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(timeout=limit + 5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the daemon did not exit within {limit + 5} s of SIGTERM")
    return status, time.monotonic() - started


def started(log: Path) -> bool:
    return has_event(log, "started")


def stop_meter(meter: subprocess.Popen[Any]) -> None:
    """SIGTERM to a simulated meter that was still playing: it stops between telegrams."""
    assert meter.poll() is None, "the meter ran out before the test's condition was met"
    meter.terminate()
    assert meter.wait(timeout=10) == 0


# --- 1. the whole capture, byte for byte ---------------------------------------------------------


def test_capture_arrives_complete_in_order_and_byte_identical(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """All 566 frames at full speed, to DSMR-reader and to an archive in the same run.

    The port is flushed when the daemon opens it (serialx does TCIOFLUSH), so whatever the
    simulator wrote before that is gone, as with a real meter. The simulator starts writing at
    once, so the capture is preceded by FILLERS telegrams (the first frame, dated 2001) that
    absorb that flush; every one of the 566 must then arrive.
    """
    expected = capture_telegrams()
    assert len(expected) == 566
    fillers = [restamp(expected[0], b"0101010000%02dW" % i) for i in range(FILLERS)]
    played = tmp_path / "capture.log"
    played.write_bytes(b"".join(fillers) + CAPTURE.read_bytes())
    archive = tmp_path / "archive"
    config = write_config(tmp_path, server.url, archive=archive, level="debug")
    daemon, log = procs.daemon(config)
    wait_until(lambda: started(log), 10.0, "the daemon to start")
    meter = procs.meter(interval=0, count=FILLERS + 566, capture=played)

    assert meter.wait(timeout=20) == 0
    last = stamp(expected[-1])
    why = lambda: log_tail(log)  # noqa: E731
    wait_until(lambda: [s for s, _ in reads(log)[-1:]] == [last], 10.0, "the end", detail=why)
    wait_until(lambda: received_count(server) >= len(reads(log)), 20.0, "every read", detail=why)
    status, _ = terminate(daemon)  # the archive writes what it buffers at close
    assert status == 0

    received = [t.encode() for t in server.received()]
    head, tail = received[:-566], received[-566:]
    print(f"{len(head)} of {FILLERS} fillers and {len(tail)} capture telegrams delivered")
    assert tail == expected
    assert head == fillers[len(fillers) - len(head) :], "fillers only, in order, before them"
    day_files = sorted(archive.glob("*.log"))
    assert day_files, "the archive sink wrote no day file"
    archived = b"".join(path.read_bytes() for path in day_files)
    assert archived == b"".join(received)
    assert frames_in(archived)[-566:] == expected
    assert pending_in_spool(tmp_path / "spool.sqlite3") == []


# --- 2. SIGTERM with a backlog, then a restart ---------------------------------------------------


def test_sigterm_spools_backlog_and_restart_delivers_it_first(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    spool = tmp_path / "spool.sqlite3"
    server.control(mode="refuse")
    config = write_config(tmp_path, server.url, level="debug")
    meter = procs.endless_meter(interval=0.02)  # across the restart, however long it takes
    first, first_log = procs.daemon(config)
    wait_until(lambda: len(reads(first_log)) >= 20, 10.0, "20 telegrams read by the first run")

    status, took = terminate(first)
    assert status == 0
    assert took < STOP_LIMIT
    print(f"SIGTERM with a refusing sink: exit {status} after {took:.2f} s")
    first_read = [s for s, _ in reads(first_log)]
    assert has_event(first_log, "stopped")
    assert received_count(server) == 0
    backlog = pending_in_spool(spool)
    assert [stamp(t) for t in backlog] == first_read, "undelivered telegrams not all in the spool"

    server.control(mode="ok")
    second, second_log = procs.daemon(config)

    def second_read() -> list[str]:
        return [s for s, _ in reads(second_log)]

    wait_until(lambda: len(second_read()) >= 20, 20.0, "20 telegrams read by the second run")
    stop_meter(meter)

    wait_until(
        lambda: received_count(server) >= len(first_read) + len(second_read()),
        15.0,
        "backlog and new telegrams at the server",
    )
    status, _ = terminate(second)
    assert status == 0

    delivered = [stamp(t) for t in server.received()]
    assert len(second_read()) > 0
    assert delivered == first_read + second_read(), "not backlog first, oldest first, then new"
    assert len(set(delivered)) == len(delivered), "a telegram was delivered twice"
    assert pending_in_spool(spool) == []


# --- 3. SIGKILL at random moments against a flapping sink ----------------------------------------


class Flapper:
    """Toggles the server between ok and a failure mode every ``period`` seconds (a thread)."""

    def __init__(self, server: DsmrReaderProcess, period: float = 0.3) -> None:
        self.server = server
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.toggles = 0

    def _run(self) -> None:
        failures = ("refuse", "html500")
        while not self._stop.wait(self.period):
            mode = "ok" if self.toggles % 2 else failures[(self.toggles // 2) % 2]
            self.server.control(mode=mode)
            self.toggles += 1

    def __enter__(self) -> Flapper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.control(mode="ok")


KILLS = 6
INTERVAL = 0.015
METER_FRAMES = 4000
"""A minute of telegrams at INTERVAL: far more than six runs take, even on a loaded machine."""


def unique_capture(path: Path, count: int) -> Path:
    """``count`` telegrams of the capture, cycled, each with its own meter timestamp."""
    telegrams = capture_telegrams()
    start = datetime(2019, 3, 24, 12, 0, 0)
    path.write_bytes(
        b"".join(
            restamp(telegrams[i % len(telegrams)], meter_timestamp(start + timedelta(seconds=i)))
            for i in range(count)
        )
    )
    return path


STRICT_WINDOW = 0.25
"""Strict durability: a bound on reading a telegram → its commit (measured: < 5 ms, idle CPU)."""


@pytest.mark.parametrize(
    ("durability", "flush_interval"), [("strict", 0.2), ("batched", 0.5)], ids=str
)
def test_sigkill_at_random_moments_against_a_flapping_sink(
    tmp_path: Path,
    procs: Processes,
    server: DsmrReaderProcess,
    durability: str,
    flush_interval: float,
) -> None:
    rng = random.Random(f"sigkill-{durability}")
    spool = tmp_path / "spool.sqlite3"
    config = write_config(
        tmp_path,
        server.url,
        level="debug",
        spool={"durability": durability, "flush_interval": flush_interval},
    )
    runs: list[Path] = []
    kill_times: list[float] = []
    # A meter that outlasts the kills however slowly daemons start, stopped once the last run
    # reads: what the runs read is what counts, not what the meter wrote.
    played = unique_capture(tmp_path / "capture.log", METER_FRAMES)
    with Flapper(server):
        meter = procs.meter(interval=INTERVAL, count=METER_FRAMES, capture=played)
        for _ in range(KILLS):
            daemon, log = procs.daemon(config)
            runs.append(log)
            wait_until(lambda log=log: reads(log), 10.0, "a run to read a telegram")
            time.sleep(rng.uniform(0.1, 0.8))
            kill_times.append(time.time())
            daemon.kill()
            daemon.wait(timeout=5)
        daemon, log = procs.daemon(config)
        runs.append(log)
        wait_until(lambda: len(reads(log)) >= 20, 10.0, "the last run to read")
        assert meter.poll() is None, "the meter ran out before the last run: raise METER_FRAMES"
        meter.terminate()
        assert meter.wait(timeout=10) == 0
    read_by_run = [reads(path) for path in runs]
    read = {s for run in read_by_run for s, _ in run}
    wait_until_quiet(server, 1.0, 20.0)
    status, _ = terminate(daemon)
    assert status == 0
    stopped = [e for e in log_events(runs[-1]) if e.get("event") == "stopped"]
    assert stopped and stopped[0]["undelivered"] == {SINK: 0}, stopped

    delivered = collections.Counter(stamp(t) for t in server.received())
    # Each telegram's first arrival, in arrival order: the meter's timestamps (one second apart,
    # YYMMDDhhmmss) must come in reading order. A resend after a kill may repeat one, later.
    firsts = list(dict.fromkeys(stamp(t) for t in server.received()))
    out_of_order = sum(1 for a, b in itertools.pairwise(firsts) if b < a)
    dead = {stamp(t) for t in dead_letters_in_spool(spool)}
    duplicates = sum(n - 1 for n in delivered.values())
    missing = read - set(delivered) - dead
    assert all(len(run) > 0 for run in read_by_run[:KILLS]), "a kill landed before any read"
    assert set(delivered) <= read, "delivered a telegram no run read"
    assert pending_in_spool(spool) == [], "the spool is not empty at the end"
    # For each missing telegram: the run that read it, and how long before its kill it was read.
    lost = [
        (run, kill_times[run] - at if run < KILLS else None)
        for run, s, at in ((run, s, at) for run, r in enumerate(read_by_run) for s, at in r)
        if s in missing
    ]
    ages = [age for _, age in lost]
    print(
        f"{durability}: {len(read)} read in {len(runs)} runs, {KILLS} kills, "
        f"{sum(delivered.values())} deliveries, {duplicates} duplicates, {len(missing)} lost "
        f"(read {[a if a is None else round(a, 3) for a in ages]} s before a kill), "
        f"{len(dead)} dead-lettered, {out_of_order} out-of-order pairs"
    )
    assert out_of_order == 0, "stored out of reading order"
    assert not dead, "a flapping server is not a poison telegram (see test_recovery_between_...)"
    assert None not in ages, "lost a telegram in the run that was not killed"
    if durability == "strict":
        # Committed before sending, each ack committed before the next send: at most the one
        # request in flight is sent twice per kill. Reading the port is destructive, so a telegram
        # read in the instant before a kill, before its commit (a few ms), is the only loss.
        assert duplicates <= KILLS
        assert all(age <= STRICT_WINDOW for age in ages), ages
    else:
        # At most what was read within the flush window before each kill; the flusher runs every
        # flush_interval / 2, so a telegram can wait up to 1.5 x flush_interval for its commit.
        assert all(age <= 1.5 * flush_interval + 0.25 for age in ages), ages
        assert duplicates <= KILLS * ACK_BATCH


class RecoveringServer(DsmrReaderServer):
    """Answers HTML 500 (a database outage) until ``outage`` seconds after the first request,
    then recovers right after answering one more 500 to that first telegram."""

    def __init__(self, outage: float) -> None:
        super().__init__(API_KEY, mode="html500")
        self.outage = outage
        self.first: str | None = None
        self.first_at = 0.0

    def _decide(self, auth: str | None, telegram: str | None) -> tuple[int, str, str]:
        answer = super()._decide(auth, telegram)
        if self.first is None:
            self.first, self.first_at = telegram, time.monotonic()
        elif (
            self.mode == "html500"
            and telegram == self.first
            and time.monotonic() - self.first_at >= self.outage
        ):
            self.mode = "ok"
        return answer


@contextlib.contextmanager
def in_a_thread(server: DsmrReaderServer) -> Iterator[DsmrReaderServer]:
    """Serve from a background thread's event loop (the test itself is synchronous)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10), "the in-test server did not start"
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def test_recovery_between_a_500_and_the_probe_dead_letters_nothing(
    tmp_path: Path, procs: Processes
) -> None:
    """An outage (HTML 500) that ends between the head's last 500 and the probe behind it.

    The worker must not take the head for poison: the server just recovered. (At commit b329e19
    worker.py dead-lettered the head as soon as the probe was stored.) Delivered in order.
    """
    require_corpus()
    with in_a_thread(RecoveringServer(outage=0.6)) as server:
        config = write_config(tmp_path, server.url, level="debug")
        daemon, log = procs.daemon(config)
        wait_until(lambda: started(log), 10.0, "the daemon to start")
        meter = procs.meter(interval=0.02, count=60)
        assert meter.wait(timeout=20) == 0
        wait_until(lambda: len(server.received) >= len(reads(log)) > 0, 20.0, "the deliveries")
        assert terminate(daemon)[0] == 0
        delivered = [stamp(t) for t in server.received]
    read = [s for s, _ in reads(log)]
    assert dead_letters_in_spool(tmp_path / "spool.sqlite3") == []
    assert delivered == read


def requeued_rows(spool: Path) -> int:
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM requeued").fetchone()[0])
    finally:
        db.close()


def test_requeued_dead_letters_survive_a_sigkill_right_after_the_daemon_took_them(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """``spool requeue`` beside a running daemon, then SIGKILL just after the daemon took them
    back (its log line): they were only in its memory then, for up to 1.5 x flush_interval, yet
    gone from the spool. All 10 of 10 requeued telegrams were lost that way, counted nowhere.
    A requeued telegram leaves ``requeued`` only once it is spooled again (or delivered)."""
    server.control(poison_substring="1-0:1.8.1", poison_answer="parse_failure")  # refuse all
    spool = tmp_path / "spool.sqlite3"
    config = write_config(tmp_path, server.url, level="debug", spool={"flush_interval": 2.0})
    daemon, log = procs.daemon(config)
    wait_until(lambda: started(log), 10.0, "the daemon to start")
    meter = procs.endless_meter(interval=0.05)
    wait_until(lambda: len(dead_letters_in_spool(spool)) >= 5, 20.0, "dead letters")
    stop_meter(meter)
    wait_until(
        lambda: len(dead_letters_in_spool(spool)) == len(reads(log)), 10.0, "all dead-lettered"
    )
    letters = dead_letters_in_spool(spool)
    server.control(mode="refuse")  # they stay in memory once taken back
    requeued = cli_process.dsmr_logger("spool", "requeue", "--config", config)
    assert requeued.returncode == 0, requeued.stderr
    taken = "requeued telegrams queued again"
    wait_until(lambda: has_event(log, taken), 20.0, "the daemon to take them", interval=0.005)
    daemon.kill()
    daemon.wait(timeout=5)
    kept = pending_in_spool(spool) + dead_letters_in_spool(spool)
    assert requeued_rows(spool) + len(kept) >= len(letters), "requeued telegrams lost"

    server.control(mode="ok", poison_substring="not in any telegram")
    again, _ = procs.daemon(config)
    wait_until(lambda: received_count(server) >= len(letters), 20.0, "the requeued telegrams")
    status, _ = terminate(again)
    assert status == 0
    assert sorted(stamp(t) for t in set(server.received())) == sorted(stamp(t) for t in letters)


# --- 4. a full spool -----------------------------------------------------------------------------

SPOOL_CAP = 65536
MOST = SPOOL_CAP // 778
"""Telegrams of the capture (778 bytes each) that fit in the smallest spool, at most."""
CAPACITY = int(0.85 * MOST)
"""...and at least: record headers and dropping whole segments cost a full spool under 15 %."""


def fill_the_spool(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> tuple[Path, subprocess.Popen[Any], Path, list[str]]:
    """A refusing sink, a 64 KiB spool and ~140 telegrams: the run, its log and what it read."""
    server.control(mode="refuse")
    config = write_config(tmp_path, server.url, level="debug", spool={"max_bytes": SPOOL_CAP})
    daemon, log = procs.daemon(config)
    wait_until(lambda: started(log), 10.0, "the daemon to start")
    meter = procs.meter(interval=0.01, count=140)  # 140 x 778 B = 109 kB
    assert meter.wait(timeout=15) == 0
    wait_until(lambda: has_event(log, "spool full: dropped oldest telegrams"), 5.0, "spool full")
    assert daemon.poll() is None, "the daemon stopped when the spool filled up"
    read = [s for s, _ in reads(log)]
    assert len(read) > CAPACITY + 20, len(read)  # the first few went in the port's open flush
    return config, daemon, log, read


def sink_back_then_stop(server: DsmrReaderProcess, daemon: subprocess.Popen[Any], log: Path) -> int:
    """The server answers again: wait until the daemon has delivered what it kept, then SIGTERM."""
    server.control(mode="ok")
    why = lambda: f"server: {server.state()}\n{log_tail(log, 20)}"  # noqa: E731
    wait_until(lambda: received_count(server) >= CAPACITY, 10.0, "the newest telegrams", detail=why)
    wait_until_quiet(server, 0.5, 10.0)
    status, _ = terminate(daemon)
    return status


def counted_as_dropped(log: Path) -> int:
    return sum(e["dropped"] for e in log_events(log) if e.get("event", "").startswith("spool full"))


def test_spool_full_keeps_running_and_delivers_the_newest_in_order(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    _, daemon, log, read = fill_the_spool(tmp_path, procs, server)
    assert sink_back_then_stop(server, daemon, log) == 0
    delivered = [stamp(t) for t in server.received()]
    dropped = spool_counter(tmp_path / "spool.sqlite3", "dropped")
    print(
        f"spool full, sink back while running: {len(read)} read, "
        f"{dropped} counted as dropped, {len(delivered)} delivered"
    )
    # Oldest first and never twice; every telegram read either delivered or counted as dropped;
    # the newest all there. (Older ones may arrive too: the sink drains the oldest while the
    # cap still drops behind it.)
    positions = [read.index(s) for s in delivered]
    assert positions == sorted(set(positions)), "out of order or twice"
    assert len(delivered) + dropped == len(read), "a telegram neither delivered nor counted"
    assert positions[-1] == len(read) - 1, "the newest did not arrive"
    assert positions[-(CAPACITY - 2) :] == list(range(len(read) - CAPACITY + 2, len(read)))


def test_spool_full_then_restart_delivers_the_newest_that_fit(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    config, daemon, _, read = fill_the_spool(tmp_path, procs, server)
    status, _ = terminate(daemon)
    assert status == 0
    spooled = [stamp(t) for t in pending_in_spool(tmp_path / "spool.sqlite3")]
    # The newest that fit, plus possibly the head of the queue and the telegram behind it: they
    # may be on their way to the server, so the cap spares them (every telegram counted as
    # dropped is really lost).
    newest = [s for s in spooled if s not in read[:2]]
    assert CAPACITY - 2 <= len(newest) <= MOST
    assert newest == read[-len(newest) :], "the spool kept other than the newest"
    # The spool's own counter; the log can miss the last warning (a flush cancelled at shutdown).
    assert spool_counter(tmp_path / "spool.sqlite3", "dropped") == len(read) - len(spooled)

    server.control(mode="ok")
    second, _ = procs.daemon(config)
    wait_until(lambda: received_count(server) >= len(spooled), 10.0, "the spooled telegrams")
    wait_until_quiet(server, 0.3, 5.0)
    status, _ = terminate(second)
    assert status == 0
    assert [stamp(t) for t in server.received()] == spooled


def test_spool_full_counts_as_dropped_only_what_is_lost(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    _, daemon, log, read = fill_the_spool(tmp_path, procs, server)
    assert sink_back_then_stop(server, daemon, log) == 0
    lost = len(read) - received_count(server)
    assert counted_as_dropped(log) == lost
    assert spool_counter(tmp_path / "spool.sqlite3", "dropped") == lost


# --- 5. the remote datalogger's environment instead of a TOML file -------------------------------


def test_environment_configuration_delivers(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """``run`` without --config reads DSMRREADER_REMOTE_DATALOGGER_* (and ./.env).

    DSMR_LOGGER_SPOOL puts the spool where the old script's user may write (here tmp_path).
    """
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSMRREADER_")}
    env["HOME"] = str(home)
    (home / ".env").write_text(
        f"DSMRREADER_REMOTE_DATALOGGER_API_KEYS={API_KEY}\nDSMRREADER_REMOTE_DATALOGGER_SLEEP=0\n"
    )
    env.update(
        {
            "DSMRREADER_REMOTE_DATALOGGER_INPUT_METHOD": "serial",
            "DSMRREADER_REMOTE_DATALOGGER_SERIAL_PORT": str(tmp_path / "meter"),
            "DSMRREADER_REMOTE_DATALOGGER_API_HOSTS": server.url,
            "DSMR_LOGGER_SPOOL": str(tmp_path / "state" / "spool.sqlite3"),
        }
    )
    # Meter first: the daemon's first open finds the port (its reconnect delay is 1 s here).
    meter = procs.endless_meter(interval=0.02)
    daemon, log = procs.daemon(None, env=env, cwd=home)
    wait_until(lambda: received_count(server) >= 50, 30.0, "50 deliveries")
    stop_meter(meter)
    wait_until_quiet(server, 1.0, 10.0)
    status, _ = terminate(daemon)
    assert status == 0, log.read_text()
    text = log.read_text()
    assert "configured from the remote datalogger's environment variables" in text
    assert (tmp_path / "state" / "spool.sqlite3").exists()
    # The port is flushed when the daemon opens it: what the meter sent before is not read.
    # From there on, every telegram, in order.
    endless = (tmp_path / "endless.log").read_bytes()
    played = [stamp(f.telegram) for f in FrameAssembler().feed(endless, 0.0)]
    delivered = [stamp(t) for t in server.received()]
    assert len(delivered) >= 50, text
    start = played.index(delivered[0])
    assert delivered == played[start : start + len(delivered)]


# --- 6. what the Pi pays for -------------------------------------------------------------------


def test_a_plain_meter_and_v1_sink_load_no_http_or_crypto_library(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """Unencrypted meter, no status endpoint: cryptography, aiohttp and prometheus_client (about
    20 MiB of RAM between them) stay out of the process, yet every telegram is delivered."""
    config = write_config(tmp_path, server.url)
    daemon, log = procs.daemon(config)
    wait_until(lambda: started(log), 10.0, "the daemon to start")
    meter = procs.endless_meter(interval=0.01)
    wait_until(lambda: received_count(server) >= 10, 20.0, "deliveries")
    stop_meter(meter)
    maps = Path(f"/proc/{daemon.pid}/maps").read_text()
    loaded = {lib for lib in ("cryptography", "aiohttp", "multidict", "yarl") if lib in maps}
    status, _ = terminate(daemon)
    assert status == 0
    assert not loaded, f"loaded without need: {sorted(loaded)}"


def test_a_second_daemon_on_the_same_spool_refuses_to_start(
    tmp_path: Path, procs: Processes, server: DsmrReaderProcess
) -> None:
    """Two daemons appending to one spool would interleave telegrams: the second says why and
    exits 1, and the first goes on delivering.

    (It once failed on a quiet machine: the meter played 20 telegrams in 0.2 s, and the first
    daemon, retrying the absent port every 0.1-0.2 s by then, opened it somewhere in those 0.2 s,
    discarding what waited: it read 9 to 20 of them, and none when the open came after the
    meter's end. The meter now plays until the deliveries are seen.)"""
    config = write_config(tmp_path, server.url)
    first, log = procs.daemon(config)
    wait_until(lambda: started(log), 10.0, "the first daemon to start")
    second, second_log = procs.daemon(config)
    assert second.wait(timeout=20) == 1
    assert "in use by another dsmr-logger daemon (stop it first)" in second_log.read_text()
    meter = procs.endless_meter(interval=0.01)
    wait_until(lambda: received_count(server) >= 5, 20.0, "deliveries by the first daemon")
    stop_meter(meter)
    status, _ = terminate(first)
    assert status == 0
