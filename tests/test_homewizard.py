"""The HomeWizard P1 Meter source against a fake device on 127.0.0.1 (``homewizard_device.py``).

Real TLS with a test CA that is X.509 v1 like HomeWizard's, a device certificate named
``appliance/p1dongle/<serial>`` in its common name, real HTTP; the source runs in the test's loop
with small intervals, so a few hundred polls take a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from conftest import CORPUS, require_corpus
from cryptography import x509
from dsmr_reader_server import parse_failure
from homewizard_device import SERIAL, FakeP1Meter, Pki, device_config
from waiting import wait_until

from dsmr_logger import config as config_module
from dsmr_logger.config import ConfigError, HomeWizardConfig, from_mapping
from dsmr_logger.sources import MeterState, build_source
from dsmr_logger.sources.homewizard import device_tls, shipped_ca
from dsmr_logger.sources.http_poll import PollingSource
from dsmr_logger.sources.p1.framing import Frame, Rejection
from dsmr_logger.telegram.build import restamp
from dsmr_logger.telegram.capture import frames_in

CAPTURE = CORPUS / "nielsbasjes-dsmr-tools" / "ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"
FAST = {"interval": 0.01, "reconnect_initial": 0.01, "reconnect_max": 0.05, "timeout": 2.0}


def capture(count: int) -> list[bytes]:
    require_corpus()
    return frames_in(CAPTURE.read_bytes())[:count]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


@pytest.fixture
def ca_file(pki: Pki, tmp_path: Path) -> Path:
    return pki.write_ca(tmp_path / "test-ca.pem")


def meter_config(**table: Any) -> HomeWizardConfig:
    meter = from_mapping({"meter": table}).meter
    assert isinstance(meter, HomeWizardConfig)
    return meter


@contextlib.asynccontextmanager
async def running(
    config: HomeWizardConfig, state_path: Path | None = None
) -> AsyncIterator[tuple[PollingSource, list[Frame]]]:
    frames: list[Frame] = []
    source = build_source(config, frames.append, state_path=state_path)
    assert isinstance(source, PollingSource)
    task = asyncio.create_task(source.run())
    try:
        yield source, frames
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --- the CA: HomeWizard's, and the X.509 v1 trap ---------------------------------------------


def test_shipped_ca_is_homewizards_appliance_access_ca() -> None:
    shipped = x509.load_pem_x509_certificate(shipped_ca().encode())
    reference = CORPUS.parent / "reference" / "homewizard" / "homewizard-ca-cert.pem"
    if reference.is_file():
        assert shipped == x509.load_pem_x509_certificate(reference.read_bytes())
    assert shipped.version is x509.Version.v1
    assert shipped.subject.rfc4514_string().startswith("CN=Appliance Access CA")
    assert shipped.not_valid_after_utc.date() == datetime.date(2031, 12, 16)
    trusted = [dict(n[0] for n in c["subject"]) for c in device_tls().get_ca_certs()]
    assert [names["commonName"] for names in trusted] == ["Appliance Access CA"], "only it"


async def test_a_version_1_ca_passes_only_with_strict_verification_cleared(
    pki: Pki, ca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.13 sets VERIFY_X509_STRICT by default, which refuses a v1 CA; the device
    context clears it (and only it). Simulated here on any Python by setting the flag."""
    async with FakeP1Meter([], pki=pki, directory=tmp_path) as device:
        strict = device_tls(ca_file)
        strict.verify_flags |= ssl.VERIFY_X509_STRICT
        with pytest.raises(ssl.SSLCertVerificationError, match="invalid CA certificate"):
            await asyncio.open_connection(
                "127.0.0.1",
                device.https_port,
                ssl=strict,
                server_hostname=f"appliance/p1dongle/{SERIAL}",
            )
        made = ssl.create_default_context

        def like_python_313(*args: Any, **kwargs: Any) -> ssl.SSLContext:
            context = made(*args, **kwargs)
            context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
            return context

        monkeypatch.setattr(ssl, "create_default_context", like_python_313)
        context = device_tls(ca_file)
        assert not context.verify_flags & ssl.VERIFY_X509_STRICT
        assert context.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN  # the rest left as it was
        _, writer = await asyncio.open_connection(
            "127.0.0.1",
            device.https_port,
            ssl=context,
            server_hostname=f"appliance/p1dongle/{SERIAL}",
        )
        writer.close()


# --- API v2: every distinct telegram once, in order --------------------------------------------


async def test_v2_takes_each_distinct_telegram_once_in_order(
    pki: Pki, ca_file: Path, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    telegrams = capture(60)
    async with FakeP1Meter(
        telegrams, pki=pki, directory=tmp_path, repeat=3, silent_polls=4
    ) as device:
        token = device.token_for("local/dsmr-logger-test")
        config = meter_config(**device_config(device, ca_file, token=token, **FAST))
        async with running(config) as (source, frames):
            await wait_until(lambda: len(frames) == 60, "60 telegrams", 20.0)
            await wait_until(lambda: device.served >= 180, "the last one served 3 times", 5.0)
            await asyncio.sleep(0.1)  # more polls of the last one: still repeats
    assert [f.raw for f in frames] == telegrams
    assert all(f.crc is not None for f in frames)
    status = source.status
    assert status.state is MeterState.OK
    # The poll in flight when the source was stopped may have been served and not read.
    assert device.served - 61 <= status.repeats <= device.served - 60
    assert status.repeats >= 120
    assert source.counters.frames == 60
    assert device.polls <= status.polls <= device.polls + 1
    assert status.port == f"https://127.0.0.1:{device.https_port}/api/telegram"
    assert device.silent_answers == 4
    print(
        f"v2: {device.polls} polls, {device.silent_answers} answered 503, {device.served} "
        f"telegrams served, {status.repeats} repeats skipped, {len(frames)} taken"
    )
    silent = [e for e in logs if e["event"].startswith("no new telegram from the meter")]
    assert len(silent) == 1, "the silent meter is logged once, not once per 503"
    assert "telegram:no-telegram-received" in silent[0]["reason"]
    assert all(token not in repr(event) for event in logs)


async def test_a_silent_meter_is_shown_and_polled_on(
    pki: Pki, ca_file: Path, tmp_path: Path
) -> None:
    telegrams = capture(3)
    async with FakeP1Meter(telegrams, pki=pki, directory=tmp_path) as device:
        config = meter_config(
            **device_config(device, ca_file, token=device.token_for("local/x"), **FAST)
        )
        async with running(config) as (source, frames):
            await wait_until(lambda: len(frames) >= 1, "the first telegram")
            device.silent = True
            await wait_until(lambda: source.status.state is MeterState.SILENT, "state silent")
            assert source.status.connected, "the device answers: the link is up"
            assert "no telegram from the meter" in (source.status.last_error or "")
            polls = device.polls
            await wait_until(lambda: device.polls > polls + 5, "polling on at the interval")
            device.silent = False
            await wait_until(lambda: len(frames) == 3, "the rest once the meter speaks")
            assert source.status.state is MeterState.OK
            assert source.status.last_error is None
            assert source.status.last_error_at is None, "no time shown for an error cleared"


# --- refusals: one clear error each, and the token never goes to the wrong party --------------


async def test_a_refused_token_is_one_clear_error_with_the_pairing_hint(
    pki: Pki, ca_file: Path, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    async with FakeP1Meter(capture(5), pki=pki, directory=tmp_path) as device:
        device.token_for("local/dsmr-logger-pi")
        wrong = "0123456789ABCDEF0123456789ABCDEF"
        config = meter_config(**device_config(device, ca_file, token=wrong, **FAST))
        async with running(config) as (source, frames):
            await wait_until(lambda: device.unauthorized >= 4, "four refused polls", 5.0)
    assert frames == []
    assert device.position == 0, "nothing was served, so nothing is lost"
    assert source.status.state is MeterState.MISCONFIGURED
    error = source.status.last_error or ""
    assert "401 user:unauthorized" in error
    assert f"dsmr-logger pair homewizard --host 127.0.0.1:{device.https_port}" in error
    refusals = events(logs, "meter device refuses us")
    assert len(refusals) == 1, "logged once, not once per poll"
    assert refusals[0]["log_level"] == "error"
    assert all(wrong not in repr(event) for event in logs)


async def test_a_certificate_naming_another_device_is_refused_before_the_token_is_sent(
    pki: Pki, ca_file: Path, tmp_path: Path
) -> None:
    """meter.serial pins the name: a device presenting another name never sees the token."""
    async with FakeP1Meter(
        capture(2), pki=pki, directory=tmp_path, serial="a0b1c2d3e4f5"
    ) as device:
        token = device.token_for("local/x")
        config = meter_config(
            **device_config(device, ca_file, token=token, serial="5c2faf000001", **FAST)
        )
        async with running(config) as (source, frames):
            await wait_until(
                lambda: source.status.state is MeterState.MISCONFIGURED, "the refusal", 5.0
            )
    assert frames == []
    assert device.token_requests == 0
    error = source.status.last_error or ""
    assert "not issued to appliance/p1dongle/5c2faf000001" in error
    assert "another device at this address" in error


@pytest.mark.parametrize(
    ("certificate_name", "expected"),
    [
        ("appliance/energysocket/5c2fafabcdef", "not to a P1 Meter"),
        ("dsmr.example.org", "not to a P1 Meter"),
    ],
)
async def test_an_unpinned_device_must_present_a_p1_meter_name(
    pki: Pki, ca_file: Path, tmp_path: Path, certificate_name: str, expected: str
) -> None:
    async with FakeP1Meter(
        capture(2), pki=pki, directory=tmp_path, certificate_name=certificate_name
    ) as device:
        config = meter_config(
            **device_config(device, ca_file, token=device.token_for("local/x"), **FAST)
        )
        async with running(config) as (source, frames):
            await wait_until(lambda: source.status.state is MeterState.MISCONFIGURED, "refusal")
    assert frames == [] and device.token_requests == 0
    assert expected in (source.status.last_error or "")
    assert repr(certificate_name) in (source.status.last_error or "")


async def test_a_certificate_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    other = Pki.create("Not HomeWizard").write_ca(tmp_path / "other-ca.pem")
    async with FakeP1Meter(capture(2), pki=pki, directory=tmp_path) as device:
        config = meter_config(
            **device_config(device, other, token=device.token_for("local/x"), **FAST)
        )
        async with running(config) as (source, frames):
            await wait_until(lambda: source.status.state is MeterState.MISCONFIGURED, "refusal")
    assert frames == [] and device.token_requests == 0
    assert "not issued by the HomeWizard CA" in (source.status.last_error or "")


async def test_the_shipped_ca_refuses_a_device_it_did_not_issue(pki: Pki, tmp_path: Path) -> None:
    async with FakeP1Meter(capture(2), pki=pki, directory=tmp_path) as device:
        table = device_config(device, tmp_path, token=device.token_for("local/x"), **FAST)
        del table["ca_file"]
        async with running(meter_config(**table)) as (source, _):
            await wait_until(lambda: source.status.state is MeterState.MISCONFIGURED, "refusal")
    assert device.token_requests == 0
    assert "not issued by the HomeWizard CA" in (source.status.last_error or "")


async def test_a_device_whose_api_contradicts_its_certificate_is_refused(
    pki: Pki, ca_file: Path, tmp_path: Path
) -> None:
    async with FakeP1Meter(
        capture(2), pki=pki, directory=tmp_path, certificate_name="appliance/p1dongle/0000000000aa"
    ) as device:
        config = meter_config(
            **device_config(device, ca_file, token=device.token_for("local/x"), **FAST)
        )
        async with running(config) as (source, frames):
            await wait_until(lambda: source.status.state is MeterState.MISCONFIGURED, "refusal")
    assert frames == [] and device.served == 0
    assert "its certificate names '0000000000aa'" in (source.status.last_error or "")


# --- API v1 --------------------------------------------------------------------------------------


async def test_v1_polls_plain_http_without_a_token(pki: Pki, tmp_path: Path) -> None:
    telegrams = capture(10)
    async with FakeP1Meter(telegrams, pki=pki, directory=tmp_path, repeat=2) as device:
        config = meter_config(type="homewizard", host=f"127.0.0.1:{device.http_port}", **FAST)
        assert config.version == "v1"
        assert config.where == f"http://127.0.0.1:{device.http_port}/api/v1/telegram"
        async with running(config) as (source, frames):
            await wait_until(lambda: len(frames) == 10, "ten telegrams")
            device.v1_enabled = False
            await wait_until(lambda: source.status.state is MeterState.MISCONFIGURED, "refusal")
    assert [f.raw for f in frames] == telegrams
    assert device.token_requests == 0
    assert "switch it on in the HomeWizard Energy app" in (source.status.last_error or "")


# --- payloads behave as bytes on a wire ----------------------------------------------------------


async def test_payloads_with_two_telegrams_garbage_or_a_cut_behave_as_on_a_wire(
    pki: Pki, tmp_path: Path
) -> None:
    t = capture(6)
    payloads = [
        b"\x00\xffnoise\r\n" + t[0] + t[1],  # garbage, then two telegrams in one answer
        t[1] + b"<trailing junk>",  # the second again: a repeat
        t[2][: len(t[2]) // 2],  # cut off: never continued
        t[3].rstrip(b"\r\n"),  # the last line without its CRLF: the answer ended there
        t[4],
    ]
    async with FakeP1Meter(payloads, pki=pki, directory=tmp_path) as device:
        config = meter_config(type="homewizard", host=f"127.0.0.1:{device.http_port}", **FAST)
        async with running(config) as (source, frames):
            await wait_until(lambda: len(frames) == 4, "four telegrams")
            await wait_until(lambda: source.status.repeats >= 2, "repeats of the last")
    assert [f.raw for f in frames] == [t[0], t[1], t[3], t[4]]
    counters = source.intake.assembler.counters
    assert counters.garbage_bytes >= len(b"\x00\xffnoise\r\n<trailing junk>")
    assert counters.rejected[Rejection.INTERRUPTED] == 1
    assert source.rejected() == {"interrupted": 1}


def _without_crc(telegram: bytes) -> bytes:
    return telegram[: telegram.rindex(b"!") + 1] + b"\r\n"


async def test_a_telegram_without_crc_is_completed_so_dsmr_reader_takes_it(
    pki: Pki, tmp_path: Path
) -> None:
    """Old firmware served DSMR 4/5 telegrams ending in a bare '!'; DSMR-reader's parser wants
    the CRC of such a telegram. A DSMR 2.2 telegram (no version line) never had one."""
    t = capture(2)
    dsmr22 = (
        b"/ISk5\\2MT382-1000\r\n\r\n0-0:96.1.1(4B414C37303035313039)\r\n"
        b"1-0:1.8.1(12345.678*kWh)\r\n!\r\n"
    )
    payloads = [_without_crc(t[0]), _without_crc(t[1]).rstrip(b"\r\n"), dsmr22]
    async with FakeP1Meter(payloads, pki=pki, directory=tmp_path) as device:
        config = meter_config(type="homewizard", host=f"127.0.0.1:{device.http_port}", **FAST)
        async with running(config) as (_, frames):
            await wait_until(lambda: len(frames) == 3, "three telegrams")
    assert [f.telegram for f in frames[:2]] == t, "completed with the CRC the meter sent"
    assert all(parse_failure(f.telegram.decode()) is None for f in frames)
    assert frames[2].telegram == dsmr22 and frames[2].crc is None

    async with FakeP1Meter(payloads, pki=pki, directory=tmp_path) as device:
        strict = meter_config(
            type="homewizard", host=f"127.0.0.1:{device.http_port}", require_crc=True, **FAST
        )
        async with running(strict) as (source, frames):
            await wait_until(lambda: source.rejected().get("no_crc", 0) >= 3, "three refusals")
    assert frames == []


async def test_a_restart_does_not_take_the_telegram_still_served_again(
    pki: Pki, tmp_path: Path
) -> None:
    t = capture(3)
    state = tmp_path / "spool.sqlite3-last-polled"
    async with FakeP1Meter(t, pki=pki, directory=tmp_path) as device:
        config = meter_config(type="homewizard", host=f"127.0.0.1:{device.http_port}", **FAST)
        device.hold = True  # the meter sends nothing new across the restart
        async with running(config, state) as (_, first):
            await wait_until(lambda: len(first) == 1, "the first telegram")
        assert state.read_bytes() == restamp_key(t[0])
        async with running(config, state) as (source, second):
            # Counted when the source has looked at it, not when the device sent it.
            await wait_until(lambda: source.status.repeats >= 3, "the same one, three times")
            assert second == []
            device.hold = False
            await wait_until(lambda: len(second) == 2, "the next two")
    assert [f.raw for f in first + second] == t


def restamp_key(telegram: bytes) -> bytes:
    """The meter timestamp a telegram is known by (what the state file holds)."""
    start = telegram.index(b"0-0:1.0.0(") + len(b"0-0:1.0.0(")
    return telegram[start : telegram.index(b")", start)]


def test_restamped_telegrams_are_distinct() -> None:
    """The repeat key is the meter timestamp: the same registers at another time are new."""
    from dsmr_logger.sources.intake import repeat_key

    t = capture(1)[0]
    assert repeat_key(t) != repeat_key(restamp(t, b"010101000000W"))
    assert repeat_key(t) == restamp_key(t)


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"host": "http://192.168.1.20"}, "meter.host: just the device's address"),
        ({"host": "192.168.1.20:99999"}, "meter.host: invalid address"),
        ({"host": "h", "token": "not a token!"}, "meter.token: must be the token"),
        ({"host": "h", "api": "v2"}, 'meter.token: api = "v2" needs a token'),
        ({"host": "h", "api": "v3"}, "meter.api: must be one of"),
        ({"host": "h", "serial": "5c:2f"}, "meter.serial: must be the device's 12 hex digits"),
        (
            {"host": "h", "ca_file": "/nonexistent/ca.pem"},
            "meter.ca_file: /nonexistent/ca.pem: no such file",
        ),
        ({"host": "h", "interval": 0}, "meter.interval: must be between 0.01 and 3600.0"),
        ({"host": "h", "port": "/dev/ttyUSB0"}, "meter.port: unknown key"),
        ({}, "meter.host: is required"),
    ],
)
def test_each_homewizard_mistake_names_its_key(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping({"meter": {"type": "homewizard", **table}})
    assert any(p.startswith(problem) for p in error.value.problems), error.value.problems


def test_host_forms_and_what_is_shown() -> None:
    token = "0123456789ABCDEF0123456789ABCDEF"
    for host in ("192.168.1.20", "p1meter.local", "192.168.1.20:8443", "[fe80::1]:443"):
        meter = meter_config(type="homewizard", host=host, token=token)
        assert meter.where == f"https://{host}/api/telegram"
        assert token not in meter.where and token not in repr(meter)
    shown = config_module.effective_toml(
        from_mapping({"meter": {"type": "homewizard", "host": "h", "token": token}})
    )
    assert 'token = "****EF"' in shown and token not in shown
    assert meter_config(type="homewizard", host="h", api="v1", token=token).version == "v1"


# --- a hostile answer: one failed poll, never the end of the source -----------------------------

NESTED = b"[" * 50_000 + b"]" * 50_000
"""JSON nested deeper than Python's decoder recurses (RecursionError at 1,000 levels)."""


class NestingDevice(FakeP1Meter):
    """Answers ``nested`` requests to ``where`` with ``NESTED`` (a 503 on the telegram endpoint,
    a 200 on ``/api``), then as the fake device does."""

    def __init__(self, *args: Any, where: str, nested: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.where, self.nested = where, nested

    def _nesting(self, status: int) -> web.Response | None:
        if self.nested <= 0:
            return None
        self.nested -= 1
        return web.Response(status=status, body=NESTED, content_type="application/json")

    async def _info(self, request: web.Request) -> web.Response:
        nested = self._nesting(200) if self.where == "/api" else None
        return nested or await super()._info(request)

    def _current(self) -> web.Response:
        nested = self._nesting(503) if self.where == "telegram" and self.served else None
        return nested or super()._current()


@pytest.mark.parametrize(
    ("version", "where"), [("v2", "telegram"), ("v2", "/api"), ("v1", "telegram")]
)
async def test_deeply_nested_json_from_the_device_is_a_failed_poll_not_a_crash(
    pki: Pki, ca_file: Path, tmp_path: Path, version: str, where: str
) -> None:
    telegrams = capture(4)
    async with NestingDevice(
        telegrams, pki=pki, directory=tmp_path, where=where, nested=3
    ) as device:
        if version == "v2":
            table = device_config(device, ca_file, token=device.token_for("local/x"), **FAST)
        else:
            table = {"type": "homewizard", "host": f"127.0.0.1:{device.http_port}", **FAST}
        frames: list[Frame] = []
        source = build_source(meter_config(**table), frames.append)
        task = asyncio.create_task(source.run())
        try:
            await wait_until(lambda: len(frames) == 4 or task.done(), "every telegram", 10.0)
            assert not task.done(), f"the source ended: {task.exception()!r}"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert device.nested == 0, "the device did answer with nested JSON"
    assert [f.raw for f in frames] == telegrams
    assert source.status.state is MeterState.OK


# --- the device at the address changes: the token stays with the one it was learned from ------


class Address:
    """A TCP address on 127.0.0.1 that leads to ``target`` (a port): the LAN address of a P1
    Meter, which DHCP may give to another device. ``move`` closes every connection through it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Address:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self.move(self.target)

    async def move(self, target: int) -> None:
        self.target = target
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            try:
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._pipes.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_a_device_learned_from_its_certificate_is_required_of_every_later_connection(
    pki: Pki, ca_file: Path, tmp_path: Path
) -> None:
    """No meter.serial: the first connection learns 5c2fafabcdef from the certificate. When
    another P1 Meter answers at that address (DHCP gave it the lease), the token must not go
    to it: it grants full control of the device it was issued by, and no other device takes
    it anyway."""
    telegrams = capture(6)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    async with (
        FakeP1Meter(telegrams, pki=pki, directory=first) as device,
        FakeP1Meter(telegrams, pki=pki, directory=second, serial="a0b1c2d3e4f5") as other,
        Address(device.https_port) as address,
    ):
        token = device.token_for("local/dsmr-logger-pi")
        table = device_config(device, ca_file, token=token, **FAST)
        table["host"] = f"127.0.0.1:{address.port}"
        async with running(meter_config(**table)) as (source, frames):
            await wait_until(lambda: len(frames) >= 2, "telegrams from the paired device")
            device.hold = True
            await address.move(other.https_port)
            await wait_until(
                lambda: source.status.state is MeterState.MISCONFIGURED, "the refusal", 5.0
            )
            polls = source.status.polls
            await wait_until(lambda: source.status.polls >= polls + 5, "five more tries", 5.0)
            refused = source.status.last_error or ""
            device.hold = False
            await address.move(device.https_port)  # the lease went back
            await wait_until(lambda: len(frames) == 6, "the rest, from the paired device", 5.0)
    assert other.token_requests == 0, "the token never went to the other device"
    assert other.served == 0
    assert "its certificate is not issued to appliance/p1dongle/5c2fafabcdef" in refused
    assert [f.raw for f in frames] == telegrams
