"""A Neurio sample → the telegram DSMR-reader stores: exact values, the right channel, the guards.

The samples here are written by hand in the sensor's JSON (the vendor's document and what sensors
send), not produced by the fake sensor, and the expected values are worked out in the test: the
mapping is checked against the issue's figures, not against itself.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsmr_logger.sources.neurio import (
    REBASE_AFTER,
    Mark,
    Rejected,
    SampleError,
    SampleGuard,
    Verdict,
    grid_channel,
    parse_sample,
    telegram_header,
    to_reading,
)
from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.telegram.build import build_telegram
from dsmr_logger.telegram.obis import Reading, parse
from dsmr_logger.telegram.v2 import to_v2

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
TORONTO = ZoneInfo("America/Toronto")


def channel(kind: str, imp: int, exp: int, watts: int | float, volts: float | None = None,
            *, volt_key: str = "v_V") -> dict[str, Any]:  # fmt: skip
    entry: dict[str, Any] = {"type": kind, "ch": 1, "eImp_Ws": imp, "eExp_Ws": exp, "p_W": watts}
    entry["q_VAR"] = 0
    if volts is not None:
        entry[volt_key] = volts
    return entry


SOLAR = {
    "sensorId": "0x0000C47F510179FE",
    "timestamp": "2026-07-01T10:00:05Z",
    "channels": [
        channel("PHASE_A_CONSUMPTION", 40_000_000_000, 0, 400, 121.419),
        channel("PHASE_B_CONSUMPTION", 47_000_000_000, 0, 411, 120.874),
        channel("PHASE_A_NET", 20_000_000_000, 8_000_000_000, -600, 121.419),
        channel("PHASE_B_NET", 23_500_000_000, 9_400_000_000, -589, 120.874),
        channel("CONSUMPTION", 210_532_119_004, 0, 811, 121.1),
        channel("GENERATION", 112_078_205_644, 0, 2000),
        channel("NET", 159_687_481_246, 61_234_567_890, -1189, 121.1),
    ],
    "cts": [{"ct": 1, "p_W": 400, "q_VAR": 0, "v_V": 121.419}],
}
EU3_VENDOR_SPELLING = {  # three phases, consumption clamps only, "V_V" as the vendor writes it
    "sensorId": "0x0000C47F51019B7D",
    "timestamp": "2026-01-15T07:30:00.250Z",
    "channels": [
        channel("PHASE_A_CONSUMPTION", 1_000, 0, 230, 230.06, volt_key="V_V"),
        channel("PHASE_B_CONSUMPTION", 2_000, 0, 480, 231.45, volt_key="V_V"),
        channel("PHASE_C_CONSUMPTION", 3_000, 0, 150, 229.84, volt_key="V_V"),
        channel("CONSUMPTION", 3_600_000_000, 1_800, 860, 230.4, volt_key="V_V"),
    ],
}
SPLIT_PHASE = {
    "sensorId": "0x0000C47F51010001",
    "timestamp": "2026-01-15T12:00:00Z",
    "channels": [
        channel("PHASE_A_CONSUMPTION", 5, 0, 520, 120.3),
        channel("PHASE_B_CONSUMPTION", 6, 0, 310, 121.1),
        channel("CONSUMPTION", 36_000_000, 0, 830, 120.7),
    ],
}


def telegram_of(document: dict[str, Any], grid: str = "auto", zone: ZoneInfo = AMSTERDAM) -> bytes:
    """What the source makes of one answer: through the framer, CRC checked."""
    sample = parse_sample(json.dumps(document).encode())
    assert sample.timestamp is not None
    reading = to_reading(sample, grid=grid_channel(sample, grid), when=sample.timestamp)
    built = build_telegram(reading, header=telegram_header(sample.sensor_id), zone=zone)
    frames = FrameAssembler(require_crc=True).feed(built, 0.0)
    assert len(frames) == 1, "the framer must take the telegram, CRC and all"
    return frames[0].telegram


def value(reading: Reading, code: str) -> Decimal | None:
    found = reading.value(code)
    return None if found is None else found.number


def kwh(watt_seconds: int) -> Decimal:
    return (Decimal(watt_seconds) / 3_600_000).quantize(Decimal("0.001"), ROUND_HALF_UP)


def test_solar_sample_writes_the_net_channel_with_the_issues_exact_figures() -> None:
    telegram = telegram_of(SOLAR)
    assert telegram.startswith(b"/NEU5\\NeurioLocal-0x0000C47F510179FE\r\n\r\n")
    assert b"\r\n0-0:1.0.0(260701120005S)\r\n" in telegram  # 10:00:05 UTC = 12:00:05 CEST
    assert b"\r\n1-0:1.8.1(044357.634*kWh)\r\n" in telegram  # 159,687,481,246 Ws
    assert b"\r\n1-0:1.8.2(000000.000*kWh)\r\n" in telegram
    assert b"\r\n1-0:2.8.2(000000.000*kWh)\r\n" in telegram
    assert b"\r\n1-0:1.7.0(00.000*kW)\r\n1-0:2.7.0(01.189*kW)\r\n" in telegram  # p_W = -1,189
    reading = parse(telegram, zone=AMSTERDAM)
    assert value(reading, "1-0:2.8.1") == kwh(61_234_567_890) == Decimal("17009.602")
    # Per phase from PHASE_x_NET (not the consumption clamps): both phases export.
    assert value(reading, "1-0:21.7.0") == value(reading, "1-0:41.7.0") == Decimal(0)
    assert value(reading, "1-0:22.7.0") == Decimal("0.600")
    assert value(reading, "1-0:42.7.0") == Decimal("0.589")
    assert value(reading, "1-0:32.7.0") == Decimal("121.4")
    assert value(reading, "1-0:52.7.0") == Decimal("120.9")
    assert reading.value("1-0:61.7.0") is None and reading.value("1-0:72.7.0") is None
    fields = to_v2(reading).fields
    assert fields["electricity_delivered_1"] == "44357.634"
    assert fields["electricity_returned_1"] == "17009.602"
    assert fields["electricity_currently_delivered"] == "0.000"
    assert fields["electricity_currently_returned"] == "1.189"
    assert fields["phase_currently_returned_l1"] == "0.600"
    assert fields["phase_voltage_l2"] == "120.9"
    assert fields["timestamp"] == "2026-07-01T12:00:05+02:00"


def test_consumption_as_grid_channel_takes_consumption_counters_and_phases() -> None:
    reading = parse(telegram_of(SOLAR, grid="CONSUMPTION"), zone=AMSTERDAM)
    assert value(reading, "1-0:1.8.1") == kwh(210_532_119_004)
    assert value(reading, "1-0:2.8.1") == Decimal(0)
    assert value(reading, "1-0:1.7.0") == Decimal("0.811")
    assert value(reading, "1-0:2.7.0") == Decimal(0)
    assert value(reading, "1-0:21.7.0") == Decimal("0.400")
    assert value(reading, "1-0:41.7.0") == Decimal("0.411")
    assert value(reading, "1-0:22.7.0") == Decimal(0)


def test_three_phase_consumption_only_with_the_vendors_voltage_spelling() -> None:
    telegram = telegram_of(EU3_VENDOR_SPELLING)
    reading = parse(telegram, zone=AMSTERDAM)
    assert b"\r\n0-0:1.0.0(260115083000W)\r\n" in telegram  # winter: UTC+1, milliseconds dropped
    assert value(reading, "1-0:1.8.1") == Decimal("1000.000")
    assert value(reading, "1-0:2.8.1") == Decimal("0.001")  # 1,800 Ws = 0.0005 kWh, half up
    assert value(reading, "1-0:1.7.0") == Decimal("0.860")
    powers = [value(reading, f"1-0:{code}.7.0") for code in (21, 41, 61)]
    assert powers == [Decimal("0.230"), Decimal("0.480"), Decimal("0.150")]
    volts = [value(reading, f"1-0:{code}.7.0") for code in (32, 52, 72)]
    assert volts == [Decimal("230.1"), Decimal("231.5"), Decimal("229.8")]  # half up


def test_split_phase_fills_l1_and_l2_and_leaves_l3_out() -> None:
    reading = parse(telegram_of(SPLIT_PHASE, zone=TORONTO), zone=TORONTO)
    assert reading.timestamp == datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
    assert value(reading, "1-0:1.8.1") == Decimal("10.000")
    assert value(reading, "1-0:32.7.0") == Decimal("120.3")
    assert value(reading, "1-0:52.7.0") == Decimal("121.1")
    for code in ("61.7.0", "62.7.0", "72.7.0"):
        assert reading.value(f"1-0:{code}") is None


def test_the_telegram_is_dated_in_the_configured_zone() -> None:
    assert b"\r\n0-0:1.0.0(260701060005S)\r\n" in telegram_of(SOLAR, zone=TORONTO)


def test_auto_picks_net_when_present_else_consumption() -> None:
    assert grid_channel(parse_sample(json.dumps(SOLAR).encode()), "auto") == "NET"
    assert grid_channel(parse_sample(json.dumps(SPLIT_PHASE).encode()), "auto") == "CONSUMPTION"


def test_a_grid_channel_the_sensor_lacks_names_what_it_has() -> None:
    sample = parse_sample(json.dumps(SPLIT_PHASE).encode())
    with pytest.raises(SampleError) as caught:
        to_reading(sample, grid="NET", when=datetime(2026, 1, 1, tzinfo=UTC))
    assert caught.value.reason is Rejected.NO_GRID_CHANNEL
    assert "no NET channel" in str(caught.value)
    assert "CONSUMPTION, PHASE_A_CONSUMPTION" in str(caught.value)
    assert "meter.grid_channel" in str(caught.value)


def test_not_synchronized_has_no_timestamp() -> None:
    sample = parse_sample(json.dumps({**SOLAR, "timestamp": "NOT_SYNCHRONIZED"}).encode())
    assert sample.timestamp is None


def test_fractional_watts_and_volts_are_exact_decimals() -> None:
    document = json.loads(json.dumps(SPLIT_PHASE))
    document["channels"][2]["p_W"] = 1189.5  # 1.1895 kW: half up to 1.190, not float 1.189
    document["channels"][0]["v_V"] = 120.25  # 120.3, not the float's 120.2
    reading = parse(telegram_of(document), zone=AMSTERDAM)
    assert value(reading, "1-0:1.7.0") == Decimal("1.190")
    assert value(reading, "1-0:32.7.0") == Decimal("120.3")


@pytest.mark.parametrize(
    ("body", "reason", "detail"),
    [
        (b"<html>login</html>", Rejected.NOT_JSON, "not JSON"),
        (b'{"channels": [{"type": "NET", "eImp_Ws": NaN}]}', Rejected.NOT_JSON, "NaN"),
        (b"[1, 2]", Rejected.MALFORMED, "not an object"),
        (b'{"timestamp": "2026-01-01T00:00:00Z"}', Rejected.MALFORMED, "no 'channels'"),
        (b'{"timestamp": "yesterday", "channels": []}', Rejected.MALFORMED, "not ISO 8601"),
        (b'{"timestamp": 17, "channels": []}', Rejected.MALFORMED, "not a time"),
        (b'{"timestamp": "2026-01-01T00:00:00Z", "channels": [{"ch": 1}]}', Rejected.MALFORMED,
         "without a type"),
    ],
)  # fmt: skip
def test_an_answer_that_is_not_a_sample_says_why(
    body: bytes, reason: Rejected, detail: str
) -> None:
    with pytest.raises(SampleError) as caught:
        parse_sample(body)
    assert caught.value.reason is reason
    assert detail in str(caught.value)


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"eImp_Ws": "159687481246"}, "NET.eImp_Ws is '159687481246', not a number"),
        ({"eImp_Ws": True}, "not a number"),
        ({"eExp_Ws": -5}, "NET.eExp_Ws is negative"),
        ({"p_W": None}, "the NET channel has no p_W"),
        ({"p_W": "-600"}, "PHASE_A_NET.p_W is '-600', not a number"),
        ({"v_V": -1.5}, "PHASE_A_NET.v_V is negative"),
    ],
)
def test_a_written_channel_with_a_bad_value_is_refused(change: dict[str, Any], detail: str) -> None:
    document = json.loads(json.dumps(SOLAR))
    where = 2 if detail.startswith("PHASE_A_NET") else -1
    document["channels"][where].update(change)
    with pytest.raises(SampleError) as caught:
        telegram_of(document)
    assert caught.value.reason is Rejected.MALFORMED
    assert detail in str(caught.value)


def test_an_odd_value_in_a_channel_that_is_not_written_harms_nothing() -> None:
    document = json.loads(json.dumps(SOLAR))
    document["channels"][5]["eImp_Ws"] = "n/a"  # GENERATION: not written into the telegram
    document["channels"][0]["v_V"] = None  # PHASE_A_CONSUMPTION
    reading = parse(telegram_of(document), zone=AMSTERDAM)
    assert value(reading, "1-0:1.8.1") == Decimal("44357.634")
    assert value(reading, "1-0:32.7.0") == Decimal("121.4")  # from PHASE_A_NET


def test_the_header_names_the_sensor_and_survives_an_odd_id() -> None:
    assert telegram_header("0x0000C47F510179FE") == "NEU5\\NeurioLocal-0x0000C47F510179FE"
    assert telegram_header("") == "NEU5\\NeurioLocal"
    odd = telegram_header("id with spaces/()!" + "9" * 80)
    assert odd.startswith("NEU5\\NeurioLocal-idwithspaces")
    document = {**SOLAR, "sensorId": "id with spaces/()!" + "9" * 80}
    assert telegram_of(document).startswith(f"/{odd}\r\n".encode())


# --- the guards ----------------------------------------------------------------------------------


def mark(second: int, imported: int, exported: int = 0, watts: int = 500) -> Mark:
    return Mark(second, Decimal(imported), Decimal(exported), Decimal(watts))


def rejection(guard: SampleGuard, m: Mark) -> Rejected:
    with pytest.raises(SampleError) as caught:
        guard.check(m)
    return caught.value.reason


def test_the_same_second_again_is_a_duplicate_and_an_older_one_out_of_order() -> None:
    guard = SampleGuard()
    assert guard.check(mark(100, 1_000)) is Verdict.ACCEPT
    assert rejection(guard, mark(100, 1_000)) is Rejected.DUPLICATE
    assert rejection(guard, mark(99, 900)) is Rejected.OUT_OF_ORDER
    assert guard.check(mark(101, 1_500)) is Verdict.ACCEPT


def test_a_counter_that_goes_back_is_rejected_and_the_next_good_sample_passes() -> None:
    guard = SampleGuard()
    guard.check(mark(100, 1_000_000, 50))
    assert rejection(guard, mark(101, 999_999, 50)) is Rejected.REGRESSION
    assert rejection(guard, mark(102, 1_001_000, 49)) is Rejected.REGRESSION  # export went back
    assert guard.check(mark(103, 1_001_500, 50)) is Verdict.ACCEPT
    assert guard.last == mark(103, 1_001_500, 50)


def test_the_jump_limit_is_twice_the_power_plus_headroom_per_second_plus_one_wh() -> None:
    # 1 s at 500 W: 2 x 500 + 50,000 (headroom) + 3,600 (1 Wh) = 54,600 Ws at most.
    too_much = SampleGuard()
    too_much.check(mark(100, 0))
    assert rejection(too_much, mark(101, 54_601)) is Rejected.JUMP
    guard = SampleGuard()
    guard.check(mark(100, 0))
    assert guard.check(mark(101, 54_600)) is Verdict.ACCEPT
    # A kettle that ran between two polls 10 s apart: far below the limit, accepted.
    assert guard.check(mark(111, 54_600 + 24_000, watts=100)) is Verdict.ACCEPT
    # One kWh in one second at 500 W is a broken reading.
    assert rejection(guard, mark(112, 54_600 + 24_000 + 3_600_000)) is Rejected.JUMP


def test_a_long_outage_allows_what_the_power_could_have_used() -> None:
    guard = SampleGuard()
    guard.check(mark(0, 0, watts=3_000))
    hour = 3_600
    assert guard.check(mark(hour, 3_000 * hour, watts=3_000)) is Verdict.ACCEPT


def test_a_counter_restart_is_followed_after_consistent_samples_in_a_row() -> None:
    guard = SampleGuard()
    guard.check(mark(100, 9_000_000_000))
    for step in range(1, REBASE_AFTER):
        assert rejection(guard, mark(100 + step, 500 * step)) is Rejected.REGRESSION
    assert guard.check(mark(100 + REBASE_AFTER, 500 * REBASE_AFTER)) is Verdict.REBASED
    assert guard.check(mark(101 + REBASE_AFTER, 500 * (REBASE_AFTER + 1))) is Verdict.ACCEPT


def test_garbage_that_disagrees_with_itself_never_becomes_a_baseline() -> None:
    guard = SampleGuard()
    guard.check(mark(100, 9_000_000_000))
    for step in range(1, 4 * REBASE_AFTER):
        garbage = 0 if step % 2 else 5_000_000_000  # alternately far below and between
        assert rejection(guard, mark(100 + step, garbage)) is Rejected.REGRESSION
    assert guard.last == mark(100, 9_000_000_000)


@given(
    st.lists(
        st.tuples(
            st.integers(-3, 30),  # seconds after the previous sample
            st.integers(-200_000, 400_000),  # import change (Ws)
            st.integers(-50_000, 50_000),  # export change
            st.integers(-20_000, 20_000),  # power (W)
        ),
        max_size=60,
    )
)
def test_what_the_guard_passes_never_goes_back_unless_it_rebased(
    steps: list[tuple[int, int, int, int]],
) -> None:
    guard = SampleGuard()
    second, imported, exported = 1_000, 10**9, 10**8
    passed: list[tuple[Mark, Verdict]] = []
    for seconds, more, out, watts in steps:
        second, imported, exported = second + seconds, imported + more, max(0, exported + out)
        candidate = mark(second, imported, exported, watts)
        try:
            passed.append((candidate, guard.check(candidate)))
        except SampleError:
            continue
    for (before, _), (after, verdict) in itertools.pairwise(passed):
        assert after.second > before.second
        if verdict is Verdict.ACCEPT:
            assert after.imported_ws >= before.imported_ws
            assert after.exported_ws >= before.exported_ws
