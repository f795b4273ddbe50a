"""Every command line the README shows is run here, as written, in README order.

A user copies these lines; one that fails, or prints a traceback, is a bug in the README or in
the program. So each shell line of each ``sh`` code block (and each ``$`` line of a ``console``
block) is run with the README's own arguments, in a sandbox that stands in for the machine:

- system paths (``/etc/``, ``/var/``, ``/tmp/``, ``/opt/``) lead into a temporary folder;
  the configuration a command finds without ``--config`` (``/etc/dsmr-logger/config.toml``) is
  named by ``DSMR_LOGGER_CONFIG`` there;
- what the skipped root steps (``sudo ...``) would have left is put in place by the test: the
  source as ``~/dsmr-logger``, ``/opt/dsmr-logger/venv`` (the venv the "Try it" line creates),
  ``/usr/local/bin/dsmr-logger``, ``/etc/dsmr-logger/config.toml`` (the example as
  ``sudoedit`` would leave it: a meter port, an API key, the test's server), and a running
  service on it, with a simulated meter (a pty) and a DSMR-reader (a real HTTP server);
- ``sudo -u dsmr-logger COMMAND`` runs COMMAND as the test's user, who owns the sandbox as the
  service's user owns ``/var/lib/dsmr-logger``.

A command is skipped only if it is in ``SKIPPED`` with the reason, so a new command in the README
is run, or fails here until someone says why it cannot be. Commands that keep running (a
simulator, the daemon, the demo) are in ``LONG_RUNNING`` with what shows they work.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from cloud_fakes import ClimkitFake, RealClock, climkit_series
from conftest import REPO_ROOT
from dsmr_reader_server import DsmrReaderProcess

from dsmr_logger.telegram.build import meter_timestamp, restamp
from dsmr_logger.telegram.capture import default_capture, frames_in

T = TypeVar("T")
README = REPO_ROOT / "README.md"
KEY = "readme-test-api-key-0123456789"
AMSTERDAM = ZoneInfo("Europe/Amsterdam")
SHELL_BLOCKS = ("sh", "shell", "bash", "console")

SKIPPED = {
    "pip install -e '.[test]' && python -m pytest -q -n 4": "runs this test suite (recursion)",
    "sudo apt update": "changes the system's packages",
    "sudo apt install -y python3-venv git": "changes the system's packages",
    "sudo useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "
    "--groups dialout dsmr-logger": "creates a system user",
    "sudo python3 -m venv /opt/dsmr-logger/venv": "root; the test links the Try-it venv there",
    "sudo /opt/dsmr-logger/venv/bin/pip install dsmr-logger/dist/dsmr_logger-*.whl": (
        "root; the venv there already has the same source installed (the wheel is checked)"
    ),
    "sudo /opt/dsmr-logger/venv/bin/pip install --upgrade dsmr-logger/dist/dsmr_logger-*.whl": (
        "root; as the install above"
    ),
    "sudo /opt/dsmr-logger/venv/bin/pip install --force-reinstall --no-deps "
    "dsmr-logger/dist/dsmr_logger-*.whl": "root; as the install above",
    "sudo ln -sf /opt/dsmr-logger/venv/bin/dsmr-logger /usr/local/bin/dsmr-logger": (
        "root; the test makes the same link in the sandbox"
    ),
    "sudo install -d -m 0755 /etc/dsmr-logger": "root; the sandbox has the folder",
    "sudo install -o root -g dsmr-logger -m 0640 dsmr-logger/deploy/config.example.toml "
    "/etc/dsmr-logger/config.toml": "root; the test writes the example there",
    "sudo install -d -o dsmr-logger -g dsmr-logger -m 0700 /var/lib/dsmr-logger": (
        "root; the sandbox has the folder"
    ),
    'sudo usermod -aG dsmr-logger "$USER"': "changes the system's users",
    "sudoedit /etc/dsmr-logger/config.toml": "an editor; the test writes what it would",
    "sudo install -m 0644 dsmr-logger/deploy/systemd/dsmr-logger.service /etc/systemd/system/": (
        "installs a systemd unit"
    ),
    "sudo systemctl daemon-reload": "systemd",
    "sudo systemctl enable --now dsmr-logger": "systemd; the test runs the service itself",
    "systemctl status dsmr-logger": "systemd",
    "journalctl -u dsmr-logger -f": "the systemd journal, followed for ever",
    "sudo apt install -y supervisor": "changes the system's packages",
    "sudo install -m 0644 dsmr-logger/deploy/supervisor/dsmr-logger.conf "
    "/etc/supervisor/conf.d/": "installs a supervisor program",
    "sudo supervisorctl reread": "supervisor",
    "sudo supervisorctl update": "supervisor",
    "sudo supervisorctl status dsmr-logger": "supervisor",
    "sudo supervisorctl tail -f dsmr-logger": "supervisor",
    "git -C dsmr-logger pull": "fetches from the remote repository",
    "sudo /opt/dsmr-logger/venv/bin/dsmr-logger pair homewizard --host 192.168.1.20 "
    "--config /etc/dsmr-logger/config.toml": (
        "root, and a HomeWizard device on the LAN whose button is pressed (test_homewizard_pair "
        "pairs with a fake one)"
    ),
    "sudo systemctl restart dsmr-logger": "systemd",
}

EXIT_CODES = {
    "ls -l /dev/serial/by-id/ /dev/ttyUSB* /dev/ttyACM*": {0, 2},  # 2: no such device here
}
"""Commands whose exit status depends on the machine; every other one must exit 0."""

NEEDS_TOOL = {
    "systemd-analyze security --offline=true deploy/systemd/dsmr-logger.service": (
        "systemd-analyze"
    ),
}
"""Commands of a tool a test machine may lack: run when it is there, else skipped saying so."""


@dataclass(frozen=True, slots=True)
class Command:
    section: str
    line: str
    output: tuple[str, ...] = ()
    """For a ``console`` block: the lines the README shows it printing (``...`` elides)."""


@dataclass(frozen=True, slots=True)
class LongRunning:
    """A command that keeps running: ``ready`` on its output shows it works; then it is stopped
    with ``stop`` (None: left running until the test ends) and must exit 0."""

    ready: Callable[[str], bool]
    stop: signal.Signals | None


def _frames_shown(output: str) -> bool:
    return any(int(n) >= 1 for n in re.findall(r"frames (\d+)", output))


LONG_RUNNING = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && dsmr-logger demo": (
        LongRunning(_frames_shown, signal.SIGINT)
    ),
    "dsmr-logger simulate --link /tmp/dsmr-p1": LongRunning(lambda out: "/dev/" in out, None),
    "dsmr-logger run --config /tmp/dsmr-p1.toml": LongRunning(
        lambda out: "reading valid telegrams" in out and "event='telegram'" in out,
        signal.SIGTERM,
    ),
}


def readme_commands(text: str) -> list[Command]:
    """The shell command lines of the README's code blocks, continuation lines joined."""
    commands: list[Command] = []
    section = ""
    block: str | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if block is None:
            if raw.startswith("#"):
                section = raw.lstrip("#").strip()
            elif line.startswith("```"):
                block = line[3:].strip()
            continue
        if line.startswith("```"):
            block = None
            continue
        if block not in SHELL_BLOCKS:
            continue
        if block == "console":
            if line.startswith("$ "):
                commands.append(Command(section, line[2:]))
            elif commands and line:
                last = commands[-1]
                commands[-1] = Command(last.section, last.line, (*last.output, line))
            continue
        if pending:
            line = f"{pending} {line}"
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        pending = ""
        command = re.sub(r"\s+#.*$", "", line) if not line.startswith("#") else ""
        if command:
            commands.append(Command(section, command))
    return commands


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _copy_source(destination: Path) -> None:
    ignored = shutil.ignore_patterns(
        ".git",
        ".venv",
        ".ci-venv",
        "__pycache__",
        "*.egg-info",
        "build",
        "dist",
        "dsmr-logger-demo",
        ".*_cache",
    )
    shutil.copytree(REPO_ROOT, destination, ignore=ignored)


CLIMKIT = {"username": "api-user", "password": "climkit-s3cret", "site": "a1b2", "meter": "c3d4"}


class Background:
    """An event loop in a thread, serving the fakes of the clouds while the commands run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def climkit_fake() -> ClimkitFake:
    """Climkit with a site created yesterday: the import's default range is a day and a bit,
    a handful of requests at the API's one a second."""
    now = datetime.now(UTC)
    yesterday = now.astimezone(AMSTERDAM).date() - timedelta(days=1)
    points = [
        point
        for point in climkit_series(yesterday, 2, AMSTERDAM, missing=lambda _: False)
        if point.at <= now
    ]
    created = datetime.combine(yesterday, datetime.min.time(), AMSTERDAM).astimezone(UTC)
    meter = {"id": CLIMKIT["meter"], "type": "electricity", "name": "General"}
    return ClimkitFake(
        RealClock(),
        username=CLIMKIT["username"],
        password=CLIMKIT["password"],
        site=CLIMKIT["site"],
        meters=[{**meter, "mode": "consumption", "prim_ad": "12", "is_rule_meter": False}],
        data={CLIMKIT["meter"]: points},
        zone=AMSTERDAM,
        creation_date=created.replace(tzinfo=None).isoformat(timespec="seconds"),
    )


@dataclass
class Sandbox:
    """The machine the README's commands run on, inside ``root``."""

    root: Path
    server: DsmrReaderProcess
    climkit: ClimkitFake
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    service: subprocess.Popen[str] | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def source(self) -> Path:
        return self.home / "dsmr-logger"

    @property
    def config(self) -> Path:
        return self.root / "etc" / "dsmr-logger" / "config.toml"

    def local(self, text: str) -> str:
        """System paths led into the sandbox."""
        return re.sub(r"(?<![\w.~-])/(etc|var|tmp|opt)/", rf"{self.root}/\1/", text)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSMRREADER_")}
        # The venv running the tests stays out of reach: a README line whose own venv failed
        # must fail, not fall back to this one's pip and reinstall it from the sandbox's copy.
        ours = str(Path(sys.prefix).resolve())
        path = [
            p for p in env.get("PATH", "").split(":") if not str(Path(p).resolve()).startswith(ours)
        ]
        env["PATH"] = ":".join([str(self.root / "usr" / "local" / "bin"), *path])
        env["DSMR_LOGGER_CONFIG"] = str(self.config)
        env.pop("VIRTUAL_ENV", None)
        return env

    def cwd(self, command: Command) -> Path:
        at_source = ("Try it", "Run the tests", "Security exposure")
        return self.source if command.section.startswith(at_source) else self.home

    def prepare(self) -> None:
        _copy_source(self.source)
        for folder in ("etc/dsmr-logger", "var/lib/dsmr-logger/archive", "tmp", "opt/dsmr-logger"):
            (self.root / folder).mkdir(parents=True)
        (self.root / "opt" / "dsmr-logger" / "venv").symlink_to(self.source / ".venv")
        (self.root / "usr" / "local" / "bin").mkdir(parents=True)
        (self.root / "usr" / "local" / "bin" / "dsmr-logger").symlink_to(
            self.root / "opt" / "dsmr-logger" / "venv" / "bin" / "dsmr-logger"
        )

    def start_service(self) -> None:
        """What the install's root steps and ``systemctl enable --now`` leave: a configured,
        running service reading a (simulated) meter and delivering to DSMR-reader."""
        meter = self.root / "dev-ttyUSB0"
        self.start(["dsmr-logger", "simulate", "--link", str(meter)], lambda out: "/dev/" in out)
        example = self.local((self.source / "deploy" / "config.example.toml").read_text())
        listen = f"127.0.0.1:{_free_port()}"
        edited = (
            example.replace('port = "/dev/ttyUSB0"', f'port = "{meter}"', 1)
            .replace("REPLACE-WITH-YOUR-DSMR-READER-API-KEY", KEY)
            .replace('url = "http://127.0.0.1"', f'url = "{self.server.url}"', 1)
            .replace('listen = "127.0.0.1:8484"', f'listen = "{listen}"')
            .replace(f'# path = "{self.root}/var/lib/', f'path = "{self.root}/var/lib/', 1)
        )
        assert edited.count(KEY) == 1 and self.server.url in edited and listen in edited
        climkit = {**CLIMKIT, "base_url": self.climkit.api_url}  # the section, filled in
        edited += "\n[import.climkit]\n" + "".join(f'{k} = "{v}"\n' for k, v in climkit.items())
        self.config.write_text(edited)
        self._archive_day(self.root / "var/lib/dsmr-logger/archive/2026-11-02.log.gz")
        self.service = self.start(
            ["dsmr-logger", "run", "--config", str(self.config)], lambda out: "started" in out
        )
        healthz = f"http://{listen}/healthz"
        try:
            _wait(lambda: _answers(healthz) == 200, f"the service to be healthy at {healthz}")
        except AssertionError:
            self.stop_all()
            raise AssertionError(f"not healthy; the service said:\n{_rest(self.service)}") from None

    @staticmethod
    def _archive_day(path: Path) -> None:
        """An archived day of November 2026 (older than compress_after_days: gzipped)."""
        telegrams = frames_in(default_capture())
        day = [
            restamp(telegram, meter_timestamp(datetime(2026, 11, 2, 12, 0, i), AMSTERDAM))
            for i, telegram in enumerate(telegrams)
        ]
        path.write_bytes(gzip.compress(b"".join(day)))

    def start(
        self, argv: list[str], ready: Callable[[str], bool], cwd: Path | None = None
    ) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            argv,
            cwd=cwd or self.home,
            env=self.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.processes.append(process)
        _read_until(process, ready, " ".join(argv))
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def _rest(process: subprocess.Popen[str]) -> str:
    """What a stopped process wrote that nobody has read yet."""
    with contextlib.suppress(OSError, ValueError):
        return process.stdout.read() if process.stdout is not None else ""
    return ""


def _answers(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            status: int = answer.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _read_until(
    process: subprocess.Popen[str], ready: Callable[[str], bool], what: str, timeout: float = 120
) -> str:
    """Read the process's output until ``ready`` holds (bounded); the output so far."""
    import selectors

    assert process.stdout is not None
    output = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not ready(output):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (process.poll() is not None and not selector.select(0)):
                raise AssertionError(f"{what}: not ready (exit {process.poll()}):\n{output}")
            if selector.select(min(remaining, 1.0)):
                line = process.stdout.readline()
                output += line
    return output


def _run(sandbox: Sandbox, command: Command, line: str) -> None:
    long = LONG_RUNNING.get(command.line)
    if long is not None:
        process = sandbox.start(["bash", "-c", line], long.ready, cwd=sandbox.cwd(command))
        if long.stop is not None:
            os.killpg(process.pid, long.stop)
            rest, _ = process.communicate(timeout=60)
            assert "Traceback" not in rest, f"{command.line}:\n{rest}"
            assert process.returncode == 0, f"{command.line}: exit {process.returncode}\n{rest}"
        return
    result = subprocess.run(
        ["bash", "-c", line],
        cwd=sandbox.cwd(command),
        env=sandbox.environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    shown = f"{command.line}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert result.returncode in EXIT_CODES.get(command.line, {0}), shown
    for expected in command.output:
        if expected != "...":
            assert expected in result.stdout, shown


def test_rule_tables_name_real_readme_lines() -> None:
    """The tables above name real README lines only (a renamed command must be updated)."""
    lines = {command.line for command in readme_commands(README.read_text())}
    for table in (SKIPPED, EXIT_CODES, NEEDS_TOOL, LONG_RUNNING):
        assert set(table) <= lines, set(table) - lines


def test_the_readme_is_read_as_a_user_reads_it() -> None:
    commands = readme_commands(README.read_text())
    lines = [command.line for command in commands]
    assert lines[0] == next(iter(LONG_RUNNING))  # the first thing a reader runs
    assert "dsmr-logger status" in lines
    assert any(line.startswith("sudo -u dsmr-logger dsmr-logger backfill ") for line in lines)
    assert len(commands) > 40


@contextlib.contextmanager
def sandbox_at(root: Path) -> Iterator[Sandbox]:
    background = Background()
    climkit = climkit_fake()
    background.run(climkit.__aenter__())
    try:
        with DsmrReaderProcess(api_key=KEY) as server:
            sandbox = Sandbox(root, server, climkit)
            try:
                yield sandbox
            finally:
                sandbox.stop_all()
    finally:
        background.run(climkit.__aexit__(None, None, None))
        background.close()


def test_every_command_line_of_the_readme_runs_as_written(tmp_path: Path) -> None:
    commands = readme_commands(README.read_text())
    ran: list[str] = []
    with sandbox_at(tmp_path) as sandbox:
        sandbox.prepare()
        for command in commands:
            if command.line in SKIPPED:
                continue
            tool = NEEDS_TOOL.get(command.line)
            if tool is not None and shutil.which(tool) is None:
                print(f"skipped (no {tool} here): {command.line}", file=sys.stderr)
                continue
            if sandbox.service is None and not command.section.startswith("Try it"):
                sandbox.start_service()
            line = sandbox.local(command.line.removeprefix("sudo -u dsmr-logger "))
            assert not line.startswith("sudo"), f"{command.line}: not in SKIPPED"
            if command.line in ran and command.line not in LONG_RUNNING:
                continue  # the same line again (the upgrade rebuilds as the install did)
            _run(sandbox, command, line)
            ran.append(command.line)
            if command.line.startswith("/opt/dsmr-logger/venv/bin/pip wheel"):
                _check_wheel(sandbox.source / "dist")
        assert sandbox.service is not None and sandbox.service.poll() is None
        received = sandbox.server.received()
        imported = sandbox.server.readings()
        assert sandbox.climkit.violations == []
    assert imported and len({r["timestamp"] for r in imported}) == len(imported)
    backfilled = [t for t in received if "0-0:1.0.0(261102" in t]
    assert len(backfilled) == len(frames_in(default_capture())), "backfill sent the archived day"
    assert len(ran) >= 15
    installed = importlib.metadata.distribution("dsmr-logger").read_text("direct_url.json") or ""
    assert "pytest" not in installed, "a README line reinstalled the venv running the tests"


def _check_wheel(dist: Path) -> None:
    """The wheel the install builds: one file, carrying the licence it declares."""
    (wheel,) = dist.glob("dsmr_logger-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
        assert "License-Expression: MIT" in archive.read(metadata).decode()
        (licence,) = [name for name in names if name.endswith("licenses/LICENSE")]
        assert b"MIT License" in archive.read(licence)
    build = dist.parent / "build"
    assert not build.exists() or build.stat().st_uid == os.geteuid()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```sh\na \\\n  b\n```\n", ["a b"]),
        ("```sh\nx   # comment\n# only a comment\n```\n", ["x"]),
        ("```toml\nport = 1\n```\n", []),
        ("   ```sh\n   indented\n   ```\n", ["indented"]),
        ("```console\n$ run it\nout\n...\n```\n", ["run it"]),
    ],
)
def test_command_lines_are_found_as_a_reader_sees_them(text: str, expected: list[str]) -> None:
    assert [command.line for command in readme_commands(text)] == expected


def test_20_the_build_floor_reads_the_licence_expression_it_declares() -> None:
    """``license = "MIT"`` (an SPDX expression, PEP 639) needs setuptools 77; older ones fail."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    (setuptools,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    floor = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", setuptools)
    assert floor is not None and int(floor.group(1)) >= 77, setuptools
    licence = (REPO_ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License\n")
    assert "dsmr-logger contributors" in licence
