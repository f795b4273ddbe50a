"""Shared plumbing for the issue-7 budget benchmarks (``bench/*.py``); not a benchmark itself.

Why one module: every budget is measured on the daemon as a *real process*
(``python -m dsmr_logger run --config ...``), fed by ``dsmr-logger simulate`` on a pty and
delivering to ``tests/dsmr_reader_server.py`` (the DSMR-reader v1 test server) run as a process.
Starting, watching and stopping those three the same way in every script keeps the figures
comparable. Everything listens on 127.0.0.1, every wait has a deadline, and every child process is
stopped (by its own pid) when the ``Children`` context exits.

What is read from the kernel, and how precisely:

- CPU: the process CPU clock of another pid (``clock_gettime`` on ``MAKE_PROCESS_CPUCLOCK``),
  nanosecond resolution and including threads that have exited; ``/proc/<pid>/stat``
  utime+stime is read too, but it ticks in 10 ms steps, too coarse for 60 telegrams.
- Memory: ``VmRSS`` and ``VmHWM`` (peak RSS) from ``/proc/<pid>/status``.
- Disk: ``write_bytes`` from ``/proc/<pid>/io``. Linux charges it when a page-cache folio is first
  dirtied (not at writeback), to the task that dirtied it, in whole folios; a folio dirtied again
  before it is written back is not charged twice. Filesystem journal writes (jbd2) are charged to
  nobody. On tmpfs it stays 0, so the spool must be on a real disk (``real_disk_dir``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
API_KEY = "bench-api-key"
SINK = "dsmr"
TELEGRAM_SIZE = 778
"""Bytes of every telegram of the bundled DSMR 5 capture (Iskra AM550), restamped or not."""
DAY_START = datetime(2026, 1, 15).astimezone()
"""Meter time of the first spooled telegram: a winter day, so no DST step makes two equal."""

sys.path.insert(0, str(REPO_ROOT / "tests"))
from dsmr_reader_server import DsmrReaderProcess  # noqa: E402

from dsmr_logger.delivery.segments import SUFFIX  # noqa: E402
from dsmr_logger.delivery.spool import Spool, StoredTelegram, telegram_dir  # noqa: E402
from dsmr_logger.telegram.build import meter_timestamp, restamp  # noqa: E402
from dsmr_logger.telegram.capture import default_capture, frames_in  # noqa: E402

# --- reading another process ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads, dead ones included) of ``pid``, in seconds."""
    return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime from ``/proc/<pid>/stat`` (10 ms ticks on this kernel)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (peak RSS) and the rest of ``/proc/<pid>/status``'s Vm lines, kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith(("Vm", "Rss")):
            values[key] = int(rest.split()[0])
    return values


def io_counters(pid: int) -> dict[str, int]:
    """``/proc/<pid>/io``: rchar, wchar, syscr, syscw, read_bytes, write_bytes, ..."""
    text = Path(f"/proc/{pid}/io").read_text()
    return {
        key: int(value)
        for key, _, value in (line.partition(": ") for line in text.split("\n"))
        if value
    }


def fs_type(path: Path) -> str:
    """The filesystem type of the mount ``path`` is on (longest mount-point prefix wins)."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best
        ):
            best, kind = mount, fstype
    return kind


_MADE: list[Path] = []


def real_disk_dir(prefix: str) -> Path:
    """A fresh directory on a block-device filesystem (``/var/tmp``), never on tmpfs.

    Removed when the benchmark exits unless ``DSMR_BENCH_KEEP=1``.
    """
    for base in (Path("/var/tmp"), REPO_ROOT / "bench"):
        if base.is_dir() and fs_type(base) not in ("tmpfs", "ramfs", "overlay", "?"):
            made = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
            if not _MADE:
                atexit.register(_remove_made)
            _MADE.append(made)
            return made
    raise SystemExit("no directory on a real disk found (/var/tmp is tmpfs?)")


def _remove_made() -> None:
    if os.environ.get("DSMR_BENCH_KEEP") != "1":
        for path in _MADE:
            shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until truthy; raise ``TimeoutError`` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- telegrams ---------------------------------------------------------------------------------


def templates() -> list[bytes]:
    """The ten 778-byte telegrams of the bundled capture."""
    frames = frames_in(default_capture())
    assert all(len(f) == TELEGRAM_SIZE for f in frames)
    return frames


def day_telegrams(count: int, start: datetime = DAY_START, step: float = 1.0) -> Iterator[bytes]:
    """``count`` realistic telegrams, meter times ``step`` s apart, valid CRCs, all distinct."""
    frames = templates()
    for i in range(count):
        when = start + timedelta(seconds=i * step)
        yield restamp(frames[i % len(frames)], meter_timestamp(when))


def build_spool(path: Path, count: int, *, sink: str = SINK, batch: int = 2000) -> float:
    """Spool ``count`` day telegrams for ``sink`` with ``Spool.commit``; returns seconds taken."""
    started = time.monotonic()
    spool = Spool(path, max_bytes=1 << 40)
    spool.open()
    try:
        chunk: list[tuple[StoredTelegram, list[str]]] = []
        received = DAY_START.timestamp()
        for seq, telegram in enumerate(day_telegrams(count), start=1):
            chunk.append((StoredTelegram(seq, telegram, received + seq), [sink]))
            if len(chunk) >= batch:
                spool.commit(chunk)
                chunk = []
        if chunk:
            spool.commit(chunk)
    finally:
        spool.close()
    return time.monotonic() - started


def spool_files(path: Path) -> list[Path]:
    """Every file of a spool: SQLite (with its WAL) and the telegrams' segment files."""
    files = [p for p in path.parent.glob(path.name + "*") if p.is_file()]
    return files + sorted(telegram_dir(path).glob("*" + SUFFIX))


def spool_size(path: Path) -> int:
    return sum(p.stat().st_size for p in spool_files(path))


def spool_rows(path: Path) -> dict[str, int]:
    """What a spool still holds (daemon stopped): backlog, dead letters, requeued."""
    spool = Spool(path, max_bytes=1 << 40)
    spool.open(shared=True)
    try:
        return {
            "backlog": sum(b.count for b in spool.backlogs().values()),
            "dead_letters": len(spool.dead_letters()),
            "requeued": spool.requeued_count(),
        }
    finally:
        spool.close()


# --- processes ---------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def stop_process(process: subprocess.Popen[Any], timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class Children:
    """Every child a benchmark starts; whatever still runs at exit is stopped by its own pid.

    SIGTERM to the benchmark becomes ``SystemExit`` inside the ``with`` block, so the children
    are stopped then too.
    """

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[Any]] = []
        self.servers: list[Server] = []
        self.daemons: list[Daemon] = []
        signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def add(self, process: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        self.processes.append(process)
        return process

    def server(self, mode: str = "ok") -> Server:
        server = Server(API_KEY, mode=mode)
        self.servers.append(server)
        return server

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.stop(timeout=5.0)
        for process in reversed(self.processes):
            stop_process(process, timeout=5.0)
        for server in self.servers:
            server.close()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class Server(DsmrReaderProcess):
    """The DSMR-reader v1 test server as a process, plus its pid's CPU and a cheap count."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def received_count(self) -> int:
        return int(self.state()["received"])


class NotifySocket:
    """A stand-in for systemd's ``$NOTIFY_SOCKET``: the daemon sends ``READY=1`` to it.

    Like systemd it reads every datagram as it comes (a thread): an unread socket fills its queue
    (``net.unix.max_dgram_qlen``, 10 here) and the daemon's next ``sendto`` then blocks.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"notify-{os.getpid()}-{id(self)}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.path))
        self.messages: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:  # shut down by close()
                return
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def wait_for(self, line: str, timeout: float) -> float:
        """``time.monotonic()`` when a datagram containing ``line`` arrived."""

        def arrived() -> float | None:
            for at, message in list(self.messages):
                if line in message.splitlines():
                    return at
            return None

        try:
            return float(wait_until(arrived, timeout, line, interval=0.002))
        except TimeoutError:
            raise TimeoutError(f"no {line} on the notify socket within {timeout:g} s") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=2.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def write_config(
    directory: Path,
    *,
    meter_port: Path,
    server_url: str | None,
    spool: dict[str, Any] | None = None,
    sink: dict[str, Any] | None = None,
    level: str = "info",
    summary_interval: float = 300.0,
    http_port: int | None = None,
    name: str = "config.toml",
) -> Path:
    """A daemon configuration: one v1 sink (or none: archive), JSON logs to stderr."""
    lines = [
        "[meter]",
        f"port = {json.dumps(str(meter_port))}",
        "reconnect_initial = 0.05",
        "reconnect_max = 1.0",
        "",
        "[spool]",
        f"path = {json.dumps(str(directory / 'spool.sqlite3'))}",
        *(f"{key} = {json.dumps(value)}" for key, value in (spool or {}).items()),
        "",
    ]
    if server_url is not None:
        settings = {"timeout": 5.0, "retry_initial": 0.05, "retry_max": 1.0, **(sink or {})}
        lines += [
            "[[sink]]",
            f'name = "{SINK}"',
            'type = "dsmr-reader"',
            f'url = "{server_url}"',
            f'api_key = "{API_KEY}"',
            *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
            "",
        ]
    lines += [
        "[log]",
        f'level = "{level}"',
        'format = "json"',
        f"summary_interval = {summary_interval}",
        "",
    ]
    if http_port is not None:
        lines += ["[http]", f'listen = "127.0.0.1:{http_port}"', ""]
    path = directory / name
    path.write_text("\n".join(lines))
    return path


class Daemon:
    """``python -m dsmr_logger run --config FILE`` with stderr (its log) collected by a thread.

    The log goes through a pipe, as to journald on a Pi, so log writes are never charged to the
    daemon's ``write_bytes``. ``prefix`` wraps the command (e.g. strace); ``pid`` is then still
    the daemon's own.
    """

    def __init__(
        self,
        children: Children,
        config: Path,
        workdir: Path,
        *,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.notify = NotifySocket(workdir)
        self.lines: list[str] = []
        self.started_at = time.monotonic()
        command = [*prefix, PYTHON, "-m", "dsmr_logger", "run", "--config", str(config)]
        self.process = children.add(
            subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=child_env(NOTIFY_SOCKET=str(self.notify.path), **(env or {})),
                cwd=REPO_ROOT,
            )
        )
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        self.pid = self._daemon_pid() if prefix else self.process.pid
        children.daemons.append(self)

    def _daemon_pid(self) -> int:
        """The daemon under a wrapper: the descendant whose command line is ``... run ...``.

        (strace forks short-lived helpers of its own, so "the first child" is not enough.)
        """

        def find(pid: int) -> int | None:
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    for kid in map(int, (task / "children").read_text().split()):
                        with contextlib.suppress(OSError):
                            argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
                            if b"dsmr_logger" in argv and b"run" in argv:
                                return kid
                        deeper = find(kid)
                        if deeper is not None:
                            return deeper
            return None

        return int(wait_until(lambda: find(self.process.pid), 10.0, "the daemon under its wrapper"))

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def has_event(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events())

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Seconds from spawning the process to its ``READY=1``."""
        try:
            return self.notify.wait_for("READY=1", timeout) - self.started_at
        except TimeoutError:
            tail = "\n".join(self.lines[-20:])
            raise TimeoutError(f"daemon not ready within {timeout:g} s; its log:\n{tail}") from None

    def wait_event(self, name: str, timeout: float) -> None:
        wait_until(lambda: self.has_event(name), timeout, f"the daemon's {name!r} log event")

    def status(self, port: int) -> dict[str, Any]:
        """``GET /status`` of the daemon (only with ``http_port`` in its config)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
            return dict(json.loads(response.read()))

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM to the daemon itself (not to a wrapper, which would detach and leave it)."""
        if self.pid != self.process.pid and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)  # the wrapper ends with the daemon
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        status = stop_process(self.process, timeout)
        self._reader.join(timeout=5.0)
        self.notify.close()
        return status


class Simulator:
    """``dsmr-logger simulate`` on a pty reached through ``link``; waits for the link."""

    def __init__(
        self,
        children: Children,
        link: Path,
        *,
        interval: float,
        count: int,
        capture: Path | None = None,
        as_recorded: bool = False,
    ) -> None:
        command = [PYTHON, "-m", "dsmr_logger", "simulate", "--link", str(link)]
        command += ["--interval", str(interval), "--count", str(count)]
        if capture is not None:
            command += ["--capture", str(capture)]
        if as_recorded:
            command.append("--as-recorded")
        self.process = children.add(
            subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=child_env(),
                cwd=REPO_ROOT,
            )
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline().decode().strip()
        if not first.startswith("/dev/"):
            raise RuntimeError(f"the simulator printed {first!r}, not its pty")
        self.path = first
        wait_until(link.is_symlink, 10.0, "the simulator's link")

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)


# --- reporting ---------------------------------------------------------------------------------


def versions(*dists: str) -> str:
    found = []
    for dist in ("dsmr-logger", "aiohttp", "serialx", "structlog", *dists):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(found)


def machine(*dists: str) -> str:
    """One line: cores, CPU model, kernel, Python, SQLite, package versions, date."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} vCPU ({model}), Linux {platform.release()}, "
        f"CPython {platform.python_version()}, SQLite {sqlite3.sqlite_version}; "
        f"{versions(*dists)}; {datetime.now():%Y-%m-%d}"
    )


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def dump_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2, default=str))
        print(f"raw figures: {path}")


# --- profiling ---------------------------------------------------------------------------------

IDLE_FRAMES = (
    "EpollSelector.select",
    "_worker (concurrent/futures/thread.py:81)",
    "Condition.wait",
)
"""Leaf frames py-spy reports for threads that are really waiting (its idle check misses them)."""


def py_spy_record(pid: int, seconds: float, out: Path, rate: int = 250) -> Path | None:
    """``py-spy record`` (raw collapsed stacks) on ``pid``; None if py-spy is not installed."""
    spy = Path(PYTHON).with_name("py-spy")
    if not spy.exists():
        print("  (py-spy not installed: .venv/bin/pip install py-spy)")
        return None
    command = [str(spy), "record", "-p", str(pid), "-d", str(max(1, round(seconds)))]
    command += ["-r", str(rate), "-f", "raw", "-o", str(out), "--nonblocking"]
    subprocess.run(command, capture_output=True, check=False, timeout=seconds + 30)
    return out if out.exists() else None


def profile_summary(raw: Path, top: int = 15) -> list[tuple[str, float, float]]:
    """(function, self share, inclusive share) of the busy samples, idle waits left out."""
    self_counts: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_short(frame) for frame in stack.split(";")[1:]]
        if not frames or any(frames[-1].startswith(idle) for idle in IDLE_FRAMES):
            continue
        n = int(count)
        busy += n
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    if not busy:
        return []
    ranked = sorted(inclusive, key=lambda f: (-self_counts.get(f, 0), -inclusive[f]))[:top]
    return [(f, self_counts.get(f, 0) / busy, inclusive[f] / busy) for f in ranked]


def _short(frame: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", str(REPO_ROOT) + "/"):
        head, sep, tail = frame.partition(" (")
        if sep and marker in tail:
            return f"{head} ({tail.split(marker, 1)[1]}"
    return frame


def run_client(
    kind: str, url: str, count: int, *, interval: float = 0.0, offset: int = 0
) -> dict[str, float]:
    """A baseline client (``bench/_clients.py``) in its own process; its JSON result."""
    command = [PYTHON, str(REPO_ROOT / "bench" / "_clients.py"), kind, "--url", url]
    command += ["--count", str(count), "--interval", str(interval), "--offset", str(offset)]
    limit = 120.0 + count * (interval + 0.05)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=limit, env=child_env(), check=True
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))
