#!/usr/bin/env python3
"""Measure the asyncio serial bindings dsmr-logger could use, on this machine.

Why this exists: dsmr-logger reads P1 telegrams for years on small hardware, from a USB serial
port (/dev/ttyUSB0, 115200 8N1), a ser2net TCP socket (``socket://host:port``) or an RFC 2217
server (``rfc2217://host:port``). The choice between pyserial-asyncio, pyserial-asyncio-fast and
serialx should rest on measured facts rather than on reputation:

a) does opening a port block the event loop, and how long do open/close take;
b) reader CPU per telegram, both flat out and at the meter's real pace of 1 telegram/s;
c) what a reader sees when the device disappears, and whether it can reopen the same path;
d) whether ``socket://`` and ``rfc2217://`` URLs really work through ``open_serial_connection``;
e) footprint: version, dependencies, native code, import time, RSS after import.

Everything is local and bounded: pseudo-terminals stand in for the USB serial port (a writer
subprocess feeds the master side, so its CPU is not charged to the reader), and the TCP and
RFC 2217 servers listen on 127.0.0.1 only and stop by themselves. Each binding is measured in a
fresh subprocess of this script so imports, RSS and CPU time do not leak between them.

Usage (from the repo root, with the project's venv; about 75 s)::

    python bench/serial_bindings.py [--telegrams 20000] [--slow-seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import re
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = (
    REPO_ROOT.parent
    / "shared/telegrams/nielsbasjes-dsmr-tools/ttyUSB0-raw-iskra-am550-dsmr5-566frames.log"
)
BAUDRATE = 115200
FLOOR = "asyncio-raw-fd"  # reference row: the stdlib reading the pty fd with no serial library


@dataclass(frozen=True)
class Binding:
    """One candidate library: its distribution name and its import name."""

    dist: str
    module: str


BINDINGS = (
    Binding("pyserial-asyncio", "serial_asyncio"),
    Binding("pyserial-asyncio-fast", "serial_asyncio_fast"),
    Binding("serialx", "serialx"),
)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def load_telegram(corpus: Path) -> bytes:
    """Return the first complete telegram (``/`` .. ``!CRC\\r\\n``) of a raw capture."""
    data = corpus.read_bytes()
    match = re.search(rb"/[^\r\n]+\r\n.*?![0-9A-F]{4}\r\n", data, re.DOTALL)
    if match is None:
        raise SystemExit(f"no complete DSMR telegram found in {corpus}")
    return match.group(0)


def describe(exc: BaseException) -> str:
    """Name an exception precisely enough to write an ``except`` clause for it."""
    kind = type(exc)
    name = f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")
    if isinstance(exc, OSError) and kind.__module__ != "builtins":
        name += " (an OSError)"
    errno = getattr(exc, "errno", None)
    if errno:
        name += f" errno={errno}"
    message = textwrap.shorten(str(exc).removeprefix(f"[Errno {errno}] "), 80)
    return f"{name}: {message}" if message else name


class Pty:
    """A pseudo-terminal standing in for the meter's serial port.

    The slave is put in raw mode so CR/LF pass untranslated; our own slave fd is kept only until
    the library under test has opened the path (``release_slave``), so the library is then the
    only holder of the slave side, as with a real device.
    """

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)

    def release_slave(self) -> None:
        if self._slave >= 0:
            os.close(self._slave)
            self._slave = -1

    def close_master(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def close(self) -> None:
        self.release_slave()
        self.close_master()


class LagMonitor:
    """Ticks every ``interval`` seconds and records the worst overshoot: the event-loop lag."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.max_lag = max(self.max_lag, time.perf_counter() - start - self.interval)

    async def settle(self) -> float:
        """Let a late tick land, then return the worst lag seen since the last reset."""
        await asyncio.sleep(3 * self.interval)
        return self.max_lag

    def reset(self) -> None:
        self.max_lag = 0.0

    async def __aenter__(self) -> LagMonitor:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(self.interval)
        self.reset()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class LoopErrors:
    """Collects what the event loop's exception handler would have logged."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def install(self) -> None:
        asyncio.get_running_loop().set_exception_handler(self._handle)

    def _handle(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        text = context.get("message", "")
        self.messages.append(f"{text}: {describe(exc)}" if exc else text)

    def take(self) -> list[str]:
        taken, self.messages = self.messages, []
        return taken


async def open_stream(
    lib: ModuleType | None, url: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open ``url`` the way dsmr-logger would; ``lib=None`` is the stdlib floor (raw fd)."""
    if lib is not None:
        reader, writer = await lib.open_serial_connection(url=url, baudrate=BAUDRATE)
        return reader, writer
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    fd = os.open(url, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    pipe = open(fd, "rb", buffering=0)  # noqa: SIM115 - owned by the transport
    transport, _ = await loop.connect_read_pipe(lambda: protocol, pipe)
    # A StreamWriter only to get the same close()/wait_closed() as the libraries.
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]


async def close_stream(writer: asyncio.StreamWriter, timeout: float = 2.0) -> str:
    """Close and wait; return ``ok`` or how it failed (wait_closed re-raises a lost error)."""
    try:
        writer.close()
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    except TimeoutError:
        return f"hang (>{timeout:g} s)"
    except Exception as exc:
        return f"raises {describe(exc)}"
    return "ok"


async def read_at_least(reader: asyncio.StreamReader, wanted: int, timeout: float) -> bytes:
    """Read until ``wanted`` bytes, EOF or timeout; return what arrived."""
    data = bytearray()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while len(data) < wanted:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
    return bytes(data)


# --------------------------------------------------------------------------------------------
# a) open/close and event-loop lag
# --------------------------------------------------------------------------------------------


async def measure_open_close(lib: ModuleType, cycles: int) -> dict[str, float]:
    async with LagMonitor() as monitor:
        await asyncio.sleep(0.2)
        baseline_lag = await monitor.settle()
        open_times: list[float] = []
        close_times: list[float] = []
        open_lag = close_lag = 0.0
        for _ in range(cycles):
            pty = Pty()
            try:
                monitor.reset()
                start = time.perf_counter()
                _reader, writer = await open_stream(lib, pty.path)
                open_times.append(time.perf_counter() - start)
                open_lag = max(open_lag, await monitor.settle())
                pty.release_slave()
                monitor.reset()
                start = time.perf_counter()
                await close_stream(writer)
                close_times.append(time.perf_counter() - start)
                close_lag = max(close_lag, await monitor.settle())
            finally:
                pty.close()
    return {
        "open_ms_median": 1e3 * statistics.median(open_times),
        "open_ms_max": 1e3 * max(open_times),
        "close_ms_median": 1e3 * statistics.median(close_times),
        "open_lag_ms": 1e3 * open_lag,
        "close_lag_ms": 1e3 * close_lag,
        "baseline_lag_ms": 1e3 * baseline_lag,
    }


# --------------------------------------------------------------------------------------------
# b) CPU per telegram (writer runs in a subprocess, so only the reader is charged)
# --------------------------------------------------------------------------------------------


def feed(fd: int, count: int, interval: float) -> None:
    """Writer subprocess: wait for the telegram on stdin, then write it ``count`` times."""
    size = int.from_bytes(sys.stdin.buffer.read(4), "big")
    telegram = sys.stdin.buffer.read(size)
    start = time.monotonic()
    with contextlib.suppress(OSError):  # the reader side gave up and closed the master
        for i in range(count):
            if interval:
                time.sleep(max(0.0, start + i * interval - time.monotonic()))
            view = memoryview(telegram)
            while view:
                view = view[os.write(fd, view) :]


async def measure_cpu(
    lib: ModuleType | None, telegram: bytes, count: int, interval: float
) -> dict[str, float]:
    pty = Pty()
    feeder: subprocess.Popen[bytes] | None = None
    try:
        reader, writer = await open_stream(lib, pty.path)
        pty.release_slave()
        feeder = subprocess.Popen(
            [sys.executable, __file__, "--feed", str(pty.master), str(count), str(interval)],
            stdin=subprocess.PIPE,
            pass_fds=(pty.master,),
        )
        await asyncio.sleep(0.3)  # let the subprocess start before the clock runs
        expected = len(telegram) * count
        received = reads = 0
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        assert feeder.stdin is not None
        feeder.stdin.write(len(telegram).to_bytes(4, "big") + telegram)
        feeder.stdin.close()
        async with asyncio.timeout(max(30.0, 2 * count * interval)):
            while received < expected:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += len(chunk)
                reads += 1
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        await close_stream(writer)
    finally:
        pty.close()
        if feeder is not None:
            feeder.wait(timeout=5)
    switches = (usage1.ru_nvcsw + usage1.ru_nivcsw) - (usage0.ru_nvcsw + usage0.ru_nivcsw)
    return {
        "telegrams": count,
        "bytes_ok": float(received == expected),
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_us_per_telegram": 1e6 * cpu / count,
        "cpu_s_per_mb": cpu / (expected / 1e6),
        "mb_per_s": expected / 1e6 / wall,
        "reads_per_telegram": reads / count,
        "ctx_switches_per_telegram": switches / count,
    }


# --------------------------------------------------------------------------------------------
# c) disconnect while reading, then reopen through the same symlink
# --------------------------------------------------------------------------------------------


async def measure_disconnect(
    lib: ModuleType, telegram: bytes, errors: LoopErrors
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "ttyDSMR"
        pty = Pty()
        link.symlink_to(pty.path)
        try:
            reader, writer = await open_stream(lib, str(link))
            pty.release_slave()
            os.write(pty.master, telegram)
            result["before_ok"] = await read_at_least(reader, len(telegram), 2.0) == telegram
            pending = asyncio.ensure_future(reader.read(65536))
            await asyncio.sleep(0.05)
            closed_at = time.perf_counter()
            pty.close_master()
            try:
                async with asyncio.timeout(3.0):
                    data = await pending
                result["outcome"] = "EOF b''" if data == b"" else f"data ({len(data)} B)"
            except TimeoutError:
                result["outcome"] = "read() hangs (>3 s)"
            except Exception as exc:
                result["outcome"] = f"raises {describe(exc)}"
            result["latency_ms"] = 1e3 * (time.perf_counter() - closed_at)
            try:
                async with asyncio.timeout(1.0):
                    again = await reader.read(65536)
                result["read_again"] = "EOF b''" if again == b"" else f"data ({len(again)} B)"
            except TimeoutError:
                result["read_again"] = "hangs"
            except Exception as exc:
                result["read_again"] = f"raises {type(exc).__name__} again"
            closed = await close_stream(writer)
            result["close_after"] = closed.split(":")[0].replace("raises", "re-raises")
        finally:
            pty.close()

        fresh = Pty()
        staged = link.with_name("ttyDSMR.new")
        staged.symlink_to(fresh.path)
        staged.replace(link)  # atomic re-point, as udev does for /dev/serial/by-id
        try:
            async with asyncio.timeout(5.0):
                reader, writer = await open_stream(lib, str(link))
            fresh.release_slave()
            os.write(fresh.master, telegram)
            got = await read_at_least(reader, len(telegram), 2.0)
            result["reopen"] = "ok" if got == telegram else f"opened, got {len(got)} B"
            await close_stream(writer)
        except Exception as exc:
            result["reopen"] = f"fails: {describe(exc)}"
        finally:
            fresh.close()
    await asyncio.sleep(0.05)
    result["loop_errors"] = errors.take()
    return result


# --------------------------------------------------------------------------------------------
# d) socket:// and rfc2217:// against servers on 127.0.0.1
# --------------------------------------------------------------------------------------------


class TcpTelegramServer:
    """ser2net stand-in: an asyncio TCP server on 127.0.0.1, in its own thread and loop,
    that sends ``count`` telegrams 20 ms apart to each client and stops after ``lifetime``."""

    def __init__(self, telegram: bytes, count: int, lifetime: float = 30.0) -> None:
        self.telegram, self.count, self.lifetime = telegram, count, lifetime
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            for _ in range(self.count):
                writer.write(self.telegram)
                await writer.drain()
                await asyncio.sleep(0.02)
            async with asyncio.timeout(5.0):
                await reader.read()  # until the client hangs up
        writer.close()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.lifetime):
                await self._stop.wait()
        server.close()

    def __enter__(self) -> TcpTelegramServer:
        self._thread.start()
        self._ready.wait(5.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5.0)


class Rfc2217TelegramServer:
    """A minimal RFC 2217 server on 127.0.0.1 built on pyserial's ``PortManager`` (which does
    the telnet/COM-PORT-OPTION negotiation). The "port" behind it is pyserial's ``loop://``;
    after 0.2 s it sends ``count`` telegrams 20 ms apart, then waits for the client to leave.

    pyserial's PortManager stores SET-LINESTATE-MASK / SET-MODEMSTATE-MASK without answering
    them; ``ack_masks=True`` adds the answer (server code + 100) that RFC 2217 servers such as
    ser2net send, so a client that waits for it can be tested both ways.
    """

    def __init__(
        self, telegram: bytes, count: int, ack_masks: bool, lifetime: float = 30.0
    ) -> None:
        self.telegram, self.count, self.ack_masks = telegram, count, ack_masks
        self._deadline = time.monotonic() + lifetime
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                self._session(conn)
        self._sock.close()

    def _session(self, conn: socket.socket) -> None:
        import serial  # type: ignore[import-untyped]  # pyserial ships no type hints
        from serial import rfc2217

        port = serial.serial_for_url("loop://", baudrate=BAUDRATE)
        conn.setblocking(True)
        masks = (rfc2217.SET_LINESTATE_MASK, rfc2217.SET_MODEMSTATE_MASK)
        ack_masks = self.ack_masks

        class Connection:  # PortManager only needs .write() for its telnet answers
            write = staticmethod(conn.sendall)

        class Manager(rfc2217.PortManager):  # type: ignore[misc]
            def _telnet_process_subnegotiation(self, suboption: bytes) -> None:
                super()._telnet_process_subnegotiation(suboption)
                command = suboption[1:2]
                if ack_masks and suboption[:1] == rfc2217.COM_PORT_OPTION and command in masks:
                    answer = rfc2217.RFC2217_ANSWER_MAP[command]
                    self.rfc2217_send_subnegotiation(answer, suboption[2:3])

        manager = Manager(port, Connection())
        sent, next_send = 0, time.monotonic() + 0.2
        session_end = min(self._deadline, time.monotonic() + 10.0)
        while not self._stop.is_set() and time.monotonic() < session_end:
            readable, _, _ = select.select([conn], [], [], 0.02)
            if readable:
                data = conn.recv(4096)
                if not data:
                    break
                for _ in manager.filter(data):  # payload bytes for the "port": dropped
                    pass
            if sent < self.count and time.monotonic() >= next_send:
                conn.sendall(b"".join(manager.escape(self.telegram)))
                sent, next_send = sent + 1, next_send + 0.02
        port.close()

    def __enter__(self) -> Rfc2217TelegramServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)


class UnresponsiveListener:
    """A 127.0.0.1 listener whose accept queue (backlog 0) is already full, so the kernel drops
    further SYNs and a connect() hangs: a ser2net host that has stopped answering."""

    def __enter__(self) -> UnresponsiveListener:
        self._server = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = self._server.getsockname()[1]
        self._filler = socket.create_connection(("127.0.0.1", self.port), timeout=1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._filler.close()
        self._server.close()


async def measure_stalled_open(lib: ModuleType, bound: float = 3.0) -> dict[str, Any]:
    """Open ``socket://`` to an unresponsive host; we give up after ``bound`` seconds."""
    result: dict[str, Any] = {}
    with UnresponsiveListener() as listener:
        async with LagMonitor() as monitor:
            start = time.perf_counter()
            try:
                async with asyncio.timeout(bound):
                    _reader, writer = await open_stream(lib, f"socket://127.0.0.1:{listener.port}")
                result["outcome"] = "opened (unexpected)"
                await close_stream(writer)
            except TimeoutError:
                result["outcome"] = f"still connecting, cancelled by us at {bound:g} s"
            except Exception as exc:
                result["outcome"] = f"raises {describe(exc)}"
            result["open_ms"] = 1e3 * (time.perf_counter() - start)
            result["lag_ms"] = 1e3 * await monitor.settle()
    return result


async def measure_url(
    lib: ModuleType, url: str, telegram: bytes, count: int, errors: LoopErrors
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    expected = telegram * count
    async with LagMonitor() as monitor:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(8.0):
                reader, writer = await open_stream(lib, url)
        except Exception as exc:
            result["open_ms"] = 1e3 * (time.perf_counter() - start)
            result["lag_ms"] = 1e3 * await monitor.settle()
            result["status"] = f"open fails: {describe(exc)}"
            result["loop_errors"] = errors.take()
            return result
        result["open_ms"] = 1e3 * (time.perf_counter() - start)
        result["lag_ms"] = 1e3 * await monitor.settle()
        got = await read_at_least(reader, len(expected), 3.0)
        lost = next((k for k in range(count + 1) if got == expected[k * len(telegram) :]), None)
        if lost == 0:
            result["status"] = "ok"
        elif lost is not None:
            result["status"] = (
                f"streams, but {lost} of {count} telegrams sent at connect were discarded"
            )
        else:
            result["status"] = f"opens, but got {len(got)}/{len(expected)} B in 3 s"
        result["close"] = await close_stream(writer)
    await asyncio.sleep(0.05)
    result["loop_errors"] = errors.take()
    return result


# --------------------------------------------------------------------------------------------
# Worker: everything that needs the library imported, in a fresh process
# --------------------------------------------------------------------------------------------


async def run_worker(name: str, telegram: bytes, args: argparse.Namespace) -> dict[str, Any]:
    errors = LoopErrors()
    errors.install()
    results: dict[str, Any] = {}
    lib = (
        None
        if name == FLOOR
        else importlib.import_module(next(b.module for b in BINDINGS if b.dist == name))
    )
    floods = [await measure_cpu(lib, telegram, args.telegrams, 0.0) for _ in range(args.repeats)]
    results["flood"] = sorted(floods, key=lambda run: run["cpu_s"])[len(floods) // 2]
    results["slow"] = await measure_cpu(lib, telegram, args.slow_seconds, 1.0)
    if lib is None:
        return results
    results["open"] = await measure_open_close(lib, args.open_cycles)
    results["stalled"] = await measure_stalled_open(lib)
    results["disconnect"] = await measure_disconnect(lib, telegram, errors)
    url_telegrams = 3
    with TcpTelegramServer(telegram, url_telegrams) as tcp:
        url = f"socket://127.0.0.1:{tcp.port}"
        results["socket"] = await measure_url(lib, url, telegram, url_telegrams, errors)
    for key, ack_masks in (("rfc2217", False), ("rfc2217_acks", True)):
        if importlib.util.find_spec("serial") is None:  # the test server is pyserial's
            results[key] = {"status": "skipped: needs pyserial for the server", "loop_errors": []}
            continue
        with Rfc2217TelegramServer(telegram, url_telegrams, ack_masks) as rfc:
            url = f"rfc2217://127.0.0.1:{rfc.port}"
            results[key] = await measure_url(lib, url, telegram, url_telegrams, errors)
    return results


# --------------------------------------------------------------------------------------------
# e) footprint, from package metadata and fresh interpreters
# --------------------------------------------------------------------------------------------

IMPORT_PROBE = """
import importlib, sys, time, asyncio
def rss_kb():
    with open('/proc/self/status') as status:
        return next(int(l.split()[1]) for l in status if l.startswith('VmRSS:'))
before = rss_kb(); start = time.perf_counter()
importlib.import_module(sys.argv[1])
print(time.perf_counter() - start, before, rss_kb())
"""


def measure_import(module: str, runs: int = 5) -> dict[str, float]:
    """Best-of-N import time and RSS in fresh interpreters (asyncio already imported)."""
    samples = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE, module], capture_output=True, text=True, check=True
        ).stdout.split()
        samples.append((float(out[0]), int(out[1]), int(out[2])))
    seconds, before, after = min(samples)
    return {
        "import_ms": 1e3 * seconds,
        "rss_mb": after / 1024,
        "rss_delta_mb": (after - before) / 1024,
    }


def dependency_closure(dist_name: str) -> list[metadata.Distribution]:
    """The distribution and every installed requirement it pulls in on this platform."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip-based venvs
        Requirement = None  # type: ignore[assignment,misc]
    seen: dict[str, metadata.Distribution] = {}
    todo = [dist_name]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        for spec in dist.requires or []:
            if Requirement is not None:
                req = Requirement(spec)
                if req.marker is None or req.marker.evaluate({"extra": ""}):
                    todo.append(req.name)
            elif ";" not in spec:
                todo.append(re.split(r"[\s<>=!~\[(]", spec, maxsplit=1)[0])
    return list(seen.values())


def footprint(binding: Binding) -> dict[str, Any]:
    closure = dependency_closure(binding.dist)
    files = [(d, f) for d in closure for f in d.files or []]
    native = sorted({str(f) for _, f in files if f.suffix in {".so", ".pyd", ".dylib"}})
    size = sum((f.size or 0) for _, f in files)
    deps = [f"{d.metadata['Name']} {d.version}" for d in closure[1:]]
    return {
        "version": metadata.version(binding.dist),
        "deps": deps,
        "native_files": native,
        "installed_kb": size / 1024,
        **measure_import(binding.module),
    }


# --------------------------------------------------------------------------------------------
# Orchestration and report
# --------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "pyserial": _version("pyserial"),
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_in_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--worker", name, "--corpus", str(args.corpus),
        "--telegrams", str(args.telegrams), "--slow-seconds", str(args.slow_seconds),
        "--open-cycles", str(args.open_cycles), "--repeats", str(args.repeats),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return {"failed": done.stderr.strip().splitlines()[-1:] or ["no output"]}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _f(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(names: list[str], res: dict[str, dict[str, Any]], telegram: bytes) -> str:
    """One markdown table: a row per measurement, a column per binding (+ the stdlib floor)."""

    def row(label: str, fn: Any, floor: bool = False) -> str:
        cells = []
        for name in names:
            r = res[name]
            if "failed" in r:
                cells.append("worker failed: " + _cell(r["failed"][0]))
            elif name == FLOOR and not floor:
                cells.append("—")
            else:
                try:
                    cells.append(_cell(fn(r)))
                except KeyError:
                    cells.append("n/a")
        return f"| {label} | " + " | ".join(cells) + " |"

    def url_status(key: str) -> Any:
        def fmt(r: dict[str, Any]) -> str:
            u = r[key]
            text: str = u["status"]
            if u["loop_errors"]:
                text += "; loop logged: " + u["loop_errors"][0]
            return text

        return fmt

    fl = "flood"
    lines = [
        "| measurement | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        row("version", lambda r: r["fp"]["version"]),
        row("deps pulled in", lambda r: ", ".join(r["fp"]["deps"]) or "none"),
        row(
            "native extension files (incl. deps)",
            lambda r: ", ".join(r["fp"]["native_files"]) or "none: pure Python",
        ),
        row("installed size incl. deps, KB", lambda r: _f(r["fp"]["installed_kb"], 0)),
        row("import time, ms (best of 5)", lambda r: _f(r["fp"]["import_ms"])),
        row(
            "RSS after import, MB (Δ)",
            lambda r: f"{_f(r['fp']['rss_mb'])} (+{_f(r['fp']['rss_delta_mb'])})",
        ),
        row(
            "a) pty open, ms median / max",
            lambda r: f"{_f(r['open']['open_ms_median'], 2)} / {_f(r['open']['open_ms_max'], 2)}",
        ),
        row("a) pty close, ms median", lambda r: _f(r["open"]["close_ms_median"], 2)),
        row(
            "a) max loop lag in open / close, ms (idle 1 ms ticker lag)",
            lambda r: (
                f"{_f(r['open']['open_lag_ms'], 2)} / {_f(r['open']['close_lag_ms'], 2)} "
                f"({_f(r['open']['baseline_lag_ms'], 2)})"
            ),
        ),
        row(
            "a) socket:// open to a host that never answers: outcome",
            lambda r: r["stalled"]["outcome"],
        ),
        row(
            "a) ... time in open / max loop lag, ms",
            lambda r: f"{_f(r['stalled']['open_ms'], 0)} / {_f(r['stalled']['lag_ms'], 1)}",
        ),
        row(
            f"b) flood of {len(telegram)} B telegrams: CPU µs/telegram (median run)",
            lambda r: _f(r[fl]["cpu_us_per_telegram"]),
            True,
        ),
        row("b) flood: CPU s per MB", lambda r: _f(r[fl]["cpu_s_per_mb"], 3), True),
        row("b) flood: MB/s (wall)", lambda r: _f(r[fl]["mb_per_s"]), True),
        row(
            "b) flood: read() returns per telegram",
            lambda r: _f(r[fl]["reads_per_telegram"], 2),
            True,
        ),
        row("b) flood: all bytes arrived", lambda r: "yes" if r[fl]["bytes_ok"] else "NO", True),
        row(
            "b) 1 telegram/s: CPU ms/telegram",
            lambda r: _f(1e3 * r["slow"]["cpu_s"] / r["slow"]["telegrams"], 3),
            True,
        ),
        row(
            "b) 1 telegram/s: context switches/telegram",
            lambda r: _f(r["slow"]["ctx_switches_per_telegram"]),
            True,
        ),
        row("c) pty master closed during read()", lambda r: r["disconnect"]["outcome"]),
        row("c) ... seen after, ms", lambda r: _f(r["disconnect"]["latency_ms"], 2)),
        row("c) next read()", lambda r: r["disconnect"]["read_again"]),
        row("c) writer.close()+wait_closed()", lambda r: r["disconnect"]["close_after"]),
        row("c) reopen new pty via same symlink", lambda r: r["disconnect"]["reopen"]),
        row("d) socket://127.0.0.1", url_status("socket")),
        row(
            "d) ... open ms / loop lag ms",
            lambda r: f"{_f(r['socket']['open_ms'], 2)} / {_f(r['socket']['lag_ms'], 2)}",
        ),
        row("d) rfc2217://, server = pyserial PortManager as shipped", url_status("rfc2217")),
        row(
            "d) ... open ms / loop lag ms",
            lambda r: f"{_f(r['rfc2217']['open_ms'], 1)} / {_f(r['rfc2217']['lag_ms'], 1)}",
        ),
        row(
            "d) rfc2217://, PortManager + SET-*-MASK answers (as ser2net)",
            url_status("rfc2217_acks"),
        ),
        row(
            "d) ... open ms / loop lag ms",
            lambda r: (
                f"{_f(r['rfc2217_acks']['open_ms'], 1)} / {_f(r['rfc2217_acks']['lag_ms'], 1)}"
            ),
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="raw DSMR capture; its first complete telegram is used",
    )
    parser.add_argument("--telegrams", type=int, default=20000, help="telegrams in the flood test")
    parser.add_argument(
        "--slow-seconds",
        type=int,
        default=10,
        help="telegrams (= seconds) in the 1 telegram/s test",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="flood runs per binding; the median is shown"
    )
    parser.add_argument("--open-cycles", type=int, default=20, help="pty open/close cycles")
    parser.add_argument("--json", type=Path, help="also write raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--feed", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.feed:
        feed(int(args.feed[0]), int(args.feed[1]), float(args.feed[2]))
        return
    telegram = load_telegram(args.corpus)
    if args.worker:
        print(json.dumps(asyncio.run(run_worker(args.worker, telegram, args))))
        return

    started = time.perf_counter()
    info = machine()
    print(
        f"machine: {info['nproc']} x {info['cpu']}, Python {info['python']}, "
        f"Linux {info['kernel']}, pyserial {info['pyserial']}",
        file=sys.stderr,
    )
    names: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    for binding in BINDINGS:
        try:
            if importlib.util.find_spec(binding.module) is None:
                raise metadata.PackageNotFoundError(binding.dist)
            fp = footprint(binding)
        except (metadata.PackageNotFoundError, subprocess.CalledProcessError):
            print(f"skip {binding.dist}: not installed in this interpreter", file=sys.stderr)
            continue
        print(f"measuring {binding.dist} {fp['version']} ...", file=sys.stderr)
        results[binding.dist] = {"fp": fp, **run_in_subprocess(binding.dist, args)}
        names.append(binding.dist)
    print("measuring the stdlib floor (loop.connect_read_pipe on the pty) ...", file=sys.stderr)
    results[FLOOR] = run_in_subprocess(FLOOR, args)
    names.append(FLOOR)

    print(render(names, results, telegram))
    print(f"\n(total {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
