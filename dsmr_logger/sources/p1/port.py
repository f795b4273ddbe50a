"""Opening the link to the meter: a serial device, ``socket://`` (ser2net) or ``rfc2217://``.

serialx handles all three natively in asyncio; ``bench/serial_bindings.py`` holds the measurements
behind that choice (the pyserial bindings block the event loop while opening, and cannot do
rfc2217). Every form gives an ``asyncio.StreamReader``; the reader task does not care which.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import serialx

from dsmr_logger.config import MeterConfig

READ_SIZE = 64 * 1024
TRANSPORT_READ_SIZE = 16 * 1024
"""Bytes a transport asks the kernel for per read. Its default, 256 KiB, costs an allocation of
that size for every read of one 778-byte telegram; the pty hands over at most 4 KiB anyway."""
_CLOSE_TIMEOUT = 2.0


@dataclass(slots=True)
class Link:
    """An open connection to the meter; ``close`` never raises and never hangs."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.writer.wait_closed()


async def open_link(meter: MeterConfig) -> Link:
    """Open the configured port; raises OSError (serialx's errors are OSErrors) when it can't."""
    serial = meter.serial
    reader, writer = await serialx.open_serial_connection(
        url=meter.port,
        baudrate=serial.baudrate,
        byte_size=serial.bytesize,
        parity=serial.parity,
        stopbits=serial.stopbits,
    )
    writer.transport.max_size = TRANSPORT_READ_SIZE  # type: ignore[attr-defined]
    return Link(reader, writer)
