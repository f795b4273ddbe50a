"""A quick look at a telegram's headline values, for logs and the demo's live line.

Not a parser: it picks a few well-known registers by OBIS code and leaves the values as the meter
wrote them (number and unit), so nothing is rounded or converted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REGISTER = re.compile(rb"^(\d+-\d+:\d+\.\d+\.\d+)\(([^()]*)\)", re.MULTILINE)
# M-Bus meter reading: 0-n:24.2.1 (NL) or 0-n:24.2.3 (BE), (timestamp)(value*unit).
_MBUS = re.compile(rb"^0-\d:24\.2\.[13]\(([^()]*)\)\(([^()]*)\)", re.MULTILINE)

_HEADLINE = {
    b"0-0:1.0.0": "meter_timestamp",
    b"1-0:1.7.0": "power_delivered",
    b"1-0:2.7.0": "power_returned",
    b"1-0:1.8.1": "delivered_tariff1",
    b"1-0:1.8.2": "delivered_tariff2",
    b"1-0:1.8.0": "delivered_total",
    b"1-0:2.8.1": "returned_tariff1",
    b"1-0:2.8.2": "returned_tariff2",
}


@dataclass(frozen=True, slots=True)
class Glance:
    header: str
    values: dict[str, str]

    def power(self) -> str | None:
        """Current power as the meter states it: ``0.378 kW``, or ``1.189 kW returned`` while
        the house sends power back to the grid (solar), which ``1-0:1.7.0`` alone shows as 0."""
        delivered = _quantity(self.values.get("power_delivered"))
        returned = _quantity(self.values.get("power_returned"))
        if returned is not None and returned[0] > 0 and (delivered is None or delivered[0] == 0):
            return f"{returned[0]:g} {returned[1]} returned".replace("  ", " ")
        if delivered is None:
            return self.values.get("power_delivered")
        return f"{delivered[0]:g} {delivered[1]}".strip()


def _quantity(raw: str | None) -> tuple[float, str] | None:
    """``00.378*kW`` → (0.378, "kW"); None when absent or not a number."""
    if raw is None:
        return None
    number, _, unit = raw.partition("*")
    try:
        return float(number), unit
    except ValueError:
        return None


def glance(telegram: bytes) -> Glance:
    header = telegram.split(b"\r\n", 1)[0][1:].decode("ascii", "replace")
    values = {
        _HEADLINE[code]: value.decode("ascii", "replace")
        for code, value in _REGISTER.findall(telegram)
        if code in _HEADLINE
    }
    mbus = _MBUS.search(telegram)
    if mbus:
        values["mbus_timestamp"] = mbus.group(1).decode("ascii", "replace")
        values["mbus_reading"] = mbus.group(2).decode("ascii", "replace")
    return Glance(header, values)
