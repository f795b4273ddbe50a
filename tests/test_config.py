"""Configuration mistakes are reported by key, with exit status 2, before any port is opened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsmr_logger import config
from dsmr_logger.cli import main

GOOD = """
[meter]
port = "/dev/ttyUSB0"

[spool]
path = "{spool}"

[[sink]]
name = "home"
url = "http://192.168.1.10/"
api_key = "s3cr3t-api-key-0123456789"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text.replace("{spool}", str(tmp_path / "spool.sqlite3")))
    return path


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["check-config", "--config", str(write(tmp_path, text))])
    out, err = capsys.readouterr()
    return status, out, err


def test_good_config_prints_effective_values_with_secret_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = check(tmp_path, GOOD, capsys)
    assert status == 0, err
    assert "s3cr3t-api-key" not in out
    assert 'api_key = "****89"' in out
    assert "baudrate = 115200" in out
    assert 'url = "http://192.168.1.10"' in out
    # What check-config prints is itself a valid configuration.
    reloaded = config.load(write(tmp_path, out.replace('"****89"', '"another-key-123456"')))
    assert reloaded.meter == config.load(write(tmp_path, GOOD)).meter


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("baudrate", "12345"), "meter.baudrate: must be one of"),
        (("baudrate", '"fast"'), "meter.baudrate: must be one of"),
        (("require_crc", '"yes"'), "meter.require_crc: must be true or false"),
        (("idle_timeout", "-1"), "meter.idle_timeout: must be"),
        (("colour", '"blue"'), "meter.colour: unknown key"),
        (("profile", '"dsmr3"'), "meter.profile: must be one of 'dsmr4', 'dsmr22'"),
        (("port", '"ftp://meter:21"'), "meter.port: unknown scheme 'ftp'"),
        (("port", '"socket://meter"'), "meter.port: socket:// needs a host and a port"),
    ],
    ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_each_meter_mistake_names_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str], expected: str
) -> None:
    key, value = change
    text = GOOD.replace('port = "/dev/ttyUSB0"', f'port = "/dev/ttyUSB0"\n{key} = {value}')
    if key == "port":
        text = GOOD.replace('port = "/dev/ttyUSB0"', f"port = {value}")
    status, _, err = check(tmp_path, text, capsys)
    assert status == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace('url = "http://192.168.1.10/"', 'url = "192.168.1.10"'),
            ".url: must be an http",
        ),
        (GOOD.replace('api_key = "s3cr3t-api-key-0123456789"\n', ""), ".api_key: is required"),
        (GOOD + 'api = "v3"\n', ".api: must be one of 'v1', 'v2'"),
        (GOOD + "timeout = 0\n", ".timeout: must be between"),
        (GOOD + '[[sink]]\nname = "home"\ntype = "archive"\ndirectory = "/x"\n', "'home' is"),
        (GOOD + '[spool2]\npath = "x"\n', "spool2: unknown section"),
        (GOOD.replace("[meter]", '[spool]\ndurability = "sometimes"\n[meter]'), None),
        ("[meter]\n", "meter.port: is required"),
        ("", "meter: section is required"),
    ],
    ids=["url", "api_key", "api", "timeout", "dup-name", "section", "toml-dup", "port", "empty"],
)
def test_each_mistake_gives_exit_2_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str | None
) -> None:
    status, out, err = check(tmp_path, text, capsys)
    assert status == 2
    assert out == ""
    assert "config.toml" in err
    if expected is not None:
        assert expected in err


def test_toml_syntax_error_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = check(tmp_path, '[meter]\nport = "/dev/ttyUSB0\n', capsys)
    assert status == 2
    assert "config.toml" in err
    assert "line 2" in err


def test_missing_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check-config", "--config", str(tmp_path / "nope.toml")])
    assert status == 2
    assert "nope.toml: cannot read" in capsys.readouterr().err


def test_all_mistakes_are_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = GOOD.replace('port = "/dev/ttyUSB0"', 'port = "/dev/ttyUSB0"\nbaudrate = 1\nfoo = 1')
    status, _, err = check(tmp_path, text, capsys)
    assert status == 2
    assert "meter.baudrate" in err
    assert "meter.foo" in err


def test_dsmr22_profile_gives_9600_7e1(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, GOOD.replace("[meter]", '[meter]\nprofile = "dsmr22"')))
    assert loaded.meter.serial == config.SerialSettings(9600, 7, "E", 1)


def test_run_with_bad_config_exits_2_before_opening_the_port(tmp_path: Path) -> None:
    """A real process: exit status 2, message on stderr, and the missing port never touched."""
    text = GOOD.replace('"/dev/ttyUSB0"', f'"{tmp_path / "tty"}"') + "retries = 3\n"
    result = subprocess.run(
        [sys.executable, "-m", "dsmr_logger", "run", "--config", str(write(tmp_path, text))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "sink[0] (home).retries: unknown key" in result.stderr
    assert "meter link" not in result.stderr
    assert not (tmp_path / "spool.sqlite3").exists()


def _switch_on(lines: list[str]) -> list[str]:
    """Each documented `# key = value` uncommented (the first of alternatives), sections kept."""
    switched_on = []
    section, keys = "", set()
    for line in lines:
        if line.startswith("# [import."):  # an import section: switched on like its keys
            line = line[2:]
        if line.startswith("[") or line.startswith("# [[sink]]"):
            section, keys = line, set()
        uncommented = line[2:] if line.startswith("# ") else line
        key, eq, value = uncommented.partition(" = ")
        if not (eq and key.isidentifier()) or section.startswith("# ["):
            switched_on.append(line)
            continue
        if line.startswith("# ") and key not in keys:  # the first of alternatives
            switched_on.append(f"{key} = {value}")
        elif not line.startswith("# "):
            switched_on.append(line)
        keys.add(key)
    return switched_on


def _alternative_meters(example: str) -> tuple[list[str], list[list[str]]]:
    """The example without its commented-out `# [meter]` blocks (another kind of meter, each up
    to the next `# ---` rule or live section), and those blocks uncommented."""
    main: list[str] = []
    blocks: list[list[str]] = []
    inside = False
    for line in example.splitlines():
        if line == "# [meter]":
            inside = True
            blocks.append(["[meter]"])
            continue
        if inside and (line.startswith("# ---") or line.startswith("[") or not line):
            inside = False
        if inside:
            blocks[-1].append(line)
        else:
            main.append(line)
    return main, blocks


def test_example_config_loads_with_every_documented_key_switched_on(tmp_path: Path) -> None:
    """The example documents each key as `# key = value`: every one of them must be real, in
    the live sections and in each alternative `# [meter]` section put in the live one's place."""
    from conftest import REPO_ROOT

    shipped = (REPO_ROOT / "deploy" / "config.example.toml").read_text()
    with pytest.raises(config.ConfigError) as refused:  # as shipped: the key is a placeholder
        config.load(write(tmp_path, shipped))
    assert [p.split(": ", 1)[1] for p in refused.value.problems] == [
        "sink[0] (local).api_key: is still the example's placeholder; copy the key from "
        "DSMR-reader (Configuration > API)"
    ]
    example = shipped.replace("REPLACE-WITH-YOUR-DSMR-READER-API-KEY", "a-real-key-0123456789")
    assert config.load(write(tmp_path, example)).sinks
    main, alternatives = _alternative_meters(example)
    ca = tmp_path / "ca.pem"  # a real certificate: ca_file keys load theirs
    ca.write_bytes((REPO_ROOT / "dsmr_logger/sources/data/homewizard-ca.pem").read_bytes())
    switched_on = [
        f'ca_file = "{ca}"' if line.startswith("ca_file = ") else line for line in _switch_on(main)
    ]
    loaded = config.load(write(tmp_path, "\n".join(switched_on)))
    assert isinstance(loaded.meter, config.MeterConfig)
    assert loaded.meter.decryption_key is not None
    assert loaded.http.listen == "127.0.0.1:8484"
    assert loaded.imports.climkit and loaded.imports.copper and loaded.imports.neurio

    meter_start = switched_on.index("[meter]")
    meter_end = next(i for i, line in enumerate(switched_on) if line == "[spool]")
    rest = [*switched_on[:meter_start], *switched_on[meter_end:]]
    kinds = set()
    for block in alternatives:
        lines = [
            f'ca_file = "{ca}"' if line.startswith("ca_file = ") else line
            for line in _switch_on(block)
        ]
        variants = [lines]
        if 'type = "http"' in lines:  # a token, or a username and password: not both
            variants = [
                [line for line in lines if not line.startswith("token = ")],
                [line for line in lines if not line.startswith(("username = ", "password = "))],
            ]
        if 'type = "mqtt"' in lines:  # ca_file is for an mqtts:// broker only
            variants = [[line.replace('"mqtt://', '"mqtts://') for line in lines]]
        for variant in variants:
            other = config.load(write(tmp_path, "\n".join([*variant, *rest]))).meter
            kinds.add(other.type)
            if isinstance(other, config.NeurioMeterConfig):
                assert other.password is not None and other.username is not None
            else:
                assert other.ca_file == ca
    assert kinds == {"neurio", "homewizard", "http", "mqtt"}
