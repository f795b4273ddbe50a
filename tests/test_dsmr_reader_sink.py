"""The v1 sink against a real HTTP server answering like DSMR-reader (dsmr_reader_server.py).

Also: the fake server's own contract (so a green sink test means something), and the answer table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from conftest import CORPUS, MANIFEST, require_corpus
from dsmr_reader_server import (
    DEBUG_500_PAGE,
    PLAIN_500_PAGE,
    V1_PATH,
    V2_PATH,
    DsmrReaderProcess,
    DsmrReaderServer,
    lacks_required_registers,
    parse_failure,
)

from dsmr_logger.config import DsmrReaderSinkConfig
from dsmr_logger.delivery.answers import (
    Verdict,
    advice,
    classify,
    no_answer,
    parse_retry_after,
)
from dsmr_logger.delivery.sinks.dsmr_reader import DsmrReaderV1Sink
from dsmr_logger.net.http import ConnectError, ReadTimeout
from dsmr_logger.sources.p1.framing import Frame, FrameAssembler

KEY = "s3cr3t-api-key"
NL_DSMR42 = "dsmrreader-dsmr-reader/kaifa_dsmr42__kfm5kaifa-meter.txt"
NL_DSMR5 = "ndokter-dsmr_parser/v5__isk52mt382-1000.txt"
SWEDISH = "dsmrreader-dsmr-reader/sweden_kamstrup__kam5.txt"  # 1.8.0 totals, no 1.8.1
LOWERCASE_CRC = "esphome-libs-dsmr_parser/packet_accumulator_example_test__kfm5kaifa-meter.txt"
UNPADDED_CRC = "ndokter-dsmr_parser/unpadded_crc__nwa-warmtelink.txt"
NON_UTF8 = "dsmrreader-dsmr-reader/fluvius_without_gas__flu5769484_a.txt"  # 0xAB in the header


@dataclass(frozen=True, slots=True)
class Item:
    seq: int
    telegram: bytes
    received_at: float = 0.0


def raw(name: str) -> bytes:
    return (require_corpus() / name).read_bytes()


def frame_of(data: bytes) -> Frame:
    frames = FrameAssembler().feed(data, 0.0)
    assert len(frames) == 1, frames
    return frames[0]


def _decodes(name: str) -> bool:
    try:
        (CORPUS / name).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return True


# Every single telegram a meter could have sent with a good (or no) CRC, and that survives
# Django's UTF-8 form decoding.
DELIVERABLE = [
    entry["file"]
    for entry in MANIFEST
    if entry["kind"] == "telegram"
    and (entry["crc_valid"] or not entry["has_crc"])
    and _decodes(entry["file"])
]
BAD_CRC = [
    entry["file"]
    for entry in MANIFEST
    if entry["kind"] == "telegram" and entry["crc_valid"] is False and _decodes(entry["file"])
]


@pytest.fixture
async def server() -> AsyncIterator[DsmrReaderServer]:
    async with DsmrReaderServer(api_key=KEY) as running:
        yield running


SinkFactory = Callable[..., Awaitable[DsmrReaderV1Sink]]


@pytest.fixture
async def make_sink(server: DsmrReaderServer) -> AsyncIterator[SinkFactory]:
    sinks: list[DsmrReaderV1Sink] = []

    async def make(**overrides: Any) -> DsmrReaderV1Sink:
        settings: dict[str, Any] = {"api_key": KEY, "timeout": 0.5, **overrides}
        config = DsmrReaderSinkConfig(
            name="home", url=f"http://127.0.0.1:{server.port}", **settings
        )
        sink = DsmrReaderV1Sink(config)
        await sink.start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.close()


# --- the sink against the server -----------------------------------------------------------------


async def test_201_delivered_byte_identical(server: DsmrReaderServer, make_sink: SinkFactory):
    telegram = raw(NL_DSMR42)
    sink = await make_sink()
    answer = await sink.send(Item(1, telegram))
    assert (answer.verdict, answer.status, answer.body) == (Verdict.DELIVERED, 201, "")
    assert server.received == [telegram.decode()]
    assert server.received[0].encode() == telegram  # every CR and LF, byte for byte
    assert server.answers[0].auth == "token"


@pytest.mark.parametrize("name", DELIVERABLE)
async def test_every_valid_corpus_telegram_is_stored(
    name: str, server: DsmrReaderServer, make_sink: SinkFactory
):
    frame = frame_of(raw(name))
    sink = await make_sink()
    answer = await sink.send(Item(1, frame.telegram))
    assert answer.verdict is Verdict.DELIVERED, (answer.describe(), server.answers[-1].reason)
    assert server.received == [frame.telegram.decode()]


async def test_legacy_x_authkey_header(server: DsmrReaderServer, make_sink: SinkFactory):
    sink = await make_sink(auth_header="x-authkey")
    answer = await sink.send(Item(1, raw(NL_DSMR42)))
    assert answer.verdict is Verdict.DELIVERED
    assert server.answers[0].auth == "x-authkey"


@pytest.mark.parametrize("auth_header", ["token", "x-authkey"])
async def test_wrong_key_is_misconfigured(
    auth_header: str, server: DsmrReaderServer, make_sink: SinkFactory
):
    sink = await make_sink(api_key="not-the-key", auth_header=auth_header)
    answer = await sink.send(Item(1, raw(NL_DSMR42)))
    assert (answer.verdict, answer.status, answer.body) == (
        Verdict.MISCONFIGURED,
        403,
        "Invalid auth key",
    )
    assert server.received == []


@pytest.mark.parametrize(
    ("mode", "verdict", "status"),
    [
        ("disabled", Verdict.MISCONFIGURED, 405),
        ("forbidden", Verdict.MISCONFIGURED, 403),
        ("html500", Verdict.SUSPECT, 500),
        ("parse_failure", Verdict.REJECTED, 500),
        ("bad_request", Verdict.REJECTED, 400),
        ("rate_limited", Verdict.RETRY, 429),
    ],
)
async def test_forced_answers(
    mode: str, verdict: Verdict, status: int, server: DsmrReaderServer, make_sink: SinkFactory
):
    sink = await make_sink()
    server.mode = mode
    answer = await sink.send(Item(1, raw(NL_DSMR42)))
    assert (answer.verdict, answer.status) == (verdict, status), answer.describe()
    assert server.received == []
    server.mode = "ok"
    assert (await sink.send(Item(1, raw(NL_DSMR42)))).verdict is Verdict.DELIVERED


async def test_parse_failure_body_is_exact(server: DsmrReaderServer, make_sink: SinkFactory):
    server.mode = "parse_failure"
    answer = await (await make_sink()).send(Item(1, raw(NL_DSMR42)))
    assert answer.body == "Failed to parse telegram"
    assert answer.verdict is Verdict.REJECTED


async def test_429_retry_after_is_parsed(server: DsmrReaderServer, make_sink: SinkFactory):
    sink = await make_sink()
    server.mode = "rate_limited"
    assert (await sink.send(Item(1, raw(NL_DSMR42)))).retry_after == 7.0
    server.retry_after = 30
    answer = await sink.send(Item(1, raw(NL_DSMR42)))
    assert (answer.verdict, answer.retry_after) == (Verdict.RETRY, 30.0)


async def test_refused_is_retry_and_recovers_on_same_port(
    server: DsmrReaderServer, make_sink: SinkFactory
):
    server.mode = "refuse"
    sink = await make_sink()  # no pooled connection: a genuine connect() → ECONNREFUSED
    answer = await sink.send(Item(1, raw(NL_DSMR42)))
    assert answer.verdict is Verdict.RETRY and answer.status is None
    assert answer.error and "Connect" in answer.error, answer.error
    assert answer.describe() == answer.error
    await server.set_mode("ok")
    assert (await sink.send(Item(2, raw(NL_DSMR42)))).verdict is Verdict.DELIVERED
    assert len(server.received) == 1


async def test_refuse_drops_kept_alive_connections(
    server: DsmrReaderServer, make_sink: SinkFactory
):
    sink = await make_sink()
    assert (await sink.send(Item(1, raw(NL_DSMR42)))).verdict is Verdict.DELIVERED
    server.mode = "refuse"  # the pooled connection is closed under the client
    answer = await sink.send(Item(2, raw(NL_DSMR42)))
    assert answer.verdict is Verdict.RETRY and answer.error, answer
    await asyncio.sleep(0.01)
    answer = await sink.send(Item(2, raw(NL_DSMR42)))
    assert answer.verdict is Verdict.RETRY and "Connect" in (answer.error or ""), answer
    await server.set_mode("ok")
    assert (await sink.send(Item(2, raw(NL_DSMR42)))).verdict is Verdict.DELIVERED


async def test_hang_times_out_to_retry(server: DsmrReaderServer, make_sink: SinkFactory):
    sink = await make_sink(timeout=0.3)
    server.mode = "hang"
    started = time.monotonic()
    answer = await sink.send(Item(1, raw(NL_DSMR42)))
    elapsed = time.monotonic() - started
    assert answer.verdict is Verdict.RETRY and answer.status is None
    assert answer.error and "Timeout" in answer.error, answer.error
    assert 0.25 <= elapsed < 1.5
    assert server.hanging == 1 and server.received == []
    server.mode = "ok"  # the hung request is dropped unanswered (hang_outcome="drop")
    assert (await sink.send(Item(1, raw(NL_DSMR42)))).verdict is Verdict.DELIVERED
    assert len(server.received) == 1 and server.hanging == 0


async def test_timed_out_post_may_still_be_stored(server: DsmrReaderServer, make_sink: SinkFactory):
    """The at-least-once case: the client gave up, the server stored it later; a resend dups it."""
    sink = await make_sink(timeout=0.3)
    server.hang_outcome = "process"
    server.mode = "hang"
    assert (await sink.send(Item(1, raw(NL_DSMR42)))).verdict is Verdict.RETRY
    server.mode = "ok"
    await asyncio.sleep(0.02)
    assert len(server.received) == 1
    assert (await sink.send(Item(1, raw(NL_DSMR42)))).verdict is Verdict.DELIVERED
    assert len(server.received) == 2


async def test_slow_server(server: DsmrReaderServer, make_sink: SinkFactory):
    server.delay = 0.1
    assert (await (await make_sink(timeout=0.5)).send(Item(1, raw(NL_DSMR42)))).verdict is (
        Verdict.DELIVERED
    )
    server.delay = 0.6
    answer = await (await make_sink(timeout=0.3)).send(Item(2, raw(NL_DSMR42)))
    assert answer.verdict is Verdict.RETRY
    assert len(server.received) == 1  # not yet: the server stores it at 0.6 s, after the timeout


@pytest.mark.parametrize("name", [LOWERCASE_CRC, UNPADDED_CRC])
async def test_noncanonical_crc_refused_but_frame_telegram_accepted(
    name: str, server: DsmrReaderServer, make_sink: SinkFactory
):
    sent = raw(name)
    frame = frame_of(sent)
    assert frame.telegram != sent
    assert frame.crc is not None and frame.telegram.endswith(b"!%04X\r\n" % frame.crc)
    sink = await make_sink()
    answer = await sink.send(Item(1, sent))
    assert (answer.verdict, answer.status, answer.body) == (
        Verdict.REJECTED,
        500,
        "Failed to parse telegram",
    )
    answer = await sink.send(Item(2, frame.telegram))
    assert answer.verdict is Verdict.DELIVERED
    assert server.received == [frame.telegram.decode()]


async def test_non_utf8_telegram_cannot_pass_v1(server: DsmrReaderServer, make_sink: SinkFactory):
    """Django decodes the form as UTF-8 with replacement: the CRC can no longer match."""
    frame = frame_of(raw(NON_UTF8))
    answer = await (await make_sink()).send(Item(1, frame.telegram))
    assert answer.verdict is Verdict.REJECTED


async def test_poison_only_hits_matching_telegrams(
    server: DsmrReaderServer, make_sink: SinkFactory
):
    good, bad = raw(NL_DSMR42), raw(NL_DSMR5)
    server.poison = lambda telegram: "ISk5" in telegram
    sink = await make_sink()
    results = [await sink.send(Item(n, t)) for n, t in enumerate([good, bad, good])]
    assert [a.verdict for a in results] == [Verdict.DELIVERED, Verdict.SUSPECT, Verdict.DELIVERED]
    assert server.received == [good.decode(), good.decode()]
    server.poison_answer = "parse_failure"
    assert (await sink.send(Item(4, bad))).verdict is Verdict.REJECTED


async def test_missing_registers_predicate(server: DsmrReaderServer, make_sink: SinkFactory):
    server.poison = lacks_required_registers
    sink = await make_sink()
    assert (await sink.send(Item(1, frame_of(raw(SWEDISH)).telegram))).verdict is Verdict.SUSPECT
    assert (await sink.send(Item(2, raw(NL_DSMR5)))).verdict is Verdict.DELIVERED


async def test_debug_traceback_500_is_suspect(server: DsmrReaderServer, make_sink: SinkFactory):
    server.mode = "html500"
    server.html500_page = "debug"
    answer = await (await make_sink()).send(Item(1, raw(NL_DSMR42)))
    assert answer.verdict is Verdict.SUSPECT


async def test_as_a_process():
    require_corpus()
    proc = await asyncio.to_thread(DsmrReaderProcess, KEY)
    try:
        config = DsmrReaderSinkConfig(name="home", url=proc.url, api_key=KEY, timeout=0.5)
        sink = DsmrReaderV1Sink(config)
        await sink.start()
        try:
            assert (await sink.send(Item(1, raw(NL_DSMR42)))).verdict is Verdict.DELIVERED
            await asyncio.to_thread(proc.control, mode="refuse")
            assert (await sink.send(Item(2, raw(NL_DSMR5)))).verdict is Verdict.RETRY
            state = await asyncio.to_thread(proc.control, mode="ok", poison_substring="ISk5")
            assert state["mode"] == "ok" and state["port"] == proc.port
            assert (await sink.send(Item(2, raw(NL_DSMR5)))).verdict is Verdict.SUSPECT
            received = await asyncio.to_thread(proc.received)
            assert received == [raw(NL_DSMR42).decode()]
            assert (await asyncio.to_thread(proc.state))["statuses"] == [201, 500]
        finally:
            await sink.close()
    finally:
        await asyncio.to_thread(proc.close)
    assert proc.process.returncode == 0


# --- the server's own contract (DSMR-reader's v1 view) ------------------------------------------


async def _post(server: DsmrReaderServer, headers: dict[str, str] | None = None, **kwargs: Any):
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + V1_PATH, headers=headers, **kwargs) as response,
    ):
        return response.status, await response.text(), response.headers


async def test_server_contract(server: DsmrReaderServer):
    require_corpus()
    token = {"Authorization": f"Token {KEY}"}
    telegram = raw(NL_DSMR42).decode()
    async with aiohttp.ClientSession() as session, session.get(server.url + V1_PATH) as got:
        assert (got.status, await got.text()) == (405, "")
    assert (await _post(server, data={"telegram": telegram}))[:2] == (403, "Invalid auth key")
    assert (await _post(server, {"Authorization": KEY}, data={"telegram": telegram}))[0] == 403
    assert (await _post(server, token, data={"other": telegram}))[:2] == (400, "Invalid data")
    assert (await _post(server, token, data={"telegram": " \r\n"}))[0] == 400
    assert (await _post(server, token, json={"telegram": telegram}))[0] == 400  # not a form
    assert (await _post(server, token, data={"telegram": "blablabla"}))[:2] == (
        500,
        "Failed to parse telegram",
    )
    form = aiohttp.FormData({"telegram": telegram}, default_to_multipart=True)
    assert (await _post(server, token, data=form))[:2] == (201, "")
    server.mode = "disabled"  # checked before the key, as DSMR-reader does
    status, body, headers = await _post(server, {"X-AUTHKEY": "wrong"}, data={"telegram": "x"})
    assert (status, body, headers["Allow"]) == (405, "API is disabled", "POST")
    server.mode = "html500"
    status, body, headers = await _post(server, token, data={"telegram": telegram})
    assert (
        status == 500 and body == PLAIN_500_PAGE and headers["Content-Type"].startswith("text/html")
    )
    assert server.requests == 10
    assert [a.status for a in server.answers] == [405, 403, 403, 400, 400, 400, 500, 201, 405, 500]
    assert server.received == [telegram]


def test_parse_failure_rules():
    telegram = raw(NL_DSMR42).decode()
    assert parse_failure(telegram) is None
    assert parse_failure(frame_of(raw(UNPADDED_CRC)).telegram.decode()) is None
    assert parse_failure("junk" + telegram)
    assert parse_failure(telegram.replace("\r\n", "\n"))  # LF only
    assert parse_failure(telegram[:-2])  # no CRLF after the CRC
    assert parse_failure(telegram + telegram)  # two in one post
    assert parse_failure(raw(LOWERCASE_CRC).decode())  # !60e5
    assert parse_failure(raw(UNPADDED_CRC).decode())  # !B9F
    body, crc = telegram[:-6], int(telegram[-6:-2], 16)
    assert parse_failure(body + f"{crc ^ 1:04X}\r\n")  # wrong CRC
    no_crc = raw("ndokter-dsmr_parser/v2_2__isk52mt382-1004.txt").decode()
    assert parse_failure(no_crc) is None


@pytest.mark.parametrize("name", BAD_CRC)
def test_parse_failure_agrees_with_manifest_on_bad_crcs(name: str):
    assert parse_failure(raw(name).decode()) is not None


# --- answers.classify, row by row ----------------------------------------------------------------

PARSE_FAILURE = "Failed to parse telegram"


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, "", Verdict.DELIVERED),
        (201, "", Verdict.DELIVERED),
        (204, "", Verdict.DELIVERED),
        (400, "Invalid data", Verdict.REJECTED),
        (401, "", Verdict.MISCONFIGURED),
        (403, "Invalid auth key", Verdict.MISCONFIGURED),
        (404, "<h1>Not Found</h1>", Verdict.MISCONFIGURED),
        (405, "API is disabled", Verdict.MISCONFIGURED),
        (408, "", Verdict.RETRY),
        (413, "", Verdict.REJECTED),
        (429, "", Verdict.RETRY),
        (500, PARSE_FAILURE, Verdict.REJECTED),
        (500, PLAIN_500_PAGE, Verdict.SUSPECT),
        (500, "", Verdict.SUSPECT),
        (501, "", Verdict.RETRY),
        (502, "", Verdict.RETRY),
        (503, "", Verdict.RETRY),
        (504, "", Verdict.RETRY),
        (301, "", Verdict.MISCONFIGURED),
        (302, "", Verdict.MISCONFIGURED),
        (307, "", Verdict.MISCONFIGURED),
        (308, "", Verdict.MISCONFIGURED),
        (304, "", Verdict.RETRY),
    ],
)
def test_classify(status: int, body: str, verdict: Verdict):
    answer = classify(status, body)
    assert (answer.verdict, answer.status, answer.body, answer.error) == (
        verdict,
        status,
        body,
        None,
    )


def test_classify_debug_traceback_page():
    assert classify(500, DEBUG_500_PAGE).verdict is Verdict.SUSPECT


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("7", 7.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-1", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_retry_after(header: str | None, seconds: float | None):
    assert parse_retry_after(header) == seconds
    assert classify(429, "", header).retry_after == seconds


def test_classify_truncates_body_and_describes():
    answer = classify(500, "x" * 5000)
    assert len(answer.body) == 2000
    assert classify(500, PARSE_FAILURE).describe() == "HTTP 500 Failed to parse telegram"
    assert classify(201, "").describe() == "HTTP 201"


def test_no_answer_is_retry():
    answer = no_answer(ConnectionRefusedError(111, "Connection refused"))
    assert answer.verdict is Verdict.RETRY and answer.status is None
    assert answer.error == "ConnectionRefusedError: [Errno 111] Connection refused"
    assert no_answer(TimeoutError()).error == "TimeoutError: TimeoutError"


# --- redirects, "not sent" vs "maybe stored", the health probe -----------------------------------


async def test_redirect_is_misconfigured_and_names_the_url_to_use(
    server: DsmrReaderServer, make_sink: SinkFactory
):
    """http → https redirect: not retried for ever; the advice is the URL to configure."""
    server.mode = "redirect"
    sink = await make_sink()
    answer = await sink.send(Item(1, raw(NL_DSMR42)))
    https = f"https://127.0.0.1:{server.port}"
    assert answer.verdict is Verdict.MISCONFIGURED
    assert answer.location == https + V1_PATH
    assert advice(answer) == f"the server redirects to {https + V1_PATH}: use {https} as url"
    assert answer.describe() == f"HTTP 301 redirect to {https + V1_PATH}"
    assert server.received == []


async def test_redirect_elsewhere_and_credentials_never_echoed(
    server: DsmrReaderServer, make_sink: SinkFactory
):
    server.mode = "redirect"
    server.redirect_to = "https://user:secret@login.example/portal"
    answer = await (await make_sink()).send(Item(1, raw(NL_DSMR42)))
    assert answer.verdict is Verdict.MISCONFIGURED
    assert answer.location == "https://login.example/portal/api/v1/datalogger/dsmrreading"
    assert advice(answer).endswith("use https://login.example/portal as url")
    assert "secret" not in advice(answer) + answer.describe()
    tokened = classify(302, "", location="https://h.example:8443/x?token=abc#frag")
    assert tokened.location == "https://h.example:8443/x" and "abc" not in advice(tokened)
    server.redirect_to = "/elsewhere"  # relative: resolved against the sink's URL
    answer = await (await make_sink()).send(Item(2, raw(NL_DSMR42)))
    assert answer.location == f"http://127.0.0.1:{server.port}/elsewhere{V1_PATH}"
    assert "as url" in advice(answer)


async def test_refused_stored_nothing_a_timeout_may_have(
    server: DsmrReaderServer, make_sink: SinkFactory
):
    """The HTTP client's ConnectError (not sent) vs ReadTimeout (sent: maybe stored), carried
    into the answer the worker counts possible duplicates by."""
    sink = await make_sink(timeout=0.3)
    await server.set_mode("refuse")
    refused = await sink.send(Item(1, raw(NL_DSMR42)))
    assert (refused.verdict, refused.maybe_stored) == (Verdict.RETRY, False)
    assert refused.error and refused.error.startswith("ConnectError")
    await server.set_mode("ok")
    server.hang_outcome = "process"  # the timed-out request is stored after all
    await server.set_mode("hang")
    timed_out = await sink.send(Item(2, raw(NL_DSMR5)))
    assert (timed_out.verdict, timed_out.maybe_stored) == (Verdict.RETRY, True)
    assert timed_out.error and timed_out.error.startswith("ReadTimeout")
    await server.set_mode("ok")
    answer = await sink.send(Item(3, raw(NL_DSMR42)))
    assert (answer.verdict, answer.maybe_stored) == (Verdict.DELIVERED, False)
    async with asyncio.timeout(5):
        while len(server.received) < 2:  # the held one is stored when the server resumes
            await asyncio.sleep(0.01)
    assert sorted(server.received) == sorted([raw(NL_DSMR5).decode(), raw(NL_DSMR42).decode()])


def test_gateway_failures_may_have_stored():
    assert classify(504, "").maybe_stored and classify(502, "").maybe_stored
    assert not classify(503, "").maybe_stored and not classify(500, PLAIN_500_PAGE).maybe_stored
    assert not no_answer(ConnectError("refused")).maybe_stored
    assert no_answer(ReadTimeout("no answer")).maybe_stored
    assert no_answer(ConnectionResetError()).maybe_stored  # unknown: the honest side


@pytest.mark.parametrize(
    ("mode", "verdict"),
    [
        ("ok", Verdict.DELIVERED),
        ("html500", Verdict.SUSPECT),
        ("proxy_bad_request", Verdict.REJECTED),
        ("forbidden", Verdict.MISCONFIGURED),
        ("refuse", Verdict.RETRY),
    ],
)
async def test_health_probe_reads_and_stores_nothing(
    mode: str, verdict: Verdict, server: DsmrReaderServer, make_sink: SinkFactory
):
    sink = await make_sink()
    await server.set_mode(mode)
    assert (await sink.probe()).verdict is verdict
    assert server.received == [] and server.readings == []
    if mode == "ok":
        (served,) = server.answers
        assert (served.path, served.status, served.reason) == (V2_PATH, 200, "list")
