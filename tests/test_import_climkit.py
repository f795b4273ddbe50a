"""``dsmr-logger import climkit``: a Climkit meter's history into DSMR-reader, only the gaps.

Against ``ClimkitFake`` (its document's rules: 15-minute tokens, 401 without a live token, at most
one request a second) and the project's DSMR-reader test server already holding some readings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import signal
import sys
from asyncio.subprocess import PIPE
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cloud_fakes import ClimkitFake, ClimkitPoint, RealClock, VirtualClock, climkit_series
from dsmr_reader_server import V2_PATH, DsmrReaderServer, v2_reading
from waiting import wait_until

from dsmr_logger.config import Config, ImportsConfig, from_mapping
from dsmr_logger.imports.climkit import ClimkitCloud
from dsmr_logger.imports.cloud import CloudConfigError, CloudError
from dsmr_logger.imports.command import import_history
from dsmr_logger.telegram.capture import frames_in, read_capture
from dsmr_logger.tools.backfill import backfill, meter_time

ZONE = ZoneInfo("Europe/Zurich")
KEY = "dsmr-reader-key-import-test"
USER, PASSWORD = "api-user", "climkit-password-Zx81!"
SITE, METER = "5f0c0ffee0c0ffee0c0ffee0", "5f0c0ffee0c0ffee0c0ffee1"
METERS = [
    {
        "id": METER,
        "type": "electricity",
        "name": "Général",
        "mode": "consumption",
        "prim_ad": "12",
        "is_rule_meter": False,
    },
    {
        "id": "5f0c0ffee0c0ffee0c0ffee3",
        "type": "electricity",
        "name": "Communauté",
        "mode": "consumption",
        "prim_ad": None,
        "is_rule_meter": True,
    },
    {
        "id": "5f0c0ffee0c0ffee0c0ffee2",
        "type": "heating",
        "name": "Chaleur",
        "mode": "consumption",
        "prim_ad": 7,
        "is_rule_meter": False,
    },
]


def spring_series() -> list[ClimkitPoint]:
    """28 March - 3 April 2024: the 31st is the DST day (92 slots, +01:00 then +02:00); 1 April
    lacks 10:00-13:00 (a gap); 2 April is empty."""

    def missing(moment: datetime) -> bool:
        day, local = period_day(moment), moment.astimezone(ZONE)
        in_gap = day == date(2024, 4, 1) and (10, 0) < (local.hour, local.minute) <= (13, 0)
        return in_gap or day == date(2024, 4, 2)

    return climkit_series(date(2024, 3, 28), 7, ZONE, missing=missing)


def period_day(end: datetime) -> date:
    """The local day a 15-minute period belongs to (its end is stamped: 00:00 ends yesterday)."""
    return (end.astimezone(ZONE) - timedelta(minutes=1)).date()


def make_config(tmp_path: Path, climkit_url: str, dsmr_url: str) -> Config:
    return from_mapping(
        {
            "meter": {"port": "/dev/null", "timezone": "Europe/Zurich"},
            "spool": {"path": str(tmp_path / "state" / "spool.sqlite3")},
            "sink": [
                {
                    "name": "home",
                    "url": dsmr_url,
                    "api_key": KEY,
                    "api": "v1",
                    "timeout": 5.0,
                    "retry_max": 0.2,
                }
            ],
            "import": {
                "climkit": {
                    "username": USER,
                    "password": PASSWORD,
                    "site": SITE,
                    "meter": METER,
                    "base_url": climkit_url,
                    "timeout": 5.0,
                }
            },
        }
    )


def climkit(clock: VirtualClock, points: list[ClimkitPoint], **options: Any) -> ClimkitFake:
    return ClimkitFake(
        clock,
        username=USER,
        password=PASSWORD,
        site=SITE,
        meters=METERS,
        data={METER: points},
        zone=ZONE,
        **options,
    )


def expected_fields(points: list[ClimkitPoint], index: int) -> dict[str, Decimal]:
    """What DSMR-reader must receive for points[index]: the indices as given, and power as the
    period's energy over its length (computed here independently of the client)."""
    point = points[index]
    delivered = returned = Decimal(0)
    if index > 0:
        before = points[index - 1]
        hours = Decimal(int((point.at - before.at).total_seconds())) / 3600
        delivered = (point.en_im - before.en_im) / hours
        returned = (point.en_ex - before.en_ex) / hours
    three = Decimal("0.001")
    return {
        "electricity_delivered_1": point.en_im,
        "electricity_returned_1": point.en_ex,
        "electricity_delivered_2": Decimal(0),
        "electricity_returned_2": Decimal(0),
        "electricity_currently_delivered": delivered.quantize(three, ROUND_HALF_UP),
        "electricity_currently_returned": returned.quantize(three, ROUND_HALF_UP),
    }


def posted(server: DsmrReaderServer, skip: int) -> list[tuple[datetime, dict[str, Decimal]]]:
    return [
        (
            datetime.fromisoformat(r["timestamp"]),
            {k: Decimal(v) for k, v in r.items() if k.startswith("electricity_")},
        )
        for r in server.readings[skip:]
    ]


def assert_no_secrets(text: str, fake: ClimkitFake) -> None:
    for secret in (PASSWORD, KEY, *fake.issued):
        assert secret not in text


async def test_import_sends_exactly_the_missing_slots_once_in_order_with_exact_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    points = spring_series()
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    since = datetime(2024, 3, 29, tzinfo=ZONE)  # the site's creation_date: the default --since
    until = datetime(2024, 4, 4, tzinfo=ZONE)
    wanted = [i for i, p in enumerate(points) if since <= p.at <= until]
    slots: dict[date, int] = {}
    for p in points:
        slots[period_day(p.at)] = slots.get(period_day(p.at), 0) + 1
    # The fixture is what the test claims: 96 a day, 92 on the DST day, a gap, an empty day.
    assert slots[date(2024, 3, 30)] == 96 and slots[date(2024, 3, 31)] == 92
    assert slots[date(2024, 4, 1)] == 96 - 12 and date(2024, 4, 2) not in slots
    offsets = {p.at.astimezone(ZONE).utcoffset() for p in points}
    assert offsets == {timedelta(hours=1), timedelta(hours=2)}

    held = set(wanted[10:40]) | {wanted[0], wanted[200], wanted[-1]}
    async with (
        climkit(clock, points) as fake,
        DsmrReaderServer(api_key=KEY, zone="Europe/Zurich") as dsmr,
    ):
        dsmr.readings.extend(v2_reading(points[i].at.isoformat()) for i in sorted(held))
        config = make_config(tmp_path, fake.api_url, dsmr.url)
        out = io.StringIO()
        status = await import_history(
            "climkit",
            config,
            sink="home",
            archive=None,
            since=None,
            until=until,
            out=out,
            clock=clock,
            draw=lambda: 0.5,
        )
        text = out.getvalue()
        assert status == 0, text
        sent = posted(dsmr, len(held))
        assert [s for s, _ in sent] == [points[i].at for i in wanted if i not in held]
        for (stamp, fields), i in zip(sent, [i for i in wanted if i not in held], strict=True):
            assert fields == expected_fields(points, i), stamp
        # The sink says api = "v1": the import talks v2 to it all the same.
        assert dsmr.received == [] and all(a.path == V2_PATH for a in dsmr.answers)
        assert fake.violations == []
        assert min(fake.gaps) >= 1.0
        assert f"{len(wanted) - len(held)} new (3 gap(s) filled)" in text
        assert f"{len(held)} already there" in text
        assert "dsmr_stats_reconstruct_missing_day_statistics" in text

        # Run again: nothing is missing any more, nothing is sent.
        before = len(dsmr.readings)
        again = io.StringIO()
        await import_history(
            "climkit",
            config,
            sink="home",
            archive=None,
            since=None,
            until=until,
            out=again,
            clock=clock,
        )
        assert len(dsmr.readings) == before
        assert fake.violations == []
    assert_no_secrets(text + again.getvalue() + "".join(capsys.readouterr()), fake)


async def test_the_autumn_dst_day_brings_100_slots_each_at_its_own_instant(tmp_path: Path) -> None:
    """27 October 2024: 02:00-03:00 comes twice; the telegrams say S then W, and DSMR-reader
    receives 100 distinct instants, the repeated hour's with +02:00 and then +01:00."""
    points = climkit_series(date(2024, 10, 26), 2, ZONE, missing=lambda moment: False)
    since, until = datetime(2024, 10, 27, 0, 15, tzinfo=ZONE), datetime(2024, 10, 28, tzinfo=ZONE)
    clock = VirtualClock(datetime(2024, 11, 5, tzinfo=UTC))
    async with climkit(clock, points) as fake, DsmrReaderServer(api_key=KEY) as dsmr:
        config = make_config(tmp_path, fake.api_url, dsmr.url)
        status = await import_history(
            "climkit",
            config,
            sink="home",
            archive=None,
            since=since,
            until=until,
            out=io.StringIO(),
            clock=clock,
        )
        assert status == 0
        assert fake.violations == []
    stamps = [datetime.fromisoformat(r["timestamp"]) for r in dsmr.readings]
    assert len(stamps) == len(set(stamps)) == 100
    assert stamps == [p.at for p in points if since <= p.at <= until]
    twice = [s for s in stamps if s.astimezone(ZONE).replace(tzinfo=None).hour == 2]
    assert len(twice) == 8
    assert {s.utcoffset() for s in twice} == {timedelta(hours=1), timedelta(hours=2)}


async def test_a_token_expiring_or_revoked_mid_import_is_renewed_without_a_failure(
    tmp_path: Path,
) -> None:
    """Tokens of 6 s (the fake states it in valid_until): renewed ahead, never used expired;
    then the server forgets them all mid-import: one 401, one renewal, the import goes on and
    nothing of it reaches the user."""
    points = spring_series()
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    async with climkit(clock, points, token_ttl=6.0) as fake, DsmrReaderServer(api_key=KEY) as dsmr:
        config = make_config(tmp_path, fake.api_url, dsmr.url)
        out = io.StringIO()
        fake.revoke_at = 4
        status = await import_history(
            "climkit",
            config,
            sink="home",
            archive=None,
            since=None,
            until=datetime(2024, 4, 4, tzinfo=ZONE),
            out=out,
            clock=clock,
        )
        assert status == 0, out.getvalue()
        assert fake.violations == []  # no expired token ever used, no request too early
        assert fake.unauthorised == 1  # the revoked one, once
        assert len(fake.issued) >= 3
        assert "401" not in out.getvalue() and "retry" not in out.getvalue()
        since, until = datetime(2024, 3, 29, tzinfo=ZONE), datetime(2024, 4, 4, tzinfo=ZONE)
        assert len(dsmr.readings) == sum(1 for p in points if since <= p.at <= until)


async def test_a_server_refusing_a_renewed_token_ends_the_import_instead_of_looping(
    tmp_path: Path,
) -> None:
    points = spring_series()
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    async with climkit(clock, points) as fake:
        config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")
        original = fake.issue

        def revoked_at_birth() -> str:
            token = original()
            fake.revoked.add(token)
            return token

        fake.issue = revoked_at_birth  # type: ignore[method-assign]
        with pytest.raises(CloudError, match="401 again with a new token"):
            await import_history(
                "climkit",
                config,
                sink=None,
                archive=tmp_path / "archive",
                since=None,
                until=datetime(2024, 4, 4, tzinfo=ZONE),
                out=io.StringIO(),
                clock=clock,
            )
        assert len(fake.issued) == 2  # the first token and one renewal, no more
        assert fake.violations == []


async def test_busy_and_failing_answers_are_retried_as_told_then_given_up_naming_the_endpoint(
    tmp_path: Path,
) -> None:
    points = spring_series()
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    until = datetime(2024, 3, 31, tzinfo=ZONE)
    async with climkit(clock, points) as fake:
        config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")
        retry_at = clock.datetime() + timedelta(seconds=42)
        http_date = format_datetime(retry_at, usegmt=True)
        fake.fail_next = [(503, {"Retry-After": "7"}), (500, {}), (429, {"Retry-After": http_date})]
        out = io.StringIO()
        status = await import_history(
            "climkit",
            config,
            sink=None,
            archive=tmp_path / "archive",
            since=None,
            until=until,
            out=out,
            clock=clock,
            draw=lambda: 0.5,
        )
        assert status == 0
        data = [s for s in fake.seen if "meter_data_raw" in s.path]
        assert [s.status for s in data[:4]] == [503, 500, 429, 200]
        assert data[1].at - data[0].at >= 7  # Retry-After in seconds
        assert data[3].at >= retry_at.timestamp()  # Retry-After as an HTTP date
        assert fake.violations == []

        fake.fail_next = [(500, {})] * 6
        with pytest.raises(CloudError) as gave_up:
            await import_history(
                "climkit",
                config,
                sink=None,
                archive=tmp_path / "other",
                since=None,
                until=until,
                out=io.StringIO(),
                clock=clock,
                draw=lambda: 0.5,
            )
        message = str(gave_up.value)
        assert f"POST /meter_data_raw/{SITE}/{METER}" in message and "6 attempts" in message
        assert "HTTP 500" in message


async def test_a_meter_that_is_not_electricity_lists_the_sites_meters(tmp_path: Path) -> None:
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    async with climkit(clock, []) as fake:
        for meter, problem in (
            ("5f0c0ffee0c0ffee0c0ffee2", "is a heating meter, not electricity"),
            ("no-such-meter", "has no meter 'no-such-meter'"),
            ("5f0c0ffee0c0ffee0c0ffee3", "is a rule \\(virtual\\) meter"),
        ):
            config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")
            assert config.imports.climkit is not None
            wrong = Config(
                meter=config.meter,
                spool=config.spool,
                sinks=config.sinks,
                imports=ImportsConfig(
                    climkit=dataclasses.replace(config.imports.climkit, meter=meter)
                ),
            )
            with pytest.raises(CloudConfigError, match=problem) as raised:
                await import_history(
                    "climkit",
                    wrong,
                    sink="home",
                    archive=None,
                    since=None,
                    until=None,
                    out=io.StringIO(),
                    clock=clock,
                )
            assert "import.climkit.meter" in str(raised.value)
            # Both meters listed, prim_ad as the server gave it (a string, a number).
            assert f"{METER} (electricity, consumption, 'Général', prim_ad 12)" in str(raised.value)
            assert "(heating, consumption, 'Chaleur', prim_ad 7)" in str(raised.value)
        assert fake.violations == []


async def test_wrong_credentials_name_the_keys_and_never_the_password(tmp_path: Path) -> None:
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    async with climkit(clock, []) as fake:
        fake.password = "another-password"
        config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")
        with pytest.raises(CloudConfigError) as raised:
            await import_history(
                "climkit",
                config,
                sink="home",
                archive=None,
                since=None,
                until=None,
                out=io.StringIO(),
                clock=clock,
            )
        assert "import.climkit.username/password" in str(raised.value)
        assert PASSWORD not in str(raised.value)


async def test_valid_until_missing_means_15_minutes(tmp_path: Path) -> None:
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    async with climkit(clock, [], state_valid_until=False) as fake:
        config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")
        assert config.imports.climkit is not None
        cloud = ClimkitCloud(config.imports.climkit, zone=ZONE, clock=clock)
        try:
            token = await cloud._login()
        finally:
            await cloud.close()
        assert token.expires_at - clock.time() == 900
        assert token.authorization == f"Bearer {fake.issued[0]}"
        assert fake.issued[0] not in repr(token)


async def test_to_archive_writes_day_files_that_backfill_and_simulate_replay(
    tmp_path: Path,
) -> None:
    points = spring_series()
    clock = VirtualClock(datetime(2024, 4, 10, 12, tzinfo=UTC))
    since, until = datetime(2024, 3, 29, tzinfo=ZONE), datetime(2024, 4, 4, tzinfo=ZONE)
    wanted = [p for p in points if since <= p.at <= until]
    folder = tmp_path / "archive"
    async with climkit(clock, points) as fake:
        config = make_config(tmp_path, fake.api_url, "http://127.0.0.1:9")
        out = io.StringIO()
        assert (
            await import_history(
                "climkit",
                config,
                sink=None,
                archive=folder,
                since=None,
                until=until,
                out=out,
                clock=clock,
            )
            == 0
        )
        assert "dsmr-logger backfill --from" in out.getvalue()
        # Again: every telegram is in the day files already, none is written twice.
        again = io.StringIO()
        await import_history(
            "climkit",
            config,
            sink=None,
            archive=folder,
            since=since,
            until=until,
            out=again,
            clock=clock,
        )
        assert "0 new" in again.getvalue()
        assert fake.violations == []
    days = sorted(p.name for p in folder.iterdir())
    assert days == [
        f"2024-{d}.log" for d in ("03-29", "03-30", "03-31", "04-01", "04-02", "04-03", "04-04")
    ]
    telegrams = [
        t for day in days for t in frames_in(read_capture(folder / day))
    ]  # simulate's reader
    assert [meter_time(t, ZONE) for t in telegrams] == [p.at for p in wanted]

    async with DsmrReaderServer(api_key=KEY) as dsmr:
        replay = make_config(tmp_path, "http://127.0.0.1:9", dsmr.url)
        v2 = from_mapping(
            {
                "meter": {"port": "/dev/null", "timezone": "Europe/Zurich"},
                "spool": {"path": str(replay.spool.path)},
                "sink": [{"name": "home", "url": dsmr.url, "api_key": KEY, "api": "v2"}],
            }
        )
        assert await backfill(v2, "home", folder, since=None, until=None, out=io.StringIO()) == 0
    assert [datetime.fromisoformat(r["timestamp"]) for r in dsmr.readings] == [p.at for p in wanted]
    assert [Decimal(r["electricity_delivered_1"]) for r in dsmr.readings] == [
        p.en_im for p in wanted
    ]


async def test_a_real_process_interrupted_by_sigint_continues_without_duplicates(
    tmp_path: Path,
) -> None:
    """``python -m dsmr_logger import climkit`` as a process (real clock, the real 1/s budget),
    SIGINT in the middle, the same command again: every slot once, in order, no secret shown."""
    points = [p for p in spring_series() if p.at <= datetime(2024, 3, 30, 12, tzinfo=ZONE)]
    until = points[-1].at
    async with climkit(RealClock(), points) as fake, DsmrReaderServer(api_key=KEY) as dsmr:
        dsmr.hang_after = 40  # the 41st reading held: the SIGINT lands mid-window, however slow
        config = tmp_path / "config.toml"
        config.write_text(
            f'[meter]\nport = "/dev/null"\ntimezone = "Europe/Zurich"\n'
            f'[spool]\npath = "{tmp_path / "state" / "spool.sqlite3"}"\n'
            f'[log]\nlevel = "debug"\n'
            f'[[sink]]\nname = "home"\nurl = "{dsmr.url}"\napi_key = "{KEY}"\n'
            f'[import.climkit]\nusername = "{USER}"\npassword = "{PASSWORD}"\n'
            f'site = "{SITE}"\nmeter = "{METER}"\nbase_url = "{fake.api_url}"\n'
        )
        command = [
            "-m",
            "dsmr_logger",
            "import",
            "climkit",
            "--config",
            str(config),
            "--sink",
            "home",
            "--since",
            "2024-03-29",
            "--until",
            until.isoformat(),
        ]
        first = await asyncio.create_subprocess_exec(
            sys.executable, *command, stdout=PIPE, stderr=PIPE
        )
        await wait_until(
            lambda: dsmr.hanging > 0 or first.returncode is not None, "the 41st reading held", 60
        )
        first.send_signal(signal.SIGINT)
        out1, err1 = await asyncio.wait_for(first.communicate(), 30)
        assert first.returncode == 130, err1
        assert b"run the same command again" in err1
        assert len(dsmr.readings) == 40  # stopped inside the first day
        dsmr.mode = "ok"

        second = await asyncio.create_subprocess_exec(
            sys.executable, *command, stdout=PIPE, stderr=PIPE
        )
        out2, err2 = await asyncio.wait_for(second.communicate(), 120)
        assert second.returncode == 0, err2
        assert fake.violations == []
    stamps = [datetime.fromisoformat(r["timestamp"]) for r in dsmr.readings]
    assert stamps == sorted(set(stamps)), "a slot twice or out of order"
    assert stamps == [p.at for p in points if p.at >= datetime(2024, 3, 29, tzinfo=ZONE)]
    printed = b"".join((out1, err1, out2, err2)).decode()
    assert "token renewed" in printed  # the debug log was on, and never shows the token
    for secret in (PASSWORD, KEY, *fake.issued):
        assert secret not in printed
