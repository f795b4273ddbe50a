#!/usr/bin/env python3
"""Budget 5 of issue 7: time from process start to READY with a 100,000-telegram backlog.

Why: systemd waits for READY (``Type=notify``) and restarts the daemon after a crash; a Pi that
reboots after a long outage must be reading the meter again at once, backlog or not. Goal: READY
within 1 s with 100,000 telegrams spooled. Baseline in the same run: the same daemon with an
empty spool.

How: ``python -m dsmr_logger run --config ...`` is spawned with ``NOTIFY_SOCKET`` pointing at a
datagram socket this script holds; the time is from ``Popen`` to the arrival of ``READY=1``. The
sink refuses connections and no meter is attached, so the spool is the same for every run. Runs
alternate (empty, backlog) to spread machine noise; "cold" runs first evict the spool file from
the page cache (``posix_fadvise(DONTNEED)`` on the spool's files only), as after a reboot; the
interpreter and libraries stay cached. Breakdown: the interpreter with the daemon's imports alone,
and the spool queries the daemon runs at start, timed in-process on the same files.

Usage (about 1 minute): ``.venv/bin/python bench/startup.py [--runs 5] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    PYTHON,
    SINK,
    Children,
    Daemon,
    Server,
    build_spool,
    child_env,
    dump_json,
    io_counters,
    machine,
    real_disk_dir,
    spool_files,
    spool_size,
    table,
    verdict,
    write_config,
)

from dsmr_logger.delivery.spool import Spool

GOAL_S = 1.0
BACKLOG = 100_000


def evict(spool: Path) -> None:
    """Drop the spool's files (only them) from the page cache."""
    for path in spool_files(spool):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def start_once(children: Children, server: Server, work: Path, cold: bool) -> tuple[float, int]:
    """Seconds from spawn to READY=1, and bytes the daemon read from disk by then."""
    if cold:
        evict(work / "spool.sqlite3")
    config = write_config(work, meter_port=work / "no-meter", server_url=server.url)
    daemon = Daemon(children, config, work)
    seconds = daemon.wait_ready(timeout=60)
    read = io_counters(daemon.pid)["read_bytes"]
    if daemon.stop() != 0:
        raise RuntimeError("the daemon did not stop cleanly:\n" + "\n".join(daemon.lines[-10:]))
    return seconds, read


def imports_only(runs: int) -> float:
    """Median seconds for the interpreter to start and import what the daemon imports."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run(
            [PYTHON, "-c", "import dsmr_logger.cli, dsmr_logger.daemon"],
            check=True,
            env=child_env(),
        )
        times.append(time.monotonic() - started)
    return statistics.median(times)


def spool_queries(spool: Path, cold: bool) -> dict[str, tuple[float, float]]:
    """What ``Queues.open`` asks the spool at start, step by step: (ms, MiB read from disk)."""
    if cold:
        evict(spool)
    store = Spool(spool, max_bytes=1 << 40)
    me = os.getpid()
    steps: dict[str, tuple[float, float]] = {}
    for name, call in (
        ("Spool.open (as the daemon)", store.open),
        ("last_seq", store.last_seq),
        ("backlogs (segment summaries; reads the cursor's segment)", store.backlogs),
        ("backlog_upto", lambda: store.backlog_upto(SINK)),
        ("requeued", lambda: store.requeued([SINK])),
    ):
        read = io_counters(me)["read_bytes"]
        started = time.perf_counter()
        call()
        seconds = time.perf_counter() - started
        steps[name] = (seconds * 1e3, (io_counters(me)["read_bytes"] - read) / 2**20)
    store.close()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5, help="starts per situation (median)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()

    info = machine()
    print(f"machine: {info}")
    results: dict[str, Any] = {"machine": info}
    empty = real_disk_dir("dsmr-bench-start-")
    nothing = Spool(empty / "spool.sqlite3", max_bytes=1 << 30)
    nothing.open()  # the file exists and holds nothing
    nothing.close()
    full = real_disk_dir("dsmr-bench-start-")
    print(f"spooling {BACKLOG:,} telegrams ...", flush=True)
    build_spool(full / "spool.sqlite3", BACKLOG)
    size = spool_size(full / "spool.sqlite3") / 2**20
    times: dict[str, list[tuple[float, int]]] = {"empty": [], "backlog": [], "backlog cold": []}
    with Children() as children:
        server = children.server(mode="refuse")
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs} ...", flush=True)
            times["empty"].append(start_once(children, server, empty, cold=False))
            times["backlog"].append(start_once(children, server, full, cold=False))
            times["backlog cold"].append(start_once(children, server, full, cold=True))
    floor = imports_only(args.runs)
    warm_queries = spool_queries(full / "spool.sqlite3", cold=False)
    cold_queries = spool_queries(full / "spool.sqlite3", cold=True)
    results.update(
        times=times,
        imports_only_s=floor,
        queries_warm_ms=warm_queries,
        queries_cold_ms=cold_queries,
    )

    base = statistics.median(t for t, _ in times["empty"])
    rows = []
    for label, runs in times.items():
        seconds = [t for t, _ in runs]
        median = statistics.median(seconds)
        goal = label.startswith("backlog")
        rows.append(
            [
                f"{label} ({0 if label == 'empty' else BACKLOG:,} spooled)",
                f"{median:.3f}",
                f"{max(seconds):.3f}",
                f"{statistics.median(r for _, r in runs) / 2**20:.1f}",
                f"{median / base:.2f}",
                f"< {GOAL_S:g} s: {verdict(max(seconds) < GOAL_S)}" if goal else "baseline",
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "spool",
                "READY after s (median)",
                "max s",
                "read from disk MiB",
                "ratio to empty spool",
                "goal",
            ],
        )
    )
    print(f"\nspool file with {BACKLOG:,} telegrams: {size:.1f} MiB")
    print(f"interpreter + the daemon's imports alone: {floor:.3f} s (median)")
    print("start-up spool queries on the backlog, in-process: ms warm / ms cold, MiB read cold")
    for name, (ms, _) in warm_queries.items():
        cold_ms, cold_mib = cold_queries[name]
        print(f"  {ms:7.1f} / {cold_ms:7.1f} ms, {cold_mib:5.1f} MiB  {name}")
    dump_json(args.json, results)


if __name__ == "__main__":
    main()
