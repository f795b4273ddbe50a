"""Commands a person runs beside (or instead of) the daemon: ``status``, ``spool``, ``parse``,
``backfill``, ``simulate`` and ``demo``."""
