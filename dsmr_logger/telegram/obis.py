"""Telegram bytes to a typed reading: one pass over the lines, no per-object patterns.

Every line is an OBIS id followed by parenthesised groups; a line that starts with ``(`` continues
the previous object (DSMR 2.2/3 gas) and a group left open at the end of a line continues on the
next (long text messages). Values stay :class:`~decimal.Decimal` throughout, and units are brought
to DSMR-reader's (Wh -> kWh, W -> kW, varh -> kvarh) by shifting the decimal point, so nothing is
ever rounded here. Timestamps become aware datetimes with the offset the meter meant. The CRC is
the framer's business (:mod:`dsmr_logger.sources.p1.framing`), not this module's.

A CRC-valid telegram is what the meter meant to send, so one line this parser cannot read (a
meter's ``1-0:99:97.0`` typo, a firmware's text banner) costs that line, not the reading: it is
listed in ``Reading.unreadable`` with the reason, and every other register is read. Only a frame
without its ``/`` start or ``!`` end is a :class:`ParseError`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from zoneinfo import ZoneInfo

DEFAULT_ZONE = ZoneInfo("Europe/Amsterdam")

_ZERO = timedelta(0)
_OBIS = re.compile(r"(\d+)-(\d+):(\d+\.\d+\.\d+)(?:[.*](\d+))?", re.ASCII)
_OBJECT_START = re.compile(r"\d+-\d+:\d+\.\d+\.\d+(?:[.*]\d+)?\(", re.ASCII)
# Dates meters send for "never": the DLMS epochs, in the meter's two-digit-year form.
_SENTINEL_DATES = frozenset({"000101", "700101"})
# Lower-cased unit as sent -> (DSMR-reader's unit, power of ten to shift by).
_UNITS: dict[str, tuple[str, int]] = {
    "wh": ("kWh", -3),
    "kwh": ("kWh", 0),
    "w": ("kW", -3),
    "kw": ("kW", 0),
    "varh": ("kvarh", -3),
    "kvarh": ("kvarh", 0),
    "var": ("kvar", -3),
    "kvar": ("kvar", 0),
    "va": ("kVA", -3),
    "kva": ("kVA", 0),
    "v": ("V", 0),
    "a": ("A", 0),
    "s": ("s", 0),
    "hz": ("Hz", 0),
    "m3": ("m3", 0),
    "gj": ("GJ", 0),
}
_MBUS_TYPE = "24.1.0"
_MBUS_IDS = ("96.1.0", "96.1.1")
_MBUS_READINGS = ("24.2.1", "24.2.3")  # NL/LU, BE
_MBUS_PROFILE = "24.3.0"  # DSMR 2.2/3: (time)(status)(period)(count)(obis)(unit) then (value)
_POWER_FAILURE_LOG = "1-0:99.97.0"
_MESSAGES = "0-0:96.13."


class ParseError(ValueError):
    """The bytes are not a telegram this parser can read; ``reason`` says where and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Value:
    """One parenthesised group: the text as sent, and its number and unit when it has them."""

    raw: str
    number: Decimal | None
    unit: str | None


@dataclass(frozen=True, slots=True)
class MBusDevice:
    """A gas, water or heat meter behind the electricity meter, with its own last reading."""

    channel: int
    device_type: int | None
    equipment_id: str | None
    timestamp: datetime | None
    value: Value | None


@dataclass(frozen=True, slots=True)
class PowerFailure:
    end: datetime | None
    duration_s: int


@dataclass(frozen=True, slots=True)
class Message:
    obis: str
    text: str


@dataclass(frozen=True, slots=True)
class Reading:
    """Everything a telegram says; ``objects`` maps a normalised OBIS id to its groups."""

    header: str
    version: str | None
    timestamp: datetime | None
    objects: dict[str, tuple[Value, ...]]
    mbus: tuple[MBusDevice, ...]
    power_failures: tuple[PowerFailure, ...]
    messages: tuple[Message, ...]
    unreadable: tuple[str, ...] = ()
    """Lines left out, each as ``reason: 'line'`` (a malformed OBIS id, a line without a value)."""

    def value(self, obis: str) -> Value | None:
        """The object's first group, or None when the telegram does not carry it."""
        values = self.objects.get(obis)
        return values[0] if values else None


def parse(telegram: bytes, *, zone: tzinfo = DEFAULT_ZONE) -> Reading:
    """Read one telegram (``/`` through the ``!`` line); ``zone`` is the meter's clock zone."""
    text = telegram.decode("latin-1")
    if not text.startswith("/"):
        raise ParseError("does not start with '/'")
    newline = text.find("\n")
    if newline < 0:
        raise ParseError("no '!' end line")
    tokens, unreadable = _tokens(text, newline + 1)
    objects = {obis: tuple(_value(group) for group in groups) for obis, groups in tokens}
    stamp = objects.get("0-0:1.0.0")
    version = objects.get("1-3:0.2.8")
    return Reading(
        header=text[1:newline].removesuffix("\r"),
        version=(version[0].raw or None) if version else None,
        timestamp=parse_timestamp(stamp[0].raw, zone) if stamp else None,
        objects=objects,
        mbus=_mbus_devices(objects, zone),
        power_failures=_power_failures(objects.get(_POWER_FAILURE_LOG, ()), zone),
        messages=tuple(
            Message(obis, _text(values[0].raw))
            for obis, values in objects.items()
            if obis.startswith(_MESSAGES) and values and values[0].raw
        ),
        unreadable=tuple(unreadable),
    )


def parse_timestamp(raw: str, zone: tzinfo = DEFAULT_ZONE) -> datetime | None:
    """``YYMMDDhhmmss[S|W]`` as an aware datetime; None for sentinels and impossible dates.

    The result carries the fixed UTC offset the meter meant (``+02:00`` for S in Amsterdam), so
    it compares and subtracts correctly even inside the repeated autumn hour.
    """
    digits, flag = raw[:12], raw[12:].upper()
    if len(digits) != 12 or not (digits.isascii() and digits.isdigit()):
        return None
    if flag not in ("", "S", "W") or digits[:6] in _SENTINEL_DATES:
        return None
    fields = [int(digits[i : i + 2]) for i in range(0, 12, 2)]
    try:
        year, month, day, hour, minute, second = fields
        naive = datetime(2000 + year, month, day, hour, minute, second)
    except ValueError:
        return None
    return _localise(naive, zone, flag)


def _localise(naive: datetime, zone: tzinfo, flag: str) -> datetime:
    """The zone decides the offset; S/W only picks between the two readings of a wall time.

    In the repeated autumn hour S is the earlier (summer, larger offset) instant and W the later;
    without a flag the earlier one is taken. Larger-offset-is-summer also holds for zones whose
    tz data declares a negative DST (Europe/Dublin). A flag that contradicts the season is a
    meter's clock setting, not information about the instant, so outside that hour it is ignored.
    """
    earlier, later = naive.replace(tzinfo=zone), naive.replace(tzinfo=zone, fold=1)
    if flag and earlier.utcoffset() != later.utcoffset():
        by_offset = sorted((earlier, later), key=lambda moment: moment.utcoffset() or _ZERO)
        return _fixed(by_offset[1] if flag == "S" else by_offset[0])
    return _fixed(earlier)


def _fixed(local: datetime) -> datetime:
    return local.replace(tzinfo=timezone(local.utcoffset() or _ZERO), fold=0)


def _tokens(text: str, start: int) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The body's (OBIS id, groups) in order, up to the line that starts with ``!``, and the
    lines that could not be read, each with its reason."""
    lines = text[start:].split("\n")
    tokens: list[tuple[str, list[str]]] = []
    unreadable: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].removesuffix("\r")
        i += 1
        if not line:
            continue
        if line[0] == "!":
            return tokens, unreadable
        opens, closes = line.count("("), line.count(")")
        while opens > closes and i < len(lines) and not _starts_object(lines[i]):
            # a value continued on the next line (never the end line or the next object)
            more = lines[i].removesuffix("\r")
            i += 1
            line += more
            opens += more.count("(")
            closes += more.count(")")
        opening = line.find("(")
        if opening < 0 or line[-1] != ")":
            unreadable.append(f"line without a value: {line[:60]!r}")
            continue
        groups = line[opening + 1 : -1].split(")(")
        if not opens == closes == len(groups):  # only the delimiters may be parentheses
            unreadable.append(f"stray parenthesis: {line[:60]!r}")
        elif not opening:
            if tokens:
                tokens[-1][1].extend(groups)
            else:
                unreadable.append(f"value line before any object: {line[:60]!r}")
        elif (obis := _obis(line[:opening])) is None:
            unreadable.append(f"not an OBIS id: {line[:60]!r}")
        else:
            tokens.append((obis, groups))
    raise ParseError("no '!' end line")


def _starts_object(line: str) -> bool:
    return line.startswith("!") or _OBJECT_START.match(line) is not None


@functools.lru_cache(maxsize=512)
def _obis(token: str) -> str | None:
    """``A-B:C.D.E``; the ``.255``/``*255`` "current value" suffix is dropped, others kept.
    None when ``token`` is not an OBIS id."""
    match = _OBIS.fullmatch(token)
    if match is None:
        return None
    a, b, cde, f = match.groups()
    suffix = f"*{f}" if f is not None and f != "255" else ""
    return f"{a}-{b}:{cde}{suffix}"


@functools.lru_cache(maxsize=4096)
def _value(raw: str) -> Value:
    """Cached: from one telegram to the next most groups repeat verbatim."""
    number, star, unit = raw.partition("*")
    if not star:
        number, unit = _split_unit(raw)
    return _make_value(raw, number, unit)


def _split_unit(raw: str) -> tuple[str, str]:
    """``12.5kWh`` -> (``12.5``, ``kWh``), ``005A`` -> (``005``, ``A``): only known units count.

    A timestamp ``YYMMDDhhmmssW`` is twelve digits and a season flag, never watts (or seconds).
    """
    for i, char in enumerate(raw):
        if char.isalpha():
            unit = raw[i:]
            if unit.lower() not in _UNITS or (i == 12 and unit in ("S", "W") and "." not in raw):
                break
            return raw[:i], unit
    return raw, ""


def _make_value(raw: str, number_text: str, unit: str) -> Value:
    number = _decimal(number_text)
    if number is None:
        return Value(raw, None, None)
    if not unit:
        return Value(raw, number, None)
    unit, shift = _UNITS.get(unit.lower(), (unit, 0))
    return Value(raw, number.scaleb(shift) if shift else number, unit)


def _decimal(text: str) -> Decimal | None:
    digits = text[1:] if text[:1] == "-" else text
    if not (digits.isascii() and digits.replace(".", "", 1).isdigit()):
        return None
    return Decimal(text)


def _text(raw: str) -> str:
    """DSMR 4+ messages are hex-encoded; anything that is not hex is kept as sent."""
    try:
        return bytes.fromhex(raw).decode("latin-1")
    except ValueError:
        return raw


def _mbus_devices(objects: dict[str, tuple[Value, ...]], zone: tzinfo) -> tuple[MBusDevice, ...]:
    channels: dict[int, dict[str, tuple[Value, ...]]] = {}
    for obis, values in objects.items():
        if obis.startswith("0-") and not obis.startswith("0-0:"):
            channel, _, code = obis[2:].partition(":")
            channels.setdefault(int(channel), {})[code] = values
    devices = (_mbus_device(channel, codes, zone) for channel, codes in sorted(channels.items()))
    return tuple(d for d in devices if d.device_type is not None or d.value is not None)


def _mbus_device(channel: int, codes: dict[str, tuple[Value, ...]], zone: tzinfo) -> MBusDevice:
    kind = codes.get(_MBUS_TYPE)
    type_number = kind[0].number if kind else None
    ids = [values[0].raw for code in _MBUS_IDS if (values := codes.get(code))]
    stamp, value = _mbus_reading(codes)
    return MBusDevice(
        channel=channel,
        device_type=int(type_number) if type_number is not None else None,
        equipment_id=ids[0] if ids and ids[0] else None,
        timestamp=parse_timestamp(stamp, zone) if stamp is not None else None,
        value=value,
    )


def _mbus_reading(codes: dict[str, tuple[Value, ...]]) -> tuple[str | None, Value | None]:
    """(raw timestamp, value) of the device's last reading, from whichever form it sends."""
    for code in _MBUS_READINGS:
        values = codes.get(code, ())
        if len(values) >= 2:
            return values[0].raw, values[1]
    profile = codes.get(_MBUS_PROFILE, ())
    if len(profile) >= 7:
        last = profile[-1].raw
        return profile[0].raw, _make_value(last, last, profile[5].raw)
    return None, None


def _power_failures(values: tuple[Value, ...], zone: tzinfo) -> tuple[PowerFailure, ...]:
    """``(count)(0-0:96.7.19)`` then (end)(duration) pairs; a malformed pair is left out."""
    return tuple(
        PowerFailure(parse_timestamp(end.raw, zone), int(duration.number))
        for end, duration in zip(values[2::2], values[3::2], strict=False)
        if duration.number is not None and duration.number == duration.number.to_integral_value()
    )
