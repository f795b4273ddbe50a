"""A reading from anything that is not a P1 port, written as a DSMR 5 telegram with a valid CRC.

Why a telegram and not a second record type: the spool, the v1 and v2 sinks, the MQTT sink, the
archive, ``backfill``, ``parse`` and ``status`` all carry and understand one thing, the P1
telegram. A Neurio sensor, a cloud import or the simulator that writes its readings as telegrams
gets all of them unchanged, and DSMR-reader's own v1 parser accepts the result. The registers
written are exactly those DSMR-reader stores (tariff counters, power, per-phase power, voltage and
current, one gas meter), in the formats of DSMR 5.0.2 (``1-0:1.8.1(001234.567*kWh)``); a value
too wide for its format is written with more integer digits rather than cut. Values are
``Decimal`` and rounded half-up to the format's decimals, so a counter given in watt-seconds
lands on the exact kWh value (159,687,481,246 Ws → ``044357.634``) with no float drift.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import ROUND_HALF_UP, Decimal

from dsmr_logger.sources.p1.crc import crc16, format_crc

Phases = tuple[Decimal | None, Decimal | None, Decimal | None]
NO_PHASES: Phases = (None, None, None)
_TIMESTAMP = re.compile(rb"(\n0-0:1\.0\.0\()(\d{12})([SW])\)")
_HEADER = re.compile(r"[A-Za-z0-9]{3}5\\[\x21-\x7e]{1,64}")
WS_PER_KWH = Decimal(3_600_000)


@dataclass(frozen=True, slots=True)
class GasReading:
    """The gas meter's last reading (m³) and when the gas meter took it (its own time)."""

    taken_at: datetime
    cubic_metres: Decimal


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One reading in DSMR-reader's units: kWh counters, kW power, V, A, m³.

    ``timestamp`` is when the reading was taken (an aware datetime, any zone: the telegram states
    it in the meter's zone). Per-phase tuples are L1, L2, L3; ``None`` leaves a register out.
    """

    timestamp: datetime
    delivered_1: Decimal
    returned_1: Decimal = Decimal(0)
    delivered_2: Decimal = Decimal(0)
    returned_2: Decimal = Decimal(0)
    tariff: int = 1
    power_delivered: Decimal = Decimal(0)
    power_returned: Decimal = Decimal(0)
    phase_power_delivered: Phases = NO_PHASES
    phase_power_returned: Phases = NO_PHASES
    phase_voltage: Phases = NO_PHASES
    phase_current: Phases = NO_PHASES
    gas: GasReading | None = None
    equipment_id: str = ""
    """What identifies the meter or sensor (written as hex in ``0-0:96.1.1``, as meters do)."""

    def __post_init__(self) -> None:
        if self.timestamp.tzinfo is None:
            raise ValueError("a reading's timestamp must carry its zone (an aware datetime)")


def kwh_from_ws(watt_seconds: int | Decimal | str) -> Decimal:
    """Watt-seconds (joules) to kWh, exactly."""
    return Decimal(watt_seconds) / WS_PER_KWH


def meter_timestamp(when: datetime, zone: tzinfo | None = None) -> bytes:
    """``YYMMDDhhmmssX`` as a meter writes it: local time in ``zone`` (the host's when None),
    X = S(ummer) or W(inter), which tells the two 02:00-03:00 hours of October apart."""
    local = when.astimezone(zone)
    flag = b"S" if local.dst() else b"W"
    return local.strftime("%y%m%d%H%M%S").encode() + flag


def restamp(telegram: bytes, stamp: bytes) -> bytes:
    """Replace the telegram's own timestamp and recompute its CRC (when it carries one)."""
    fresh = _TIMESTAMP.sub(lambda m: m.group(1) + stamp + b")", telegram, count=1)
    return with_crc(fresh) if fresh[fresh.rindex(b"!") + 1 : -2] else fresh


def with_crc(telegram: bytes) -> bytes:
    """The telegram through ``!`` with its CRC-16 recomputed and the closing CRLF."""
    bang = telegram.rindex(b"!")
    return telegram[: bang + 1] + format_crc(crc16(telegram[: bang + 1])) + b"\r\n"


def build_telegram(reading: MeterReading, *, header: str, zone: tzinfo) -> bytes:
    """The reading as a DSMR 5 telegram: ``/header``, the registers, ``!CRC``.

    ``header`` is the identification line after ``/`` (``XXX5\\<name>``, e.g.
    ``NEU5\\NeurioLocal-0x0000C47F510179CF``); ``zone`` is the meter's time zone.
    """
    if not _HEADER.fullmatch(header):
        raise ValueError(f"header {header!r}: three letters or digits, '5\\', then a name")
    lines = [f"/{header}", "", "1-3:0.2.8(50)"]
    lines.append(f"0-0:1.0.0({meter_timestamp(reading.timestamp, zone).decode()})")
    if reading.equipment_id:
        lines.append(f"0-0:96.1.1({reading.equipment_id.encode().hex().upper()[:96]})")
    lines.extend(_registers(reading))
    if reading.gas is not None:
        lines.append("0-1:24.1.0(003)")
        stamp = meter_timestamp(reading.gas.taken_at, zone).decode()
        lines.append(f"0-1:24.2.1({stamp})({_fixed(reading.gas.cubic_metres, 5, 3)}*m3)")
    body = "\r\n".join(lines) + "\r\n!"
    return with_crc(body.encode("ascii"))


def _registers(r: MeterReading) -> Iterator[str]:
    yield f"1-0:1.8.1({_fixed(r.delivered_1, 6, 3)}*kWh)"
    yield f"1-0:1.8.2({_fixed(r.delivered_2, 6, 3)}*kWh)"
    yield f"1-0:2.8.1({_fixed(r.returned_1, 6, 3)}*kWh)"
    yield f"1-0:2.8.2({_fixed(r.returned_2, 6, 3)}*kWh)"
    yield f"0-0:96.14.0({r.tariff:04d})"
    yield f"1-0:1.7.0({_fixed(r.power_delivered, 2, 3)}*kW)"
    yield f"1-0:2.7.0({_fixed(r.power_returned, 2, 3)}*kW)"
    for phase, code in enumerate((32, 52, 72)):
        if (volts := r.phase_voltage[phase]) is not None:
            yield f"1-0:{code}.7.0({_fixed(volts, 3, 1)}*V)"
    for phase, code in enumerate((31, 51, 71)):
        if (amperes := r.phase_current[phase]) is not None:
            yield f"1-0:{code}.7.0({_fixed(amperes, 3, 0)}*A)"
    for phase, code in enumerate((21, 41, 61)):
        if (kw := r.phase_power_delivered[phase]) is not None:
            yield f"1-0:{code}.7.0({_fixed(kw, 2, 3)}*kW)"
    for phase, code in enumerate((22, 42, 62)):
        if (kw := r.phase_power_returned[phase]) is not None:
            yield f"1-0:{code}.7.0({_fixed(kw, 2, 3)}*kW)"


def _fixed(value: Decimal, digits: int, places: int) -> str:
    """``value`` rounded half-up to ``places`` decimals, zero-padded to ``digits`` before the
    point (more when it needs them). Negative values have no place in a register: an error."""
    if not value.is_finite() or value < 0:
        raise ValueError(f"a register holds a finite value >= 0, not {value}")
    quantum = Decimal(1).scaleb(-places)
    rounded = value.quantize(quantum, rounding=ROUND_HALF_UP)
    whole, _, fraction = f"{rounded:f}".partition(".")
    return whole.zfill(digits) + (f".{fraction}" if places else "")
