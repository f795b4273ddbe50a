"""The spool on real files: segment files for telegrams, SQLite beside them for the state.

Stored once, acknowledged away (files deleted once every sink is done), bounded, crash-safe,
owned by one daemon, and converted from the format before segments.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from spool_v1 import SCHEMA_1, write_schema_2

from dsmr_logger.delivery.spool import (
    SCHEMA_VERSION,
    Spool,
    SpoolError,
    StoredTelegram,
    telegram_dir,
)
from dsmr_logger.delivery.spool.records import MAGIC, encode
from dsmr_logger.delivery.spool.segments import SUFFIX, read_entries

RECORD_OVERHEAD = 40
"""Header and sink names of one record, generously (the real figure is 26 + the names)."""


def telegram(seq: int, size: int = 100) -> StoredTelegram:
    body = f"/TEST{seq:08d}\r\n".encode().ljust(size - 3, b"x") + b"!\r\n"
    return StoredTelegram(seq, body, 1_700_000_000.0 + seq)


def segment_files(path: Path) -> list[Path]:
    return sorted(telegram_dir(path).glob("*" + SUFFIX))


def seqs(spool: Spool, sink: str) -> list[int]:
    return [t.seq for t in spool.page(sink, 0, 2**62, 10**6)]


def one_segment(path: Path, count: int) -> Path:
    """A closed spool holding telegrams 1..count for sink "a"; its one segment file."""
    spool = Spool(path, max_bytes=10**6)
    spool.open()
    spool.commit([(telegram(i), ["a"]) for i in range(1, count + 1)])
    spool.close()
    (segment,) = segment_files(path)
    return segment


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool.sqlite3", max_bytes=1_000_000)
    s.open()
    yield s
    s.close()


def test_a_telegram_for_two_sinks_is_stored_once_and_leaves_after_both_confirm(
    spool: Spool,
) -> None:
    spool.commit([(telegram(1), ["a", "b"])])
    (segment,) = spool.log.segments
    assert [(e.seq, e.sinks, e.telegram) for e in read_entries(segment)] == [
        (1, ("a", "b"), telegram(1).telegram)
    ]
    assert spool.page("a", 0, 10, 10) == [telegram(1)]
    spool.commit(acks=[("a", 1)])
    assert spool.page("a", 0, 10, 10) == []
    assert spool.page("b", 0, 10, 10) == [telegram(1)]
    assert set(spool.backlogs()) == {"b"}
    spool.commit(acks=[("b", 1)])
    assert spool.backlogs() == {}


def test_segments_are_deleted_once_every_sink_is_done(tmp_path: Path) -> None:
    """Sink b only gets every third telegram (min_interval): it must not hold the files back."""
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_bytes=16 * 1000)  # 1,000-byte segments: about 7 telegrams each
    spool.open()
    spool.commit([(telegram(i), ["a", "b"] if i % 3 == 0 else ["a"]) for i in range(1, 61)])
    assert len(segment_files(path)) >= 8
    assert spool.backlogs()["a"].count == 60
    assert spool.backlogs()["b"].count == 20
    spool.commit(acks=[("a", i) for i in range(1, 61)])
    assert set(spool.backlogs()) == {"b"}
    assert len(segment_files(path)) >= 8, "b still needs telegrams in every segment"
    spool.commit(acks=[("b", i) for i in range(3, 61, 3)])
    assert spool.backlogs() == {}
    assert len(segment_files(path)) == 1, "only the segment being appended to is left"
    assert spool.stored_bytes < 1000
    spool.close()


def test_backlog_is_read_back_oldest_first_in_pages(spool: Spool) -> None:
    spool.commit([(telegram(i), ["a"]) for i in range(1, 11)])
    first = spool.page("a", 0, 10, 4)
    second = spool.page("a", first[-1].seq, 10, 4)
    assert [t.seq for t in first + second] == list(range(1, 9))
    assert spool.page("a", 3, 5, 10) == [telegram(4), telegram(5)]
    assert spool.backlog_upto("a") == 10
    assert spool.backlogs()["a"].count == 10
    assert spool.backlogs()["a"].oldest_received_at == telegram(1).received_at


def test_acknowledgements_out_of_order_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_bytes=10**6)
    spool.open()
    spool.commit([(telegram(i), ["a"]) for i in range(1, 6)])
    spool.commit(acks=[("a", 2), ("a", 3), ("a", 5)])
    assert seqs(spool, "a") == [1, 4]
    spool.close()
    again = Spool(path, max_bytes=10**6)
    again.open()
    assert seqs(again, "a") == [1, 4]
    assert again.backlogs()["a"].count == 2
    again.commit(acks=[("a", 1)])
    assert seqs(again, "a") == [4]
    assert again.backlogs()["a"].oldest_received_at == telegram(4).received_at
    again.close()


def test_spooling_costs_about_the_telegrams_themselves(tmp_path: Path) -> None:
    """What an outage adds to the card: the telegrams plus a small header, not pages of index."""
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_bytes=10**8)
    spool.open()
    sizes = 0
    for start in range(1, 301, 3):  # a commit every few telegrams, as at 1 Hz
        batch = [(telegram(i, 778), ["home"]) for i in range(start, start + 3)]
        sizes += sum(len(t.telegram) for t, _ in batch)
        spool.commit(batch)
    on_disk = sum(p.stat().st_size for p in segment_files(path))
    assert sizes < on_disk <= sizes + 300 * RECORD_OVERHEAD
    assert spool.stored_bytes == on_disk
    spool.close()


def test_full_spool_drops_oldest_and_counts_per_sink(tmp_path: Path) -> None:
    cap = 16 * 500  # segments of 500 bytes: three 100-byte telegrams each
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=cap)
    spool.open()
    dropped = spool.commit([(telegram(i), ["a", "b"]) for i in range(1, 40)])
    assert dropped == {}
    assert spool.stored_bytes <= cap
    dropped = {}
    for i in range(40, 100):
        for sink, lost in spool.commit([(telegram(i), ["a"])]).items():
            dropped.setdefault(sink, []).extend(lost)
        assert spool.stored_bytes <= cap
    kept = seqs(spool, "a")
    assert kept == list(range(kept[0], 100)), "what is kept is the newest, without gaps"
    assert dropped["a"] == list(range(1, kept[0]))
    assert dropped["b"] == list(range(1, 40))
    assert seqs(spool, "b") == []
    assert spool.counters()["a"]["dropped"] == len(dropped["a"])
    assert spool.counters()["b"]["dropped"] == 39
    spool.close()


def test_the_cap_spares_telegrams_being_sent(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=16 * 500)
    spool.open()
    spool.commit([(telegram(i), ["a"]) for i in range(1, 40)])
    dropped = spool.commit([(telegram(i), ["a"]) for i in range(40, 90)], protect={1, 2})
    assert 1 not in dropped["a"] and 2 not in dropped["a"]
    assert seqs(spool, "a")[:2] == [1, 2]
    assert set(dropped["a"]).isdisjoint(seqs(spool, "a"))
    spool.commit(acks=[("a", 1), ("a", 2)])
    assert spool.stored_bytes <= 16 * 500 + 500
    spool.close()


def test_a_batch_larger_than_the_spool_keeps_its_newest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=1000)
    spool.open()
    dropped = spool.commit([(telegram(i), ["a"]) for i in range(1, 31)])
    kept = seqs(spool, "a")
    assert kept == list(range(kept[0], 31))
    assert dropped == {"a": list(range(1, kept[0]))}
    assert spool.stored_bytes <= 1000
    spool.close()


def test_dead_letter_keeps_answer_and_requeue_hands_it_back(spool: Spool) -> None:
    spool.commit([(telegram(1), ["a"]), (telegram(2), ["a"])])
    spool.dead_letter(
        "a",
        telegram(1),
        status=500,
        body="Failed to parse telegram",
        reason="refused",
        spooled=True,
    )
    assert [t.seq for t in spool.page("a", 0, 10, 10)] == [2]
    (letter,) = spool.dead_letters("a")
    assert (letter.status, letter.body, letter.telegram) == (
        500,
        "Failed to parse telegram",
        telegram(1).telegram,
    )
    assert spool.requeue(sink="a") == 1
    assert spool.dead_letters() == []
    ((row, sink, waiting),) = spool.requeued(["a", "b"])
    assert (sink, waiting.telegram, waiting.received_at) == (
        "a",
        telegram(1).telegram,
        telegram(1).received_at,
    )
    assert spool.requeued(["b"]) == []
    spool.forget_requeued([row])
    assert spool.requeued(["a"]) == []


def test_seq_continues_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    spool = Spool(path, max_bytes=10**6)
    spool.open()
    spool.commit([(telegram(41), ["a"])])
    spool.close()
    again = Spool(path, max_bytes=10**6)
    again.open()
    assert again.last_seq() == 41
    again.commit([(telegram(42), ["a"])], acks=[("a", 41)])
    again.commit(acks=[("a", 42)])
    again.close()
    third = Spool(path, max_bytes=10**6)
    third.open()
    assert third.last_seq() == 42, "all delivered: the numbering still goes on"
    third.close()


def test_a_torn_last_record_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    segment = one_segment(path, 5)
    whole = segment.stat().st_size
    with segment.open("r+b") as file:  # a power cut halfway through the next append
        file.seek(whole)
        file.write(b"\x01\x02\x03" * 20)
    again = Spool(path, max_bytes=10**6)
    again.open()
    assert segment.stat().st_size == whole, "the torn tail is cut back to the whole records"
    assert again.counters() == {}, "a torn write lost no telegram the spool had"
    assert seqs(again, "a") == [1, 2, 3, 4, 5]
    again.commit([(telegram(6), ["a"])])
    assert seqs(again, "a") == [1, 2, 3, 4, 5, 6]
    again.close()


def test_a_bit_flip_ends_the_segment_there(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    segment = one_segment(path, 5)
    data = bytearray(segment.read_bytes())
    data[-60] ^= 0x40  # inside the last telegram
    segment.write_bytes(bytes(data))
    again = Spool(path, max_bytes=10**6)
    again.open()
    assert seqs(again, "a") == [1, 2, 3, 4]
    again.close()


def test_one_daemon_owns_a_spool_and_the_tools_read_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    owner = Spool(path, max_bytes=10**6)
    owner.open()
    owner.commit([(telegram(i), ["a"]) for i in range(1, 4)])
    with pytest.raises(SpoolError, match="in use by another dsmr-logger daemon"):
        Spool(path, max_bytes=10**6).open()
    reader = Spool(path, max_bytes=10**6)
    reader.open(shared=True)
    assert reader.backlogs()["a"].count == 3
    assert seqs(reader, "a") == [1, 2, 3]
    with pytest.raises(SpoolError, match="not to write"):
        reader.commit([(telegram(4), ["a"])])
    reader.close()
    owner.close()
    successor = Spool(path, max_bytes=10**6)
    successor.open()
    assert seqs(successor, "a") == [1, 2, 3]
    successor.close()


def test_a_spool_from_before_segments_is_converted_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    for i in range(1, 8):
        t = telegram(i)
        db.execute("INSERT INTO telegrams VALUES (?, ?, ?)", (i, t.received_at, t.telegram))
        db.execute("INSERT INTO pending VALUES ('a', ?)", (i,))
        if i % 2:
            db.execute("INSERT INTO pending VALUES ('b', ?)", (i,))
    db.execute(
        "INSERT INTO dead_letters (sink, telegram_id, received_at, data, body, reason, at) "
        "VALUES ('a', 9, 1.0, x'00', '', 'refused', 2.0)"
    )
    db.commit()
    db.close()
    reader = Spool(path, max_bytes=10**6)
    with pytest.raises(SpoolError, match="start the daemon once"):
        reader.open(shared=True)
    spool = Spool(path, max_bytes=10**6)
    spool.open()
    assert spool.page("a", 0, 100, 100) == [telegram(i) for i in range(1, 8)]
    assert seqs(spool, "b") == [1, 3, 5, 7]
    assert spool.backlogs()["b"].count == 4
    assert len(spool.dead_letters()) == 1
    assert spool.last_seq() == 9
    assert spool.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in spool.db.execute("SELECT name FROM sqlite_master")}
    assert "telegrams" not in tables and "pending" not in tables
    spool.close()


def test_a_conversion_killed_mid_append_resumes_without_losing_the_torn_telegram(
    tmp_path: Path,
) -> None:
    """A schema-1 spool's conversion killed while appending (SIGKILL cuts a write short: 1 of
    12 kills in a run): its rows are all still there, but the log ends in a torn record. The
    next start cut the torn record, counted it lost, skipped its row as "already in the log",
    and dropped the rows: 1 telegram lost that the spool held. A cut record is no longer in
    the log: its row is appended again."""
    path = tmp_path / "spool.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    for i in range(1, 51):
        t = telegram(i)
        db.execute("INSERT INTO telegrams VALUES (?, ?, ?)", (i, t.received_at, t.telegram))
        db.execute("INSERT INTO pending VALUES ('a', ?)", (i,))
    db.commit()
    db.close()
    records = [encode(i, telegram(i).received_at, ["a"], telegram(i).telegram) for i in range(31)]
    torn = records[30][: len(records[30]) // 2]  # telegram 30, cut short
    telegram_dir(path).mkdir()
    (telegram_dir(path) / f"{1:016d}{SUFFIX}").write_bytes(MAGIC + b"".join(records[1:30]) + torn)
    spool = Spool(path, max_bytes=10**6)
    spool.open()
    assert seqs(spool, "a") == list(range(1, 51))
    assert spool.counters() == {}, "nothing was lost"
    spool.close()


def test_a_file_that_is_not_a_spool_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SpoolError, match=r"spool\.sqlite3"):
        Spool(path, max_bytes=10**6).open()


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dsmr_logger.delivery.spool import Spool, StoredTelegram
    spool = Spool(Path(sys.argv[1]), max_bytes=10**9)
    spool.open()
    seq = 0
    while True:
        batch = []
        for _ in range(50):
            seq += 1
            batch.append((StoredTelegram(seq, b"/X\\r\\n" + b"y" * 900 + b"!\\r\\n", seq), ["a"]))
        spool.commit(batch, acks=[("a", seq - 120)] if seq > 120 else [])
        print(seq, flush=True)
    """
)


def test_sigkill_during_commits_leaves_a_consistent_spool(tmp_path: Path) -> None:
    """Killed mid-write: every batch reported committed is there, every telegram whole, and the
    next owner appends after it."""
    path = tmp_path / "spool.sqlite3"
    for _ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout is not None
        committed = 0
        deadline = time.monotonic() + 10
        while committed < 2000 and time.monotonic() < deadline:
            committed = int(writer.stdout.readline())
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        spool = Spool(path, max_bytes=10**9)
        spool.open()
        page = spool.page("a", 0, 2**62, 10**6)
        stored = [t.seq for t in page]
        assert stored[-1] >= committed, "a batch reported committed is missing"
        # Killed mid-append, a batch may be cut between records, never inside one.
        assert all(t.telegram == b"/X\r\n" + b"y" * 900 + b"!\r\n" for t in page)
        missing = set(range(1, stored[-1] + 1)) - set(stored)
        acked = {50 * k - 120 for k in range(3, stored[-1] // 50 + 1)}
        assert missing <= acked, "only acknowledged telegrams are gone"
        assert len(acked - missing) <= 1, "at most the last batch's acknowledgement is lost"
        assert spool.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        spool.commit([(StoredTelegram(stored[-1] + 1, b"/next!\r\n", 0.0), ["a"])])
        assert seqs(spool, "a")[-1] == stored[-1] + 1
        spool.close()
        for file in [path, *segment_files(path)]:
            file.unlink()
        for extra in ("-wal", "-shm"):
            Path(str(path) + extra).unlink(missing_ok=True)


def test_appended_telegrams_reach_the_card_within_the_sync_interval(tmp_path: Path) -> None:
    """Batched durability: an fsync is due once appended telegrams waited ``sync_interval``,
    even if no further commit comes (the daemon's flusher asks ``sync_due``)."""
    now = [1000.0]
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=10**6, sync_interval=30.0, clock=lambda: now[0])
    spool.open()
    spool.commit([(telegram(1), ["a"])])  # the first commit after opening syncs at once
    spool.commit([(telegram(2), ["a"])])
    assert not spool.sync_due()
    now[0] += 29.0
    assert not spool.sync_due()
    now[0] += 1.0
    assert spool.sync_due()
    spool.sync()
    assert not spool.sync_due()
    spool.commit(acks=[("a", 1)])  # a confirmation appends nothing: nothing to sync
    now[0] += 60.0
    assert not spool.sync_due()
    spool.close()


def test_a_damaged_length_field_ends_the_segment_without_reading_gigabytes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    segment = one_segment(path, 3)
    data = bytearray(segment.read_bytes())
    third = len(data) - (len(data) - 8) // 3  # where record 3 starts (equal sizes)
    data[third + 4 : third + 8] = (0xFFFFFFF0).to_bytes(4, "little")  # its length: ~4 GiB
    segment.write_bytes(bytes(data))
    again = Spool(path, max_bytes=10**6)
    again.open()
    assert seqs(again, "a") == [1, 2]
    again.close()


def test_a_dead_letter_for_a_telegram_not_yet_spooled_leaves_no_trace(spool: Spool) -> None:
    """A commit that failed leaves its telegrams out of the log; a dead letter for one of them
    must not mark anything done (the retry spools it without that sink)."""
    spool.commit([(telegram(1), ["a"])])
    spool.dead_letter("a", telegram(2), status=400, body="", reason="refused", spooled=True)
    spool.commit([(telegram(2), ["b"])])
    assert spool.backlogs()["a"].count == 1
    assert seqs(spool, "a") == [1]
    assert seqs(spool, "b") == [2]
    assert len(spool.dead_letters("a")) == 1


def test_a_schema_2_spool_is_upgraded_in_place_and_keeps_its_backlog(tmp_path: Path) -> None:
    """Segments of format-1 records (sink names joined by newlines) are rewritten as format 2
    at the daemon's first start; cursors, out-of-order confirmations and the backlog stay."""
    path = tmp_path / "spool.sqlite3"
    sent = [(telegram(i), ["a", "b"] if i % 3 == 0 else ["a"]) for i in range(1, 71)]
    write_schema_2(path, sent, segment_records=20, cursors={"a": 5}, done=[("a", 8)])
    reader = Spool(path, max_bytes=10**6)  # a tool, before the daemon converted it
    reader.open(shared=True)
    assert reader.backlogs()["a"].count == 64
    assert seqs(reader, "b") == list(range(3, 71, 3))
    reader.close()
    spool = Spool(path, max_bytes=10**6)
    spool.open()
    assert spool.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [p.read_bytes()[:8] for p in segment_files(path)] == [MAGIC] * 4
    expected_a = [i for i in range(6, 71) if i != 8]
    assert seqs(spool, "a") == expected_a
    assert spool.page("a", 0, 100, 2) == [telegram(6), telegram(7)]
    assert seqs(spool, "b") == list(range(3, 71, 3))
    assert spool.backlogs()["a"].count == len(expected_a)
    assert spool.counters() == {}
    spool.commit([(telegram(71), ["b"])], acks=[("a", 6), ("a", 7)])
    spool.close()
    again = Spool(path, max_bytes=10**6)
    again.open()
    assert seqs(again, "a") == expected_a[2:]
    assert seqs(again, "b") == [*range(3, 71, 3), 71]
    again.close()
