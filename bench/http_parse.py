#!/usr/bin/env python3
"""Should the HTTP client parse responses with h11? Its CPU and memory against ours, one run.

Why: issue 11 asks whether h11 (the sans-I/O HTTP/1.1 library under httpx) should replace the
response parsing of ``dsmr_logger/net/http.py`` if it keeps the measured CPU and RSS. The
transport, pooling and timeouts would stay the same either way, so this times only what would
change, per request: building the request bytes and parsing one DSMR-reader answer (a Django
``201 Created`` with the headers a real server sends), on a kept-alive connection.

- baseline: ``h11.Connection`` (client role): ``send`` Request + Data + EndOfMessage, then
  ``receive_data`` and ``next_event`` until EndOfMessage, then ``start_next_cycle``;
- ours: the head built once per path (``HttpClient._head``) formatted with the body, and
  ``_Connection.read_response`` over the buffered answer (driven without an event loop: the
  whole answer is in the buffer, so the coroutine never suspends).

Memory: RSS of a fresh interpreter after importing ``dsmr_logger.net.http``, and after also
importing ``h11``. Not a test; nothing is asserted. Usage: ``python bench/http_parse.py``
(needs ``pip install h11``; a few seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import h11  # noqa: E402

from dsmr_logger.net.http import HttpClient, _Connection  # noqa: E402

PATH = "/api/v1/datalogger/dsmrreading"
BODY = b"telegram=" + b"x" * 1200  # a form-encoded 778-byte telegram is about this long
ANSWER = (
    b"HTTP/1.1 201 Created\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Fri, 04 Dec 2026 20:00:00 GMT\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 2\r\n"
    b"Connection: keep-alive\r\n"
    b"Vary: Accept, Cookie\r\n"
    b"Allow: POST, OPTIONS\r\n"
    b"X-Frame-Options: DENY\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Referrer-Policy: same-origin\r\n"
    b"\r\n{}"
)


class _Transport(asyncio.Transport):
    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def ours() -> Callable[[], int]:
    client = HttpClient("http://127.0.0.1:8000", timeout=5.0, headers={"Authorization": "Token k"})
    head = client._head(PATH, "application/x-www-form-urlencoded")
    connection = _Connection()
    connection.connection_made(_Transport())

    def one() -> int:
        request = b"%b%d\r\n\r\n%b" % (head, len(BODY), BODY)
        connection.send(request)
        connection.buffer += ANSWER
        coroutine = connection.read_response(64 * 1024)
        try:
            coroutine.send(None)
        except StopIteration as done:
            response, keep = done.value
            return int(response.status) + int(keep)
        raise AssertionError("the parser waited for bytes that were already there")

    return one


def baseline() -> Callable[[], int]:
    connection = h11.Connection(h11.CLIENT)
    headers = [
        ("Host", "127.0.0.1:8000"),
        ("Authorization", "Token k"),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Content-Length", str(len(BODY))),
    ]

    def one() -> int:
        out = connection.send(h11.Request(method="POST", target=PATH, headers=headers))
        out += connection.send(h11.Data(data=BODY))  # type: ignore[operator]
        out += connection.send(h11.EndOfMessage())  # type: ignore[operator]
        connection.receive_data(ANSWER)
        status = 0
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
        connection.start_next_cycle()
        return status + 1

    return one


def per_call(function: Callable[[], int], number: int, repeat: int) -> float:
    assert function() == 202, "both must read 201 on a connection kept alive"
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number


_RSS_PROBE = """
import sys
sys.path.insert(0, {root!r})
import dsmr_logger.net.http
{extra}
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]))
"""


def rss_kib(extra: str) -> int:
    code = _RSS_PROBE.format(root=str(REPO_ROOT), extra=extra)
    return int(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"python {platform.python_version()}, h11 {h11.__version__}, {platform.machine()}")
    theirs = per_call(baseline(), args.number, args.repeat)
    mine = per_call(ours(), args.number, args.repeat)
    print(f"build request + parse answer, h11 (baseline): {theirs * 1e6:7.2f} µs")
    print(f"build request + parse answer, ours:           {mine * 1e6:7.2f} µs")
    print(f"ratio ours / h11: {mine / theirs:.2f}")
    alone = min(rss_kib("") for _ in range(3))
    with_h11 = min(rss_kib("import h11") for _ in range(3))
    print(
        f"RSS after import: client {alone} KiB, client + h11 {with_h11} KiB "
        f"(+{with_h11 - alone} KiB)"
    )


if __name__ == "__main__":
    main()
