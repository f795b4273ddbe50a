"""Baseline clients for the budget benchmarks, each run as its own process (not a benchmark).

Why a separate process: the baselines are charged with their own CPU only, read from their own
process clock, exactly as the daemon is.

- ``requests``: DSMR-reader's remote-datalogger script, ``requests.post(url, headers=...,
  data={'telegram': telegram}, timeout=...)`` per telegram with no session, so a new TCP
  connection per post. ``requests`` is installed into the venv for the benchmarks only.
- ``aiohttp``: one keep-alive ``aiohttp.ClientSession``, one post at a time (the ceiling of a
  sequential keep-alive client such as the daemon's sink).
- ``raw``: a prototype, not a baseline: the same request bytes written on one keep-alive
  ``asyncio`` stream with a prebuilt header and a minimal response parser (status line,
  ``Content-Length``), to measure what a leaner HTTP path would save.
- ``saturating``: ``--connections`` raw clients at once, to measure a server's capacity (a server
  with a worker limit is never idle, so its rate is all it can do).

Usage: ``python bench/_clients.py requests|aiohttp|raw|saturating --url URL --count N
[--interval S] [--offset K] [--connections C]``; prints one JSON object (posts, stored, cpu_s,
wall_s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.parse
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import API_KEY, day_telegrams

V1_PATH = "/api/v1/datalogger/dsmrreading"


class Meter:
    """Sums the process CPU and wall time of the timed sections (precise clocks).

    The user/system split comes from ``os.times()`` over the whole loop (10 ms ticks, so only
    the share is meaningful); the loop does nothing else but sleep.
    """

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0
        self.stored = 0
        self._at = (0.0, 0.0)
        self._first = os.times()

    def start(self) -> None:
        self._at = (time.process_time(), time.perf_counter())

    def stop(self, stored: bool) -> None:
        self.cpu += time.process_time() - self._at[0]
        self.wall += time.perf_counter() - self._at[1]
        self.stored += stored

    def result(self, posts: int) -> dict[str, float]:
        times = os.times()
        user = times.user - self._first.user
        system = times.system - self._first.system
        return {
            "posts": posts,
            "stored": self.stored,
            "cpu_s": self.cpu,
            "system_share": system / (user + system) if user + system else 0.0,
            "wall_s": self.wall,
        }


def with_requests(url: str, telegrams: list[str], interval: float) -> dict[str, float]:
    import requests

    meter = Meter()
    for telegram in telegrams:
        if interval:
            time.sleep(interval)
        meter.start()
        response = requests.post(
            url + V1_PATH,
            headers={"Authorization": f"Token {API_KEY}"},
            data={"telegram": telegram},
            timeout=20,
        )
        meter.stop(response.status_code in (200, 201))
    return meter.result(len(telegrams))


async def with_aiohttp(url: str, telegrams: list[str], interval: float) -> dict[str, float]:
    import aiohttp

    meter = Meter()
    headers = {
        "Authorization": f"Token {API_KEY}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    async with aiohttp.ClientSession(headers=headers) as session:
        for telegram in telegrams:
            if interval:
                await asyncio.sleep(interval)
            meter.start()
            body = urllib.parse.urlencode({"telegram": telegram})
            async with session.post(url + V1_PATH, data=body) as response:
                await response.read()
                stored = response.status in (200, 201)
            meter.stop(stored)
    return meter.result(len(telegrams))


async def with_raw(url: str, telegrams: list[str], interval: float) -> dict[str, float]:
    meter = Meter()
    await _raw_posts(url, telegrams, interval, meter)
    return meter.result(len(telegrams))


async def saturating(url: str, telegrams: list[str], connections: int) -> dict[str, float]:
    """``connections`` raw keep-alive clients at once: the server never waits for a client, so
    the rate is the server's capacity (CPU and wall time are for the whole run)."""
    meter = Meter()
    started = time.process_time(), time.perf_counter()
    shares = [telegrams[i::connections] for i in range(connections)]
    await asyncio.gather(*(_raw_posts(url, share, 0.0, Meter()) for share in shares))
    meter.cpu = time.process_time() - started[0]
    meter.wall = time.perf_counter() - started[1]
    return meter.result(len(telegrams))


async def _raw_posts(url: str, telegrams: list[str], interval: float, meter: Meter) -> None:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST {V1_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Token {API_KEY}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: "
    ).encode()
    for telegram in telegrams:
        if interval:
            await asyncio.sleep(interval)
        meter.start()
        body = urllib.parse.urlencode({"telegram": telegram}).encode()
        writer.write(b"%s%d\r\n\r\n%s" % (head, len(body), body))
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        meter.stop(status in (200, 201))
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("client", choices=("requests", "aiohttp", "raw", "saturating"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--offset", type=int, default=0, help="skip this many day telegrams")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between posts")
    parser.add_argument("--connections", type=int, default=4, help="for saturating")
    args = parser.parse_args()
    telegrams = [
        t.decode() for t in islice(day_telegrams(args.offset + args.count), args.offset, None)
    ]
    if args.client == "requests":
        result = with_requests(args.url, telegrams, args.interval)
    elif args.client == "aiohttp":
        result = asyncio.run(with_aiohttp(args.url, telegrams, args.interval))
    elif args.client == "raw":
        result = asyncio.run(with_raw(args.url, telegrams, args.interval))
    else:
        result = asyncio.run(saturating(args.url, telegrams, args.connections))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
