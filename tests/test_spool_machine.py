"""The whole spool against a plain in-memory model, driven by hypothesis (a state machine).

Rules: appends (some for several sinks, some already encoded), confirmations in and out of
order, dead letters, requeues adopted as new telegrams, commits that fail and are retried with
the same encoded records, the size cap (a few kilobytes, with telegrams being sent protected),
purges, crashes (the files as a killed process leaves them, sometimes with a torn write) and
reopens, and single-bit flips anywhere in any segment file. After every step, what users rely on:
each sink reads back exactly what it still needs, oldest first and byte for byte, except records
a flip damaged; every such record a sink still needed is counted ``lost`` for it (never fewer,
and more only by records whose head was damaged, which cannot name their sinks); the cap's drops
are counted exactly; backlogs count what paging returns; seqs never go backwards; a reader beside
the daemon sees the same. Bounded for CI by the ``spool-ci`` profile (about 15 s).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dsmr_logger.delivery.spool import Spool, StoredTelegram, encode, telegram_dir
from dsmr_logger.delivery.spool.records import MARKER
from dsmr_logger.delivery.spool.scan import Entry, Gap, scan
from dsmr_logger.delivery.spool.segments import SUFFIX

SINKS = ("a", "b", "c")
SEGMENT = 600
MAX_BYTES = 16 * SEGMENT

settings.register_profile(
    "spool-ci",
    max_examples=25,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "spool-long",
    max_examples=400,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PROFILE = settings.get_profile(os.environ.get("SPOOL_MODEL_PROFILE", "spool-ci"))


def body(seq: int, size: int) -> bytes:
    return f"/T{seq:06d}".encode().ljust(size - 3, b"x") + b"!\r\n"


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-machine-"))
        self.path = self.dir / "spool.sqlite3"
        self.telegrams: dict[int, StoredTelegram] = {}
        self.sinks_of: dict[int, tuple[str, ...]] = {}
        self.pending: dict[str, set[int]] = {s: set() for s in SINKS}
        self.lost: dict[str, set[int]] = {s: set() for s in SINKS}
        self.dropped: Counter[str] = Counter()
        self.touched: set[int] = set()
        self.head_touched: set[int] = set()
        self.letters: list[tuple[str, int]] = []
        self.next_seq = 1
        self.highest = 0
        self.position: dict[str, int] = dict.fromkeys(SINKS, 0)
        self.sending: dict[str, int | None] = dict.fromkeys(SINKS)
        self.spool = self._open()

    def _open(self) -> Spool:
        spool = Spool(self.path, max_bytes=MAX_BYTES)
        spool.open()
        assert spool.last_seq() >= self.highest, "seq numbers went backwards"
        self.next_seq = max(self.next_seq, spool.last_seq() + 1)
        self.position = dict.fromkeys(SINKS, 0)
        return spool

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- helpers ------------------------------------------------------------------------

    def _new(
        self, sizes: list[int], sinks: list[frozenset[str]]
    ) -> list[tuple[StoredTelegram, list[str]]]:
        batch = []
        for size, names in zip(sizes, sinks, strict=False):
            t = StoredTelegram(self.next_seq, body(self.next_seq, size), 1.7e9 + self.next_seq)
            self.next_seq += 1
            batch.append((t, sorted(names)))
        return batch

    def _protect(self) -> set[int]:
        """What is being sent: the head a sink holds, if it still needs it."""
        return {
            seq for s, seq in self.sending.items() if seq is not None and seq in self.pending[s]
        }

    def _committed(self, batch: list[tuple[StoredTelegram, list[str]]], acks, dropped) -> None:
        for t, names in batch:  # appended first: an ack in the same commit may name one
            self.telegrams[t.seq] = t
            self.sinks_of[t.seq] = tuple(names)
            for sink in names:
                self.pending[sink].add(t.seq)
        for sink, seq in acks:
            self.pending[sink].discard(seq)
        protect = self._protect()
        for sink, seqs in dropped.items():
            assert len(seqs) == len(set(seqs)), f"{sink}: dropped twice in one commit"
            for seq in seqs:
                assert seq in self.pending[sink], f"{sink}: {seq} dropped, but it was done"
                assert seq not in protect, f"{sink}: {seq} dropped while being sent"
                self.pending[sink].discard(seq)
            self.dropped[sink] += len(seqs)
        self.highest = max(self.highest, self.spool.log.last_seq)

    def _acks(self, data: st.DataObject) -> list[tuple[str, int]]:
        acks = []
        for sink in SINKS:
            waiting = sorted(self.pending[sink])
            if waiting:
                chosen = data.draw(st.lists(st.sampled_from(waiting), max_size=3, unique=True))
                acks += [(sink, seq) for seq in chosen]
        return data.draw(st.permutations(acks)) if acks else []

    # --- rules --------------------------------------------------------------------------

    sizes = st.lists(st.integers(40, 260), min_size=0, max_size=8)
    sink_sets = st.lists(st.frozensets(st.sampled_from(SINKS), min_size=1), min_size=8, max_size=8)

    @rule(sizes=sizes, sinks=sink_sets, data=st.data(), encoded=st.booleans())
    def commit(
        self, sizes: list[int], sinks: list[frozenset[str]], data: st.DataObject, encoded: bool
    ) -> None:
        batch = self._new(sizes, sinks)
        acks = self._acks(data)
        protect = self._protect()
        if encoded:
            records = [
                (t.seq, encode(t.seq, t.received_at, names, t.telegram), names)
                for t, names in batch
            ]
            dropped = self.spool.commit(acks=acks, protect=protect, encoded=records)
        else:
            dropped = self.spool.commit(batch, acks, protect)
        self._committed(batch, acks, dropped)

    @rule(
        sizes=st.lists(st.integers(40, 260), min_size=1, max_size=4),
        sinks=sink_sets,
        data=st.data(),
    )
    def commit_fails_then_retried(
        self, sizes: list[int], sinks: list[frozenset[str]], data: st.DataObject
    ) -> None:
        """Another writer holds SQLite: the commit fails; the queue retries the same encoded
        records, with the confirmations made from memory meanwhile as acks."""
        batch = self._new(sizes, sinks)
        records = [
            (t.seq, encode(t.seq, t.received_at, names, t.telegram), names) for t, names in batch
        ]
        self.spool.db.execute("PRAGMA busy_timeout = 0")
        other = sqlite3.connect(self.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(sqlite3.OperationalError):
                self.spool.commit(encoded=records, protect=self._protect())
        finally:
            other.execute("ROLLBACK")
            other.close()
            self.spool.db.execute("PRAGMA busy_timeout = 10000")
        from_memory = [(s, t.seq) for t, names in batch for s in names if data.draw(st.booleans())]
        dropped = self.spool.commit(acks=from_memory, protect=self._protect(), encoded=records)
        self._committed(batch, from_memory, dropped)

    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        acks = self._acks(data)
        dropped = self.spool.commit(acks=acks, protect=self._protect())
        self._committed([], acks, dropped)

    @rule(sink=st.sampled_from(SINKS), data=st.data())
    def send(self, sink: str, data: st.DataObject) -> None:
        """A sink takes its oldest telegram and holds it (a server that does not answer)."""
        waiting = sorted(self.pending[sink])
        self.sending[sink] = waiting[0] if waiting and data.draw(st.booleans()) else None

    @precondition(lambda self: any(self.pending.values()))
    @rule(data=st.data())
    def dead_letter(self, data: st.DataObject) -> None:
        sink, seq = data.draw(
            st.sampled_from(sorted((s, q) for s, p in self.pending.items() for q in p))
        )
        self.spool.dead_letter(
            sink, self.telegrams[seq], status=400, body="no", reason="refused", spooled=True
        )
        self.pending[sink].discard(seq)
        self.letters.append((sink, seq))

    @precondition(lambda self: self.letters)
    @rule(sink=st.sampled_from([None, *SINKS]))
    def requeue_and_adopt(self, sink: str | None) -> None:
        """``spool requeue``, then the daemon adopts them as new telegrams."""
        expected = [(s, q) for s, q in self.letters if sink is None or s == sink]
        tool = Spool(self.path, max_bytes=MAX_BYTES)
        tool.open(shared=True)
        try:
            assert tool.requeue(sink=sink) == len(expected)
        finally:
            tool.close()
        self.letters = [(s, q) for s, q in self.letters if (s, q) not in expected]
        waiting = self.spool.requeued(list(SINKS))
        assert sorted(t.telegram for _, _, t in waiting) == sorted(
            self.telegrams[q].telegram for _, q in expected
        )
        batch = []
        for _, name, t in waiting:
            again = StoredTelegram(self.next_seq, t.telegram, t.received_at)
            self.next_seq += 1
            batch.append((again, [name]))
        dropped = self.spool.commit(batch, protect=self._protect())
        self.spool.forget_requeued([row for row, _, _ in waiting])
        self._committed(batch, [], dropped)

    @rule(sink=st.sampled_from([None, *SINKS]))
    def purge(self, sink: str | None) -> None:
        queued, _ = self.spool.purge(sink, backlog=True, dead_letters=False)
        targets = SINKS if sink is None else (sink,)
        assert queued == sum(len(self.pending[s]) for s in targets)
        for s in targets:
            self.pending[s].clear()

    @rule(kill=st.booleans(), tear=st.binary(min_size=0, max_size=60))
    def reopen(self, kill: bool, tear: bytes) -> None:
        if kill:
            self.spool.abandon()
        else:
            self.spool.close()
        if tear and MARKER not in tear:  # a power cut halfway through the next append
            files = sorted(telegram_dir(self.path).glob("*" + SUFFIX))
            with files[-1].open("ab") as file:
                file.write(tear)
        self.spool = self._open()

    @rule(data=st.data())
    def flip(self, data: st.DataObject) -> None:
        """One bit of one segment file flips (a worn SD card)."""
        files = sorted(telegram_dir(self.path).glob("*" + SUFFIX))
        path = data.draw(st.sampled_from(files))
        size = path.stat().st_size
        if size == 0:
            return
        offset = data.draw(st.integers(0, size - 1))
        bit = data.draw(st.integers(0, 7))
        first = int(path.stem)
        for item in scan(next(s for s in self.spool.log.segments if s.first_seq == first)):
            if isinstance(item, Entry) and item.start <= offset < item.end:
                self.touched.add(item.seq)
                if offset < item.end - len(item.telegram):
                    self.head_touched.add(item.seq)
            elif isinstance(item, Gap) and item.start <= offset < item.end:
                for head in item.lost:  # already lost; its head may be hit now
                    if offset < item.start + head.size:
                        self.head_touched.add(head.seq)
        with path.open("r+b") as file:
            file.seek(offset)
            byte = file.read(1)[0]
            file.seek(offset)
            file.write(bytes([byte ^ (1 << bit)]))

    @rule(sink=st.sampled_from(SINKS), limit=st.integers(1, 5))
    def read_page(self, sink: str, limit: int) -> None:
        """The queue's way: from where the last page ended."""
        after = self.position[sink]
        page = self.spool.page(sink, after, self.spool.backlog_upto(sink), limit)
        got = [t.seq for t in page]
        expected = sorted(s for s in self.pending[sink] if s > after)
        assert got == sorted(got) and set(got) <= set(expected), f"{sink}: page after {after}"
        intact = [s for s in expected if s not in self.touched]
        last = got[-1] if len(got) == limit else max(expected, default=0)
        skipped = [s for s in intact if s <= last and s not in got]
        assert not skipped, f"{sink}: page after {after} skipped {skipped}"
        self.position[sink] = got[-1] if got else 0

    # --- the check ----------------------------------------------------------------------

    @invariant()
    def reads_back_what_the_model_keeps(self) -> None:
        self._check(self.spool, owner=True)
        reader = Spool(self.path, max_bytes=MAX_BYTES)  # a tool beside the daemon
        reader.open(shared=True)
        try:
            self._check(reader, owner=False)
        finally:
            reader.close()

    def _check(self, spool: Spool, *, owner: bool) -> None:
        for sink in SINKS:
            page = spool.page(sink, 0, 2**62, 10**6)
            got = [t.seq for t in page]
            assert got == sorted(got), f"{sink}: not oldest first"
            assert set(got) <= self.pending[sink], f"{sink}: reads back what it does not need"
            for t in page:
                assert t == self.telegrams[t.seq], f"{sink}: {t.seq} read back changed"
            gone = self.pending[sink] - set(got)
            assert gone <= self.touched, f"{sink}: lost {sorted(gone - self.touched)}, not damaged"
            if owner:
                self.pending[sink] -= gone
                self.lost[sink] |= gone
        if not owner:
            return
        counters = spool.counters()
        damaged_heads = len(self.head_touched)
        backlogs = spool.backlogs()
        for sink in SINKS:
            counted = counters.get(sink, {})
            assert counted.get("dropped", 0) == self.dropped[sink], f"{sink}: drops counted"
            lost = counted.get("lost", 0)
            assert lost >= len(self.lost[sink]), (
                f"{sink}: {len(self.lost[sink])} lost, {lost} counted"
            )
            assert lost <= len(self.lost[sink]) + damaged_heads, f"{sink}: {lost} counted lost"
            expected = sorted(self.pending[sink])
            if expected:
                assert sink in backlogs and backlogs[sink].count == len(expected), (
                    f"{sink}: backlog"
                )
                assert backlogs[sink].oldest_received_at == self.telegrams[expected[0]].received_at
            else:
                assert sink not in backlogs, f"{sink}: counted, but nothing is pending"
        assert spool.stored_bytes <= MAX_BYTES + (len(self._protect()) + 2) * SEGMENT
        letters = sorted((d.sink, d.seq) for d in spool.dead_letters())
        assert letters == sorted(self.letters)


SpoolMachine.TestCase.settings = PROFILE
test_the_spool_against_a_model = SpoolMachine.TestCase
