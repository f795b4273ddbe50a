"""Opening the link to the meter: a serial device (pyserial via pyserial-asyncio-fast) or ser2net.

Both give an ``asyncio.StreamReader``; the reader task above does not care which it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from dataclasses import dataclass

import serial_asyncio_fast

from dsmr_logger.config import MeterConfig

READ_SIZE = 64 * 1024
_CLOSE_TIMEOUT = 2.0


@dataclass(slots=True)
class Link:
    """An open connection to the meter; ``close`` never raises and never hangs."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), _CLOSE_TIMEOUT)


async def open_link(meter: MeterConfig) -> Link:
    """Open the configured port; raises OSError (or the serial library's error) when it can't."""
    if meter.is_network:
        url = urllib.parse.urlsplit(meter.port)
        reader, writer = await asyncio.open_connection(url.hostname, url.port, limit=READ_SIZE)
        return Link(reader, writer)
    serial = meter.serial
    reader, writer = await serial_asyncio_fast.open_serial_connection(
        url=meter.port,
        baudrate=serial.baudrate,
        bytesize=serial.bytesize,
        parity=serial.parity,
        stopbits=serial.stopbits,
        limit=READ_SIZE,
    )
    return Link(reader, writer)
