"""``dsmr-logger spool list | show | requeue | purge | export``: look into and repair the spool.

Safe while the daemon runs: SQLite (WAL) lets this process read and write beside it; requeued
dead letters are picked up by the running daemon within seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TextIO

from dsmr_logger.delivery.spool import Spool
from dsmr_logger.telegram.glance import glance

EXPORT_PAGE = 1000


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _age(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0, int(now - timestamp))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def list_spool(spool: Spool, out: TextIO, *, now: float | None = None) -> int:
    """Per sink: backlog and its oldest telegram; then every dead letter with its reason."""
    now = time.time() if now is None else now
    backlogs = spool.backlogs()
    letters = spool.dead_letters()
    print(f"spool {spool.path}: {spool.stored_bytes} bytes of telegrams", file=out)
    if not backlogs:
        print("backlog: none", file=out)
    for sink, backlog in sorted(backlogs.items()):
        oldest = _age(backlog.oldest_received_at, now)
        print(f"backlog {sink}: {backlog.count} telegrams, oldest {oldest} old", file=out)
    requeued = spool.requeued_count()
    if requeued:
        print(f"requeued, waiting for the daemon: {requeued}", file=out)
    dropped = {sink: c.get("dropped", 0) for sink, c in spool.counters().items()}
    for sink, count in sorted(dropped.items()):
        if count:
            print(f"dropped {sink}: {count} (spool full, oldest first)", file=out)
    print(f"dead letters: {len(letters) or 'none'}", file=out)
    for letter in letters:
        answer = f"HTTP {letter.status}" if letter.status is not None else "no answer"
        body = " ".join(letter.body.split())[:60]
        print(
            f"  #{letter.id} {letter.sink} read {_when(letter.received_at)}: {letter.reason} "
            f"({answer} {body})".rstrip(),
            file=out,
        )
    return 0


def show(spool: Spool, letter_id: int, out: TextIO) -> int:
    for letter in spool.dead_letters():
        if letter.id == letter_id:
            print(f"dead letter #{letter.id} for sink {letter.sink}", file=out)
            print(f"read:      {_when(letter.received_at)}", file=out)
            print(f"refused:   {_when(letter.at)}", file=out)
            print(f"reason:    {letter.reason}", file=out)
            print(f"status:    {letter.status if letter.status is not None else '-'}", file=out)
            print(f"answer:    {' '.join(letter.body.split())[:500]}", file=out)
            print(f"meter:     {glance(letter.telegram).header}", file=out)
            print("telegram:", file=out)
            print(letter.telegram.decode("ascii", "replace").replace("\r\n", "\n"), file=out)
            return 0
    print(f"dsmr-logger: no dead letter #{letter_id} (see: dsmr-logger spool list)", file=out)
    return 1


def requeue(spool: Spool, ids: list[int], sink: str | None, out: TextIO) -> int:
    count = spool.requeue(ids or None, sink)
    print(f"requeued {count} dead letter(s); the daemon sends them within seconds", file=out)
    return 0 if count or not ids else 1


def purge(
    spool: Spool,
    sink: str | None,
    *,
    backlog: bool,
    dead_letters: bool,
    confirmed: bool,
    ask: Callable[[str], str],
    out: TextIO,
) -> int:
    what = " and ".join(
        part for part, on in (("backlog", backlog), ("dead letters", dead_letters)) if on
    )
    target = f"sink {sink}" if sink else "every sink"
    if not confirmed:
        question = f"Delete the {what} of {target} from {spool.path}? It cannot be undone [y/N] "
        answer = ask(question)
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=out)
            return 1
    queued, gone = spool.purge(sink, backlog=backlog, dead_letters=dead_letters)
    print(f"deleted {queued} queued telegram(s) and {gone} dead letter(s)", file=out)
    return 0


def export(spool: Spool, destination: Path, sink: str | None, out: TextIO) -> int:
    """Write the backlog (and dead letters) as raw telegrams, the archive/capture format."""
    sinks = [sink] if sink else sorted(spool.backlogs())
    written = 0
    seen: set[int] = set()
    with destination.open("wb") as file:
        for name in sinks:
            after = 0
            while page := spool.page(name, after, 2**62, EXPORT_PAGE):
                for telegram in page:
                    if telegram.seq not in seen:
                        seen.add(telegram.seq)
                        file.write(telegram.telegram)
                        written += 1
                after = page[-1].seq
        for letter in spool.dead_letters(sink):
            file.write(letter.telegram)
            written += 1
    print(f"wrote {written} telegram(s) to {destination}", file=out)
    return 0
