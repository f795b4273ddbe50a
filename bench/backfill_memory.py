#!/usr/bin/env python3
"""Peak memory of ``dsmr-logger backfill`` for a 10 s window in a month of archive.

Why: backfill read every archive file whole and kept every telegram before choosing the window:
a day of archive (86,400 DSMR 5 telegrams) took 237 MiB of peak RSS for a 10 s window, and a
month would take gigabytes, more than a Raspberry Pi has. It now reads only the day files that
can hold the window, a chunk at a time, and passes telegrams on as it finds them.

How: a month of archive is written first (``--days`` day files of 86,400 restamped 778-byte
telegrams each, one a second, named by their date in the meter's zone, in a fresh directory
under ``/var/tmp``; about 2 GB and two minutes; ``--archive DIR`` reuses one). Each measurement
is a child process of its own, and its peak RSS is the ``ru_maxrss`` that ``wait4`` reports for
it: the baseline, the old approach kept here (``old_plan``: read every file whole, keep every
telegram, then choose and sort, as ``dsmr_logger/tools/backfill.py`` did), and the real command,
``python -m dsmr_logger backfill`` for the window, posting its telegrams to the DSMR-reader test
server. Both on one day of the archive and on the whole month. The old approach on the month
needs about 30 times its one-day figure: it runs only if ``MemAvailable`` holds twice that, and is
reported as skipped otherwise.

Not a test, and no budget is asserted. Usage: ``.venv/bin/python bench/backfill_memory.py``
(``--days N``; ``--archive DIR`` keeps the archive there for another run).
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    API_KEY,
    PYTHON,
    REPO_ROOT,
    Children,
    child_env,
    fs_type,
    machine,
    real_disk_dir,
    table,
    templates,
)

from dsmr_logger.telegram.build import restamp
from dsmr_logger.telegram.capture import frames_in
from dsmr_logger.tools.backfill import meter_time

ZONE = ZoneInfo("Europe/Amsterdam")
START = datetime(2026, 1, 1, tzinfo=ZONE)
"""A winter month: no DST step, so every local second is one instant."""
PER_DAY = 86_400


def window(days: int) -> tuple[datetime, datetime]:
    """Ten telegrams at noon of the middle day."""
    noon = START + timedelta(days=days // 2, hours=12)
    return noon, noon + timedelta(seconds=9)


# --- the baseline: the old approach, kept here -------------------------------------------------


def old_plan(source: Path, since: datetime, until: datetime) -> int:
    """Read every file whole, keep every telegram, then choose the window and sort it."""
    recorded = []
    for path in sorted(p for p in source.iterdir() if p.name.endswith((".log", ".log.gz"))):
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        for telegram in frames_in(data):
            recorded.append((meter_time(telegram, ZONE), telegram))
    chosen = {}
    for stamp, telegram in recorded:
        if stamp is not None and since <= stamp <= until:
            chosen.setdefault(stamp, telegram)
    return len([chosen[stamp] for stamp in sorted(chosen)])


# --- the archive ---------------------------------------------------------------------------------


def write_archive(directory: Path, days: int) -> None:
    frames = templates()
    for day in range(days):
        first = START + timedelta(days=day)
        path = directory / f"{first.date().isoformat()}.log"
        if path.exists() and path.stat().st_size == PER_DAY * len(frames[0]):
            continue
        started = time.monotonic()
        with path.open("wb") as out:
            for second in range(PER_DAY):
                when = first + timedelta(seconds=second)
                stamp = when.strftime("%y%m%d%H%M%S").encode() + b"W"
                out.write(restamp(frames[second % len(frames)], stamp))
        print(f"  wrote {path.name} in {time.monotonic() - started:.1f} s", flush=True)


# --- measuring -----------------------------------------------------------------------------------


def peak_mib(command: list[str]) -> tuple[float, float, str]:
    """Run ``command``; its peak RSS (MiB, from wait4), wall seconds, and stdout's last line."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=REPO_ROOT
    )
    assert process.stdout is not None and process.stderr is not None
    output = process.stdout.read().decode()
    errors = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({process.returncode}): {errors[-500:]}")
    lines = output.strip().splitlines()
    return usage.ru_maxrss / 1024, time.monotonic() - started, lines[-1] if lines else ""


def old_command(source: Path, days: int) -> list[str]:
    since, until = (moment.isoformat() for moment in window(days))
    return [PYTHON, __file__, "--child-old", str(source), since, until]


def new_command(source: Path, config: Path, days: int) -> list[str]:
    since, until = (moment.isoformat() for moment in window(days))
    command = [PYTHON, "-m", "dsmr_logger", "backfill", "--config", str(config), "--restart"]
    return [*command, "--from", str(source), "--sink", "home", "--since", since, "--until", until]


def write_config(path: Path, url: str) -> None:
    path.write_text(
        f'[meter]\nport = "/dev/null"\ntimezone = "{ZONE.key}"\n'
        f'[spool]\npath = "{path.parent / "spool.sqlite3"}"\n'
        f'[[sink]]\nname = "home"\nurl = "{url}"\napi_key = "{API_KEY}"\n'
    )


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--days", type=int, default=30, help="days of archive (default a month)")
    parser.add_argument(
        "--archive", type=Path, help="a directory to write the archive to, or reuse"
    )
    parser.add_argument("--child-old", nargs=3, metavar=("DIR", "SINCE", "UNTIL"), help="internal")
    args = parser.parse_args()
    if args.child_old:
        source, since, until = args.child_old
        found = old_plan(Path(source), *(datetime.fromisoformat(t) for t in (since, until)))
        print(f"{found} telegrams in the window")
        return

    work = real_disk_dir("backfill-memory-")
    archive = args.archive or work / "archive"
    archive.mkdir(parents=True, exist_ok=True)
    print(machine())
    print(f"archive: {archive} ({fs_type(archive)}), {args.days} days of {PER_DAY} telegrams")
    write_archive(archive, args.days)
    one_day = work / "one-day"
    one_day.mkdir()
    middle = window(args.days)[0].date().isoformat()
    (one_day / f"{middle}.log").symlink_to(archive / f"{middle}.log")
    size = sum(p.stat().st_size for p in archive.glob("*.log"))
    since, until = window(args.days)
    print(f"window: {since.isoformat()} .. {until.isoformat()}; archive {size / 2**30:.2f} GiB")

    rows = []
    with Children() as children:
        server = children.server()
        config = work / "config.toml"
        write_config(config, server.url)
        for label, source in (("1 day", one_day), (f"{args.days} days", archive)):
            old, seconds, said = (
                peak_mib(old_command(source, args.days)) if label == "1 day" else (0, 0, "")
            )
            if label != "1 day":
                need = rows[0][2] * args.days
                if available_mib() > 2 * need:
                    old, seconds, said = peak_mib(old_command(source, args.days))
            rows.append(
                [
                    label,
                    "old: read every file whole, keep every telegram",
                    round(old) if old else f"skipped (needs ~{round(rows[0][2] * args.days)})",
                    round(seconds, 1),
                    said,
                ]
            )
            before = server.received_count()
            new, seconds, _ = peak_mib(new_command(source, config, args.days))
            rows.append(
                [
                    label,
                    "new: stream the day files that can hold the window",
                    round(new),
                    round(seconds, 1),
                    f"{server.received_count() - before} telegrams sent",
                ]
            )
    header = ["archive", "approach", "peak RSS MiB", "wall s", "result"]
    print()
    print(table(rows, header))


if __name__ == "__main__":
    main()
