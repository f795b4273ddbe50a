"""What every cloud's history has in common: request windows, timestamps, numbers, and power.

Clouds hand out meter indices (kWh counters) at the end of each period, in whatever form their
servers settled on: ISO strings with or without an offset, ``{"$date": epoch-ms}``, numbers as
JSON numbers or as strings. This module reads them all into exact ``Decimal`` values and aware
datetimes truncated to the second (a telegram's timestamp has no fraction, and a reading read
back from DSMR-reader must compare equal to the one sent). Power is what a P1 meter reports
and a cloud's index history does not: it is derived as the energy of the period over its
length (ΔkWh / Δh), so 0.137 kWh in 15 minutes is 0.548 kW, exactly.

Windows are cut at the meter's local midnights, so a day of 15-minute slots is one request of
96 slots (92 on the spring DST day, 100 in autumn), and never longer than a cloud allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

EPOCH_MS_ABOVE = 10**11
"""An epoch number above this is in milliseconds (10**11 s is the year 5138)."""
EPOCH_DIGITS = 16
"""An epoch number of more digits is past the year 9999 even in milliseconds: refused before any
arithmetic (a million-digit ``1e999999`` took 26 s to turn into an int; ``1e10000000`` is past
what Decimal arithmetic allows at all and raised ``decimal.Overflow``)."""
LARGEST = Decimal(10) ** 15
"""No cloud value reaches this (a household meter counts about 10**5 kWh, 10**12 Ws); a register
of more digits could not be written exactly in a telegram."""


class SeriesError(ValueError):
    """A value in a cloud's answer that cannot be read; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Window:
    """The readings stamped after ``start`` up to and including ``end`` (aware datetimes)."""

    start: datetime
    end: datetime

    def holds(self, moment: datetime) -> bool:
        return self.start < moment <= self.end


def local_midnight(day: date, zone: tzinfo) -> datetime:
    """The start of ``day`` in ``zone``, as an aware UTC datetime."""
    return datetime.combine(day, time(), zone).astimezone(UTC)


def day_windows(
    start: datetime,
    end: datetime,
    zone: tzinfo,
    *,
    days: int = 1,
    longest: timedelta | None = None,
) -> list[Window]:
    """(start, end] cut at every ``days``-th local midnight, no piece longer than ``longest``."""
    windows: list[Window] = []
    cursor = start.astimezone(UTC)
    end = end.astimezone(UTC)
    while cursor < end:
        first_day = cursor.astimezone(zone).date()
        boundary = local_midnight(first_day + timedelta(days=days), zone)
        stop = min(boundary, end)
        if longest is not None:
            stop = min(stop, cursor + longest)
        windows.append(Window(cursor, stop))
        cursor = stop
    return windows


def parse_time(value: Any, what: str) -> datetime:
    """A cloud's timestamp as an aware UTC datetime, whole seconds.

    ISO 8601 with ``Z`` or an offset; without one it is UTC (the clouds' convention);
    ``{"$date": ms}``; or an epoch number (milliseconds when large) as a number or string.
    """
    if isinstance(value, Mapping) and "$date" in value:
        value = value["$date"]
    if isinstance(value, bool):
        raise SeriesError(f"{what}: not a time: {value!r}")
    moment: datetime
    if isinstance(value, int | Decimal | float) or (
        isinstance(value, str) and value.strip().isdigit()
    ):
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation as exc:
            raise SeriesError(f"{what}: not a time: {value!r}") from exc
        if number.is_finite() and number.adjusted() >= EPOCH_DIGITS:
            raise SeriesError(f"{what}: out of range: {value!r}")
        try:
            seconds = number / 1000 if number > EPOCH_MS_ABOVE else number
            moment = datetime.fromtimestamp(int(seconds), UTC)
        except (ArithmeticError, OSError, ValueError) as exc:
            raise SeriesError(f"{what}: not a time: {value!r}") from exc
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError as exc:
            raise SeriesError(f"{what}: not an ISO 8601 time: {value!r}") from exc
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    else:
        raise SeriesError(f"{what}: not a time: {value!r}")
    try:
        return moment.astimezone(UTC).replace(microsecond=0)
    except OverflowError:  # 9999-12-31T23:30-01:00 is past the year 9999 in UTC
        raise SeriesError(f"{what}: out of range: {value!r}") from None


def stated_time(value: Any, what: str) -> datetime | None:
    """A date a cloud may state about a meter (when it was created: the default ``--since``);
    None when it states none, or one that cannot be read: the user then gives ``--since``."""
    if not value:
        return None
    try:
        return parse_time(value, what)
    except SeriesError:
        return None


def naive_utc(moment: datetime) -> str:
    """``2024-03-30T23:00:00``: the tz-naive UTC ISO form Climkit asks for."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds")


def zulu(moment: datetime) -> str:
    """``2024-03-30T23:00:00Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def number(value: Any, what: str, *, negative: bool = False) -> Decimal:
    """A JSON number or numeric string as an exact Decimal (finite; >= 0 unless ``negative``)."""
    if isinstance(value, bool) or value is None:
        raise SeriesError(f"{what}: not a number: {value!r}")
    try:
        result = Decimal(value.strip() if isinstance(value, str) else str(value))
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise SeriesError(f"{what}: not a number: {value!r}") from exc
    if not result.is_finite():
        raise SeriesError(f"{what}: not a finite number: {value!r}")
    if result.adjusted() >= LARGEST.adjusted():  # abs() could overflow past Decimal's range
        raise SeriesError(f"{what}: implausibly large: {value!r}")
    if result < 0 and not negative:
        raise SeriesError(f"{what}: negative: {value!r}")
    return result


@dataclass(frozen=True, slots=True)
class Index:
    """Energy counters (kWh) at a moment: the end of a period."""

    timestamp: datetime
    delivered: Decimal
    returned: Decimal

    def to_json(self) -> dict[str, str]:
        return {
            "timestamp": self.timestamp.isoformat(),
            "delivered": str(self.delivered),
            "returned": str(self.returned),
        }

    @classmethod
    def from_json(cls, data: Any) -> Index | None:
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(
                datetime.fromisoformat(data["timestamp"]),
                Decimal(data["delivered"]),
                Decimal(data["returned"]),
            )
        except (KeyError, TypeError, ValueError, InvalidOperation):
            return None


def power(previous: Index | None, current: Index) -> tuple[Decimal, Decimal]:
    """Average delivered and returned power (kW) since ``previous``: ΔkWh / Δh.

    0 without a previous index (the first reading of a history) or when a counter went back
    (a meter exchanged): a P1 meter never reports negative power.
    """
    if previous is None or current.timestamp <= previous.timestamp:
        return Decimal(0), Decimal(0)
    hours = Decimal(int((current.timestamp - previous.timestamp).total_seconds())) / 3600
    return (
        max(current.delivered - previous.delivered, Decimal(0)) / hours,
        max(current.returned - previous.returned, Decimal(0)) / hours,
    )
