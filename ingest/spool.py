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
import os
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
    """Write one entry durably (fsync of file and directory) and return it; on an OSError
    nothing is left behind and the error is raised."""
    receiving = Receiving(root, mail_from, rcpts, meta)
    receiving.write(data)
    return receiving.commit()


class Receiving:
    """An entry being received: DATA bytes appended as they arrive, durable on ``commit``.

    The SMTP listener streams each message here instead of holding it in memory (aiosmtpd
    keeps every DATA line as its own object and then joins them: about 4x the message at
    peak). Bytes are buffered and written in chunks under ``tmp/``; ``commit`` fsyncs,
    renames into ``new/`` and fsyncs the directory; ``abort`` removes the partial file.
    Any OSError is kept in ``error`` (and further writes are dropped) so the caller can
    finish reading DATA and answer 451 instead of a broken session.
    """

    CHUNK = 1 << 20

    def __init__(
        self, root: Path, mail_from: str, rcpts: list[str], meta: dict | None = None
    ) -> None:
        self.root = root
        self.envelope = {
            "mail_from": mail_from or "",
            "rcpts": list(rcpts),
            "meta": dict(meta or {}),
            "received_at": now_iso(),
        }
        self.head = spoolfile.header_bytes(self.envelope)
        self.name = spoolfile.new_name(".msg")
        self.tmp = root / "tmp" / self.name
        self.error: OSError | None = None
        self.size = 0
        self._buf = bytearray()
        self._fd: int | None = None
        try:
            (root / "tmp").mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._buf += self.head
        except OSError as exc:
            self.error = exc

    def write(self, data: bytes) -> None:
        """Append message bytes (written out once a chunk has gathered)."""
        self.size += len(data)
        if self.error is not None:
            return
        if len(data) >= self.CHUNK:  # a whole message handed over: no copy into the buffer
            self._flush()
            self._write_all(data)
            return
        self._buf += data
        if len(self._buf) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._write_all(self._buf)
            self._buf.clear()

    def _write_all(self, data: bytes | bytearray) -> None:
        if self._fd is None or self.error is not None:
            return
        whole = memoryview(data)
        try:
            done = 0
            while done < len(whole):
                with whole[done:] as part:  # released even when the write fails
                    done += os.write(self._fd, part)
        except OSError as exc:
            self.error = exc
        finally:
            whole.release()  # else the buffer could not be cleared (BufferError -> 500)

    def commit(self) -> Entry:
        """Make the entry durable and visible to the worker (blocking: run in a thread).

        Raises the first OSError met while receiving or now; the partial file is removed.
        """
        new_dir = self.root / "new"
        final = new_dir / self.name
        renamed = False
        try:
            self._flush()
            if self.error is not None:
                raise self.error
            assert self._fd is not None
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            new_dir.mkdir(parents=True, exist_ok=True)
            os.rename(self.tmp, final)
            renamed = True
            spoolfile.fsync_dir(new_dir)
        except OSError:
            self.abort()
            if renamed:  # not durable, so not accepted: the client will send it again
                try:
                    final.unlink(missing_ok=True)
                except OSError:
                    pass
            raise
        _wake()
        e = self.envelope
        return Entry(final, e["mail_from"], e["rcpts"], e["meta"], e["received_at"], len(self.head))

    def abort(self) -> None:
        """Forget a message that was not accepted (nothing half-spooled is left behind)."""
        self._buf.clear()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


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
