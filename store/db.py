"""Opening the database: pragmas, migrations, time stamps."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from pathlib import Path

import sqlite_utils

from store import migrations
from store.sql import row, rows, transaction

__all__ = ["StoreError", "connect", "now_iso", "to_iso", "row", "rows", "transaction"]


class StoreError(Exception):
    """A user-facing problem with stored data (duplicate, unknown, refused)."""


def now_iso() -> str:
    """Current UTC time as sortable ISO 8601 with offset (all stored times use this form)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def to_iso(value: dt.datetime) -> str:
    """A datetime in the stored form (naive values are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _enable_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switch to WAL, retrying: SQLite answers a concurrent switch with SQLITE_BUSY at once.

    Several processes opening a brand-new database together race for the exclusive lock the
    switch needs, and SQLite does not run the busy handler for it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def connect(
    path: Path | str, *, create: bool = True, migrate: bool = True, timeout: float = 10.0
) -> sqlite_utils.Database:
    """Open (and by default create and upgrade) the database at ``path``.

    WAL lets the tracker write while reports read; foreign keys keep erasure honest;
    ``busy_timeout`` makes a locked database wait instead of failing at once.
    """
    path = Path(path)
    if not create and not path.exists():
        raise StoreError(f"no database at {path} (run `mailtally init`)")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    _enable_wal(conn, timeout)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    if migrate:
        migrations.migrate(db)
    try:
        path.chmod(0o600)
    except OSError:
        pass
    return db
