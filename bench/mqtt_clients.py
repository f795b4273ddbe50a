#!/usr/bin/env python3
"""Issue 17: why the MQTT sink has its own client: aiomqtt and ``net/mqtt.py`` in the three cases.

The sink may let a telegram leave the spool only when the broker took it. Three cases decide
whether a client can say that, each run against a real Mosquitto (``tests/mosquitto.py``):

1. the broker refuses a message (its ACL forbids the topic: MQTT 5 PUBACK ``0x87``);
2. the broker refuses a message over its ``message_size_limit`` (Mosquitto: PUBACK ``0x95``);
3. the broker dies while a publish awaits its PUBACK (SIGSTOP, publish, SIGKILL): how long until
   the publish fails, with a 15 s timeout.

Plus what importing each client costs (RSS of a fresh interpreter after the import).

Usage: ``.venv/bin/pip install aiomqtt`` (in the ``bench`` extra), then
``.venv/bin/python bench/mqtt_clients.py [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _harness import dump_json, machine, table
from mosquitto import Mosquitto

from dsmr_logger.net import mqtt

USER, PASSWORD = "bench", "bench-password"
TIMEOUT = 15.0

Publish = Callable[[str, bytes], Awaitable[str]]


async def with_aiomqtt(port: int, case: Callable[[Publish], Awaitable[str]]) -> str:
    import aiomqtt

    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        username=USER,
        password=PASSWORD,
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=TIMEOUT,
    ) as client:

        async def publish(topic: str, payload: bytes) -> str:
            await client.publish(topic, payload, qos=1)
            return "returned as delivered"

        return await case(publish)


async def with_ours(port: int, case: Callable[[Publish], Awaitable[str]]) -> str:
    client = mqtt.MqttClient(
        "127.0.0.1", port, client_id="bench", username=USER, password=PASSWORD, timeout=TIMEOUT
    )
    await client.connect()

    async def publish(topic: str, payload: bytes) -> str:
        answer = await client.publish(topic, payload, qos=1)
        return "returned as delivered" if answer.accepted else f"refused: {answer.describe()}"

    try:
        return await case(publish)
    finally:
        await client.close()


async def guarded(publish: Publish, topic: str, payload: bytes) -> str:
    started = time.monotonic()
    try:
        return await publish(topic, payload)
    except Exception as exc:
        return f"{type(exc).__name__} after {time.monotonic() - started:.2f} s: {exc}"[:160]


def import_rss_kib(module: str) -> int:
    code = (
        f"import {module}\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmRSS'): print(line.split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout)


async def run(directory: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    clients = {"aiomqtt": with_aiomqtt, "net/mqtt.py": with_ours}
    with Mosquitto(
        directory / "acl",
        users={USER: PASSWORD},
        acl={USER: ["allowed/#"]},
        message_size_limit=1000,
    ) as broker:
        for name, connect in clients.items():
            results[f"{name}: ACL-denied topic"] = await connect(
                broker.port, lambda publish: guarded(publish, "denied/x", b"1")
            )
            results[f"{name}: over message_size_limit"] = await connect(
                broker.port, lambda publish: guarded(publish, "allowed/x", b"x" * 2000)
            )
    for name, connect in clients.items():
        broker = Mosquitto(directory / f"kill-{name.replace('/', '-')}", users={USER: PASSWORD})
        broker.start()

        async def killed(publish: Publish, broker: Mosquitto = broker) -> str:
            broker.pause()
            waiting = asyncio.ensure_future(guarded(publish, "x", b"1"))
            await asyncio.sleep(0.3)
            broker.kill()
            return await waiting

        try:
            with contextlib.suppress(Exception):
                results[f"{name}: broker killed mid-publish"] = await connect(broker.port, killed)
        finally:
            broker.kill()
    results["import RSS KiB: python alone"] = import_rss_kib("sys")
    results["import RSS KiB: aiomqtt (with paho-mqtt)"] = import_rss_kib("aiomqtt")
    results["import RSS KiB: dsmr_logger.net.mqtt"] = import_rss_kib("dsmr_logger.net.mqtt")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    info = machine("aiomqtt", "paho-mqtt")
    print(f"machine: {info}")
    with tempfile.TemporaryDirectory() as scratch:
        results = asyncio.run(run(Path(scratch)))
    print(table([[k, str(v)] for k, v in results.items()], ["case", "outcome"]))
    dump_json(args.json, {"machine": info, **results})


if __name__ == "__main__":
    main()
