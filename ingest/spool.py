"""The ingest spool: durable hand-off between "accepted" (250) and "processed".

Every message the inbound listener accepts, and every message the relay hands over
locally, is written here with fsync (file and directory) *before* anyone is told it is
safe. The worker processes entries in arrival order and deletes each one only after its
result (email + inbound-log entry) is committed, so a crash at any point either leaves
the entry for the next start or finds it already logged (never lost, never twice).

One entry is one file ``<id>.msg`` in ``<data_dir>/ingest-spool/new``: a first line of
JSON (envelope and meta) followed by the raw message bytes. Entries are written under
``tmp/`` and renamed into ``new/`` so a half-written file is never seen.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import config
from store import now_iso, spoolfile

SPOOL_DIR = "ingest-spool"

# In-process listeners (the ingest worker) woken when an entry is written, so a local
# hand-off is processed at once instead of at the next poll.
_wakers: list[Callable[[], None]] = []
_wakers_lock = threading.Lock()


@dataclass
class Entry:
    """One spooled message: where it is and its envelope (the body stays on disk)."""

    path: Path
    mail_from: str
    rcpts: list[str]
    meta: dict = field(default_factory=dict)
    received_at: str = ""
    body_offset: int = 0

    @property
    def id(self) -> str:
        return self.path.stem

    def read_bytes(self) -> bytes:
        """The raw message (whole: for small messages, explain and DKIM only)."""
        with self.path.open("rb") as fh:
            fh.seek(self.body_offset)
            return fh.read()

    @property
    def size(self) -> int:
        return self.path.stat().st_size - self.body_offset


def spool_dir(settings: config.Settings) -> Path:
    return settings.data_dir / SPOOL_DIR


def write(
    root: Path, mail_from: str, rcpts: list[str], data: bytes, meta: dict | None = None
) -> Entry:
    """Write one entry durably (fsync of file and directories) and return it."""
    tmp_dir, new_dir = root / "tmp", root / "new"
    envelope = {
        "mail_from": mail_from or "",
        "rcpts": list(rcpts),
        "meta": dict(meta or {}),
        "received_at": now_iso(),
    }
    final = spoolfile.write(tmp_dir, new_dir, envelope, data, ".msg")
    spoolfile.fsync_dir(new_dir)
    _wake()
    return Entry(
        final,
        envelope["mail_from"],
        envelope["rcpts"],
        envelope["meta"],
        envelope["received_at"],
        len(spoolfile.header_bytes(envelope)),
    )


def read(path: Path) -> Entry:
    """The envelope of a spooled entry (the body is read later, streamed)."""
    with path.open("rb") as fh:
        head = fh.readline()
    envelope = json.loads(head)
    return Entry(
        path,
        envelope.get("mail_from", ""),
        list(envelope.get("rcpts", [])),
        dict(envelope.get("meta", {})),
        envelope.get("received_at", ""),
        len(spoolfile.header_bytes(envelope)),
    )


def pending(root: Path) -> list[Path]:
    """Entries waiting to be processed, oldest first."""
    new_dir = root / "new"
    if not new_dir.is_dir():
        return []
    return sorted(p for p in new_dir.iterdir() if p.suffix == ".msg")


def remove(entry: Entry) -> None:
    """Forget an entry once its result is committed."""
    entry.path.unlink(missing_ok=True)


def clean_tmp(root: Path) -> None:
    """Half-written entries (a crash before rename) were never acknowledged: drop them."""
    tmp_dir = root / "tmp"
    if tmp_dir.is_dir():
        for p in tmp_dir.iterdir():
            p.unlink(missing_ok=True)


def add_waker(callback: Callable[[], None]) -> None:
    with _wakers_lock:
        _wakers.append(callback)


def remove_waker(callback: Callable[[], None]) -> None:
    with _wakers_lock:
        if callback in _wakers:
            _wakers.remove(callback)


def _wake() -> None:
    with _wakers_lock:
        callbacks = list(_wakers)
    for cb in callbacks:
        try:
            cb()
        except Exception:  # a stopped worker must not break the writer
            pass


def submit_local(
    settings: config.Settings, mail_from: str, rcpts: list[str], data: bytes, meta: dict
) -> None:
    """Hand a message to the ingest as if it had arrived over SMTP (durable on return).

    The relay uses this for (a) a copy addressed to a logging address and (b) logging
    sent mail, with ``meta = {"source": "relay", "user_id": ..., "message_key": ...}``:
    then the ``emails`` row already exists and the ingest files contacts, attachments
    and deals onto it. The ingest worker (running in the ingest service) processes it;
    entries not yet processed are resumed when the service starts.
    """
    write(spool_dir(settings), mail_from, rcpts, data, meta)
