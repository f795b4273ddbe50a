"""The spool on a real SQLite file: stored once, acknowledged away, bounded, crash-safe."""

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

from dsmr_logger.delivery.spool import Spool, SpoolError, StoredTelegram


def telegram(seq: int, size: int = 100) -> StoredTelegram:
    body = f"/TEST{seq:08d}\r\n".encode().ljust(size - 3, b"x") + b"!\r\n"
    return StoredTelegram(seq, body, 1_700_000_000.0 + seq)


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
    assert spool.db.execute("SELECT COUNT(*) FROM telegrams").fetchone()[0] == 1
    assert spool.page("a", 0, 10, 10) == [telegram(1)]
    spool.commit(acks=[("a", 1)])
    assert spool.page("a", 0, 10, 10) == []
    assert spool.page("b", 0, 10, 10) == [telegram(1)]
    spool.commit(acks=[("b", 1)])
    assert spool.db.execute("SELECT COUNT(*) FROM telegrams").fetchone()[0] == 0
    assert spool.stored_bytes == 0


def test_backlog_is_read_back_oldest_first_in_pages(spool: Spool) -> None:
    spool.commit([(telegram(i), ["a"]) for i in range(1, 11)])
    first = spool.page("a", 0, 10, 4)
    second = spool.page("a", first[-1].seq, 10, 4)
    assert [t.seq for t in first + second] == list(range(1, 9))
    assert spool.backlog_upto("a") == 10
    assert spool.backlogs()["a"].count == 10
    assert spool.backlogs()["a"].oldest_received_at == telegram(1).received_at


def test_full_spool_drops_oldest_and_counts_per_sink(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=1000)
    spool.open()
    dropped = spool.commit([(telegram(i), ["a", "b"]) for i in range(1, 11)])
    assert dropped == {}
    dropped = spool.commit([(telegram(i), ["a"]) for i in range(11, 14)])
    assert dropped == {"a": [1, 2, 3], "b": [1, 2, 3]}
    assert [t.seq for t in spool.page("a", 0, 100, 100)] == list(range(4, 14))
    assert spool.stored_bytes <= 1000
    assert spool.counters()["a"]["dropped"] == 3
    spool.close()


def test_dead_letter_keeps_answer_and_requeue_hands_it_back(spool: Spool) -> None:
    spool.commit([(telegram(1), ["a"]), (telegram(2), ["a"])])
    spool.dead_letter(
        "a", telegram(1), status=500, body="Failed to parse telegram", reason="refused"
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
    assert again.stored_bytes == len(telegram(41).telegram)
    again.close()


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
        spool.commit(batch)
        print(seq, flush=True)
    """
)


def test_sigkill_during_commits_leaves_a_consistent_spool(tmp_path: Path) -> None:
    """Power loss mid-write: every batch reported committed is there, whole; the file is sane."""
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
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        count = db.execute("SELECT COUNT(*) FROM telegrams").fetchone()[0]
        pending = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
        db.close()
        assert count >= committed
        assert count % 50 == 0, "a batch is all or nothing"
        assert pending == count
        path.unlink()
        for extra in ("-wal", "-shm"):
            Path(str(path) + extra).unlink(missing_ok=True)


def test_a_batch_larger_than_the_spool_keeps_its_newest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3", max_bytes=1000)
    spool.open()
    dropped = spool.commit([(telegram(i), ["a"]) for i in range(1, 31)])
    assert dropped == {"a": list(range(1, 21))}
    assert [t.seq for t in spool.page("a", 0, 100, 100)] == list(range(21, 31))
    assert spool.stored_bytes <= 1000
    spool.close()
