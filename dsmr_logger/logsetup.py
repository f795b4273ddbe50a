"""structlog set-up: readable on a terminal, one key=value or JSON line per event otherwise.

Every time a line shows is a time a person can read and place: the line's own timestamp carries
its UTC offset (``2026-11-02T14:03:07.512+01:00``, so a journal read in another zone, or across the
autumn clock change, is unambiguous), and Unix times logged under ``*_at`` / ``*_since`` keys are
shown the same way instead of as ``1793538187.41``. Secrets are masked here as a last guard
whatever the caller logged: values under secret-looking keys, and any ``user:password@`` in a URL.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from datetime import datetime
from typing import Any, TextIO

import structlog

from dsmr_logger.config import LogConfig, mask
from dsmr_logger.net.http import redact_url

_SECRET_KEYS = ("api_key", "decryption_key", "authentication_key", "password", "token", "secret")
_TIME_SUFFIXES = ("_at", "_since")
_PLAUSIBLE_EPOCH = 100_000_000.0  # 1973: smaller numbers under a *_at key are not times
Processor = Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]


def local_time(epoch: float, timespec: str = "seconds") -> str:
    """A Unix time as local ISO 8601 with its UTC offset."""
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec=timespec)


def _stamper(clock: Callable[[], float]) -> Processor:
    def stamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["timestamp"] = local_time(clock(), "milliseconds")
        return event

    return stamp


def _times(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Unix times under ``*_at`` / ``*_since`` keys, shown as local times with their offset."""
    for key, value in event.items():
        if (
            key.endswith(_TIME_SUFFIXES)
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and value > _PLAUSIBLE_EPOCH
        ):
            event[key] = local_time(value)
    return event


def _mask_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A last guard: a value logged under a secret-looking key is masked, whatever the caller,
    and credentials in any URL are replaced by ``****``."""
    for key, value in event.items():
        if not isinstance(value, str):
            continue
        if any(secret in key.lower() for secret in _SECRET_KEYS):
            event[key] = mask(value)
        elif "@" in value:
            event[key] = redact_url(value)
    return event


def configure(
    config: LogConfig, stream: TextIO | None = None, *, clock: Callable[[], float] = time.time
) -> None:
    stream = stream or sys.stderr
    fmt = config.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "keyvalue"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.KeyValueRenderer(
            key_order=["timestamp", "level", "event"], drop_missing=True
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _stamper(clock),
            _times,
            _mask_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[config.level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
