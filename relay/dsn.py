"""RFC 3464 delivery-failure reports (multipart/report; report-type=delivery-status).

Built as plain bytes rather than through ``email.message`` so that the original's header
block is quoted exactly as it was (``text/rfc822-headers``) whatever its encoding, and the
report never fails on a malformed original. The ingest reuses it for "not logged" notices.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from email.header import Header
from email.utils import format_datetime, make_msgid


@dataclass
class FailedRecipient:
    """One recipient the message could not be delivered (or logged) to."""

    address: str
    status: str = "5.0.0"  # RFC 3463 enhanced status code
    diagnostic: str = ""  # e.g. "smtp; 550 5.1.1 no such user"
    action: str = "failed"


def _header_block(original: bytes) -> bytes:
    """The original's header block (up to the first empty line), CRLF line endings."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = original.find(sep)
        if end != -1:
            head = original[:end]
            break
    else:
        head = original[:65536]
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    return b"\r\n".join(line[:998] for line in lines) + b"\r\n"


def _clean(text: str) -> str:
    """One header-safe line (no CR/LF, printable ASCII)."""
    return "".join(c if 32 <= ord(c) < 127 else " " for c in text).strip()


def failure_report(
    *,
    reporting_mta: str,
    to: str,
    original: bytes,
    recipients: list[FailedRecipient],
    explanation: str,
    subject: str = "Undelivered Mail Returned to Sender",
    from_addr: str | None = None,
    arrival_date: dt.datetime | None = None,
) -> bytes:
    """A complete RFC 3464 report to ``to`` about ``original`` (headers quoted, not the body).

    ``explanation`` is the human-readable first part (UTF-8 text).
    """
    reporting_mta = _clean(reporting_mta) or "localhost"
    from_addr = from_addr or f"MAILER-DAEMON@{reporting_mta}"
    boundary = "=_mailtally_dsn_" + secrets.token_hex(12)
    now = dt.datetime.now(dt.UTC)
    subject_header = Header(subject, "utf-8", maxlinelen=76).encode()
    head = [
        f"From: Mail Delivery System <{from_addr}>",
        f"To: <{_clean(to)}>",
        f"Subject: {subject_header}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {make_msgid(domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    text = explanation.replace("\r\n", "\n").replace("\n", "\r\n")
    per_message = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"Arrival-Date: {format_datetime(arrival_date or now)}",
    ]
    per_rcpt_blocks = []
    for r in recipients:
        block = [
            f"Final-Recipient: rfc822; {_clean(r.address)}",
            f"Action: {_clean(r.action)}",
            f"Status: {_clean(r.status)}",
        ]
        if r.diagnostic:
            block.append(f"Diagnostic-Code: {_clean(r.diagnostic)[:900]}")
        per_rcpt_blocks.append("\r\n".join(block))
    status = "\r\n".join(per_message) + "\r\n\r\n" + "\r\n\r\n".join(per_rcpt_blocks) + "\r\n"
    parts = [
        "\r\n".join(head).encode() + b"\r\n\r\n",
        b"This is a MIME-encapsulated delivery status report.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        text.encode("utf-8") + b"\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Type: message/delivery-status\r\n\r\n",
        status.encode("ascii", "replace"),
        f"--{boundary}\r\n".encode(),
        b"Content-Type: text/rfc822-headers\r\n\r\n",
        _header_block(original),
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)
