"""The daemon's own HTTP/1.1 client against real servers on 127.0.0.1.

``aiohttp.web`` plays a normal server; small raw ``asyncio`` servers play the awkward ones
(chunked framing, close-delimited bodies, interim responses, stale keep-alive connections,
broken HTTP, silence) that a DSMR-reader behind some proxy may one day be.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from waiting import wait_until

from dsmr_logger.net.http import (
    MAX_HEAD,
    ConnectError,
    ConnectTimeout,
    HttpClient,
    ProtocolError,
    ReadError,
    ReadTimeout,
)

PATH = "/api/v1/datalogger/dsmrreading"
FORM = "application/x-www-form-urlencoded"
# A telegram keeps its CR LF line ends in the form body; they must arrive byte for byte.
TELEGRAM = b"telegram=/ISK5\\2M550T-1012\r\n\r\n1-0:1.8.1(001234.567*kWh)\r\n!A1B2\r\n\x00\xff"
OK = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"


@asynccontextmanager
async def http_client(url: str, **options: Any) -> AsyncIterator[HttpClient]:
    options.setdefault("timeout", 2.0)
    client = HttpClient(url, **options)
    try:
        yield client
    finally:
        await client.close()


# --- an aiohttp server ---------------------------------------------------------------------


@dataclass
class Seen:
    """What the aiohttp server received, request by request."""

    requests: list[web.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)


@asynccontextmanager
async def aiohttp_server(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.requests.append(request)
        seen.bodies.append(await request.read())
        assert request.transport is not None
        seen.peers.append(request.transport.get_extra_info("peername"))
        return await answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", seen
    finally:
        await runner.cleanup()


async def created(request: web.Request) -> web.Response:
    return web.Response(status=201, body=b'{"stored": true}', headers={"X-Reading-Id": "7"})


# --- raw servers ---------------------------------------------------------------------------


@dataclass
class Raw:
    """What a raw server saw: accepted connections and (connection number, head, body)."""

    url: str = ""
    connections: int = 0
    requests: list[tuple[int, bytes, bytes]] = field(default_factory=list)


@dataclass
class Peer:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    number: int  # 1 for the first accepted connection
    raw: Raw

    async def read(self) -> bytes | None:
        """One request's body (recorded), or None when the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await self.reader.readexactly(int(match[1]) if match else 0)
        self.raw.requests.append((self.number, head, body))
        return body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP RST, as a crashed or rebooted server does."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


@asynccontextmanager
async def raw_server(
    handle: Handler, *, tls: ssl.SSLContext | None = None, port: int = 0
) -> AsyncIterator[Raw]:
    raw = Raw()
    tasks: set[asyncio.Task[Any]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        raw.connections += 1
        try:
            await handle(Peer(reader, writer, raw.connections, raw))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", port, ssl=tls)
    raw.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with server:
            yield raw
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def answering(*responses: bytes) -> Handler:
    """Answers the n-th request on every connection with responses[n] (the last one repeats)."""

    async def handle(peer: Peer) -> None:
        n = 0
        while await peer.read() is not None:
            await peer.send(responses[min(n, len(responses) - 1)])
            n += 1

    return handle


# --- a normal server -----------------------------------------------------------------------


async def test_post_sends_the_request_and_returns_the_response() -> None:
    async with aiohttp_server(created) as (url, seen):
        headers = {"Authorization": "Token s3cret", "User-Agent": "dsmr-logger/test"}
        async with http_client(url + "/dsmr/", headers=headers) as client:
            response = await client.post(PATH, TELEGRAM, FORM)

    assert response.status == 201
    assert response.body == b'{"stored": true}'
    assert response.headers["x-reading-id"] == "7"  # names lower-cased
    assert response.headers["content-length"] == "16"
    [request] = seen.requests
    assert request.method == "POST"
    assert request.path == "/dsmr" + PATH  # the base URL's prefix, without a doubled slash
    assert request.headers["Host"] == url.removeprefix("http://")
    assert request.headers["Content-Type"] == FORM
    assert request.headers["Content-Length"] == str(len(TELEGRAM))
    assert request.headers["Authorization"] == "Token s3cret"
    assert request.headers["User-Agent"] == "dsmr-logger/test"
    assert seen.bodies == [TELEGRAM]


async def test_posts_reuse_one_keep_alive_connection() -> None:
    async with aiohttp_server(created) as (url, seen), http_client(url) as client:
        for n in range(5):
            response = await client.post(PATH, b"telegram=%d" % n, FORM)
            assert response.status == 201
    assert seen.bodies == [b"telegram=%d" % n for n in range(5)]
    assert len(set(seen.peers)) == 1


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_host_header_leaves_out_the_default_port(
    scheme: str, tls_files: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_tls, _ = tls_files
    port = 443 if scheme == "https" else 80
    async with AsyncExitStack() as stack:
        try:
            raw = await stack.enter_async_context(
                raw_server(answering(OK), tls=server_tls if scheme == "https" else None, port=port)
            )
        except OSError as exc:
            pytest.skip(f"cannot listen on 127.0.0.1:{port}: {exc}")
        for url in (f"{scheme}://127.0.0.1/", f"{scheme}://127.0.0.1:{port}/"):
            async with http_client(url, verify_tls=False) as client:
                assert (await client.post(PATH, b"x", FORM)).status == 201
    assert [b"\r\nHost: 127.0.0.1\r\n" in head for _, head, _ in raw.requests] == [True, True]


async def test_waiting_posts_are_served_in_order() -> None:
    async with aiohttp_server(created) as (url, seen), http_client(url) as client:
        await asyncio.gather(*(client.post(PATH, b"telegram=%d" % n, FORM) for n in range(6)))
    assert seen.bodies == [b"telegram=%d" % n for n in range(6)]


async def test_at_most_max_connections_requests_run_at_once() -> None:
    release = asyncio.Event()
    running = 0
    most = 0

    async def held(request: web.Request) -> web.Response:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return await created(request)

    async with aiohttp_server(held) as (url, seen), http_client(url, max_connections=2) as c:
        posts = [asyncio.create_task(c.post(PATH, b"telegram=%d" % n, FORM)) for n in range(3)]
        for _ in range(200):
            if running == 2:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)  # room for a third request to arrive, were it sent
        assert running == 2
        assert len(seen.requests) == 2
        assert not any(post.done() for post in posts)
        release.set()
        responses = await asyncio.gather(*posts)
    assert [response.status for response in responses] == [201, 201, 201]
    assert most == 2
    assert len(set(seen.peers)) == 2  # the third request reused a freed connection


async def test_idle_connection_older_than_idle_timeout_is_not_reused() -> None:
    now = 1000.0
    async with (
        aiohttp_server(created) as (url, seen),
        http_client(url, idle_timeout=30.0, clock=lambda: now) as client,
    ):
        await client.post(PATH, b"a", FORM)
        now += 29.0
        await client.post(PATH, b"b", FORM)  # young enough: same connection
        now += 31.0
        await client.post(PATH, b"c", FORM)
    assert seen.peers[0] == seen.peers[1] != seen.peers[2]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_larger_than_max_body_is_truncated_and_connection_kept(framing: str) -> None:
    big = bytes(range(256)) * 400  # 100 KiB

    async def large(request: web.Request) -> web.StreamResponse:
        if framing == "content-length":
            return web.Response(body=big)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(big), 8192):
            await response.write(big[start : start + 8192])
        await response.write_eof()
        return response

    async with aiohttp_server(large) as (url, seen), http_client(url, max_body=1000) as client:
        first = await client.post(PATH, b"a", FORM)
        second = await client.post(PATH, b"b", FORM)
    assert first.body == second.body == big[:1000]
    assert len(set(seen.peers)) == 1


async def test_body_too_large_to_skip_costs_the_connection_not_the_next_post() -> None:
    huge = b"x" * (3 << 20)

    async def huge_then_small(request: web.Request) -> web.Response:
        return web.Response(body=huge) if await request.read() == b"a" else await created(request)

    async with aiohttp_server(huge_then_small) as (url, seen), http_client(url, max_body=100) as c:
        first = await c.post(PATH, b"a", FORM)
        second = await c.post(PATH, b"b", FORM)
    assert first.body == huge[:100]
    assert second.status == 201
    assert seen.peers[0] != seen.peers[1]


# --- framing -------------------------------------------------------------------------------


async def test_chunked_body_is_decoded_and_connection_kept() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        b"5;name=value\r\nhello\r\n8\r\n, world!\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    async with raw_server(answering(chunked)) as raw, http_client(raw.url) as client:
        first = await client.post(PATH, b"a", FORM)
        second = await client.post(PATH, b"b", FORM)
    assert first.body == second.body == b"hello, world!"
    assert first.headers["transfer-encoding"] == "chunked"
    assert raw.connections == 1


async def test_close_delimited_body_is_read_to_the_end_and_connection_not_reused() -> None:
    body = b"stored\r\n" * 5000

    async def close_delimited(peer: Peer) -> None:
        await peer.read()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for start in range(0, len(body), 7000):
            await peer.send(body[start : start + 7000])
        # returning closes the connection: the end of the body

    async with raw_server(close_delimited) as raw, http_client(raw.url) as client:
        first = await client.post(PATH, b"a", FORM)
        second = await client.post(PATH, b"b", FORM)
    assert first.body == second.body == body
    assert raw.connections == 2


@pytest.mark.parametrize(
    ("response", "kept"),
    [
        (b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 201 Created\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 201 Created\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok", True),
    ],
    ids=["connection-close", "http-1.0", "http-1.0-keep-alive"],
)
async def test_connection_is_reused_only_when_the_server_allows(
    response: bytes, kept: bool
) -> None:
    async def once_unless_kept(peer: Peer) -> None:
        # Answers one request and then, unless the response keeps the connection alive,
        # never again: a client reusing it anyway would time out.
        await peer.read()
        await peer.send(response)
        if kept:
            await answering(response)(peer)
        else:
            await asyncio.Event().wait()

    async with raw_server(once_unless_kept) as raw, http_client(raw.url, timeout=1.0) as client:
        for _ in range(3):
            answer = await client.post(PATH, b"a", FORM)
            assert (answer.status, answer.body) == (201, b"ok")
    assert raw.connections == (1 if kept else 3)


async def test_interim_responses_are_skipped() -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nyes"
    )
    async with raw_server(answering(interim)) as raw, http_client(raw.url) as client:
        responses = [await client.post(PATH, b"a", FORM) for _ in range(2)]
    assert [(r.status, r.body) for r in responses] == [(201, b"yes")] * 2
    assert "link" not in responses[0].headers
    assert raw.connections == 1


async def test_204_has_no_body_even_without_a_length() -> None:
    async with (
        raw_server(answering(b"HTTP/1.1 204 No Content\r\nX-Id: 1\r\n\r\n")) as raw,
        http_client(raw.url, timeout=1.0) as client,
    ):
        responses = [await client.post(PATH, b"a", FORM) for _ in range(2)]
    assert [(r.status, r.body) for r in responses] == [(204, b"")] * 2
    assert raw.connections == 1


async def test_bytes_after_a_response_do_not_leak_into_the_next_one() -> None:
    overlong = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 500 Stray\r\n\r\n"
    dropped = asyncio.Event()

    async def overlong_answers(peer: Peer) -> None:
        await peer.read()
        await peer.send(overlong)
        if await peer.read() is None:
            dropped.set()

    async with raw_server(overlong_answers) as raw, http_client(raw.url) as client:
        first = await client.post(PATH, b"a", FORM)
        await asyncio.wait_for(dropped.wait(), 1.0)  # out of step: closed, not pooled
        second = await client.post(PATH, b"b", FORM)
    assert [(r.status, r.body) for r in (first, second)] == [(201, b"ok")] * 2
    assert raw.connections == 2


async def test_bytes_sent_to_an_idle_connection_get_it_closed() -> None:
    idle, dropped = asyncio.Event(), asyncio.Event()

    async def times_out_idle_connection(peer: Peer) -> None:
        await peer.read()
        await peer.send(OK)
        if peer.number == 1:
            await idle.wait()
            await peer.send(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            if await peer.read() is None:
                dropped.set()
        else:
            await answering(OK)(peer)

    async with raw_server(times_out_idle_connection) as raw, http_client(raw.url) as client:
        await client.post(PATH, b"a", FORM)
        idle.set()
        await asyncio.wait_for(dropped.wait(), 1.0)  # released at once, not left open
        assert (await client.post(PATH, b"b", FORM)).status == 201
    assert raw.connections == 2


async def test_repeated_headers_are_joined() -> None:
    response = (
        b"HTTP/1.1 429 Too Many Requests\r\nVary: Accept\r\nRetry-After: 5\r\n"
        b"vary: Cookie\r\nContent-Length: 0\r\n\r\n"
    )
    async with raw_server(answering(response)) as raw, http_client(raw.url) as client:
        answer = await client.post(PATH, b"a", FORM)
    assert answer.headers == {"vary": "Accept, Cookie", "retry-after": "5", "content-length": "0"}


# --- stale keep-alive connections ----------------------------------------------------------


async def test_server_closing_an_idle_connection_does_not_fail_the_next_post() -> None:
    closed = asyncio.Event()

    async def one_per_connection(peer: Peer) -> None:
        await peer.read()
        await peer.send(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        if peer.number == 1:
            closed.set()  # closes the kept-alive connection, as gunicorn does after 2 s

    async with raw_server(one_per_connection) as raw, http_client(raw.url) as client:
        await client.post(PATH, b"a", FORM)
        await closed.wait()
        await asyncio.sleep(0.01)
        response = await client.post(PATH, b"b", FORM)
    assert response.status == 201
    assert [body for _, _, body in raw.requests] == [b"a", b"b"]


async def test_request_crossing_a_closing_idle_connection_is_sent_again() -> None:
    async def closes_second_request_unanswered(peer: Peer) -> None:
        await peer.read()
        await peer.send(OK)
        if peer.number == 1:
            await peer.read()  # the server gave up on the connection as the request arrived

    async with raw_server(closes_second_request_unanswered) as raw, http_client(raw.url) as c:
        await c.post(PATH, b"a", FORM)
        response = await c.post(PATH, b"b", FORM)
    assert response.status == 201
    assert [(n, body) for n, _, body in raw.requests] == [(1, b"a"), (1, b"b"), (2, b"b")]


async def test_reused_connection_failing_mid_response_is_not_sent_again() -> None:
    async def breaks_off_second_answer(peer: Peer) -> None:
        await peer.read()
        await peer.send(OK)
        await peer.read()
        await peer.send(b"HTTP/1.1 201 Cre")

    async with raw_server(breaks_off_second_answer) as raw, http_client(raw.url) as client:
        await client.post(PATH, b"a", FORM)
        with pytest.raises(ReadError, match="mid-response") as raised:
            await client.post(PATH, b"b", FORM)
    assert raised.value.maybe_sent  # the server may have stored it: counted as a duplicate risk
    assert [body for _, _, body in raw.requests] == [b"a", b"b"]


@pytest.mark.parametrize("ending", ["close", "reset"])
async def test_fresh_connection_closed_unanswered_raises_without_retrying(ending: str) -> None:
    async def unanswered(peer: Peer) -> None:
        await peer.read()
        if ending == "reset":
            peer.reset()

    async with raw_server(unanswered) as raw, http_client(raw.url) as client:
        with pytest.raises(ReadError) as raised:
            await client.post(PATH, b"a", FORM)
    assert raised.value.maybe_sent
    assert raw.connections == len(raw.requests) == 1


# --- broken servers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "complaint"),
    [
        (b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n", "status line 'HTTP/1.1 OK'"),
        (b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n", "status line 'HTTP/2 200 OK'"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "header line 'No colon here'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n", "header line 'Content-Length : 0'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "Content-Length 'ten'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "Content-Length '1, 2'"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
            "chunk size line b'zz'",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            "chunk data longer",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * MAX_HEAD + b"\r\n\r\n",
            f"response head larger than {MAX_HEAD} bytes",
        ),
        (  # and no end in sight: refused at once rather than buffered until the timeout
            b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * MAX_HEAD,
            f"response head larger than {MAX_HEAD} bytes",
        ),
    ],
    ids=[
        "no-code",
        "http-2",
        "header",
        "header-space",
        "length",
        "lengths",
        "chunk-size",
        "chunk-data",
        "huge-head",
        "endless-head",
    ],
)
async def test_broken_http_raises_http_error_and_spares_the_next_post(
    response: bytes, complaint: str
) -> None:
    dropped = asyncio.Event()

    async def broken_then_fine(peer: Peer) -> None:
        await peer.read()
        await peer.send(response if peer.number == 1 else OK)
        if await peer.read() is None and peer.number == 1:
            dropped.set()

    async with raw_server(broken_then_fine) as raw, http_client(raw.url) as client:
        with pytest.raises(ProtocolError, match=re.escape(complaint)) as raised:
            await client.post(PATH, b"a", FORM)
        assert isinstance(raised.value, OSError)
        await asyncio.wait_for(dropped.wait(), 1.0)  # the client closed the broken connection
        assert (await client.post(PATH, b"b", FORM)).status == 201
    assert raw.connections == 2


async def test_silent_server_times_out_and_the_next_post_uses_a_new_connection() -> None:
    dropped = asyncio.Event()

    async def silent_first(peer: Peer) -> None:
        await peer.read()
        if peer.number == 1:
            if await peer.read() is None:
                dropped.set()
            return
        await peer.send(OK)

    async with raw_server(silent_first) as raw, http_client(raw.url, timeout=0.2) as client:
        with pytest.raises(ReadTimeout) as raised:
            await client.post(PATH, b"a", FORM)
        assert isinstance(raised.value, TimeoutError) and raised.value.maybe_sent
        await asyncio.wait_for(dropped.wait(), 1.0)  # the client closed the silent connection
        assert (await client.post(PATH, b"b", FORM)).status == 201
    assert raw.connections == 2


async def test_connection_refused_is_an_os_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with http_client(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(ConnectError) as raised:
            await client.post(PATH, b"a", FORM)
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    assert not raised.value.maybe_sent  # never sent: a resend cannot duplicate it


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1 and localhost signed by a test CA, and
    a client context trusting only that CA."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: Any
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if issuer is None:
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("dsmr-logger test CA", ca_key, None, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = certificate("127.0.0.1", server_key, ca.subject, ca_key)

    directory: Path = tmp_path_factory.mktemp("tls")
    (directory / "server.pem").write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
        + server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "server.pem")
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


async def test_tls_certificate_is_verified_by_default(
    tls_files: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_tls, _ = tls_files
    async with raw_server(answering(OK), tls=server_tls) as raw, http_client(raw.url) as client:
        with pytest.raises(ConnectError) as raised:
            await client.post(PATH, b"a", FORM)
    assert isinstance(raised.value.__cause__, ssl.SSLCertVerificationError)
    assert raw.requests == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_tls_with_a_trusted_ca_works(
    tls_files: tuple[ssl.SSLContext, ssl.SSLContext], host: str
) -> None:
    server_tls, client_tls = tls_files
    async with raw_server(answering(OK), tls=server_tls) as raw:
        url = raw.url.replace("127.0.0.1", host)
        async with http_client(url, ssl_context=client_tls) as client:
            responses = [await client.post(PATH, TELEGRAM, FORM) for _ in range(3)]
    assert [response.status for response in responses] == [201] * 3
    assert [body for _, _, body in raw.requests] == [TELEGRAM] * 3
    assert raw.connections == 1


async def test_tls_without_verification_accepts_an_unknown_certificate(
    tls_files: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_tls, _ = tls_files
    async with (
        raw_server(answering(OK), tls=server_tls) as raw,
        http_client(raw.url, verify_tls=False) as client,
    ):
        assert (await client.post(PATH, b"a", FORM)).status == 201


# --- misuse --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.org/",
        "http://",
        "example.org:8000",
        "http://example.org:port/",
        "http://[::1",
    ],
)
def test_bad_base_url_is_refused_by_name(url: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        HttpClient(url, timeout=1.0)


async def test_post_after_close_raises() -> None:
    async with aiohttp_server(created) as (url, seen):
        client = HttpClient(url, timeout=1.0)
        await client.post(PATH, b"a", FORM)
        await client.close()
        await client.close()
        with pytest.raises(RuntimeError):
            await client.post(PATH, b"b", FORM)
    assert seen.bodies == [b"a"]


# --- GET and per-request headers (sources that poll, cloud imports) --------------------------


async def test_get_sends_query_and_per_request_headers_on_one_connection() -> None:
    async def json_answer(request: web.Request) -> web.Response:
        return web.json_response({"q": request.query_string, "auth": request.headers["X-Token"]})

    async with aiohttp_server(json_answer) as (url, seen), http_client(url) as client:
        first = await client.get("/current-sample?x=1&y=a%2Bb", headers={"X-Token": "one"})
        second = await client.get("/current-sample", headers={"X-Token": "two"})
    assert first.status == 200 and b'"q": "x=1&y=a%2Bb"' in first.body
    assert b'"auth": "one"' in first.body and b'"auth": "two"' in second.body
    assert [r.method for r in seen.requests] == ["GET", "GET"]
    assert seen.bodies == [b"", b""]
    assert len(set(seen.peers)) == 1  # kept alive between polls


@pytest.mark.parametrize("name", ["Host", "Content-Length", "Bad Name"])
async def test_a_request_header_the_client_owns_or_that_is_malformed_is_refused(
    name: str,
) -> None:
    async with http_client("http://127.0.0.1:9") as client:
        with pytest.raises(ValueError, match="header name"):
            await client.get("/", headers={name: "x"})


async def test_a_header_value_with_a_line_break_is_refused_without_echoing_it() -> None:
    async with http_client("http://127.0.0.1:9") as client:
        with pytest.raises(ValueError) as raised:
            await client.get("/", headers={"Authorization": "Bearer s3cret\r\nX-Evil: 1"})
    assert "s3cret" not in str(raised.value)


async def test_a_request_that_waits_for_a_pool_slot_and_times_out_was_not_sent() -> None:
    release = asyncio.Event()

    async def held(peer: Peer) -> None:
        await peer.read()
        await release.wait()
        await peer.send(OK)

    async with raw_server(held) as raw, http_client(raw.url, timeout=0.3) as client:
        # The first holds the one connection well past the second's deadline, however slow
        # the machine: the second can only wait for it, and time out waiting.
        first = asyncio.ensure_future(client.post(PATH, b"a", FORM, timeout=60))
        await wait_until(lambda: len(raw.requests) == 1, "the first request at the server")
        with pytest.raises(ConnectTimeout) as raised:
            await client.post(PATH, b"b", FORM)
        assert not raised.value.maybe_sent
        release.set()
        assert (await first).status == 201
    assert [body for _, _, body in raw.requests] == [b"a"]


# --- Happy Eyeballs: a dead first address -------------------------------------------------------


@asynccontextmanager
async def dead_v4_live_v6(
    monkeypatch: pytest.MonkeyPatch, answer: Callable[[web.Request], Awaitable[web.Response]]
) -> AsyncIterator[tuple[str, Seen]]:
    """A name whose first address is black-holed and whose second one serves.

    127.0.0.1:PORT is a listener whose accept queue is full, so the kernel drops every further
    SYN, exactly as a dead address (a stale AAAA record, a host that went away) does; [::1]:PORT
    is an aiohttp server. The name ``dual.test`` resolves to both, the dead one first: the
    resolution is the test's (the loop's ``getaddrinfo``), the connections are real.
    """
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # the one place in the queue
    probe = socket.socket()
    probe.settimeout(0.3)
    with pytest.raises(TimeoutError):  # the black hole works: a connect gets no answer at all
        probe.connect(("127.0.0.1", port))
    probe.close()
    seen = Seen()

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.requests.append(request)
        seen.bodies.append(await request.read())
        return await answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def resolve(host: Any, service: Any, **hints: Any) -> Any:
        if host != "dual.test":
            return await real(host, service, **hints)
        stream, tcp = socket.SOCK_STREAM, socket.IPPROTO_TCP
        return [
            (socket.AF_INET, stream, tcp, "", ("127.0.0.1", int(service))),
            (socket.AF_INET6, stream, tcp, "", ("::1", int(service), 0, 0)),
        ]

    try:
        await web.TCPSite(runner, "::1", port).start()
        monkeypatch.setattr(loop, "getaddrinfo", resolve)
        yield f"http://dual.test:{port}", seen
    finally:
        await runner.cleanup()
        filler.close()
        listener.close()


async def test_a_black_holed_first_address_costs_a_moment_not_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connections race the addresses as RFC 8305 says: the live one is tried 0.25 s after the
    dead one, so the post succeeds long before the client's 20 s timeout."""
    async with (
        dead_v4_live_v6(monkeypatch, created) as (url, seen),
        http_client(url, timeout=20.0) as client,
    ):
        async with asyncio.timeout(5.0):  # a quarter of the timeout a dead address would cost
            response = await client.post(PATH, TELEGRAM, FORM)
        assert response.status == 201
        assert seen.bodies == [TELEGRAM]
        assert seen.requests[0].host == url.removeprefix("http://")


async def test_without_happy_eyeballs_the_dead_address_takes_the_whole_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: connecting one address after the other, the black hole swallows the post
    (so the test above proves the racing, not a lucky setup)."""
    monkeypatch.setattr("dsmr_logger.net.http.HAPPY_EYEBALLS_DELAY", None)
    async with (
        dead_v4_live_v6(monkeypatch, created) as (url, seen),
        http_client(url, timeout=1.0) as client,
    ):
        with pytest.raises(ConnectTimeout):
            await client.post(PATH, TELEGRAM, FORM)
        assert seen.bodies == []
