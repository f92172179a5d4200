"""Step 7 of the day: Postfix says 451 (retried until delivered) and 550 (failure report)."""

from __future__ import annotations

import re
import secrets

import pytest

from tests.e2e import mail
from tests.e2e.conftest import start_mailtally
from tests.e2e.postfix import Postfix
from tests.e2e.system import Mailtally

ALICE = "alice@acme.example"
TEMPFAIL, REJECT = "tempfail@globex.example", "reject@globex.example"


@pytest.fixture(scope="module")
def system(tmp_path_factory, postfix: Postfix):
    running = start_mailtally(tmp_path_factory.mktemp("delivery"), postfix)
    try:
        running.add_user(ALICE, "Alice Archer")
        yield running
    finally:
        running.stop()


def test_7a_tempfail_is_retried_and_delivered(system: Mailtally, postfix: Postfix) -> None:
    subject = f"Retry me {secrets.token_hex(3)}"
    postfix.set_tempfail(True)
    try:
        since = postfix.log_size()
        msg = mail.compose(ALICE, [TEMPFAIL], subject, html="<p>Still there?</p>")
        mail.submit(system.relay_port, ALICE, msg, [TEMPFAIL])
        # The relay's first attempt gets Postfix's 451 and keeps the message queued.
        postfix.wait_for_log(
            rf"reject: RCPT from \S+: 451 4\.2\.0 <{re.escape(TEMPFAIL)}>", timeout=30, since=since
        )
        assert not [m for m in postfix.messages() if m.subject == subject]
        # The mailbox comes back; a later attempt delivers.
        postfix.set_tempfail(False)
        (copy,) = postfix.wait_for_messages(
            lambda m: m.subject == subject and m.recipient == TEMPFAIL, 1, timeout=60
        )
    finally:
        postfix.set_tempfail(True)
    assert "Still there?" in (copy.html() or "")
    # Nothing bounced to Alice for a temporary failure.
    assert not [
        m for m in postfix.messages() if m.recipient == ALICE and subject in m.raw.decode("latin-1")
    ]


def test_7b_reject_produces_a_delivery_failure_report(system: Mailtally, postfix: Postfix) -> None:
    subject = f"Bounce me {secrets.token_hex(3)}"
    msg = mail.compose(f"Alice Archer <{ALICE}>", [REJECT], subject, html="<p>Hello?</p>")
    mail.submit(system.relay_port, ALICE, msg, [REJECT])

    def is_report(m) -> bool:
        return (
            m.recipient == ALICE
            and m.msg.get_content_type() == "multipart/report"
            and subject in m.raw.decode("utf-8", "replace")
        )

    (report,) = postfix.wait_for_messages(is_report, 1, timeout=60)
    assert report.msg.get_param("report-type") == "delivery-status"
    assert report.msg["Return-Path"] == "<>"  # a bounce has the null sender (no loops)
    (status,) = [p for p in report.msg.walk() if p.get_content_type() == "message/delivery-status"]
    text = status.as_string()
    assert f"Final-Recipient: rfc822; {REJECT}" in text
    assert "Action: failed" in text
    assert re.search(r"Status: 5\.1\.1", text), text
    assert "550" in text  # Postfix's answer is quoted in the Diagnostic-Code
    assert not [m for m in postfix.messages() if m.recipient == REJECT]
