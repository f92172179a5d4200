"""Mail as a user's client writes it, submitted with swaks (a real, independent SMTP client).

A message is composed with the stdlib ``email`` package the way Thunderbird or Outlook would
(multipart/alternative + attachment, no Bcc header) and handed to swaks as the DATA
portion; swaks does the SMTP: STARTTLS and AUTH LOGIN on the relay, plain SMTP to the
ingest (which is an inbound MX, not a submission server).
"""

from __future__ import annotations

import email.policy
import email.utils
import secrets
import subprocess
import tempfile
from email.message import EmailMessage
from pathlib import Path

from tests.e2e.system import PASSWORD


def tiny_pdf(marker: str) -> bytes:
    """A small valid one-page PDF whose bytes include ``marker`` and random noise."""
    noise = secrets.token_hex(64)
    stream = f"BT /F1 18 Tf 72 720 Td ({marker}) Tj ET % {noise}".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def compose(
    sender: str,
    to: list[str],
    subject: str,
    html: str | None = None,
    text: str = "",
    cc: list[str] | None = None,
    attachments: list[tuple[str, str, bytes]] | None = None,
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    """A message as a mail client sends it (Bcc recipients are envelope-only)."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain="mail.acme.example")
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(text or "See the HTML version of this message.")
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, ctype, data in attachments or []:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def swaks(*args: str, data: bytes) -> subprocess.CompletedProcess:
    """Run swaks with ``data`` as the DATA portion (a file, so it is sent as is)."""
    with tempfile.NamedTemporaryFile(suffix=".eml") as fh:
        fh.write(data)
        fh.flush()
        return subprocess.run(
            ["swaks", "--timeout", "30", *args, "--data", "@" + fh.name],
            stdin=subprocess.DEVNULL,  # as in CI: nothing to prompt from
            capture_output=True,
            text=True,
            timeout=120,
        )


def submit(
    relay_port: int,
    user: str,
    msg: EmailMessage,
    rcpts: list[str],
    password: str = PASSWORD,
) -> str:
    """Send through the relay with STARTTLS + AUTH LOGIN; return swaks' transcript.

    AssertionError (with the transcript) unless the relay answered 250 to DATA.
    """
    r = swaks(
        "--server", f"127.0.0.1:{relay_port}",
        "--tls",
        "--auth", "LOGIN",
        "--auth-user", user,
        "--auth-password", password,
        "--from", user,
        "--to", ",".join(rcpts),
        "--ehlo", "alice-laptop.acme.example",
        data=msg.as_bytes(),
    )  # fmt: skip
    transcript = r.stdout + r.stderr
    assert r.returncode == 0, f"swaks exited {r.returncode}:\n{transcript}"
    assert "<-  250" in transcript.split(" -> .", 1)[-1], transcript
    return transcript


def send_to_ingest(ingest_port: int, sender: str, rcpt: str, msg: EmailMessage) -> str:
    """Deliver to the ingest listener as the user's provider would (plain SMTP)."""
    r = swaks(
        "--server", f"127.0.0.1:{ingest_port}",
        "--from", sender,
        "--to", rcpt,
        "--ehlo", "mx.mailprovider.example",
        data=msg.as_bytes(),
    )  # fmt: skip
    transcript = r.stdout + r.stderr
    assert r.returncode == 0, f"swaks exited {r.returncode}:\n{transcript}"
    return transcript


def save(path: Path, msg: EmailMessage) -> Path:
    path.write_bytes(msg.as_bytes())
    return path
