"""The delivery worker: takes due outbox entries to the upstream, retries, reports failures.

Upstreams: ``smtp://host:port`` / ``smtps://host:port`` through aiosmtplib (STARTTLS when
offered and ``upstream_starttls``, AUTH when a user name is set), or the embedded
``maildir:PATH`` sink (written tmp/ → fsync → new/, as a Maildir MDA does). A 4xx or a
network error retries after ``relay.retry_schedule`` (the last delay repeats) until
``relay.max_queue_age``; a 5xx or expiry sends an RFC 3464 report to the sender. An entry
is removed from disk only after it is marked sent, so a restart resumes every entry: a
crash between the upstream's 250 and that commit delivers the entry again (at least once).

Speed without losing order: ``relay.delivery_connections`` slots (8) each keep one upstream
connection open and send entry after entry over it; the outcomes of whatever finished meanwhile are
committed together (one fsync for many entries, as the tracker's writer does). Each
recipient's mail leaves in the order it was accepted: an entry is only handed to a slot
when no earlier active entry (pending, retrying or in flight) shares one of its recipients,
so a message waiting for a retry holds back the later ones to the same address.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import os
import re
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import aiosmtplib.email
import aiosmtplib.protocol
import sqlite_utils

import config
import store
from relay import dsn, outbox
from store import outbox as store_outbox
from store import sent
from store.sql import transaction

log = logging.getLogger("mailtally.relay.delivery")
AHEAD = 4  # entries per slot handed out ahead (in flight or waiting for the commit)
IDLE_CLOSE = 5.0  # seconds a slot keeps an unused upstream connection open
QUIT_ON_STOP = 2.0  # seconds to wait for the upstream's answer to QUIT when stopping
CHAIN = 16  # entries to the same recipients one slot sends one after another
PAGE = 256  # outbox rows read per page when choosing what to send
RESCAN = 1.0  # seconds a walk of the queue is resumed instead of repeated from the start


@dataclass
class Outcome:
    """Per-recipient result of one attempt."""

    ok: list[str] = field(default_factory=list)
    temporary: dict[str, str] = field(default_factory=dict)  # rcpt → error
    permanent: dict[str, tuple[str, str]] = field(default_factory=dict)  # rcpt → (status, text)


LONG_LINE = re.compile(rb"(?<![^\r\n])[^\r\n]{999,}")  # a whole line of 999+ octets


def fit_lines(data: bytes) -> bytes:
    """Lines longer than SMTP allows (998 octets, RFC 5321 4.5.3.1.6) broken with CRLF SPACE.

    The spec has the relay deliver mail with 1 MB lines; a strict upstream refuses them
    (500 Line too long), so they are broken as Postfix's ``smtp_line_length_limit`` does:
    a header line becomes a folded one, base64 ignores the whitespace. Untouched otherwise.
    """
    if len(data) <= 998 or max(map(len, data.split(b"\n"))) <= 998:
        return data  # the usual case, found in ~1/10 of the time the regex alone takes
    if LONG_LINE.search(data) is None:
        return data

    def fold(m: re.Match) -> bytes:
        s = m.group(0)
        return b"\r\n ".join([s[:998], *(s[i : i + 997] for i in range(998, len(s), 997))])

    return LONG_LINE.sub(fold, data)


LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")


def crlf(data: bytes) -> bytes:
    """``data`` with every line ending CRLF, itself when it has (after the relay's SMTP it
    always has: three C-speed counts then, instead of a regex match per line)."""
    n = data.count(b"\n")
    if data.count(b"\r") != n or data.count(b"\r\n") != n:  # lone CR or LF somewhere
        data = LINE_ENDS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


class Payload(bytes):
    """Bytes ready to follow the DATA command (made by :func:`smtp_payload`)."""


def smtp_payload(data: bytes) -> Payload:
    """What follows the DATA command: CRLF line ends, dot-stuffed, ending with ``.CRLF``.

    The same bytes aiosmtplib sends, made by :func:`crlf` and one ``replace``: its regex
    substitution of every line end (twice per message, for SIZE and for DATA) was a
    quarter of the delivery process's CPU.
    """
    data = crlf(data).replace(b"\n.", b"\n..")
    if data.startswith(b"."):
        data = b"." + data
    return Payload(data + b".\r\n")


class _FastDataProtocol(aiosmtplib.protocol.SMTPProtocol):
    """aiosmtplib's protocol sending a :class:`Payload` as it is (anything else through
    :func:`smtp_payload`); the command sequence, locking and replies are aiosmtplib's own
    (``execute_data_command``)."""

    __slots__ = ()

    async def execute_data_command(self, message: bytes, timeout: float | None = None):
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        payload = message if isinstance(message, Payload) else smtp_payload(message)
        async with self._command_lock:
            self._response_pending = True
            self.write(b"DATA\r\n")
            start = await self.read_response(timeout=timeout)
            if start.code != aiosmtplib.SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            self._response_pending = True
            self.write(payload)
            response = await self.read_response(timeout=timeout)
            if response.code != aiosmtplib.SMTPStatus.completed:
                raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response


def _fast_data(client: aiosmtplib.SMTP) -> None:
    """Use :class:`_FastDataProtocol` on a connected client when its protocol is the one it
    was written against (else aiosmtplib's own DATA is used, only slower)."""
    proto = client.protocol
    if type(proto) is aiosmtplib.protocol.SMTPProtocol and hasattr(proto, "_response_pending"):
        proto.__class__ = _FastDataProtocol


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


class Connection:
    """One upstream SMTP connection, reused for message after message (one per slot).

    A transaction that fails with an SMTP reply is reset by aiosmtplib (RSET) and the
    connection kept; a dropped or 421 connection is closed and, when it was a reused one
    (the upstream may have timed it out while idle), the message is tried once more on a
    fresh connection before it counts as a temporary failure.
    """

    def __init__(self, settings: config.RelaySettings) -> None:
        self.settings = settings
        self.client: aiosmtplib.SMTP | None = None

    def _new_client(self) -> aiosmtplib.SMTP:
        s = self.settings
        scheme, _, rest = s.upstream.partition("://")
        host, port = config.parse_hostport("relay.upstream", rest.rstrip("/"))
        return aiosmtplib.SMTP(
            hostname=host,
            port=port,
            timeout=s.upstream_timeout,
            use_tls=scheme == "smtps",
            start_tls=None if s.upstream_starttls and scheme == "smtp" else False,
            username=s.upstream_username or None,
            password=s.upstream_password or None,
        )

    async def send(self, mail_from: str, rcpts: list[str], data: bytes) -> Outcome:
        for _ in range(2):
            reused = self.client is not None and self.client.is_connected
            out, retry = await self._send_once(reused, mail_from, rcpts, data)
            if not retry:
                return out
        return out

    async def _send_once(
        self, reused: bool, mail_from: str, rcpts: list[str], data: bytes
    ) -> tuple[Outcome, bool]:
        out = Outcome()
        try:
            if not reused:
                self.close()
                self.client = self._new_client()
                await self.client.connect()
                _fast_data(self.client)
            errors = await _sendmail(self.client, mail_from, rcpts, fit_lines(data))
        except aiosmtplib.SMTPRecipientsRefused as exc:
            for r in exc.recipients:
                _classify(out, r.recipient, r.code, r.message)
            return out, False
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421 or not self.client.is_connected:
                self.close()
            for r in rcpts:
                _classify(out, r, exc.code, exc.message)
            return out, reused and exc.code == 421
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            self.close()
            for r in rcpts:
                out.temporary[r] = f"{type(exc).__name__}: {exc}"
            return out, reused
        for r in rcpts:
            if r in errors:
                _classify(out, r, errors[r].code, errors[r].message)
            else:
                out.ok.append(r)
        return out, False

    def close(self) -> None:
        """Drop the connection at once (after an error: nothing polite left to say)."""
        if self.client is not None:
            self.client.close()
            self.client = None

    async def quit(self, timeout: float | None = None) -> None:
        """End the connection politely (idle slot, worker stopping: bounded by ``timeout``)."""
        client, self.client = self.client, None
        if client is not None and client.is_connected:
            try:
                await client.quit(timeout=timeout or self.settings.upstream_timeout)
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                client.close()


@functools.lru_cache(maxsize=4096)
def _quoted(address: str) -> bytes:
    """``<address>`` as aiosmtplib's ``mail``/``rcpt`` send it (its parsing, once per
    address: it was a tenth of the delivery CPU, for the same few addresses)."""
    return aiosmtplib.email.quote_address(address).encode("ascii")


async def _sendmail(
    client: aiosmtplib.SMTP, mail_from: str, rcpts: list[str], data: bytes
) -> dict[str, aiosmtplib.SMTPResponse]:
    """aiosmtplib's ``sendmail`` (same commands, errors and RSET after a refusal), with the
    message's DATA bytes made once (:func:`smtp_payload`) instead of normalised twice by
    regex (for SIZE and for DATA). Returns the refused recipients' replies."""
    await client._ehlo_or_helo_if_needed()
    payload = smtp_payload(data)
    size = len(payload) - 3 - payload.count(b"\n..") - payload.startswith(b"..")
    options = [b"SIZE=%d" % size] if client.supports_extension("size") else []
    try:
        reply = await client.execute_command(b"MAIL", b"FROM:" + _quoted(mail_from), *options)
        if reply.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, mail_from)
        refused: list[aiosmtplib.SMTPRecipientRefused] = []
        for rcpt in rcpts:
            reply = await client.execute_command(b"RCPT", b"TO:" + _quoted(rcpt))
            if reply.code not in (
                aiosmtplib.SMTPStatus.completed,
                aiosmtplib.SMTPStatus.will_forward,
            ):
                refused.append(aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt))
        if len(refused) == len(rcpts):
            raise aiosmtplib.SMTPRecipientsRefused(refused)
        # aiosmtplib's own DATA (protocol not swapped by _fast_data) wants the message.
        await client.data(payload if isinstance(client.protocol, _FastDataProtocol) else data)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        try:  # reset the envelope, as sendmail does
            await client.rset()
        except (ConnectionError, aiosmtplib.SMTPResponseException):
            pass
        raise
    return {e.recipient: aiosmtplib.SMTPResponse(e.code, e.message) for e in refused}


def _classify(out: Outcome, rcpt: str, code: int, message: str) -> None:
    text = f"{code} {message}".strip()
    if 500 <= code < 600:
        out.permanent[rcpt] = (_status_of(code, message), text)
    else:
        out.temporary[rcpt] = text


def _parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def _keys(entry: dict) -> set[str]:
    """The recipients whose order an entry takes part in (compared case-insensitively)."""
    return {r.lower() for r in entry["rcpts"]}


@functools.lru_cache(maxsize=4096)
def _keys_of(rcpts_json: str) -> frozenset[str]:
    """:func:`_keys` of an entry from its stored ``rcpts`` (the walk meets the same few
    recipient lists again and again: each is decoded once)."""
    return frozenset(r.lower() for r in json.loads(rcpts_json))


@dataclass
class Scan:
    """Where a walk of the queue ended: resumed when only new entries arrived since.

    A complete walk also tells which recipients the active entries up to ``after`` have
    (``met``); a later walk from the start may skip over entries known that way (see
    :func:`choose`). ``base`` is when the walk that read every one of them ran.
    """

    after: int = 0
    blocked: set[str] = field(default_factory=set)
    at: float = 0.0  # time.monotonic() of the walk
    complete: bool = False  # walked to the end of the queue
    met: set[str] = field(default_factory=set)  # recipients of the entries up to ``after``
    base: float = 0.0  # time.monotonic() of the last walk that skipped nothing


def choose(
    db: sqlite_utils.Database,
    now: str,
    want: int,
    busy: set[str],
    inflight: set[int],
    resume: Scan | None = None,
    delivered: frozenset[int] | set[int] = frozenset(),
    known: Scan | None = None,
) -> tuple[list[list[dict]], Scan]:
    """Up to ``want`` due entries that are first in line for each of their recipients, as
    runs: a run is a first-in-line entry followed by the next due entries to exactly the
    same recipients with nothing in between touching them (at most CHAIN), which one slot
    sends one after another over its connection, so a recipient's queue keeps moving
    without a trip through this walk per message.

    Walks the active entries in acceptance order; an entry is skipped (and holds back its
    recipients for every later entry) when it is in flight, not due yet, or a recipient of
    it is held back already. ``busy`` are the recipients of entries in flight. Entries in
    ``delivered`` (the upstream said 250, the commit is still to come) are passed over
    without holding anyone back. ``resume`` continues a complete earlier walk (only entries
    queued since are read), so that a long queue held back by an unreachable upstream is
    not re-read for every new message. The walk reads three columns per entry; only the
    chosen rows are read whole.

    ``known``, a complete earlier walk: once this walk holds back every recipient of the
    entries up to ``known.after`` and no run it started can still grow, none of those
    entries can be chosen any more (an entry is chosen only if none of its recipients is
    held back), so the walk goes on after them. Without that, every recipient freed made the whole queue
    be read again: under a burst to a few recipients, thousands of entries per walk and a
    walk per delivery, half the delivery process's CPU (relay bench, py-spy).
    """
    scan = Scan(resume.after, resume.blocked | busy) if resume else Scan(0, set(busy))
    scan.at = time.monotonic()
    scan.base = resume.base if resume else scan.at
    scan.met = set(resume.met) if resume else set()
    runs: list[list[int]] = []
    open_runs: dict[frozenset[str], list[int]] = {}  # runs later entries may still join
    count = 0
    while count < want:
        page = store_outbox.active_brief(db, scan.after, PAGE)
        if not page:
            scan.complete = True
            break
        for entry_id, rcpts_json, next_at in page:
            scan.after = entry_id
            keys = _keys_of(rcpts_json)
            scan.met |= keys
            if entry_id in delivered:
                continue
            free = entry_id not in inflight and next_at <= now
            run = open_runs.get(keys)
            if free and run is not None and len(run) < CHAIN:
                run.append(entry_id)
                count += 1
            elif free and not keys & scan.blocked:
                runs.append([entry_id])
                open_runs[keys] = runs[-1]
                count += 1
            else:  # held back: it also ends every open run it shares a recipient with
                for other in [k for k in open_runs if k & keys]:
                    del open_runs[other]
            scan.blocked |= keys
            if count >= want:
                break
        if (
            known is not None
            and resume is None
            and scan.after < known.after
            and all(len(run) >= CHAIN for run in open_runs.values())
            and known.met <= scan.blocked
        ):
            scan.after, scan.base = known.after, known.base
            scan.met |= known.met
    found = store_outbox.by_ids(db, [i for run in runs for i in run])
    chosen = [[found[i] for i in run if i in found] for run in runs]
    return [run for run in chosen if run], scan


@dataclass
class Finished:
    """One attempt, waiting for the group commit."""

    entry: dict
    head: dict
    data: bytes
    out: Outcome | None  # None: the spool file is gone or unreadable (``error`` says which)
    error: str = ""


@dataclass
class Plan:
    """What the commit does for one finished attempt."""

    entry: dict
    action: str  # "sent" | "retry" | "failed"
    error: str = ""
    next_at: str = ""
    retry_rcpts: list[str] = field(default_factory=list)
    delivery_ids: list[int] = field(default_factory=list)
    permanent: dict[str, tuple[str, str]] = field(default_factory=dict)
    data: bytes = b""
    remove: str | None = None  # spool file to delete once the commit is durable


class Worker:
    """Runs in the relay's event loop: one scheduler, relay.delivery_connections slots, one committer.

    Database work goes to one thread of its own (``executor``); spool reads and maildir
    writes to ``io``.
    """

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-delivery")
        self.slots = settings.relay.delivery_connections
        self.io = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="relay-io")
        self.db = store.connect(settings.db_path)
        # Choosing what to send reads on a connection and thread of its own (WAL: readers
        # never wait for a writer), so the next message to a recipient need not wait for
        # the fsync of the previous outcome.
        self.scan_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-scan")
        self.scan_db = store.connect(settings.db_path, migrate=False)
        store_outbox.durable(self.db)
        self._wake = asyncio.Event()
        self._commit_wake = asyncio.Event()
        self._ready: asyncio.Queue[list[dict] | None] = asyncio.Queue()  # runs (see choose)
        self._inflight: dict[int, set[str]] = {}  # handed out, until its outcome is known
        self._delivered: set[int] = set()  # accepted upstream, its commit still to come
        self._finished: list[Finished] = []
        self._scan: Scan | None = None  # the last complete walk, while it is still valid
        self._known: Scan | None = None  # the last complete walk (see ``choose``'s known)
        self._freed = 0  # counts moments recipients were freed (a walk before one is stale)
        self._scheduler: asyncio.Task | None = None
        self._committer: asyncio.Task | None = None
        self._slots: list[asyncio.Task] = []
        self._stopping = False
        self._closing = False  # slots are done: the committer makes its last flush and ends

    async def _db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def wake(self) -> None:
        self._wake.set()

    async def start(self, recover: bool = True) -> None:
        """Start delivering. ``recover=False`` when the relay's process did the recovery of
        spool names without a row itself (``relay.delivery_process``)."""
        if recover:
            await self._db(outbox.recover, self.settings, self.db)
        await self._db(self._drop_sent_spool)
        self._committer = asyncio.create_task(self._commit_loop(), name="relay-commit")
        self._slots = [
            asyncio.create_task(self._slot(), name=f"relay-slot-{n}") for n in range(self.slots)
        ]
        self._scheduler = asyncio.create_task(self._schedule(), name="relay-delivery")

    async def stop(self) -> None:
        """Finish the attempts under way (bounded), commit their outcomes, close everything.

        Entries handed out but not started stay active in the queue for the next start.
        """
        self._stopping = True
        for task in (self._scheduler,):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        while not self._ready.empty():
            for entry in self._ready.get_nowait() or []:
                self._inflight.pop(entry["id"], None)
        for _ in self._slots:
            self._ready.put_nowait(None)
        if self._slots:
            _, late = await asyncio.wait(self._slots, timeout=self.settings.relay.upstream_timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._slots, return_exceptions=True)
        if self._committer:  # never cancelled: a commit it queued must not be dropped
            self._closing = True
            self._commit_wake.set()
            await asyncio.gather(self._committer, return_exceptions=True)
        await self._flush()
        self.executor.shutdown(wait=True)
        self.scan_executor.shutdown(wait=True)
        self.scan_db.close()
        self.io.shutdown(wait=True)
        self.db.close()

    def _drop_sent_spool(self) -> None:
        """Delete spool files of entries already marked sent: a crash between that commit and
        the unlink leaves them behind (nothing else would ever remove them)."""
        root = outbox.spool_dir(self.settings)
        if root.is_dir():
            for path in store_outbox.sent_among(self.db, [str(p) for p in root.glob("*.eml")]):
                outbox.remove_spool(path)

    # ------------------------------------------------------------------ scheduling

    async def _schedule(self) -> None:
        while not self._stopping:
            self._wake.clear()
            want = self.slots * AHEAD - len(self._inflight) - len(self._delivered)
            if want > 0:
                busy = set().union(*self._inflight.values())
                handed_out = set(self._inflight) | self._delivered
                delivered = set(self._delivered)
                resume, freed, known = self._scan, self._freed, self._known
                if resume and time.monotonic() - resume.at > RESCAN:
                    resume = None  # entries waiting for a retry may be due by now
                if known and time.monotonic() - known.base > RESCAN:
                    known = None  # read every entry again now and then (``queue retry``)
                try:
                    chosen, scan = await asyncio.get_running_loop().run_in_executor(
                        self.scan_executor,
                        choose,
                        self.scan_db,
                        store.now_iso(),
                        want,
                        busy,
                        handed_out,
                        resume,
                        delivered,
                        known,
                    )
                    self._scan = scan if scan.complete and freed == self._freed else None
                    if scan.complete:
                        self._known = scan
                except Exception:
                    log.exception("relay: cannot read the outbox")
                    chosen, self._scan = [], None
                for run in chosen:
                    for entry in run:
                        self._inflight[entry["id"]] = _keys(entry)
                    self._ready.put_nowait(run)
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ delivering

    async def _slot(self) -> None:
        """Deliver entry after entry over one upstream connection; close it when idle."""
        conn = Connection(self.settings.relay)
        getter: asyncio.Future | None = None
        try:
            while True:
                if getter is None:  # kept across idle timeouts: a handed-out entry is never lost
                    getter = asyncio.ensure_future(self._ready.get())
                done, _ = await asyncio.wait(
                    {getter}, timeout=IDLE_CLOSE if conn.client is not None else None
                )
                if not done:
                    await conn.quit()
                    continue
                run, getter = getter.result(), None
                if run is None:
                    return
                await self._deliver_run(conn, run)
        finally:
            if getter is not None:
                getter.cancel()
            await conn.quit(timeout=QUIT_ON_STOP)

    async def _deliver_run(self, conn: Connection, run: list[dict]) -> None:
        """Send a run in order; the first entry not fully accepted ends it (the rest go back
        to the queue untried, behind that one)."""
        for i, entry in enumerate(run):
            try:
                finished = await self._attempt(conn, entry)
            except Exception:
                log.exception("relay: delivery attempt for outbox %s failed", entry["id"])
                finished = None
            if finished is not None:
                self._finished.append(finished)
                self._commit_wake.set()
            out = finished.out if finished else None
            if out is None or not out.ok or out.temporary or out.permanent or self._stopping:
                if finished is None:
                    self._inflight.pop(entry["id"], None)
                for rest in run[i + 1 :]:
                    self._inflight.pop(rest["id"], None)
                break
            # Accepted: the next message to these recipients may go before this commit; a
            # crash now only repeats this one (after the later ones), never loses it.
            self._inflight.pop(entry["id"], None)
            self._delivered.add(entry["id"])
        self._scan, self._freed = None, self._freed + 1
        self.wake()

    async def _attempt(self, conn: Connection, entry: dict) -> Finished:
        """One delivery attempt of one entry (the queue is updated by the committer)."""
        loop = asyncio.get_running_loop()
        rcpts = entry["rcpts"]
        try:
            # Read in the loop: a just-written file in the page cache reads in microseconds,
            # less than the hand-off to a thread and back costs.
            head, data = outbox.read_spool(entry["spool_path"])
        except FileNotFoundError:
            return Finished(entry, {}, b"", None, "spool file missing")
        except (ValueError, LookupError) as exc:
            return Finished(entry, {}, b"", None, f"spool file unreadable: {exc}")
        except OSError as exc:  # e.g. out of file descriptors: try again later
            out = Outcome(temporary={r: f"spool: {exc}" for r in rcpts})
            return Finished(entry, {}, b"", out)
        up = self.settings.relay.upstream
        if up.startswith("maildir:"):
            out = Outcome()
            try:
                await loop.run_in_executor(
                    self.io,
                    deliver_maildir,
                    Path(up[len("maildir:") :]),
                    entry["mail_from"],
                    rcpts,
                    data,
                )
                out.ok = list(rcpts)
            except OSError as exc:
                out.temporary = {r: f"maildir: {exc}" for r in rcpts}
        else:
            out = await conn.send(entry["mail_from"], rcpts, data)
        return Finished(entry, head, data, out)

    # ------------------------------------------------------------------ recording

    async def _commit_loop(self) -> None:
        while not self._closing:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        """Commit every outcome that finished meanwhile (group commit), then free their
        recipients for the next entries."""
        batch, self._finished = self._finished, []
        if not batch:
            return
        try:
            await self._db(self._commit, batch)
        except Exception:
            log.exception("relay: cannot record delivery outcomes")
        finally:
            for f in batch:
                self._inflight.pop(f.entry["id"], None)
                self._delivered.discard(f.entry["id"])
            self._scan, self._freed = None, self._freed + 1  # walk again from the start
            self.wake()

    def _commit(self, batch: list[Finished]) -> None:
        """Apply outcomes to the queue (runs in the worker's database thread).

        Reports go first, each durable on its own: a crash before the status commit tries
        the entry again (the report may repeat), never loses one. Then every status change in
        one transaction; spool files of sent entries are deleted after it is durable.
        """
        plans = [self._plan(f) for f in batch]
        for plan in plans:
            if plan.permanent:
                try:
                    self._report(plan.entry, plan.data, plan.permanent)
                except Exception:
                    log.exception("relay: cannot queue the report for outbox %s", plan.entry["id"])
        try:
            with transaction(self.db):
                for plan in plans:
                    self._apply(plan)
        except Exception:
            log.exception("relay: batch of %d outcomes failed; recording one by one", len(plans))
            for plan in plans:
                try:
                    with transaction(self.db):
                        self._apply(plan)
                except Exception:
                    log.exception("relay: cannot record outbox %s", plan.entry["id"])
                    plan.remove = None
        for plan in plans:
            if plan.remove:
                outbox.remove_spool(plan.remove)

    def _plan(self, f: Finished) -> Plan:
        entry = f.entry
        if f.out is None:
            return Plan(entry, "failed", error=f.error)
        out = f.out
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
        plan = Plan(entry, "sent", permanent=permanent, data=f.data)
        if out.ok and not temporary and not permanent:
            plan.delivery_ids = f.head.get("meta", {}).get("delivery_ids", [])
        if temporary:
            schedule = self.settings.relay.retry_schedule
            delay = schedule[min(entry["attempts"], len(schedule) - 1)]
            plan.action = "retry"
            plan.next_at = store.to_iso(min(now + dt.timedelta(seconds=delay), created + max_age))
            plan.error = "; ".join(f"{r}: {e}" for r, e in temporary.items())
            plan.retry_rcpts = list(temporary)
        elif permanent and not out.ok:
            plan.action = "failed"
            plan.error = "; ".join(f"{r}: {e[1]}" for r, e in permanent.items())
        else:
            plan.remove = entry["spool_path"]
        return plan

    def _apply(self, plan: Plan) -> None:
        entry_id = plan.entry["id"]
        if plan.delivery_ids:
            sent.mark_delivered(self.db, plan.delivery_ids)
        if plan.action == "retry":
            store_outbox.mark_retry(self.db, entry_id, plan.next_at, plan.error, plan.retry_rcpts)
        elif plan.action == "failed":
            store_outbox.mark_failed(self.db, entry_id, plan.error)
        else:
            store_outbox.mark_sent(self.db, entry_id)

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
