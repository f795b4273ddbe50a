"""A reading written as a telegram: valid CRC, exact values, and read back by our own parser.

Every non-P1 source (Neurio, cloud imports) depends on this: if the telegram's CRC were wrong the
framer would drop it; if a value were rounded the wrong way DSMR-reader would store it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.telegram.build import (
    GasReading,
    MeterReading,
    build_telegram,
    kwh_from_ws,
    meter_timestamp,
)
from dsmr_logger.telegram.obis import parse
from dsmr_logger.telegram.v2 import to_v2

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
HEADER = "NEU5\\NeurioLocal-0x0000C47F510179CF"


def frame_of(telegram: bytes) -> bytes:
    frames = FrameAssembler(require_crc=True).feed(telegram, 0.0)
    assert len(frames) == 1, "the framer must accept exactly this one telegram"
    return frames[0].raw


def test_watt_seconds_become_exact_kwh_in_every_register() -> None:
    reading = MeterReading(
        timestamp=datetime(2026, 7, 1, 10, 0, 5, tzinfo=UTC),
        delivered_1=kwh_from_ws(159_687_481_246),
        returned_1=kwh_from_ws(1_800_000),
        power_returned=Decimal("1.189"),
        phase_voltage=(Decimal("231.44"), None, None),
        phase_power_returned=(Decimal("1.189"), None, None),
    )
    telegram = frame_of(build_telegram(reading, header=HEADER, zone=AMSTERDAM))
    assert telegram.startswith(b"/NEU5\\NeurioLocal-0x0000C47F510179CF\r\n\r\n")
    assert b"\r\n0-0:1.0.0(260701120005S)\r\n" in telegram  # 10:00 UTC is 12:00 summer time
    assert b"\r\n1-0:1.8.1(044357.634*kWh)\r\n" in telegram
    assert b"\r\n1-0:2.8.1(000000.500*kWh)\r\n" in telegram
    assert b"\r\n1-0:1.7.0(00.000*kW)\r\n1-0:2.7.0(01.189*kW)\r\n" in telegram
    assert b"\r\n1-0:32.7.0(231.4*V)\r\n" in telegram
    fields = to_v2(parse(telegram, zone=AMSTERDAM)).fields
    assert fields["electricity_delivered_1"] == "44357.634"
    assert fields["electricity_returned_1"] == "0.500"
    assert fields["electricity_currently_returned"] == "1.189"
    assert fields["phase_voltage_l1"] == "231.4"
    assert fields["timestamp"] == "2026-07-01T12:00:05+02:00"


def test_the_october_hour_that_happens_twice_is_told_apart_by_its_flag() -> None:
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 summer time
    second = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 winter time
    assert meter_timestamp(first, AMSTERDAM) == b"261025023000S"
    assert meter_timestamp(second, AMSTERDAM) == b"261025023000W"
    for moment in (first, second):
        reading = MeterReading(timestamp=moment, delivered_1=Decimal(1))
        parsed = parse(frame_of(build_telegram(reading, header=HEADER, zone=AMSTERDAM)))
        assert parsed.timestamp == moment


def test_gas_is_written_with_its_own_timestamp() -> None:
    reading = MeterReading(
        timestamp=datetime(2026, 1, 5, 12, 0, 1, tzinfo=UTC),
        delivered_1=Decimal("1.5"),
        gas=GasReading(datetime(2026, 1, 5, 12, 0, tzinfo=UTC), Decimal("1234.5678")),
    )
    telegram = frame_of(build_telegram(reading, header=HEADER, zone=AMSTERDAM))
    assert b"\r\n0-1:24.2.1(260105130000W)(01234.568*m3)\r\n" in telegram
    assert to_v2(parse(telegram, zone=AMSTERDAM)).fields["extra_device_delivered"] == "1234.568"


@pytest.mark.parametrize(
    "bad",
    [
        {"delivered_1": Decimal(-1)},
        {"delivered_1": Decimal("NaN")},
        {"power_delivered": Decimal("-0.001")},
    ],
)
def test_a_value_no_register_can_hold_is_refused(bad: dict[str, Decimal]) -> None:
    values = {"delivered_1": Decimal(1), **bad}
    reading = MeterReading(timestamp=datetime(2026, 1, 1, tzinfo=UTC), **values)
    with pytest.raises(ValueError):
        build_telegram(reading, header=HEADER, zone=AMSTERDAM)


def test_a_naive_timestamp_and_a_bad_header_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        MeterReading(timestamp=datetime(2026, 1, 1), delivered_1=Decimal(1))
    reading = MeterReading(timestamp=datetime(2026, 1, 1, tzinfo=UTC), delivered_1=Decimal(1))
    with pytest.raises(ValueError, match="header"):
        build_telegram(reading, header="NEU5\\two words", zone=AMSTERDAM)


@given(
    ws=st.integers(min_value=0, max_value=10**15),
    kw=st.decimals(min_value=0, max_value=999, places=4),
    at=st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2090, 1, 1)),
)
def test_any_reading_round_trips_through_framer_parser_and_v2(
    ws: int, kw: Decimal, at: datetime
) -> None:
    moment = at.replace(tzinfo=UTC, microsecond=0)
    reading = MeterReading(timestamp=moment, delivered_1=kwh_from_ws(ws), power_delivered=kw)
    telegram = frame_of(build_telegram(reading, header=HEADER, zone=AMSTERDAM))
    parsed = parse(telegram, zone=AMSTERDAM)
    assert parsed.timestamp == moment
    value = parsed.value("1-0:1.8.1")
    assert value is not None
    exact = (Decimal(ws) / 3_600_000).quantize(Decimal("0.001"), rounding="ROUND_HALF_UP")
    assert value.number == exact
