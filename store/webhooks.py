"""Per-user webhook endpoints and the durable queue of webhook deliveries.

Deliveries are queued in the same transaction as the events they announce, so a crash
never loses a notification; the tracker's sender works through the queue with backoff.
"""

from __future__ import annotations

import secrets

import sqlite_utils

from store.db import StoreError, now_iso
from store.sql import row, rows, transaction
from store.users import get_user


def add_webhook(db: sqlite_utils.Database, user_email: str, url: str, all_hits: bool) -> dict:
    """Register ``url`` for one user's events; returns it with its fresh signing secret."""
    if not url.startswith(("http://", "https://")):
        raise StoreError(f"not an http(s) URL: {url!r}")
    user = get_user(db, user_email)
    with transaction(db):
        if row(
            db, "SELECT 1 AS x FROM user_webhooks WHERE user_id = ? AND url = ?", [user["id"], url]
        ):
            raise StoreError(f"{user['email']} already has the webhook {url}")
        db.execute(
            """INSERT INTO user_webhooks (user_id, url, secret, all_hits, created_at)
               VALUES (?, ?, ?, ?, ?)""",
            [user["id"], url, secrets.token_urlsafe(32), int(all_hits), now_iso()],
        )
    return row(
        db,
        """SELECT w.id, u.email AS user, w.url, w.secret, w.all_hits FROM user_webhooks w
           JOIN users u ON u.id = w.user_id WHERE w.user_id = ? AND w.url = ?""",
        [user["id"], url],
    )


def remove_webhook(db: sqlite_utils.Database, user_email: str, url: str) -> None:
    user = get_user(db, user_email)
    with transaction(db):
        cur = db.execute(
            "DELETE FROM user_webhooks WHERE user_id = ? AND url = ?", [user["id"], url]
        )
    if cur.rowcount == 0:
        raise StoreError(f"{user['email']} has no webhook {url}")


def list_webhooks(db: sqlite_utils.Database) -> list[dict]:
    return rows(
        db,
        """SELECT u.email AS user, w.url, w.all_hits, w.created_at,
                  (SELECT COUNT(*) FROM webhook_queue q WHERE q.webhook_id = w.id
                   AND q.status = 'pending') AS pending,
                  (SELECT COUNT(*) FROM webhook_queue q WHERE q.webhook_id = w.id
                   AND q.status = 'failed') AS failed
           FROM user_webhooks w JOIN users u ON u.id = w.user_id ORDER BY u.email, w.url""",
    )


def webhooks_for_user(db: sqlite_utils.Database, user_id: int) -> list[dict]:
    return rows(
        db, "SELECT id, url, all_hits FROM user_webhooks WHERE user_id = ? ORDER BY id", [user_id]
    )


def enqueue(db: sqlite_utils.Database, *, url: str, webhook_id: int | None, payload: str) -> int:
    """Queue one delivery, due now (inside the caller's transaction)."""
    now = now_iso()
    return db.execute(
        """INSERT INTO webhook_queue (webhook_id, url, payload, next_attempt_at, created_at)
           VALUES (?, ?, ?, ?, ?)""",
        [webhook_id, url, payload, now, now],
    ).lastrowid


def due(db: sqlite_utils.Database, now: str, limit: int = 100) -> list[dict]:
    """Pending deliveries whose time has come, oldest first, with their per-user secret
    (None for the global URLs, which use the configured secret)."""
    return rows(
        db,
        """SELECT q.id, q.webhook_id, q.url, q.payload, q.attempts, w.secret
           FROM webhook_queue q LEFT JOIN user_webhooks w ON w.id = q.webhook_id
           WHERE q.status = 'pending' AND q.next_attempt_at <= ?
           ORDER BY q.next_attempt_at, q.id LIMIT ?""",
        [now, limit],
    )


def next_due_at(db: sqlite_utils.Database) -> str | None:
    found = row(db, "SELECT MIN(next_attempt_at) AS at FROM webhook_queue WHERE status = 'pending'")
    return found["at"] if found else None


def delivered(db: sqlite_utils.Database, queue_id: int) -> None:
    """A 2xx answer: the delivery is done (its payload, which names a contact, goes)."""
    with transaction(db):
        db.execute("DELETE FROM webhook_queue WHERE id = ?", [queue_id])


def attempt_failed(
    db: sqlite_utils.Database, queue_id: int, error: str, next_attempt_at: str | None
) -> None:
    """Record a failed attempt; ``next_attempt_at`` None gives up (status failed)."""
    with transaction(db):
        db.execute(
            """UPDATE webhook_queue SET attempts = attempts + 1, last_error = ?,
                   status = CASE WHEN ? IS NULL THEN 'failed' ELSE 'pending' END,
                   next_attempt_at = COALESCE(?, next_attempt_at)
               WHERE id = ?""",
            [error[:500], next_attempt_at, next_attempt_at, queue_id],
        )


def queue_rows(db: sqlite_utils.Database) -> list[dict]:
    return rows(db, "SELECT * FROM webhook_queue ORDER BY id")
