"""Option values a person can get wrong on the offline commands: one line and exit 2.

Exit 2 means "fix what you typed"; exit 1 means "it tried and failed". Each test runs the real
command (``python -m dsmr_logger``) and reads its exit status and its one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from cli_process import dsmr_logger, one_clear_line


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[meter]\nport = "/dev/null"\n'
        f"[spool]\npath = {json.dumps(str(tmp_path / 'state' / 'spool.sqlite3'))}\n"
        '[[sink]]\nname = "home"\nurl = "http://127.0.0.1:9"\napi_key = "k-0123456789abcdef"\n'
    )
    return path


def test_backfill_from_a_path_that_is_not_there_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "archive-typo"
    result = dsmr_logger(
        "backfill", "--from", missing, "--sink", "home", "--config", config_file(tmp_path)
    )
    assert result.returncode == 2
    one_clear_line(result, f"--from {missing}: no such file or folder")


def test_simulate_neurio_port_out_of_range_is_a_usage_error() -> None:
    for port in ("99999", "-1"):
        result = dsmr_logger("simulate-neurio", "--port", port)
        assert result.returncode == 2, result.stderr
        assert "argument --port: must be from 0 to 65535" in result.stderr
        assert "Traceback" not in result.stderr


def test_purge_told_to_keep_both_backlog_and_dead_letters_is_a_usage_error(
    tmp_path: Path,
) -> None:
    """--backlog-only keeps the dead letters, --dead-letters-only the backlog: together they
    deleted nothing and said "deleted 0 ...", exit 0."""
    result = dsmr_logger(
        "spool",
        "purge",
        "--backlog-only",
        "--dead-letters-only",
        "--yes",
        "--config",
        config_file(tmp_path),
    )
    assert result.returncode == 2
    assert "not allowed with argument --backlog-only" in result.stderr
    assert result.stdout == ""
