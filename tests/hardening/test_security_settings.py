"""Security settings: SQL metacharacters stored verbatim, hostile attachment names never
become paths, no group/other permissions on data files, secrets never in service output."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from email.utils import formataddr
from pathlib import Path

import aiosmtplib

import cli
import store
from store import users as store_users
from tests.ingest.conftest import alice, db, deliver, ingest, message, settings  # noqa: F401
from tests.support import free_port, wait_for

SQLISH = 'Robert\'); DROP TABLE emails;-- "quoted" back\\slash %_ ?'


async def test_sql_metacharacters_are_stored_verbatim(ingest, db, alice):  # noqa: F811
    msg = message(
        to=formataddr((SQLISH, "bob@customer.com")),  # quoted-string escapes " and \\
        cc='"O\'Brien; DELETE FROM contacts;--" <obrien@customer.com>',
        subject='Re: \'; DROP TABLE emails;-- "x" \\ 1=1',
        message_id="<'OR'1'='1--%_@acme.io>",  # a msg-id has no spaces
        headers={"X-Note": "'); DELETE FROM users;--"},
    )
    entry = await deliver(ingest, db, msg)
    assert entry["email_id"], entry
    email = db["emails"].get(entry["email_id"])
    assert email["subject"] == 'Re: \'; DROP TABLE emails;-- "x" \\ 1=1'
    assert email["message_id"].strip("<>") == "'OR'1'='1--%_@acme.io"
    names = {r["email"]: r["name"] for r in db.query("select email, name from contacts")}
    assert names["bob@customer.com"] == SQLISH
    assert names["obrien@customer.com"] == "O'Brien; DELETE FROM contacts;--"
    # every table is still there, and still has its rows
    assert db["emails"].count == 1 and db["users"].count == 1


async def test_hostile_attachment_names_never_become_paths(ingest, db, alice):  # noqa: F811
    names = ["../../../../tmp/evil.sh", "a\0b.pdf", "x" * 300 + ".pdf", "/etc/passwd", "..\\..\\w"]
    payloads = [f"payload {i} ".encode() * 50 for i in range(len(names))]
    msg = message(attachments=list(zip(names, payloads, strict=True)))
    entry = await deliver(ingest, db, msg)
    rows = list(db.query("select * from attachments where email_id = ?", [entry["email_id"]]))
    assert len(rows) == len(names)
    stored = {r["filename"] for r in rows}
    # names are kept as data (for display), only without NUL; they never name a file
    assert {"../../../../tmp/evil.sh", "/etc/passwd", "x" * 300 + ".pdf"} <= stored
    assert not any("\0" in n for n in stored)
    root = ingest.settings.data_dir / "attachments"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    import hashlib

    expected = sorted(root / h[:2] / h for h in (hashlib.sha256(p).hexdigest() for p in payloads))
    assert files == expected
    for r in rows:
        assert "/" not in Path(r["sha256"]).name and len(r["sha256"]) == 64
        assert (root / r["sha256"][:2] / r["sha256"]).is_file()
    assert (
        not Path("/tmp/evil.sh").exists() or Path("/tmp/evil.sh").stat().st_mtime < time.time() - 60
    )
    # nothing outside the data directory was written by the ingest
    data_files = {p.name for p in ingest.settings.data_dir.rglob("*") if p.is_file()}
    assert not any("evil" in n or "passwd" in n or "x" * 50 in n for n in data_files)


def no_group_other(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


async def test_data_files_have_no_group_or_other_permissions(ingest, db, alice):  # noqa: F811
    old = os.umask(0o022)  # a typical umask: the code must not rely on a strict one
    try:
        await deliver(ingest, db, message(attachments=[("a.pdf", b"%PDF-1.4 x")]))
    finally:
        os.umask(old)
    data = ingest.settings.data_dir
    checked = [data / "config.toml", ingest.settings.db_path, data]
    checked += [p for p in data.rglob("*") if p.is_file()]
    assert len(checked) > 3
    bad = [(str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in checked if not no_group_other(p)]
    assert bad == []


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def test_secrets_never_in_service_output(tmp_path):
    s = cli.initialise(tmp_path / "data")
    password, wrong = "relay-pw-Zq81x", "wrong-pw-Kp27y"
    db_ = store.connect(s.db_path)
    store_users.add_user(db_, "alice@corp.test", "Alice", password)
    db_.close()
    rp, ip, tp = free_port(), free_port(), free_port()
    env = dict(
        os.environ,
        MAILTALLY_RELAY_LISTEN=f"127.0.0.1:{rp}",
        MAILTALLY_INGEST_LISTEN=f"127.0.0.1:{ip}",
        MAILTALLY_TRACKER_LISTEN=f"127.0.0.1:{tp}",
        MAILTALLY_TRACKER_BASE_URL=f"http://127.0.0.1:{tp}",
        MAILTALLY_RELAY_UPSTREAM=f"maildir:{tmp_path / 'out'}",
        PYTHONUNBUFFERED="1",
    )
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import cli; cli.main()", "--config", str(s.config_path), "run"],
            stdout=fo,
            stderr=fe,
            env=env,
            cwd=str(Path(cli.__file__).parent),
        )
    try:
        await wait_for(lambda: all(accepting(p) for p in (rp, ip, tp)), 30)
        mail = b"From: alice@corp.test\r\nTo: carol@client.test\r\nSubject: s\r\n\r\n<p>hi</p>\r\n"
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=rp, timeout=20) as smtp:
            try:
                await smtp.login("alice@corp.test", wrong)
            except aiosmtplib.SMTPAuthenticationError:
                pass
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=rp, timeout=20) as smtp:
            await smtp.login("alice@corp.test", password)
            await smtp.sendmail("alice@corp.test", ["carol@client.test"], mail)
        await aiosmtplib.send(
            mail,
            sender="x@y.test",
            recipients=[s.ingest.bcc_address],
            hostname="127.0.0.1",
            port=ip,
            timeout=20,
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", tp)
        for path in ("/c/forged", "/o/x.gif", "/feed", "/healthz"):
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {wrong}\r\n\r\n".encode()
            )
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = out.read_bytes() + err.read_bytes()
    text += b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*.log"))
    assert b"relay" in text  # the session did produce output (banner)
    secrets = [*s.tracker.secrets, s.webhooks.secret, password, wrong]
    if s.tracker.feed_token:
        secrets.append(s.tracker.feed_token)
    for secret in secrets:
        assert secret and secret.encode() not in text, secret[:4]
        assert base64.b64encode(secret.encode()) not in text
    assert json.dumps(secrets)  # all were strings
