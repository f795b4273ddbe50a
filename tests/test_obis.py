"""OBIS parsing: what a telegram says, read exactly; a bad line costs that line, never a crash.

Values must be exact (a meter register is a counter, not a float), timestamps must be the instant
the meter meant (including the repeated autumn hour), and no byte sequence may crash the parser.
"""

from __future__ import annotations

import contextlib
import functools
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from conftest import corpus_entries, require_corpus
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmr_logger.telegram.capture import frames_in
from dsmr_logger.telegram.obis import (
    MBusDevice,
    Message,
    ParseError,
    PowerFailure,
    Reading,
    Value,
    parse,
    parse_timestamp,
)

CET = timezone(timedelta(hours=1))
CEST = timezone(timedelta(hours=2))

# Corpus files with lines this parser cannot read, and why (all are broken fixtures): those lines
# are listed in Reading.unreadable, every other register is read.
PARTLY_READ = {
    "athombv-node-dsmr-parser/dsmr-4.0-isk-1.txt": "'1-0:99:97.0(",  # DSMR 4.0 spec typo
    "athombv-node-dsmr-parser/dsmr-4.0-spec-example.txt": "'1-0:99:97.0(",
    "athombv-node-dsmr-parser/dsmr-4.2.2-spec-example.txt": "'1-0:72:32.0(",
    "nielsbasjes-dsmr-tools/dsmrparseronspecification42__isk52mt382-1000.txt": "'1-0:72:32.0(",
    "dcrasch-nerves_dsmr/example-telegram__isk52mt382-1000.txt": "'1-0:99:97.0(",
    "dcrasch-nerves_dsmr/example-telegram-3frames.log": "'1-0:99:97.0(",
    "athombv-node-dsmr-parser/esmr-5.0-ene5-211.txt": "line without a value",  # mangled
    "nielsbasjes-dsmr-tools/dsmrparser__isk52mt382-1000-2.txt": "'A-0:96.1.1(",
    "wassasin-dsmr5/overflow.txt": "'***NO CARIER***'",
}


@functools.cache
def corpus_bytes(name: str) -> bytes:
    return (require_corpus() / name).read_bytes()


def telegram(*lines: str) -> bytes:
    return ("\r\n".join(("/TEST5\\2TEST", "", *lines, "!")) + "\r\n").encode("latin-1")


def frames_of(entry: dict) -> list[bytes]:
    data = corpus_bytes(entry["file"])
    return [data] if entry["kind"] == "telegram" else frames_in(data)


# --- the corpus ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry", corpus_entries("telegram", "stream", "capture"), ids=lambda e: e["file"]
)
def test_every_corpus_telegram_parses_and_names_any_line_it_cannot_read(entry: dict) -> None:
    frames = frames_of(entry)
    assert frames
    expected = PARTLY_READ.get(entry["file"])
    for frame in frames:
        reading = parse(frame)
        assert isinstance(reading, Reading)
        if expected is None:
            assert reading.unreadable == ()
        else:
            assert any(expected in line for line in reading.unreadable), reading.unreadable
            assert reading.objects, "the other registers are read"


def test_partly_read_list_names_only_corpus_files() -> None:
    require_corpus()
    names = {entry["file"] for entry in corpus_entries("telegram", "stream", "capture")}
    assert set(PARTLY_READ) <= names


def test_a_malformed_line_costs_only_that_line() -> None:
    """The DSMR 4.0 specification's own example has ``1-0:99:97.0`` (a colon for a dot)."""
    reading = parse(corpus_bytes("athombv-node-dsmr-parser/dsmr-4.0-spec-example.txt"))
    assert reading.unreadable == (
        "not an OBIS id: '1-0:99:97.0(2)(0:96.7.19)(101208152415W)(0000000240*s)(10120'",
        "not an OBIS id: '1-0:72:32.0(00000)'",
    )
    assert reading.value("1-0:1.8.1") == Value("123456.789*kWh", Decimal("123456.789"), "kWh")
    assert reading.timestamp is not None


@pytest.mark.parametrize(
    ("raw", "number", "unit"),
    [
        ("005A", Decimal("5"), "A"),
        ("234.5V", Decimal("234.5"), "V"),
        ("005*A", Decimal("5"), "A"),
        ("1500W", Decimal("1.500"), "kW"),
        ("201231235959W", None, None),  # a timestamp with its season flag, not watts
        ("201231235959S", None, None),
    ],
)
def test_a_unit_without_a_star_is_read_with_or_without_a_decimal_point(
    raw: str, number: Decimal | None, unit: str | None
) -> None:
    value = parse(telegram(f"1-0:31.7.0({raw})")).value("1-0:31.7.0")
    assert value == Value(raw, number, unit)


def test_capture_parses_in_order_with_rising_timestamps() -> None:
    capture = "nielsbasjes-dsmr-tools/ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"
    stamps = [parse(frame).timestamp for frame in frames_in(corpus_bytes(capture))]
    assert len(stamps) == 566
    assert all(a is not None and b is not None and a < b for a, b in pairwise(stamps))


# --- structure -----------------------------------------------------------------------------------


def test_dsmr42_reading() -> None:
    reading = parse(corpus_bytes("ndokter-dsmr_parser/v4_2__kfm5kaifa-meter.txt"))
    assert reading.header == "KFM5KAIFA-METER"
    assert reading.version == "42"
    assert reading.timestamp == datetime(2016, 11, 13, 20, 57, 57, tzinfo=CET)
    assert reading.value("1-0:1.8.1") == Value("001581.123*kWh", Decimal("1581.123"), "kWh")
    assert reading.value("0-0:96.14.0") == Value("0002", Decimal(2), None)
    assert reading.value("0-0:96.13.0") == Value("", None, None)
    assert reading.value("1-0:99.99.9") is None
    assert reading.mbus == (
        MBusDevice(
            channel=1,
            device_type=3,
            equipment_id="4819243993373755377509728609491464",
            timestamp=datetime(2016, 11, 29, 20, 0, tzinfo=CET),
            value=Value("00981.443*m3", Decimal("981.443"), "m3"),
        ),
    )
    # (000101000001W) is the "never" sentinel; the 2000-01-0x dates are the meter's unset clock.
    assert reading.power_failures == (
        PowerFailure(datetime(2000, 1, 4, 18, 3, 20, tzinfo=CET), 237126),
        PowerFailure(None, 2147583646),
        PowerFailure(datetime(2000, 1, 2, 0, 0, 3, tzinfo=CET), 2317482647),
    )
    assert reading.messages == ()


def test_dsmr22_gas_value_on_continuation_line() -> None:
    reading = parse(corpus_bytes("ndokter-dsmr_parser/v2_2__isk52mt382-1004.txt"))
    assert reading.header == "ISk5\\2MT382-1004"
    assert reading.version is None
    assert reading.timestamp is None
    assert reading.objects["0-1:24.3.0"][-1] == Value("00001.001", Decimal("1.001"), None)
    # The profile's timestamp has no S/W flag: November, so winter time.
    assert reading.mbus == (
        MBusDevice(
            channel=1,
            device_type=3,
            equipment_id="000000000000",
            timestamp=datetime(2016, 11, 7, 19, 0, tzinfo=CET),
            value=Value("00001.001", Decimal("1.001"), "m3"),
        ),
    )


def test_several_continuation_lines_each_join_their_own_object() -> None:
    reading = parse(corpus_bytes("mhendriks-dsmr-api-v2/parse__kmp5-ka6u001585654321.txt"))
    values = {device.channel: device.value for device in reading.mbus}
    assert {channel: value and value.raw for channel, value in values.items()} == {
        1: "00100.006",
        2: "00200.006",
        3: "00300.006",
        4: "00400.006",
    }


def test_hex_text_messages_are_decoded() -> None:
    reading = parse(corpus_bytes("ndokter-dsmr_parser/v3__isk52mt382-1000.txt"))
    assert reading.messages == (
        Message("0-0:96.13.1", "012345678"),
        Message("0-0:96.13.0", "0123456789:;<=>?" * 5),
    )


def test_long_text_split_across_lines_is_joined() -> None:
    reading = parse(telegram("0-0:96.13.0(48656C6C6F2C\r\n20776F726C64)", "1-0:1.8.1(1.5*kWh)"))
    assert reading.messages == (Message("0-0:96.13.0", "Hello, world"),)
    assert reading.value("1-0:1.8.1") == Value("1.5*kWh", Decimal("1.5"), "kWh")


def test_belgian_mbus_devices() -> None:
    reading = parse(corpus_bytes("ndokter-dsmr_parser/fluvius_v171__flu5253769484_a.txt"))
    gas, water = reading.mbus
    assert (gas.channel, gas.device_type, gas.equipment_id) == (
        1,
        3,
        "37464C4F32313139303333373333",
    )
    assert gas.timestamp == datetime(2020, 5, 12, 13, 45, 58, tzinfo=CEST)
    assert gas.value == Value("00112.384*m3", Decimal("112.384"), "m3")
    assert (water.channel, water.device_type, water.value and water.value.number) == (
        2,
        7,
        Decimal("872.234"),
    )


def test_sentinel_mbus_reading_has_no_timestamp() -> None:
    reading = parse(corpus_bytes("dsmrreader-dsmr-reader/fluvius_without_gas__flu5769484_a.txt"))
    (gas,) = reading.mbus
    assert gas.timestamp is None
    assert gas.value is not None and gas.value.unit is None


def test_empty_power_failure_count() -> None:
    reading = parse(corpus_bytes("dsmrreader-dsmr-reader/error__isk52m550t-1011.txt"))
    assert reading.objects["1-0:99.97.0"] == (Value("", None, None),)
    assert reading.power_failures == ()


def test_telegram_without_blank_line_and_with_lf_only() -> None:
    reading = parse(b"/XMX5\n1-0:1.8.1(000001.000*kWh)\n!\n")
    assert reading.header == "XMX5"
    assert reading.value("1-0:1.8.1") == Value("000001.000*kWh", Decimal("1.000"), "kWh")


@pytest.mark.parametrize(
    ("token", "normalised"),
    [
        ("1-0:1.8.1.255", "1-0:1.8.1"),
        ("1-0:1.8.1*255", "1-0:1.8.1"),
        ("0-0:96.1.255*255", "0-0:96.1.255"),  # EasyMeter: E is 255 too, only F goes
        ("1-0:1.8.0*96", "1-0:1.8.0*96"),
        ("1-0:1.8.1", "1-0:1.8.1"),
    ],
)
def test_obis_forms_are_normalised(token: str, normalised: str) -> None:
    assert set(parse(telegram(f"{token}(1)")).objects) == {normalised}


def test_easymeter_star_255_objects() -> None:
    reading = parse(corpus_bytes("ndokter-dsmr_parser/esy5q3db1024_v304__esy5q3db1024-v3.04.txt"))
    assert reading.value("1-0:1.8.0") == Value(
        "00052185.7825309*kWh", Decimal("52185.7825309"), "kWh"
    )
    assert reading.value("1-0:1.7.0") == Value("002124.86*W", Decimal("2.12486"), "kW")
    assert reading.value("0-0:96.1.255") == Value("1ESY1313002565", None, None)


# --- values and units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "number", "unit"),
    [
        ("001234.567*kWh", "1234.567", "kWh"),
        ("000230515*Wh", "230.515", "kWh"),
        ("000000286*W", "0.286", "kW"),
        ("000000747*varh", "0.747", "kvarh"),
        ("000000166*var", "0.166", "kvar"),
        ("00000003.997*kWh", "3.997", "kWh"),
        ("0000.000*kVAr", "0.000", "kvar"),
        ("00001.001*kwh", "1.001", "kWh"),  # lower-case units
        ("0230.0*v", "230.0", "V"),
        ("-063*A", "-63", "A"),
        ("12.5kWh", "12.5", "kWh"),  # no '*' before the unit
        ("4.556", "4.556", None),
        ("00000.000", "0.000", None),
        ("240.860*GJ", "240.860", "GJ"),
        ("7*furlong", "7", "furlong"),  # unknown units are kept as sent
    ],
)
def test_values_are_exact_decimals_in_dsmr_reader_units(
    raw: str, number: str, unit: str | None
) -> None:
    value = parse(telegram(f"1-0:1.8.1({raw})")).value("1-0:1.8.1")
    assert value == Value(raw, Decimal(number), unit)
    assert str(value.number) == number  # exact digits, not a float's


@pytest.mark.parametrize(
    "raw",
    ["", "161113205757W", "4B384547303034303436333935353037", "0-0:96.7.19", "1e5", "NaN", "1_0"],
)
def test_non_numbers_have_no_number(raw: str) -> None:
    assert parse(telegram(f"0-0:96.1.1({raw})")).value("0-0:96.1.1") == Value(raw, None, None)


def test_austrian_wh_registers_convert_exactly() -> None:
    reading = parse(corpus_bytes("ndokter-dsmr_parser/sagemcom_t210_d_r__est5253710000_a.txt"))
    numbers = {obis: values[0].number for obis, values in reading.objects.items()}
    assert numbers["1-0:1.8.0"] == Decimal("6545.766")
    assert numbers["1-0:1.8.1"] + numbers["1-0:1.8.2"] == numbers["1-0:1.8.0"]
    assert numbers["1-0:2.8.2"] == Decimal("0.058")
    assert numbers["1-0:4.8.0"] == Decimal("3897.726")
    assert reading.value("1-0:4.7.0") == Value("000000166*var", Decimal("0.166"), "kvar")


# --- timestamps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "utc"),
    [
        # Spring 2025 (30 March): 02:00 CET becomes 03:00 CEST.
        ("250330015959W", "2025-03-30T00:59:59"),
        ("250330030000S", "2025-03-30T01:00:00"),
        # Autumn 2025 (26 October): 02:00-03:00 happens twice, S first, then W.
        ("251026015959S", "2025-10-25T23:59:59"),
        ("251026023000S", "2025-10-26T00:30:00"),
        ("251026023000W", "2025-10-26T01:30:00"),
        ("251026030000W", "2025-10-26T02:00:00"),
        # Spring 2026 (29 March).
        ("260329015959W", "2026-03-29T00:59:59"),
        ("260329030000S", "2026-03-29T01:00:00"),
        # Autumn 2026 (25 October).
        ("261025020000S", "2026-10-25T00:00:00"),
        ("261025020000W", "2026-10-25T01:00:00"),
        ("261025025959W", "2026-10-25T01:59:59"),
        # Lower-case flag (Landis+Gyr) and no flag at all (DSMR 2.2/3 gas profile).
        ("150701190000s", "2015-07-01T17:00:00"),
        ("161107190000", "2016-11-07T18:00:00"),
    ],
)
def test_meter_timestamps_are_the_right_utc_instant(raw: str, utc: str) -> None:
    moment = parse_timestamp(raw)
    assert moment is not None
    assert moment.astimezone(UTC) == datetime.fromisoformat(utc).replace(tzinfo=UTC)


def test_repeated_autumn_hour_keeps_its_order() -> None:
    sent = ["251026015959S", "251026020000S", "251026025959S", "251026020000W", "251026025959W"]
    moments = [parse_timestamp(raw) or datetime.min.replace(tzinfo=UTC) for raw in sent]
    assert moments == sorted(moments) and len(set(moments)) == len(moments)
    assert [m.utcoffset() for m in moments] == [timedelta(hours=2)] * 3 + [timedelta(hours=1)] * 2


def test_zone_is_configurable() -> None:
    dublin = ZoneInfo("Europe/Dublin")  # its tz data calls winter the "DST" period
    assert parse_timestamp("250701120000S", dublin) == datetime(2025, 7, 1, 11, tzinfo=UTC)
    assert parse_timestamp("250115120000W", dublin) == datetime(2025, 1, 15, 12, tzinfo=UTC)
    reading = parse(corpus_bytes("ndokter-dsmr_parser/iskra_ie__isk5mie5t-200.txt"), zone=dublin)
    # February, flagged S by the meter: the zone, not the contradicting flag, decides.
    assert reading.timestamp == datetime(2023, 2, 2, 13, 27, 47, tzinfo=UTC)


@pytest.mark.parametrize(
    "raw",
    [
        "632525252525W",
        "632525252525S",
        "000101000001W",
        "000101000000W",
        "000101010000W",
        "700101010000W",
        "000000000000W",
        "123412341234W",
        "250000000000W",
        "251026023000X",
        "2510260230",
        "25102602300²W",
        "",
    ],
)
def test_sentinel_and_impossible_timestamps_are_none(raw: str) -> None:
    assert parse_timestamp(raw) is None
    assert parse(telegram(f"0-0:1.0.0({raw})")).timestamp is None


# --- rejections ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "does not start with '/'"),
        (b"1-0:1.8.1(1)\r\n!\r\n", "does not start with '/'"),
        (b"/ISK5", "no '!' end line"),
        (b"/ISK5\r\n\r\n1-0:1.8.1(000001.000*kWh)\r\n", "no '!' end line"),
    ],
)
def test_a_frame_without_start_or_end_raises_parse_error(data: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse(data)
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("***NO CARIER***", "line without a value"),
        ("1-0:1.8.1(1)junk", "line without a value"),
        ("1-0:1.8.1(1)x(2)", "stray parenthesis"),
        ("1-0:1.8.1(1", "line without a value"),
        ("(00001.001)", "value line before any object"),
        ("1-0:72:32.0(00000)", "not an OBIS id"),
        ("1-0: 32.7.0(1)", "not an OBIS id"),
    ],
)
def test_a_malformed_line_is_listed_with_its_reason_and_the_rest_read(
    line: str, reason: str
) -> None:
    data = ("/ISK5\r\n\r\n" + line + "\r\n1-0:1.7.0(00.388*kW)\r\n!\r\n").encode()
    reading = parse(data)
    assert reading.unreadable == (f"{reason}: {line!r}",)
    assert reading.value("1-0:1.7.0") == Value("00.388*kW", Decimal("0.388"), "kW")


_LINE = st.text(alphabet="0123456789-:.*()/!SWkWhm3A \r\n", max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_nothing_but_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINE, max_size=12), st.booleans())
def test_telegram_shaped_noise_raises_nothing_but_parse_error(lines: list[str], end: bool) -> None:
    data = ("/X\r\n" + "\r\n".join(lines) + ("\r\n!\r\n" if end else "")).encode()
    with contextlib.suppress(ParseError):
        parse(data)
