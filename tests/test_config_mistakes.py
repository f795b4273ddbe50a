"""Configuration mistakes a person can make, and what ``check-config`` prints, read back.

Each test runs the real command (``python -m dsmr_logger``) and reads what the user reads: the
exit status, one line naming the key or variable, and never a secret. ``check-config`` prints the
effective configuration; a user may save that output as the new file, so it must read back as the
same configuration, and a secret it masked must be named as masked, not taken for the secret.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from cli_process import dsmr_logger, one_clear_line

SECRET = "pw-Zq8s3cr3t"
KEY = "review-api-key-0123456789"


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def spool(tmp_path: Path) -> str:
    return f"[spool]\npath = {json.dumps(str(tmp_path / 'state' / 'spool.sqlite3'))}\n"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('[meter]\nport = "socket://[192.168.1.20:2001"\n', "meter.port"),
        ('[meter]\nport = "rfc2217://[zz]:2001"\n', "meter.port"),
        ('[meter]\ntype = "mqtt"\nurl = "mqtt://[::1"\ntopic = "p1"\n', "meter.url"),
        ('[meter]\ntype = "neurio"\nurl = "http://[fe80::1"\n', "meter.url"),
        (
            '[meter]\nport = "/dev/null"\n[[sink]]\nname = "b"\ntype = "mqtt"\n'
            'url = "mqtts://[not-an-address]:8883"\n',
            "sink[0] (b).url",
        ),
    ],
)
def test_an_unclosed_or_bad_ipv6_bracket_in_any_address_is_exit_2_naming_the_key(
    tmp_path: Path, section: str, key: str
) -> None:
    result = dsmr_logger("check-config", "--config", write(tmp_path, section + spool(tmp_path)))
    assert result.returncode == 2
    one_clear_line(result, f"{key}: is not a valid URL")


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('[meter]\nport = "socket://p1 meter:2001"\n', "meter.port"),
        ('[meter]\nport = "rfc2217://meter!box:2001"\n', "meter.port"),
        ('[meter]\ntype = "mqtt"\nurl = "mqtt://my broker"\ntopic = "p1"\n', "meter.url"),
        (
            '[meter]\ntype = "homewizard"\nhost = "p1 dongle"\n'
            'token = "0123456789ABCDEF0123456789ABCDEF"\n',
            "meter.host",
        ),
        (
            '[meter]\nport = "/dev/null"\n[[sink]]\nname = "b"\ntype = "mqtt"\n'
            'url = "mqtt://home assistant:1883"\n',
            "sink[0] (b).url",
        ),
    ],
)
def test_a_host_name_with_a_space_in_any_address_is_exit_2_naming_the_key(
    tmp_path: Path, section: str, key: str
) -> None:
    """check-config took "socket://p1 meter:2001" (and the same in a broker or dongle address),
    and the daemon then retried a name no resolver answers, for ever. Every address a key holds
    meets the HTTP client's host rule."""
    result = dsmr_logger("check-config", "--config", write(tmp_path, section + spool(tmp_path)))
    assert result.returncode == 2
    one_clear_line(result, f"{key}: has an invalid host name")


def test_a_login_in_a_ser2net_address_is_refused_and_never_shown(tmp_path: Path) -> None:
    """socket:// has no login: a user:password@ there is a mistake, and check-config would
    have printed it in clear."""
    path = write(tmp_path, f'[meter]\nport = "socket://admin:{SECRET}@meter:2001"\n')
    for command in ("check-config", "run"):
        result = dsmr_logger(command, "--config", path)
        assert result.returncode == 2
        one_clear_line(result, "meter.port: socket:// and rfc2217:// take no user:password@")
        assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        (
            {"INPUT_METHOD": "ipv4", "NETWORK_HOST": "meter:2001", "NETWORK_PORT": "2001"},
            "NETWORK_HOST",
        ),
        (
            {"INPUT_METHOD": "ipv4", "NETWORK_HOST": f"admin:{SECRET}@h", "NETWORK_PORT": "1"},
            "NETWORK_HOST",
        ),
        ({"API_HOSTS": "http://[::1"}, "API_HOSTS"),
    ],
)
def test_migrated_addresses_that_are_not_addresses_name_the_variable(
    tmp_path: Path, variables: dict[str, str], named: str
) -> None:
    environment = {"API_HOSTS": "http://192.168.1.10", "API_KEYS": KEY, **variables}
    result = dsmr_logger(
        "check-config",
        cwd=tmp_path,
        env={
            **{f"DSMRREADER_REMOTE_DATALOGGER_{k}": v for k, v in environment.items()},
            "DSMR_LOGGER_SPOOL": str(tmp_path / "spool.sqlite3"),
        },
    )
    assert result.returncode == 2
    line = one_clear_line(result, f"DSMRREADER_REMOTE_DATALOGGER_{named}: ")
    assert SECRET not in result.stdout + result.stderr, line


def test_check_config_output_reads_back_as_the_same_configuration(tmp_path: Path) -> None:
    """Values TOML writes escaped (a line break, a tab, a quote, a backslash, DEL) are printed
    escaped, so the printed configuration is TOML and loads as the same configuration."""
    first = write(
        tmp_path,
        "[meter]\n"
        'type = "mqtt"\nurl = "mqtt://127.0.0.1"\n'
        'topic = "p1/\\"quoted\\"\\\\back\\u007Fdel\\ttab"\n'
        'username = "two\\nlines\\r\\u0001"\n' + spool(tmp_path),
    )
    printed = dsmr_logger("check-config", "--config", first)
    assert printed.returncode == 0, printed.stderr
    document = tomllib.loads(printed.stdout)  # TOML, whatever the values hold
    assert document["meter"]["username"] == "two\nlines\r\x01"
    assert document["meter"]["topic"] == 'p1/"quoted"\\back\x7fdel\ttab'
    again = dsmr_logger("check-config", "--config", write(tmp_path, printed.stdout, "again.toml"))
    assert again.returncode == 0, again.stderr
    assert again.stdout == printed.stdout


def test_check_config_output_saved_as_the_configuration_names_each_masked_secret(
    tmp_path: Path,
) -> None:
    """check-config masks secrets; a file saved from its output holds "****xy" instead of the
    key, which would fail at the first request. Each is named at once, never taken as a key."""
    first = write(
        tmp_path,
        '[meter]\nport = "/dev/null"\n'
        + spool(tmp_path)
        + f'[[sink]]\nname = "home"\nurl = "http://192.168.1.10"\napi_key = "{KEY}"\n'
        f'[import.climkit]\nusername = "u"\npassword = "{SECRET}"\nsite = "s"\nmeter = "m"\n',
    )
    printed = dsmr_logger("check-config", "--config", first)
    assert printed.returncode == 0, printed.stderr
    assert KEY not in printed.stdout and SECRET not in printed.stdout
    saved = dsmr_logger("check-config", "--config", write(tmp_path, printed.stdout, "saved.toml"))
    assert saved.returncode == 2
    problems = [line for line in saved.stderr.splitlines() if line.strip()]
    assert len(problems) == 2, saved.stderr
    assert "sink[0] (home).api_key: is the masked value check-config shows" in problems[0]
    assert "import.climkit.password: is the masked value check-config shows" in problems[1]
    assert "Traceback" not in saved.stderr


def test_a_credential_in_a_request_header_is_masked_by_check_config(tmp_path: Path) -> None:
    token = "Bearer eyJhbGciOi-" + SECRET
    path = write(
        tmp_path,
        '[meter]\ntype = "http"\nurl = "http://192.168.1.30/api/telegram"\n'
        f'headers = {{ Authorization = "{token}", "X-Api-Key" = "{SECRET}x", '
        'Accept = "text/plain" }\n' + spool(tmp_path),
    )
    printed = dsmr_logger("check-config", "--config", path)
    assert printed.returncode == 0, printed.stderr
    assert SECRET not in printed.stdout
    headers = tomllib.loads(printed.stdout)["meter"]["headers"]
    assert headers == {
        "Authorization": "****" + SECRET[-2:],
        "X-Api-Key": "****" + "tx",
        "Accept": "text/plain",
    }
    saved = dsmr_logger("check-config", "--config", write(tmp_path, printed.stdout, "saved.toml"))
    assert saved.returncode == 2
    one_clear_line(saved, "meter.headers: Authorization: is the masked value check-config shows")


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('[meter]\nport = "/dev/null"\nidle_timeout = {huge}\n', "meter.idle_timeout"),
        ('[meter]\nport = "/dev/null"\n[log]\nsummary_interval = {huge}\n', "log.summary_interval"),
        ('[meter]\nport = "/dev/null"\n[http]\nframe_window = {huge}\n', "http.frame_window"),
    ],
)
def test_an_integer_too_large_for_a_clock_is_named_not_a_traceback(
    tmp_path: Path, section: str, key: str
) -> None:
    """TOML integers are read whole: 400 digits passed the bound (>= 1.0) and crashed the
    conversion to seconds with OverflowError, in check-config and run alike."""
    path = write(tmp_path, section.format(huge="9" * 400) + spool(tmp_path))
    for command in ("check-config", "run"):
        result = dsmr_logger(command, "--config", path)
        assert result.returncode == 2
        one_clear_line(result, f"{key}: must be a number a clock can count, not one of 400 digits")


def test_an_integer_of_thousands_of_digits_is_named_not_a_traceback(tmp_path: Path) -> None:
    """Python refuses to read integers of over 4300 digits (ValueError, not TOML's error)."""
    path = write(tmp_path, f'[meter]\nport = "/dev/null"\nmax_frame_bytes = {"9" * 5000}\n')
    result = dsmr_logger("check-config", "--config", path)
    assert result.returncode == 2
    one_clear_line(result, f"{path}: not a configuration TOML can hold: Exceeds the limit")


def test_a_credential_in_the_polled_url_read_back_masked_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[meter]\ntype = "http"\n'
        f'url = "http://192.168.1.30/api/telegram?format=raw&token={SECRET}"\n' + spool(tmp_path),
    )
    printed = dsmr_logger("check-config", "--config", path)
    assert printed.returncode == 0, printed.stderr
    assert SECRET not in printed.stdout
    saved = dsmr_logger("check-config", "--config", write(tmp_path, printed.stdout, "saved.toml"))
    assert saved.returncode == 2
    one_clear_line(saved, "meter.url: the query's token: is the masked value check-config shows")


@pytest.mark.parametrize("listen", ["[::1:8484", "::1:8484", "[not-v6]:8484", "[::1]x:8484"])
def test_a_status_address_status_could_not_reach_is_named(tmp_path: Path, listen: str) -> None:
    """'[::1:8484' was accepted: the daemon listened on ::1, and 'status' could never ask it
    (the state was 'unknown', exit 3, with a healthy daemon running)."""
    path = write(
        tmp_path, f'[meter]\nport = "/dev/null"\n[http]\nlisten = "{listen}"\n' + spool(tmp_path)
    )
    result = dsmr_logger("check-config", "--config", path)
    assert result.returncode == 2
    one_clear_line(result, "http.listen: an IPv6 address goes in brackets, e.g. [::1]:8484")


def test_status_addresses_that_work_are_kept(tmp_path: Path) -> None:
    for listen in ("[::1]:8484", "127.0.0.1:8484", "0.0.0.0:8484", "localhost:8484"):
        path = write(
            tmp_path,
            f'[meter]\nport = "/dev/null"\n[http]\nlisten = "{listen}"\n' + spool(tmp_path),
        )
        result = dsmr_logger("check-config", "--config", path)
        assert result.returncode == 0, result.stderr
        assert f'listen = "{listen}"' in result.stdout


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://192.168.1.10/api/v1/datalogger/dsmrreading", "http://192.168.1.10"),
        (
            "https://dsmr.example:8443/dsmr/api/v2/datalogger/dsmrreading/",
            "https://dsmr.example:8443/dsmr",
        ),
        ("http://192.168.1.10/api/v1", "http://192.168.1.10"),
    ],
)
def test_a_sink_url_with_dsmr_readers_api_path_is_exit_2_naming_the_base_to_use(
    tmp_path: Path, url: str, base: str
) -> None:
    """DSMR-reader's API page shows the full endpoint; pasted as ``url`` it was accepted, and the
    daemon then posted to .../dsmrreading/api/v1/datalogger/dsmrreading and reported a 404 "no
    DSMR-reader API at that address" without saying the path was there twice."""
    config = write(
        tmp_path,
        '[meter]\nport = "/dev/null"\n'
        + spool(tmp_path)
        + f'[[sink]]\nname = "home"\nurl = "{url}"\napi_key = "{KEY}"\n',
    )
    result = dsmr_logger("check-config", "--config", config)
    assert result.returncode == 2
    line = one_clear_line(result, "sink[0] (home).url", "without the API path")
    assert line.endswith(f"use {base}")
    assert KEY not in result.stdout + result.stderr


def test_a_sink_url_under_a_sub_path_is_kept(tmp_path: Path) -> None:
    """DSMR-reader behind a proxy at /dsmr, or a path merely starting with "api", is a base."""
    for url in ("http://192.168.1.10/dsmr", "http://192.168.1.10/apiary"):
        config = write(
            tmp_path,
            '[meter]\nport = "/dev/null"\n'
            + spool(tmp_path)
            + f'[[sink]]\nname = "home"\nurl = "{url}"\napi_key = "{KEY}"\n',
        )
        result = dsmr_logger("check-config", "--config", config)
        assert result.returncode == 0, result.stderr
        assert tomllib.loads(result.stdout)["sink"][0]["url"] == url


def test_check_config_without_a_sink_says_where_telegrams_go(tmp_path: Path) -> None:
    """With no [[sink]] the daemon archives beside the spool, but check-config, which prints
    "every default filled in", showed no sink at all: a user could only guess that telegrams
    were kept. The output says where, and still reads back as the same configuration."""
    config = write(tmp_path, '[meter]\nport = "/dev/null"\n' + spool(tmp_path))
    result = dsmr_logger("check-config", "--config", config)
    assert result.returncode == 0, result.stderr
    archive = tmp_path / "state" / "archive"
    assert f"# No [[sink]]: every telegram is archived in {archive}/YYYY-MM-DD.log" in (
        result.stdout
    )
    assert "sink" not in tomllib.loads(result.stdout)
    again = dsmr_logger("check-config", "--config", write(tmp_path, result.stdout, "again.toml"))
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout

    with_sink = write(
        tmp_path,
        '[meter]\nport = "/dev/null"\n'
        + spool(tmp_path)
        + f'[[sink]]\nname = "home"\nurl = "http://192.168.1.10"\napi_key = "{KEY}"\n',
        "with-sink.toml",
    )
    shown = dsmr_logger("check-config", "--config", with_sink)
    assert shown.returncode == 0, shown.stderr
    assert "No [[sink]]" not in shown.stdout


@pytest.mark.parametrize(
    ("added", "said"),
    [
        (
            '[meter]\ntype = "neurio"\nurl = "http://192.168.1.50"\n',
            "line 5: a second [meter] section; a configuration has one: delete or comment out",
        ),
        (
            f'[[sink]]\nname = "a"\nurl = "http://h"\napi_key = "{KEY}"\n[sink]\nname = "b"\n',
            "line 9: [sink] after [[sink]]: every sink is written [[sink]]",
        ),
    ],
)
def test_a_section_written_twice_is_named_with_its_line_and_the_fix(
    tmp_path: Path, added: str, said: str
) -> None:
    """The example offers other [meter] sections, commented out: one uncommented beside the
    cable's was "Cannot declare ('meter',) twice (at line 5, column 7)", tomllib's words."""
    config = write(tmp_path, '[meter]\nport = "/dev/null"\n' + spool(tmp_path) + added)
    result = dsmr_logger("check-config", "--config", config)
    assert result.returncode == 2
    line = one_clear_line(result, f"{config}: {said}")
    assert "Cannot declare" not in line and "('" not in line


def test_a_configuration_without_a_meter_section_is_one_line_naming_every_kind(
    tmp_path: Path,
) -> None:
    """No [meter] at all gave two lines for one mistake, the first asking for "at least
    meter.port", which a Neurio or a Wi-Fi dongle does not have."""
    result = dsmr_logger("check-config", "--config", write(tmp_path, spool(tmp_path)))
    assert result.returncode == 2
    line = one_clear_line(result, "meter: section is required")
    assert "meter.port: is required" not in result.stderr
    for kind in ("neurio", "homewizard", "http", "mqtt"):
        assert repr(kind) in line
