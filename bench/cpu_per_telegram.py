#!/usr/bin/env python3
"""Budget 1 of issue 7: CPU seconds per telegram of the whole daemon, as a real process.

Why: dsmr-logger runs for years on a Raspberry Pi; its CPU per telegram (read, framing, CRC,
queueing, delivery) is what it costs the Pi. Goal: at most 300 µs per telegram. Baseline, in the
same run: DSMR-reader's remote-datalogger client (``requests.post`` per telegram, no session),
charged with its own CPU per post only (``bench/_clients.py``).

What runs: ``dsmr-logger simulate`` plays the bundled DSMR 5 capture (778-byte telegrams) on a
pty, ``python -m dsmr_logger run`` reads it and delivers every telegram to one v1 sink, the
DSMR-reader test server (``tests/dsmr_reader_server.py``) on 127.0.0.1. The daemon's CPU is its
process CPU clock (all threads), read from outside; ``/proc/<pid>/stat`` utime+stime is shown too.

Three paces:

- 1 Hz, the meter's real pace (``--seconds``, default 60 telegrams): each telegram finds cold
  caches, and the daemon's own timers between telegrams are charged to them too;
- 20 Hz, warm, no spooling (the sink keeps up, so nothing reaches the disk);
- flat out (``--interval 0``): the simulator writes as fast as the daemon reads; the reader
  outruns the sink, so most telegrams are spooled and read back, and that is charged too.

The remote-datalogger baseline runs at the same three paces (1 Hz and 20 Hz against a second
server process, at the same time as the daemon's run), and so do two references: a sequential
keep-alive aiohttp client (what the daemon's sink does per telegram) and a prototype raw
keep-alive HTTP/1.1 client on asyncio streams (what a leaner sink could cost). An idle run (meter
connected, silent) gives the daemon's own CPU per second, which at 1 Hz every telegram carries.
``--profile`` adds a 20 Hz run under ``py-spy record`` (``.venv/bin/pip install py-spy``) and
prints where the busy samples are.
An in-process breakdown times the per-telegram steps (CRC, framing, log glance, form encoding).

Usage (about 3 minutes; ``--quick`` about 1): ``.venv/bin/python bench/cpu_per_telegram.py
[--quick] [--profile] [--json FILE]``. Needs ``requests`` in the venv for the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    Children,
    Daemon,
    Server,
    Simulator,
    cpu_seconds,
    dump_json,
    io_counters,
    machine,
    profile_summary,
    py_spy_record,
    real_disk_dir,
    run_client,
    stat_cpu_seconds,
    table,
    templates,
    verdict,
    wait_until,
    write_config,
)

GOAL_US = 300.0


@dataclass
class DaemonRun:
    label: str
    interval: float
    telegrams: int
    cpu_s: float
    stat_cpu_s: float
    system_share: float
    wall_s: float
    write_bytes: int

    @property
    def us_per_telegram(self) -> float:
        return self.cpu_s / self.telegrams * 1e6

    @property
    def stat_us_per_telegram(self) -> float:
        return self.stat_cpu_s / self.telegrams * 1e6


def stat_split(pid: int) -> tuple[float, float]:
    """(utime, stime) seconds from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure_daemon(
    children: Children,
    server: Server,
    *,
    label: str,
    interval: float,
    count: int,
    warmup: int,
    profile: Path | None = None,
) -> DaemonRun:
    """One daemon, one simulator; CPU from ``warmup`` telegrams delivered to the last one."""
    work = real_disk_dir("dsmr-bench-cpu-")
    server.control(reset=True, mode="ok")
    config = write_config(work, meter_port=work / "meter", server_url=server.url)
    daemon = Daemon(children, config, work)
    daemon.wait_ready()
    spy: threading.Thread | None = None
    if warmup == 0:
        base = (0, cpu_seconds(daemon.pid), stat_cpu_seconds(daemon.pid), time.monotonic())
    simulator = Simulator(children, work / "meter", interval=interval, count=count)
    if warmup:
        wait_until(lambda: server.received_count() >= warmup, 30 + warmup * interval, "warm-up")
        base = (
            server.received_count(),
            cpu_seconds(daemon.pid),
            stat_cpu_seconds(daemon.pid),
            time.monotonic(),
        )
    io_before = io_counters(daemon.pid)["write_bytes"]
    split_before = stat_split(daemon.pid)
    if profile is not None:
        seconds = max(1.0, (count - warmup) * interval - 2)
        spy = threading.Thread(
            target=py_spy_record, args=(daemon.pid, seconds, profile), kwargs={"rate": 1000}
        )
        spy.start()
    last = base
    quiet = max(2.0, 3 * interval)
    deadline = time.monotonic() + 120 + count * max(interval, 0.005)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        delivered = server.received_count()
        if delivered != last[0]:
            last = (
                delivered,
                cpu_seconds(daemon.pid),
                stat_cpu_seconds(daemon.pid),
                time.monotonic(),
            )
        elif simulator.process.poll() is not None and time.monotonic() - last[3] > quiet:
            break
    written = io_counters(daemon.pid)["write_bytes"] - io_before
    user, system = (b - a for a, b in zip(split_before, stat_split(daemon.pid), strict=True))
    if spy is not None:
        spy.join()
    daemon.stop()
    return DaemonRun(
        label,
        interval,
        last[0] - base[0],
        last[1] - base[1],
        last[2] - base[2],
        system / (user + system) if user + system else 0.0,
        last[3] - base[3],
        written,
    )


def measure_idle(
    children: Children, server: Server, seconds: float, spool: dict[str, Any] | None = None
) -> float:
    """CPU ms per second of a daemon whose meter is connected but sends nothing.

    (After ``idle_timeout``, 30 s, the reader reopens such a link; that is in the figure too.)
    """
    work = real_disk_dir("dsmr-bench-cpu-")
    server.control(reset=True, mode="ok")
    config = write_config(work, meter_port=work / "meter", server_url=server.url, spool=spool)
    daemon = Daemon(children, config, work)
    daemon.wait_ready()
    # The simulator's first telegram is written before the daemon opens the port, which flushes
    # it (as with a real meter): the link is open and silent from then on.
    Simulator(children, work / "meter", interval=3600, count=2)
    daemon.wait_event("meter link open", 30)
    time.sleep(3.0)
    before = cpu_seconds(daemon.pid)
    time.sleep(seconds)
    spent = cpu_seconds(daemon.pid) - before
    daemon.stop()
    return spent / seconds * 1e3


def breakdown(rounds: int = 2000) -> dict[str, float]:
    """Warm, in-process µs per call of the per-telegram steps (best of 5)."""
    from dsmr_logger.delivery.sinks.dsmr_reader import v1_form
    from dsmr_logger.sources.p1.crc import crc16
    from dsmr_logger.sources.p1.framing import FrameAssembler
    from dsmr_logger.telegram.glance import glance

    telegram = templates()[0]
    assembler = FrameAssembler()
    steps: dict[str, Any] = {
        "crc16 over 778 B (two bytes a step, 64K table)": lambda: crc16(telegram),
        "FrameAssembler.feed, one telegram (CRC included)": lambda: assembler.feed(telegram, 0.0),
        "glance() for the debug log line (debug level only)": lambda: glance(telegram),
        "the v1 form (v1_form)": lambda: v1_form(telegram),
    }
    result = {}
    for name, step in steps.items():
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(rounds):
                step()
            best = min(best, (time.perf_counter() - started) / rounds)
        result[name] = best * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 1 minute)")
    parser.add_argument("--seconds", type=int, help="telegrams at 1 Hz (default 60, quick 20)")
    parser.add_argument("--flat", type=int, help="telegrams flat out (default 20000, quick 5000)")
    parser.add_argument("--profile", action="store_true", help="extra 20 Hz run under py-spy")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    seconds = args.seconds or (20 if args.quick else 60)
    flat = args.flat or (5000 if args.quick else 20000)
    warm = 200 if args.quick else 600
    idle_seconds = 10 if args.quick else 30
    posts = 300 if args.quick else 1000

    print(f"machine: {machine('requests')}")
    results: dict[str, Any] = {"machine": machine("requests")}
    with Children() as children:
        server = children.server()
        other = children.server()  # the baselines', when they run beside the daemon

        def paced(kind: str, count: int, interval: float, out: dict[str, Any]) -> None:
            out.update(run_client(kind, other.url, count, interval=interval))

        runs: list[tuple[DaemonRun, dict[str, Any], dict[str, Any], dict[str, Any]]] = []
        for label, interval, count, warmup in (
            ("1 Hz (meter pace)", 1.0, seconds, 3),
            ("20 Hz (warm, sink keeps up)", 0.05, warm, 20),
            ("flat out (--interval 0)", 0.0, flat, 0),
        ):
            print(f"{label}: {count} telegrams ...", flush=True)
            baseline: dict[str, Any] = {}
            keepalive: dict[str, Any] = {}
            raw: dict[str, Any] = {}
            threads = []
            if interval:
                for kind, out in (("requests", baseline), ("aiohttp", keepalive), ("raw", raw)):
                    thread = threading.Thread(target=paced, args=(kind, count, interval, out))
                    thread.start()
                    threads.append(thread)
            run = measure_daemon(
                children,
                server,
                label=label,
                interval=interval,
                count=count + warmup,
                warmup=warmup,
            )
            for thread in threads:
                thread.join()
            if not interval:
                baseline.update(run_client("requests", other.url, posts))
                keepalive.update(run_client("aiohttp", other.url, posts))
                raw.update(run_client("raw", other.url, posts))
            runs.append((run, baseline, keepalive, raw))
        print(f"idle: connected to a silent meter, {idle_seconds} s ...", flush=True)
        idle = measure_idle(children, server, idle_seconds)
        idle_slow_flusher = measure_idle(
            children, server, idle_seconds, spool={"flush_interval": 60.0}
        )
        profile = None
        if args.profile:
            raw = Path(real_disk_dir("dsmr-bench-prof-")) / "cpu-20hz.txt"
            print("profiling a 20 Hz run (60 s) with py-spy ...", flush=True)
            measure_daemon(
                children,
                server,
                label="profile",
                interval=0.05,
                count=1220,
                warmup=20,
                profile=raw,
            )
            profile = profile_summary(raw, top=25) if raw.exists() else None

    rows = []
    for run, baseline, keepalive, raw in runs:
        base_us = baseline["cpu_s"] / baseline["posts"] * 1e6
        ka_us = keepalive["cpu_s"] / keepalive["posts"] * 1e6
        raw_us = raw["cpu_s"] / raw["posts"] * 1e6
        rows.append(
            [
                run.label,
                run.telegrams,
                f"{run.us_per_telegram:.0f}",
                f"{run.stat_us_per_telegram:.0f}",
                f"{run.system_share:.0%}",
                f"{run.telegrams / run.wall_s:.1f}",
                "yes" if run.write_bytes else "no",
                f"{base_us:.0f}",
                f"{run.us_per_telegram / base_us:.2f}",
                f"{ka_us:.0f}",
                f"{raw_us:.0f}",
                f"≤ {GOAL_US:.0f}",
                verdict(run.us_per_telegram <= GOAL_US),
            ]
        )
        results[run.label] = {
            "daemon": asdict(run),
            "baseline_requests": baseline,
            "aiohttp_keepalive": keepalive,
            "raw_keepalive": raw,
        }
    print()
    print(
        table(
            rows,
            [
                "pace",
                "telegrams",
                "daemon CPU µs/telegram",
                "(stat ticks)",
                "kernel share",
                "delivered/s",
                "spooled",
                "baseline requests.post µs/post",
                "ratio daemon/baseline",
                "keep-alive aiohttp client µs/post",
                "prototype raw keep-alive client µs/post",
                "goal",
                "",
            ],
        )
    )
    results["idle_ms_per_s"] = idle
    results["idle_ms_per_s_flush_interval_60"] = idle_slow_flusher
    print(
        f"\nidle daemon (meter connected, silent): {idle:.3f} ms CPU per second, charged to "
        f"every telegram at 1 Hz; with flush_interval = 60 (the flusher and its requeue poll "
        f"every 30 s instead of 2.5 s): {idle_slow_flusher:.3f} ms per second"
    )
    steps = breakdown()
    results["breakdown_us"] = steps
    print("\nin-process, warm, µs per telegram:")
    for name, us in steps.items():
        print(f"  {us:7.1f}  {name}")
    if profile:
        results["profile_20hz"] = profile
        print("\npy-spy, 20 Hz run, busy samples (idle waits left out): self / inclusive")
        for frame, own, incl in profile:
            print(f"  {own:6.1%} {incl:6.1%}  {frame}")
    dump_json(args.json, results)


if __name__ == "__main__":
    main()
