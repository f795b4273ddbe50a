"""Attacks on ``dsmr-logger import``: what a failing disk, a moving clock or a late cloud does.

Each test sets up one hostile condition against the documented fakes (``cloud_fakes``) and the
project's DSMR-reader test server, and checks the promise the import makes: every reading once,
nothing skipped, the cloud's rules kept, one clear line when it cannot go on.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cloud_fakes import VirtualClock
from test_import_climkit import ZONE, climkit, make_config, spring_series

from dsmr_logger.imports.cloud import CloudError
from dsmr_logger.imports.command import import_history
from dsmr_logger.telegram.capture import frames_in, read_capture
from dsmr_logger.tools.backfill import meter_time


async def test_an_archive_day_that_cannot_be_written_leaves_the_others_written_once(
    tmp_path: Path,
) -> None:
    """A window's telegrams land in two day files (its last slot, 00:00, is the next day's);
    when the second cannot be written the import stops, and the first holds each telegram
    once, not once more for the retry on the way out. The rerun completes, still once each."""
    points = spring_series()
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    since, until = datetime(2024, 3, 29, tzinfo=ZONE), datetime(2024, 3, 30, tzinfo=ZONE)
    wanted = [p.at for p in points if since <= p.at <= until]
    folder = tmp_path / "archive"
    blocker = folder / "2024-03-30.log"
    blocker.mkdir(parents=True)  # not a file: writing the day fails
    async with climkit(clock, points) as fake:
        config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")

        async def run() -> int:
            return await import_history(
                "climkit",
                config,
                sink=None,
                archive=folder,
                since=since,
                until=until,
                out=io.StringIO(),
                clock=clock,
            )

        with pytest.raises(CloudError, match=r"2024-03-30\.log"):
            await run()
        first_day = [
            meter_time(t, ZONE) for t in frames_in(read_capture(folder / "2024-03-29.log"))
        ]
        assert first_day == wanted[:-1], "a telegram written twice (or lost)"

        blocker.rmdir()
        assert await run() == 0
        assert fake.violations == []
    written = [
        meter_time(t, ZONE)
        for day in ("2024-03-29", "2024-03-30")
        for t in frames_in(read_capture(folder / f"{day}.log"))
    ]
    assert written == wanted
