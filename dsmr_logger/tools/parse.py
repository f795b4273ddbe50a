"""``dsmr-logger parse FILE|-``: what each telegram says, and what API v2 would receive.

The tool to run when DSMR-reader shows odd values: every telegram in a capture, archive day file
or single telegram is printed as JSON with its parsed reading and its v2 fields, or with the exact
reason it is rejected (CRC, framing) or cannot be mapped. A file of several telegrams gives a JSON
array (or JSON lines with ``--jsonl``, for ``jq`` and ``head``); encrypted frames are read with the
meter's key, which is never printed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from dsmr_logger.sources.p1.decrypt import DEFAULT_AUTH_KEY, Decryptor, EncryptedFrameAssembler
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
    data: bytes,
    out: TextIO,
    *,
    zone: ZoneInfo,
    gas_channel: int | None,
    now: float,
    jsonl: bool = False,
    decryption_key: bytes | None = None,
    authentication_key: bytes | None = DEFAULT_AUTH_KEY,
) -> int:
    """One JSON document per telegram found; exit 1 when any could not be delivered.

    One telegram prints one indented document; several print a JSON array (streamed: each
    element as it is found), or one compact document per line with ``jsonl``. Encrypted frames
    are decrypted (their tag verified) first when a key is given.
    """
    printer = _Printer(out, jsonl)
    failed = 0
    for doc in _documents(data, zone, gas_channel, now, decryption_key, authentication_key):
        failed += doc["status"] != "ok"
        printer.add(doc)
    printer.end()
    return 1 if failed else 0


def _documents(
    data: bytes,
    zone: ZoneInfo,
    gas_channel: int | None,
    now: float,
    key: bytes | None,
    auth_key: bytes | None,
) -> Iterator[dict[str, Any]]:
    decryptor = Decryptor(key, auth_key) if key is not None else None
    if decryptor is not None:
        data = b"".join(decryptor.feed(data, now))
    assembler = FrameAssembler()
    rejected = 0
    found = 0
    for line in data.splitlines(keepends=True):
        for frame in assembler.feed(line, now):
            found += 1
            yield describe(frame.telegram, now, zone=zone, gas_channel=gas_channel)
        if assembler.counters.rejected_total > rejected:
            rejected = assembler.counters.rejected_total
            last = assembler.last_rejected
            assert last is not None
            header = last.data.split(b"\r\n", 1)[0].decode("ascii", "replace")
            yield {
                "header": header,
                "status": "rejected",
                "reason": last.reason.value,
                "detail": last.detail,
            }
    if decryptor is not None and decryptor.counters.auth_failed:
        yield {
            "status": "undecryptable",
            "reason": f"{decryptor.counters.auth_failed} encrypted frame(s) failed the GCM tag "
            "check: wrong --decryption-key or --authentication-key, or a damaged frame",
        }
    elif not found and not rejected:
        if decryptor is None and EncryptedFrameAssembler().feed(data, now):
            yield {
                "status": "encrypted",
                "reason": "encrypted frames (0xDB): give --decryption-key to read them",
            }
        else:
            yield {"status": "empty", "reason": "no telegram ('/' ... '!') found"}


class _Printer:
    """Prints documents as they come: one indented, several as an array, or JSON lines."""

    def __init__(self, out: TextIO, jsonl: bool) -> None:
        self.out = out
        self.jsonl = jsonl
        self.held: dict[str, Any] | None = None
        self.count = 0

    def add(self, doc: dict[str, Any]) -> None:
        self.count += 1
        if self.jsonl:
            print(json.dumps(doc), file=self.out)
        elif self.count == 1:
            self.held = doc  # one document or the first of an array: not known yet
        else:
            if self.held is not None:
                print("[", file=self.out)
                print(_indented(self.held), end="", file=self.out)
                self.held = None
            print(",", file=self.out)
            print(_indented(doc), end="", file=self.out)

    def end(self) -> None:
        if self.held is not None:
            print(json.dumps(self.held, indent=2), file=self.out)
        elif self.count > 1 and not self.jsonl:
            print("\n]", file=self.out)


def _indented(doc: dict[str, Any]) -> str:
    """A document as an element of the array: indented one level further."""
    return "\n".join("  " + line for line in json.dumps(doc, indent=2).splitlines())
