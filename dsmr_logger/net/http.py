"""The project's one HTTP/1.1 client: lean, keep-alive, and honest about what may have arrived.

Why not aiohttp: on a Raspberry Pi the daemon posts one telegram a second, every second, for
years. An ``aiohttp.ClientSession`` costs about 380-800 µs of CPU per post and 12 MiB of RSS per
daemon; this client costs a fraction of that because it does only what DSMR-reader's API needs:
``POST`` with a request head built once per path, one response read on a pooled keep-alive
connection (``Content-Length``, chunked or close-delimited bodies), TLS, and nothing else (no
cookies, redirects, proxies, compression or streaming). Sources that poll a device on the LAN
and the cloud imports use it too (``get``, ``request``): one client, one set of failure kinds.

Failures are mapped, as httpx does, into a small hierarchy that tells the caller what it needs to
know for at-least-once delivery: ``ConnectError`` (and ``ConnectTimeout``) — the request was never
sent, resending cannot duplicate it; ``ReadTimeout`` and ``ReadError`` — it was sent and the
answer did not (completely) arrive, so the server may have stored it; ``ProtocolError`` — the
server answered, but not in HTTP/1.1. All are ``OSError``s (``ReadTimeout`` and ``ConnectTimeout``
also ``TimeoutError``s). Connections to a host with several addresses race them as RFC 8305's
Happy Eyeballs does (a dead AAAA record costs 0.25 s, not a whole timeout).

It reads with an ``asyncio.Protocol`` rather than streams: the response usually arrives in one
segment and is parsed from one buffer without a stream reader's per-line awaits, and the client
knows exactly whether any response byte arrived, which decides if a request that failed on a
reused connection may be sent again.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import SplitResult, urlsplit

MAX_HEAD = 64 * 1024  # response head (and any framing line) larger than this → HttpError
MAX_DISCARD = 1024 * 1024  # body bytes past max_body read and dropped to keep the connection
RECV_SIZE = 16 * 1024
_OWN_HEADERS = frozenset({"host", "content-type", "content-length", "transfer-encoding"})

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([1-9][0-9]{2})(?: .*)?", re.DOTALL)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?", re.DOTALL)
_CREDENTIALS = re.compile(r"(\w+://)[^/?#@\s]*@")
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names lower-cased; repeated headers joined with ", "
    body: bytes  # at most max_body bytes

    def json(self, **options: Any) -> Any:
        """The body as JSON (``parse_json``): ``ValueError`` when it is not."""
        return parse_json(self.body, **options)


def parse_json(body: bytes, **options: Any) -> Any:
    """``body`` as a JSON document (``options`` as ``json.loads`` takes them); ``ValueError`` for
    anything else.

    An answer is input from the network. Malformed text and bytes that are not UTF-8 are
    ``ValueError``s already; two more failures are not, and would end the task reading the
    answer: nesting deeper than Python's decoder recurses (``RecursionError``: a 64 KiB body of
    ``[`` nests 65,536 deep, the limit is 1,000), and a number a ``parse_float`` hook cannot hold
    (``Decimal("1e99999999999999999999")`` raises ``decimal.InvalidOperation``).
    """
    try:
        return json.loads(body, **options)
    except RecursionError:
        raise ValueError("JSON nested deeper than it can be read") from None
    except ArithmeticError as exc:
        raise ValueError(f"a number that cannot be held ({type(exc).__name__})") from None


class HttpError(OSError):
    """A request got no usable answer. An OSError so callers handle it like any failed delivery;
    the subclass says whether it may have reached the server."""

    maybe_sent = True
    """False only when the request certainly never left this machine."""


class ConnectError(HttpError):
    """Not sent: no connection (refused, unreachable, name unknown, TLS handshake failed)."""

    maybe_sent = False


class ConnectTimeout(ConnectError, TimeoutError):
    """Not sent: no connection (or free pool slot) within the timeout."""


class ReadError(HttpError):
    """Sent, then the connection broke before the whole answer came: maybe stored."""


class ReadTimeout(HttpError, TimeoutError):
    """Sent, and no whole answer within the timeout: maybe stored."""


class ProtocolError(HttpError):
    """The server broke HTTP/1.1 (malformed status line, headers or chunk framing, headers too
    large): it answered, so the request arrived."""


class _Connection(asyncio.Protocol):
    """One connection. It buffers what arrives; the response parser takes from the buffer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.eof = False
        self.error: OSError | None = None
        self.received = False  # a response byte arrived since the request went out
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # asyncio reads 256 KiB at a time by default: an allocation that size per answer of a
        # few hundred bytes.
        self.transport.max_size = RECV_SIZE  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received = True
        if self.waiter is None:  # nobody asked: a server talking out of turn is out of step
            self.transport.close()
        else:
            self._wake()

    def eof_received(self) -> None:
        self.eof = True
        self._wake()  # returning None closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc if isinstance(exc, OSError) else ConnectionError(f"lost: {exc!r}")
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def usable(self) -> bool:
        """Still open and in step (nothing unread), so it can carry another request."""
        return not self.transport.is_closing() and not self.buffer

    def send(self, request: bytes) -> None:
        self.received = False
        self.transport.write(request)

    async def more(self) -> None:
        """Wait for more bytes; raises when none can come (the server closed or reset)."""
        if self.eof:
            moment = "mid-response" if self.received else "before answering"
            raise self.error or ConnectionError(f"server closed the connection {moment}")
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self.more()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def skip(self, n: int) -> None:
        while n > len(self.buffer):
            n -= len(self.buffer)
            self.buffer.clear()
            await self.more()
        del self.buffer[:n]

    async def read_until(self, separator: bytes, what: str) -> bytes:
        """The bytes before separator (consumed too), refusing more than MAX_HEAD of them."""
        while (end := self.buffer.find(separator)) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise ProtocolError(f"{what} larger than {MAX_HEAD} bytes")
            await self.more()
        if end > MAX_HEAD:
            raise ProtocolError(f"{what} larger than {MAX_HEAD} bytes")
        data = bytes(self.buffer[:end])
        del self.buffer[: end + len(separator)]
        return data

    async def read_response(self, max_body: int) -> tuple[Response, bool]:
        """The final response, and whether the connection may carry another request."""
        minor, status, headers = await self.read_head()
        while status < 200:  # 1xx interim responses (100 Continue, 103 Early Hints)
            minor, status, headers = await self.read_head()
        tokens = {token.strip() for token in headers.get("connection", "").lower().split(",")}
        keep_alive = "close" not in tokens if minor == "1" else "keep-alive" in tokens
        if status in (204, 304):
            body, complete = b"", True
        elif "transfer-encoding" in headers:
            if headers["transfer-encoding"].lower().rsplit(",", 1)[-1].strip() == "chunked":
                body, complete = await self.read_chunked(max_body)
            else:  # another final coding: the body ends when the server closes
                body, complete = await self.read_until_eof(max_body)
        elif "content-length" in headers:
            body, complete = await self.read_sized(
                _content_length(headers["content-length"]), max_body
            )
        else:
            body, complete = await self.read_until_eof(max_body)
        return Response(status, headers, body), keep_alive and complete

    async def read_head(self) -> tuple[str, int, dict[str, str]]:
        head = await self.read_until(b"\r\n\r\n", "response head")
        lines = head.decode("latin-1").split("\r\n")  # str methods beat a regex per line
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            raise ProtocolError(f"malformed status line {lines[0][:200]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or " " in name or "\t" in name:
                raise ProtocolError(f"malformed header line {line[:200]!r}")
            name, value = name.lower(), value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return status_line[1], int(status_line[2]), headers

    async def read_sized(self, length: int, max_body: int) -> tuple[bytes, bool]:
        """A Content-Length body; a rest past max_body too large to skip costs the connection."""
        keep = min(length, max_body)
        body = await self.take(keep)
        if length - keep > MAX_DISCARD:
            return body, False
        await self.skip(length - keep)
        return body, True

    async def read_chunked(self, max_body: int) -> tuple[bytes, bool]:
        body = bytearray()
        discarded = 0
        while True:
            line = await self.read_until(b"\r\n", "chunk size line")
            size_field = _CHUNK_SIZE.fullmatch(line)
            if size_field is None:
                raise ProtocolError(f"malformed chunk size line {line[:200]!r}")
            size = int(size_field[1], 16)
            if size == 0:
                break
            keep = min(size, max_body - len(body))
            body += await self.take(keep)
            discarded += size - keep
            if discarded > MAX_DISCARD:
                return bytes(body), False
            await self.skip(size - keep)
            if await self.take(2) != b"\r\n":
                raise ProtocolError("chunk data longer than its declared size")
        while await self.read_until(b"\r\n", "trailer line"):
            pass  # trailer fields are not needed
        return bytes(body), True

    async def read_until_eof(self, max_body: int) -> tuple[bytes, bool]:
        """A body that ends when the server closes; the connection is never reused."""
        while len(self.buffer) < max_body and not self.eof:
            await self.more()
        if self.error is not None:
            raise self.error  # a reset, not the end of the body
        body = bytes(self.buffer[:max_body])
        self.buffer.clear()
        return body, False


def _content_length(value: str) -> int:
    lengths = {length.strip() for length in value.split(",")}  # "5, 5" from repeated headers
    length = lengths.pop()
    if lengths or not (length.isascii() and length.isdecimal()):
        raise ProtocolError(f"malformed Content-Length {value[:200]!r}")
    return int(length)


HAPPY_EYEBALLS_DELAY = 0.25
"""Seconds before the next address of a host is tried beside the first (RFC 8305 suggests 0.25)."""


def tls_context(verify_tls: bool = True, ca_file: str | None = None) -> ssl.SSLContext:
    """Certificates verified (against ``ca_file`` when given, else the system's store) unless
    the user turned verification off."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify_tls:  # a self-signed certificate on the LAN, by explicit choice
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class HttpClient:
    """POSTs to one server over a pool of keep-alive HTTP/1.1 connections.

    Up to ``max_connections`` posts run at once, each on its own connection; more wait their
    turn in arrival order. ``timeout`` bounds a whole post: the wait for a free connection,
    connecting, the TLS handshake, sending and reading the complete response. Servers close idle
    keep-alive connections whenever they like, so a request that finds its reused connection
    closed before any answer is sent once more on a new one (delivery is at-least-once anyway).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        max_connections: int = 1,
        headers: Mapping[str, str] | None = None,
        verify_tls: bool = True,
        idle_timeout: float = 30.0,
        max_body: int = 64 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``server_hostname``: the name the server's certificate must carry when it is not the
        URL's host (a device whose certificate names its serial number)."""
        try:
            parts, host_header = check_base_url(base_url)
        except ValueError as exc:
            raise ValueError(f"bad base URL {redact_url(base_url)!r}: {exc}") from None
        host, port = str(parts.hostname), parts.port
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        default_port = 443 if parts.scheme == "https" else 80
        if port is None:
            port = default_port
        elif port != default_port:
            host_header = f"{host_header}:{port}"
        fields = {"Host": host_header, **(headers or {})}
        for name in headers or ():
            if not _TOKEN.fullmatch(name) or name.lower() in _OWN_HEADERS:
                raise ValueError(f"header name {name!r} is invalid or set by the client itself")
        self._fixed_fields = "".join(f"{name}: {_field_value(v)}\r\n" for name, v in fields.items())
        self._host, self._port, self._prefix = host, port, parts.path.rstrip("/")
        self._server_hostname = server_hostname or host
        self._ssl = (ssl_context or tls_context(verify_tls)) if parts.scheme == "https" else None
        self._timeout, self._idle_timeout, self._max_body = timeout, idle_timeout, max_body
        self._clock = clock
        self._slots = asyncio.Semaphore(max_connections)  # FIFO: waiters are served in order
        self._idle: list[_Connection] = []  # most recently used last
        self._heads: dict[tuple[str, str], bytes] = {}
        self._closed = False

    async def post(
        self, path: str, body: bytes, content_type: str, *, timeout: float | None = None
    ) -> Response:
        """POST body to the base URL's path + path (which starts with "/").

        Raises an ``HttpError`` subclass: ``ConnectError``/``ConnectTimeout`` (not sent) or
        ``ReadError``/``ReadTimeout``/``ProtocolError`` (sent: maybe stored). The client's
        ``timeout`` (or this request's) bounds it all, the wait for a free connection included.
        """
        request = b"%b%d\r\n\r\n%b" % (self._head(path, content_type), len(body), body)
        return await self._send(request, timeout)

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        """GET the base URL's path + path (a query string may follow); errors as ``post``."""
        return await self.request("GET", path, headers=headers)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Any request, with headers for this one request only (a renewed token, ``Accept``)."""
        if not _TOKEN.fullmatch(method):
            raise ValueError(f"bad method {method!r}")
        lines = [f"{method} {self._target(path)} HTTP/1.1\r\n{self._fixed_fields}"]
        for name, value in (headers or {}).items():
            if not _TOKEN.fullmatch(name) or name.lower() in _OWN_HEADERS:
                raise ValueError(f"header name {name!r} is invalid or set by the client itself")
            lines.append(f"{name}: {_field_value(value)}\r\n")
        if content_type is not None:
            lines.append(f"Content-Type: {_field_value(content_type)}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        request = "".join(lines).encode("latin-1") + b"\r\n" + (body or b"")
        return await self._send(request)

    async def _send(self, request: bytes, timeout: float | None = None) -> Response:
        if self._closed:
            raise RuntimeError("request on a closed HttpClient")
        attempt = _Attempt()
        timeout = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout), self._slots:
                reused = self._idle_connection()
                if reused is not None:
                    try:
                        return await self._exchange(reused, request, attempt)
                    except ReadError:
                        if reused.received:  # the server answered in part: it may have acted
                            raise
                        attempt.sent = False  # closed before answering: a stale keep-alive
                return await self._exchange(await self._connect(), request, attempt)
        except TimeoutError as exc:
            if isinstance(exc, HttpError):
                raise
            if attempt.sent:
                raise ReadTimeout(f"no answer within {timeout:g} s") from exc
            raise ConnectTimeout(f"no connection within {timeout:g} s") from exc

    async def close(self) -> None:
        """Close the idle connections; posts still running close theirs when they finish."""
        self._closed = True
        while self._idle:
            self._idle.pop().transport.close()

    def _target(self, path: str) -> str:
        target = self._prefix + path
        printable = target.isascii() and target.isprintable() and " " not in target
        if not path.startswith("/") or not printable:
            raise ValueError(f"bad request path {path!r}")
        return target

    def _head(self, path: str, content_type: str) -> bytes:
        """The request head up to Content-Length's value, built once per path and type."""
        head = self._heads.get((path, content_type))
        if head is None:
            target = self._target(path)
            head = (
                f"POST {target} HTTP/1.1\r\n{self._fixed_fields}"
                f"Content-Type: {_field_value(content_type)}\r\nContent-Length: "
            ).encode("latin-1")
            self._heads[path, content_type] = head
        return head

    def _idle_connection(self) -> _Connection | None:
        """The most recently used pooled connection still fit for reuse; unfit ones are closed."""
        now = self._clock()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since <= self._idle_timeout and connection.usable():
                return connection
            connection.transport.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            _, connection = await asyncio.get_running_loop().create_connection(
                _Connection,
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._server_hostname if self._ssl else None,
                happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
            )
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise ConnectError(_describe(exc)) from exc
        return connection

    async def _exchange(
        self, connection: _Connection, request: bytes, attempt: _Attempt
    ) -> Response:
        try:
            attempt.sent = True
            connection.send(request)
            response, reusable = await connection.read_response(self._max_body)
        except HttpError:
            connection.transport.close()
            raise
        except OSError as exc:  # reset or closed: after sending, the server may have acted
            connection.transport.close()
            raise ReadError(_describe(exc)) from exc
        except BaseException:  # timeouts (cancellation) too: a half-read connection is useless
            connection.transport.close()
            raise
        if reusable and connection.usable() and not self._closed:
            connection.idle_since = self._clock()
            self._idle.append(connection)
        else:
            connection.transport.close()
        return response


@dataclass(slots=True)
class _Attempt:
    """How far one request got: sent (maybe stored) or not."""

    sent: bool = False


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def check_base_url(url: str) -> tuple[SplitResult, str]:
    """The rule a base URL must meet, and its ``Host`` header (the host IDNA-encoded).

    The configuration checks sink URLs with this same function before anything starts, so a URL
    that passes there cannot fail here. Messages never repeat the URL: it may carry a password.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[::1": an unclosed IPv6 bracket
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not contain a user name or password (user:password@host)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("must not contain a query (?...) or fragment (#...)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        raise ValueError("port must be a number from 1 to 65535")
    host = parts.hostname
    if not host:
        raise ValueError("has no host name")
    host_header = wire_host(host)
    if not (parts.path.isascii() and parts.path.isprintable() and " " not in parts.path):
        raise ValueError("path must be printable ASCII without spaces (percent-encode others)")
    return parts, host_header


def wire_host(host: str) -> str:
    """``host`` (as ``urlsplit`` gives it, without brackets) as it goes on the wire: an IPv6
    literal in brackets, a name IDNA-encoded; ValueError when it is neither. Every address the
    configuration takes (sink URLs, ``socket://``, MQTT brokers, Wi-Fi dongles) is checked with
    this rule, so a host name with a space is a mistake named at start, not a failed lookup
    retried for ever."""
    if ":" in host:  # an IPv6 literal, written [::1]
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise ValueError("has an invalid IPv6 address in [...]") from None
        return f"[{host}]"
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("has an invalid host name") from None
    if not _HOST.fullmatch(encoded):
        raise ValueError("has an invalid host name (letters, digits, '-' and '.' only)")
    return encoded


def basic_auth(username: str, password: str) -> str:
    """The ``Authorization`` header value of HTTP Basic authentication (RFC 7617, UTF-8)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``****@``, for messages and logs."""
    return _CREDENTIALS.sub(r"\1****@", url)


def field_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as a header value, or None. HTTP/1.1 carries Latin-1 bytes
    with no control characters but tab (RFC 9110, section 5.5). The configuration checks API
    keys with this same function; the message never repeats the value (it may be a key)."""
    if any(char in value for char in "\r\n\0"):
        return "contains a line break or NUL"
    if not value.isascii() and any(ord(char) > 0xFF for char in value):
        return "contains a character outside Latin-1, which an HTTP header cannot carry"
    if any((ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F for char in value):
        return "contains a control character"
    return None


def _field_value(value: str) -> str:
    problem = field_value_problem(value)
    if problem is not None:
        raise ValueError(f"a header value {problem}")
    return value
