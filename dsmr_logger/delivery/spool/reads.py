"""Reading the backlog back: a sink's next page, and every sink's backlog at a glance.

A page starts where the last one ended (a remembered offset), and skips segments whose summary
says they hold nothing more for the sink, so draining a 100,000-telegram backlog reads each
segment about once. Counting a backlog reads only the segment a cursor is in.

Invariant: what a page returns is exactly what the sink still needs, oldest first, and each
count equals what paging from the start would return (damage found on the way is repaired and
counted before the caller sees the result).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dsmr_logger.delivery.spool.cursors import Cursors
from dsmr_logger.delivery.spool.letters import StoredTelegram
from dsmr_logger.delivery.spool.segments import SegmentLog
from dsmr_logger.delivery.spool.summaries import Summaries


@dataclass(frozen=True, slots=True)
class Backlog:
    count: int
    oldest_received_at: float | None


class Reads:
    def __init__(
        self,
        log: SegmentLog,
        summaries: Summaries,
        cursors: Cursors,
        repair: Callable[[], None],
    ) -> None:
        self.log = log
        self.summaries = summaries
        self.cursors = cursors
        self.repair = repair

    def backlogs(self) -> dict[str, Backlog]:
        """Each sink's backlog: its size and when its head was read.

        Counted from the segments' summaries, reading only the segment each cursor is in, so a
        start never reads the whole spool.
        """
        result = {}
        for sink in sorted(self.summaries.sinks()):
            cursor = self.cursors.get(sink)
            count = len(cursor.spared)
            for segment in self.log.segments:
                records, last = self.summaries.get(segment.first_seq).get(sink, (0, 0))
                if last <= cursor.seq:
                    continue
                if segment.first_seq > cursor.seq:
                    in_range = sum(1 for s in cursor.done if segment.first_seq <= s <= last)
                    count += records - in_range
                else:
                    count += sum(
                        1
                        for e in self.log.read(segment)
                        if sink in e.sinks and e.seq > cursor.seq and e.seq not in cursor.done
                    )
            if count > 0:
                after = min(cursor.spared) - 1 if cursor.spared else cursor.seq
                resume = None if cursor.spared else cursor.resume
                head = next(self._pending(sink, after, resume), None)  # None: a damaged file
                result[sink] = Backlog(count, head.received_at if head else None)
        self.repair()
        return result

    def _pending(
        self, sink: str, after: int, resume: tuple[int, int] | None
    ) -> Iterator[StoredTelegram]:
        cursor = self.cursors.get(sink)
        for entry in self.log.entries_after(after, resume, self.cursors.without(sink, after)):
            if sink in entry.sinks and cursor.needs(entry.seq):
                yield StoredTelegram(entry.seq, entry.telegram, entry.received_at)

    def page(self, sink: str, after: int, upto: int, limit: int) -> list[StoredTelegram]:
        """Up to ``limit`` telegrams ``sink`` still needs with ``after < seq <= upto``."""
        cursor = self.cursors.get(sink)
        if not any(seq > after for seq in cursor.spared):
            after = max(after, cursor.seq)
        resume = cursor.resume if after == cursor.seq else None
        if cursor.page_end is not None and cursor.page_end[0] == after:
            resume = cursor.page_end[1:]
        page: list[StoredTelegram] = []
        for entry in self.log.entries_after(after, resume, self.cursors.without(sink, after)):
            if entry.seq > upto:
                break
            if sink in entry.sinks and cursor.needs(entry.seq):
                page.append(StoredTelegram(entry.seq, entry.telegram, entry.received_at))
                if len(page) >= limit:
                    cursor.page_end = (entry.seq, entry.segment, entry.end)
                    break
        self.repair()
        return page
