"""What would fail at run time, found before it runs: unusable paths and a missing meter device.

``config.py`` judges values; this module looks at the machine, as the current user sees it:
whether the spool and archive directories can be created and written, whether the spool file is
a file, whether the meter's device exists. It creates and changes nothing, so ``check-config`` can
run it as the service's user before the first start, ``run`` runs it before opening anything
(one line naming the path instead of SQLite's "unable to open database file"), and the tools use
:func:`path_problem` to say why a spool cannot be read.

A missing meter device is a warning, not an error: a USB adapter may be plugged in later, and the
daemon waits for it.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dsmr_logger.config import ArchiveSinkConfig, Config, MeterConfig
from dsmr_logger.daemon import default_sinks
from dsmr_logger.delivery.spool import telegram_dir

Kind = Literal["file", "directory"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing that will go wrong (``fatal``) or may (a warning), with the key it concerns."""

    key: str
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def current_user() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check(config: Config) -> list[Finding]:
    """Everything about ``config`` that the machine would refuse, as seen by the current user."""
    findings: list[Finding] = []
    spool = config.spool.path
    places: tuple[tuple[Path, Kind], ...] = ((spool, "file"), (telegram_dir(spool), "directory"))
    for path, kind in places:
        problem = path_problem(path, kind, write=True)
        if problem is not None:
            findings.append(Finding("spool.path", problem))
            break  # the spool's directory at fault says it for both
    for index, sink in enumerate(default_sinks(config)):
        if isinstance(sink, ArchiveSinkConfig):
            key = (
                f"sink[{index}] ({sink.name}).directory"
                if config.sinks
                else "spool.path (no [[sink]]: the archive beside the spool)"
            )
            problem = path_problem(sink.directory, "directory", write=True)
            if problem is not None:
                findings.append(Finding(key, problem))
    if isinstance(config.meter, MeterConfig) and not config.meter.is_network:
        problem = device_problem(Path(config.meter.port))
        if problem is not None:
            findings.append(Finding("meter.port", problem, fatal=False))
    return findings


def path_problem(path: Path, kind: Kind, *, write: bool) -> str | None:
    """Why the current user cannot use ``path`` as a ``kind`` (create it if missing, when
    ``write``), or None. Names the component at fault: "/srv/x is a file, not a directory"."""
    user = current_user()
    current = Path(path.anchor or "/")
    for part in path.parts[1:]:
        candidate = current / part
        try:
            status = candidate.stat()
        except FileNotFoundError:
            if not write:
                return f"{path}: {candidate} does not exist"
            return _creatable(current, candidate, user)
        except PermissionError:
            return f"{path}: cannot look into {current}: permission denied for user {user}"
        except OSError as exc:
            return f"{path}: {candidate}: {exc.strerror or exc}"
        if candidate != path and not stat.S_ISDIR(status.st_mode):
            return f"{path}: {candidate} is a file, not a directory"
        current = candidate
    return _usable(path, path.stat().st_mode, kind, write, user)


def _creatable(parent: Path, missing: Path, user: str) -> str | None:
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {missing}: {parent} is {_not_writable(parent, user)}"
    return None


def _usable(path: Path, mode: int, kind: Kind, write: bool, user: str) -> str | None:
    if kind == "directory":
        if not stat.S_ISDIR(mode):
            return f"{path} is a file, not a directory"
        needed = os.R_OK | os.X_OK | (os.W_OK if write else 0)
        if not os.access(path, needed):
            return f"{path} is {_not_writable(path, user) if write else _unreadable(user)}"
        return None
    if stat.S_ISDIR(mode):
        return f"{path} is a directory, not a file"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{path} is {_unreadable(user)}"
    if write:
        if not os.access(path, os.W_OK):
            return f"{path} is {_not_writable(path, user)}"
        if not os.access(path.parent, os.W_OK | os.X_OK):  # SQLite writes -wal and -shm beside it
            return f"{path}: its directory {path.parent} is {_not_writable(path.parent, user)}"
    return None


def _not_writable(path: Path, user: str) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "on a read-only file system"
    except OSError:
        pass
    return f"not writable by user {user}"


def _unreadable(user: str) -> str:
    return f"not readable by user {user}"


def device_problem(device: Path) -> str | None:
    """Why the meter's device cannot be opened now (the daemon keeps trying), or None."""
    user = current_user()
    try:
        mode = device.stat().st_mode
    except FileNotFoundError:
        return (
            f"{device} does not exist (yet); the daemon waits for it. Check the cable and "
            "`ls -l /dev/serial/by-id/`"
        )
    except OSError as exc:
        return f"{device}: {exc.strerror or exc}"
    if not stat.S_ISCHR(mode):
        return f"{device} is not a serial device"
    if not os.access(device, os.R_OK | os.W_OK):
        return (
            f"{device} is not readable and writable by user {user} (the group dialout usually "
            "is: sudo usermod -aG dialout USER)"
        )
    return None
