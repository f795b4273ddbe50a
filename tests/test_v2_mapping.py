"""DSMR-reader API v2 fields: one golden telegram per meter family, values checked by hand.

Each expected dict below was written from the telegram text, not from the code's output: a
mapping bug (a wrong register, a lost unit conversion, a rounding slip) must show up as a diff
here. Values must fit the server's columns; what cannot fit is a MappingError naming the field.
"""

from __future__ import annotations

import contextlib
import functools
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo

import pytest
from conftest import corpus_entries, require_corpus
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmr_logger.telegram.capture import frames_in
from dsmr_logger.telegram.obis import DEFAULT_ZONE, ParseError, parse
from dsmr_logger.telegram.v2 import MappingError, V2Fields, to_v2

RECEIVED = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
RECEIVED_ISO = "2026-05-01T12:00:00+00:00"
NO_TIMESTAMP = "no meter timestamp: dated by receive time"
NO_RETURNED_POWER = "no returned-power registers: returned power = negative delivered power"

# Corpus telegrams that parse but cannot become a v2 reading, and the field that says why.
UNMAPPABLE = {
    "ndokter-dsmr_parser/unpadded_crc__nwa-warmtelink.txt": "electricity_delivered_1",  # heat
    # Truncated test fixtures: a few registers only.
    "nielsbasjes-dsmr-tools/crcvalidator__isk52m550t-1012-2.txt": "electricity_delivered_1",
    "nielsbasjes-dsmr-tools/dsmrparser__isk52mt382-1000-3.txt": "electricity_delivered_1",
    "esphome-libs-dsmr_parser/packet_accumulator_example_test__kfm5kaifa-meter.txt": (
        "electricity_delivered_2"
    ),
    "esphome-libs-dsmr_parser/packet_accumulator_test__kfm5kaifa-meter.txt": (
        "electricity_delivered_2"
    ),
    "mijnverbruik-dsmr/dsmr_test__kfm5kaifa-meter.txt": "electricity_delivered_2",
    "mijnverbruik-dsmr/telegram_fixtures__isk52mt382-1004.txt": "electricity_delivered_2",
    "mijnverbruik-dsmr/telegram_fixtures__isk52mt382-1000.txt": "electricity_delivered_2",
    # Mangled fixtures: the lines that did not parse held required registers.
    "athombv-node-dsmr-parser/esmr-5.0-ene5-211.txt": "electricity_delivered_2",
    "nielsbasjes-dsmr-tools/dsmrparser__isk52mt382-1000-2.txt": "electricity_delivered_1",
}


@functools.cache
def corpus_bytes(name: str) -> bytes:
    return (require_corpus() / name).read_bytes()


def mapped(
    name: str,
    *,
    zone: tzinfo = DEFAULT_ZONE,
    gas_channel: int | None = None,
    received_at: datetime | None = None,
) -> V2Fields:
    reading = parse(corpus_bytes(name), zone=zone)
    return to_v2(reading, gas_channel=gas_channel, received_at=received_at)


def telegram(*lines: str) -> bytes:
    return ("\r\n".join(("/TEST5", "", "0-0:1.0.0(250101120000W)", *lines, "!")) + "\r\n").encode()


BASIC = (
    "1-0:1.8.1(000001.000*kWh)",
    "1-0:1.8.2(000002.000*kWh)",
    "1-0:2.8.1(000003.000*kWh)",
    "1-0:2.8.2(000004.000*kWh)",
    "1-0:1.7.0(00.500*kW)",
    "1-0:2.7.0(00.000*kW)",
)


def three_phase(
    delivered: list[str], returned: list[str], volts: list[str] | None, amps: list[str]
) -> dict[str, str]:
    """Expected per-phase fields, L1 to L3."""
    fields = {}
    for n, (d, r, a) in enumerate(zip(delivered, returned, amps, strict=True), 1):
        fields[f"phase_currently_delivered_l{n}"] = d
        fields[f"phase_currently_returned_l{n}"] = r
        fields[f"phase_power_current_l{n}"] = a
        if volts:
            fields[f"phase_voltage_l{n}"] = volts[n - 1]
    return fields


# --- golden values per family --------------------------------------------------------------------


def test_nl_dsmr22_kamstrup() -> None:
    result = mapped("athombv-node-dsmr-parser/dsmr-2.2-kfm-1.txt", received_at=RECEIVED)
    assert result.fields == {
        "timestamp": RECEIVED_ISO,
        "electricity_delivered_1": "185.000",
        "electricity_delivered_2": "84.000",
        "electricity_returned_1": "13.000",
        "electricity_returned_2": "19.000",
        "electricity_currently_delivered": "0.980",
        "electricity_currently_returned": "0.000",
        # 0-1:24.3.0(120517020000)...(m3) / (00124.477): no flag, May -> CEST.
        "extra_device_timestamp": "2012-05-17T02:00:00+02:00",
        "extra_device_delivered": "124.477",
    }
    assert result.notes == (NO_TIMESTAMP,)


def test_nl_dsmr22_without_receive_time_cannot_be_dated() -> None:
    with pytest.raises(MappingError) as caught:
        mapped("athombv-node-dsmr-parser/dsmr-2.2-kfm-1.txt")
    assert caught.value.field == "timestamp"


def test_receive_time_must_be_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        mapped("athombv-node-dsmr-parser/dsmr-2.2-kfm-1.txt", received_at=datetime(2026, 5, 1))


def test_nl_dsmr3_iskra() -> None:
    result = mapped("ndokter-dsmr_parser/v3__isk52mt382-1000.txt", received_at=RECEIVED)
    assert result.fields == {
        "timestamp": RECEIVED_ISO,
        "electricity_delivered_1": "12345.678",
        "electricity_delivered_2": "12345.678",
        "electricity_returned_1": "12345.678",
        "electricity_returned_2": "12345.678",
        "electricity_currently_delivered": "1.190",
        "electricity_currently_returned": "0.000",
        "extra_device_timestamp": "2009-02-12T16:00:00+01:00",
        "extra_device_delivered": "1.001",
    }
    assert result.notes == (NO_TIMESTAMP,)


def test_nl_dsmr40_landis_gyr() -> None:
    result = mapped("dsmrreader-dsmr-reader/landisgyr350_dsmr40__xmx5lgbbffb123456789.txt")
    assert result.fields == {
        "timestamp": "2015-07-01T19:29:59+02:00",
        "electricity_delivered_1": "510.747",
        "electricity_delivered_2": "500.013",
        "electricity_returned_1": "0.123",
        "electricity_returned_2": "123.456",
        "electricity_currently_delivered": "0.192",
        "electricity_currently_returned": "0.123",
        **three_phase(
            ["0.123", "0.456", "0.789"], ["0.111", "0.555", "0.999"], None, ["0", "0", "1"]
        ),
        "extra_device_timestamp": "2015-07-01T19:00:00+02:00",  # sent as (150701190000s)
        "extra_device_delivered": "845.206",
    }
    assert result.notes == ()


def test_nl_dsmr42_kaifa() -> None:
    result = mapped("ndokter-dsmr_parser/v4_2__kfm5kaifa-meter.txt")
    assert result.fields == {
        "timestamp": "2016-11-13T20:57:57+01:00",
        "electricity_delivered_1": "1581.123",
        "electricity_delivered_2": "1435.706",
        "electricity_returned_1": "0.000",
        "electricity_returned_2": "0.000",
        "electricity_currently_delivered": "2.027",
        "electricity_currently_returned": "0.000",
        **three_phase(["0.170", "1.247", "0.209"], ["0.000"] * 3, None, ["0", "6", "2"]),
        "extra_device_timestamp": "2016-11-29T20:00:00+01:00",
        "extra_device_delivered": "981.443",
    }
    assert result.notes == ()


def test_nl_dsmr50_iskra() -> None:
    result = mapped("ndokter-dsmr_parser/v5__isk52mt382-1000.txt")
    assert result.fields == {
        "timestamp": "2017-01-02T19:20:02+01:00",
        "electricity_delivered_1": "4.426",
        "electricity_delivered_2": "2.399",
        "electricity_returned_1": "2.444",
        "electricity_returned_2": "0.000",
        "electricity_currently_delivered": "0.244",
        "electricity_currently_returned": "0.000",
        # Currents 0.48, 0.44 and 0.86 A: the server's column holds whole amperes.
        **three_phase(
            ["0.070", "0.032", "0.142"], ["0.000"] * 3, ["230.0", "230.0", "229.0"], ["0", "0", "1"]
        ),
        # Channel 2 is a gas meter without a reading (0-2:96.1.0() only).
        "extra_device_timestamp": "2017-01-02T16:10:05+01:00",
        "extra_device_delivered": "0.107",
    }
    assert result.notes == ()


def test_be_fluvius_gas_on_24_2_3_and_water_ignored() -> None:
    result = mapped("ndokter-dsmr_parser/fluvius_v171__flu5253769484_a.txt")
    assert result.fields == {
        "timestamp": "2020-05-12T13:54:09+02:00",
        "electricity_delivered_1": "0.034",
        "electricity_delivered_2": "15.758",
        "electricity_returned_1": "0.000",
        "electricity_returned_2": "0.011",
        "electricity_currently_delivered": "0.000",
        "electricity_currently_returned": "0.000",
        **three_phase(["0.000"] * 3, ["0.000"] * 3, ["234.7"] * 3, ["0"] * 3),
        "extra_device_timestamp": "2020-05-12T13:45:58+02:00",
        "extra_device_delivered": "112.384",  # not the water meter's 872.234 on channel 2
    }
    assert result.notes == ()


def test_lu_smarty_totals_only() -> None:
    result = mapped("dsmrreader-dsmr-reader/luxembourg_smarty__lux5abcdefg123_d.txt")
    assert result.fields == {
        "timestamp": "2019-10-31T14:22:39+01:00",
        "electricity_delivered_1": "5675.956",
        "electricity_delivered_2": "0.000",
        "electricity_returned_1": "0.002",
        "electricity_returned_2": "0.000",
        "electricity_currently_delivered": "3.074",
        "electricity_currently_returned": "0.000",
    }
    assert result.notes == (
        "only the total 1.8.0: electricity_delivered_1 = total, electricity_delivered_2 = 0",
        "only the total 2.8.0: electricity_returned_1 = total, electricity_returned_2 = 0",
    )


def test_se_kamstrup_totals_only() -> None:
    result = mapped("dsmrreader-dsmr-reader/sweden_kamstrup__kam5.txt")
    assert result.fields == {
        "timestamp": "2021-11-15T10:09:40+01:00",
        "electricity_delivered_1": "3.997",
        "electricity_delivered_2": "0.000",
        "electricity_returned_1": "0.000",
        "electricity_returned_2": "0.000",
        "electricity_currently_delivered": "0.000",
        "electricity_currently_returned": "0.000",
        **three_phase(["0.000"] * 3, ["0.000"] * 3, ["238.0", "238.0", "240.7"], ["0"] * 3),
    }
    assert len(result.notes) == 2
    assert all(note.startswith("only the total") for note in result.notes)


def test_at_sagemcom_wh_integers() -> None:
    result = mapped("ndokter-dsmr_parser/sagemcom_t210_d_r__est5253710000_a.txt")
    assert result.fields == {
        "timestamp": "2022-10-06T15:50:14+02:00",
        "electricity_delivered_1": "5017.120",  # 005017120*Wh
        "electricity_delivered_2": "1528.646",  # 001528646*Wh
        "electricity_returned_1": "0.000",
        "electricity_returned_2": "0.058",  # 000000058*Wh
        "electricity_currently_delivered": "0.286",  # 000000286*W
        "electricity_currently_returned": "0.000",
    }
    assert result.notes == ()


def test_hu_eon_sagemcom() -> None:
    result = mapped("ndokter-dsmr_parser/v5_eon_hu__sag5sag-meter.txt")
    assert result.fields == {
        "timestamp": "2023-07-24T15:07:30+02:00",
        "electricity_delivered_1": "47.719",
        "electricity_delivered_2": "125.921",
        "electricity_returned_1": "401.829",
        "electricity_returned_2": "225.348",
        "electricity_currently_delivered": "0.000",
        "electricity_currently_returned": "2.601",
        "phase_voltage_l1": "240.4",
        "phase_voltage_l2": "239.1",
        "phase_voltage_l3": "241.2",
        "phase_power_current_l1": "3",
        "phase_power_current_l2": "4",
        "phase_power_current_l3": "3",
    }
    assert result.notes == ()  # tariffs 3 and 4 are zero


def test_hu_used_third_tariff_is_reported() -> None:
    data = corpus_bytes("ndokter-dsmr_parser/v5_eon_hu__sag5sag-meter.txt").replace(
        b"1-0:1.8.3(000000.000*kWh)", b"1-0:1.8.3(000012.500*kWh)"
    )
    notes = to_v2(parse(data)).notes
    assert notes == ("1-0:1.8.3 = 000012.500*kWh not sent (DSMR-reader has two tariffs)",)


def test_easymeter_q3d_watts_and_totals() -> None:
    result = mapped(
        "ndokter-dsmr_parser/esy5q3db1024_v304__esy5q3db1024-v3.04.txt", received_at=RECEIVED
    )
    assert result.fields == {
        "timestamp": RECEIVED_ISO,
        "electricity_delivered_1": "52185.783",  # 00052185.7825309*kWh, rounded half up
        "electricity_delivered_2": "0.000",
        "electricity_returned_1": "19949.322",  # 00019949.3221493*kWh
        "electricity_returned_2": "0.000",
        "electricity_currently_delivered": "2.125",  # 002124.86*W
        "electricity_currently_returned": "0.000",
        # 000747.85*W, 000737.28*W, 000639.73*W
        "phase_currently_delivered_l1": "0.748",
        "phase_currently_delivered_l2": "0.737",
        "phase_currently_delivered_l3": "0.640",
        "phase_currently_returned_l1": "0.000",
        "phase_currently_returned_l2": "0.000",
        "phase_currently_returned_l3": "0.000",
    }
    assert result.notes == (
        "only the total 1.8.0: electricity_delivered_1 = total, electricity_delivered_2 = 0",
        "only the total 2.8.0: electricity_returned_1 = total, electricity_returned_2 = 0",
        NO_TIMESTAMP,
        NO_RETURNED_POWER,
    )


def test_easymeter_negative_power_is_returned_power() -> None:
    data = corpus_bytes("ndokter-dsmr_parser/esy5q3da1004_v304__esy5q3da1004-v3.04.txt").replace(
        b"1-0:1.7.0*255(001688.21*W)", b"1-0:1.7.0*255(-001688.21*W)"
    )
    result = to_v2(parse(data), received_at=RECEIVED)
    assert result.fields["electricity_currently_delivered"] == "0.000"
    assert result.fields["electricity_currently_returned"] == "1.688"
    # This model has no 2.8.0 at all: a consumption-only meter.
    assert result.fields["electricity_returned_1"] == result.fields["electricity_returned_2"]
    assert "no returned-energy registers: electricity_returned_1/2 = 0" in result.notes


def test_iskra_ie_in_its_own_zone() -> None:
    result = mapped(
        "ndokter-dsmr_parser/iskra_ie__isk5mie5t-200.txt", zone=ZoneInfo("Europe/Dublin")
    )
    assert result.fields == {
        "timestamp": "2023-02-02T13:27:47+00:00",  # (230202132747S): February in Dublin is GMT
        "electricity_delivered_1": "10.181",
        "electricity_delivered_2": "10.182",
        "electricity_returned_1": "10.281",
        "electricity_returned_2": "10.282",
        "electricity_currently_delivered": "0.170",
        "electricity_currently_returned": "0.270",
        **three_phase(
            ["0.217", "0.417", "0.617"],
            ["0.227", "0.427", "0.627"],
            ["242.5", "241.7", "243.3"],
            ["0"] * 3,
        ),
    }
    assert result.notes == ()


def test_heat_meter_has_no_electricity() -> None:
    with pytest.raises(MappingError, match="not an electricity meter") as caught:
        mapped("ndokter-dsmr_parser/unpadded_crc__nwa-warmtelink.txt")
    assert caught.value.field == "electricity_delivered_1"


def test_sagemcom_xt211_channel_one_registers_and_bad_clock() -> None:
    result = mapped("athombv-node-dsmr-parser/sagemcom-xt211.txt", received_at=RECEIVED)
    assert result.fields["timestamp"] == RECEIVED_ISO
    assert result.fields["electricity_delivered_1"] == "1595.070"  # 1-1:1.8.1
    assert result.fields["electricity_currently_delivered"] == "1.622"  # 1-1:1.7.0
    assert result.fields["phase_power_current_l2"] == "17"  # 017.19*A
    assert result.notes == ("invalid meter timestamp '123412341234W': dated by receive time",)


# --- gas device choice ---------------------------------------------------------------------------

MULTI_GAS = "dsmrreader-dsmr-reader/fluvius_multiple_gas_devices__flu5769484_a.txt"


def test_several_gas_meters_first_is_used_and_noted() -> None:
    result = mapped(MULTI_GAS)
    assert result.fields["extra_device_timestamp"] == "2023-01-19T12:46:16+01:00"
    assert result.fields["extra_device_delivered"] == "734.607"
    assert result.notes == ("gas meters on channels 1, 2: using 1 (gas_channel chooses)",)


def test_configured_gas_channel() -> None:
    result = mapped(MULTI_GAS, gas_channel=2)
    assert result.fields["extra_device_timestamp"] == "2023-01-19T12:40:05+01:00"
    assert result.fields["extra_device_delivered"] == "0.000"
    assert result.notes == ()


def test_configured_gas_channel_without_reading() -> None:
    result = mapped(MULTI_GAS, gas_channel=3)
    assert "extra_device_delivered" not in result.fields
    assert result.notes == ("no gas reading (m3) from M-Bus channel 3",)


def test_gas_meter_with_sentinel_reading_is_skipped() -> None:
    # Channel 1: (700101010000W)(00000000); channel 2 has the real reading.
    result = mapped("dsmrreader-dsmr-reader/iskra_dsmr5_bus2__isk5m550e-1012.txt")
    assert result.fields["extra_device_timestamp"] == "2019-11-08T14:55:05+01:00"
    assert result.fields["extra_device_delivered"] == "241.773"
    assert result.notes == ()


def test_water_meter_is_not_gas() -> None:
    result = mapped("ndokter-dsmr_parser/fluvius_v171__flu5253769484_a.txt", gas_channel=2)
    assert result.fields["extra_device_delivered"] == "872.234"  # the user asked for it


# --- the server's limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "field", "value"),
    [
        ("1-0:1.8.1(1234567.891*kWh)", "electricity_delivered_1", "1234567.891"),
        ("1-0:1.8.1(999999.9996*kWh)", "electricity_delivered_1", "999999.9996"),
        ("1-0:1.8.1(1234567891*Wh)", "electricity_delivered_1", "1234567.891"),
        ("1-0:32.7.0(1000.0*V)", "phase_voltage_l1", "1000.0"),
        ("1-0:31.7.0(1000*A)", "phase_power_current_l1", "1000"),
        ("1-0:51.7.0(-1*A)", "phase_power_current_l2", "-1"),
    ],
)
def test_value_that_cannot_fit_is_a_mapping_error(line: str, field: str, value: str) -> None:
    register = line.split("(")[0]
    lines = [existing for existing in BASIC if not existing.startswith(register)]
    with pytest.raises(MappingError) as caught:
        to_v2(parse(telegram(*lines, line)))
    assert caught.value.field == field
    assert value in str(caught.value)


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ("1-0:1.8.1(999999.999*kWh)", "electricity_delivered_1", "999999.999"),
        ("1-0:1.8.1(001234.567*kWh)", "electricity_delivered_1", "1234.567"),
        ("1-0:1.8.1(000230515*Wh)", "electricity_delivered_1", "230.515"),
        ("1-0:1.8.1(0.0005*kWh)", "electricity_delivered_1", "0.001"),
        ("1-0:32.7.0(999.9*V)", "phase_voltage_l1", "999.9"),
        ("1-0:32.7.0(230.45*V)", "phase_voltage_l1", "230.5"),
        ("1-0:31.7.0(999*A)", "phase_power_current_l1", "999"),
        ("1-0:31.7.0(2.5*A)", "phase_power_current_l1", "3"),
    ],
)
def test_values_at_the_limits(line: str, field: str, expected: str) -> None:
    register = line.split("(")[0]
    lines = [existing for existing in BASIC if not existing.startswith(register)]
    assert to_v2(parse(telegram(*lines, line))).fields[field] == expected


def test_wrong_unit_is_a_mapping_error() -> None:
    lines = [line for line in BASIC if not line.startswith("1-0:1.8.1")]
    with pytest.raises(MappingError, match="unit 'm3'") as caught:
        to_v2(parse(telegram(*lines, "1-0:1.8.1(000001.000*m3)")))
    assert caught.value.field == "1-0:1.8.1"


# --- the whole corpus ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry", corpus_entries("telegram", "stream", "capture"), ids=lambda e: e["file"]
)
def test_every_corpus_telegram_maps_or_fails_specifically(entry: dict) -> None:
    data = corpus_bytes(entry["file"])
    for frame in [data] if entry["kind"] == "telegram" else frames_in(data):
        try:
            reading = parse(frame)
        except ParseError:
            return  # which files, and why, is test_obis's business
        if entry["file"] in UNMAPPABLE:
            with pytest.raises(MappingError) as caught:
                to_v2(reading, received_at=RECEIVED)
            assert caught.value.field == UNMAPPABLE[entry["file"]]
            return
        fields = to_v2(reading, received_at=RECEIVED).fields
        assert all(isinstance(value, str) for value in fields.values())


_LINE = st.sampled_from(
    [
        "1-0:1.8.1(",
        "1-0:1.8.2(",
        "1-0:2.8.0(",
        "1-0:1.7.0(",
        "1-0:2.7.0(",
        "1-0:21.7.0(",
        "1-0:32.7.0(",
        "1-0:31.7.0(",
        "0-1:24.2.1(",
        "0-1:24.1.0(003)",
        "0-0:1.0.0(",
    ]
)
_VALUE = st.tuples(
    st.sampled_from(["", "-"]),
    st.text("0123456789", max_size=12),
    st.sampled_from(["", ".", ".5", ".123456"]),
    st.sampled_from(["", "*kWh", "*Wh", "*W", "*kW", "*V", "*A", "*m3", "*kvar", "kWh", "S", "W"]),
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_LINE, st.lists(_VALUE, min_size=1, max_size=2)), max_size=10))
def test_random_readings_map_or_raise_mapping_error(lines: list[tuple[str, list[str]]]) -> None:
    body = [
        head if head.endswith(")") else head + ")(".join(values) + ")" for head, values in lines
    ]
    data = telegram(*BASIC, *body)  # a valid reading, then random registers over it
    with contextlib.suppress(MappingError):
        to_v2(parse(data), received_at=RECEIVED)


# --- lines the parser could not read ---------------------------------------------------------


def test_one_malformed_line_costs_nothing_but_a_note() -> None:
    """The DSMR 4.0 specification's example: ``1-0:99:97.0`` and ``1-0:72:32.0`` are typos for
    registers DSMR-reader does not take; the reading maps, and the notes name both lines."""
    result = mapped("athombv-node-dsmr-parser/dsmr-4.0-spec-example.txt")
    assert result.fields["electricity_delivered_1"] == "123456.789"
    assert result.fields["timestamp"] == "2010-12-09T11:30:20+01:00"
    skipped = [note for note in result.notes if note.startswith("line not read, left out: ")]
    assert len(skipped) == 2
    assert "'1-0:99:97.0(2)" in skipped[0]
    assert "'1-0:72:32.0(00000)'" in skipped[1]


def test_a_malformed_required_register_refuses_the_reading_naming_field_and_line() -> None:
    lines = [line for line in BASIC if not line.startswith("1-0:1.8.1")]
    with pytest.raises(MappingError) as caught:
        to_v2(parse(telegram(*lines, "1-0:1.8.1(001234.567*kWh")), received_at=RECEIVED)
    assert caught.value.field == "electricity_delivered_1"
    assert "lines not read: line without a value: '1-0:1.8.1(001234.567*kWh'" in str(caught.value)


def test_a_malformed_optional_line_keeps_every_other_field() -> None:
    good = to_v2(parse(telegram(*BASIC)), received_at=RECEIVED)
    bad = to_v2(parse(telegram(*BASIC, "1-0:99:97.0(1)(0-0:96.7.19)")), received_at=RECEIVED)
    assert bad.fields == good.fields
    skipped = "line not read, left out: not an OBIS id: '1-0:99:97.0(1)(0-0:96.7.19)'"
    assert bad.notes == (skipped, *good.notes)


def test_amperes_without_a_decimal_point_are_read() -> None:
    """``(005A)``: a unit with no ``*`` and no decimal point, read like ``(234.5V)``."""
    lines = [line for line in BASIC if not line.startswith(("1-0:31.7.0", "1-0:32.7.0"))]
    fields = to_v2(parse(telegram(*lines, "1-0:31.7.0(005A)", "1-0:32.7.0(234.5V)"))).fields
    assert (fields["phase_power_current_l1"], fields["phase_voltage_l1"]) == ("5", "234.5")


def test_the_v2_sink_sends_a_reading_with_a_malformed_line_instead_of_dead_lettering_it() -> None:
    from dsmr_logger.config import DsmrReaderSinkConfig
    from dsmr_logger.delivery.answers import Answer
    from dsmr_logger.delivery.sinks.dsmr_reader import DsmrReaderV2Sink
    from dsmr_logger.delivery.spool import StoredTelegram as Telegram

    sink = DsmrReaderV2Sink(
        DsmrReaderSinkConfig(name="home", url="http://h", api_key="k" * 20, api="v2"),
        zone=ZoneInfo("Europe/Amsterdam"),
    )
    good = telegram(*BASIC)
    body = sink.form(Telegram(1, good.replace(b"\r\n!", b"\r\n1-0:99:97.0(1)\r\n!"), 1e9))
    assert not isinstance(body, Answer)
    assert body == sink.form(Telegram(1, good, 1e9))
    lacking = good.replace(b"1-0:1.8.1(000001.000*kWh)", b"1-0:1.8.1(000001.000*kWh")
    refused = sink.form(Telegram(1, lacking, 1e9))
    assert isinstance(refused, Answer) and "electricity_delivered_1" in str(refused.error)
