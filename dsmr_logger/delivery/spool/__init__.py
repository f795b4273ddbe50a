"""The durable spool: undelivered telegrams, stored once for all sinks, and what each sink needs.

The telegrams go to append-only segment files (a sequence of checksummed records), the small
state beside them to SQLite. Spooling an outage writes little more than the telegrams
themselves (1.3-1.44 x their size, ``bench/disk_writes.py``); a healthy sink writes nothing.
Bounded by ``max_bytes`` (drop-oldest, counted per sink), crash-safe, repaired after damage.

Words used throughout (one module each, ``Spool`` composes them):

- *record*: one telegram on disk, with its seq, read time and sink names (``records.py``);
- *seq*: a telegram's number, increasing in arrival order, never reused;
- *segment*: one file of records, named by its first seq; the last one is *active* (appended
  to), the others *sealed* (full, never written again but to repair them) (``segments.py``);
- *summary*: per segment and sink, how many records and the last seq (``summaries.py``);
- *cursor*: per sink, the seq up to which everything is done; *done*: confirmed out of order
  above it; *spared*: below it but still needed (``cursors.py``);
- *cap*: drop-oldest past ``max_bytes``; *protect*: what is being sent, which it spares
  (``cap.py``);
- *dead letter*: a telegram a server refused for good; *requeued*: one handed back
  (``letters.py``);
- *gap*, *lost*, *salvage*: damaged bytes, the telegrams they cost, and the repair that
  counts and removes them (``damage.py``);
- *hot* and *cold* (in ``queue.py``): telegrams a sink holds in memory, and those it reads back
  from the spool a page at a time.
"""

from dsmr_logger.delivery.spool.facade import SEGMENT_BYTES, SYNC_INTERVAL, Spool, telegram_dir
from dsmr_logger.delivery.spool.letters import DeadLetter, StoredTelegram
from dsmr_logger.delivery.spool.reads import Backlog
from dsmr_logger.delivery.spool.records import encode
from dsmr_logger.delivery.spool.segments import SUFFIX
from dsmr_logger.delivery.spool.state import (
    SCHEMA_VERSION,
    SpoolBusy,
    SpoolError,
    SpoolUnavailable,
)
from dsmr_logger.delivery.spool.writes import Encoded, SpoolGone

__all__ = [
    "SCHEMA_VERSION",
    "SEGMENT_BYTES",
    "SUFFIX",
    "SYNC_INTERVAL",
    "Backlog",
    "DeadLetter",
    "Encoded",
    "Spool",
    "SpoolBusy",
    "SpoolError",
    "SpoolGone",
    "SpoolUnavailable",
    "StoredTelegram",
    "encode",
    "telegram_dir",
]
