"""The cloud client's parts on their own: budgets, Retry-After, caching, redaction, series."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cloud_fakes import VirtualClock

from dsmr_logger.imports.cloud import (
    Backoff,
    Bucket,
    CloudError,
    RateLimiter,
    ResponseCache,
    Token,
    TokenHolder,
    max_age,
    oauth_token,
    redact,
    retry_after,
)
from dsmr_logger.imports.series import (
    Index,
    SeriesError,
    day_windows,
    naive_utc,
    number,
    parse_time,
    power,
    stated_time,
)

START = datetime(2024, 5, 1, 12, tzinfo=UTC)
ZURICH = ZoneInfo("Europe/Zurich")


async def grant(limiter: RateLimiter, clock: VirtualClock) -> float:
    """Wait as the client does, take the request, return when it went."""
    while (delay := limiter.delay()) > 0:
        await clock.sleep(delay)
    limiter.take()
    return clock.time()


def most_in_any(times: list[float], period: float) -> int:
    return max(sum(1 for u in times if t <= u < t + period) for t in times)


async def test_no_window_of_any_bucket_ever_holds_more_than_its_limit() -> None:
    clock = VirtualClock(START)
    limiter = RateLimiter([Bucket(100, 3600), Bucket(1000, 86400)], clock)
    times = [await grant(limiter, clock) for _ in range(1150)]
    assert most_in_any(times, 3600) == 100
    assert most_in_any(times, 86400) == 1000
    assert times[1000] - times[0] >= 86400  # the 1001st waits for the day's first to age out


async def test_the_budget_is_kept_on_disk_for_the_next_run(tmp_path: Path) -> None:
    clock = VirtualClock(START)
    state = tmp_path / "budget.json"
    first = RateLimiter([Bucket(100, 3600)], clock, state=state)
    times = [await grant(first, clock) for _ in range(90)]
    second = RateLimiter([Bucket(100, 3600)], clock, state=state)  # a new run
    times += [await grant(second, clock) for _ in range(20)]
    assert most_in_any(times, 3600) == 100
    assert [b.describe() for b, left in second.left()] == ["100/hour"]
    # Without the file the second run would have had its whole hour again.
    forgetful = RateLimiter([Bucket(100, 3600)], clock)
    assert forgetful.left()[0][1] == 100


async def test_a_pause_asked_by_the_server_holds_across_runs(tmp_path: Path) -> None:
    clock = VirtualClock(START)
    state = tmp_path / "budget.json"
    RateLimiter([Bucket(1, 1)], clock, state=state).pause_until(clock.time() + 300)
    later = RateLimiter([Bucket(1, 1)], clock, state=state)
    assert later.delay() == 300
    assert await grant(later, clock) == START.timestamp() + 300


async def test_the_margin_spaces_requests_beyond_the_documented_rate() -> None:
    clock = VirtualClock(START)
    limiter = RateLimiter([Bucket(1, 1.0)], clock, margin=0.25)
    times = [await grant(limiter, clock) for _ in range(5)]
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [1.25] * 4


def test_a_damaged_budget_file_is_an_error_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "budget.json"
    state.write_text("{not json")
    with pytest.raises(CloudError, match=str(state)):
        RateLimiter([Bucket(1, 1)], VirtualClock(START), state=state)


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    now = START.timestamp()
    assert retry_after("120", now) == 120
    assert retry_after(format_datetime(START + timedelta(minutes=5), usegmt=True), now) == 300
    assert retry_after(format_datetime(START - timedelta(minutes=5), usegmt=True), now) == 0
    assert retry_after("soon", now) is None
    assert retry_after(None, now) is None


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    backoff = Backoff(initial=1, cap=60, attempts=6)
    assert [backoff.pause(n, lambda: 1.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.pause(3, lambda: 0.0) == 2  # at least half


def test_max_age_reads_cache_control_less_age() -> None:
    assert max_age({"cache-control": "private, max-age=3600"}) == 3600
    assert max_age({"cache-control": "max-age=60", "age": "20"}) == 40
    assert max_age({"cache-control": "max-age=60", "age": "90"}) is None
    assert max_age({"cache-control": "no-store, max-age=60"}) is None
    assert max_age({"cache-control": "no-cache"}) is None
    assert max_age({}) is None


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-5", "3600.5", "\u0663600", ""])
def test_a_max_age_that_is_not_delta_seconds_caches_nothing(value: str) -> None:
    """``float()`` took "inf" and "1e400": an answer then stayed in the cache for ever, on every
    later run. max-age is digits only (RFC 9111); anything else is not a freshness at all."""
    assert max_age({"cache-control": f"max-age={value}"}) is None


def test_a_max_age_past_two_to_the_31_is_read_as_that() -> None:
    assert max_age({"cache-control": f"max-age={10**40}"}) == 2**31


def test_the_cache_answers_while_fresh_also_after_a_restart(tmp_path: Path) -> None:
    clock = VirtualClock(START)
    cache = ResponseCache(tmp_path / "cache", clock)
    cache.put("GET /meter?limit=1000", b'[{"id": "m"}]', 60)
    assert cache.get("GET /meter?limit=1000") == b'[{"id": "m"}]'
    assert ResponseCache(tmp_path / "cache", clock).get("GET /meter?limit=1000") is not None
    clock.now += 61
    assert cache.get("GET /meter?limit=1000") is None
    assert list((tmp_path / "cache").iterdir()) == []  # expired entries are removed


def test_the_cache_stays_within_its_size(tmp_path: Path) -> None:
    clock = VirtualClock(START)
    cache = ResponseCache(tmp_path / "cache", clock, max_bytes=10_000)
    for n in range(40):
        cache.put(f"GET /r?n={n}", b"x" * 1000, 3600)
    size = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
    assert size <= 10_000
    assert cache.get("GET /r?n=39") is not None and cache.get("GET /r?n=0") is None


def test_a_damaged_cache_entry_is_only_a_miss(tmp_path: Path) -> None:
    clock = VirtualClock(START)
    cache = ResponseCache(tmp_path / "cache", clock)
    cache.put("GET /a", b"{}", 60)
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_text("garbage")
    assert ResponseCache(tmp_path / "cache", clock).get("GET /a") is None


def test_redact_removes_secrets_also_url_encoded() -> None:
    text = "client_secret=a%2Bb%2Fc&x=1 token abc.def body a+b/c"
    assert redact(text, ["a+b/c", "abc.def", ""]) == "client_secret=****&x=1 token **** body ****"


async def test_a_token_is_renewed_ahead_of_its_expiry_and_never_shown() -> None:
    clock = VirtualClock(START)
    fetched: list[Token] = []

    async def fetch() -> Token:
        token = Token(f"Bearer secret-{len(fetched)}", clock.time() + 900)
        fetched.append(token)
        return token

    holder = TokenHolder(fetch, clock)
    assert holder.stale()
    await holder.renew()
    clock.now += 839
    assert not holder.stale()
    clock.now += 1  # a minute before the 15 minutes are up
    assert holder.stale()
    assert "secret" not in repr(fetched[0])
    assert holder.secrets == {"secret-0"}


def test_an_oauth_answer_is_a_token_and_one_without_a_token_names_the_endpoint() -> None:
    now = START.timestamp()
    token = oauth_token(
        {"access_token": "abc", "token_type": "bearer", "expires_in": 600},
        now,
        default_lifetime=3600,
        endpoint="x: POST /token",
    )
    assert token == Token("bearer abc", now + 600)
    assumed = oauth_token({"access_token": "abc"}, now, default_lifetime=3600, endpoint="x")
    assert assumed == Token("Bearer abc", now + 3600)  # no type, no lifetime: the defaults
    for answer in ({"token_type": "Bearer"}, {"access_token": 7}, ["abc"], None):
        with pytest.raises(CloudError, match=r"^x: POST /token: the answer holds no access_token"):
            oauth_token(answer, now, default_lifetime=3600, endpoint="x: POST /token")


# --- series ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "2024-03-31T01:15:00+01:00",
        "2024-03-31T00:15:00Z",
        "2024-03-31T00:15:00.731Z",  # a fraction: the telegram has none, so neither has this
        "2024-03-31T00:15:00",  # naive: UTC
        {"$date": 1711844100000},
        1711844100000,
        "1711844100",
        Decimal("1711844100.0"),
    ],
)
def test_every_timestamp_form_the_clouds_use_reads_as_the_same_instant(value: object) -> None:
    assert parse_time(value, "t") == datetime(2024, 3, 31, 0, 15, tzinfo=UTC)


@pytest.mark.parametrize("value", [None, True, "yesterday", {"date": 1}, [1]])
def test_an_unreadable_timestamp_is_an_error_naming_it(value: object) -> None:
    with pytest.raises(SeriesError, match=r"^when: "):
        parse_time(value, "when")


@pytest.mark.parametrize("value", [None, "", "yesterday", {"date": 1}])
def test_a_creation_date_not_stated_or_unreadable_leaves_since_to_the_user(value: object) -> None:
    assert stated_time(value, "created_at") is None


def test_a_stated_creation_date_is_read_as_any_timestamp() -> None:
    assert stated_time("2024-02-01T00:00:00Z", "created_at") == datetime(2024, 2, 1, tzinfo=UTC)


def test_numbers_as_numbers_or_strings_exactly() -> None:
    assert number("12345.678", "x") == Decimal("12345.678")
    assert number(Decimal("0.1"), "x") == Decimal("0.1")
    assert number(7, "x") == 7
    assert number("-3.5", "x", negative=True) == Decimal("-3.5")
    for bad in (True, None, "abc", "NaN", "-1", [1]):
        with pytest.raises(SeriesError):
            number(bad, "x")


def test_day_windows_follow_local_midnights_through_dst() -> None:
    windows = day_windows(
        datetime(2024, 3, 30, tzinfo=ZURICH), datetime(2024, 4, 1, tzinfo=ZURICH), ZURICH
    )
    assert [w.end - w.start for w in windows] == [timedelta(hours=24), timedelta(hours=23)]
    autumn = day_windows(
        datetime(2024, 10, 27, tzinfo=ZURICH), datetime(2024, 10, 28, tzinfo=ZURICH), ZURICH
    )
    assert [w.end - w.start for w in autumn] == [timedelta(hours=25)]
    capped = day_windows(
        datetime(2024, 10, 27, tzinfo=ZURICH),
        datetime(2024, 10, 28, tzinfo=ZURICH),
        ZURICH,
        longest=timedelta(days=1),
    )
    assert [w.end - w.start for w in capped] == [timedelta(hours=24), timedelta(hours=1)]
    weekly = day_windows(
        datetime(2024, 1, 1, 10, tzinfo=ZURICH),
        datetime(2024, 1, 20, tzinfo=ZURICH),
        ZURICH,
        days=7,
    )
    assert [w.end.astimezone(ZURICH).date() for w in weekly] == [
        date(2024, 1, 8),
        date(2024, 1, 15),
        date(2024, 1, 20),
    ]
    assert all(a.end == b.start for a, b in itertools.pairwise(weekly))


def test_naive_utc_is_what_climkit_asks_for() -> None:
    assert naive_utc(datetime(2024, 3, 31, tzinfo=ZURICH)) == "2024-03-30T23:00:00"


def test_power_is_the_periods_energy_over_its_length() -> None:
    before = Index(START, Decimal("100.000"), Decimal("5.000"))
    after = Index(START + timedelta(minutes=15), Decimal("100.137"), Decimal("5.010"))
    assert power(before, after) == (Decimal("0.548"), Decimal("0.040"))
    assert power(None, after) == (0, 0)
    exchanged = Index(START + timedelta(minutes=30), Decimal("3.000"), Decimal("5.010"))
    assert power(after, exchanged) == (0, 0)  # a counter going back is not negative power
    assert Index.from_json(json.loads(json.dumps(after.to_json()))) == after


@pytest.mark.parametrize(
    "body", [b"[" * 100_000, b'{"value": 1e99999999999999999999}', b"<html>", b"\xff\xfe"]
)
def test_an_answer_that_is_no_json_a_cloud_can_send_is_a_clear_error(body: bytes) -> None:
    """A cloud (or a proxy in front of it) answering too-deep JSON, a number no Decimal holds,
    HTML or non-UTF-8 ends the import with one error naming the endpoint, not a traceback."""
    from dsmr_logger.imports.cloud import _decode

    with pytest.raises(CloudError, match="GET /samples: answer is not JSON"):
        _decode(body, "GET /samples", lambda text: text)
