"""Destinations. A sink sends one telegram and says what the answer means; queues do the rest."""

from __future__ import annotations

from typing import Protocol

from dsmr_logger.delivery.answers import Answer


class Telegram(Protocol):
    """What a sink is handed: a queued telegram (hot record or read back from the spool)."""

    @property
    def seq(self) -> int: ...
    @property
    def telegram(self) -> bytes: ...
    @property
    def received_at(self) -> float: ...


class Sink(Protocol):
    name: str

    async def start(self) -> None: ...
    async def send(self, item: Telegram) -> Answer: ...
    async def close(self) -> None: ...
