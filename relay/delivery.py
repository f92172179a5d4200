"""The delivery worker: takes due outbox entries to the upstream, retries, reports failures.

Upstreams: ``smtp://host:port`` / ``smtps://host:port`` through aiosmtplib (STARTTLS when
offered and ``upstream_starttls``, AUTH when a user name is set), or the embedded
``maildir:PATH`` sink (written tmp/ → fsync → new/, as a Maildir MDA does). A 4xx or a
network error retries after ``relay.retry_schedule`` (the last delay repeats) until
``relay.max_queue_age``; a 5xx or expiry sends an RFC 3464 report to the sender. An entry
is removed from disk only after it is marked sent, so a restart resumes every entry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

import config
import store
from relay import dsn, outbox
from store import outbox as store_outbox
from store import sent

log = logging.getLogger("mailtally.relay.delivery")
CONCURRENCY = 4


@dataclass
class Outcome:
    """Per-recipient result of one attempt."""

    ok: list[str] = field(default_factory=list)
    temporary: dict[str, str] = field(default_factory=dict)  # rcpt → error
    permanent: dict[str, tuple[str, str]] = field(default_factory=dict)  # rcpt → (status, text)


def _status_of(code: int, message: str) -> str:
    words = message.split()
    if words and words[0].count(".") == 2 and words[0][0] in "245":
        return words[0]
    return f"{str(code)[0]}.0.0"


def deliver_maildir(path: Path, mail_from: str, rcpts: list[str], data: bytes) -> None:
    """Write one message into a Maildir durably (tmp → fsync → new → fsync dir)."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    eol = b"\r\n" if b"\r\n" in data[:4096] else b"\n"
    head = f"Return-Path: <{mail_from}>".encode() + eol
    head += b"".join(f"Delivered-To: {r}".encode() + eol for r in rcpts)
    name = f"{time.time_ns()}.M{secrets.token_hex(6)}P{os.getpid()}.{socket.gethostname()}"
    tmp = path / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(head + data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path / "new" / name)
    dfd = os.open(path / "new", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


async def deliver_smtp(
    settings: config.RelaySettings, mail_from: str, rcpts: list[str], data: bytes
) -> Outcome:
    up = settings.upstream
    scheme, _, rest = up.partition("://")
    host, port = config.parse_hostport("relay.upstream", rest.rstrip("/"))
    out = Outcome()
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        timeout=settings.upstream_timeout,
        use_tls=scheme == "smtps",
        start_tls=None if settings.upstream_starttls and scheme == "smtp" else False,
        username=settings.upstream_username or None,
        password=settings.upstream_password or None,
    )
    try:
        await client.connect()
        try:
            errors, _ = await client.sendmail(mail_from, rcpts, data)
        finally:
            try:
                await client.quit()
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                client.close()
    except aiosmtplib.SMTPRecipientsRefused as exc:
        for r in exc.recipients:
            _classify(out, r.recipient, r.code, r.message)
        return out
    except aiosmtplib.SMTPResponseException as exc:
        for r in rcpts:
            _classify(out, r, exc.code, exc.message)
        return out
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        for r in rcpts:
            out.temporary[r] = f"{type(exc).__name__}: {exc}"
        return out
    for r in rcpts:
        if r in errors:
            _classify(out, r, errors[r].code, errors[r].message)
        else:
            out.ok.append(r)
    return out


def _classify(out: Outcome, rcpt: str, code: int, message: str) -> None:
    text = f"{code} {message}".strip()
    if 500 <= code < 600:
        out.permanent[rcpt] = (_status_of(code, message), text)
    else:
        out.temporary[rcpt] = text


def _parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


class Worker:
    """Runs in the relay's event loop; database work goes to one thread of its own."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-delivery")
        self.db = store.connect(settings.db_path)
        store_outbox.durable(self.db)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._inflight: set[int] = set()
        self._sem = asyncio.Semaphore(CONCURRENCY)
        self._tasks: set[asyncio.Task] = set()

    async def _db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        await self._db(outbox.recover, self.settings, self.db)
        self._task = asyncio.create_task(self._loop(), name="relay-delivery")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.relay.upstream_timeout)
        self.executor.shutdown(wait=True)
        self.db.close()

    async def _loop(self) -> None:
        while True:
            try:
                due = await self._db(store_outbox.due, self.db, store.now_iso(), 50)
            except Exception:
                log.exception("relay: cannot read the outbox")
                due = []
            for entry in due:
                if entry["id"] in self._inflight:
                    continue
                self._inflight.add(entry["id"])
                task = asyncio.create_task(self._attempt(entry))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:
                pass

    async def _attempt(self, entry: dict) -> None:
        try:
            async with self._sem:
                await self.attempt(entry)
        except Exception:
            log.exception("relay: delivery attempt for outbox %s failed", entry["id"])
        finally:
            self._inflight.discard(entry["id"])

    async def attempt(self, entry: dict) -> Outcome | None:
        """One delivery attempt of one entry; updates the queue. Returns the outcome."""
        try:
            head, data = await self._db(outbox.read_spool, entry["spool_path"])
        except FileNotFoundError:
            await self._db(store_outbox.mark_failed, self.db, entry["id"], "spool file missing")
            return None
        rcpts = entry["rcpts"]
        up = self.settings.relay.upstream
        if up.startswith("maildir:"):
            out = Outcome()
            try:
                await self._db(
                    deliver_maildir, Path(up[len("maildir:") :]), entry["mail_from"], rcpts, data
                )
                out.ok = list(rcpts)
            except OSError as exc:
                out.temporary = {r: f"maildir: {exc}" for r in rcpts}
        else:
            out = await deliver_smtp(self.settings.relay, entry["mail_from"], rcpts, data)
        await self._db(self._record, entry, head, data, out)
        return out

    def _record(self, entry: dict, head: dict, data: bytes, out: Outcome) -> None:
        """Apply an outcome to the queue (runs in the worker's thread)."""
        now = dt.datetime.now(dt.UTC)
        created = _parse_time(entry["created_at"])
        max_age = dt.timedelta(seconds=self.settings.relay.max_queue_age)
        permanent = dict(out.permanent)
        temporary = dict(out.temporary)
        if temporary and now >= created + max_age:
            for r, err in temporary.items():
                permanent[r] = (
                    "4.4.7",
                    f"expired after {self.settings.relay.max_queue_age} s: {err}",
                )
            temporary = {}
        if out.ok and not temporary and not permanent:
            sent.mark_delivered(self.db, head.get("meta", {}).get("delivery_ids", []))
        if permanent:
            self._report(entry, data, permanent)
        if temporary:
            schedule = self.settings.relay.retry_schedule
            delay = schedule[min(entry["attempts"], len(schedule) - 1)]
            next_at = min(now + dt.timedelta(seconds=delay), created + max_age)
            error = "; ".join(f"{r}: {e}" for r, e in temporary.items())
            store_outbox.mark_retry(
                self.db, entry["id"], store.to_iso(next_at), error, list(temporary)
            )
            return
        if permanent and not out.ok:
            error = "; ".join(f"{r}: {e[1]}" for r, e in permanent.items())
            store_outbox.mark_failed(self.db, entry["id"], error)
            return
        store_outbox.mark_sent(self.db, entry["id"])
        outbox.remove_spool(entry["spool_path"])

    def _report(self, entry: dict, data: bytes, permanent: dict[str, tuple[str, str]]) -> None:
        """RFC 3464 report to the sender (never for a bounce: its sender is empty)."""
        sender = entry["mail_from"]
        if not sender:
            return
        domain = self.settings.general.domain or "localhost"
        lines = [
            "Your message could not be delivered to the following recipients:",
            "",
            *[f"  {r}: {text}" for r, (_, text) in permanent.items()],
            "",
            "The message headers are attached.",
        ]
        report = dsn.failure_report(
            reporting_mta=domain,
            to=sender,
            original=data,
            recipients=[
                dsn.FailedRecipient(r, status, f"smtp; {text}")
                for r, (status, text) in permanent.items()
            ],
            explanation="\n".join(lines),
            arrival_date=_parse_time(entry["created_at"]),
        )
        outbox.enqueue(self.settings, self.db, "", [sender], report, entry.get("user_id"))
