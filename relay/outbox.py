"""The relay's durable queue: spool file (fsync'd) first, then the outbox row.

A queue entry is one name ``<data_dir>/relay-spool/<batch>.<n>.eml``. Copies queued
together (every copy of the messages that one group commit makes durable) are written into
ONE file -- a first line of JSON holding, per copy, the envelope, what the delivery worker
needs to know (e.g. the delivery rows it fills in) and where its bytes are -- that is
fsync'd once and hard-linked under one name per copy; the directory is fsync'd once, and
then all the rows are committed in one transaction, before any SMTP client hears 250.
:func:`read_spool` gives (envelope, bytes) of one name; deleting a name (after the row is
marked sent) drops that copy, the space goes with the last name. Files written by older
versions (one message per file, its envelope as the first line) are read the same way.

A name without a row (power cut between the fsyncs and the commit) is found and queued
again by :func:`recover`; a name is deleted only after its row is marked sent, so a crash
can duplicate a delivery but never drop one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils

import config
from store import now_iso, outbox_batch, spoolfile
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


def _envelope(copy: Copy, created_at: str) -> dict:
    return {
        "mail_from": copy.mail_from,
        "rcpts": copy.rcpts,
        "user_id": copy.user_id,
        "email_id": copy.email_id,
        "meta": copy.meta,
        "created_at": created_at,
    }


def write_spool(root: Path, copy: Copy) -> Path:
    """Write one spool file durably (tmp → fsync → rename); the directory is fsync'd by caller."""
    return write_batch(root, [copy])[0]


def write_batch(root: Path, copies: list[Copy]) -> list[Path]:
    """Write several copies as one fsync'd file with one name per copy (directory not fsync'd).

    Raises OSError (nothing left behind) when the spool cannot be written.
    """
    now = now_iso()
    base = spoolfile.new_name("")
    entries, offset = [], 0
    for copy in copies:
        entries.append({**_envelope(copy, now), "offset": offset, "length": len(copy.data)})
        offset += len(copy.data)
    names = [f"{base}.{i:04d}.eml" for i in range(len(copies))]
    return spoolfile.write_linked(
        root / "tmp", root, {"copies": entries}, [c.data for c in copies], names
    )


def _index_of(path: Path) -> int:
    return int(path.name.removesuffix(".eml").rsplit(".", 1)[1])


# Parsed first lines of batch files, by (batch name, inode): every copy of a batch is
# delivered on its own, and parsing the whole header per copy made a batch cost O(N^2).
# The batch name is unique (time, pid, random), so an entry never describes another file.
_HEADS: OrderedDict[tuple[str, int], tuple[list[dict], int]] = OrderedDict()
_HEADS_MAX = 64
_heads_lock = threading.Lock()


def _envelope_in(fh, path: Path) -> tuple[dict, int, int]:
    key = (path.name.split(".", 1)[0], os.fstat(fh.fileno()).st_ino)
    with _heads_lock:
        cached = _HEADS.get(key)
        if cached is not None:
            _HEADS.move_to_end(key)
    if cached is None:
        line = fh.readline()
        head = json.loads(line)
        if "copies" not in head:  # one message per file (older versions)
            return head, len(line), -1
        cached = (head["copies"], len(line))
        with _heads_lock:
            _HEADS[key] = cached
            while len(_HEADS) > _HEADS_MAX:
                _HEADS.popitem(last=False)
    copies, skip = cached
    entry = dict(copies[_index_of(path)])
    offset, length = entry.pop("offset"), entry.pop("length")
    return entry, skip + offset, length


def read_envelope(path: Path | str) -> tuple[dict, int, int]:
    """(envelope, offset of the copy's bytes in the file, their length or -1 = to the end)."""
    path = Path(path)
    with open(path, "rb") as fh:
        return _envelope_in(fh, path)


def read_spool(path: Path | str) -> tuple[dict, bytes]:
    """(envelope, message bytes) of one queue entry (one open, one read of the header)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head, offset, length = _envelope_in(fh, path)
        fh.seek(offset)
        data = fh.read() if length < 0 else fh.read(length)
    if length >= 0 and len(data) != length:
        raise ValueError(f"spool file {path} is truncated")
    return head, data


def remove_spool(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rows_for(copies: list[Copy], paths: list[Path]) -> list[dict]:
    """The outbox rows of copies written by :func:`write_batch`."""
    return [
        {
            "mail_from": c.mail_from,
            "rcpts": c.rcpts,
            "spool_path": str(p),
            "user_id": c.user_id,
            "email_id": c.email_id,
        }
        for c, p in zip(copies, paths, strict=True)
    ]


def enqueue_copies(
    settings: config.Settings, db: sqlite_utils.Database, copies: list[Copy]
) -> list[int]:
    """Queue several copies: one fsync'd file, then all rows in one commit.

    ``db`` is a connection made durable when it was opened (``store.outbox.durable``), so
    the commit is on disk before the caller acknowledges anything.
    """
    if not copies:
        return []
    root = spool_dir(settings)
    paths = write_batch(root, copies)
    try:
        spoolfile.fsync_dir(root)
        return store_outbox.add(db, rows_for(copies, paths))
    except BaseException:
        for p in paths:
            remove_spool(p)
        raise


def enqueue(
    settings: config.Settings,
    db: sqlite_utils.Database,
    mail_from: str,
    rcpts: list[str],
    data: bytes,
    user_id: int | None = None,
) -> int:
    """Queue one message for the upstream (durable on return, on a durable ``db``); its id.

    The ingest uses this for delivery-failure notices; the relay's worker delivers it.
    """
    return enqueue_copies(settings, db, [Copy(mail_from, list(rcpts), data, user_id)])[0]


def recover(settings: config.Settings, db: sqlite_utils.Database) -> int:
    """Queue spool names that have no row (a crash between fsync and commit); return how many.

    Also drops temporary files older than an hour (a crash before the rename: never
    acknowledged; younger ones may belong to another process that is writing right now).
    """
    root = spool_dir(settings)
    if not root.is_dir():
        return 0
    _clean_tmp(root / "tmp", max_age=3600)
    known = store_outbox.known_spool_paths(db)
    orphans = sorted(p for p in root.glob("*.eml") if str(p) not in known)
    entries = []
    for p in orphans:
        try:
            head, _, _ = read_envelope(p)
        except (OSError, ValueError, LookupError):
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
        outbox_batch.add_recovered(db, entries)
    return len(entries)


def _clean_tmp(tmp: Path, max_age: float) -> None:
    if not tmp.is_dir():
        return
    cutoff = time.time() - max_age
    for p in tmp.iterdir():
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:
            pass
