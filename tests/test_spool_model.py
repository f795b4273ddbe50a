"""The spool against a model: random commits, acks, dead letters, cap drops, purges, failed
commits, kills, torn tails and reopens, checked after every step against plain sets.

The model is what users rely on: every telegram a commit accepted is, for each of its sinks,
either read back by ``page`` (oldest first, whole, exactly once) until that sink confirms or
dead-letters it, or reported dropped by the size cap exactly once and never after it was
confirmed; ``backlogs`` counts the same; seq numbers never go backwards across a restart; the
segment files stay within the cap (plus what is being sent); nothing stays on disk once every
sink is done.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from spool_v1 import SCHEMA_1

from dsmr_logger.delivery.spool import SUFFIX, Spool, StoredTelegram, telegram_dir

SINKS = ("a", "b", "c")
SEGMENT = 600
MAX_BYTES = 16 * SEGMENT
SEEDS = list(range(16))
STEPS = 100


def make(seq: int, rng: random.Random) -> StoredTelegram:
    size = rng.randint(40, 260)
    body = f"/T{seq:06d}".encode().ljust(size - 3, b"x") + b"!\r\n"
    return StoredTelegram(seq, body, 1_700_000_000.0 + seq)


class Model:
    def __init__(
        self,
        path: Path,
        rng: random.Random,
        telegrams: dict[int, StoredTelegram] | None = None,
        pending: dict[str, set[int]] | None = None,
    ) -> None:
        self.path = path
        self.rng = rng
        self.telegrams: dict[int, StoredTelegram] = telegrams or {}
        self.pending: dict[str, set[int]] = pending or {s: set() for s in SINKS}
        self.next_seq = 1
        self.highest_logged = max(self.telegrams, default=0)
        self.position: dict[str, int] = dict.fromkeys(SINKS, 0)
        """Where each sink's paged read (the queue's cold cursor) stands."""
        self.down: set[str] = set()
        """Sinks in an outage: their head is retried (protected) and nothing is confirmed."""
        self.spool = self.open()

    def open(self) -> Spool:
        spool = Spool(self.path, max_bytes=MAX_BYTES)
        spool.open()
        assert spool.log.segment_bytes == SEGMENT
        assert spool.last_seq() >= self.highest_logged, "seq numbers went backwards"
        self.next_seq = max(self.next_seq, spool.last_seq() + 1)
        self.position = dict.fromkeys(SINKS, 0)
        return spool

    # --- operations ---------------------------------------------------------------------

    def commit(self, *, fail: bool = False) -> None:
        rng = self.rng
        new = []
        for _ in range(rng.choice([1, 2, 3]) if fail else rng.choice([0, 0, 1, 1, 2, 3, 8])):
            t = make(self.next_seq, rng)
            self.next_seq += 1
            sinks = sorted(rng.sample(SINKS, rng.randint(1, len(SINKS))))
            new.append((t, sinks))
        for sink in SINKS:
            if rng.random() < 0.04:
                self.down ^= {sink}
        acks = []
        for sink in SINKS:
            if sink in self.down:
                continue
            waiting = sorted(self.pending[sink])
            for seq in rng.sample(waiting, min(len(waiting), rng.choice([0, 0, 1, 2, 5]))):
                acks.append((sink, seq))
        rng.shuffle(acks)
        # What is being sent: a sink's oldest pending telegram, sometimes for a long while.
        protect = {
            min(p)
            for sink, p in self.pending.items()
            if p and (sink in self.down or rng.random() < 0.2)
        }
        if fail:
            # Another writer holds SQLite: the commit fails. The queue keeps the batch in memory;
            # meanwhile a sink may deliver one from there (no ack: it was not spooled) and the
            # retry then names only the sinks still waiting.
            self.spool.db.execute("PRAGMA busy_timeout = 0")
            other = sqlite3.connect(self.path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                with pytest.raises(sqlite3.OperationalError):
                    self.spool.commit(new, acks, protect)
            finally:
                other.execute("ROLLBACK")
                other.close()
                self.spool.db.execute("PRAGMA busy_timeout = 10000")
            new = [(t, [s for s in sinks if rng.random() < 0.7]) for t, sinks in new]
            new = [(t, sinks) for t, sinks in new if sinks]
        dropped = self.spool.commit(new, acks, protect)
        for sink, seq in acks:
            self.pending[sink].discard(seq)
        for t, sinks in new:
            self.telegrams[t.seq] = t
            for sink in sinks:
                self.pending[sink].add(t.seq)
        for sink, seqs in dropped.items():
            assert len(seqs) == len(set(seqs)), f"{sink}: dropped twice in one commit"
            for seq in seqs:
                assert seq in self.pending[sink], f"{sink}: {seq} dropped, but it was done"
                assert seq not in protect, f"{sink}: {seq} dropped while being sent"
                self.pending[sink].discard(seq)
        self.highest_logged = max(self.highest_logged, self.spool.log.last_seq)
        # Within the cap, but for segments that hold a telegram being sent.
        if new or acks:
            assert self.spool.stored_bytes <= MAX_BYTES + (len(protect) + 1) * SEGMENT
        if (new or acks) and not any(self.pending.values()):
            assert len(segment_files(self.path)) == 1, "every sink is done: only the active file"

    def dead_letter(self) -> None:
        candidates = [(s, seq) for s, p in self.pending.items() for seq in p]
        if not candidates:
            return
        sink, seq = self.rng.choice(candidates)
        self.spool.dead_letter(
            sink, self.telegrams[seq], status=400, body="no", reason="refused", spooled=True
        )
        self.pending[sink].discard(seq)

    def purge(self) -> None:
        sink = self.rng.choice([None, *SINKS])
        queued, _ = self.spool.purge(sink, backlog=True, dead_letters=False)
        targets = SINKS if sink is None else (sink,)
        assert queued == sum(len(self.pending[s]) for s in targets)
        for s in targets:
            self.pending[s].clear()

    def reopen(self, *, kill: bool, tear: bool) -> None:
        if kill:  # SIGKILL: no final fsync or cleanup, the descriptors just go away (the files
            # are as a killed process leaves them; test_spool.py kills a real writer too)
            self.spool.abandon()
        else:
            self.spool.close()
        if tear:  # a power cut halfway through the next append
            last = segment_files(self.path)[-1]
            with last.open("ab") as file:
                file.write(self.rng.randbytes(self.rng.randint(1, 60)))
        self.spool = self.open()

    def read_page(self) -> None:
        """The queue's way: from where the last page ended, ``PAGE_SIZE`` at a time."""
        sink = self.rng.choice(SINKS)
        after = self.position[sink]
        limit = self.rng.randint(1, 5)
        page = self.spool.page(sink, after, self.spool.backlog_upto(sink), limit)
        expected = sorted(s for s in self.pending[sink] if s > after)[:limit]
        assert [t.seq for t in page] == expected, f"{sink}: page after {after}"
        self.position[sink] = page[-1].seq if page else 0

    # --- checks ---------------------------------------------------------------------------

    def check(self, spool: Spool | None = None) -> None:
        spool = spool or self.spool
        backlogs = spool.backlogs()
        for sink in SINKS:
            expected = sorted(self.pending[sink])
            page = spool.page(sink, 0, 2**62, 10**6)
            assert [t.seq for t in page] == expected, f"{sink}: backlog"
            assert page == [self.telegrams[seq] for seq in expected], f"{sink}: contents"
            if expected:
                assert spool.backlog_upto(sink) >= expected[-1]
                backlog = backlogs.get(sink)
                assert backlog is not None, f"{sink}: backlog not counted"
                assert backlog.count == len(expected), f"{sink}: backlog count"
                assert backlog.oldest_received_at == self.telegrams[expected[0]].received_at
            else:
                assert sink not in backlogs, f"{sink}: counted, but nothing is pending"

    def check_shared(self) -> None:
        reader = Spool(self.path, max_bytes=MAX_BYTES)
        reader.open(shared=True)
        try:
            self.check(reader)
        finally:
            reader.close()


def segment_files(path: Path) -> list[Path]:
    return sorted(telegram_dir(path).glob("*" + SUFFIX))


@pytest.mark.parametrize("seed", SEEDS)
def test_the_spool_keeps_what_the_model_keeps(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    model = Model(tmp_path / "spool.sqlite3", rng)
    try:
        for _ in range(STEPS):
            op = rng.random()
            if op < 0.55:
                model.commit()
            elif op < 0.60:
                model.commit(fail=True)
            elif op < 0.68:
                model.dead_letter()
            elif op < 0.80:
                model.read_page()
            elif op < 0.82:
                model.purge()
            elif op < 0.90:
                model.reopen(kill=rng.random() < 0.5, tear=rng.random() < 0.3)
            else:
                model.check_shared()
            model.check()
        model.reopen(kill=False, tear=False)
        model.check()
    finally:
        model.spool.close()


@pytest.mark.parametrize("seed", SEEDS[:8])
def test_a_schema_1_spool_converts_into_the_model_and_lives_on(tmp_path: Path, seed: int) -> None:
    """Rows over several segments (ids with gaps, some already delivered to all) convert
    oldest first; the spool then behaves as if it had always been segments."""
    rng = random.Random(seed)
    path = tmp_path / "spool.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    pending: dict[str, set[int]] = {s: set() for s in SINKS}
    telegrams = {}
    seq = rng.randint(1, 50)
    for _ in range(rng.randint(15, 30)):
        seq += rng.randint(1, 3)
        t = make(seq, rng)
        db.execute("INSERT INTO telegrams VALUES (?, ?, ?)", (seq, t.received_at, t.telegram))
        for sink in rng.sample(SINKS, rng.choice([0, 1, 2, 3])):  # 0: delivered, not deleted
            db.execute("INSERT INTO pending VALUES (?, ?)", (sink, seq))
            pending[sink].add(seq)
            telegrams[seq] = t
    db.commit()
    db.close()
    model = Model(path, rng, telegrams, pending)
    try:
        model.check()
        model.reopen(kill=False, tear=False)
        model.check()
        for _ in range(40):
            if rng.random() < 0.7:
                model.commit()
            else:
                model.reopen(kill=True, tear=False)
            model.check()
    finally:
        model.spool.close()
