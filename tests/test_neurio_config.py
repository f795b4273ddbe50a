"""``[meter] type = "neurio"``: every key checked with a precise error, the login never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsmr_logger import config
from dsmr_logger.cli import main

NEURIO = """
[meter]
type = "neurio"
url = "http://192.168.1.50"

[spool]
path = "{spool}"
"""
PASSWORD = "pw-Only-The-Sensor-Knows"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text.replace("{spool}", str(tmp_path / "spool.sqlite3")))
    return path


def with_meter_keys(*lines: str) -> str:
    return NEURIO.replace('url = "http://192.168.1.50"\n', "\n".join(lines) + "\n")


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["check-config", "--config", str(write(tmp_path, text))])
    out, err = capsys.readouterr()
    return status, out, err


def test_the_defaults_and_a_masked_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = NEURIO.replace(
        'url = "http://192.168.1.50"',
        f'url = "http://192.168.1.50/current-sample"\nusername = "owner"\npassword = "{PASSWORD}"',
    )
    status, out, err = check(tmp_path, text, capsys)
    assert status == 0, err
    assert PASSWORD not in out + err
    assert 'password = "****ws"' in out
    assert 'url = "http://192.168.1.50"' in out  # the pasted /current-sample is dropped
    for shown in ("interval = 10.0", "timeout = 5.0", 'grid_channel = "auto"', 'type = "neurio"'):
        assert shown in out
    meter = config.load(write(tmp_path, text)).meter
    assert isinstance(meter, config.NeurioMeterConfig)
    assert meter.where == "http://192.168.1.50/current-sample"
    assert PASSWORD not in repr(meter)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['url = "192.168.1.50"'], "meter.url: must be the sensor's http:// address"),
        (['url = "ftp://192.168.1.50"'], "meter.url: must be the sensor's http:// address"),
        (['url = "http://192.168.1.50?x=1"'], "meter.url: must be the sensor's address without"),
        (['url = "http://192.168.1.50:port"'], "meter.url: has an invalid port"),
        ([], "meter.url: is required"),
        (['url = "http://s"', "interval = 0.5"], "meter.interval: must be between 1.0 and"),
        (['url = "http://s"', 'interval = "10"'], "meter.interval: must be a number"),
        (['url = "http://s"', "timeout = 0"], "meter.timeout: must be between 0.1 and 60.0"),
        (['url = "http://s"', 'grid_channel = "net"'], "meter.grid_channel: must be one of 'auto'"),
        (['url = "http://s"', 'timezone = "Mars/Olympus"'], "meter.timezone: unknown time zone"),
        (['url = "http://s"', 'username = "a:b"', 'password = "x"'], "meter.username: must not"),
        (['url = "http://s"', 'username = "owner"'], "meter.password: is required with meter.user"),
        (['url = "http://s"', 'password = "x"'], "meter.username: is required with meter.password"),
        (['url = "http://s"', 'password = ""', 'username = "o"'], "meter.password: must not be"),
        (['url = "http://s"', 'port = "/dev/ttyUSB0"'], "meter.port: unknown key"),
    ],
    ids=lambda v: v[-1] if isinstance(v, list) and v else str(v)[:30],
)
def test_each_mistake_names_its_key_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], expected: str
) -> None:
    status, out, err = check(tmp_path, with_meter_keys(*lines), capsys)
    assert status == 2
    assert out == ""
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_login_in_the_url_is_refused_without_repeating_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = with_meter_keys(f'url = "http://owner:{PASSWORD}@192.168.1.50"')
    status, out, err = check(tmp_path, text, capsys)
    assert status == 2
    assert "meter.url: put the login in meter.username and meter.password" in err
    assert PASSWORD not in out + err
