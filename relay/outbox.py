"""The relay's durable queue: spool file (fsync'd) first, then the outbox row.

A queue entry is one file ``<data_dir>/relay-spool/<id>.eml``: a first line of JSON (the
envelope plus what the delivery worker needs to know, e.g. the delivery row it fills in)
followed by the message bytes. The file is written under ``tmp/``, fsync'd, renamed into
place and the directory fsync'd *before* the row is committed, and the row is committed
before the SMTP client hears 250. A file without a row (power cut between the two) is
found and queued again by :func:`recover`; a row is deleted from disk only after it is
marked sent, so a crash can duplicate a delivery but never drop one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils

import config
from store import now_iso, spoolfile
from store import outbox as store_outbox

SPOOL_DIR = "relay-spool"


@dataclass
class Copy:
    """One message to queue: envelope, bytes and bookkeeping for the worker."""

    mail_from: str
    rcpts: list[str]
    data: bytes
    user_id: int | None = None
    email_id: int | None = None
    meta: dict = field(default_factory=dict)


def spool_dir(settings: config.Settings) -> Path:
    return settings.data_dir / SPOOL_DIR


def write_spool(root: Path, copy: Copy) -> Path:
    """Write one spool file durably (tmp → fsync → rename); the directory is fsync'd by caller."""
    head = {
        "mail_from": copy.mail_from,
        "rcpts": copy.rcpts,
        "user_id": copy.user_id,
        "email_id": copy.email_id,
        "meta": copy.meta,
        "created_at": now_iso(),
    }
    return spoolfile.write(root / "tmp", root, head, copy.data, ".eml")


def read_spool(path: Path | str) -> tuple[dict, bytes]:
    """(header, message bytes) of a spool file."""
    with open(path, "rb") as fh:
        head = json.loads(fh.readline())
        return head, fh.read()


def remove_spool(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def enqueue_copies(
    settings: config.Settings, db: sqlite_utils.Database, copies: list[Copy]
) -> list[int]:
    """Queue several copies: every file fsync'd, then all rows in one durable commit."""
    if not copies:
        return []
    root = spool_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    paths = [write_spool(root, c) for c in copies]
    spoolfile.fsync_dir(root)
    store_outbox.durable(db)
    return store_outbox.add(
        db,
        [
            {
                "mail_from": c.mail_from,
                "rcpts": c.rcpts,
                "spool_path": str(p),
                "user_id": c.user_id,
                "email_id": c.email_id,
            }
            for c, p in zip(copies, paths, strict=True)
        ],
    )


def enqueue(
    settings: config.Settings,
    db: sqlite_utils.Database,
    mail_from: str,
    rcpts: list[str],
    data: bytes,
    user_id: int | None = None,
) -> int:
    """Queue one message for the upstream; durable when this returns. Returns the outbox id.

    The ingest uses this for delivery-failure notices; the relay's worker delivers it.
    """
    return enqueue_copies(settings, db, [Copy(mail_from, list(rcpts), data, user_id)])[0]


def recover(settings: config.Settings, db: sqlite_utils.Database) -> int:
    """Queue spool files that have no row (a crash between fsync and commit); return how many."""
    root = spool_dir(settings)
    if not root.is_dir():
        return 0
    known = store_outbox.known_spool_paths(db)
    orphans = sorted(p for p in root.glob("*.eml") if str(p) not in known)
    entries = []
    for p in orphans:
        try:
            head, _ = read_spool(p)
        except (OSError, ValueError):
            continue
        entries.append(
            {
                "mail_from": head.get("mail_from", ""),
                "rcpts": head.get("rcpts", []),
                "spool_path": str(p),
                "user_id": head.get("user_id"),
                "email_id": head.get("email_id"),
                "created_at": head.get("created_at"),
            }
        )
    if entries:
        store_outbox.durable(db)
        store_outbox.add(db, entries)
    return len(entries)
