"""``backfill`` and ``import`` with their output piped into ``head``: a pipe closed early is not
an error. Both printed "[Errno 32] Broken pipe" and exited 1, as if the run had failed.

The real command runs as a subprocess whose stdout is closed before it writes its first line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from cli_process import environment
from test_import_garbage import cloud, config_file

from dsmr_logger.telegram.capture import default_capture, frames_in


def closed_early(*args: str | Path) -> tuple[int, str]:
    """Run the command with a stdout nobody reads (closed at once); its status and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dsmr_logger", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # `| head -c 0`
    error = process.stderr.read().decode()
    return process.wait(timeout=60), error


def test_backfill_into_a_closed_pipe_is_not_a_failure(tmp_path: Path) -> None:
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "2026-11-02.log").write_bytes(b"".join(frames_in(default_capture())))
    path = tmp_path / "config.toml"
    path.write_text(
        '[meter]\nport = "/dev/null"\n'
        f"[spool]\npath = {json.dumps(str(tmp_path / 'spool.sqlite3'))}\n"
        '[[sink]]\nname = "home"\nurl = "http://127.0.0.1:9"\napi_key = "k-0123456789abcdef"\n'
    )
    code, error = closed_early(
        "backfill", "--from", tmp_path / "archive", "--sink", "home", "--config", path
    )
    assert (code, error) == (0, "")


async def test_import_into_a_closed_pipe_is_not_a_failure(tmp_path: Path) -> None:
    async with cloud({}) as url:
        code, error = await asyncio.to_thread(
            closed_early,
            "import",
            "neurio",
            "--to-archive",
            tmp_path / "archive",
            "--since",
            "2026-03-28",
            "--until",
            "2026-03-29",
            "--config",
            config_file(tmp_path, "neurio", url),
        )
    assert "Broken pipe" not in error and "Traceback" not in error, error
    assert code == 0


def test_simulate_with_nobody_reading_its_path_still_plays() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "dsmr_logger", "simulate", "--count", "2", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    said = process.stderr.readline().decode()  # "simulated meter on /dev/pts/N; Ctrl-C stops"
    assert said.startswith("simulated meter on /dev/pts/"), said
    port = os.open(said.split()[3].rstrip(";"), os.O_RDONLY | os.O_NOCTTY)
    played = b""
    try:
        while played.count(b"!") < 2:  # a reader, so the simulator need not wait for one
            played += os.read(port, 4096)
        code = process.wait(timeout=30)
    finally:
        os.close(port)
    assert code == 0
    assert b"Broken pipe" not in process.stderr.read()


def test_simulate_neurio_with_nobody_reading_its_url_still_serves() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "dsmr_logger", "simulate-neurio"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    try:
        said = process.stderr.readline().decode()  # "... at http://127.0.0.1:N/current-sample"
        url = said.split(" at ", 1)[1].split(";", 1)[0]
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.status == 200
            assert "channels" in json.load(answer)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0
    assert b"Broken pipe" not in process.stderr.read()
