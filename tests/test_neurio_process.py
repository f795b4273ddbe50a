"""The daemon as a real process reading a Neurio sensor, delivering to DSMR-reader over v1 and v2.

Three child processes per test: ``dsmr-logger simulate-neurio --tick request --control`` (the
sensor: a new sample on every poll, so the test knows exactly which samples were served, and a
control port to switch it off, make it hang, repeat itself or glitch), the DSMR-reader of
``tests/dsmr_reader_server.py``, and ``dsmr-logger run`` (the daemon, polling every second, the
configuration's minimum, with its status endpoint on). The promise checked: every sample the
sensor served arrives once, in order, as a CRC-valid telegram with the exact values, except those
a guard rejected, which are counted; through a sensor outage and a DSMR-reader outage at once.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import REPO_ROOT
from dsmr_reader_server import DsmrReaderProcess, parse_failure

from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.telegram.obis import parse

API_KEY = "neurio-process-api-key"
PASSWORD = "Sensor-Pass-7731"
AMSTERDAM = ZoneInfo("Europe/Amsterdam")
STOP_LIMIT = 10.0


# --- helpers ------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def get_json(url: str, payload: dict[str, Any] | None = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as error:  # /healthz answers 503 with a JSON body
        with error:
            return json.loads(error.read())


class Children:
    """Every process a test starts; whatever still runs at teardown is killed."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen[Any]] = []
        self.runs = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        return env

    def sensor(self, shape: str, *login: str) -> Sensor:
        command = [sys.executable, "-m", "dsmr_logger", "simulate-neurio", "--shape", shape]
        command += ["--tick", "request", "--control"]
        if login:
            command += ["--username", login[0], "--password", login[1]]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self.env(),
            cwd=REPO_ROOT,
        )
        self.processes.append(process)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15.0)
        assert ready, "simulate-neurio printed no URL within 15 s"
        url = process.stdout.readline().decode().strip()
        control = int(process.stdout.readline())
        assert url.startswith("http://127.0.0.1:"), url
        return Sensor(url, f"http://127.0.0.1:{control}")

    def daemon(self, config: Path) -> tuple[subprocess.Popen[Any], Path]:
        self.runs += 1
        log = self.tmp_path / f"daemon-{self.runs}.log"
        command = [sys.executable, "-m", "dsmr_logger", "run", "--config", str(config)]
        with log.open("ab") as stderr:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=self.env(),
                cwd=REPO_ROOT,
            )
        self.processes.append(process)
        return process, log

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "dsmr_logger", *args]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=60, env=self.env(), cwd=REPO_ROOT
        )

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            if process.stdout is not None:
                process.stdout.close()


class Sensor:
    def __init__(self, url: str, control: str) -> None:
        self.url = url
        self.control_url = control

    def control(self, **changes: Any) -> dict[str, Any]:
        state: dict[str, Any] = get_json(f"{self.control_url}/_control", changes)
        return state

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = get_json(f"{self.control_url}/_control")
        return state

    def served(self) -> list[dict[str, Any]]:
        served: list[dict[str, Any]] = get_json(f"{self.control_url}/_served")
        return served


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    running = Children(tmp_path)
    try:
        yield running
    finally:
        running.close()


def write_config(
    tmp_path: Path,
    sensor: Sensor,
    server: DsmrReaderProcess,
    *,
    api: str,
    listen: str,
    meter: tuple[str, ...] = (),
) -> Path:
    lines = [
        "[meter]",
        'type = "neurio"',
        f'url = "{sensor.url}"',
        "interval = 1",
        "timeout = 30",
        *meter,
        "",
        "[spool]",
        f'path = "{tmp_path / "spool.sqlite3"}"',
        "flush_interval = 0.2",
        "",
        "[[sink]]",
        'name = "dsmr"',
        f'url = "{server.url}"',
        f'api_key = "{API_KEY}"',
        f'api = "{api}"',
        "timeout = 0.5",
        "retry_initial = 0.05",
        "retry_max = 0.3",
        "",
        "[http]",
        f'listen = "{listen}"',
        "frame_window = 1.0",
        "",
        "[log]",
        'level = "debug"',
        'format = "json"',
    ]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def terminate(process: subprocess.Popen[Any]) -> int:
    process.terminate()
    try:
        return process.wait(timeout=STOP_LIMIT + 5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("the daemon did not exit after SIGTERM")


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def distinct(served: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Served samples once each (a repeat is the same sample again), in order."""
    seen: set[str] = set()
    result = []
    for document in served:
        if document["timestamp"] not in seen:
            seen.add(document["timestamp"])
            result.append(document)
    return result


def channels(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in document["channels"]}


def exact(number: Decimal, places: str) -> Decimal:
    return number.quantize(Decimal(places), ROUND_HALF_UP)


def kw(watts: Any) -> tuple[Decimal, Decimal]:
    """(delivered, returned) kW for signed watts, to 3 decimals."""
    value = Decimal(str(watts)) / 1000
    return exact(max(value, Decimal(0)), "0.001"), exact(max(-value, Decimal(0)), "0.001")


def sample_time(document: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(document["timestamp"])


# --- 1. v1: every sample once, through a sensor outage and a DSMR-reader outage ----------------


def test_v1_every_sample_once_exact_through_outages_of_sensor_and_sink(
    tmp_path: Path, children: Children
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    with DsmrReaderProcess(API_KEY) as server:
        sensor = children.sensor("solar")
        config = write_config(tmp_path, sensor, server, api="v1", listen=listen)
        daemon, log = children.daemon(config)

        def status() -> dict[str, Any]:
            return status_of(listen)

        def received() -> int:
            count: int = server.state()["received"]
            return count

        wait_until(lambda: received() >= 3, 30, "three samples at DSMR-reader")
        sensor.control(repeat=2)  # the same sample on the next two polls
        wait_until(lambda: rejected(status()).get("duplicate_sample", 0) >= 2, 15, "duplicates")
        sensor.control(regress_ws=5_000_000)  # the next sample's NET import 1.4 kWh lower
        wait_until(lambda: rejected(status()).get("counter_regression") == 1, 15, "regression")
        wait_until(lambda: received() >= 6, 15, "samples after the glitch")

        # The sensor goes off and DSMR-reader goes down: the state shows, nothing crashes.
        server.control(mode="refuse")
        sensor.control(mode="refuse")
        wait_until(lambda: status().get("meter", {}).get("state") == "disconnected", 15, "down")
        health = wait_until(lambda: unhealthy(listen), 15, "/healthz to turn unhealthy")
        assert any("disconnected" in reason for reason in health["reasons"]), health
        shown = children.run_cli("status", "--config", str(config))
        assert shown.returncode == 1, shown.stderr
        assert f"meter {sensor.url}/current-sample: disconnected" in shown.stdout

        # The sensor comes back while DSMR-reader is still down: samples go to the spool.
        frames_before = status()["meter"]["frames"]
        sensor.control(mode="ok")
        wait_until(lambda: status()["meter"]["frames"] >= frames_before + 3, 20, "spooling")
        assert status()["sinks"][0]["backlog"] >= 3

        # A sensor that hangs never holds up the sinks: the backlog drains while a poll waits
        # (for up to meter.timeout = 30 s) on the sensor.
        sensor.control(mode="hang")
        wait_until(lambda: sensor.state()["hanging"] == 1, 15, "a poll hanging at the sensor")
        server.control(mode="ok")
        wait_until(lambda: status()["sinks"][0]["backlog"] == 0, 15, "the backlog delivered")
        assert sensor.state()["hanging"] == 1, "delivered while the same poll still hangs"
        assert received() == status()["meter"]["frames"]

        sensor.control(mode="ok")
        more = status()["meter"]["frames"] + 2
        wait_until(lambda: received() >= more, 20, "samples after the hang")
        # No new sample from here on; an answer in flight still completes.
        sensor.control(mode="error")
        wait_until(lambda: status()["meter"]["state"] != "ok", 15, "the sensor erroring")
        final = status()
        wait_until(lambda: received() == final["meter"]["frames"], 15, "everything delivered")
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as answer:
            metrics = answer.read().decode()
        assert 'dsmr_logger_frames_total{result="counter_regression"} 1.0' in metrics
        assert 'dsmr_logger_frames_total{result="duplicate_sample"}' in metrics
        assert terminate(daemon) == 0
        telegrams = [t.encode() for t in server.received()]

    served = sensor.served()
    polls = sensor.state()["requests"]
    samples = distinct(served)
    glitches = [
        after
        for before, after in itertools.pairwise(samples)
        if channels(after)["NET"]["eImp_Ws"] < channels(before)["NET"]["eImp_Ws"]
    ]
    assert len(glitches) == 1
    expected = [document for document in samples if document is not glitches[0]]
    counts = final["meter"]["rejected"]
    print(
        f"\nNeurio run (v1): {polls} polls, {len(served)} samples served "
        f"({len(samples)} distinct), {len(telegrams)} delivered, rejected {counts}"
    )
    assert counts["duplicate_sample"] >= 2 and counts["counter_regression"] == 1
    assert len(telegrams) == len(expected) == final["meter"]["frames"]
    for telegram, document in zip(telegrams, expected, strict=True):
        assert parse_failure(telegram.decode()) is None  # DSMR-reader's v1 parser takes it
        frames = FrameAssembler(require_crc=True).feed(telegram, 0.0)
        assert [f.raw for f in frames] == [telegram], "one telegram with a valid CRC"
        reading = parse(telegram, zone=AMSTERDAM)
        assert reading.timestamp == sample_time(document)
        net = channels(document)["NET"]
        delivered, returned = kw(net["p_W"])
        values = {code: v[0].number for code, v in reading.objects.items() if v}
        assert values["1-0:1.8.1"] == exact(Decimal(net["eImp_Ws"]) / 3_600_000, "0.001")
        assert values["1-0:2.8.1"] == exact(Decimal(net["eExp_Ws"]) / 3_600_000, "0.001")
        assert (values["1-0:1.7.0"], values["1-0:2.7.0"]) == (delivered, returned)
        for letter, plus, minus, volts in (("A", 21, 22, 32), ("B", 41, 42, 52)):
            phase = channels(document)[f"PHASE_{letter}_NET"]
            assert (values[f"1-0:{plus}.7.0"], values[f"1-0:{minus}.7.0"]) == kw(phase["p_W"])
            assert values[f"1-0:{volts}.7.0"] == exact(Decimal(str(phase["v_V"])), "0.1")
    first = telegrams[0]
    assert b"\r\n1-0:1.8.1(044357.634*kWh)\r\n" in first  # 159,687,481,246 Ws
    assert b"\r\n1-0:1.7.0(00.000*kW)\r\n1-0:2.7.0(01.189*kW)\r\n" in first  # p_W = -1,189
    warned = [e for e in log_events(log) if e.get("event") == "samples rejected"]
    assert warned and warned[0]["last_reason"] == "counter_regression"


def status_of(listen: str) -> dict[str, Any]:
    """The daemon's ``/status``, or {} while it does not answer yet."""
    try:
        document: dict[str, Any] = get_json(f"http://{listen}/status")
    except OSError:
        return {}
    return document


def unhealthy(listen: str) -> dict[str, Any] | None:
    health: dict[str, Any] = get_json(f"http://{listen}/healthz")
    return None if health["healthy"] else health


def rejected(status: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = status.get("meter", {}).get("rejected", {})
    return counts


# --- 2. v2: a login the daemon lacks, then has; exact fields --------------------------------------


def test_v2_login_refused_with_a_clear_error_then_every_sample_in_the_fields(
    tmp_path: Path, children: Children
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    with DsmrReaderProcess(API_KEY) as server:
        sensor = children.sensor("eu3", "owner", PASSWORD)
        config = write_config(tmp_path, sensor, server, api="v2", listen=listen)
        daemon, log = children.daemon(config)
        wait_until(
            lambda: status_of(listen).get("meter", {}).get("state") == "unauthorized",
            30,
            "the daemon to show the sensor refusing it",
        )
        shown = children.run_cli("status", "--config", str(config))
        assert shown.returncode == 1
        assert "unauthorized" in shown.stdout
        assert terminate(daemon) == 0
        refused = [e for e in log_events(log) if e.get("event") == "sensor refuses access"]
        assert len(refused) == 1
        assert refused[0]["level"] == "error"
        assert "set meter.username and meter.password" in refused[0]["reason"]
        assert server.state()["readings"] == 0

        login = ('username = "owner"', f'password = "{PASSWORD}"')
        config = write_config(tmp_path, sensor, server, api="v2", listen=listen, meter=login)
        checked = children.run_cli("check-config", "--config", str(config))
        assert checked.returncode == 0 and PASSWORD not in checked.stdout
        sensor.control(reset=True)
        daemon, second_log = children.daemon(config)
        wait_until(lambda: server.state()["readings"] >= 4, 30, "four readings over v2")
        sensor.control(mode="error")
        wait_until(lambda: status_of(listen)["meter"]["state"] != "ok", 15, "no more samples")
        frames = status_of(listen)["meter"]["frames"]
        wait_until(lambda: server.state()["readings"] == frames, 15, "all delivered")
        assert terminate(daemon) == 0
        readings = server.readings()

    samples = distinct(sensor.served())
    print(f"\nNeurio run (v2): {len(samples)} samples served, {len(readings)} readings stored")
    assert len(readings) == len(samples)
    for fields, document in zip(readings, samples, strict=True):
        assert datetime.fromisoformat(fields["timestamp"]) == sample_time(document)
        total = channels(document)["CONSUMPTION"]
        delivered, returned = kw(total["p_W"])
        assert fields["electricity_delivered_1"] == str(
            exact(Decimal(total["eImp_Ws"]) / 3_600_000, "0.001")
        )
        assert fields["electricity_returned_1"] == str(
            exact(Decimal(total["eExp_Ws"]) / 3_600_000, "0.001")
        )
        assert fields["electricity_delivered_2"] == fields["electricity_returned_2"] == "0.000"
        assert fields["electricity_currently_delivered"] == str(delivered)
        assert fields["electricity_currently_returned"] == str(returned)
        for number, letter in enumerate("ABC", start=1):
            phase = channels(document)[f"PHASE_{letter}_CONSUMPTION"]
            assert fields[f"phase_currently_delivered_l{number}"] == str(kw(phase["p_W"])[0])
            assert fields[f"phase_voltage_l{number}"] == str(
                exact(Decimal(str(phase["V_V"])), "0.1")
            )
        assert "extra_device_delivered" not in fields
    token = base64.b64encode(f"owner:{PASSWORD}".encode()).decode()
    for path in (log, second_log):
        text = path.read_text()
        assert PASSWORD not in text and token not in text


# --- 2b. reconnects: the link coming back, not every poll ----------------------------------------


def test_a_sensor_answering_every_poll_shows_no_reconnects_and_one_after_an_outage(
    tmp_path: Path, children: Children
) -> None:
    """A polled device is asked every interval; status said "5 reconnects" after five healthy
    polls (and /metrics' reconnect counter rose once a second), as if the link kept failing.
    A reconnect is the link coming back after it was lost; the polls are counted apart."""
    listen = f"127.0.0.1:{free_port()}"
    with DsmrReaderProcess(API_KEY) as server:
        sensor = children.sensor("eu3")
        config = write_config(tmp_path, sensor, server, api="v1", listen=listen)
        daemon, _ = children.daemon(config)
        healthy = wait_until(
            lambda: (s := status_of(listen)) and s["meter"]["polls"] >= 4 and s, 30, "4 polls"
        )
        assert healthy["meter"]["state"] == "ok"
        assert healthy["meter"]["reconnects"] == 0, healthy["meter"]
        shown = children.run_cli("status", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        assert ", 0 reconnects, " in shown.stdout, shown.stdout

        sensor.control(mode="refuse")
        wait_until(lambda: status_of(listen)["meter"]["state"] == "disconnected", 15, "down")
        sensor.control(mode="ok")
        back = wait_until(
            lambda: (s := status_of(listen))["meter"]["state"] == "ok" and s, 30, "back"
        )
        assert back["meter"]["reconnects"] == 1, back["meter"]
        assert back["meter"]["polls"] > healthy["meter"]["polls"]
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as answer:
            assert "dsmr_logger_meter_reconnects_total 1.0" in answer.read().decode()
        assert terminate(daemon) == 0


# --- 3. the demo and the simulator's command line -------------------------------------------------


def test_demo_neurio_runs_the_pipeline_end_to_end(tmp_path: Path, children: Children) -> None:
    shown = children.run_cli("demo", "--neurio", "--dir", str(tmp_path / "demo"), "--duration", "3")
    assert shown.returncode == 0, shown.stderr
    assert "simulated Neurio sensor at http://127.0.0.1:" in shown.stdout
    archived = b"".join(p.read_bytes() for p in (tmp_path / "demo" / "archive").glob("*.log"))
    frames = FrameAssembler(require_crc=True).feed(archived, 0.0)
    assert frames, shown.stdout
    assert all(f.raw.startswith(b"/NEU5\\NeurioLocal-0x0000C47F510179CF\r\n") for f in frames)
    assert b"1-0:1.8.1(044357.634*kWh)" in frames[0].raw


def test_simulate_neurio_wants_username_and_password_together(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dsmr_logger.cli import main

    assert main(["simulate-neurio", "--username", "owner"]) == 2
    assert "--username and --password go together" in capsys.readouterr().err
