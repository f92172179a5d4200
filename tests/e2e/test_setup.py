"""The suite's own set-up works: Postfix delivers and applies its rules, Chromium renders."""

from __future__ import annotations

import subprocess
import uuid

from tests.e2e.net import listening_sockets
from tests.e2e.postfix import Postfix
from tests.e2e.system import Mailtally


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["swaks", "--timeout", "20", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_postfix_delivers_to_the_catch_all_maildir_and_keeps_headers(postfix: Postfix) -> None:
    tag = uuid.uuid4().hex
    r = swaks(
        "--server", f"127.0.0.1:{postfix.port}",
        "--from", "someone@acme.example",
        "--to", "anyone@globex.example",
        "--header", f"Subject: setup {tag}",
        "--header", "From: Some One <Someone@Acme.Example>",
        "--body", "hello",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (msg,) = postfix.wait_for_messages(lambda m: tag in m.subject, 1, timeout=30)
    assert msg.recipient == "anyone@globex.example"
    assert msg.msg["From"] == "Some One <Someone@Acme.Example>"  # not rewritten
    assert msg.msg.get_content().strip() == "hello"
    # Only on 127.0.0.1.
    assert f"127.0.0.1:{postfix.port}" in (postfix.etc / "master.cf").read_text()


def test_postfix_answers_451_for_tempfail_and_550_for_reject(postfix: Postfix) -> None:
    for rcpt, code in (("tempfail@globex.example", "451"), ("reject@globex.example", "550")):
        r = swaks("--server", f"127.0.0.1:{postfix.port}", "--from", "a@acme.example", "--to", rcpt)
        assert f"<** {code} " in r.stdout, r.stdout


def test_chromium_renders_a_local_page(browser, pages) -> None:
    url = pages.add("/setup.html", "<html><body><h1 id=t>rendered</h1></body></html>")
    page = browser.new_page()
    try:
        page.goto(url)
        assert page.inner_text("#t") == "rendered"
        assert "HeadlessChrome" in page.evaluate("navigator.userAgent")
    finally:
        page.close()
    assert pages.hits("/setup.html")


def test_everything_listens_only_on_127_0_0_1(mailtally: Mailtally, postfix: Postfix) -> None:
    assert mailtally.proc is not None
    served = listening_sockets(mailtally.proc.pid)
    assert served == {
        ("127.0.0.1", mailtally.relay_port),
        ("127.0.0.1", mailtally.ingest_port),
        ("127.0.0.1", mailtally.tracker_port),
    }
    master = postfix.master_pid()
    assert master is not None
    assert listening_sockets(master) == {("127.0.0.1", postfix.port)}
