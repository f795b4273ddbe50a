"""The spool's first format (schema 1: telegrams as SQLite rows), to test its conversion."""

SCHEMA_1 = """
CREATE TABLE telegrams (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, data BLOB NOT NULL);
CREATE TABLE pending (sink TEXT NOT NULL, telegram_id INTEGER NOT NULL,
    PRIMARY KEY (sink, telegram_id)) WITHOUT ROWID;
CREATE INDEX pending_by_telegram ON pending (telegram_id);
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, sink TEXT NOT NULL,
    telegram_id INTEGER NOT NULL, received_at REAL NOT NULL, data BLOB NOT NULL, status INTEGER,
    body TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE requeued (id INTEGER PRIMARY KEY, sink TEXT NOT NULL, received_at REAL NOT NULL,
    data BLOB NOT NULL);
CREATE TABLE counters (sink TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (sink, name)) WITHOUT ROWID;
PRAGMA user_version = 1;
"""
