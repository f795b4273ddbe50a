"""``dsmr-logger parse FILE|-``: what each telegram says, and what API v2 would receive.

The tool to run when DSMR-reader shows odd values: every telegram in a capture, archive day file
or single telegram is printed as JSON with its parsed reading and its v2 fields, or with the exact
reason it is rejected (CRC, framing) or cannot be mapped.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from dsmr_logger.sources.p1.framing import FrameAssembler
from dsmr_logger.telegram.obis import ParseError, Reading, parse
from dsmr_logger.telegram.v2 import MappingError, to_v2


def _plain(value: Any) -> Any:
    """JSON for the reading's dataclasses: exact decimals as strings, aware times as ISO 8601."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


def reading_document(reading: Reading) -> dict[str, Any]:
    doc: dict[str, Any] = _plain(reading)
    doc["objects"] = {
        obis: [{"raw": v.raw, "number": _plain(v.number), "unit": v.unit} for v in values]
        for obis, values in reading.objects.items()
    }
    return doc


def describe(
    telegram: bytes, received_at: float, *, zone: ZoneInfo, gas_channel: int | None
) -> dict[str, Any]:
    doc: dict[str, Any] = {"header": telegram.split(b"\r\n", 1)[0].decode("ascii", "replace")}
    try:
        reading = parse(telegram, zone=zone)
    except ParseError as exc:
        return {**doc, "status": "unparsable", "reason": exc.reason}
    doc["reading"] = reading_document(reading)
    try:
        mapped = to_v2(
            reading,
            gas_channel=gas_channel,
            received_at=datetime.fromtimestamp(received_at, UTC),
        )
    except MappingError as exc:
        return {**doc, "status": "unmappable", "reason": str(exc)}
    return {**doc, "status": "ok", "v2": mapped.fields, "notes": list(mapped.notes)}


def parse_command(
    data: bytes, out: TextIO, *, zone: ZoneInfo, gas_channel: int | None, now: float
) -> int:
    """Prints one JSON document per telegram found; exit 1 when any could not be delivered."""
    assembler = FrameAssembler()
    rejected = 0
    found = 0
    failed = 0
    for line in data.splitlines(keepends=True):
        for frame in assembler.feed(line, now):
            found += 1
            doc = describe(frame.telegram, now, zone=zone, gas_channel=gas_channel)
            failed += doc["status"] != "ok"
            print(json.dumps(doc, indent=2), file=out)
        if assembler.counters.rejected_total > rejected:
            rejected = assembler.counters.rejected_total
            last = assembler.last_rejected
            assert last is not None
            header = last.data.split(b"\r\n", 1)[0].decode("ascii", "replace")
            doc = {"header": header, "status": "rejected", "reason": last.reason.value}
            print(json.dumps({**doc, "detail": last.detail}, indent=2), file=out)
    if not found and not rejected:
        print(
            json.dumps({"status": "empty", "reason": "no telegram ('/' ... '!') found"}), file=out
        )
        return 1
    return 1 if failed or rejected else 0
