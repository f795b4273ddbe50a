#!/usr/bin/env python3
"""Budget 4 of issue 7: how fast the daemon drains a spooled backlog after a long outage.

Why: after a day without DSMR-reader, 86,400 telegrams (one day of DSMR 5 at 1 Hz) wait in the
spool, and the user wants the graphs back soon. Goals: at least 5x the telegrams/s of DSMR-reader's
remote-datalogger client measured in the same run, keeping delivery order and at-least-once; and
against a server that takes 12 ms per request (DSMR-reader's own speed is 70-85 posts/s), at least
90 % of that server's capacity. The server is the test server with ``delay`` 12 ms and one worker
(one request processed at a time); its capacity is measured in the same run by a saturating client
(``bench/_clients.py saturating``: four raw keep-alive connections at once, so the server never
waits for a client). The nominal 1 / 0.012 s = 83.3 posts/s is shown too: no server reaches it,
since each request also costs the server its own CPU and its timer's lateness.

How: the backlog is written straight into a fresh spool with ``Spool.commit`` (778-byte telegrams
of the bundled DSMR 5 capture, meter timestamps one second apart, valid CRCs: all distinct). The
daemon (``python -m dsmr_logger run``, a real process, no meter attached) starts on it with one v1
sink, the DSMR-reader test server on 127.0.0.1 answering 201; the time runs from READY (systemd
notify) to the server holding the last telegram. The server then hands back everything it stored,
which must be exactly the spooled telegrams, each once, and (with the default ``max_in_flight`` 1)
in spool order; the spool must be empty. Each drain runs with the default and again with
``sink.max_in_flight`` (4 for the fast server, 2 for the slow one), which sends that many at once,
confirmed in queue order (arrival order at the server may then differ within a window).

Baselines, same server, same telegrams (a sample of ``--sample``, rate = posts / seconds): the
remote-datalogger client (``requests.post`` per telegram, no session, sequential) and, for
reference, a sequential keep-alive aiohttp client and a prototype raw keep-alive HTTP/1.1 client
on asyncio streams (``bench/_clients.py``: what a leaner sink could reach, one request at a
time). The slow-server part uses a smaller backlog (``--slow``, default 3,000 = 36 s at
capacity) and the server's ``delay`` knob.

Usage (about 5 minutes; ``--quick`` 20,000 telegrams, about 2): ``.venv/bin/python
bench/drain.py [--quick] [--telegrams N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    Children,
    Daemon,
    Server,
    build_spool,
    cpu_seconds,
    day_telegrams,
    dump_json,
    machine,
    memory_kb,
    real_disk_dir,
    run_client,
    spool_rows,
    table,
    verdict,
    write_config,
)

GOAL_RATIO = 5.0
GOAL_CAPACITY = 0.90
DELAY = 0.012


@dataclass
class Drain:
    telegrams: int
    seconds: float
    ready_s: float
    daemon_cpu_s: float
    server_cpu_s: float
    peak_rss_kb: int
    exactly_once: bool
    in_order: bool
    spool_left: dict[str, int]
    in_flight: int = 1

    @property
    def rate(self) -> float:
        return self.telegrams / self.seconds


def drain(children: Children, server: Server, count: int, in_flight: int = 1) -> Drain:
    work = real_disk_dir("dsmr-bench-drain-")
    spool = work / "spool.sqlite3"
    print(f"  spooling {count:,} telegrams ...", flush=True)
    build_spool(spool, count)
    server.control(reset=True, mode="ok")
    config = write_config(
        work,
        meter_port=work / "no-meter",
        server_url=server.url,
        sink={"max_in_flight": in_flight} if in_flight > 1 else None,
    )
    daemon = Daemon(children, config, work)
    ready = daemon.wait_ready(timeout=60)
    started = time.monotonic()
    c0, s0 = cpu_seconds(daemon.pid), cpu_seconds(server.pid)
    deadline = started + 60 + count * 0.05
    delivered = 0
    while delivered < count and time.monotonic() < deadline:
        time.sleep(0.25)
        delivered = server.received_count()
    seconds = time.monotonic() - started
    c1, s1 = cpu_seconds(daemon.pid), cpu_seconds(server.pid)
    peak = memory_kb(daemon.pid)["VmHWM"]
    daemon.stop()
    received = server.received()
    expected = [t.decode() for t in day_telegrams(count)]
    return Drain(
        delivered,
        seconds,
        ready,
        c1 - c0,
        s1 - s0,
        peak,
        sorted(received) == sorted(expected),
        received == expected,
        spool_rows(spool),
        in_flight,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="20,000 telegrams, smaller samples")
    parser.add_argument("--telegrams", type=int, help="backlog to drain (default 86,400)")
    parser.add_argument("--sample", type=int, help="baseline posts (default 3,000, quick 1,000)")
    parser.add_argument("--slow", type=int, help="backlog for the 12 ms server (default 3,000)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    count = args.telegrams or (20_000 if args.quick else 86_400)
    sample = args.sample or (1_000 if args.quick else 3_000)
    slow = args.slow or (1_000 if args.quick else 3_000)

    info = machine("requests")
    print(f"machine: {info}")
    results: dict[str, Any] = {"machine": info}
    with Children() as children:
        server = children.server()
        print(f"daemon drains {count:,} telegrams to a server answering 201 ...", flush=True)
        fast = drain(children, server, count)
        print("baselines against the same server ...", flush=True)
        server.control(reset=True, delay=0)
        plain = run_client("requests", server.url, sample)
        server.control(reset=True)
        keepalive = run_client("aiohttp", server.url, sample)
        server.control(reset=True)
        raw = run_client("raw", server.url, sample)
        print(f"daemon drains {count:,} telegrams with max_in_flight = 4 ...", flush=True)
        server.control(reset=True, delay=0)
        pipelined = drain(children, server, count, in_flight=4)
        print(f"capacity of a server taking {DELAY * 1e3:g} ms, one worker ...", flush=True)
        server.control(reset=True, delay=DELAY, workers=1)
        saturated = run_client("saturating", server.url, min(sample, 500))
        print(f"daemon drains {slow:,} telegrams to that server ...", flush=True)
        server.control(reset=True)
        slowed = drain(children, server, slow)
        print(f"... and {slow:,} with max_in_flight = 2 ...", flush=True)
        server.control(reset=True)
        slowed2 = drain(children, server, slow, in_flight=2)
        server.control(reset=True)
        plain_slow = run_client("requests", server.url, min(sample, 500))
        server.control(reset=True, delay=0, workers=None)
    results.update(
        fast=asdict(fast),
        requests=plain,
        aiohttp_keepalive=keepalive,
        raw_keepalive=raw,
        pipelined=asdict(pipelined),
        slow=asdict(slowed),
        slow_in_flight_2=asdict(slowed2),
        requests_slow=plain_slow,
        saturating_slow=saturated,
    )

    plain_rate = plain["posts"] / plain["wall_s"]
    ka_rate = keepalive["posts"] / keepalive["wall_s"]
    raw_rate = raw["posts"] / raw["wall_s"]
    slow_plain_rate = plain_slow["posts"] / plain_slow["wall_s"]
    nominal = 1 / DELAY
    capacity = saturated["posts"] / saturated["wall_s"]
    print()

    def daemon_row(run: Drain, what: str, ratio: str, goal: str) -> list[str]:
        return [
            f"daemon, {run.telegrams:,} spooled, {what}, max_in_flight {run.in_flight}",
            f"{run.rate:,.1f}",
            f"{run.seconds:,.1f} s",
            f"{run.daemon_cpu_s / run.telegrams * 1e6:.0f} / "
            f"{run.server_cpu_s / run.telegrams * 1e6:.0f}",
            f"{run.peak_rss_kb / 1024:.1f}",
            f"{'yes' if run.exactly_once else 'NO'} / {'yes' if run.in_order else 'no'}",
            ratio,
            goal,
        ]

    def client_row(label: str, rate: float, ratio: str, scaled: bool = True) -> list[str]:
        scaled_time = f"{count / rate:,.1f} s (scaled)" if scaled else ""
        return [label, f"{rate:,.1f}", scaled_time, "", "", "", ratio, ""]

    def vs_requests(run: Drain) -> tuple[str, str]:
        ratio = run.rate / plain_rate
        return f"{ratio:.2f}x requests", f"≥ {GOAL_RATIO:g}x: {verdict(ratio >= GOAL_RATIO)}"

    def vs_capacity(run: Drain) -> tuple[str, str]:
        share = run.rate / capacity
        return (
            f"{share:.1%} of {capacity:.1f}/s measured ({run.rate / nominal:.1%} of "
            f"{nominal:.1f}/s nominal)",
            f"≥ {GOAL_CAPACITY:.0%}: {verdict(share >= GOAL_CAPACITY)}",
        )

    fast_what = "server answers at once"
    slow_what = f"server takes {DELAY * 1e3:g} ms, one worker"
    rows = [
        daemon_row(fast, fast_what, *vs_requests(fast)),
        daemon_row(pipelined, fast_what, *vs_requests(pipelined)),
        client_row(
            f"baseline: requests.post per telegram, no session ({plain['posts']:,} posts)",
            plain_rate,
            "1",
        ),
        client_row(
            f"reference: keep-alive aiohttp, sequential ({keepalive['posts']:,} posts)",
            ka_rate,
            f"{ka_rate / plain_rate:.2f}x requests",
        ),
        client_row(
            f"prototype: raw keep-alive HTTP/1.1 on asyncio streams ({raw['posts']:,} posts)",
            raw_rate,
            f"{raw_rate / plain_rate:.2f}x requests",
        ),
        client_row(
            f"capacity: {slow_what}, 4 raw clients at once ({saturated['posts']:,} posts)",
            capacity,
            f"{capacity / nominal:.1%} of {nominal:.1f}/s nominal",
            scaled=False,
        ),
        daemon_row(slowed, slow_what, *vs_capacity(slowed)),
        daemon_row(slowed2, slow_what, *vs_capacity(slowed2)),
        client_row(
            f"baseline: requests.post, {slow_what} ({plain_slow['posts']} posts)",
            slow_plain_rate,
            f"{slow_plain_rate / capacity:.1%} of capacity",
            scaled=False,
        ),
    ]
    print(
        table(
            rows,
            [
                "run",
                "telegrams/s",
                "total time",
                "CPU µs/telegram daemon / server",
                "daemon peak RSS MiB",
                "exactly once / in order at the server",
                "ratio",
                "goal",
            ],
        )
    )
    print(
        f"\nspool after the drains: {fast.spool_left}, {pipelined.spool_left}, "
        f"{slowed.spool_left}, {slowed2.spool_left}; "
        f"READY after {fast.ready_s:.2f} s with {fast.telegrams:,} spooled"
    )
    dump_json(args.json, results)


if __name__ == "__main__":
    main()
