"""The size cap: past ``max_bytes`` of segment files, the oldest telegrams are dropped.

Whole segments go, oldest first: every cursor moves past a segment gone through, so the dropped
telegrams need no record of their own, and deleting one file costs one unlink. What is being
sent right now (``protect``) is spared, and its segment kept until it is confirmed, so every
telegram reported dropped is really lost (Fluent Bit's drop-oldest, per output, with a counter).

Invariants: after a commit the files exceed ``max_bytes`` only by segments holding a spared
telegram (and the one appended to); every telegram dropped is reported once per sink that
still needed it, never one a sink had confirmed. A record in a dropped segment whose telegram
is damaged but whose head still names it is dropped as the rest (reported, so the copy a sink
may hold in memory goes too: counted lost, it was delivered from there); one whose head is
damaged too cannot be named, and is counted as lost (``damage.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from dsmr_logger.delivery.spool.cursors import Cursors
from dsmr_logger.delivery.spool.damage import Damage
from dsmr_logger.delivery.spool.segments import Entry, SegmentLog, scan
from dsmr_logger.delivery.spool.summaries import Summaries


class SizeCap:
    def __init__(
        self,
        max_bytes: int,
        log: SegmentLog,
        summaries: Summaries,
        cursors: Cursors,
        damage: Damage,
    ) -> None:
        self.max_bytes = max_bytes
        self._log = log
        self._summaries = summaries
        self._cursors = cursors
        self._damage = damage

    def trim_batch(
        self,
        records: Sequence[tuple[int, bytes, Collection[str]]],
        protect: Collection[int],
        dropped: dict[str, list[int]],
    ) -> list[tuple[int, bytes, Collection[str]]]:
        """A batch larger than the whole spool keeps its newest (and what is being sent)."""
        incoming = sum(len(record) for _, record, _ in records)
        kept = []
        for seq, record, sinks in records:  # oldest first
            if incoming > self.max_bytes and seq not in protect:
                incoming -= len(record)
                for sink in sinks:
                    dropped.setdefault(sink, []).append(seq)
            else:
                kept.append((seq, record, sinks))
        return kept

    def apply(
        self,
        protect: Collection[int],
        dropped: dict[str, list[int]],
        lost: dict[str, int],
        changed: set[str],
    ) -> None:
        """Drop the oldest telegrams (whole segments) while the files exceed ``max_bytes``."""
        finished = self._cursors.finished()
        excess = self._log.total_bytes - self.max_bytes - sum(s.size for s in finished)
        for segment in list(self._log.segments[:-1]):
            if excess <= 0:
                break
            if segment in finished:
                continue
            items = list(scan(segment))
            for sink, count in self._damage.account(segment, items, count_named=False).items():
                lost[sink] = lost.get(sink, 0) + count
            self._log.damaged.discard(segment.first_seq)
            spared = False
            for item in items:
                if isinstance(item, Entry):
                    spared |= self._drop(item.seq, item.sinks, protect, dropped)
                else:
                    for head in item.lost:  # named by its head: dropped like the rest
                        spared |= self._drop(head.seq, head.sinks, protect, dropped)
            for sink, (_, last) in self._summaries.get(segment.first_seq).items():
                self._cursors.get(sink).move_past(last)
                changed.add(sink)
            if not spared:
                excess -= segment.size

    def _drop(
        self,
        seq: int,
        sinks: Collection[str],
        protect: Collection[int],
        dropped: dict[str, list[int]],
    ) -> bool:
        """Drop one record for every sink that needs it; True if it was spared instead."""
        spared = False
        for sink in sinks:
            cursor = self._cursors.get(sink)
            if not cursor.needs(seq):
                continue
            if seq in protect:
                cursor.spared.add(seq)
                spared = True
            else:
                cursor.spared.discard(seq)  # no longer being sent: it goes too
                dropped.setdefault(sink, []).append(seq)
        return spared
