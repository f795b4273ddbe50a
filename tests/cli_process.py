"""The real ``dsmr-logger`` command as a subprocess, optionally without root's file access.

Permission mistakes (an unreadable spool, a folder one cannot enter) cannot be made as root, who
reads everything. When the tests run as root (CI does), ``unprivileged=True`` runs the command
with root's two file-access capabilities dropped (``setpriv``): permission bits then bind root
as they bind any user, with no second account needed. As any other user they bind already.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

DROP_FILE_ACCESS = ("--bounding-set=-dac_override,-dac_read_search",)


def unprivileged_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop file access")
    return [setpriv, *DROP_FILE_ACCESS, "--"]


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without the remote datalogger's variables (they change the
    configuration a command reads) and without a default configuration file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSMRREADER_")}
    env.pop("DSMR_LOGGER_SPOOL", None)
    env["DSMR_LOGGER_CONFIG"] = "/nonexistent/dsmr-logger/config.toml"
    env.update(extra or {})
    return env


def dsmr_logger(
    *args: str | Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: str | bytes | None = None,
    unprivileged: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dsmr_logger ARGS``; stdout and stderr as text."""
    command = [sys.executable, "-m", "dsmr_logger", *map(str, args)]
    if unprivileged:
        command = [*unprivileged_prefix(), *command]
    result = subprocess.run(
        command,
        cwd=cwd,
        env=environment(env),
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"),
    )


def one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one line on stderr (no traceback), containing every needle; returns it."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
