#!/usr/bin/env python3
"""Budget 3 of issue 7: bytes the daemon writes to disk per telegram, and its fsyncs.

Why: an SD card wears out by the bytes written to it. Goals, in the default ``batched``
durability: nothing written while the sink is healthy, and at most 1.5 x the telegram size
(778 B → 1,167 B) per telegram while an outage is spooled. ``strict`` durability is reported too.
Baseline in the same run: SQLite in WAL mode with one ``synchronous=FULL`` transaction per
telegram (the obvious "store every telegram safely" design), measured the same way.

How: the daemon runs as a real process under ``strace -f -ttt -y -e trace=fsync,fdatasync,
pwrite64`` (if strace is installed; ``apt-get install strace``), its spool in a fresh directory
under ``/var/tmp`` (a block device, checked: on tmpfs ``write_bytes`` stays 0). Its log goes to a
pipe (as to journald), so log lines are not charged to it. Per telegram:

- ``write_bytes`` from ``/proc/<pid>/io`` between two instants of steady state. Linux charges it
  when a page-cache folio is first dirtied, in whole folios (4 KiB pages or larger folios), to the
  dirtying task; a folio dirtied again before writeback is not charged again, and filesystem
  journal writes are charged to no one. No ``sync`` is called in the window (it would clean pages
  and inflate the count);
- fsync + fdatasync calls, and the bytes handed to ``pwrite64`` per file (the telegrams' segment
  files; SQLite's WAL and database), in the same window, from strace's timestamps.

Situations: sink healthy (10 Hz); sink refusing connections while the meter plays — at 1 Hz with
the default ``flush_interval`` 5 s in real time, and 10x accelerated (10 Hz with
``flush_interval`` 0.5 s: the same telegrams per commit, so the same bytes per telegram, in a tenth
of the time); ``strict`` with a healthy and with a refusing sink (10 Hz; strict commits every
telegram on its own at any pace). A what-if run shows how bytes per telegram fall with bigger
batches: ``flush_interval`` 30 s (3.0 s at 10x).

Usage (about 7 minutes; ``--quick`` about 2, without the real-time 1 Hz and what-if runs):
``.venv/bin/python bench/disk_writes.py [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    PYTHON,
    TELEGRAM_SIZE,
    Children,
    Daemon,
    Server,
    Simulator,
    child_env,
    day_telegrams,
    dump_json,
    free_port,
    fs_type,
    io_counters,
    machine,
    real_disk_dir,
    table,
    verdict,
    wait_until,
    write_config,
)

from dsmr_logger.delivery.spool import SUFFIX

OUTAGE_GOAL = 1.5 * TELEGRAM_SIZE
_CALL = re.compile(
    r"^(?:\d+ +)?(?P<at>\d+\.\d+) (?P<name>fsync|fdatasync|pwrite64)"
    r"\((?P<fd>\d+)(?:<(?P<path>[^>]*)>)?.*\) = (?P<ret>-?\d+)"
)


@dataclass
class Traced:
    fsyncs: int = 0
    pwrite_bytes: dict[str, int] = field(default_factory=dict)
    wal_bursts: int = 0
    """Groups of WAL writes more than 20 ms apart: about one per transaction."""


def parse_strace(path: Path, start: float, end: float) -> Traced:
    """fsync/fdatasync calls and pwrite64 bytes per file between ``start`` and ``end``."""
    traced = Traced()
    last_wal = 0.0
    if not path.exists():
        return traced
    for line in path.read_text(errors="replace").splitlines():
        match = _CALL.match(line)
        if match is None:
            continue
        at = float(match["at"])
        if not start <= at <= end:
            continue
        if match["name"] in ("fsync", "fdatasync"):
            traced.fsyncs += 1
            continue
        name = Path(match["path"] or "?").name
        kind = (
            "wal"
            if name.endswith("-wal")
            else "db"
            if name.endswith(".sqlite3")
            else "segments"
            if name.endswith(SUFFIX)
            else name
        )
        traced.pwrite_bytes[kind] = traced.pwrite_bytes.get(kind, 0) + max(0, int(match["ret"]))
        if kind == "wal":
            if at - last_wal > 0.02:
                traced.wal_bursts += 1
            last_wal = at
    return traced


@dataclass
class Situation:
    label: str
    telegrams: int
    write_bytes: int
    seconds: float
    traced: Traced

    @property
    def per_telegram(self) -> float:
        return self.write_bytes / self.telegrams if self.telegrams else float("nan")

    def fsyncs_per_telegram(self) -> float:
        return self.traced.fsyncs / self.telegrams if self.telegrams else float("nan")


def strace_prefix(out: Path) -> list[str]:
    if shutil.which("strace") is None:
        return []
    return [
        "strace",
        "-f",
        "-qq",
        "-ttt",
        "-y",
        "-s",
        "0",
        "--seccomp-bpf",
        "-e",
        "trace=fsync,fdatasync,pwrite64",
        "-e",
        "signal=none",
        "-o",
        str(out),
    ]


def frames_read(daemon: Daemon, port: int) -> int:
    return int(daemon.status(port)["meter"]["frames"])


def situation(
    children: Children,
    server: Server,
    *,
    label: str,
    mode: str,
    interval: float,
    seconds: float,
    spool: dict[str, Any],
) -> Situation:
    """One daemon run; the window starts after the first flush and ends after the last."""
    work = real_disk_dir("dsmr-bench-disk-")
    server.control(reset=True, mode=mode)
    port = free_port()
    config = write_config(
        work, meter_port=work / "meter", server_url=server.url, spool=spool, http_port=port
    )
    trace = work / "strace.txt"
    daemon = Daemon(children, config, work, prefix=strace_prefix(trace))
    daemon.wait_ready()
    flush = float(spool.get("flush_interval", 5.0))
    count = int(seconds / interval)
    settle = flush + 2 * max(flush / 2, 0.05) + 2 * interval
    simulator = Simulator(children, work / "meter", interval=interval, count=count)
    wait_until(lambda: frames_read(daemon, port) >= 3, 30, "the first telegrams")
    time.sleep(settle)  # the first telegrams' flush (if any) is behind us: steady state
    t0, n0 = time.time(), frames_read(daemon, port)
    w0 = io_counters(daemon.pid)["write_bytes"]
    simulator.wait(timeout=seconds + 60)
    time.sleep(settle)  # the last telegrams' flush is in the window
    t1, n1 = time.time(), frames_read(daemon, port)
    w1 = io_counters(daemon.pid)["write_bytes"]
    daemon.stop()
    time.sleep(0.2)  # strace writes its last lines
    return Situation(label, n1 - n0, w1 - w0, t1 - t0, parse_strace(trace, t0, t1))


BASELINE = """
import os, sqlite3, sys, time
path, count = sys.argv[1], int(sys.argv[2])
telegrams = [line.encode("latin-1") for line in sys.stdin.read().split("\\0") if line]
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode = WAL")
db.execute("PRAGMA synchronous = FULL")
db.execute("CREATE TABLE telegrams (id INTEGER PRIMARY KEY, received_at REAL, data BLOB)")
for telegram in telegrams[:50]:  # warm-up: the file and the WAL exist, as for the daemon
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO telegrams (received_at, data) VALUES (?, ?)", (time.time(), telegram))
    db.execute("COMMIT")
io = lambda: int(open("/proc/self/io").read().split("write_bytes: ")[1].split()[0])
t0, w0 = time.time(), io()
for telegram in telegrams[50:50 + count]:
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO telegrams (received_at, data) VALUES (?, ?)", (time.time(), telegram))
    db.execute("COMMIT")
t1, w1 = time.time(), io()
print(t0, t1, w1 - w0)
"""


def sqlite_baseline(count: int) -> Situation:
    """One ``synchronous=FULL`` WAL transaction per telegram, in its own process, traced."""
    work = real_disk_dir("dsmr-bench-disk-")
    trace = work / "strace.txt"
    telegrams = b"\0".join(day_telegrams(count + 50)).decode("latin-1")
    command = [*strace_prefix(trace), PYTHON, "-c", BASELINE, str(work / "b.sqlite3"), str(count)]
    done = subprocess.run(
        command,
        input=telegrams,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env=child_env(),
    )
    t0, t1, written = done.stdout.split()
    traced = parse_strace(trace, float(t0), float(t1))
    return Situation(
        "baseline: SQLite WAL, synchronous=FULL, one transaction per telegram",
        count,
        int(written),
        float(t1) - float(t0),
        traced,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, no real-time 1 Hz")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    scale = 0.5 if args.quick else 1.0

    probe_dir = real_disk_dir("dsmr-bench-disk-")
    info = machine()
    print(f"machine: {info}")
    print(f"spool directory: {probe_dir.parent} ({fs_type(probe_dir)})")
    if shutil.which("strace") is None:
        print("strace not found: fsyncs are not counted (apt-get install strace)")
    results: dict[str, Any] = {"machine": info, "fs": fs_type(probe_dir)}
    plan: list[tuple[str, str, float, float, dict[str, Any]]] = [
        ("batched, sink healthy", "ok", 0.1, 30 * scale, {}),
        (
            "batched, sink down, 10x accelerated (10 Hz, flush_interval 0.5)",
            "refuse",
            0.1,
            90 * scale,
            {"flush_interval": 0.5},
        ),
    ]
    if not args.quick:
        plan.append(
            ("batched, sink down, real time (1 Hz, flush_interval 5)", "refuse", 1.0, 60, {})
        )
        plan.append(
            (
                "what-if: batched, sink down, flush_interval 30 (10x accelerated: 3.0)",
                "refuse",
                0.1,
                90,
                {"flush_interval": 3.0},
            )
        )
    plan += [
        ("strict, sink healthy", "ok", 0.1, 30 * scale, {"durability": "strict"}),
        ("strict, sink down", "refuse", 0.1, 30 * scale, {"durability": "strict"}),
    ]
    runs = []
    with Children() as children:
        server = children.server()
        for label, mode, interval, seconds, spool in plan:
            print(f"{label}: {seconds:g} s ...", flush=True)
            runs.append(
                situation(
                    children,
                    server,
                    label=label,
                    mode=mode,
                    interval=interval,
                    seconds=seconds,
                    spool=spool,
                )
            )
    print("baseline: SQLite WAL, synchronous=FULL ...", flush=True)
    baseline = sqlite_baseline(300)
    results["runs"] = [asdict(run) for run in runs]
    results["baseline"] = asdict(baseline)

    rows = []
    for run in [*runs, baseline]:
        per = run.per_telegram
        if "healthy" in run.label and run.label.startswith("batched"):
            goal, met = "0", run.write_bytes == 0
        elif run.label.startswith(("batched", "what-if")):
            goal, met = f"≤ {OUTAGE_GOAL:.0f} B", per <= OUTAGE_GOAL
        else:
            goal, met = "(reported)", None
        segments = run.traced.pwrite_bytes.get("segments", 0)
        wal = run.traced.pwrite_bytes.get("wal", 0)
        db = run.traced.pwrite_bytes.get("db", 0)
        n = max(1, run.telegrams)
        bursts = run.traced.wal_bursts
        rows.append(
            [
                run.label,
                run.telegrams,
                f"{per:,.0f}",
                f"{per / TELEGRAM_SIZE:.2f}",
                f"{per / baseline.per_telegram:.2f}" if run is not baseline else "1",
                f"{run.fsyncs_per_telegram():.2f}",
                f"{segments / n:,.0f} / {wal / n:,.0f} / {db / n:,.0f}",
                f"{run.telegrams / bursts:.1f}" if bursts else "—",
                goal,
                "" if met is None else verdict(met),
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "situation",
                "telegrams",
                "write_bytes / telegram",
                "x telegram (778 B)",
                "ratio to baseline",
                "fsyncs / telegram",
                "pwrite B / telegram: segments / WAL / db",
                "telegrams per WAL write burst",
                "goal",
                "",
            ],
        )
    )
    dump_json(args.json, results)


if __name__ == "__main__":
    main()
