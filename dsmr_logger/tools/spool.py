"""``dsmr-logger spool list | show | requeue | purge | export``: look into and repair the spool.

Safe while the daemon runs: SQLite (WAL) lets this process read and write beside it; requeued
dead letters are picked up by the running daemon within 2 x ``flush_interval`` (10 s by default).
Dead letters listed here are the ones held now; ``status`` counts those made since the daemon
started, so the two differ after a requeue.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from dsmr_logger.delivery.spool import Spool
from dsmr_logger.logsetup import local_time
from dsmr_logger.telegram.glance import glance
from dsmr_logger.tools import printable

EXPORT_PAGE = 1000


def _size(count: int) -> str:
    """Bytes as a person reads them: 12 KiB of telegrams is not "0.0 MiB"."""
    if count < 10_000:
        return f"{count} bytes"
    if count < 10 * 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024 / 1024:.1f} MiB"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return local_time(timestamp)


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
    waiting = sum(backlog.count for backlog in backlogs.values())
    if waiting:
        print(f"spool {spool.path}: {_size(spool.stored_bytes)} of segment files", file=out)
    else:
        print(f"spool {spool.path}: no telegram waiting", file=out)
    if not backlogs:
        print("backlog: none", file=out)
    for sink, backlog in sorted(backlogs.items()):
        oldest = _age(backlog.oldest_received_at, now)
        print(f"backlog {sink}: {backlog.count} telegrams, oldest {oldest} old", file=out)
    requeued = spool.requeued_count()
    if requeued:
        print(f"requeued, waiting for the daemon: {requeued}", file=out)
    counters = spool.counters()
    for sink, count in sorted((s, c.get("dropped", 0)) for s, c in counters.items()):
        if count:
            print(f"dropped {sink}: {count} (spool full, oldest first)", file=out)
    for sink, count in sorted((s, c.get("lost", 0)) for s, c in counters.items()):
        if count:
            print(f"lost {sink}: {count} (damaged or deleted spool files)", file=out)
    print(f"dead letters held: {len(letters) or 'none'}", file=out)
    for letter in letters:
        answer = f"HTTP {letter.status}" if letter.status is not None else "no answer"
        body = " ".join(letter.body.split())[:60]
        line = f"  #{letter.id} {letter.sink} read {_when(letter.received_at)}: {letter.reason} "
        print(printable(f"{line}({answer} {body})".rstrip()), file=out)
    return 0


def show(spool: Spool, letter_id: int, out: TextIO) -> int:
    for letter in spool.dead_letters():
        if letter.id == letter_id:
            print(f"dead letter #{letter.id} for sink {letter.sink}", file=out)
            print(f"read:      {_when(letter.received_at)}", file=out)
            print(f"refused:   {_when(letter.at)}", file=out)
            print(printable(f"reason:    {letter.reason}"), file=out)
            print(f"status:    {letter.status if letter.status is not None else '-'}", file=out)
            print(printable(f"answer:    {' '.join(letter.body.split())[:500]}"), file=out)
            print(printable(f"meter:     {glance(letter.telegram).header}"), file=out)
            print("telegram:", file=out)
            telegram = letter.telegram.decode("ascii", "replace").replace("\r\n", "\n")
            print(printable(telegram), file=out)
            return 0
    print(
        f"dsmr-logger: no dead letter #{letter_id} (see: dsmr-logger spool list)", file=sys.stderr
    )
    return 2


def requeue(
    spool: Spool, ids: list[int], sink: str | None, out: TextIO, *, flush_interval: float
) -> int:
    """Requeue the given dead letters (all, or a sink's); an id that is not there changes
    nothing and is a usage error (2), named."""
    held = {letter.id: letter for letter in spool.dead_letters()}
    unknown = sorted(set(ids) - set(held))
    if unknown:
        listed = ", ".join(f"#{number}" for number in unknown)
        print(f"dsmr-logger: no dead letter {listed}; nothing requeued", file=sys.stderr)
        print("dsmr-logger: see the ids with: dsmr-logger spool list", file=sys.stderr)
        return 2
    if sink is not None and ids and any(held[number].sink != sink for number in ids):
        others = ", ".join(f"#{n}" for n in ids if held[n].sink != sink)
        print(f"dsmr-logger: {others} not for sink {sink}; nothing requeued", file=sys.stderr)
        return 2
    count = spool.requeue(ids or None, sink)
    if not count:
        print("no dead letters to requeue", file=out)
        return 0
    print(
        f"requeued {count} dead letter(s); a running daemon sends them within "
        f"{2 * flush_interval:g} s, a stopped one at its next start",
        file=out,
    )
    return 0


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


def export_problem(destination: Path) -> str | None:
    """Why ``destination`` cannot be written (checked before the spool is opened), or None."""
    folder = destination.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        return f"cannot write {destination}: the folder {folder} {what}"
    if destination.is_dir():
        return f"cannot write {destination}: it is a folder; name a file in it"
    return None


def export(spool: Spool, destination: Path, sink: str | None, out: TextIO) -> int:
    """Write the backlog (and dead letters) as raw telegrams, the archive/capture format."""
    written = 0
    try:
        file = destination.open("wb", buffering=0)  # unbuffered: a full disk fails the write
    except OSError as exc:
        return _cannot_write(destination, exc)
    with file:
        for telegram in _exported(spool, sink):  # the spool's errors are not the file's
            try:
                view = memoryview(telegram)
                while view:  # an unbuffered write may be short (the disk filling up)
                    done = file.write(view)
                    if not done:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    view = view[done:]
            except OSError as exc:
                return _cannot_write(destination, exc)
            written += 1
    print(f"wrote {written} telegram(s) to {destination}", file=out)
    return 0


def _exported(spool: Spool, sink: str | None) -> Iterator[bytes]:
    """The backlog of ``sink`` (or every sink, each telegram once), then its dead letters."""
    seen: set[int] = set()
    for name in [sink] if sink else sorted(spool.backlogs()):
        after = 0
        while page := spool.page(name, after, 2**62, EXPORT_PAGE):
            for telegram in page:
                if telegram.seq not in seen:
                    seen.add(telegram.seq)
                    yield telegram.telegram
            after = page[-1].seq
    for letter in spool.dead_letters(sink):
        yield letter.telegram


def _cannot_write(destination: Path, exc: OSError) -> int:
    print(f"dsmr-logger: export: cannot write {destination}: {exc.strerror}", file=sys.stderr)
    return 1
