"""The remote datalogger's environment → the same Config as the equivalent TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsmr_logger import config as cfg
from dsmr_logger.config_env import PREFIX, from_environment, parse_dotenv, read_dotenv

P = PREFIX
KEY_1 = "0123456789ABCDEFGHIJ-first"
KEY_2 = "ZYXWVUTSRQPONMLKJIHG-second"


def load_toml(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "equivalent.toml"
    path.write_text(text)
    return cfg.load(path)


def migrate(environ: dict[str, str], **kwargs: object) -> tuple[cfg.Config, list[str]]:
    result = from_environment(environ, **kwargs)  # type: ignore[arg-type]
    assert result is not None
    return result


def problems(environ: dict[str, str], **kwargs: object) -> list[str]:
    with pytest.raises(cfg.ConfigError) as caught:
        from_environment(environ, **kwargs)  # type: ignore[arg-type]
    return caught.value.problems


def test_serial_matches_equivalent_toml(tmp_path: Path) -> None:
    spool = tmp_path / "spool.sqlite3"
    environ = {
        P + "INPUT_METHOD": "serial",
        P + "SERIAL_PORT": "/dev/serial/by-id/usb-FTDI-if00-port0",
        P + "SERIAL_BAUDRATE": "9600",
        P + "SERIAL_BYTESIZE": "7",
        P + "SERIAL_PARITY": "E",
        P + "API_HOSTS": "http://192.168.1.10, https://dsmr.example.org:7777/",
        P + "API_KEYS": f"{KEY_1},{KEY_2}",
        P + "TIMEOUT": "5",
        P + "SLEEP": "2.5",
        P + "DEBUG_LOGGING": "True",
        "PATH": "/usr/bin",
    }
    config, notes = migrate(environ, spool_path=spool)
    expected = load_toml(
        tmp_path,
        f"""
[meter]
port = "/dev/serial/by-id/usb-FTDI-if00-port0"
baudrate = 9600
bytesize = 7
parity = "E"

[spool]
path = "{spool}"

[[sink]]
name = "192.168.1.10"
url = "http://192.168.1.10"
api_key = "{KEY_1}"
api = "v1"
timeout = 5
min_interval = 2.5

[[sink]]
name = "dsmr.example.org"
url = "https://dsmr.example.org:7777"
api_key = "{KEY_2}"
api = "v1"
timeout = 5
min_interval = 2.5

[log]
level = "debug"
""",
    )
    assert config == expected
    assert any("192.168.1.10" in note for note in notes)


def test_ipv4_matches_equivalent_toml(tmp_path: Path) -> None:
    environ = {
        P + "INPUT_METHOD": "ipv4",
        P + "NETWORK_HOST": "192.168.1.20",
        P + "NETWORK_PORT": "2001",
        P + "SERIAL_BAUDRATE": "9600",  # ignored for ipv4, like the script did
        P + "API_HOSTS": "http://10.0.0.5:8000,http://10.0.0.5:9000",
        P + "API_KEYS": f"{KEY_1},{KEY_2}",
        P + "DEBUG_LOGGING": "0",
    }
    config, notes = migrate(environ)
    expected = load_toml(
        tmp_path,
        f"""
[meter]
port = "socket://192.168.1.20:2001"

[[sink]]
name = "10.0.0.5"
url = "http://10.0.0.5:8000"
api_key = "{KEY_1}"
min_interval = 0.5

[[sink]]
name = "10.0.0.5-2"
url = "http://10.0.0.5:9000"
api_key = "{KEY_2}"
min_interval = 0.5
""",
    )
    assert config == expected
    assert config.meter.is_network
    assert any("ignored" in note and "SERIAL_BAUDRATE" in note for note in notes)


def test_script_defaults(tmp_path: Path) -> None:
    config, notes = migrate({P + "API_HOSTS": "http://dsmr", P + "API_KEYS": KEY_1})
    assert config.meter.port == "/dev/ttyUSB0"
    assert config.meter.serial == cfg.SerialSettings(115200, 8, "N", 1)
    (sink,) = config.sinks
    assert isinstance(sink, cfg.DsmrReaderSinkConfig)
    assert (sink.name, sink.timeout, sink.min_interval) == ("dsmr", 20.0, 0.5)
    assert config.log.level == "info"
    assert config.spool.path == cfg.DEFAULT_SPOOL_PATH
    assert any("/dev/ttyUSB0" in note for note in notes)


def test_no_variables_gives_none(tmp_path: Path) -> None:
    assert from_environment({}) is None
    assert from_environment({"HOME": "/root", "DATALOGGER_SLEEP": "1"}) is None
    dotenv = tmp_path / ".env"
    dotenv.write_text("DJANGO_SECRET_KEY=abc\nDSMRREADER_ADMIN_USER=admin\n")
    assert from_environment({"HOME": "/root"}, dotenv=dotenv) is None


def test_dotenv_is_read_and_environment_overrides_it(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# the remote datalogger\n"
        "\n"
        f"export {P}SERIAL_PORT=/dev/ttyAMA0\n"
        f"{P}SERIAL_BAUDRATE = 9600\n"
        f"{P}API_HOSTS='http://192.168.1.10'\n"
        f'{P}API_KEYS="{KEY_1}"  # from the API page\n'
        f"{P}TIMEOUT=7\n"
    )
    config, notes = migrate({P + "SERIAL_BAUDRATE": "115200", P + "SLEEP": "1"}, dotenv=dotenv)
    assert config.meter.port == "/dev/ttyAMA0"
    assert config.meter.serial.baudrate == 115200  # the environment wins
    (sink,) = config.sinks
    assert isinstance(sink, cfg.DsmrReaderSinkConfig)
    assert (sink.url, sink.api_key, sink.timeout, sink.min_interval) == (
        "http://192.168.1.10",
        KEY_1,
        7.0,
        1.0,
    )
    assert any("overrides" in note and "SERIAL_BAUDRATE" in note for note in notes)


def test_dotenv_alone_is_enough(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"{P}API_HOSTS=http://h\n{P}API_KEYS={KEY_1}\n")
    config, _ = migrate({}, dotenv=dotenv)
    assert config.sinks[0].name == "h"


def test_dotenv_syntax() -> None:
    text = (
        "\ufeff# comment\n"
        "   \n"
        "A=plain\r\n"
        "export B = spaced value  \n"
        "C='single # not a comment \\n'\n"
        'D="double \\"quoted\\" \\\\ \\n" # comment\n'
        "E=value # comment\n"
        "F=value#hash\n"
        "G=\n"
        "A=last wins\n"
        "exporter=x\n"
    )
    assert parse_dotenv(text) == {
        "A": "last wins",
        "B": "spaced value",
        "C": "single # not a comment \\n",
        "D": 'double "quoted" \\ \n',
        "E": "value",
        "F": "value#hash",
        "G": "",
        "exporter": "x",
    }


def test_dotenv_errors_name_file_and_line(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text('OK=1\njust some words\nBAD-NAME=1\nQ=\'open\nR="x" y\n')
    with pytest.raises(cfg.ConfigError) as caught:
        read_dotenv(dotenv)
    lines = caught.value.problems
    assert [line.split(": ", 1)[0] for line in lines] == [f"{dotenv}:{n}" for n in (2, 3, 4, 5)]
    assert "KEY=value" in lines[0]
    assert "missing closing '" in lines[2]
    missing = tmp_path / "absent.env"
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        from_environment({}, dotenv=missing)


def test_mismatched_hosts_and_keys_name_both_variables() -> None:
    found = problems({P + "API_HOSTS": "http://a,http://b", P + "API_KEYS": KEY_1})
    assert len(found) == 1
    assert found[0].startswith(f"{P}API_HOSTS and {P}API_KEYS: ")
    assert "2 host(s) but 1 key(s)" in found[0]
    assert KEY_1 not in found[0]


def test_missing_hosts_or_keys() -> None:
    found = problems({P + "API_HOSTS": "http://a"})
    assert found == [f"{P}API_KEYS: is required: the DSMR-reader API key(s), one per host"]


@pytest.mark.parametrize(
    ("variable", "value", "start"),
    [
        ("SERIAL_BAUDRATE", "12345", "must be one of 300, 600"),
        ("SERIAL_BAUDRATE", "fast", "must be an integer, not 'fast'"),
        ("SERIAL_BYTESIZE", "9", "must be one of 7, 8"),
        ("SERIAL_PARITY", "X", "must be one of 'N', 'E', 'O'"),
        ("SERIAL_PORT", "ftp://h:1", "unknown scheme 'ftp'"),
        ("TIMEOUT", "0", "must be between 0.05 and 600.0"),
        ("TIMEOUT", "soon", "must be a number"),
        ("SLEEP", "-1", "must be between 0.0 and 86400.0"),
        ("DEBUG_LOGGING", "maybe", "must be true or false"),
        ("INPUT_METHOD", "usb", "must be 'serial' or 'ipv4'"),
        ("MIN_SLEEP_FOR_RECONNECT", "x", "must be a number"),
        ("API_HOSTS", "192.168.1.10,http://b", "must be an http:// or https:// URL"),
        ("API_HOSTS", "http://u:pw@a,http://b", "must not contain a user name or password"),
        ("API_KEYS", "abc\u20acdef,second", "contains a character outside Latin-1"),
    ],
)
def test_invalid_value_names_the_variable(variable: str, value: str, start: str) -> None:
    environ = {P + "API_HOSTS": "http://a,http://b", P + "API_KEYS": f"{KEY_1},{KEY_2}"}
    environ[P + variable] = value
    found = problems(environ)
    assert len(found) == 1, found  # one line per variable, even when it feeds two sinks
    assert found[0].startswith(f"{P}{variable}: {start}"), found
    assert "meter." not in found[0] and "sink[" not in found[0]


def test_ipv4_needs_host_and_port() -> None:
    base = {P + "INPUT_METHOD": "ipv4", P + "API_HOSTS": "http://a", P + "API_KEYS": KEY_1}
    assert problems(base) == [
        f"{P}NETWORK_HOST: is required when the input method is ipv4",
        f"{P}NETWORK_PORT: is required when the input method is ipv4",
    ]
    found = problems({**base, P + "NETWORK_HOST": "ser2net", P + "NETWORK_PORT": "70000"})
    assert found == [f"{P}NETWORK_PORT: must be between 1 and 65535, not 70000"]


def test_unknown_and_empty_variables_are_noted() -> None:
    environ = {
        P + "API_HOSTS": "http://a",
        P + "API_KEYS": KEY_1,
        P + "SERIAL_BAUDRATE": "",
        P + "MIN_SLEEP_FOR_RECONNECT": "1.0",
        P + "SLEPE": "3",
    }
    config, notes = migrate(environ)
    assert config.meter.serial.baudrate == 115200
    assert config.meter.reconnect_initial == 1.0
    assert any("unknown" in note and P + "SLEPE" in note for note in notes)
    assert any("empty" in note and P + "SERIAL_BAUDRATE" in note for note in notes)
    assert any(P + "MIN_SLEEP_FOR_RECONNECT is ignored" in note for note in notes)


def test_api_keys_never_shown(tmp_path: Path) -> None:
    environ = {
        P + "API_HOSTS": "http://a,http://b",
        P + "API_KEYS": f"{KEY_1},{KEY_2}",
    }
    config, notes = migrate(environ)
    text = cfg.effective_toml(config) + repr(config) + "\n".join(notes)
    for key in (KEY_1, KEY_2):
        assert key not in text
        assert key[:-2] not in text
    assert cfg.mask(KEY_1) in cfg.effective_toml(config)
