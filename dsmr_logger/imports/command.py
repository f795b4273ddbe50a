"""``dsmr-logger import <cloud>``: the configuration's section, the cloud and the target, wired.

Exit status as everywhere: 0 every reading arrived, 1 the run failed or some readings were
refused (dead letters), 2 a configuration or usage mistake (a missing ``[import.<cloud>]``
section, an unknown sink, credentials or a meter the cloud refuses, a DSMR-reader that refuses
the sink's key), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from dsmr_logger.config import Config, DsmrReaderSinkConfig
from dsmr_logger.delivery.spool import SpoolError
from dsmr_logger.imports.cloud import Clock, CloudConfigError, CloudError, SystemClock
from dsmr_logger.imports.run import (
    ArchiveTarget,
    Cloud,
    DsmrReaderTarget,
    Target,
    run_import,
    state_directory,
)
from dsmr_logger.tools import printable
from dsmr_logger.tools.alone import alone
from dsmr_logger.tools.backfill import BackfillError, parse_range

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in the command line or the configuration; the message names it."""


def make_cloud(
    name: str,
    config: Config,
    *,
    clock: Clock,
    draw: Callable[[], float],
    notify: Callable[[str], None],
) -> Cloud:
    section = getattr(config.imports, name, None)
    if section is None:
        raise UsageError(
            f"import.{name}: no [import.{name}] section in the configuration "
            "(see deploy/config.example.toml)"
        )
    zone = ZoneInfo(config.meter.timezone)
    state = state_directory(config)
    if name == "climkit":
        from dsmr_logger.imports.climkit import ClimkitCloud

        return ClimkitCloud(
            section, zone=zone, clock=clock, draw=draw, notify=notify, state_directory=state
        )
    if name == "copper":
        from dsmr_logger.imports.copper import CopperCloud

        return CopperCloud(
            section, zone=zone, clock=clock, draw=draw, notify=notify, state_directory=state
        )
    from dsmr_logger.imports.neurio import NeurioCloud

    return NeurioCloud(
        section, zone=zone, clock=clock, draw=draw, notify=notify, state_directory=state
    )


def make_target(
    name: str, config: Config, sink_name: str | None, archive: Path | None, out: TextIO
) -> Target:
    zone = ZoneInfo(config.meter.timezone)
    if archive is not None:
        return ArchiveTarget(archive, zone)
    sink = next((s for s in config.sinks if s.name == sink_name), None)
    if not isinstance(sink, DsmrReaderSinkConfig):
        names = [s.name for s in config.sinks if isinstance(s, DsmrReaderSinkConfig)]
        raise UsageError(f"--sink {sink_name!r}: not a dsmr-reader sink (have: {names})")
    return DsmrReaderTarget(config, sink, zone, out, label=f"import {name}")


async def import_history(
    name: str,
    config: Config,
    *,
    sink: str | None,
    archive: Path | None,
    since: datetime | None,
    until: datetime | None,
    out: TextIO = sys.stdout,
    clock: Clock | None = None,
    draw: Callable[[], float] = random.random,
) -> int:
    """The whole command once its arguments are read; raises ``UsageError``, ``CloudError``,
    ``BackfillError`` (the caller maps them to exit codes)."""
    clock = clock or SystemClock()

    def notify(text: str) -> None:
        if out.isatty():
            print(file=out)  # leave the progress bar's line
        print(text, file=out, flush=True)

    target = make_target(name, config, sink, archive, out)
    cloud = make_cloud(name, config, clock=clock, draw=draw, notify=notify)
    try:
        return await run_import(
            cloud,
            target,
            zone=ZoneInfo(config.meter.timezone),
            progress_file=state_directory(config) / "progress.json",
            since=since,
            until=until,
            clock=clock,
            out=out,
        )
    finally:
        await cloud.close()


def main(
    name: str,
    config: Config,
    *,
    sink: str | None,
    archive: Path | None,
    since: str | None,
    until: str | None,
) -> int:
    """``dsmr-logger import``: one clear line per mistake, the documented exit codes."""
    zone = ZoneInfo(config.meter.timezone)
    try:
        since_at, until_at = parse_range(since, until, zone)
    except ValueError as exc:
        print(f"dsmr-logger: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with alone(state_directory(config) / "lock", "import"):
            return asyncio.run(
                import_history(
                    name, config, sink=sink, archive=archive, since=since_at, until=until_at
                )
            )
    except (UsageError, CloudConfigError, BackfillError) as exc:
        # BackfillError: the sink refused the key or the listing (as for backfill: exit 2).
        print(f"dsmr-logger: import: {printable(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:  # `import ... | head`: not a failure (the CLI says nothing)
        raise
    except (CloudError, SpoolError, OSError) as exc:
        print(f"dsmr-logger: import: {printable(str(exc) or type(exc).__name__)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
