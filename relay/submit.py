"""What happens to a submitted message before the client hears 250.

Checked (From header), decided (tracking), recorded (email, deliveries, links), rewritten
once per recipient copy, queued durably, and handed to the ingest where it must be logged
or was addressed to a logging address. Runs in a worker thread with its own connection.
"""

from __future__ import annotations

import functools
import re
import traceback
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import make_msgid

import sqlite_utils

import config
from relay import decision as decisions
from relay import mime, outbox, rewrite
from relay.links import LinkContext
from store import addresses, emails, sent
from store import users as store_users
from tracker import tokens


class Refused(Exception):
    """The message is refused with this SMTP reply."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass
class Result:
    email_id: int
    outbox_ids: list[int]
    decision: decisions.Decision
    rewrite_error: str | None = None
    local: list[str] = field(default_factory=list)
    own: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# A dot-atom local part and a plain domain: what envelopes carry (also used by
# ``relay.server`` for the address between a MAIL/RCPT path's brackets).
PLAIN_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def normalized(address: str) -> str:
    """``store.addresses.normalize``, without email's address parser (~8 us a call, several
    per message) for the plain ``local@domain`` that envelopes carry: it is that, lower-cased."""
    if PLAIN_ADDRESS.fullmatch(address):
        return address.lower()
    return addresses.normalize(address)


def user_addresses(db: sqlite_utils.Database, user_id: int) -> set[str]:
    return {a["address"] for a in store_users.addresses_of(db, user_id)}


def headers_of(data: bytes):
    return BytesHeaderParser(policy=compat32).parsebytes(data[: mime.header_end(data)])


def check_from(
    db: sqlite_utils.Database, user: dict, data: bytes, head=None
) -> list[tuple[str, str]]:
    """553 unless every From header address is one of the user's addresses (``head``: the
    message's headers when the caller parsed them already). Returns the From addresses."""
    head = headers_of(data) if head is None else head
    values = head.get_all("From") or []
    found = addresses.parse_list(*[str(v) for v in values])
    if not found:
        raise Refused("553 5.7.1 The From header is missing or has no valid address")
    own = user_addresses(db, user["id"])
    for _, addr in found:
        if addr not in own:
            raise Refused(f"553 5.7.1 From header {addr} is not one of your addresses")
    return found


def ensure_message_id(data: bytes, domain: str, head=None) -> tuple[bytes, str]:
    """Add a Message-ID when the client sent none (RFC 6409 8.3): the key of every copy."""
    head = headers_of(data) if head is None else head
    mid = head.get("Message-ID")
    if mid and emails.normalize_message_id(str(mid)):
        return data, str(mid).strip()
    mid = make_msgid(domain=domain or "localhost")
    eol = b"\r\n" if b"\r\n" in data[:4096] else b"\n"
    return f"Message-ID: {mid}".encode() + eol + data, mid


@dataclass
class Prepared:
    """A checked and planned message; :func:`record` and :func:`render` turn it into copies.

    ``prepare`` runs per message (reads only, plus the ingest hand-offs); ``record`` and
    ``render`` run in the group committer for every message of a batch at once, so the
    accept path takes the database's write lock once per batch, not once per message.
    """

    result: Result
    email: dict  # the emails row to record
    groups: list[list[str]]  # recipients of each external copy
    shared: bool
    plan: object | None  # rewrite.plan(...) when the copies are tracked
    data: bytes
    mail_from: str
    user_id: int
    email_created: bool = False
    delivery_ids: list[int] = field(default_factory=list)
    copies: list[outbox.Copy] = field(default_factory=list)
    render_error: str | None = None


def prepare(
    settings: config.Settings,
    db: sqlite_utils.Database,
    user: dict,
    mail_from: str,
    rcpts: list[str],
    data: bytes,
) -> Prepared:
    """Check, decide and plan one message. Only reads the database: the rows are written by
    :func:`record`, the copies made (and the ingest hand-offs) by :func:`render`."""
    # One parse of the header block serves every check below: removing the control headers
    # and adding a Message-ID change none of the headers read from it.
    head = headers_of(data)
    senders = check_from(db, user, data, head)
    data, control = rewrite.split_control_headers(data)
    data, message_id = ensure_message_id(data, settings.general.domain, head)
    key = emails.message_key(message_id, data)

    local_addrs = {
        normalized(a) for a in (settings.ingest.bcc_address, settings.ingest.forward_address) if a
    }
    local, own, external = [], [], []
    for r in rcpts:
        addr = normalized(r)
        if addr in local_addrs:
            local.append(r)
        elif store_users.is_user_address(db, addr):
            own.append(r)
        else:
            external.append(r)

    error = None
    analysis = None
    try:
        analysis = rewrite.analyse(data)
    except Exception as exc:  # fail open: the original goes out untouched
        error = f"analyse: {type(exc).__name__}: {exc}"
    decision = decisions.decide(
        settings,
        user,
        control,
        has_html=analysis.has_html if analysis else True,  # unknown: say why below
        visible=analysis.visible if analysis else True,
        signed=analysis.signed if analysis else False,
    )
    if error and decision.tracked:
        decision.track_opens = decision.track_clicks = False
        decision.reason = "rewrite-failed: " + error
    plan = None
    if external and decision.tracked and analysis is not None:
        try:
            plan = _plan(settings, analysis, decision)
        except Exception as exc:  # fail open
            error = f"rewrite: {type(exc).__name__}: {exc}"
            decision.track_opens = decision.track_clicks = False
            decision.reason = "rewrite-failed: " + error
    shared = not settings.relay.per_recipient
    groups = ([external] if shared else [[r] for r in external]) if external else []
    email = dict(
        message_key=key,
        message_id=message_id,
        user_id=user["id"],
        from_addr=senders[0][1],
        to_addrs=[a for _, a in addresses.parse_list(*(head.get_all("To") or []))],
        cc_addrs=[a for _, a in addresses.parse_list(*(head.get_all("Cc") or []))],
        subject=_decoded_header(head.get("Subject")),
        track_opens=decision.track_opens,
        track_clicks=decision.track_clicks,
        untracked_reason=decision.reason,
        rewrite_error=error,
    )
    prepared = Prepared(
        Result(0, [], decision, error, local, own, external),
        email,
        groups,
        shared,
        plan,
        data,
        mail_from,
        user["id"],
    )
    return prepared


def record(db: sqlite_utils.Database, prepared: Prepared) -> None:
    """Write the email, its deliveries and its links (inside the caller's transaction)."""
    email_id, created, delivery_ids = _record(
        db, prepared.groups, prepared.shared, **prepared.email
    )
    if prepared.plan is not None:
        sent.add_links(db, email_id, prepared.plan.tracked_links)
    prepared.result.email_id = email_id
    prepared.email_created = created
    prepared.delivery_ids = delivery_ids


def render(
    settings: config.Settings,
    db: sqlite_utils.Database,
    prepared: Prepared,
    rendered: list[bytes] | Exception | None = None,
) -> None:
    """Make the copies to queue: one rewritten copy per recipient group, the original to
    the user's own addresses. A rewriting failure sends the original (and is recorded).

    ``rendered``: the rewritten copies (or the error) when they were rendered elsewhere
    (``relay.prepare_process``, whose plans stay in its worker)."""
    result = prepared.result
    decision = result.decision
    copies = prepared.copies = []
    base = dict(mail_from=prepared.mail_from, user_id=prepared.user_id, email_id=result.email_id)
    if result.external:
        if prepared.plan is not None and rendered is None:
            try:
                rendered = render_copies(settings, prepared.plan, prepared.delivery_ids)
            except Exception as exc:  # fail open
                rendered = exc
        if isinstance(rendered, Exception):  # fail open
            exc = rendered
            error = f"rewrite: {type(exc).__name__}: {exc}"
            trace = "".join(traceback.format_exception(exc, limit=3))
            sent.set_rewrite_error(db, result.email_id, error + "\n" + trace)
            decision.track_opens = decision.track_clicks = False
            decision.reason = "rewrite-failed: " + error
            result.rewrite_error = error
            rendered = None
        for i, (group, delivery_id) in enumerate(
            zip(prepared.groups, prepared.delivery_ids, strict=True)
        ):
            body = rendered[i] if rendered is not None else prepared.data
            copies.append(
                outbox.Copy(rcpts=group, data=body, meta={"delivery_ids": [delivery_id]}, **base)
            )
    if result.own:
        copies.append(
            outbox.Copy(rcpts=result.own, data=prepared.data, meta={"kind": "own"}, **base)
        )
    _hand_off(settings, prepared)


def _hand_off(settings: config.Settings, prepared: Prepared) -> None:
    """Copies for the ingest (logging address, logging sent mail): durable before the 250,
    after the email row exists (the ingest files the log onto it)."""
    result = prepared.result
    log_sent = result.decision.log and result.external
    if not (result.local or log_sent):
        return
    from ingest import spool as ingest_spool

    meta_common = {"user_id": prepared.user_id, "message_key": prepared.email["message_key"]}
    if result.local:
        ingest_spool.submit_local(
            settings,
            prepared.mail_from,
            result.local,
            prepared.data,
            {"via": "relay", **meta_common},
        )
    if log_sent:
        ingest_spool.submit_local(
            settings,
            prepared.mail_from,
            result.external,
            prepared.data,
            {"source": "relay", **meta_common},
        )


def discard(db: sqlite_utils.Database, prepared: Prepared) -> None:
    """Queueing failed (the client hears 4xx and retries): drop the rows made for it.

    Once they are gone it forgets their ids, so a second call (a batch that fails after
    one of its messages failed alone) drops nothing: ids are reused, and by then they may
    be another message's rows."""
    if not prepared.result.email_id:
        return
    try:
        sent.discard(
            db,
            prepared.result.email_id if prepared.email_created else None,
            prepared.delivery_ids,
        )
    except Exception:  # e.g. the database is still locked: the rows stay, unqueued
        return
    prepared.email_created = False
    prepared.delivery_ids = []


def _record(db, groups, shared, **email) -> tuple[int, bool, list[int]]:
    email_id, created = sent.record_email(db, **email)
    ids = [sent.add_delivery(db, email_id, None if shared else g[0], shared=shared) for g in groups]
    return email_id, created, ids


def _plan(settings, analysis, decision):
    ctx = LinkContext(settings.tracker.base_url, list(settings.relay.excluded_domains))
    return rewrite.plan(
        analysis, ctx, track_opens=decision.track_opens, track_clicks=decision.track_clicks
    )


@functools.lru_cache(maxsize=4)
def _signer(secrets: tuple[str, ...]) -> tokens.Signer:
    return tokens.Signer(list(secrets))


def render_copies(settings, plan, delivery_ids) -> list[bytes]:
    """Each delivery's rewritten copy of a planned message.

    A copy's click tokens are minted together (``Signer.click_tokens``): what follows the
    delivery id in each payload is the same in every copy and is packed once per message.
    The URLs are ``tokens.click_url``'s."""
    signer = _signer(tuple(settings.tracker.secrets))
    base_url = settings.tracker.base_url
    targets = plan.click_targets
    parts = [tokens.click_part(position, url) for position, url in targets]
    out = []
    for delivery_id in delivery_ids:
        minted = tokens.click_urls(base_url, signer, delivery_id, parts)
        urls = dict(zip(targets, minted, strict=True))
        out.append(
            plan.render(
                lambda pos, url, urls=urls: urls[pos, url],
                tokens.open_url(base_url, signer, delivery_id),
                tokens.honeypot_url(base_url, signer, delivery_id),
            )
        )
    return out


def _decoded_header(value) -> str:
    if value is None:
        return ""
    from email.header import decode_header, make_header

    try:
        return str(make_header(decode_header(str(value))))
    except Exception:
        return str(value)
