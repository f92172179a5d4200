"""The relay's durable queue (``outbox`` table): what is waiting, retrying, sent or failed.

The message bytes live in fsync'd spool files (``relay/outbox.py``); a row is the
schedule and the last error. Status: ``pending`` (not tried yet), ``retrying`` (a 4xx or
network error, tried again at ``next_attempt_at``), ``sent`` and ``failed`` (5xx or too old;
a delivery-failure report went to the sender).
"""

from __future__ import annotations

import json

import sqlite_utils

from store.db import now_iso
from store.sql import row, rows, transaction

ACTIVE = ("pending", "retrying")


def durable(db: sqlite_utils.Database, full: bool = True) -> sqlite_utils.Database:
    """Whether later commits on this connection wait for the disk (FULL) or not (NORMAL).

    Set once when a connection that queues or updates outbox rows is opened (SQLite refuses
    it inside a transaction). The relay's committer switches per batch: its emails commit
    without waiting, then its outbox rows commit with FULL, whose sync covers the earlier
    commit too (one WAL file, written in order).
    """
    db.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
    return db


def add(
    db: sqlite_utils.Database,
    entries: list[dict],
) -> list[int]:
    """Insert queue rows (keys: mail_from, rcpts, spool_path, user_id, email_id) in one commit."""
    now = now_iso()
    ids = []
    with transaction(db):
        for e in entries:
            cur = db.execute(
                """INSERT INTO outbox (created_at, user_id, email_id, mail_from, rcpts,
                                       spool_path, status, attempts, next_attempt_at)
                   VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?)""",
                [
                    e.get("created_at") or now,
                    e.get("user_id"),
                    e.get("email_id"),
                    e["mail_from"],
                    json.dumps(e["rcpts"]),
                    e["spool_path"],
                    now,
                ],
            )
            ids.append(cur.lastrowid)
    return ids


def get(db: sqlite_utils.Database, entry_id: int) -> dict | None:
    return _decoded(row(db, "SELECT * FROM outbox WHERE id = ?", [entry_id]))


def due(db: sqlite_utils.Database, now: str, limit: int = 50) -> list[dict]:
    """Active entries whose next attempt is due, oldest first."""
    found = rows(
        db,
        """SELECT * FROM outbox WHERE status IN ('pending', 'retrying') AND next_attempt_at <= ?
           ORDER BY next_attempt_at, id LIMIT ?""",
        [now, limit],
    )
    return [_decoded(r) for r in found]


def active_brief(
    db: sqlite_utils.Database, after_id: int = 0, limit: int = 256
) -> list[tuple[int, str, str]]:
    """``(id, rcpts as stored (JSON), next_attempt_at)`` of active entries with ``id >
    after_id``, in id order: what the delivery worker's walk of the queue reads per entry
    (three columns and no JSON decoding; :func:`by_ids` reads the chosen rows whole)."""
    return db.execute(
        """SELECT id, rcpts, next_attempt_at FROM outbox
           WHERE status IN ('pending', 'retrying') AND id > ? ORDER BY id LIMIT ?""",
        [after_id, limit],
    ).fetchall()


def by_ids(db: sqlite_utils.Database, ids: list[int]) -> dict[int, dict]:
    """The rows of ``ids`` (decoded), by id; ids without a row are left out."""
    out: dict[int, dict] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        marks = ",".join("?" for _ in chunk)
        for r in rows(db, f"SELECT * FROM outbox WHERE id IN ({marks})", chunk):
            out[r["id"]] = _decoded(r)
    return out


def next_due_at(db: sqlite_utils.Database) -> str | None:
    """When the earliest active entry is due (None when the queue is empty)."""
    found = row(
        db,
        "SELECT MIN(next_attempt_at) AS at FROM outbox WHERE status IN ('pending', 'retrying')",
    )
    return found["at"] if found else None


def mark_sent(db: sqlite_utils.Database, entry_id: int) -> None:
    with transaction(db):
        db.execute(
            """UPDATE outbox SET status = 'sent', attempts = attempts + 1, done_at = ?,
                                 last_error = NULL WHERE id = ?""",
            [now_iso(), entry_id],
        )


def mark_retry(
    db: sqlite_utils.Database, entry_id: int, next_at: str, error: str, rcpts: list[str]
) -> None:
    """A temporary failure: try the (remaining) recipients again at ``next_at``."""
    with transaction(db):
        db.execute(
            """UPDATE outbox SET status = 'retrying', attempts = attempts + 1,
                                 next_attempt_at = ?, last_error = ?, rcpts = ? WHERE id = ?""",
            [next_at, error, json.dumps(rcpts), entry_id],
        )


def mark_failed(db: sqlite_utils.Database, entry_id: int, error: str) -> None:
    with transaction(db):
        db.execute(
            """UPDATE outbox SET status = 'failed', attempts = attempts + 1, done_at = ?,
                                 last_error = ? WHERE id = ?""",
            [now_iso(), error, entry_id],
        )


def retry_now(
    db: sqlite_utils.Database, ids: list[int] | None = None, include_failed: bool = False
) -> int:
    """Make active (and optionally failed) entries due now; return how many."""
    statuses = ["pending", "retrying"] + (["failed"] if include_failed else [])
    marks = ",".join("?" for _ in statuses)
    sql = f"UPDATE outbox SET next_attempt_at = ?, status = CASE status WHEN 'failed' THEN 'retrying' ELSE status END, done_at = NULL WHERE status IN ({marks})"
    params: list = [now_iso(), *statuses]
    if ids:
        sql += f" AND id IN ({','.join('?' for _ in ids)})"
        params += ids
    with transaction(db):
        return db.execute(sql, params).rowcount


def listing(db: sqlite_utils.Database, statuses: list[str] | None = None) -> list[dict]:
    """Queue rows for ``mailtally queue`` (newest first)."""
    statuses = statuses or ["pending", "retrying", "failed"]
    marks = ",".join("?" for _ in statuses)
    found = rows(
        db,
        f"""SELECT o.id, o.status, o.created_at, o.attempts, o.next_attempt_at, o.mail_from,
                   o.rcpts, o.last_error, o.done_at, o.email_id, o.spool_path, u.email AS user
            FROM outbox o LEFT JOIN users u ON u.id = o.user_id
            WHERE o.status IN ({marks}) ORDER BY o.id DESC""",
        statuses,
    )
    return [_decoded(r) for r in found]


def known_spool_paths(db: sqlite_utils.Database) -> set[str]:
    """Every spool path the queue knows (to find files orphaned by a crash before the row)."""
    return {r[0] for r in db.execute("SELECT spool_path FROM outbox").fetchall()}


def sent_among(db: sqlite_utils.Database, paths: list[str]) -> list[str]:
    """Those of ``paths`` whose entry is marked sent (their spool file should be gone)."""
    found: list[str] = []
    for i in range(0, len(paths), 500):
        chunk = paths[i : i + 500]
        marks = ",".join("?" for _ in chunk)
        found += [
            r[0]
            for r in db.execute(
                f"SELECT spool_path FROM outbox WHERE status = 'sent' AND spool_path IN ({marks})",
                chunk,
            ).fetchall()
        ]
    return found


def counts(db: sqlite_utils.Database) -> dict[str, int]:
    return {
        r["status"]: r["n"]
        for r in rows(db, "SELECT status, COUNT(*) AS n FROM outbox GROUP BY status")
    }


def _decoded(r: dict | None) -> dict | None:
    if r is not None and isinstance(r.get("rcpts"), str):
        r["rcpts"] = json.loads(r["rcpts"])
    return r
