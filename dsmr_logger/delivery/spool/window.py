"""The memory window: telegrams held only in memory, counted, bounded, and numbered.

A record is *held* from its arrival until it is spooled or every sink is done with it. Normally
that is at most ``flush_interval`` (5 s); while the spool cannot be written it is as long as the
trouble lasts, so the window is bounded: past ``MEMORY_BYTES`` (telegram plus encoded record) the
oldest held records are dropped, each counted once per sink that still wanted it, for the spool's
counters once it can be written again. Everything held is backlog (health says so).

Invariant: ``unflushed`` is in seq order; ``bytes`` and ``count`` are the sum and number of held
records; a seq is never given twice, and records taken while the spool was closed are numbered
above everything it holds once it opens (``renumber``).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from dsmr_logger.delivery.spool.letters import StoredTelegram
from dsmr_logger.delivery.spool.link import Trouble

MEMORY_BYTES = 4 * 1024 * 1024
"""About 40 minutes of a DSMR 5 meter (778 + 816 bytes a telegram), some 6 MB of RSS at most."""


@dataclass(slots=True, eq=False)
class Record:
    """An accepted telegram still needed by at least one sink."""

    seq: int
    telegram: bytes
    received_at: float
    accepted_at: float
    waiting: set[str]
    spooled: bool = False
    encoded: bytes | None = None
    """The spool record, kept while a commit is retried (encoded again only if ``waiting``
    changed meanwhile)."""
    encoded_for: tuple[str, ...] = ()
    held: int = 0
    """Bytes this record holds in memory only (neither spooled nor done)."""


Item = Record | StoredTelegram
"""What a sink is handed: a hot record, or a telegram read back from the spool."""


class SinkSide(Protocol):
    """What the spool's side needs of a sink's queue (``delivery.queue.SinkQueue``)."""

    hot: deque[Record]
    cold_count: int

    @property
    def current(self) -> Item | None: ...
    def push(self, record: Record) -> None: ...
    def forget(self, record: Record) -> None: ...
    def drop(self, seqs: list[int]) -> None: ...
    def evict(self, limit: int) -> None: ...
    def protected(self) -> list[int]: ...
    def restore_cold(self, upto: int, backlog: Any) -> int: ...
    def spooled_in_memory(self, *, keep: bool) -> list[Record]: ...


class Window:
    def __init__(self, log: Any, *, limit: int = MEMORY_BYTES, wall: Callable[[], float]) -> None:
        self.limit = limit
        self.unflushed: deque[Record] = deque()
        """Records not yet spooled, oldest first (some maybe done by every sink meanwhile)."""
        self.strict_waiting: list[Record] = []
        """Strict durability: records waiting for their commit before any sink sees them."""
        self.seq = 0
        self.bytes = self.count = 0
        self.counted: dict[str, Counter[str]] = {"dropped": Counter(), "lost": Counter()}
        """Drops and losses counted in memory, for the spool's counters at the next commit."""
        self.shedding = Trouble(
            log, "spool cannot be written and the memory window is full: dropping the oldest",
            wall=wall,
        )  # fmt: skip

    def new(self, telegram: bytes, received_at: float, now: float, sinks: set[str]) -> Record:
        self.seq += 1
        record = Record(self.seq, telegram, received_at, now, sinks)
        self.hold(record)
        return record

    def hold(self, record: Record) -> None:
        size = len(record.telegram) + len(record.encoded or b"")
        self.bytes += size - record.held
        self.count += not record.held
        record.held = size

    def release(self, record: Record) -> None:
        self.bytes -= record.held
        self.count -= bool(record.held)
        record.held = 0

    def shed(self, sinks: Mapping[str, SinkSide]) -> None:
        """Past ``limit``: drop the oldest held records (not one a sink is sending)."""
        if self.bytes <= self.limit:
            return
        sending = {id(queue.current) for queue in sinks.values()}
        dropped: Counter[str] = Counter()
        for record in list(self.unflushed):
            if self.bytes <= self.limit:
                break
            if not record.held or id(record) in sending:
                continue
            self.unflushed.remove(record)
            for name in record.waiting:
                sinks[name].forget(record)
                dropped[name] += 1
            record.waiting.clear()
            self.release(record)
        self.counted["dropped"].update(dropped)
        self.shedding.failed("memory window full", dropped=dict(dropped), limit=self.limit)

    def pending_counts(self) -> dict[str, dict[str, int]]:
        return {name: dict(counts) for name, counts in self.counted.items() if counts}

    def clear_counts(self, names: Iterable[str]) -> None:
        for name in names:
            self.counted[name].clear()

    def in_memory(self, sinks: Mapping[str, SinkSide]) -> list[Record]:
        """Every record in memory the spool does not hold, oldest first."""
        unique = {id(r): r for r in self.unflushed}
        unique.update((id(r), r) for r in self.strict_waiting)
        for queue in sinks.values():
            unique.update((id(r), r) for r in queue.hot if not r.spooled)
        return sorted(unique.values(), key=_seq)

    def renumber(self, last: int, sinks: Mapping[str, SinkSide]) -> None:
        """Records taken while the spool was closed must number above what it holds (else an
        append would take them for ones already there). Shifted past every old number, so no
        worker's note of an old number can match a new one."""
        records = self.in_memory(sinks)
        if records and records[0].seq <= last:
            shift = max(last, records[-1].seq)
            for record in records:
                record.seq += shift
                record.encoded = None
            self.seq += shift
        self.seq = max(self.seq, last)

    def put_back(self, batch: list[Record]) -> None:
        """A batch whose commit failed goes back in front (in order with what a restarted
        spool took back from the sinks meanwhile)."""
        self.unflushed.extendleft(reversed(batch))
        after = self.unflushed[len(batch)] if batch and len(self.unflushed) > len(batch) else None
        if after is not None and after.seq < batch[-1].seq:
            self.unflushed = deque(sorted(self.unflushed, key=_seq))

    def respool(self, records: Iterable[Record]) -> None:
        """Records the spool held, but lost with its files: held in memory again, to be
        spooled again in order."""
        again = list(records)
        for record in again:
            record.spooled, record.encoded = False, None
            self.hold(record)
        self.unflushed = deque(sorted([*self.unflushed, *again], key=_seq))


def _seq(record: Record) -> int:
    return record.seq
