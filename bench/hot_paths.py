#!/usr/bin/env python3
"""Micro-benchmark of per-telegram hot spots: the CRC-16 check, the v1 form, and frame assembly.

Why: both are pure Python and run once per telegram for years on a Raspberry Pi; the in-process
breakdown of ``bench/cpu_per_telegram.py`` put them at about 56 µs and 40 µs of a 778-byte
telegram. This times each against its named baseline, the implementation it replaced, kept here:

- ``crc16``: baseline the byte-wise 256-entry table (one Python step per byte); now two bytes
  per step through a 65,536-entry ``array("H")`` table (``dsmr_logger/sources/p1/crc.py``);
- v1 form: baseline ``urllib.parse.urlencode({"telegram": telegram}).encode("ascii")``; now
  ``v1_form`` (latin-1 decode + ``str.translate``, ``dsmr_logger/delivery/sinks/dsmr_reader.py``).

Both are checked to give the baseline's exact result before anything is timed. Frame assembly
(``FrameAssembler.feed``, CRC included) is timed on the clean path: the same telegrams read
whole, in 64-byte reads (about what a USB serial adapter hands over at 115200 baud) and in 8-byte
reads, to compare the assembler with its earlier versions (their figures in ``bench/RESULTS.md``).
Input: every telegram of the bundled DSMR 5 capture (Iskra AM550, 778 bytes each,
``default_capture()``); time per telegram is the best of ``--repeat`` ``timeit`` runs over all of
them, divided out. The price of the 64K table is shown too: the build time warm (in this process)
and cold (a fresh interpreter), the whole import of the crc module in a fresh interpreter, and
the table's memory.

Not a test, and no budget is asserted. Usage: ``.venv/bin/python bench/hot_paths.py``
(a few seconds; ``--repeat N``, ``--number N``).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import timeit
import tracemalloc
import urllib.parse
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from dsmr_logger.delivery.sinks.dsmr_reader import v1_form  # noqa: E402
from dsmr_logger.sources.p1 import crc  # noqa: E402
from dsmr_logger.sources.p1.framing import FrameAssembler  # noqa: E402
from dsmr_logger.telegram.capture import default_capture, frames_in  # noqa: E402

# --- the baselines: the implementations replaced ---------------------------------------------


_BASELINE_TABLE = crc._TABLE  # the byte table, still kept for an odd last byte


def baseline_crc16(data: bytes | bytearray | memoryview) -> int:
    """``crc16`` before: one 256-entry table step per byte."""
    value = 0
    table = _BASELINE_TABLE
    for byte in data:
        value = (value >> 8) ^ table[(value ^ byte) & 0xFF]
    return value


def baseline_form(telegram: bytes) -> bytes:
    """The v1 body before."""
    return urllib.parse.urlencode({"telegram": telegram}).encode("ascii")


# --- measuring -------------------------------------------------------------------------------


def per_call_us(
    function: Callable[[bytes], object], telegrams: list[bytes], repeat: int, number: int
) -> float:
    """Best-of-``repeat`` µs per telegram, each run calling ``function`` on every telegram."""

    def run() -> None:
        for telegram in telegrams:
            function(telegram)

    best = min(timeit.repeat(run, repeat=repeat, number=number))
    return best / (number * len(telegrams)) * 1e6


def framing_us(telegrams: list[bytes], read_size: int | None, repeat: int, number: int) -> float:
    """Best-of-``repeat`` µs per telegram for ``FrameAssembler.feed`` on a clean stream read in
    chunks of ``read_size`` bytes (None: one telegram per read); every telegram must come out."""
    stream = b"".join(telegrams)
    size = read_size or 0
    chunks = telegrams if size == 0 else [stream[i : i + size] for i in range(0, len(stream), size)]
    assembler = FrameAssembler()
    assert [f.raw for c in chunks for f in assembler.feed(c, 0.0)] == telegrams

    def run() -> None:
        feed = assembler.feed
        for chunk in chunks:
            feed(chunk, 0.0)

    best = min(timeit.repeat(run, repeat=repeat, number=number))
    return best / (number * len(telegrams)) * 1e6


def table_build_ms(repeat: int) -> float:
    return min(timeit.repeat(lambda: crc._make_table16(crc._TABLE), repeat=repeat, number=1)) * 1e3


def table_build_peak_kib() -> float:
    """Peak traced allocation while building the table (its temporaries included)."""
    tracemalloc.start()
    table = crc._make_table16(crc._TABLE)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del table
    return peak / 1024


_IMPORT_PROBE = """
import array, importlib.util, sys, time
spec = importlib.util.spec_from_file_location("crc", sys.argv[1])
started = time.perf_counter()
crc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crc)
imported = time.perf_counter()
crc._make_table16(crc._TABLE)
print(imported - started, time.perf_counter() - imported)
"""


def import_ms(runs: int) -> tuple[float, float]:
    """Best ms, in fresh interpreters, of importing ``dsmr_logger/sources/p1/crc.py`` on its own
    (``array`` already imported; loaded by path, since importing its package imports it too: the
    byte table, the 64K table and loading the cached bytecode), and of one more 64K table build
    right after it (a cold process's build)."""
    best_import = best_build = float("inf")
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, crc.__file__],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        imported, built = (float(field) * 1e3 for field in done.stdout.split())
        best_import, best_build = min(best_import, imported), min(best_build, built)
    return best_import, best_build


def list_of_ints_kib(values: list[int]) -> float:
    """What the same table would take as a list of Python ints (small ints are shared)."""
    ints = sum(sys.getsizeof(v) for v in set(values) if not -5 <= v <= 256)
    return (sys.getsizeof(values) + ints) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=15, help="timeit runs; the best counts")
    parser.add_argument("--number", type=int, default=200, help="passes over the telegrams a run")
    args = parser.parse_args()

    telegrams = frames_in(default_capture())
    sizes = sorted({len(t) for t in telegrams})
    for telegram in telegrams:
        assert crc.crc16(telegram) == baseline_crc16(telegram)
        view = memoryview(telegram)[: telegram.rindex(b"!") + 1]
        assert crc.crc16(view) == baseline_crc16(view)
        assert v1_form(telegram) == baseline_form(telegram)

    print(f"python {platform.python_version()} on {platform.machine()} ({platform.node()})")
    print(f"input: {len(telegrams)} telegrams of the bundled DSMR 5 capture, {sizes} bytes each")
    print(f"timing: best of {args.repeat} x {args.number} passes, µs per telegram\n")

    rows = [
        ("crc16", baseline_crc16, crc.crc16, "byte-wise 256-entry table"),
        ("v1 form", baseline_form, v1_form, "urllib.parse.urlencode"),
    ]
    print(f"{'step':<10} {'baseline':>10} {'new':>8} {'new/old':>8}  baseline is")
    saved = 0.0
    for name, old, new, what in rows:
        before = per_call_us(old, telegrams, args.repeat, args.number)
        after = per_call_us(new, telegrams, args.repeat, args.number)
        saved += before - after
        print(f"{name:<10} {before:>8.1f}µs {after:>6.1f}µs {after / before:>8.2f}  {what}")
    print(f"{'saved':<10} {saved:>8.1f}µs per telegram\n")

    print("FrameAssembler.feed on the clean path, CRC included:")
    for read_size in (None, 64, 8):
        label = "one telegram per read" if read_size is None else f"{read_size}-byte reads"
        number = max(1, args.number // 4 if read_size is None else args.number * read_size // 512)
        print(f"  {label:<22} {framing_us(telegrams, read_size, args.repeat, number):>7.1f}µs")
    print()

    table = crc._TABLE16
    size = sys.getsizeof(table)
    print("64K CRC table (array('H'), built at import):")
    print(f"  build, in process: {table_build_ms(args.repeat):.2f} ms (best of {args.repeat})")
    imported, built = import_ms(args.repeat)
    print(f"  build, fresh interpreter: {built:.2f} ms (best of {args.repeat})")
    print(f"  import of dsmr_logger.sources.p1.crc, fresh interpreter: {imported:.2f} ms in all")
    print(f"  size: sys.getsizeof = {size} B ({size / 1024:.1f} KiB)")
    print(f"  peak while building: {table_build_peak_kib():.0f} KiB (temporaries, freed)")
    print(f"  the same as a list of ints would be: {list_of_ints_kib(table.tolist()):.0f} KiB")


if __name__ == "__main__":
    main()
