"""Durable spool files shared by the relay outbox and the ingest spool.

A spool file is one JSON header line followed by the raw message(s), written in ``tmp/``,
fsync'd, then put in place, so a crash leaves either nothing or a whole file; the caller
fsyncs the target directory once (it may batch several files).

``write_linked`` writes several messages into ONE file (one fsync) that appears under
several names (hard links), one per queue entry. Removing a name removes that entry;
the disk space goes when the last name does.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path


def new_name(suffix: str) -> str:
    """Time-ordered, unique name: a directory listing sorted by name is arrival order."""
    return f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def fsync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def header_bytes(head: dict) -> bytes:
    """The header line as written (its length is where the message starts)."""
    return json.dumps(head, ensure_ascii=True).encode() + b"\n"


def _write_all(fd: int, chunks) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def write_linked(
    tmp_dir: Path, final_dir: Path, head: dict, chunks: list[bytes], names: list[str]
) -> list[Path]:
    """Write ``head`` + ``chunks`` once (fsync'd, mode 0600) and link it as each of ``names``.

    On any error nothing is left behind (no link, no temporary file) and the error is raised.
    The caller fsyncs ``final_dir`` once to make the links durable.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    final_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / new_name(".batch")
    made: list[Path] = []
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, [header_bytes(head), *chunks])
            os.fsync(fd)
        finally:
            os.close(fd)
        for name in names:
            final = final_dir / name
            os.link(tmp, final)
            made.append(final)
    except BaseException:
        for p in made:
            p.unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return made
