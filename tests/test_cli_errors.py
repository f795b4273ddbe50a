"""A user never sees a traceback: every mistake gets one clear line and the documented exit code.

Each test runs the real ``dsmr-logger`` command (``python -m dsmr_logger``) as a user would and
reads what the user would read: the exit status (0 ok, 1 cannot start or failed, 2 configuration
or usage; ``status`` 0/1/3), one line naming the key, option or path, and never a secret.
Permission mistakes run without root's file access (see ``cli_process``). The numbers in the
test names are the items of the issue "A user never sees a traceback".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import dsmr_logger, environment, one_clear_line, unprivileged_prefix
from conftest import require_corpus
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmr_logger.config import ConfigError, from_mapping, http_url
from dsmr_logger.delivery.spool import Spool, StoredTelegram
from dsmr_logger.net.http import HttpClient
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.tools.status import render

SECRET = "pw-Zq8s3cr3t"
KEY = "item-one-api-key-0123456789"
CAPTURE_566 = "nielsbasjes-dsmr-tools/ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"


def config_file(
    tmp_path: Path,
    *,
    url: str = "http://192.168.1.10",
    api_key: str = KEY,
    spool: Path | str | None = None,
    extra: str = "",
    meter: str = "",
    port: str = "/dev/null",
) -> Path:
    """A configuration (TOML strings written with json.dumps: every escape is TOML's too).
    The meter's port is a device that exists unless ``port`` says otherwise."""
    spool = tmp_path / "state" / "spool.sqlite3" if spool is None else spool
    path = tmp_path / "config.toml"
    path.write_text(
        f"[meter]\nport = {json.dumps(port)}\n{meter}\n"
        f"[spool]\npath = {json.dumps(str(spool))}\n\n"
        f'[[sink]]\nname = "home"\nurl = {json.dumps(url)}\napi_key = {json.dumps(api_key)}\n'
        f"{extra}"
    )
    return path


def spool_with_a_dead_letter(path: Path) -> None:
    spool = Spool(path, max_bytes=1 << 20)
    spool.open()
    telegram = StoredTelegram(1, frames_in(default_capture())[0], 1_790_000_000.0)
    spool.dead_letter("home", telegram, status=500, body="Failed to parse telegram", reason="x")
    spool.close()


# --- 1: what the HTTP client would refuse is refused before anything starts -------------------


@pytest.mark.parametrize(
    ("command", "url", "why"),
    [
        ("check-config", "http://h:99999", "port must be a number from 1 to 65535"),
        ("check-config", f"http://user:{SECRET}@h", "must not contain a user name or password"),
        ("run", f"http://user:{SECRET}@h", "must not contain a user name or password"),
        ("check-config", "http://h/?x=1", "must not contain a query"),
        ("run", "http://h:abc", "port must be a number from 1 to 65535"),
        ("check-config", "http://ho st", "invalid host name"),
        ("run", "http://ho st", "invalid host name"),
    ],
)
def test_1_a_sink_url_the_client_refuses_is_exit_2_naming_the_key(
    tmp_path: Path, command: str, url: str, why: str
) -> None:
    result = dsmr_logger(command, "--config", config_file(tmp_path, url=url))
    assert result.returncode == 2
    one_clear_line(result, "sink[0] (home).url: ", why)
    assert SECRET not in result.stdout + result.stderr
    assert not (tmp_path / "state").exists(), "nothing was opened"


@pytest.mark.parametrize(
    ("command", "key", "why"),
    [
        ("run", "abcdef0123\r\nX-Injected: 1", "contains a line break or NUL"),
        ("check-config", "abcdef0123\n456789", "contains a line break or NUL"),
        ("run", "abcdef0123\u20ac456789", "contains a character outside Latin-1"),
        ("check-config", "abcdef0123\u20ac456789", "contains a character outside Latin-1"),
        ("check-config", "abcdef0123\x07456789", "contains a control character"),
    ],
)
def test_1_an_api_key_no_header_can_carry_is_exit_2_and_never_shown(
    tmp_path: Path, command: str, key: str, why: str
) -> None:
    result = dsmr_logger(command, "--config", config_file(tmp_path, api_key=key))
    assert result.returncode == 2
    one_clear_line(result, "sink[0] (home).api_key: ", why, "the key is not shown")
    for part in ("abcdef0123", "456789"):
        assert part not in result.stdout + result.stderr


def test_1_credentials_in_the_migrated_environment_are_refused_and_never_shown(
    tmp_path: Path,
) -> None:
    variables = {
        "DSMRREADER_REMOTE_DATALOGGER_API_HOSTS": f"http://admin:{SECRET}@192.168.1.10",
        "DSMRREADER_REMOTE_DATALOGGER_API_KEYS": KEY,
        "DSMR_LOGGER_SPOOL": str(tmp_path / "spool.sqlite3"),
    }
    for command in ("check-config", "run"):
        result = dsmr_logger(command, cwd=tmp_path, env=variables)
        assert result.returncode == 2
        one_clear_line(
            result, "DSMRREADER_REMOTE_DATALOGGER_API_HOSTS: must not contain a user name"
        )
        assert SECRET not in result.stdout + result.stderr


def test_1_the_migration_note_shows_the_host_and_a_masked_key(tmp_path: Path) -> None:
    variables = {
        "DSMRREADER_REMOTE_DATALOGGER_API_HOSTS": "http://192.168.1.10",
        "DSMRREADER_REMOTE_DATALOGGER_API_KEYS": KEY,
        "DSMR_LOGGER_SPOOL": str(tmp_path / "spool.sqlite3"),
    }
    result = dsmr_logger("check-config", cwd=tmp_path, env=variables)
    assert result.returncode == 0, result.stderr
    assert "http://192.168.1.10 (API v1, key ****89)" in result.stderr
    assert KEY not in result.stdout + result.stderr
    assert 'api_key = "****89"' in result.stdout


_URLISH = st.builds(
    "".join,
    st.lists(
        st.sampled_from(
            [
                "http://",
                "https://",
                "ftp://",
                "h",
                "host.lan",
                "[::1]",
                ":",
                "8000",
                "99999",
                "0",
                "abc",
                "@",
                "u:p@",
                "/",
                "/dsmr",
                "?",
                "#",
                " ",
                "\u00fc",
                "%20",
                ".",
            ]
        ),
        max_size=8,
    ),
)


@settings(max_examples=400, deadline=None)
@given(_URLISH)
def test_1_the_configuration_and_the_client_share_one_url_rule(text: str) -> None:
    """Whatever check-config accepts the client takes, whatever it refuses the client refuses."""
    cleaned = text.strip().rstrip("/")
    try:
        accepted = http_url(text)
    except Exception as refused:  # the configuration's _Bad
        with pytest.raises(ValueError):
            HttpClient(cleaned, timeout=1.0)
        assert SECRET not in str(refused)
        return
    HttpClient(accepted, timeout=1.0, headers={"Authorization": f"Token {KEY}"})


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_1_the_configuration_and_the_client_share_one_header_rule(key: str) -> None:
    document = {
        "meter": {"port": "/dev/ttyUSB0"},
        "sink": [{"name": "home", "url": "http://h", "api_key": key}],
    }
    try:
        config = from_mapping(document)
    except ConfigError as refused:
        assert all(key not in problem for problem in refused.problems if len(key) > 3)
        if key.strip() and not key.startswith("REPLACE-WITH-"):
            with pytest.raises(ValueError):
                HttpClient("http://h", timeout=1.0, headers={"Authorization": f"Token {key}"})
        return
    sink = config.sinks[0]
    HttpClient("http://h", timeout=1.0, headers={"Authorization": f"Token {sink.api_key}"})


def test_1_check_config_masks_the_key(tmp_path: Path) -> None:
    result = dsmr_logger("check-config", "--config", config_file(tmp_path))
    assert result.returncode == 0, result.stderr
    assert 'api_key = "****89"' in result.stdout
    assert KEY not in result.stdout + result.stderr


# --- 3, 4: what the user cannot read ------------------------------------------------------------


def test_3_status_and_spool_list_with_an_unreadable_spool_say_which_file(tmp_path: Path) -> None:
    spool = tmp_path / "state" / "spool.sqlite3"
    spool_with_a_dead_letter(spool)
    config = config_file(tmp_path, spool=spool)
    spool.chmod(0)
    try:
        status = dsmr_logger("status", "--config", config, unprivileged=True)
        assert status.returncode == 3  # unknown, not "unhealthy"
        one_clear_line(status, "state unknown", str(spool), "not readable by user")

        as_json = dsmr_logger("status", "--json", "--config", config, unprivileged=True)
        assert as_json.returncode == 3
        assert json.loads(as_json.stdout)["healthy"] is None

        listed = dsmr_logger("spool", "list", "--config", config, unprivileged=True)
        assert listed.returncode == 1
        one_clear_line(listed, "spool.path", str(spool), "not readable by user")
    finally:
        spool.chmod(0o600)


def test_3_status_of_a_stopped_daemon_says_it_does_not_answer_also_when_the_spool_is_closed(
    tmp_path: Path,
) -> None:
    """A user in the dsmr-logger group (README step 5) asks ``status`` while the daemon is
    stopped: the spool's folder is the service's alone, and the one line said only "cannot look
    into /var/lib/dsmr-logger: permission denied", not that the daemon is down."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{probe.getsockname()[1]}"
    state = tmp_path / "state"
    spool_with_a_dead_letter(state / "spool.sqlite3")
    config = config_file(
        tmp_path, spool=state / "spool.sqlite3", extra=f'\n[http]\nlisten = "{listen}"\n'
    )
    state.chmod(0)  # not even its owner (the test's user) may enter it
    try:
        shown = dsmr_logger("status", "--config", config, unprivileged=True)
        as_json = dsmr_logger("status", "--json", "--config", config, unprivileged=True)
    finally:
        state.chmod(0o700)
    assert shown.returncode == 3
    one_clear_line(
        shown,
        f"state unknown: the daemon does not answer on {listen}: nothing listens there "
        "(is the daemon running?); ",
        str(state),
        "permission denied",
    )
    assert as_json.returncode == 3
    error = json.loads(as_json.stdout)["error"]
    assert f"does not answer on {listen}" in error and str(state) in error

    running = dsmr_logger("status", "--config", config)  # the spool readable: read instead
    assert running.returncode == 3
    assert running.stdout.startswith(
        f"dsmr-logger: state unknown (the daemon does not answer on {listen}: nothing listens "
        "there (is the daemon running?))\n"
    )
    assert "sink home: backlog 0, dead letters held 1" in running.stdout


def test_3_a_configuration_the_user_cannot_read(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    config.chmod(0)
    try:
        status = dsmr_logger("status", "--config", config, unprivileged=True)
        assert status.returncode == 3
        assert f"{config}: cannot read: Permission denied" in status.stderr
        assert "Traceback" not in status.stderr
        run = dsmr_logger("run", "--config", config, unprivileged=True)
        assert run.returncode == 2
        one_clear_line(run, f"{config}: cannot read: Permission denied")
    finally:
        config.chmod(0o600)


def test_4_without_config_in_a_folder_the_user_cannot_read(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        result = dsmr_logger("run", cwd=locked, unprivileged=True)
        assert result.returncode == 2
        one_clear_line(result, "no --config FILE given", "could not look for .env in", "locked")

        variables = {
            "DSMRREADER_REMOTE_DATALOGGER_API_HOSTS": "http://192.168.1.10",
            "DSMRREADER_REMOTE_DATALOGGER_API_KEYS": KEY,
            "DSMR_LOGGER_SPOOL": str(tmp_path / "spool.sqlite3"),
        }
        migrated = dsmr_logger("check-config", cwd=locked, env=variables, unprivileged=True)
        assert migrated.returncode == 0, migrated.stderr
        assert "could not look for .env" in migrated.stderr  # said, and the variables used
    finally:
        locked.chmod(0o700)


# --- 5, 6, 7 ---------------------------------------------------------------------------------


def test_5_spool_export_into_a_missing_folder(tmp_path: Path) -> None:
    spool = tmp_path / "state" / "spool.sqlite3"
    spool_with_a_dead_letter(spool)
    config = config_file(tmp_path, spool=spool)
    target = tmp_path / "no-such-folder" / "out.log"
    result = dsmr_logger("spool", "export", target, "--config", config)
    assert result.returncode == 2
    one_clear_line(result, f"the folder {target.parent} does not exist")

    written = dsmr_logger("spool", "export", tmp_path / "out.log", "--config", config)
    assert written.returncode == 0, written.stderr
    assert frames_in((tmp_path / "out.log").read_bytes()) == [frames_in(default_capture())[0]]


def _closed_early(args: list[str], lines: int) -> subprocess.CompletedProcess[str]:
    """``dsmr-logger ARGS | head -LINES``: the reader goes away after ``lines`` lines."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dsmr_logger", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    assert process.stdout is not None and process.stderr is not None
    for _ in range(lines):
        process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    return subprocess.CompletedProcess(args, process.wait(timeout=60), "", stderr)


def test_6_a_pipe_closed_early_is_not_an_error(tmp_path: Path) -> None:
    capture = require_corpus() / CAPTURE_566
    for args in (["parse", str(capture), "--jsonl"], ["parse", str(capture)]):
        result = _closed_early(args, 1)
        assert (result.returncode, result.stderr) == (0, "")

    config = config_file(tmp_path)
    status = _closed_early(["status", "--json", "--config", str(config)], 0)
    assert (status.returncode, status.stderr) == (3, "")  # still the answer: unknown


def test_7_a_second_demo_in_the_same_folder(tmp_path: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-m", "dsmr_logger", "demo", "--duration", "60"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:
        assert first.stdout is not None
        while "frames" not in (line := first.stdout.readline()):
            assert line, "the first demo ended"
        second = dsmr_logger("demo", "--duration", "5", cwd=tmp_path)
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        assert "demo: cannot start:" in second.stderr
        assert "in use by another dsmr-logger daemon" in second.stderr
        assert "--dir DIR picks another folder" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        rest, errors = first.communicate(timeout=30)
    assert first.returncode == 0, errors
    assert "Raw telegrams archived in" in rest


# --- 9, 10, 11 -----------------------------------------------------------------------------


def test_9_options_anywhere_after_the_program_name(tmp_path: Path) -> None:
    spool = tmp_path / "state" / "spool.sqlite3"
    spool_with_a_dead_letter(spool)
    config = str(config_file(tmp_path, spool=spool))
    outputs = {
        dsmr_logger(*order).stdout
        for order in (
            ["spool", "list", "--config", config],
            ["spool", "--config", config, "list"],
            ["--config", config, "spool", "list"],
        )
    }
    (output,) = outputs
    assert "dead letters held: 1" in output
    wrong = dsmr_logger("--config", config, "parse", "-", stdin=b"")
    assert wrong.returncode == 2
    assert "--config: not used by parse" in wrong.stderr


def test_10_requeue_of_an_unknown_id_changes_nothing_and_says_so(tmp_path: Path) -> None:
    spool = tmp_path / "state" / "spool.sqlite3"
    spool_with_a_dead_letter(spool)
    config = config_file(tmp_path, spool=spool)
    result = dsmr_logger("spool", "requeue", "999", "--config", config)
    assert result.returncode == 2
    assert "no dead letter #999; nothing requeued" in result.stderr
    assert "requeued" not in result.stdout
    shown = dsmr_logger("spool", "show", "999", "--config", config)
    assert shown.returncode == 2
    one_clear_line(shown, "no dead letter #999")

    requeued = dsmr_logger("spool", "requeue", "1", "--config", config)
    assert requeued.returncode == 0
    assert "requeued 1 dead letter(s); a running daemon sends them within 10 s" in requeued.stdout
    listed = dsmr_logger("spool", "list", "--config", config).stdout
    assert "dead letters held: none" in listed
    assert "requeued, waiting for the daemon: 1" in listed


def test_10_status_labels_its_dead_letter_count_a_running_total() -> None:
    document = {
        "healthy": True,
        "reasons": [],
        "time": 1_790_000_000.0,
        "meter": {
            "port": "/dev/ttyUSB0",
            "state": "ok",
            "last_frame_at": 1_790_000_000.0,
            "frames": 10,
            "rejected": {},
            "reconnects": 0,
        },
        "sinks": [
            {
                "name": "home",
                "delivered": 6,
                "backlog": 0,
                "dead_letters": 4,
                "oldest_age": None,
                "failing_since": None,
            }
        ],
    }
    assert "dead-lettered since start 4" in render(document)


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_11_a_spool_path_under_a_file(tmp_path: Path, command: str) -> None:
    (tmp_path / "afile").write_text("x")
    config = config_file(tmp_path, spool=tmp_path / "afile" / "spool.sqlite3")
    result = dsmr_logger(command, "--config", config)
    assert result.returncode == (1 if command == "run" else 2)
    one_clear_line(result, "spool.path: ", f"{tmp_path / 'afile'} is a file, not a directory")


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_11_a_spool_path_that_is_a_directory(tmp_path: Path, command: str) -> None:
    (tmp_path / "spool.sqlite3").mkdir()
    config = config_file(tmp_path, spool=tmp_path / "spool.sqlite3")
    result = dsmr_logger(command, "--config", config)
    assert result.returncode == (1 if command == "run" else 2)
    one_clear_line(result, f"{tmp_path / 'spool.sqlite3'} is a directory, not a file")


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_11_a_spool_directory_the_user_cannot_write(tmp_path: Path, command: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o555)
    config = config_file(tmp_path, spool=state / "spool.sqlite3")
    try:
        result = dsmr_logger(command, "--config", config, unprivileged=True)
    finally:
        state.chmod(0o755)
    assert result.returncode == (1 if command == "run" else 2)
    one_clear_line(result, f"cannot create {state}/spool.sqlite3: {state} is not writable by")


@pytest.mark.parametrize("command", ["backfill", "import"])
def test_11_backfill_and_import_in_a_spool_folder_the_user_cannot_write(
    tmp_path: Path, command: str
) -> None:
    """Run without ``sudo -u dsmr-logger`` (the README's commands have it), both said only
    "[Errno 13] Permission denied: '/var/lib/dsmr-logger/import'"; the line now names the file
    and the command to run instead."""
    state = tmp_path / "state"
    state.mkdir(mode=0o555)
    capture = tmp_path / "capture.log"
    capture.write_bytes(default_capture())
    climkit = (
        '\n[import.climkit]\nusername = "api-user"\npassword = "pw"\n'
        'site = "5f0c0ffee0c0ffee0c0ffee0"\nmeter = "5f0c0ffee0c0ffee0c0ffee1"\n'
    )
    config = config_file(tmp_path, spool=state / "spool.sqlite3", extra=climkit)
    args = (
        ["backfill", "--from", str(capture), "--sink", "home"]
        if command == "backfill"
        else ["import", "climkit", "--sink", "home"]
    )
    try:
        result = dsmr_logger(*args, "--config", config, unprivileged=True)
    finally:
        state.chmod(0o755)
    assert result.returncode == 1
    line = one_clear_line(result, f"{command}: cannot write {state}/", "Permission denied")
    assert "[Errno" not in line
    assert line.endswith(f"sudo -u dsmr-logger dsmr-logger {command} ...)")


# --- 12: check-config catches what run would trip on ------------------------------------------


def test_12_a_missing_meter_device_is_a_warning(tmp_path: Path) -> None:
    config = config_file(tmp_path, port=str(tmp_path / "tty"))
    result = dsmr_logger("check-config", "--config", config)
    assert result.returncode == 0
    one_clear_line(result, "warning: meter.port: ", f"{tmp_path / 'tty'} does not exist (yet)")
    assert result.stdout.startswith("[meter]")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"api_key": "REPLACE-WITH-YOUR-DSMR-READER-API-KEY"}, "still the example's placeholder"),
        ({"spool": "state/spool.sqlite3"}, "spool.path: must be an absolute path"),
        (
            {"meter": "reconnect_initial = 90.0"},
            "meter.reconnect_initial: 90 is above meter.reconnect_max (60)",
        ),
        (
            {
                "extra": '[[sink]]\nname = "a"\ntype = "archive"\ndirectory = "/srv/a"\n'
                '[[sink]]\nname = "b"\ntype = "archive"\ndirectory = "/srv/a/"\n'
            },
            "sink[2] (b).directory: /srv/a is also sink[1] (a)'s",
        ),
        (
            {"extra": '[[sink]]\nname = "a"\ntype = "archive"\ndirectory = "relative"\n'},
            "sink[1] (a).directory: must be an absolute path",
        ),
    ],
    ids=["placeholder", "relative-spool", "reconnect", "one-archive-dir", "relative"],
)
def test_12_check_config_refuses_what_run_would_trip_on(
    tmp_path: Path, change: dict[str, str], expected: str
) -> None:
    result = dsmr_logger("check-config", "--config", config_file(tmp_path, **change))
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    assert result.stdout == ""


def test_12_an_archive_directory_the_user_cannot_create(tmp_path: Path) -> None:
    locked = tmp_path / "srv"
    locked.mkdir(mode=0o555)
    extra = f'[[sink]]\nname = "keep"\ntype = "archive"\ndirectory = "{locked}/archive"\n'
    try:
        result = dsmr_logger(
            "check-config", "--config", config_file(tmp_path, extra=extra), unprivileged=True
        )
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2
    assert f"sink[1] (keep).directory: cannot create {locked}/archive: {locked} is" in (
        result.stderr
    )


# --- 13, 14: usage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["demo", "--duration", "-1"], "argument --duration: must be above 0, not -1"),
        (["demo", "--duration", "0"], "argument --duration: must be above 0, not 0"),
        (["demo", "--interval", "0"], "argument --interval: must be above 0, not 0"),
        (["simulate", "--interval", "-1"], "argument --interval: must be 0 or more, not -1"),
        (["simulate", "--interval", "nan"], "argument --interval: must be a finite number"),
        (["simulate", "--count", "0"], "argument --count: must be 1 or more, not 0"),
    ],
)
def test_13_negative_and_zero_numbers_are_refused(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result = dsmr_logger(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert not (tmp_path / "dsmr-logger-demo").exists()


def _commands() -> list[str]:
    """Every command the parser has, so a new one is held to the same standard."""
    import argparse

    from dsmr_logger.cli import _parser

    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(commands.choices)


COMMANDS = _commands()


@pytest.mark.parametrize("command", COMMANDS)
def test_14_every_command_explains_itself_with_its_defaults(command: str) -> None:
    result = dsmr_logger(command, "--help")
    assert result.returncode == 0
    usage, description = result.stdout.split("\n\n", 2)[:2]
    assert usage.startswith(f"usage: dsmr-logger {command}")
    assert len(description.split()) >= 8, description
    option, default = {
        "simulate": ("--interval", "(default: 1.0)"),
        "demo": ("--dir", "(default: dsmr-logger-demo)"),
        "parse": ("--timezone", "(default: Europe/Amsterdam)"),
    }.get(command, ("--help", ""))
    assert option in result.stdout and default in " ".join(result.stdout.split())


def test_14_run_and_backfill_say_what_users_ask() -> None:
    run = " ".join(dsmr_logger("run", "--help").stdout.split())
    assert "DSMRREADER_REMOTE_DATALOGGER_* variables" in run
    assert ".env file in the working folder" in run
    backfill = " ".join(dsmr_logger("backfill", "--help").stdout.split())
    assert "Resumable" in backfill and "continues where it stopped" in backfill
    listed = dsmr_logger("--help").stdout
    for command in COMMANDS:
        assert f"    {command}" in listed


@pytest.mark.parametrize("action", ["list", "show", "requeue", "purge", "export"])
def test_14_every_spool_action_explains_itself(action: str) -> None:
    result = dsmr_logger("spool", action, "--help")
    assert result.returncode == 0
    assert len(result.stdout.split("\n\n")[1].split()) >= 4


def test_no_command_at_all_is_usage_with_exit_2() -> None:
    result = dsmr_logger()
    assert result.returncode == 2
    assert "usage: dsmr-logger" in result.stdout


def test_unknown_time_zone_and_unreadable_capture_are_usage_errors(tmp_path: Path) -> None:
    zone = dsmr_logger("parse", "-", "--timezone", "Mars/Olympus", stdin=b"")
    assert zone.returncode == 2
    one_clear_line(zone, "--timezone: unknown time zone 'Mars/Olympus'")
    missing = dsmr_logger("simulate", "--capture", tmp_path / "none.log")
    assert missing.returncode == 2
    one_clear_line(missing, f"cannot read {tmp_path / 'none.log'}: No such file or directory")
    (tmp_path / "bad.log.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    damaged = dsmr_logger("parse", tmp_path / "bad.log.gz")
    assert damaged.returncode == 2
    one_clear_line(damaged, "bad.log.gz")


def test_a_bad_decryption_key_is_named_never_shown() -> None:
    result = dsmr_logger("parse", "-", "--decryption-key", "00112233zz", stdin=b"")
    assert result.returncode == 2
    one_clear_line(result, "--decryption-key: must be 32 hex digits")
    assert "00112233zz" not in result.stderr


def test_an_empty_spool_says_so(tmp_path: Path) -> None:
    spool = tmp_path / "state" / "spool.sqlite3"
    store = Spool(spool, max_bytes=1 << 20)
    store.open()
    store.close()
    listed = dsmr_logger("spool", "list", "--config", config_file(tmp_path, spool=spool))
    assert listed.returncode == 0
    assert f"spool {spool}: no telegram waiting" in listed.stdout
    assert "bytes" not in listed.stdout


def test_purge_without_a_terminal_deletes_nothing(tmp_path: Path) -> None:
    spool = tmp_path / "state" / "spool.sqlite3"
    spool_with_a_dead_letter(spool)
    config = config_file(tmp_path, spool=spool)
    result = dsmr_logger("spool", "purge", "--config", config, stdin=b"")
    assert (result.returncode, "Traceback" in result.stderr) == (1, False)
    assert "nothing deleted" in result.stdout
    assert "dead letters held: 1" in dsmr_logger("spool", "list", "--config", config).stdout
    # The exit status a script sees is the one the help documents (it said only "1 the spool
    # cannot be used", which an unconfirmed purge is not).
    assert "a purge not confirmed" in " ".join(dsmr_logger("spool", "--help").stdout.split())


def test_setpriv_really_takes_root_file_access_away(tmp_path: Path) -> None:
    """The permission tests above prove something only if their commands cannot read a 000 file."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0)
    command = [*unprivileged_prefix(), sys.executable, "-c", f"open({str(secret)!r})"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "PermissionError" in result.stderr
    os.chmod(secret, 0o600)


@pytest.mark.parametrize(
    "content", [b"", b"(not a certificate)", b"-----BEGIN CERTIFICATE-----\nxx"]
)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_12_a_ca_file_without_a_certificate_is_named_before_anything_connects(
    tmp_path: Path, content: bytes, command: str
) -> None:
    """Every ``ca_file`` (here an HTTP meter's) is loaded as the clients load it: a file holding
    no certificate is one line naming the key and the path, exit 2, not an ssl traceback when
    the first poll opens its connection."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    path = tmp_path / "config.toml"
    path.write_text(
        '[meter]\ntype = "http"\nurl = "https://127.0.0.1:9/telegram"\n'
        f"ca_file = {json.dumps(str(ca))}\n"
        f"[spool]\npath = {json.dumps(str(tmp_path / 'spool.sqlite3'))}\n"
    )
    result = dsmr_logger(command, "--config", path)
    assert result.returncode == 2
    one_clear_line(result, "meter.ca_file", str(ca), "no usable CA certificate")
    assert not (tmp_path / "spool.sqlite3").exists()
