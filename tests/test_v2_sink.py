"""API v2 end to end: meter on a pty → daemon → DsmrReaderV2Sink → fake DSMR-reader over real HTTP.

Also the fake server's v2 contract (validation, listing, the unencoded ``+``), so a green daemon
test means the fields would pass DSMR-reader's own serializer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from conftest import require_corpus
from dsmr_reader_server import (
    DATETIME_INVALID,
    FILTER_DATETIME_INVALID,
    PLAIN_500_PAGE,
    REQUIRED,
    V2_PATH,
    V2_REQUIRED,
    DsmrReaderProcess,
    DsmrReaderServer,
    v2_errors,
    v2_reading,
)
from structlog.testing import capture_logs
from waiting import wait_until
from yarl import URL

from dsmr_logger.config import Config, from_mapping
from dsmr_logger.daemon import Daemon
from dsmr_logger.delivery.spool import DeadLetter, Spool
from dsmr_logger.sources.p1.crc import crc16, format_crc
from dsmr_logger.telegram.capture import default_capture, frames_in
from dsmr_logger.telegram.obis import parse
from dsmr_logger.telegram.v2 import to_v2
from dsmr_logger.tools.simulate import MeterSimulator, VirtualSerialPort

KEY = "v2-sink-test-key-0123456"
TOKEN = {"Authorization": f"Token {KEY}"}
TELEGRAMS = frames_in(default_capture())
EXPECTED = [to_v2(parse(t)).fields for t in TELEGRAMS]
DSMR22 = "ndokter-dsmr_parser/v2_2__isk52mt382-1004.txt"
HEAT_METER = "ndokter-dsmr_parser/unpadded_crc__nwa-warmtelink.txt"
AUSTRIAN = "ndokter-dsmr_parser/sagemcom_t210_d_r__est5253710000_a.txt"  # Wh and W
SWEDISH = "dsmrreader-dsmr-reader/sweden_kamstrup__kam5.txt"  # totals 1.8.0/2.8.0 only
HUNGARIAN = "ndokter-dsmr_parser/v5_eon_hu__sag5sag-meter.txt"  # tariffs 1.8.3/1.8.4


def with_crc(body: bytes) -> bytes:
    """A telegram from ``/`` through ``!`` with its CRC and CRLF appended."""
    assert body.endswith(b"\r\n!")
    return body + format_crc(crc16(body)) + b"\r\n"


# A DSMR 5 telegram with a valid CRC but only a gas meter: nothing DSMR-reader can store.
GAS_ONLY = with_crc(
    b"/XMX5LGF0000000000\r\n\r\n1-3:0.2.8(50)\r\n0-0:1.0.0(190324150521W)\r\n"
    b"0-0:96.1.1(4530303331303033303031363939353135)\r\n0-1:24.1.0(003)\r\n"
    b"0-1:96.1.0(4730303339303031363532303530323136)\r\n0-1:24.2.1(190324150000W)(02345.678*m3)"
    b"\r\n!"
)


def corpus_telegram(name: str) -> bytes:
    frames = frames_in((require_corpus() / name).read_bytes())
    assert len(frames) == 1, name
    return frames[0]


def make_config(tmp_path: Path, port: str, url: str, timezone: str = "Europe/Amsterdam") -> Config:
    return from_mapping(
        {
            "meter": {
                "port": port,
                "idle_timeout": 5.0,
                "reconnect_initial": 0.05,
                "timezone": timezone,
            },
            "spool": {"path": str(tmp_path / "spool.sqlite3"), "flush_interval": 0.1},
            "sink": [
                {
                    "name": "home",
                    "url": url,
                    "api_key": KEY,
                    "api": "v2",
                    "timeout": 0.5,
                    "retry_initial": 0.01,
                    "retry_max": 0.05,
                }
            ],
        }
    )


@contextlib.asynccontextmanager
async def daemon_on_pty(
    tmp_path: Path, server: DsmrReaderServer, timezone: str = "Europe/Amsterdam"
) -> AsyncIterator[tuple[Daemon, VirtualSerialPort]]:
    port = VirtualSerialPort()
    daemon = Daemon(make_config(tmp_path, port.path, server.url, timezone))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await wait_until(lambda: daemon.source.status.connected, "the meter port")
        yield daemon, port
    finally:
        stop.set()
        try:
            async with asyncio.timeout(4):
                assert await task == 0
        finally:
            port.close()


async def play(port: VirtualSerialPort, telegrams: Sequence[bytes]) -> None:
    async with asyncio.timeout(2):
        simulator = MeterSimulator(port, telegrams, interval=0, as_recorded=True)
        await simulator.run(len(telegrams))


def dead_letters(tmp_path: Path) -> list[DeadLetter]:
    """Read after the daemon stopped: what the spool kept as dead letters."""
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=10**7)
    spool.open()
    try:
        return spool.dead_letters()
    finally:
        spool.close()


async def request(
    server: DsmrReaderServer,
    method: str,
    url: str | URL,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
        session.request(method, url, headers=TOKEN if headers is None else headers, **kwargs) as r,
    ):
        text = await r.text()
        is_json = r.content_type == "application/json"
        return r.status, json.loads(text) if is_json else text


# --- the daemon, end to end -------------------------------------------------------------------


async def test_capture_arrives_as_exactly_the_mapped_fields_in_order(tmp_path: Path) -> None:
    async with DsmrReaderServer(api_key=KEY) as server:
        async with daemon_on_pty(tmp_path, server) as (daemon, port):
            await play(port, TELEGRAMS)
            await wait_until(lambda: len(server.readings) == len(TELEGRAMS), "all readings")
        assert [list(r.items()) for r in server.readings] == [list(f.items()) for f in EXPECTED]
        assert [a.status for a in server.answers] == [201] * len(TELEGRAMS)
        assert [a.auth for a in server.answers] == ["token"] * len(TELEGRAMS)
        stored = json.loads(server.answers[0].body)  # the 201 body: the reading as stored
        assert stored["id"] == 1
        assert stored["timestamp"] == EXPECTED[0]["timestamp"]  # +01:00, Amsterdam in March
        assert stored["phase_voltage_l1"] == EXPECTED[0]["phase_voltage_l1"]
        assert stored["phase_power_current_l3"] == int(EXPECTED[0]["phase_power_current_l3"])
        assert daemon.workers[0].stats.delivered == len(TELEGRAMS)
        assert daemon.workers[0].stats.dead_letters == 0

        # What a backfill would ask: the newest stored reading, and a window by instant.
        first, last = EXPECTED[0]["timestamp"], EXPECTED[-1]["timestamp"]
        params = {"ordering": "-timestamp", "limit": "1"}
        status, answer = await request(server, "GET", server.url + V2_PATH, params=params)
        assert status == 200
        assert answer["count"] == len(TELEGRAMS)
        assert [r["timestamp"] for r in answer["results"]] == [last]
        params = {"timestamp__gte": first, "timestamp__lte": EXPECTED[2]["timestamp"]}
        status, answer = await request(server, "GET", server.url + V2_PATH, params=params)
        assert (status, answer["count"], answer["next"]) == (200, 3, None)


async def test_v2_400_dead_letters_that_telegram_with_the_field_message(tmp_path: Path) -> None:
    refused = EXPECTED[3]["timestamp"]
    message = "Ensure that there are no more than 9 digits in total."

    def reject(fields: dict[str, str]) -> dict[str, list[str]] | None:
        return {"electricity_delivered_1": [message]} if fields["timestamp"] == refused else None

    async with DsmrReaderServer(api_key=KEY, v2_reject=reject) as server:
        async with daemon_on_pty(tmp_path, server) as (daemon, port):
            await play(port, TELEGRAMS)
            await wait_until(
                lambda: (
                    len(server.readings) == len(TELEGRAMS) - 1
                    and daemon.workers[0].stats.dead_letters == 1
                ),
                "nine readings and one dead letter",
            )
        assert server.readings == [f for f in EXPECTED if f["timestamp"] != refused]
        assert [a.status for a in server.answers].count(400) == 1  # dead-lettered, not retried
    [dead] = dead_letters(tmp_path)
    assert (dead.sink, dead.status, dead.telegram) == ("home", 400, TELEGRAMS[3])
    assert json.loads(dead.body) == {"electricity_delivered_1": [message]}


@pytest.mark.parametrize("source", ["built-gas-only", "corpus-heat-meter"])
async def test_unmappable_telegram_is_dead_lettered_and_never_posted(
    tmp_path: Path, source: str
) -> None:
    bad = GAS_ONLY if source == "built-gas-only" else corpus_telegram(HEAT_METER)
    async with DsmrReaderServer(api_key=KEY) as server:
        async with daemon_on_pty(tmp_path, server) as (daemon, port):
            await play(port, [TELEGRAMS[0], bad, TELEGRAMS[1]])
            await wait_until(
                lambda: len(server.readings) == 2 and daemon.workers[0].stats.dead_letters == 1,
                "two readings and one dead letter",
            )
        assert server.readings == EXPECTED[:2]
        assert server.requests == 2  # the unmappable one never left the daemon
    [dead] = dead_letters(tmp_path)
    assert dead.status is None and dead.body == ""
    assert dead.reason.startswith("cannot map to API v2: ")
    assert "no electricity registers 1.8.1/1.8.2/1.8.0" in dead.reason
    assert dead.telegram.split(b"!")[0] == bad.split(b"!")[0]


async def test_dsmr22_without_timestamp_is_dated_by_receive_time_noted_once(
    tmp_path: Path,
) -> None:
    telegram = corpus_telegram(DSMR22)
    expected = to_v2(parse(telegram), received_at=datetime.now().astimezone()).fields
    with capture_logs() as logs:
        async with (
            DsmrReaderServer(api_key=KEY) as server,
            daemon_on_pty(tmp_path, server) as (_, port),
        ):
            before = time.time()
            await play(port, [telegram] * 3)
            await wait_until(lambda: len(server.readings) == 3, "three readings")
            after = time.time()
    assert [a.status for a in server.answers] == [201] * 3
    for reading in server.readings:
        stamp = datetime.fromisoformat(reading.pop("timestamp"))
        assert stamp.utcoffset() is not None
        assert int(before) <= stamp.timestamp() <= after
        assert reading == {k: v for k, v in expected.items() if k != "timestamp"}
    notes = [entry for entry in logs if entry["event"] == "v2 mapping note"]
    assert [(n["note"], n["sink"], n["log_level"]) for n in notes] == [
        ("no meter timestamp: dated by receive time", "home", "info")
    ]


@pytest.mark.parametrize(
    ("name", "timezone", "exact"),
    [
        pytest.param(
            AUSTRIAN,
            "Europe/Vienna",
            {  # 005017120*Wh, 001528646*Wh, 000000058*Wh, 000000286*W
                "timestamp": "2022-10-06T15:50:14+02:00",
                "electricity_delivered_1": "5017.120",
                "electricity_delivered_2": "1528.646",
                "electricity_returned_1": "0.000",
                "electricity_returned_2": "0.058",
                "electricity_currently_delivered": "0.286",
                "electricity_currently_returned": "0.000",
            },
            id="AT-Wh",
        ),
        pytest.param(
            SWEDISH,
            "Europe/Stockholm",
            {
                "timestamp": "2021-11-15T10:09:40+01:00",
                "electricity_delivered_1": "3.997",
                "electricity_delivered_2": "0.000",
                "phase_voltage_l3": "240.7",
                "phase_power_current_l1": "0",
            },
            id="SE-totals",
        ),
    ],
)
async def test_foreign_meter_arrives_in_kwh(
    tmp_path: Path, name: str, timezone: str, exact: dict[str, str]
) -> None:
    telegram = corpus_telegram(name)
    async with (
        DsmrReaderServer(api_key=KEY) as server,
        daemon_on_pty(tmp_path, server, timezone) as (_, port),
    ):
        await play(port, [telegram])
        await wait_until(lambda: len(server.readings) == 1, "the reading")
    [reading] = server.readings
    assert reading == to_v2(parse(telegram, zone=ZoneInfo(timezone))).fields
    assert {key: reading[key] for key in exact} == exact
    assert (
        json.loads(server.answers[0].body)["electricity_delivered_1"]
        == (exact["electricity_delivered_1"])
    )


def _hungarian_with_tariff3(kwh: str) -> bytes:
    body = corpus_telegram(HUNGARIAN)
    body = body.replace(b"1-0:1.8.3(000000.000*kWh)", f"1-0:1.8.3({kwh}*kWh)".encode())
    return with_crc(body[: body.rindex(b"!") + 1])


async def test_changing_tariff3_note_is_logged_once(tmp_path: Path) -> None:
    telegrams = [_hungarian_with_tariff3(f"000012.{n:03d}") for n in (1, 2, 3)]
    with capture_logs() as logs:
        async with (
            DsmrReaderServer(api_key=KEY) as server,
            daemon_on_pty(tmp_path, server, "Europe/Budapest") as (_, port),
        ):
            await play(port, telegrams)
            await wait_until(lambda: len(server.readings) == 3, "three readings")
    notes = [e["note"] for e in logs if e["event"] == "v2 mapping note" and "1.8.3" in e["note"]]
    assert len(notes) == 1, notes


# --- the fake server's v2 contract --------------------------------------------------------------


async def test_v2_post_validates_like_dsmr_readers_serializer() -> None:
    async with DsmrReaderServer(api_key=KEY) as server:
        url = server.url + V2_PATH
        # The API document's own example (form-encoded, '+' sent as %2B by aiohttp).
        example = {
            "electricity_currently_delivered": "1.500",
            "electricity_currently_returned": "0.025",
            "electricity_delivered_1": "2000",
            "electricity_delivered_2": "3000",
            "electricity_returned_1": "0",
            "electricity_returned_2": "0",
            "timestamp": "2017-04-15T00:00:00+02",
            "not_a_field": "ignored",
        }
        status, stored = await request(server, "POST", url, data=example)
        assert status == 201
        assert {k: v for k, v in stored.items() if v is not None} == {
            "id": 1,
            "timestamp": "2017-04-15T00:00:00+02:00",
            "electricity_delivered_1": "2000.000",
            "electricity_returned_1": "0.000",
            "electricity_delivered_2": "3000.000",
            "electricity_returned_2": "0.000",
            "electricity_currently_delivered": "1.500",
            "electricity_currently_returned": "0.025",
        }
        assert "not_a_field" not in stored and stored["phase_voltage_l1"] is None
        assert server.readings == [example]  # as posted, strings, unknown fields kept

        status, errors = await request(server, "POST", url, data={"phase_voltage_l1": "230.0"})
        assert status == 400 and errors == {name: [REQUIRED] for name in V2_REQUIRED}

        base = v2_reading("2017-04-15T00:00:00+02:00")
        bad = {
            "electricity_delivered_1": ("1000000.000", "no more than 9 digits in total"),
            "electricity_returned_1": ("1000000", "no more than 6 digits before the decimal"),
            "electricity_delivered_2": ("1.0001", "no more than 3 decimal places"),
            "electricity_currently_delivered": ("abc", "A valid number is required."),
            "phase_voltage_l1": ("230.25", "no more than 4 digits in total"),
            "phase_voltage_l2": ("23.25", "no more than 1 decimal places"),
            "phase_power_current_l1": ("1000", "less than or equal to 999"),
            "phase_power_current_l2": ("-1", "greater than or equal to 0"),
            "phase_power_current_l3": ("2.5", "A valid integer is required."),
            "timestamp": ("2017-04-15T00:00:00 02:00", DATETIME_INVALID),  # an unencoded '+'
        }
        fields = base | {name: value for name, (value, _) in bad.items()}
        status, errors = await request(server, "POST", url, data=fields)
        assert status == 400
        assert sorted(errors) == sorted(bad)
        for name, (_, message) in bad.items():
            assert len(errors[name]) == 1 and message in errors[name][0], (name, errors[name])
        assert v2_errors(base | {"timestamp": "2017-04-15T00:00:00"})  # no offset: refused
        assert not v2_errors(base | {"phase_power_current_l1": "3.0", "extra_device_delivered": ""})
        assert not v2_errors(base | {"timestamp": "2017-04-15T00:00Z"})

        status, errors = await request(server, "POST", url, headers={"X-AUTHKEY": "no"}, data=base)
        assert status == 403
        status, _ = await request(server, "POST", url, headers={"X-AUTHKEY": KEY}, json=base)
        assert status == 201
        assert len(server.readings) == 2


async def test_v2_modes_apply() -> None:
    async with DsmrReaderServer(api_key=KEY) as server:
        url = server.url + V2_PATH
        reading = v2_reading("2020-01-01T00:00:00+01:00")
        server.mode = "html500"
        assert await request(server, "POST", url, data=reading) == (500, PLAIN_500_PAGE)
        server.mode = "forbidden"
        assert (await request(server, "POST", url, data=reading))[0] == 403
        server.mode = "disabled"
        assert (await request(server, "GET", url))[0] == 405
        server.mode = "hang"
        posting = asyncio.create_task(request(server, "POST", url, data=reading))
        await server.wait_for_requests(4)
        assert server.hanging == 1
        server.mode = "ok"  # hang_outcome "drop": closed unanswered, nothing stored
        with pytest.raises(aiohttp.ClientError):
            await posting
        server.mode = "refuse"
        with pytest.raises(aiohttp.ClientConnectionError):
            await request(server, "POST", url, data=reading)
        await server.set_mode("ok")
        assert (await request(server, "POST", url, data=reading))[0] == 201
        assert server.readings == [reading]


async def test_v2_list_filters_by_instant_orders_and_pages() -> None:
    async with DsmrReaderServer(api_key=KEY) as server:
        server.readings.extend(
            [
                v2_reading("2021-03-28T00:30:00+01:00"),
                v2_reading("2021-03-28T03:30:00+02:00"),  # after the spring change
                v2_reading("2021-03-27T23:45:00Z"),  # 00:45+01:00, between the two above
                v2_reading("2021-03-28T02:00:00Z"),  # 04:00+02:00
            ]
        )
        url = server.url + V2_PATH
        status, answer = await request(server, "GET", url)
        assert status == 200 and answer["count"] == 4 and answer["next"] is None
        assert [r["id"] for r in answer["results"]] == [1, 3, 2, 4]
        assert [r["timestamp"] for r in answer["results"]] == [
            "2021-03-28T00:30:00+01:00",
            "2021-03-28T00:45:00+01:00",  # shown in the server's local time, with an offset
            "2021-03-28T03:30:00+02:00",
            "2021-03-28T04:00:00+02:00",
        ]
        params = {
            "timestamp__gte": "2021-03-28T00:45:00+01:00",
            "timestamp__lte": "2021-03-28T02:00:00Z",
            "ordering": "-timestamp",
            "limit": "1",
            "offset": "1",
        }
        status, answer = await request(server, "GET", url, params=params)
        assert (status, answer["count"]) == (200, 3)
        assert [r["id"] for r in answer["results"]] == [2]
        assert URL(answer["next"]).query["offset"] == "2"
        assert "offset" not in URL(answer["previous"]).query
        naive = {"timestamp__lte": "2021-03-28 00:45:00"}  # read in the server's zone
        assert (await request(server, "GET", url, params=naive))[1]["count"] == 2

        # '+' unencoded in the query arrives as a space: 400, exactly like DSMR-reader.
        raw = URL(f"{url}?timestamp__gte=2021-03-28T00:45:00+01:00", encoded=True)
        assert await request(server, "GET", raw) == (
            400,
            {"timestamp__gte": [FILTER_DATETIME_INVALID]},
        )
        raw = URL(f"{url}?timestamp__gte=2021-03-28T00:45:00%2B01:00", encoded=True)
        assert (await request(server, "GET", raw))[1]["count"] == 3
        assert (await request(server, "GET", url, headers={}))[0] == 403


def test_v2_over_the_process_control_port() -> None:
    reading = v2_reading("2020-01-01T00:00:00+01:00")
    refused = v2_reading("2020-01-01T00:00:10+01:00")
    with DsmrReaderProcess(api_key=KEY) as process:
        process.control(v2_reject_timestamps=[refused["timestamp"]])

        async def post_both() -> list[int]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
                statuses = []
                for fields in (reading, refused):
                    async with s.post(process.url + V2_PATH, headers=TOKEN, data=fields) as r:
                        statuses.append(r.status)
                return statuses

        assert asyncio.run(post_both()) == [201, 400]
        assert process.readings() == [reading]
        assert process.state()["readings"] == 1
