"""Option values a person can get wrong on the offline commands: one line and exit 2.

Exit 2 means "fix what you typed"; exit 1 means "it tried and failed". Each test runs the real
command (``python -m dsmr_logger``) and reads its exit status and its one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from cli_process import dsmr_logger, one_clear_line

from dsmr_logger.delivery.spool import Spool, StoredTelegram
from dsmr_logger.telegram.capture import default_capture, frames_in


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[meter]\nport = "/dev/null"\n'
        f"[spool]\npath = {json.dumps(str(tmp_path / 'state' / 'spool.sqlite3'))}\n"
        '[[sink]]\nname = "home"\nurl = "http://127.0.0.1:9"\napi_key = "k-0123456789abcdef"\n'
    )
    return path


def spool_with_a_dead_letter(path: Path, *, sink: str) -> None:
    spool = Spool(path, max_bytes=1 << 20)
    spool.open()
    telegram = StoredTelegram(1, frames_in(default_capture())[0], 1_790_000_000.0)
    spool.dead_letter(sink, telegram, status=500, body="Failed to parse telegram", reason="x")
    spool.close()


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


def test_a_sink_name_typed_wrong_is_named_not_a_quiet_nothing(tmp_path: Path) -> None:
    """'spool requeue --sink hmoe' said "no dead letters to requeue" (exit 0) while home held
    one; export and purge likewise did nothing. A name neither configured nor in the spool is
    a usage error listing the names there are."""
    path = config_file(tmp_path)
    spool_with_a_dead_letter(tmp_path / "state" / "spool.sqlite3", sink="home")
    for action in (["requeue"], ["export", str(tmp_path / "out.log")], ["purge", "--yes"]):
        result = dsmr_logger("spool", *action, "--sink", "hmoe", "--config", path)
        assert result.returncode == 2, result.stderr
        one_clear_line(result, "--sink 'hmoe': no such sink", "(there: home)")
    listed = dsmr_logger("spool", "list", "--config", path)
    assert "dead letters held: 1" in listed.stdout, "nothing was requeued or purged"
    assert not (tmp_path / "out.log").exists()
    gone = dsmr_logger("spool", "requeue", "--sink", "home", "--config", path)
    assert gone.returncode == 0 and "requeued 1 dead letter(s)" in gone.stdout


def test_pair_with_a_configuration_python_cannot_read_is_named_before_pairing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[meter]\nport = "/dev/null"\nmax_frame_bytes = {"9" * 5000}\n')
    result = dsmr_logger("pair", "homewizard", "--host", "127.0.0.1:9", "--config", path)
    assert result.returncode == 2
    one_clear_line(result, f"config error: {path}: Exceeds the limit (4300 digits)")


def test_a_status_host_that_does_not_resolve_is_said_so(tmp_path: Path) -> None:
    """getaddrinfo's error number read as errno gave 'cannot listen there: Unknown error -2'."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[meter]\nport = "/dev/null"\n'
        f"[spool]\npath = {json.dumps(str(tmp_path / 'state' / 'spool.sqlite3'))}\n"
        '[http]\nlisten = "no-such-host.invalid:8484"\n'
    )
    result = dsmr_logger("run", "--config", path)
    assert result.returncode == 1
    said = [line for line in result.stderr.splitlines() if line.startswith("dsmr-logger:")]
    assert len(said) == 1 and "Traceback" not in result.stderr, result.stderr
    line = said[0]
    assert "http.listen" in line and "not an address this machine can resolve" in line
    assert "Unknown error" not in line


def test_run_help_names_every_signal_that_stops_it_cleanly() -> None:
    """SIGHUP (an SSH session closing on a foreground run) stops it as SIGTERM does
    (tests/test_health.py); the help said only SIGTERM or SIGINT."""
    shown = dsmr_logger("run", "--help").stdout
    assert "Stops cleanly on SIGTERM, SIGINT or SIGHUP." in " ".join(shown.split())
