"""``pair homewizard`` against the fake P1 Meter: the button, its 30 s window, the name rule,
and what is written where. The clock and the pauses between asks are injected: a button press
"two minutes later" takes no real time."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from homewizard_device import SERIAL, USER_NAME, FakeP1Meter, Pki

from dsmr_logger import cli
from dsmr_logger.config import HomeWizardConfig, load
from dsmr_logger.tools.pair import PairError, pair, pair_command, updated_config, user_name


class Clock:
    """A clock the fake device reads and the pairing's pauses advance."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses = 0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


@pytest.fixture
def ca_file(pki: Pki, tmp_path: Path) -> Path:
    return pki.write_ca(tmp_path / "test-ca.pem")


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("raspberrypi", "local/dsmr-logger-raspberrypi"),
        ("raspberrypi.local", "local/dsmr-logger-raspberrypi"),
        ("pi@meter cupboard", "local/dsmr-logger-pi-meter-cupboard"),
        (
            "a-very-long-host-name-for-the-meter-cupboard",
            "local/dsmr-logger-a-very-long-host-name-for-th",
        ),
        ("äöü", "local/dsmr-logger"),
        ("", "local/dsmr-logger"),
    ],
)
def test_the_user_name_fits_the_devices_rule(hostname: str, expected: str) -> None:
    name = user_name(hostname)
    assert name == expected
    assert USER_NAME.fullmatch(name), "the device would answer 400"
    assert len(name) - len("local/") <= 40


async def test_asks_until_the_button_is_pressed_then_gets_a_working_token(
    pki: Pki, ca_file: Path, tmp_path: Path
) -> None:
    clock = Clock()
    said: list[str] = []
    async with FakeP1Meter([b""], pki=pki, directory=tmp_path, clock=clock) as device:

        async def pause(seconds: float) -> None:
            clock.now += seconds
            clock.pauses += 1
            if clock.pauses == 5:  # the user walks to the meter cupboard
                device.press_button()

        paired = await pair(
            f"127.0.0.1:{device.https_port}",
            ca_file=ca_file,
            say=said.append,
            hostname="dsmr.home.arpa",
            sleep=pause,
        )
    assert paired.serial == SERIAL and paired.name == "local/dsmr-logger-dsmr"
    assert device.tokens == {"local/dsmr-logger-dsmr": paired.token}
    assert re.fullmatch(r"[0-9A-F]{32}", paired.token)
    assert [status for status, _ in device.user_requests] == [403] * 5 + [200]
    assert "Press the button on the P1 Meter now" in said[0] and SERIAL in said[0]
    assert all(paired.token not in line for line in said)


async def test_the_window_closes_30_s_after_the_press_and_asking_keeps_it_open(
    pki: Pki, ca_file: Path, tmp_path: Path
) -> None:
    clock = Clock()
    async with FakeP1Meter([b""], pki=pki, directory=tmp_path, clock=clock) as device:
        host = f"127.0.0.1:{device.https_port}"
        device.press_button()
        clock.now += 31  # pressed too early: the window has closed

        async def never(seconds: float) -> None:
            clock.now += seconds

        with pytest.raises(PairError, match="no button press within 3 s"):
            await pair(host, ca_file=ca_file, say=print, hostname="pi", wait=3, sleep=never)

        device.press_button()
        clock.now += 29
        first = await pair(host, ca_file=ca_file, say=print, hostname="pi", sleep=never)
        clock.now += 29  # 58 s after the press, but 29 s after the last ask
        second = await pair(host, ca_file=ca_file, say=print, hostname="pi", sleep=never)
    assert first.token != second.token
    assert device.tokens == {"local/dsmr-logger-pi": second.token}, "the old token is revoked"


async def test_a_device_that_is_no_p1_meter_or_not_homewizard_is_refused(
    pki: Pki, ca_file: Path, tmp_path: Path
) -> None:
    async with FakeP1Meter(
        [b""], pki=pki, directory=tmp_path, certificate_name="appliance/energysocket/5c2fafabcdef"
    ) as socket_device:
        with pytest.raises(PairError, match="not to a HomeWizard P1 Meter"):
            await pair(f"127.0.0.1:{socket_device.https_port}", ca_file=ca_file, say=print)
    other = Pki.create("Impostor").write_ca(tmp_path / "impostor.pem")
    async with FakeP1Meter([b""], pki=pki, directory=tmp_path) as device:
        with pytest.raises(PairError, match="not issued by the HomeWizard CA"):
            await pair(f"127.0.0.1:{device.https_port}", ca_file=other, say=print)
        with pytest.raises(PairError, match=r"firmware 6\.00 or later"):
            await pair(f"127.0.0.1:{device.http_port}", ca_file=ca_file, say=print)
    assert device.user_requests == [] and socket_device.user_requests == []


# --- what is written -------------------------------------------------------------------------

VALUES = {"type": "homewizard", "host": "192.168.1.20", "token": "A" * 32, "serial": SERIAL}


def test_a_p1_section_is_replaced_and_kept_commented() -> None:
    before = (
        '# mine\n[meter]\nport = "/dev/ttyUSB0"  # the cable\nprofile = "dsmr4"\n\n'
        '[log]\nlevel = "debug"\n'
    )
    after = updated_config(before, VALUES)
    data = tomllib.loads(after)
    assert data["meter"] == VALUES
    assert data["log"] == {"level": "debug"}
    assert after.startswith("# mine\n[meter]\n")
    assert '# port = "/dev/ttyUSB0"  # the cable' in after


def test_a_homewizard_section_is_updated_in_place() -> None:
    before = (
        '[meter]\ntype = "homewizard"\nhost = "192.168.1.20"\ninterval = 2.5\n'
        'token = "OLD0000000000000"\napi = "v1"\n'
    )
    after = updated_config(before, VALUES)
    assert tomllib.loads(after)["meter"] == VALUES | {"interval": 2.5, "api": "v2"}
    assert "OLD" not in after


def test_a_file_without_a_meter_section_gets_one() -> None:
    after = updated_config('[log]\nlevel = "info"\n', VALUES)
    assert tomllib.loads(after) == {"meter": VALUES, "log": {"level": "info"}}


async def test_the_command_writes_the_file_or_prints_the_token_once(
    pki: Pki, ca_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[meter]\nport = "/dev/ttyUSB0"\n')
    config.chmod(0o640)
    async with FakeP1Meter([b""], pki=pki, directory=tmp_path) as device:
        device.press_button()
        host = f"127.0.0.1:{device.https_port}"
        out, err = io.StringIO(), io.StringIO()
        # pair_command runs its own event loop: run it in a thread beside the device's loop.
        status = await asyncio.to_thread(pair_command, host, config, ca_file, out=out, err=err)
        assert status == 0, err.getvalue()
        token = next(iter(device.tokens.values()))
        assert out.getvalue() == "" and token not in err.getvalue()
        assert stat.S_IMODE(config.stat().st_mode) == 0o640
        meter = load(config).meter
        assert isinstance(meter, HomeWizardConfig)
        assert (meter.host, meter.token, meter.serial, meter.ca_file) == (
            host,
            token,
            SERIAL,
            ca_file,
        )

        out, err = io.StringIO(), io.StringIO()
        status = await asyncio.to_thread(pair_command, host, None, ca_file, out=out, err=err)
        assert status == 0
        second = next(iter(device.tokens.values()))
        assert out.getvalue().count(second) == 1 and second not in err.getvalue()
        assert tomllib.loads(out.getvalue())["meter"]["token"] == second

        broken = tmp_path / "broken.toml"
        broken.write_text("[meter\n")
        out, err = io.StringIO(), io.StringIO()
        status = await asyncio.to_thread(pair_command, host, broken, ca_file, out=out, err=err)
        assert status == 0, "paired: the token is shown rather than lost"
        assert "not valid TOML" in err.getvalue() and broken.read_text() == "[meter\n"
        assert out.getvalue().count(next(iter(device.tokens.values()))) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "http://192.168.1.20"], "meter.host: just the device's address"),
        (
            ["--host", "h", "--ca-file", "/nonexistent.pem"],
            "meter.ca_file: /nonexistent.pem: no such file",
        ),
    ],
)
def test_usage_mistakes_exit_2_naming_the_key(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["pair", "homewizard", *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_unreachable_device_exits_1_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here
    assert cli.main(["pair", "homewizard", "--host", f"127.0.0.1:{port}", "--wait", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsmr-logger: pairing failed: cannot reach https://127.0.0.1:")
    assert "Traceback" not in err


# --- a device answering the button press with something else than a token -----------------------


class Answering(FakeP1Meter):
    """A device whose ``POST /api/user`` answers 200 with ``body``."""

    def __init__(self, *args: Any, body: bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.body = body

    async def _user(self, request: web.Request) -> web.Response:
        self.user_requests.append((200, "?"))
        return web.Response(body=self.body, content_type="application/json")


async def test_a_200_nested_deeper_than_json_can_be_read_is_no_token(
    pki: Pki, ca_file: Path, tmp_path: Path
) -> None:
    nested = b"[" * 50_000 + b"]" * 50_000  # RecursionError in json.loads
    async with Answering([b""], pki=pki, directory=tmp_path, body=nested) as device:
        out, err = io.StringIO(), io.StringIO()
        host = f"127.0.0.1:{device.https_port}"
        status = await asyncio.to_thread(pair_command, host, None, ca_file, out=out, err=err)
    assert status == 1
    assert err.getvalue().splitlines()[-1] == (
        "dsmr-logger: pairing failed: the device answered 200 without a token"
    )
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    "token",
    [
        "ABCDEF0123456789\r\nX-Injected: 1",  # would split the next request's headers
        "ABCDEF0123456789\u20ac",  # outside Latin-1: no header can carry it
        "ABCDEF0123456789 ABCDEF",  # works in a header, but no configuration takes it
        "SHORT",
    ],
)
async def test_a_token_the_configuration_cannot_hold_is_refused_clearly(
    pki: Pki, ca_file: Path, tmp_path: Path, token: str
) -> None:
    body = json.dumps({"token": token, "name": "local/dsmr-logger-pi"}).encode()
    config = tmp_path / "config.toml"
    config.write_text('[meter]\nport = "/dev/ttyUSB0"\n')
    async with Answering([b""], pki=pki, directory=tmp_path, body=body) as device:
        out, err = io.StringIO(), io.StringIO()
        host = f"127.0.0.1:{device.https_port}"
        status = await asyncio.to_thread(pair_command, host, config, ca_file, out=out, err=err)
    assert status == 1
    last = err.getvalue().splitlines()[-1]
    assert last.startswith("dsmr-logger: pairing failed: the device answered with a token")
    assert "meter.token" in last
    assert device.token_requests == 0, "never sent in a header"
    assert out.getvalue() == "" and token.split()[0][:16] not in err.getvalue()
    assert config.read_text() == '[meter]\nport = "/dev/ttyUSB0"\n'


async def test_a_configuration_that_is_not_utf8_is_left_alone_and_the_token_shown_once(
    pki: Pki, ca_file: Path, tmp_path: Path
) -> None:
    """With --ca-file nothing reads the file before the button is pressed: the token exists
    by the time the file turns out unreadable, and must not be lost in a traceback."""
    config = tmp_path / "config.toml"
    before = '# caf\xe9 in Latin-1\n[meter]\nport = "/dev/ttyUSB0"\n'.encode("latin-1")
    config.write_bytes(before)
    async with FakeP1Meter([b""], pki=pki, directory=tmp_path) as device:
        device.press_button()
        out, err = io.StringIO(), io.StringIO()
        host = f"127.0.0.1:{device.https_port}"
        status = await asyncio.to_thread(pair_command, host, config, ca_file, out=out, err=err)
    token = next(iter(device.tokens.values()))
    assert status == 0, "paired: the token is shown rather than lost"
    assert f"{config}: not UTF-8 text" in err.getvalue() and token not in err.getvalue()
    assert tomllib.loads(out.getvalue())["meter"]["token"] == token
    assert out.getvalue().count(token) == 1
    assert config.read_bytes() == before


def test_only_line_feeds_end_lines_so_other_characters_survive_the_rewrite() -> None:
    """TOML ends lines only at LF (or CRLF); str.splitlines also splits at U+2028, U+0085, FF
    and others, which a comment or a string may hold."""
    before = (
        '[meter]  # the cable\u2028(until the dongle came)\r\nport = "/dev/ttyUSB0"\r\n\r\n'
        '[[sink]]\r\nurl = "http://dsmr.local"\r\napi_key = "k\u2028e\x85y"\r\n'
    )
    after = updated_config(before, VALUES)
    data = tomllib.loads(after)
    assert data["meter"] == VALUES
    assert data["sink"] == tomllib.loads(before)["sink"]
    assert "# the cable\u2028(until the dongle came)" in after
