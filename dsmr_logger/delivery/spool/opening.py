"""Opening a spool: the checks and repairs that make whatever is on disk usable again.

In order: connect SQLite (a damaged file is moved aside and the state rebuilt from the
segments); find the segments and finish a rewrite a crash interrupted; load cursors and
summaries, summarising by reading what SQLite has no summary of; then, for the daemon only,
check what the summaries promise (a sealed segment deleted or cut short is counted lost),
convert format-1 segments and schema-1 rows, and repair damage found on the way. A missing
segment directory, a damaged SQLite file or a damaged segment never stops the daemon: each is
logged once, loudly, with what it cost.

Invariant: after ``open`` every summary counts exactly what its file holds, and the daemon's
log ends in whole records, so the first append lands after them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dsmr_logger.delivery.spool.damage import is_v1
from dsmr_logger.delivery.spool.letters import StoredTelegram
from dsmr_logger.delivery.spool.state import SCHEMA_VERSION, SpoolError

if TYPE_CHECKING:
    from dsmr_logger.delivery.spool.facade import Spool


class Opening:
    def __init__(self, spool: Spool, logger: Any) -> None:
        self._spool = spool
        self._logger = logger

    def open(self, *, writer: bool) -> None:
        spool = self._spool
        state, log = spool.state, spool.log
        directory_missing = writer and spool.path.exists() and not log.directory.is_dir()
        version = state.open(writer=writer)
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"{spool.path}: written by a newer dsmr-logger (schema {version}); upgrade"
            )
        if not writer and version < SCHEMA_VERSION and state.has_table("telegrams"):
            raise SpoolError(
                f"{spool.path}: written by an older dsmr-logger; "
                "start the daemon once to convert it"
            )
        if state.set_aside is not None:
            self._logger.error(
                "spool state file damaged: moved aside, rebuilt from the segment files; "
                "telegrams in them are sent again (at least once), dead letters and counters "
                "stay in the moved file",
                moved_to=str(state.set_aside),
            )
        spool.damage.noted.clear()
        spool.damage.noted.update({s: c.get("lost", 0) for s, c in state.counters().items()})
        log.open(writer=writer, first_seq=self._first_seq())
        if writer:
            spool.damage.finish_interrupted()
        self._load(writer=writer, directory_missing=directory_missing)
        if not writer:
            return
        for segment in list(log.segments):
            size = spool.summaries.sizes.get(segment.first_seq)
            old_format = version < SCHEMA_VERSION and is_v1(segment)  # else no file opened
            if (size is not None and size != segment.size) or old_format:
                log.damaged.add(segment.first_seq)
        if state.has_table("telegrams"):  # a conversion to finish: the rows are the telegrams
            spool.damage.copied = {row for (row,) in state.db.execute("SELECT id FROM telegrams")}
        try:
            for first in sorted(log.damaged):
                damaged = log.find(first)
                if damaged is not None:
                    spool.damage.repair(damaged)
            spool.summaries.observed.clear()  # every observed file was read whole and repaired
            self._convert_rows()
        finally:
            spool.damage.copied = ()
        state.set_version()
        spool.forget_finished()
        state.present()  # notes the WAL the writes above made

    def _first_seq(self) -> int:
        """What a new log's first segment is named: above every seq SQLite knows, or, when
        schema-1 rows are still to be converted, the oldest of them (a segment's name must not
        exceed the seqs in it)."""
        state = self._spool.state
        first = state.recorded_seq() + 1
        if state.has_table("telegrams"):
            oldest = state.db.execute("SELECT MIN(id) FROM telegrams").fetchone()[0]
            if oldest is not None:
                first = min(first, oldest)
        return first

    def _load(self, *, writer: bool, directory_missing: bool) -> None:
        spool = self._spool
        log, summaries, state = spool.log, spool.summaries, spool.state
        spool.cursors.load(state.db)
        if state.has_column("segments", "size"):
            summaries.load(state.db)
        else:  # schema 2, read beside a daemon that has not converted it yet
            rows = state.db.execute("SELECT first_seq, sink, records, last_seq, NULL FROM segments")
            summaries.load_rows(rows.fetchall())
        for segment in log.segments[:-1]:
            if segment.first_seq not in summaries.by_segment:
                summaries.observe(segment, log.read(segment), sealed=True)
        if log.segments:
            summaries.observe(log.active, log.tail, sealed=False)
        log.tail = []
        present = {segment.first_seq for segment in log.segments}
        missing = sorted(set(summaries.by_segment) - present)
        if writer and missing:
            self._count_missing(missing, directory_missing)
        summaries.keep_only(present)

    def _count_missing(self, missing: list[int], directory_missing: bool) -> None:
        spool = self._spool
        lost: dict[str, int] = {}
        for first in missing:
            for sink, count in spool.damage.account_missing(first).items():
                lost[sink] = lost.get(sink, 0) + count
        with spool.state.transaction() as db:
            spool.state.add_counters("lost", lost)
            db.executemany("DELETE FROM segments WHERE first_seq = ?", [(f,) for f in missing])
        spool.damage.noted.update(lost)
        self._logger.error(
            "spool segment directory missing: its telegrams are lost; started a new one"
            if directory_missing
            else "spool segment files missing: their telegrams are lost",
            directory=str(spool.log.directory),
            files=len(missing),
            lost_per_sink=lost,
            hint="counted as 'lost' in: dsmr-logger spool list",
        )

    def _convert_rows(self) -> None:
        """A spool written by schema 1 kept telegrams as rows: move them to the log, oldest first.

        Safe to interrupt: rows are deleted only after the log holds them, and a rerun skips
        what it already appended.
        """
        spool = self._spool
        if not spool.state.has_table("telegrams"):
            return
        rows = spool.db.execute(
            "SELECT t.id, t.received_at, t.data, group_concat(p.sink, char(10)) "
            "FROM telegrams t JOIN pending p ON p.telegram_id = t.id GROUP BY t.id ORDER BY t.id"
        )
        batch: list[tuple[StoredTelegram, list[str]]] = []
        for seq, received_at, data, sinks in rows:
            batch.append((StoredTelegram(seq, bytes(data), received_at), sorted(sinks.split("\n"))))
            if len(batch) >= 1000:
                spool.commit(batch)
                batch = []
        if batch:
            spool.commit(batch)
        with spool.state.transaction() as db:
            db.execute("DROP TABLE IF EXISTS pending")
            db.execute("DROP TABLE telegrams")
