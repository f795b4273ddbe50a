#!/usr/bin/env python3
"""Budget 6 of issue 7: a long run, accelerated, with sink outages and a restart.

Why: the daemon must run for years unattended. A day of a DSMR 5 meter (86,400 telegrams at 1 Hz)
is played through it as fast as it reads, while the sink goes down at random moments and the
daemon is restarted once (SIGTERM, start again), and then four things must hold:

- every telegram the daemon read reached the server exactly once, in order (no crash here, only
  a clean restart, so the README's crash window does not apply: no loss and no duplicate);
- RSS stays flat (sampled every 0.5 s: the last third of each run is no higher than its middle
  third plus 2 MiB; the first third is warm-up);
- the spool is empty at the end;
- nothing is logged per telegram at info level (no event occurs for 1 % of the telegrams).

How: a capture file holds 100 filler telegrams (dated 2001) and then the day (778-byte telegrams
of the bundled capture, meter timestamps one second apart, valid CRCs, all distinct), played by
``dsmr-logger simulate --as-recorded --interval 0``. The daemon's first open of the pty discards
what the simulator wrote before it (serialx flushes the port, as a real meter's bytes are lost
while nobody reads); the fillers absorb that. The server (``tests/dsmr_reader_server.py``) is
switched between ``ok`` and an outage (``refuse``: connection refused; ``hang``: no answer, the
sink's 1 s timeout fires) by a seeded random schedule over its control port. The restart comes
when half the day is read: the simulator is paused (SIGSTOP), the daemon reads what is in the pty,
its frame counter (``GET /status``) is taken, SIGTERM, a new daemon starts on the same spool, the
simulator continues (SIGCONT). Exactly once is then checked as: the server holds as many telegrams
as the two daemons read, none twice, in the order played; missing ones may only be flushed fillers
and at most one telegram cut in half by the pause. One kind of duplicate is not the daemon's and is
reported apart: a copy directly behind the first at the server. The daemon sends a telegram again
only after an attempt it saw fail, so the server stored that attempt but its 201 never reached
the daemon (an outage began while it was in flight): the lost answer of at-least-once delivery.
Not a budget, but watched: how long the daemon's ``GET /status`` takes to answer (it shares the
event loop with everything else); an answer slower than 2 s gets a ``py-spy dump`` of the daemon
(``.venv/bin/pip install py-spy``).

Usage (86,400 telegrams, about 3-5 minutes; ``--quick`` 10,000, about 1):
``.venv/bin/python bench/soak.py [--quick] [--telegrams N] [--seed S] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    Children,
    Daemon,
    Server,
    Simulator,
    day_telegrams,
    dump_json,
    free_port,
    machine,
    memory_kb,
    real_disk_dir,
    spool_rows,
    table,
    verdict,
    wait_until,
    write_config,
)

from dsmr_logger.telegram.build import restamp

FILLERS = 100
RSS_SLACK_KB = 2048
STALL = 2.0
"""A ``GET /status`` slower than this means the event loop is stalled: py-spy dumps the daemon."""


def status_with_retry(daemon: Daemon, port: int) -> dict[str, Any]:
    """``GET /status``; a timeout prints what the daemon is doing, then it asks again (2 min)."""
    deadline = time.monotonic() + 120
    told = False
    while True:
        try:
            return daemon.status(port)
        except TimeoutError:
            if not told:
                print(f"GET /status timed out; the daemon now:\n{diagnose(daemon)}", flush=True)
                told = True
            if time.monotonic() > deadline:
                raise


def diagnose(daemon: Daemon) -> str:
    """Process and thread states, kernel wait channels, Python stacks, the last log lines."""
    pid = daemon.pid
    lines = [f"exit status so far: {daemon.process.poll()}"]
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        lines += [line for line in status if line.startswith(("State", "Threads"))]
        for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text()
            lines.append(f"thread {task.name}: state {state}, wchan {wchan}")
    lines.append(py_spy_dump(pid))
    lines += ["last log lines:", *daemon.lines[-6:]]
    return "\n".join(lines)


def py_spy_dump(pid: int) -> str:
    """Every thread's Python stack right now (``py-spy dump``), or why there is none."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return "(py-spy not installed)"
    done = subprocess.run(
        [str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60
    )
    return done.stdout or done.stderr


class Outages:
    """Switches the server between ok and an outage on a seeded random schedule (a thread)."""

    def __init__(self, server: Server, seed: int) -> None:
        self.server = server
        self.random = random.Random(seed)
        self.outages: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.random.uniform(2.0, 8.0)):
            mode = self.random.choice(("refuse", "hang"))
            length = self.random.uniform(0.5, 4.0)
            self.server.control(mode=mode)
            self.outages.append((mode, length))
            self._stop.wait(length)
            self.server.control(mode="ok")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.server.control(mode="ok")


class Watched:
    """A daemon run with its RSS samples and how long ``GET /status`` took (event-loop lag)."""

    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon = daemon
        self.port = port
        self.rss: list[tuple[float, int]] = []
        self.status_s: list[float] = []
        self.stalls: list[str] = []

    def sample(self) -> dict[str, Any]:
        """RSS now, and the daemon's status; a slow answer gets a py-spy dump of the daemon."""
        self.rss.append((time.monotonic(), memory_kb(self.daemon.pid)["VmRSS"]))
        result: dict[str, Any] = {}
        asked = time.monotonic()

        def ask() -> None:
            result.update(status_with_retry(self.daemon, self.port))

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        thread.join(STALL)
        if thread.is_alive():
            dump = py_spy_dump(self.daemon.pid)
            self.stalls.append(dump)
            print(f"GET /status unanswered after {STALL:g} s; py-spy dump:\n{dump}", flush=True)
            thread.join(120)
        self.status_s.append(time.monotonic() - asked)
        if not result:
            raise RuntimeError("the daemon's /status did not answer within 2 minutes")
        return result

    def frames(self) -> int:
        return int(status_with_retry(self.daemon, self.port)["meter"]["frames"])

    def flat(self) -> tuple[bool, int, int]:
        """(flat?, max RSS kB of the middle third, of the last third).

        The first third is warm-up (the in-memory window fills, SQLite's page cache fills); after
        it RSS must not grow.
        """
        values = [kb for _, kb in self.rss]
        third = max(1, len(values) // 3)
        middle, last = max(values[third : 2 * third] or values), max(values[-third:])
        return last <= middle + RSS_SLACK_KB, middle, last


def stop_watched(run: Watched, promise: float = 10.0) -> tuple[int, float, str | None]:
    """SIGTERM; (exit status, seconds, py-spy dump if it was still running after ``promise``)."""
    started = time.monotonic()
    os.kill(run.daemon.pid, signal.SIGTERM)
    dump = None
    try:
        run.daemon.process.wait(timeout=promise + 1)
    except subprocess.TimeoutExpired:
        dump = py_spy_dump(run.daemon.pid)
    status = run.daemon.stop(timeout=20.0)
    return status, time.monotonic() - started, dump


def stable_frames(run: Watched, quiet: float = 1.0) -> int:
    """The frame counter once it has not moved for ``quiet`` seconds."""
    frames, since = run.frames(), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = run.frames()
        if now != frames:
            frames, since = now, time.monotonic()
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="10,000 telegrams")
    parser.add_argument("--telegrams", type=int, help="telegrams of the day (default 86,400)")
    parser.add_argument("--seed", type=int, default=7, help="outage schedule seed")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    count = args.telegrams or (10_000 if args.quick else 86_400)

    info = machine()
    print(f"machine: {info}")
    work = real_disk_dir("dsmr-bench-soak-")
    template = next(day_telegrams(1))
    fillers = [
        restamp(template, b"010101%02d%02d%02dW" % (i // 3600, i // 60 % 60, i % 60))
        for i in range(FILLERS)
    ]
    day = list(day_telegrams(count))
    played = fillers + day
    capture = work / "day.log"
    capture.write_bytes(b"".join(played))
    index = {t.decode(): i for i, t in enumerate(played)}
    assert len(index) == len(played), "played telegrams are not all distinct"

    port = free_port()
    started = time.monotonic()
    with Children() as children:
        server = children.server()
        config = write_config(
            work,
            meter_port=work / "meter",
            server_url=server.url,
            sink={"timeout": 1.0},
            http_port=port,
        )
        first = Watched(Daemon(children, config, work), port)
        first.daemon.wait_ready()
        print(f"playing {FILLERS} fillers + {count:,} telegrams, outages on ...", flush=True)
        simulator = Simulator(
            children,
            work / "meter",
            interval=0,
            count=len(played),
            capture=capture,
            as_recorded=True,
        )
        outages = Outages(server, args.seed)
        outages.start()
        wait_until(
            lambda: first.sample()["meter"]["frames"] >= FILLERS // 2 + count // 2,
            600,
            "half the day read",
            interval=0.5,
        )
        simulator.process.send_signal(signal.SIGSTOP)
        frames_first = stable_frames(first)
        first_status, stop_took, first_dump = stop_watched(first)
        print(f"restart after {frames_first:,} telegrams read ...", flush=True)
        second = Watched(Daemon(children, config, work), port)
        second.daemon.wait_ready()
        second.daemon.wait_event("meter link open", 30)
        simulator.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 60 + count * 0.05
        while time.monotonic() < deadline:
            time.sleep(0.5)
            status = second.sample()
            read = frames_first + status["meter"]["frames"]
            delivered = server.received_count()
            if simulator.process.poll() is not None and delivered >= read - 1000:
                break
        outages.stop()
        wait_until(
            lambda: (
                second.sample()["sinks"][0]["backlog"] == 0 and simulator.process.poll() is not None
            ),
            300,
            "the last telegrams delivered",
            interval=0.5,
        )
        frames_second = stable_frames(second)
        for _ in range(6):  # a few more samples at rest
            time.sleep(0.5)
            second.sample()
        second_status, final_took, final_dump = stop_watched(second)
        elapsed = time.monotonic() - started
        received = server.received()
        answers = server.state()["statuses"]

    rows_left = spool_rows(work / "spool.sqlite3")
    positions = [index.get(t, -1) for t in received]
    unknown = positions.count(-1)
    twice = len(positions) - len(set(positions))
    # A copy directly behind the first is a resend whose first answer was lost: the server
    # stored the telegram, then closed the connection (the outage) before the 201 reached the
    # daemon. At-least-once allows that; a duplicate anywhere else would be the daemon's doing.
    resent = sum(1 for a, b in itertools.pairwise(positions) if a == b)
    distinct = [p for at, p in enumerate(positions) if at == 0 or positions[at - 1] != p]
    in_order = all(a < b for a, b in itertools.pairwise(distinct))
    seen: dict[int, list[int]] = collections.defaultdict(list)
    for at, played_index in enumerate(positions):
        seen[played_index].append(at)
    duplicates = {i: ats for i, ats in seen.items() if len(ats) > 1}
    order_breaks = [
        (at, a, b) for at, (a, b) in enumerate(itertools.pairwise(positions)) if a >= b
    ][:10]
    missing = sorted(set(range(len(played))) - set(positions))
    missing_day = [i for i in missing if i >= FILLERS]
    missing_fillers = [i for i in missing if i < FILLERS]
    # Allowed: fillers flushed at the first open (a prefix), and at most one telegram of the day
    # cut by the pause at the restart: everything before it read by run 1, after it by run 2.
    explained = missing_fillers == list(range(len(missing_fillers))) and (
        len(missing_day) <= 1
        and all(sum(p < i for p in distinct) == frames_first for i in missing_day)
    )
    read_total = frames_first + frames_second
    exactly_once = (
        unknown == 0
        and twice == resent
        and in_order
        and len(received) - resent == read_total
        and explained
    )
    lines = first.daemon.lines + second.daemon.lines
    events = collections.Counter(
        str(e.get("event")) for e in first.daemon.events() + second.daemon.events()
    )
    per_telegram = [name for name, n in events.items() if n >= 0.01 * count]
    flats = [run.flat() for run in (first, second)]

    print()
    rows = [
        [
            "delivered exactly once, in order (answers lost by an outage aside)",
            f"{len(received):,} at the server, {frames_first:,} + {frames_second:,} read; "
            f"{twice} twice ({resent} resent at once after a lost answer), {unknown} unknown, "
            f"in order: {in_order}; missing: "
            f"{len(missing) - len(missing_day)} fillers, {len(missing_day)} of the day",
            verdict(exactly_once),
        ],
        [
            "RSS flat (max of last third ≤ middle third + 2 MiB)",
            "; ".join(
                f"run {i + 1}: {a / 1024:.1f} → {b / 1024:.1f} MiB"
                for i, (_, a, b) in enumerate(flats)
            ),
            verdict(all(ok for ok, _, _ in flats)),
        ],
        [
            "spool empty at the end",
            ", ".join(f"{k} {v}" for k, v in rows_left.items()),
            verdict(not any(rows_left.values())),
        ],
        [
            "no log line per telegram at info level",
            f"{len(lines)} lines for {read_total:,} telegrams; "
            + ", ".join(f"{name} x{n}" for name, n in events.most_common()),
            verdict(not per_telegram),
        ],
    ]
    lags = [lag for run in (first, second) for lag in run.status_s]
    stalls = [dump for run in (first, second) for dump in run.stalls]
    rows.append(
        [
            "(not a budget) event loop answering GET /status",
            f"slowest {max(lags):.2f} s of {len(lags)} asks; {len(stalls)} took over {STALL:g} s",
            "",
        ]
    )
    print(table(rows, ["check", "figure", ""]))
    retries = sum(1 for s in answers if s != 201)
    print(
        f"\n{len(outages.outages)} outages ({collections.Counter(m for m, _ in outages.outages)}), "
        f"{retries} non-201 answers, restart: exit {first_status} after {stop_took:.2f} s, "
        f"final stop exit {second_status} after {final_took:.2f} s; {elapsed:.0f} s in all, "
        f"{len(received) / elapsed:.0f} telegrams/s end to end"
    )
    if duplicates or order_breaks:
        print(
            f"duplicates (played index: positions at the server): {duplicates}; order breaks "
            f"(position, played index, next played index): {order_breaks}; the restart came "
            f"after played index {frames_first - 1 + len(missing_fillers)}"
        )
    for name, dump in (("restart", first_dump), ("final stop", final_dump)):
        if dump:
            print(f"\n{name}: still running 11 s after SIGTERM; py-spy dump:\n{dump}")
    if stalls:
        print(f"\npy-spy dump of the daemon during the first stall:\n{stalls[0]}")
    dump_json(
        args.json,
        {
            "machine": info,
            "telegrams": count,
            "received": len(received),
            "frames": [frames_first, frames_second],
            "twice": twice,
            "resent_after_lost_answer": resent,
            "unknown": unknown,
            "in_order": in_order,
            "missing": missing,
            "rss": [run.rss for run in (first, second)],
            "spool": rows_left,
            "events": dict(events),
            "outages": outages.outages,
            "exit": [first_status, second_status],
            "stop_seconds": [stop_took, final_took],
            "stop_dumps": [first_dump, final_dump],
            "duplicates": duplicates,
            "order_breaks": order_breaks,
            "seconds": elapsed,
            "status_seconds": lags,
            "stalls": stalls,
        },
    )


if __name__ == "__main__":
    main()
