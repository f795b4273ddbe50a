"""The daemon as a real process reading a (fake) HomeWizard P1 Meter into a (fake) DSMR-reader.

``python -m dsmr_logger run`` polls the fake device (``homewizard_device.py``: HTTPS, a test CA
that is X.509 v1 like HomeWizard's, a certificate named ``appliance/p1dongle/<serial>``, token
check, 503 while silent) serving the 566-frame capture one telegram per poll, each served twice
(the device is polled faster than the meter sends); the telegrams go to ``DsmrReaderServer``.
Device and server run in the test's event loop; the daemon and the pairing command are child
processes, stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CORPUS, REPO_ROOT, require_corpus
from dsmr_reader_server import DsmrReaderServer
from homewizard_device import FakeP1Meter, Pki
from waiting import wait_until

from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.tools.pair import user_name

CAPTURE = CORPUS / "nielsbasjes-dsmr-tools" / "ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"
API_KEY = "homewizard-test-api-key"
POLLING = {"interval": 0.01, "reconnect_initial": 0.02, "reconnect_max": 0.2, "timeout": 2.0}


def capture_telegrams() -> list[bytes]:
    """The capture's telegrams as the daemon delivers them (``Frame.telegram``)."""
    require_corpus()
    return [f.telegram for f in FrameAssembler().feed(CAPTURE.read_bytes(), 0.0)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_config(tmp_path: Path, meter: dict[str, Any], server: DsmrReaderServer) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "meter": meter,
        "spool": {"path": tmp_path / "spool.sqlite3", "flush_interval": 0.2},
        "log": {"level": "info", "format": "json"},
        "http": {"listen": f"127.0.0.1:{free_port()}", "frame_window": 5.0},
    }
    lines = []
    for name, table in sections.items():
        lines += [f"[{name}]", *(f"{k} = {toml(v)}" for k, v in table.items()), ""]
    sink = {"name": "dsmr", "url": server.url, "api_key": API_KEY, "timeout": 2.0}
    sink |= {"retry_initial": 0.02, "retry_max": 0.2}
    lines += ["[[sink]]", *(f"{k} = {toml(v)}" for k, v in sink.items()), ""]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines))
    return path


def log_events(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                found.append(event)
    return found


def named(path: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in log_events(path) if e.get("event") == event]


class Daemon:
    """``dsmr-logger run`` as a child process logging JSON to its own file."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path, config: Path) -> None:
        self.process, self.log, self.config = process, log, config
        listen = next(line for line in config.read_text().splitlines() if line.startswith("listen"))
        self.status_url = f"http://{json.loads(listen.split(' = ', 1)[1])}"

    async def get(self, path: str) -> tuple[int, bytes]:
        def fetch() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(self.status_url + path, timeout=5) as answer:
                    return answer.status, answer.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()
            except OSError:
                return 0, b""

        return await asyncio.to_thread(fetch)

    async def healthz(self) -> tuple[int, dict[str, Any]]:
        status, body = await self.get("/healthz")
        return status, json.loads(body) if body else {}

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            return await self.process.wait()


@contextlib.asynccontextmanager
async def daemon(tmp_path: Path, config: Path) -> AsyncIterator[Daemon]:
    runs = len(list(tmp_path.glob("daemon-*.log"))) + 1
    log = tmp_path / f"daemon-{runs}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dsmr_logger", "run", "--config", str(config),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
            cwd=REPO_ROOT,
        )  # fmt: skip
    running = Daemon(process, log, config)
    try:
        await wait_until(lambda: bool(named(log, "started")), "the daemon to start", 15.0)
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def delivered(server: DsmrReaderServer) -> list[bytes]:
    return [t.encode() for t in server.received]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


@pytest.fixture
def ca_file(pki: Pki, tmp_path: Path) -> Path:
    return pki.write_ca(tmp_path / "test-ca.pem")


def hw_meter(device: FakeP1Meter, ca_file: Path, **keys: Any) -> dict[str, Any]:
    return {
        "type": "homewizard",
        "host": f"127.0.0.1:{device.https_port}",
        "ca_file": ca_file,
        **POLLING,
        **keys,
    }


# --- the whole capture -------------------------------------------------------------------------


async def test_the_capture_polled_over_api_v2_reaches_dsmr_reader_once_each_in_order(
    tmp_path: Path, pki: Pki, ca_file: Path
) -> None:
    expected = capture_telegrams()
    assert len(expected) == 566
    async with (
        DsmrReaderServer(API_KEY) as server,
        FakeP1Meter(expected, pki=pki, directory=tmp_path, repeat=2, silent_polls=5) as device,
    ):
        token = device.token_for("local/dsmr-logger-test")
        config = write_config(tmp_path, hw_meter(device, ca_file, token=token), server)
        async with daemon(tmp_path, config) as run:
            await wait_until(lambda: len(server.received) >= 566, "566 telegrams", 90.0)
            status, body = await run.get("/status")
            document = json.loads(body)
            _, metrics = await run.get("/metrics")
            code, health = await run.healthz()
            assert await run.stop() == 0
        await asyncio.sleep(0.2)  # anything still arriving would be a duplicate
    got = delivered(server)
    assert got == expected, "every distinct telegram once, in order"
    meter = document["meter"]
    assert status == 200 and code == 200 and health["healthy"]
    assert meter["port"] == f"https://127.0.0.1:{device.https_port}/api/telegram"
    assert meter["state"] == "ok" and meter["last_error"] is None
    assert meter["frames"] == 566 and meter["polls"] >= 566 and meter["repeats"] >= 500
    assert b"dsmr_logger_meter_polls_total" in metrics
    assert b"dsmr_logger_meter_repeats_total" in metrics
    assert token not in run.log.read_text()
    print(
        f"HomeWizard v2, 566-frame capture: {device.polls} polls, {device.silent_answers} "
        f"answered 503 (silent), {device.served} telegrams served, {meter['repeats']} repeats "
        f"skipped (at the status read), {len(got)} delivered, {len(set(got))} distinct"
    )


# --- a refused token, then the fix: nothing lost, nothing twice --------------------------------


async def test_a_revoked_token_is_one_clear_error_and_after_the_fix_nothing_is_lost(
    tmp_path: Path, pki: Pki, ca_file: Path
) -> None:
    expected = capture_telegrams()[:120]
    name = "local/dsmr-logger-pi"
    async with (
        DsmrReaderServer(API_KEY) as server,
        FakeP1Meter(expected, pki=pki, directory=tmp_path) as device,
    ):
        old = device.token_for(name)
        config = write_config(tmp_path, hw_meter(device, ca_file, token=old), server)
        async with daemon(tmp_path, config) as run:
            await wait_until(lambda: len(server.received) >= 40, "40 telegrams", 30.0)
            device.hold = True  # the meter sends nothing new from here until the restart
            served = device.served
            await wait_until(lambda: device.served >= served + 3, "the held one, again", 10.0)
            new = device.token_for(name)  # paired again elsewhere: the old token stops working
            await wait_until(lambda: device.unauthorized >= 5, "five refused requests", 20.0)
            code, health = await run.healthz()
            assert await run.stop() == 0
        first_log = run.log
        refusals = named(first_log, "meter device refuses us")
        assert len(refusals) == 1, "one clear error, not one per poll"
        assert "the device refuses the token (401 user:unauthorized)" in refusals[0]["reason"]
        assert f"pair homewizard --host 127.0.0.1:{device.https_port}" in refusals[0]["reason"]
        assert code == 503
        assert any("refuses the token" in reason for reason in health["reasons"])
        taken_before = len(server.received)
        assert delivered(server) == expected[:taken_before]

        config.write_text(config.read_text().replace(old, new))
        async with daemon(tmp_path, config) as run:
            # The held telegram, served again after the restart, must not be taken again (the
            # final comparison would show it twice).
            await wait_until(lambda: device.served >= served + 8, "the held one after restart")
            device.hold = False
            await wait_until(lambda: len(server.received) >= 120, "the rest", 30.0)
            assert await run.stop() == 0
        for log in (first_log, run.log):
            assert old not in log.read_text() and new not in log.read_text()
    assert delivered(server) == expected
    print(
        f"revoked token: {device.unauthorized} requests refused (one error logged), "
        f"{device.polls} polls, {device.served} served, {len(server.received)} delivered of "
        f"{len(expected)}, none twice"
    )


# --- a certificate naming another device ------------------------------------------------------


async def test_a_certificate_with_the_wrong_name_is_refused_with_a_clear_error(
    tmp_path: Path, pki: Pki, ca_file: Path
) -> None:
    """Paired with 5c2fafabcdef; now another P1 Meter answers at that address."""
    async with (
        DsmrReaderServer(API_KEY) as server,
        FakeP1Meter(
            capture_telegrams()[:5], pki=pki, directory=tmp_path, serial="a0b1c2d3e4f5"
        ) as device,
    ):
        token = device.token_for("local/dsmr-logger-pi")
        meter = hw_meter(device, ca_file, token=token, serial="5c2fafabcdef")
        config = write_config(tmp_path, meter, server)
        async with daemon(tmp_path, config) as run:

            def refused() -> bool:
                return bool(named(run.log, "meter device refuses us"))

            await wait_until(refused, "the refusal", 15.0)
            await asyncio.sleep(0.5)  # several retries: still one error line
            code, health = await run.healthz()
            status = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "dsmr_logger", "status", "--config", str(config)],
                capture_output=True,
                text=True,
                cwd=REPO_ROOT,
                timeout=20,
            )
            assert await run.stop() == 0
    errors = named(run.log, "meter device refuses us")
    assert len(errors) == 1
    reason = errors[0]["reason"]
    assert "its certificate is not issued to appliance/p1dongle/5c2fafabcdef (refused)" in reason
    assert code == 503 and any("appliance/p1dongle/5c2fafabcdef" in r for r in health["reasons"])
    assert status.returncode == 1
    assert (
        f"meter https://127.0.0.1:{device.https_port}/api/telegram: misconfigured" in status.stdout
    )
    assert "last error: " in status.stdout and "(refused)" in status.stdout
    assert device.token_requests == 0, "the token never went to the wrong device"
    assert server.received == [] and device.served == 0
    assert "Traceback" not in run.log.read_text()


# --- pairing: one command, then a working configuration ---------------------------------------


async def test_pairing_against_the_device_writes_a_configuration_that_works(
    tmp_path: Path, pki: Pki, ca_file: Path
) -> None:
    expected = capture_telegrams()[:3]  # polled at the default interval: 1 s
    async with (
        DsmrReaderServer(API_KEY) as server,
        FakeP1Meter(expected, pki=pki, directory=tmp_path) as device,
    ):
        # The user's configuration so far: a P1 cable (no longer there), the sink, the status.
        config = write_config(tmp_path, {"port": "/dev/ttyUSB0"}, server)
        config.chmod(0o640)
        host = f"127.0.0.1:{device.https_port}"
        command = [sys.executable, "-m", "dsmr_logger", "pair", "homewizard", "--host", host]
        command += ["--config", str(config), "--ca-file", str(ca_file), "--wait", "60"]
        pairing = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        refused: Callable[[], int] = lambda: sum(s == 403 for s, _ in device.user_requests)  # noqa: E731
        await wait_until(lambda: refused() >= 2, "two asks before the press", 20.0)
        device.press_button()
        async with asyncio.timeout(30):
            out, err = await pairing.communicate()
        assert pairing.returncode == 0, err.decode()
        name = user_name(socket.gethostname())
        token = device.tokens[name]
        assert device.user_requests[-1] == (200, name)
        assert token not in out.decode() + err.decode(), "written to the file, shown nowhere"
        assert "Press the button on the P1 Meter" in err.decode()
        assert stat.S_IMODE(config.stat().st_mode) == 0o640, "the file keeps its permissions"
        text = config.read_text()
        assert f'token = "{token}"' in text and 'serial = "5c2fafabcdef"' in text
        assert '# port = "/dev/ttyUSB0"' in text, "the P1 setup is kept, commented out"

        async with daemon(tmp_path, config) as run:
            await wait_until(lambda: len(server.received) >= 3, "3 telegrams", 30.0)
            assert await run.stop() == 0
        checked = subprocess.run(
            [sys.executable, "-m", "dsmr_logger", "check-config", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=20,
        )
    assert delivered(server) == expected
    assert checked.returncode == 0 and token not in checked.stdout
    assert f'token = "****{token[-2:]}"' in checked.stdout
    print(
        f"pairing: {len(device.user_requests)} POST /api/user "
        f"({refused()} refused before the press), then {device.polls} polls, "
        f"{len(server.received)} delivered"
    )
