"""A parsed reading as DSMR-reader API v2 fields, whatever the meter's country or make.

The rules follow what the registers say rather than a configured meter family, so one mapping
serves them all: NL DSMR 2.2-5, Belgian e-MUCS (gas on ``0-n:24.2.3``), Luxembourg Smarty,
Sweden, Austria, Hungary, EasyMeter Q3D and Iskra IE. Where a meter lacks what DSMR-reader wants
(tariff registers, a timestamp, a returned-power register) the fallback is stated in ``notes``,
and so are lines the parser could not read: they cost the reading nothing unless a field DSMR-reader
requires came from them, and only then is the reading refused, naming the field and those lines.
Values are rounded half-up to the server's precision (3 decimals; volts 1; amperes whole) and a
value too large for its column is a :class:`MappingError`, since the server would refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from dsmr_logger.telegram.obis import MBusDevice, Reading

GAS_DEVICE_TYPE = 3


@dataclass(frozen=True, slots=True)
class _Limit:
    """A DSMR-reader column: decimals kept, magnitude it must stay below, unit it holds."""

    places: int
    bound: Decimal
    unit: str | None
    signed: bool = True


_ZERO = Decimal(0)
_KWH = _Limit(3, Decimal(10) ** 6, "kWh")  # DecimalField(max_digits=9, decimal_places=3)
_KW = _Limit(3, Decimal(10) ** 6, "kW")
_VOLT = _Limit(1, Decimal(1000), "V")  # max_digits=4, decimal_places=1: up to 999.9
_AMPERE = _Limit(0, Decimal(1000), "A", signed=False)  # integer 0-999
_GAS = _Limit(3, Decimal(10) ** 6, "m3")
# Phase: (suffix, delivered power, returned power, voltage, current) register C groups.
_PHASES = (
    ("l1", "21", "22", "32", "31"),
    ("l2", "41", "42", "52", "51"),
    ("l3", "61", "62", "72", "71"),
)


class MappingError(ValueError):
    """This reading cannot become a valid v2 reading; ``field`` names the field or register."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


@dataclass(frozen=True, slots=True)
class V2Fields:
    """Form fields for ``POST /api/v2/datalogger/dsmrreading``, and how they were obtained."""

    fields: dict[str, str]
    notes: tuple[str, ...]


def to_v2(
    reading: Reading, *, gas_channel: int | None = None, received_at: datetime | None = None
) -> V2Fields:
    """Map a reading; ``received_at`` (aware) dates telegrams without a usable timestamp."""
    notes = [f"line not read, left out: {line}" for line in reading.unreadable]
    try:
        energy = _energy(reading, notes)
        fields = {"timestamp": _timestamp(reading, received_at, notes), **energy}
        fields |= _power(reading, notes)
    except MappingError as exc:
        if not reading.unreadable:
            raise
        lines = "; ".join(reading.unreadable)
        raise MappingError(f"{exc.reason} (lines not read: {lines})", exc.field) from None
    fields |= _gas(reading, gas_channel, notes)
    return V2Fields(fields, tuple(notes))


def _timestamp(reading: Reading, received_at: datetime | None, notes: list[str]) -> str:
    """The meter's own time; the receive time only when the telegram has none that is valid."""
    if reading.timestamp is not None:
        return _iso(reading.timestamp)
    stamp = reading.value("0-0:1.0.0")
    why = f"invalid meter timestamp {stamp.raw!r}" if stamp else "no meter timestamp"
    if received_at is None:
        raise MappingError(f"{why} and no receive time given", "timestamp")
    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    notes.append(f"{why}: dated by receive time")
    return _iso(received_at)


def _energy(reading: Reading, notes: list[str]) -> dict[str, str]:
    """Tariffs 1 and 2 from ``x.8.1``/``x.8.2``; a total-only meter puts it all on tariff 1."""
    fields: dict[str, str] = {}
    for code, name in (("1", "delivered"), ("2", "returned")):
        first = _number(reading, f"{code}.8.1", _KWH)
        second = _number(reading, f"{code}.8.2", _KWH)
        if first is None or second is None:
            total = _number(reading, f"{code}.8.0", _KWH)
            if total is not None:
                notes.append(
                    f"only the total {code}.8.0: electricity_{name}_1 = total, "
                    f"electricity_{name}_2 = 0"
                )
                first, second = total, _ZERO
            elif first is None and second is None and code == "2":
                notes.append("no returned-energy registers: electricity_returned_1/2 = 0")
                first, second = _ZERO, _ZERO
            else:
                raise _missing_energy(code, name, first is None, second is None)
        for tariff, number in ((1, first), (2, second)):
            field = f"electricity_{name}_{tariff}"
            fields[field] = _fit(field, number, _KWH)
        notes.extend(_unmapped_tariffs(reading, code))
    return fields


def _missing_energy(code: str, name: str, no_first: bool, no_second: bool) -> MappingError:
    if no_first and no_second:
        return MappingError(
            f"no electricity registers {code}.8.1/{code}.8.2/{code}.8.0 (not an electricity "
            "meter?)",
            f"electricity_{name}_1",
        )
    tariff = 1 if no_first else 2
    return MappingError(
        f"register {code}.8.{tariff} missing and no total {code}.8.0",
        f"electricity_{name}_{tariff}",
    )


def _unmapped_tariffs(reading: Reading, code: str) -> list[str]:
    """Tariffs 3-9 (Hungary has four): DSMR-reader has no place for them, so say so."""
    return [
        f"1-0:{code}.8.{tariff} = {value.raw} not sent (DSMR-reader has two tariffs)"
        for tariff in range(3, 10)
        if (value := reading.value(f"1-0:{code}.8.{tariff}")) is not None and value.number
    ]


def _power(reading: Reading, notes: list[str]) -> dict[str, str]:
    """Total power is required; per-phase power, voltage and current only when sent."""
    fields = _power_pair(reading, "1.7.0", "2.7.0", "electricity_currently", "")
    if not fields:
        raise MappingError("no current power register 1.7.0", "electricity_currently_delivered")
    if _number(reading, "2.7.0", _KW) is None:
        notes.append("no returned-power registers: returned power = negative delivered power")
    for phase, plus, minus, volts, amperes in _PHASES:
        fields |= _power_pair(reading, f"{plus}.7.0", f"{minus}.7.0", "phase_currently", phase)
        for name, code, limit in (
            (f"phase_voltage_{phase}", volts, _VOLT),
            (f"phase_power_current_{phase}", amperes, _AMPERE),
        ):
            number = _number(reading, f"{code}.7.0", limit)
            if number is not None:
                fields[name] = _fit(name, number, limit)
    return fields


def _power_pair(reading: Reading, plus: str, minus: str, prefix: str, phase: str) -> dict[str, str]:
    """Delivered and returned power; without a returned register, a negative value is returned."""
    delivered = _number(reading, plus, _KW)
    if delivered is None:
        return {}
    returned = _number(reading, minus, _KW)
    if returned is None:
        delivered, returned = max(delivered, _ZERO), max(-delivered, _ZERO)
    suffix = f"_{phase}" if phase else ""
    names = (f"{prefix}_delivered{suffix}", f"{prefix}_returned{suffix}")
    return {
        name: _fit(name, number, _KW)
        for name, number in zip(names, (delivered, returned), strict=True)
    }


def _gas(reading: Reading, channel: int | None, notes: list[str]) -> dict[str, str]:
    """The configured channel's reading, else the first gas meter (device type 3) with one."""
    if channel is None:
        devices = [d for d in reading.mbus if d.device_type == GAS_DEVICE_TYPE]
    else:
        devices = [d for d in reading.mbus if d.channel == channel]
    wanted = [(device.channel, found) for device in devices if (found := _last_reading(device))]
    if not wanted:
        if channel is not None:
            notes.append(f"no gas reading (m3) from M-Bus channel {channel}")
        return {}
    if len(wanted) > 1:
        channels = ", ".join(str(number) for number, _ in wanted)
        notes.append(
            f"gas meters on channels {channels}: using {wanted[0][0]} (gas_channel chooses)"
        )
    moment, number = wanted[0][1]
    return {
        "extra_device_timestamp": _iso(moment),
        "extra_device_delivered": _fit("extra_device_delivered", number, _GAS),
    }


def _last_reading(device: MBusDevice) -> tuple[datetime, Decimal] | None:
    """The device's reading, unless it is a placeholder (sentinel time or no number)."""
    if device.timestamp is None or device.value is None or device.value.number is None:
        return None
    if device.value.unit not in (None, _GAS.unit):
        return None
    return device.timestamp, device.value.number


def _number(reading: Reading, code: str, limit: _Limit) -> Decimal | None:
    """Register ``1-0:code`` (or ``1-1:code``, Sagemcom XT211), checked to be in its unit."""
    for obis in (f"1-0:{code}", f"1-1:{code}"):
        value = reading.value(obis)
        if value is not None and value.number is not None:
            if value.unit not in (None, limit.unit):
                raise MappingError(f"unit {value.unit!r}, expected {limit.unit}", obis)
            return value.number
    return None


def _fit(field: str, number: Decimal, limit: _Limit) -> str:
    """The value as DSMR-reader's column stores it, or a MappingError naming the field."""
    if abs(number) < limit.bound and (limit.signed or number >= 0):
        rounded = number.quantize(Decimal(1).scaleb(-limit.places), rounding=ROUND_HALF_UP)
        if abs(rounded) < limit.bound:
            return f"{rounded.copy_abs() if rounded.is_zero() else rounded:f}"
    sign = "" if limit.signed else "0 to "
    raise MappingError(
        f"{number} does not fit DSMR-reader's column ({sign}below {limit.bound}, "
        f"{limit.places} decimals)",
        field,
    )


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")
