"""A damaged spool loses only what is damaged, and says so: counted, logged, repaired.

Before, one flipped bit 10 % into a 500 KB segment lost the 557 telegrams after it, and cutting
the file in half lost 310, silently: ``status`` went from "backlog 3000" to "none". Now reading
resumes at the next record that verifies, what a sink still needed is counted ``lost`` for it
(``spool list``, ``status``), each loss is logged once with the telegrams it can name, and the
file is rewritten without the damage. A damaged SQLite file, or a missing segment directory, no
longer keeps the daemon from reading the meter.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import require_corpus
from dsmr_reader_server import DsmrReaderProcess
from test_daemon_process import API_KEY, Processes, log_events, log_tail, reads, stamp, wait_until
from test_daemon_process import write_config as daemon_config

from dsmr_logger.cli import main
from dsmr_logger.delivery.spool import Spool, StoredTelegram, telegram_dir
from dsmr_logger.delivery.spool.records import parse_head
from dsmr_logger.delivery.spool.scan import Entry, scan
from dsmr_logger.delivery.spool.segments import SUFFIX, SegmentLog

BIG = 64 * 1024 * 1024  # segments of 1 MiB: 600 telegrams of 778 bytes fill half of one


def telegram(seq: int) -> StoredTelegram:
    body = f"/ISK5\\2M550T-{seq:08d}\r\n".encode().ljust(775, b"x") + b"!\r\n"
    return StoredTelegram(seq, body, 1_700_000_000.0 + seq)


def spool_of(path: Path, count: int, sinks: list[str], *, max_bytes: int = BIG) -> None:
    spool = Spool(path, max_bytes=max_bytes)
    spool.open()
    for start in range(1, count + 1, 100):
        batch = range(start, min(start + 100, count + 1))
        spool.commit([(telegram(i), sinks) for i in batch])
    spool.close()


def segments(path: Path) -> list[Path]:
    return sorted(telegram_dir(path).glob("*" + SUFFIX))


def entries(segment: Path) -> list[Entry]:
    log = SegmentLog(segment.parent, segment_bytes=BIG)
    log.open(writer=False, first_seq=1)
    found = next(s for s in log.segments if s.path == segment)
    return [e for e in scan(found) if isinstance(e, Entry)]


def flip(file: Path, offset: int, bit: int = 6) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 1 << bit
    file.write_bytes(bytes(data))


def opened(path: Path, max_bytes: int = BIG) -> tuple[Spool, list[dict[str, Any]]]:
    spool = Spool(path, max_bytes=max_bytes)
    with structlog.testing.capture_logs() as logs:
        spool.open()
    return spool, logs


def seqs(spool: Spool, sink: str) -> list[int]:
    return [t.seq for t in spool.page(sink, 0, 2**62, 10**6)]


def test_one_flipped_bit_costs_one_telegram_not_the_rest_of_its_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spool.sqlite3"
    spool_of(path, 600, ["home"])
    (segment,) = segments(path)
    assert segment.stat().st_size > 480_000
    victim = next(e for e in entries(segment) if e.start > segment.stat().st_size // 10)
    flip(segment, victim.end - 100)  # inside that telegram
    spool, logs = opened(path)
    assert seqs(spool, "home") == [s for s in range(1, 601) if s != victim.seq]
    assert spool.backlogs()["home"].count == 599
    assert spool.counters() == {"home": {"lost": 1}}
    (report,) = [e for e in logs if e["log_level"] == "error"]
    assert report["lost_per_sink"] == {"home": 1}
    assert report["telegrams_named"] == [(victim.seq, victim.received_at, ["home"])]
    spool.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[meter]\nport = "/dev/null"\n[spool]\npath = "{path}"\n')
    assert main(["spool", "--config", str(config), "list"]) == 0
    out = capsys.readouterr().out
    assert "backlog home: 599 telegrams" in out and "lost home: 1 " in out, out
    again, logs = opened(path)
    assert again.counters() == {"home": {"lost": 1}}, "counted twice"
    assert not [e for e in logs if e["log_level"] == "error"]
    again.close()


def test_a_sink_that_had_confirmed_the_damaged_telegram_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool_of(path, 50, ["a", "b"])
    spool = Spool(path, max_bytes=BIG)
    spool.open()
    spool.commit(acks=[("a", 20)])  # out of order: a still needs 1..19
    spool.close()
    (segment,) = segments(path)
    victim = next(e for e in entries(segment) if e.seq == 20)
    flip(segment, victim.end - 3)
    spool, _ = opened(path)
    assert 20 not in seqs(spool, "b")
    assert spool.counters() == {"b": {"lost": 1}}
    assert seqs(spool, "a") == [s for s in range(1, 51) if s != 20]
    spool.close()


def test_a_flip_in_a_records_head_costs_that_record_and_is_counted(tmp_path: Path) -> None:
    """The head names the telegram; damaged, the count comes from the segment's summary."""
    path = tmp_path / "spool.sqlite3"
    spool_of(path, 40, ["home"], max_bytes=16 * 8000)  # segments of 8,000 bytes: sealed ones
    first = segments(path)[0]
    victim = entries(first)[3]
    head = parse_head(first.read_bytes(), victim.start)
    assert head is not None
    flip(first, victim.start + 14)  # its seq
    spool, _ = opened(path, 16 * 8000)  # a sealed segment is checked when it is read
    with structlog.testing.capture_logs() as logs:
        assert seqs(spool, "home") == [s for s in range(1, 41) if s != victim.seq]
    assert spool.counters() == {"home": {"lost": 1}}
    assert [e["records_unreadable"] for e in logs if e["log_level"] == "error"] == [1]
    spool.close()


def test_a_segment_cut_in_half_counts_exactly_what_it_lost(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool_of(path, 60, ["a", "b"], max_bytes=16 * 16000)
    first = segments(path)[0]
    held = entries(first)
    os.truncate(first, first.stat().st_size // 2)
    kept = entries(first)
    cut = len(held) - len(kept)
    assert cut > 5
    spool, _ = opened(path, 16 * 16000)
    assert spool.counters() == {"a": {"lost": cut}, "b": {"lost": cut}}
    expected = [s for s in range(1, 61) if s not in {e.seq for e in held[len(kept) :]}]
    assert seqs(spool, "a") == seqs(spool, "b") == expected
    assert spool.backlogs()["a"].count == 60 - cut
    spool.close()


def test_damage_found_while_running_is_repaired_and_counted_once(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_bytes=BIG)
    spool.open()
    spool.commit([(telegram(i), ["home"]) for i in range(1, 101)])
    (segment,) = segments(path)
    victim = entries(segment)[40]
    flip(segment, victim.end - 10)
    size = segment.stat().st_size
    with structlog.testing.capture_logs() as logs:
        assert len(spool.page("home", 0, 2**62, 1000)) == 99
        assert len(spool.page("home", 0, 2**62, 1000)) == 99
    assert segment.stat().st_size == size - (victim.end - victim.start), "not repaired"
    assert spool.counters() == {"home": {"lost": 1}}
    assert len([e for e in logs if e["log_level"] == "error"]) == 1
    spool.commit([(telegram(101), ["home"])], acks=[("home", 1)])
    assert seqs(spool, "home") == [s for s in range(2, 102) if s != victim.seq]
    spool.close()


def test_a_damaged_telegram_the_cap_drops_is_dropped_with_its_copy_in_memory(
    tmp_path: Path,
) -> None:
    """The cap drops the oldest segment, which holds a telegram whose bytes were damaged since
    (its head still names it). It was counted ``lost`` and left out of what the commit reports
    dropped, so a sink still holding it in memory delivered it: 11 counted lost in a run, all
    11 delivered. The cap drops it as the rest of its segment: reported dropped (the queue
    forgets its copy), counted once, as dropped."""
    path = tmp_path / "spool.sqlite3"
    cap = 16 * 8000  # segments of 8,000 bytes: 9 telegrams each
    spool = Spool(path, max_bytes=cap)
    spool.open()
    assert spool.commit([(telegram(i), ["home"]) for i in range(1, 31)]) == {}
    first = segments(path)[0]
    victim = entries(first)[4]
    flip(first, victim.end - 10)  # inside its telegram
    dropped = spool.commit([(telegram(i), ["home"]) for i in range(31, 180)])
    assert victim.seq in dropped["home"], "its copy in memory would still be delivered"
    assert spool.counters()["home"] == {"dropped": len(dropped["home"])}
    assert victim.seq not in seqs(spool, "home")
    spool.close()


def test_an_interrupted_repair_is_finished_at_the_next_open_and_not_counted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.sqlite3"
    spool_of(path, 30, ["home"])
    (segment,) = segments(path)
    victim = entries(segment)[10]
    flip(segment, victim.end - 10)
    spool = Spool(path, max_bytes=BIG)

    def power_cut(*args: object) -> None:
        raise KeyboardInterrupt("power cut between counting and replacing the file")

    monkeypatch.setattr(spool.damage, "replace", power_cut)
    with pytest.raises(KeyboardInterrupt):
        spool.open()
    spool.abandon()
    assert segment.with_name(segment.name + ".new").exists()
    monkeypatch.undo()
    again, logs = opened(path)
    assert again.counters() == {"home": {"lost": 1}}
    assert seqs(again, "home") == [s for s in range(1, 31) if s != victim.seq]
    assert not segment.with_name(segment.name + ".new").exists()
    assert not [e for e in logs if e["log_level"] == "error"], "reported (and counted) twice"
    again.close()


def corrupt_state(path: Path) -> None:
    """Overwrite SQLite's pages past the header (as a bad SD card sector would)."""
    data = bytearray(path.read_bytes())
    data[100:] = os.urandom(len(data) - 100)
    path.write_bytes(bytes(data))


def test_a_damaged_state_file_is_set_aside_and_the_backlog_rebuilt_from_segments(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    spool_of(path, 30, ["a", "b"])
    spool = Spool(path, max_bytes=BIG)
    spool.open()
    spool.commit(acks=[("a", i) for i in range(1, 11)])
    spool.dead_letter("b", telegram(30), status=400, body="", reason="refused", spooled=True)
    spool.close()
    corrupt_state(path)
    spool, logs = opened(path)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "spool state file damaged: moved aside, rebuilt from the segment files; telegrams in "
        "them are sent again (at least once), dead letters and counters stay in the moved file"
    ]
    assert seqs(spool, "a") == seqs(spool, "b") == list(range(1, 31)), "sent again, not lost"
    assert spool.last_seq() >= 30
    spool.commit([(telegram(31), ["a"])])
    spool.close()
    (aside,) = tmp_path.glob("spool.sqlite3.damaged-*")
    assert aside.stat().st_size > 0


def test_a_missing_segment_directory_counts_the_sealed_backlog_lost(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool_of(path, 60, ["home"], max_bytes=16 * 16000)
    sealed = segments(path)[:-1]
    lost = sum(len(entries(s)) for s in sealed)
    shutil.rmtree(telegram_dir(path))
    spool, logs = opened(path, 16 * 16000)
    (report,) = [e for e in logs if e["log_level"] == "error"]
    assert report["event"].startswith("spool segment directory missing")
    assert report["lost_per_sink"] == {"home": lost}
    assert spool.counters() == {"home": {"lost": lost}}
    assert spool.backlogs() == {}
    spool.commit([(telegram(61), ["home"])])
    assert seqs(spool, "home") == [61]
    spool.close()


def test_a_format_1_segment_with_a_flipped_bit_converts_keeping_the_rest(tmp_path: Path) -> None:
    from spool_v1 import write_schema_2

    path = tmp_path / "spool.sqlite3"
    write_schema_2(path, [(telegram(i), ["home"]) for i in range(1, 41)], segment_records=20)
    first = segments(path)[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0x10
    first.write_bytes(bytes(data))
    spool, _ = opened(path)
    kept = seqs(spool, "home")
    assert len(kept) == 39 and kept == sorted(kept)
    assert spool.counters() == {"home": {"lost": 1}}
    spool.close()


# --- the daemon, as a process -----------------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path) -> Any:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


def test_a_daemon_whose_state_file_is_damaged_reads_delivers_and_says_so_once(
    tmp_path: Path, procs: Processes
) -> None:
    """A damaged SQLite file once kept the daemon from starting: nothing read until a person
    acted. Now it is moved aside, the backlog is rebuilt from the segments and delivered
    first, and the meter is read meanwhile."""
    require_corpus()
    with DsmrReaderProcess(API_KEY, mode="refuse") as server:
        config = daemon_config(tmp_path, server.url, level="debug")
        first, log = procs.daemon(config)
        meter = procs.meter(interval=0.03, count=120)
        wait_until(lambda: len(reads(log)) >= 20, 15, "20 telegrams read")
        first.terminate()
        assert first.wait(timeout=15) == 0
        backlog = [s for s, _ in reads(log)]
        corrupt_state(tmp_path / "spool.sqlite3")
        server.control(mode="ok")
        second, log2 = procs.daemon(config)
        assert meter.wait(timeout=30) == 0
        everything = backlog + [s for s, _ in reads(log2)]
        wait_until(
            lambda: server.state()["received"] >= len(everything),
            20,
            "the backlog and the new telegrams delivered",
            detail=lambda: log_tail(log2),
        )
        second.terminate()
        assert second.wait(timeout=15) == 0
        delivered = [stamp(t) for t in server.received()]
        assert delivered[: len(backlog)] == backlog, "the rebuilt backlog first, in order"
        assert sorted(set(delivered)) == sorted(set(everything))
        errors = [e for e in log_events(log2) if e.get("level") == "error"]
        assert [e["event"][:27] for e in errors] == ["spool state file damaged: m"]
    assert sqlite3.connect(tmp_path / "spool.sqlite3").execute("PRAGMA quick_check").fetchone() == (
        "ok",
    )


def state_page(path: Path, table: str) -> tuple[int, int]:
    """Where a small table's one page is in the (checkpointed) SQLite file: (start, size)."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = db.execute("PRAGMA page_size").fetchone()[0]
        query = "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?"
        (root,) = db.execute(query, (table,)).fetchone()
    finally:
        db.close()
    return (root - 1) * size, size


@pytest.mark.parametrize("table", ["cursors", "done", "segments"])
def test_a_flipped_bit_in_the_state_file_never_skips_telegrams_silently(
    tmp_path: Path, table: str
) -> None:
    """SQLite checks a file's structure, not its content: one flipped bit in a cursor's seq
    skipped a sink's whole backlog (100 of 100), one in a segment's summary 86 telegrams, with
    no count and no line, and one in ``done`` made the next start fail. Flipped anywhere in
    the table's rows, a bit now either changes nothing the sinks get or is found: the state is
    moved aside and rebuilt from the segment files (sent again: at least once)."""
    original = tmp_path / "original" / "spool.sqlite3"
    cap = 16 * 8000  # segments of 8,000 bytes: 9 telegrams each, summaries for each
    spool = Spool(original, max_bytes=cap)
    spool.open()
    spool.commit([(telegram(i), ["a", "b"]) for i in range(1, 121)])
    spool.commit(acks=[*(("a", i) for i in range(1, 41)), ("b", 60), ("b", 62)])
    spool.close()
    reader = Spool(original, max_bytes=cap)
    reader.open(shared=True)
    before = {sink: seqs(reader, sink) for sink in ("a", "b")}
    reader.close()
    assert len(before["a"]) == 80 and len(before["b"]) == 118
    start, size = state_page(original, table)
    silent = []
    for offset in range(start + size - 60, start + size, 2):
        for bit in (0, 5, 7):  # 7: a sink name no longer UTF-8
            copy = tmp_path / f"flip-{offset}-{bit}"
            shutil.copytree(original.parent, copy)
            flip(copy / "spool.sqlite3", offset, bit)
            spool, logs = opened(copy / "spool.sqlite3", cap)
            after = {sink: set(seqs(spool, sink)) for sink in ("a", "b")}
            lost = {sink: counts.get("lost", 0) for sink, counts in spool.counters().items()}
            spool.close()
            said = any(e["log_level"] == "error" for e in logs)
            missing = {sink: len(set(before[sink]) - after[sink]) for sink in before}
            if any(n > lost.get(sink, 0) for sink, n in missing.items()) and not said:
                silent.append((offset - start, bit, missing))
            shutil.rmtree(copy)
    assert not silent, f"telegrams skipped without a word: {silent}"
