"""Small helpers every store module uses: transactions and dict rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlite_utils


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One write transaction taken at once (BEGIN IMMEDIATE), nested calls join it."""
    conn = db.conn
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def rows(db: sqlite_utils.Database, sql: str, params: Sequence | dict = ()) -> list[dict]:
    """Run a query and return its rows as dicts."""
    cursor = db.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


def row(db: sqlite_utils.Database, sql: str, params: Sequence | dict = ()) -> dict | None:
    """The first row of a query as a dict, or None."""
    found = rows(db, sql, params)
    return found[0] if found else None
