"""One ``backfill`` and one ``import`` at a time per spool.

Two runs of the same command share a progress file (and the imports their clouds' request
budgets and cached answers): run together, each rewrote what the other had saved, so a resumed
run could send again what the other had sent, and two Copper imports each spent what they took
for the whole day's budget. The second run now stops at once with one line; the lock is an
``flock``, so it goes with its process, also after a SIGKILL (no stale lock file to remove).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class AlreadyRunning(OSError):
    """Another run of the command holds the lock (exit 1, as for any run that cannot start)."""


@contextlib.contextmanager
def alone(lock: Path, command: str) -> Iterator[None]:
    """Hold ``lock`` for the block, or raise ``AlreadyRunning`` naming ``command``; a lock that
    cannot be made is an ``OSError`` whose one line names it (and, when refused, whose command
    to run instead: the spool's folder is the service's)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        hint = ""
        if exc.errno in (errno.EACCES, errno.EPERM):
            hint = (
                f"; run it as the user that owns the spool (the service's: "
                f"sudo -u dsmr-logger dsmr-logger {command} ...)"
            )
        raise OSError(f"cannot write {lock}: {exc.strerror or exc}{hint}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(
                f"another `dsmr-logger {command}` is running beside this spool ({lock} is "
                "locked); wait for it to finish, then run this one again to continue"
            ) from None
        yield
    finally:
        os.close(fd)
