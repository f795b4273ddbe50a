#!/usr/bin/env python3
"""Issue 17: how fast the daemon drains a spooled backlog to a local MQTT broker, next to HTTP.

Why: after a broker outage (a Home Assistant update restarts the Mosquitto add-on; a day without
the server that runs it) the backlog goes out in one burst, and the broker must not be slower to
catch up than DSMR-reader is. The figure is the ratio of the MQTT drain's telegrams/s to the HTTP
(DSMR-reader API v1) sink's drain measured in the same run, same machine, same backlog.

How: the backlog is written straight into a fresh spool (``_harness.build_spool``: 778-byte DSMR 5
telegrams, meter timestamps one second apart, all distinct). For MQTT the daemon (a real
process, no meter attached) starts on it with one ``type = "mqtt"`` sink, QoS 1, to a Mosquitto
on 127.0.0.1 started by ``tests/mosquitto.py``; the time runs from READY to an independent
subscriber (paho-mqtt, QoS 1) holding the last ``dsmr/telegram`` message. Each telegram is two
acknowledged messages (``dsmr/reading``, the parsed fields as JSON, and ``dsmr/telegram``). The
subscriber's telegrams must then be exactly the spooled ones, in spool order (``max_in_flight``
1), and the spool empty. For HTTP, ``bench/drain.py``'s drain: the DSMR-reader test server
answering 201 at once, the time from READY to the server holding the last telegram. Both run
with ``max_in_flight`` 1 (the default) and 4.

Usage (about 2 minutes; ``--telegrams`` 86,400 for a full day): ``.venv/bin/python
bench/mqtt_drain.py [--telegrams N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _harness import (
    Children,
    Daemon,
    build_spool,
    cpu_seconds,
    day_telegrams,
    dump_json,
    machine,
    memory_kb,
    real_disk_dir,
    spool_rows,
    table,
)
from drain import Drain
from drain import drain as http_drain
from mosquitto import Mosquitto, Subscriber

SINK = "dsmr"


@dataclass
class MqttDrain:
    telegrams: int
    seconds: float
    ready_s: float
    daemon_cpu_s: float
    broker_cpu_s: float
    peak_rss_kb: int
    exactly_once: bool
    in_order: bool
    spool_left: dict[str, int]
    in_flight: int

    @property
    def rate(self) -> float:
        return self.telegrams / self.seconds


def mqtt_config(work: Path, url: str, in_flight: int) -> Path:
    path = work / "config.toml"
    path.write_text(
        "\n".join(
            [
                "[meter]",
                f"port = {json.dumps(str(work / 'no-meter'))}",
                "reconnect_initial = 0.05",
                "reconnect_max = 1.0",
                "",
                "[spool]",
                f"path = {json.dumps(str(work / 'spool.sqlite3'))}",
                "",
                "[[sink]]",
                f'name = "{SINK}"',
                'type = "mqtt"',
                f'url = "{url}"',
                "timeout = 5.0",
                "retry_initial = 0.05",
                "retry_max = 1.0",
                f"max_in_flight = {in_flight}",
                "",
                "[log]",
                'format = "json"',
                "",
            ]
        )
    )
    return path


def mqtt_drain(children: Children, broker: Mosquitto, count: int, in_flight: int) -> MqttDrain:
    work = real_disk_dir("dsmr-bench-mqtt-")
    print(f"  spooling {count:,} telegrams ...", flush=True)
    build_spool(work / "spool.sqlite3", count, sink=SINK)
    with Subscriber(broker.port, "dsmr/telegram", client_id=f"bench-{in_flight}") as sub:
        daemon = Daemon(children, mqtt_config(work, broker.url, in_flight), work)
        ready = daemon.wait_ready(timeout=60)
        started = time.monotonic()
        assert broker.process is not None
        c0, b0 = cpu_seconds(daemon.pid), cpu_seconds(broker.process.pid)
        deadline = started + 60 + count * 0.05
        while len(sub.messages) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        seconds = time.monotonic() - started
        c1, b1 = cpu_seconds(daemon.pid), cpu_seconds(broker.process.pid)
        peak = memory_kb(daemon.pid)["VmHWM"]
        daemon.stop()
        received = sub.payloads("dsmr/telegram")
    expected = list(day_telegrams(count))
    return MqttDrain(
        len(received),
        seconds,
        ready,
        c1 - c0,
        b1 - b0,
        peak,
        sorted(received) == sorted(expected),
        received == expected,
        spool_rows(work / "spool.sqlite3"),
        in_flight,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--telegrams", type=int, default=20_000, help="backlog to drain")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    count = args.telegrams
    info = machine("paho-mqtt")
    print(f"machine: {info}")
    results: dict[str, Any] = {"machine": info}
    runs: list[tuple[str, MqttDrain | Drain]] = []
    with Children() as children, tempfile.TemporaryDirectory() as scratch:
        broker = Mosquitto(Path(scratch) / "broker", extra=["max_queued_messages 0"]).start()
        try:
            server = children.server()
            for in_flight in (1, 4):
                print(f"MQTT: daemon drains {count:,}, max_in_flight {in_flight} ...", flush=True)
                runs.append(("mqtt", mqtt_drain(children, broker, count, in_flight)))
                print(f"HTTP: daemon drains {count:,}, max_in_flight {in_flight} ...", flush=True)
                server.control(reset=True, mode="ok", delay=0)
                runs.append(("http", http_drain(children, server, count, in_flight)))
        finally:
            broker.stop()
    results["runs"] = [{"sink": kind, **asdict(run)} for kind, run in runs]
    rows = []
    for kind, run in runs:
        other = next(r for k, r in runs if k != kind and r.in_flight == run.in_flight)
        cpu_other = run.broker_cpu_s if isinstance(run, MqttDrain) else run.server_cpu_s
        rows.append(
            [
                f"{kind}, max_in_flight {run.in_flight}",
                f"{run.rate:,.0f}",
                f"{run.seconds:,.1f} s",
                f"{run.daemon_cpu_s / run.telegrams * 1e6:.0f} / "
                f"{cpu_other / run.telegrams * 1e6:.0f}",
                f"{run.peak_rss_kb / 1024:.1f}",
                f"{'yes' if run.exactly_once else 'NO'} / {'yes' if run.in_order else 'no'}",
                f"{run.rate / other.rate:.2f}x" if kind == "mqtt" else "1",
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "drain",
                "telegrams/s",
                "total time",
                "CPU µs/telegram daemon / broker or server",
                "daemon peak RSS MiB",
                "exactly once / in order",
                "MQTT vs HTTP",
            ],
        )
    )
    print("\nspool after: " + ", ".join(f"{k} {r.in_flight}: {r.spool_left}" for k, r in runs))
    dump_json(args.json, results)


if __name__ == "__main__":
    main()
