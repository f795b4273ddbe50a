"""``--since`` and ``--until`` of ``backfill`` and ``import``: every mistake one line, exit 2.

A date the program cannot place (the year 1 east of UTC, the year 9999) crashed both commands
with an OverflowError traceback, and a range with nothing in it (``--since`` after ``--until``)
ran, sent nothing and said "done". Both are mistakes named before anything is contacted.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cli_process import dsmr_logger, one_clear_line

from dsmr_logger.tools.backfill import parse_range


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[meter]\nport = "/dev/null"\n'
        f"[spool]\npath = {json.dumps(str(tmp_path / 'state' / 'spool.sqlite3'))}\n"
        '[[sink]]\nname = "home"\nurl = "http://127.0.0.1:9"\napi_key = "k-0123456789abcdef"\n'
        'api = "v2"\n'
        '[import.climkit]\nusername = "u"\npassword = "p-0123456789abc"\nsite = "s"\n'
        'meter = "m"\nbase_url = "http://127.0.0.1:9"\n'
    )
    (tmp_path / "archive").mkdir()
    return path


COMMANDS = {
    "backfill": ["backfill", "--from", "{tmp}/archive", "--sink", "home"],
    "import": ["import", "climkit", "--to-archive", "{tmp}/imported"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--since", "0001-01-01"], "--since: '0001-01-01' is out of range"),
        (["--until", "0001-01-01T00:10"], "--until: '0001-01-01T00:10' is out of range"),
        (["--until", "9999-12-31T23:30+00:00"], "--until: '9999-12-31T23:30+00:00' is out of"),
        (["--since", "last tuesday"], "--since: 'last tuesday' is not an ISO 8601 date or time"),
        (
            ["--since", "2026-12-05", "--until", "2026-12-01"],
            "--since 2026-12-05 is after --until 2026-12-01",
        ),
        (
            ["--since", "2026-10-25T02:30+01:00", "--until", "2026-10-25T02:30+02:00"],
            "is after --until",  # 01:30 UTC, then 00:30 UTC: the autumn change's hour twice
        ),
    ],
)
def test_a_range_that_cannot_be_placed_or_holds_nothing_is_exit_2(
    tmp_path: Path, command: str, options: list[str], named: str
) -> None:
    arguments = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    result = dsmr_logger(*arguments, *options, "--config", config_file(tmp_path))
    assert result.returncode == 2
    one_clear_line(result, named)
    assert result.stdout == ""
    assert not (tmp_path / "imported").exists()


def test_a_range_of_one_instant_is_allowed_both_ends_included() -> None:
    zone = ZoneInfo("Europe/Amsterdam")
    since, until = parse_range("2026-11-01T00:15", "2026-11-01T00:15", zone)
    assert since == until == datetime(2026, 11, 1, 0, 15, tzinfo=zone)


def test_a_wall_clock_time_the_autumn_change_shows_twice_covers_both_readings() -> None:
    """--since/--until 02:30 on the night clocks go back: the meter gave a reading at 02:30
    summer time and another an hour later at 02:30 winter time. Both are in the range; taking
    the first instant for both ends silently left the second out."""
    zone = ZoneInfo("Europe/Amsterdam")
    since, until = parse_range("2026-10-25T02:30", "2026-10-25T02:30", zone)
    assert since is not None and until is not None
    summer = datetime.fromisoformat("2026-10-25T02:30+02:00")
    winter = datetime.fromisoformat("2026-10-25T02:30+01:00")
    assert since <= summer <= until
    assert since <= winter <= until
    assert (until - since).total_seconds() == 3600


def test_a_wall_clock_time_the_spring_change_skips_misses_no_reading() -> None:
    """02:30 does not exist on the night clocks go forward; a range ending there still holds
    the reading at 01:59 winter time, and one starting there the reading at 03:00 summer time."""
    zone = ZoneInfo("Europe/Amsterdam")
    _, until = parse_range(None, "2026-03-29T02:30", zone)
    since, _ = parse_range("2026-03-29T02:30", None, zone)
    assert until is not None and since is not None
    assert datetime.fromisoformat("2026-03-29T01:59+01:00") <= until
    assert since <= datetime.fromisoformat("2026-03-29T03:00+02:00")
