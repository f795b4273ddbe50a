#!/usr/bin/env python3
"""Budget 2 of issue 7: the daemon's resident memory, steady and with a large spooled backlog.

Why: a Raspberry Pi Zero has 512 MB for everything, DSMR-reader included. Goals: RSS at most
40 MB after an hour's worth of telegrams, and RSS independent of the backlog size (a 100,000-
telegram backlog must stay on disk, read back a page at a time, never held in RAM).

What runs (the daemon as a real process, ``python -m dsmr_logger run``):

1. one hour-equivalent: ``dsmr-logger simulate --interval 0 --count 3600`` (3,600 telegrams
   played as fast as the daemon reads them) into the daemon with one healthy v1 sink; RSS after
   READY, the peak while reading and delivering (VmHWM), and VmRSS once all are delivered;
2. a spooled backlog of 0, 10,000 and 100,000 telegrams (written with ``Spool.commit``, realistic
   778-byte telegrams) and the daemon started against a sink that refuses connections, the meter
   playing at 10 Hz meanwhile (new telegrams keep joining the backlog): RSS 2 s after READY and
   after a while (``--hold``, default 30 s). Independence: 100,000 spooled may cost at most
   1 MiB more than 10,000 (any backlog at all fills SQLite's page cache, 2 MiB by default, once).

Baselines in the same run, each a fresh interpreter reporting its own RSS: a bare interpreter;
one with the daemon's imports (``dsmr_logger.cli`` and ``dsmr_logger.daemon``, which pull in
everything the daemon runs with); one importing ``dsmr_parser`` (installed into the venv for the
benchmark only) and parsing one telegram. A breakdown gives the RSS each of the daemon's imports
adds, cumulatively, in one interpreter. Sizes are MiB (the issue's "MB").

Usage (about 2.5 minutes; ``--quick`` about 1): ``.venv/bin/python bench/memory.py [--quick]
[--hold S] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    PYTHON,
    Children,
    Daemon,
    Server,
    Simulator,
    build_spool,
    child_env,
    dump_json,
    machine,
    memory_kb,
    real_disk_dir,
    spool_size,
    table,
    verdict,
    write_config,
)

GOAL_MIB = 40.0
FLAT_MIB = 1.0
"""Backlog independence: 90,000 more spooled telegrams (70 MB more on disk) add less than this."""

HEAVY = (
    "asyncio",
    "sqlite3",
    "structlog",
    "serialx",
    "aiohttp",
    "aiohttp.web",
    "prometheus_client",
    "cryptography.hazmat.primitives.ciphers.aead",
    "dsmr_logger.config",
    "dsmr_logger.daemon",
    "dsmr_logger.cli",
)
"""The daemon's imports, heaviest libraries first, in the order ``cumulative_imports`` adds them."""

CUMULATIVE = """
import gc, json, sys
def rss():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(rest.split()[0])
    return fields
steps = [("bare interpreter", rss())]
for name in sys.argv[1:]:
    __import__(name)
    gc.collect()
    steps.append((name, rss()))
print(json.dumps(steps))
"""

PROBE = """
import gc, sys, time
for name in sys.argv[1:]:
    __import__(name)
if "dsmr_parser" in sys.argv[1:]:
    from dsmr_parser import telegram_specifications
    from dsmr_parser.parsers import TelegramParser
    from dsmr_logger.telegram.capture import default_capture, frames_in
    TelegramParser(telegram_specifications.V5).parse(frames_in(default_capture())[0].decode())
gc.collect()
time.sleep(0.2)
status = open("/proc/self/status").read()
rollup = open("/proc/self/smaps_rollup").read()
print(status + rollup)
"""


def kb_fields(text: str) -> dict[str, int]:
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            values.setdefault(key.strip(), int(parts[0]))
    return values


def pss_kb(pid: int) -> int:
    return kb_fields(Path(f"/proc/{pid}/smaps_rollup").read_text()).get("Pss", 0)


def probe(*modules: str) -> dict[str, int]:
    """A fresh interpreter that imports ``modules`` and reports its own memory (kB)."""
    done = subprocess.run(
        [PYTHON, "-c", PROBE, *modules],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=child_env(),
    )
    return kb_fields(done.stdout)


def cumulative_imports(modules: tuple[str, ...]) -> list[tuple[str, dict[str, int]]]:
    """One interpreter importing ``modules`` in turn; RSS after each (kB)."""
    done = subprocess.run(
        [PYTHON, "-c", CUMULATIVE, *modules],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=child_env(),
    )
    return [(name, fields) for name, fields in json.loads(done.stdout)]


def mib(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def hour_equivalent(children: Children, server: Server, count: int) -> dict[str, Any]:
    work = real_disk_dir("dsmr-bench-mem-")
    server.control(reset=True, mode="ok")
    config = write_config(work, meter_port=work / "meter", server_url=server.url)
    daemon = Daemon(children, config, work)
    daemon.wait_ready()
    time.sleep(1.0)
    ready = memory_kb(daemon.pid)
    simulator = Simulator(children, work / "meter", interval=0, count=count)
    samples = []
    deadline = time.monotonic() + 300
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        samples.append(memory_kb(daemon.pid)["VmRSS"])
        delivered = server.received_count()
        if delivered != last:
            last, since = delivered, time.monotonic()
        elif simulator.process.poll() is not None and time.monotonic() - since > 2.0:
            break
    time.sleep(2.0)
    end = memory_kb(daemon.pid)
    end_pss = pss_kb(daemon.pid)
    daemon.stop()
    return {
        "telegrams_delivered": last,
        "ready_kb": ready["VmRSS"],
        "peak_kb": end["VmHWM"],
        "end_kb": end["VmRSS"],
        "end_anon_kb": end["RssAnon"],
        "end_file_kb": end["RssFile"],
        "end_pss_kb": end_pss,
        "samples_kb": samples,
    }


def with_backlog(children: Children, refusing: Server, backlog: int, hold: float) -> dict[str, Any]:
    work = real_disk_dir("dsmr-bench-mem-")
    built = build_spool(work / "spool.sqlite3", backlog) if backlog else 0.0
    config = write_config(work, meter_port=work / "meter", server_url=refusing.url)
    daemon = Daemon(children, config, work)
    ready_after = daemon.wait_ready()
    simulator = Simulator(children, work / "meter", interval=0.1, count=int(hold * 10) + 100)
    time.sleep(2.0)
    early = memory_kb(daemon.pid)
    peak = early["VmRSS"]
    until = time.monotonic() + hold
    while time.monotonic() < until:
        time.sleep(0.5)
        peak = max(peak, memory_kb(daemon.pid)["VmRSS"])
    late = memory_kb(daemon.pid)
    late_pss = pss_kb(daemon.pid)
    daemon.stop()
    simulator.process.terminate()
    spool_mib = spool_size(work / "spool.sqlite3") / 2**20
    return {
        "backlog": backlog,
        "spool_file_mib": spool_mib,
        "build_s": built,
        "ready_s": ready_after,
        "early_kb": early["VmRSS"],
        "late_kb": late["VmRSS"],
        "late_anon_kb": late["RssAnon"],
        "late_pss_kb": late_pss,
        "hwm_kb": late["VmHWM"],
        "sampled_peak_kb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter hold, smaller backlogs")
    parser.add_argument("--hold", type=float, help="seconds to watch each backlog (default 30)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    hold = args.hold or (10.0 if args.quick else 30.0)
    backlogs = (0, 10_000, 100_000)

    info = machine("dsmr-parser")
    print(f"machine: {info}")
    results: dict[str, Any] = {"machine": info}
    bare = probe()
    same = probe("dsmr_logger.cli", "dsmr_logger.daemon")
    parser_rss = probe("dsmr_parser")
    results["baselines_kb"] = {"bare": bare, "daemon_imports": same, "dsmr_parser": parser_rss}
    imports = cumulative_imports(HEAVY)
    results["cumulative_imports_kb"] = imports

    with Children() as children:
        server = children.server()
        refusing = children.server(mode="refuse")
        print("one hour-equivalent (3,600 telegrams, flat out) ...", flush=True)
        hour = hour_equivalent(children, server, 3600)
        results["hour"] = hour
        backlog_runs = []
        for backlog in backlogs:
            print(f"backlog {backlog:,}, refusing sink, {hold:g} s ...", flush=True)
            backlog_runs.append(with_backlog(children, refusing, backlog, hold))
        results["backlog"] = backlog_runs

    same_kb = same["VmRSS"]
    parser_kb = parser_rss["VmRSS"]
    print()
    rows = [
        ["bare interpreter", mib(bare["VmRSS"]), mib(bare["RssAnon"]), mib(bare["Pss"]), "", ""],
        [
            "interpreter + the daemon's imports",
            mib(same_kb),
            mib(same["RssAnon"]),
            mib(same["Pss"]),
            "",
            "",
        ],
        [
            "interpreter + dsmr_parser (one telegram parsed)",
            mib(parser_kb),
            mib(parser_rss["RssAnon"]),
            mib(parser_rss["Pss"]),
            "",
            "",
        ],
        [
            "daemon after READY",
            mib(hour["ready_kb"]),
            "",
            "",
            f"{hour['ready_kb'] / same_kb:.2f}",
            "",
        ],
        [
            f"daemon after one hour-equivalent ({hour['telegrams_delivered']:,} delivered)",
            mib(hour["end_kb"]),
            mib(hour["end_anon_kb"]),
            mib(hour["end_pss_kb"]),
            f"{hour['end_kb'] / same_kb:.2f} / {hour['end_kb'] / parser_kb:.2f}",
            f"≤ {GOAL_MIB:g}: {verdict(hour['end_kb'] / 1024 <= GOAL_MIB)}",
        ],
        [
            "daemon peak during that hour (VmHWM)",
            mib(hour["peak_kb"]),
            "",
            "",
            f"{hour['peak_kb'] / same_kb:.2f}",
            "",
        ],
    ]
    print(
        table(
            rows,
            [
                "process",
                "VmRSS MiB",
                "RssAnon MiB",
                "Pss MiB",
                "ratio to same-imports / to dsmr_parser",
                "goal",
            ],
        )
    )
    print()
    none = backlog_runs[0]
    ten = backlog_runs[1]
    rows = []
    for run in backlog_runs:
        growth = (run["late_kb"] - none["late_kb"]) / 1024
        slope = (run["late_kb"] - ten["late_kb"]) / 1024
        rows.append(
            [
                f"{run['backlog']:,}",
                f"{run['spool_file_mib']:.1f}",
                f"{run['ready_s']:.2f}",
                mib(run["early_kb"]),
                mib(run["late_kb"]),
                mib(run["hwm_kb"]),
                f"{growth:+.1f}",
                f"{run['late_kb'] / same_kb:.2f}",
                f"vs 10,000: {slope:+.1f} MiB ≤ {FLAT_MIB:g}: {verdict(slope <= FLAT_MIB)}"
                if run["backlog"] == backlogs[-1]
                else "",
            ]
        )
    print(
        table(
            rows,
            [
                "spooled backlog",
                "spool file MiB",
                "READY after s",
                "RSS 2 s after READY MiB",
                f"RSS after {hold:g} s MiB",
                "VmHWM MiB",
                "Δ vs no backlog MiB",
                "ratio to same-imports",
                "goal",
            ],
        )
    )
    print("\nRSS added by each import, in this order, in one interpreter (MiB):")
    previous = imports[0][1]
    for name, fields in imports:
        added = {key: (fields[key] - previous[key]) / 1024 for key in fields}
        print(
            f"  +{added['VmRSS']:5.1f} (anon +{added['RssAnon']:4.1f}, "
            f"file +{added['RssFile']:4.1f}) = {fields['VmRSS'] / 1024:5.1f}  {name}"
        )
        previous = fields
    dump_json(args.json, results)


if __name__ == "__main__":
    main()
