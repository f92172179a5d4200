"""The submission server with a real SMTP client: AUTH/TLS matrix, sender checks, SIZE."""

from __future__ import annotations

import asyncio
import smtplib
import ssl

import pytest

from relay.tlscert import generate_self_signed
from store import outbox as store_outbox
from tests.relay.conftest import (
    PASSWORD,
    html_message,
    maildir_messages,
    parse,
    running_relay,
)
from tests.support import free_port, wait_for

MSG = html_message(
    '<html><body><p>Hi <a href="https://example.com/x?a=1&amp;b=2">offer</a></p></body></html>'
)


def client(settings, *, tls_port: int | None = None) -> smtplib.SMTP:
    if tls_port:
        s = smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=10, context=_insecure())
    else:
        host, port = settings.relay.listen.split(":")
        s = smtplib.SMTP(host, int(port), timeout=10)
    s.ehlo("client.test")
    return s


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def reply(fn):
    """Run a blocking smtplib session in a thread (the server runs in this event loop)."""
    return asyncio.to_thread(fn)


@pytest.fixture
def tls(settings):
    cert, key = settings.data_dir / "relay.crt", settings.data_dir / "relay.key"
    generate_self_signed(cert, key, "localhost")
    settings.relay.tls_cert, settings.relay.tls_key = str(cert), str(key)
    settings.relay.tls_listen = f"127.0.0.1:{free_port()}"
    return settings


async def test_trusted_loopback_auth_without_tls_and_delivery(settings, alice, db):
    async with running_relay(settings):

        def session():
            with client(settings) as s:
                assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"]
                assert "LOGIN" in s.esmtp_features["auth"]
                assert int(s.esmtp_features["size"]) == settings.relay.max_message_size
                s.login("alice@corp.test", PASSWORD)
                return s.sendmail("alice@corp.test", ["carol@client.test"], MSG)

        assert await reply(session) == {}
        got = await wait_for(lambda: maildir_messages(settings))
    html = parse(got[0]).get_body(("html",)).get_content()
    assert "https://t.example/c/" in html and "https://t.example/o/" in html


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_mechanisms_and_bad_password(settings, alice, mechanism):
    async with running_relay(settings):

        def session():
            with client(settings) as s:
                s.user, s.password = "alice@corp.test", "wrong"
                auth = s.auth_plain if mechanism == "PLAIN" else s.auth_login
                with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
                    s.auth(mechanism, auth)
                s.user, s.password = "alice@corp.test", PASSWORD
                code, _ = s.auth(mechanism, auth)
                return bad.value.smtp_code, code

        assert await reply(session) == (535, 235)


async def test_untrusted_client_gets_no_auth_without_tls(settings, alice):
    settings.relay.trusted_networks = []
    async with running_relay(settings):

        def session():
            with client(settings) as s:
                offered = s.has_extn("auth")
                code, _ = s.docmd(
                    "AUTH", "PLAIN AGFsaWNlQGNvcnAudGVzdABjb3JyZWN0IGhvcnNlIGJhdHRlcnk="
                )
                mail = s.docmd("MAIL", "FROM:<alice@corp.test>")[0]
                return offered, code, mail

        assert await reply(session) == (False, 538, 530)


async def test_untrusted_client_auths_after_starttls(tls, alice):
    settings = tls
    settings.relay.trusted_networks = []
    async with running_relay(settings):

        def session():
            with client(settings) as s:
                assert s.has_extn("starttls") and not s.has_extn("auth")
                s.starttls(context=_insecure())
                s.ehlo("client.test")
                assert s.has_extn("auth")
                s.login("alice@corp.test", PASSWORD)
                return s.sendmail("alice@corp.test", ["carol@client.test"], MSG)

        assert await reply(session) == {}
        await wait_for(lambda: maildir_messages(settings))


async def test_implicit_tls_listener(tls, alice):
    settings = tls
    settings.relay.trusted_networks = []
    port = int(settings.relay.tls_listen.split(":")[1])
    async with running_relay(settings):

        def session():
            with client(settings, tls_port=port) as s:
                assert s.has_extn("auth") and not s.has_extn("starttls")
                s.login("alice@corp.test", PASSWORD)
                return s.sendmail("alice@corp.test", ["carol@client.test"], MSG)

        assert await reply(session) == {}
        await wait_for(lambda: maildir_messages(settings))


async def test_no_open_relay(settings, alice, db):
    async with running_relay(settings):

        def session():
            with client(settings) as s:
                mail = s.docmd("MAIL", "FROM:<spammer@evil.test>")
                rcpt = s.docmd("RCPT", "TO:<victim@example.test>")
                data = s.docmd("DATA")
                return mail[0], mail[1], rcpt[0], data[0]

        mail, text, rcpt, data = await reply(session)
    assert (mail, rcpt, data) == (530, 530, 530)
    assert b"5.7.0" in text
    assert store_outbox.listing(db, ["pending", "retrying", "failed", "sent"]) == []


async def test_sender_must_be_the_users_address(settings, alice, db):
    async with running_relay(settings):

        def session():
            with client(settings) as s:
                s.login("alice@corp.test", PASSWORD)
                wrong_env = s.docmd("MAIL", "FROM:<bob@corp.test>")
                s.rset()
                with pytest.raises(smtplib.SMTPDataError) as wrong_header:
                    s.sendmail(
                        "alice@corp.test",
                        ["carol@client.test"],
                        html_message("<p>x</p>", frm="bob@corp.test"),
                    )
                s.rset()
                alias_ok = s.sendmail(
                    "sales@corp.test",
                    ["carol@client.test"],
                    html_message("<p>x</p>", frm="sales@corp.test"),
                )
                personal_ok = s.sendmail(
                    "alice.private@gmail.test",
                    ["carol@client.test"],
                    html_message("<p>x</p>", frm="alice.private@gmail.test"),
                )
                return wrong_env[0], wrong_header.value.smtp_code, alias_ok, personal_ok

        assert await reply(session) == (553, 553, {}, {})
        await wait_for(lambda: len(maildir_messages(settings)) == 2)


async def test_size_enforced_and_too_many_recipients(settings, alice):
    settings.relay.max_message_size = 5000
    settings.relay.max_recipients = 3
    async with running_relay(settings):

        def session():
            with client(settings) as s:
                assert s.esmtp_features["size"] == "5000"
                s.login("alice@corp.test", PASSWORD)
                big = html_message("<p>" + "x" * 6000 + "</p>")
                with pytest.raises(smtplib.SMTPException) as too_big:
                    s.sendmail("alice@corp.test", ["carol@client.test"], big)
                code = getattr(too_big.value, "smtp_code", None)
                if code is None:  # refused at MAIL FROM SIZE=, recipients unreported
                    code = list(too_big.value.recipients.values())[0][0]
                try:
                    s.rset()
                except smtplib.SMTPServerDisconnected:
                    s.connect(*settings.relay.listen.split(":"))
                    s.ehlo("client.test")
                    s.login("alice@corp.test", PASSWORD)
                s.docmd("MAIL", "FROM:<alice@corp.test>")
                codes = [s.docmd("RCPT", f"TO:<r{i}@client.test>")[0] for i in range(4)]
                return code, codes

        code, codes = await reply(session)
    assert code == 552
    assert codes == [250, 250, 250, 452]


async def test_bad_input_never_kills_the_server(settings, alice):
    async with running_relay(settings):

        def session():
            with client(settings) as s:
                s.login("alice@corp.test", PASSWORD)
                junk = (
                    b"From: alice@corp.test\r\nContent-Type: multipart/mixed; boundary=\r\n\r\n\x00\xff"
                    + b"y" * 5000
                    + b"\r\n"
                )
                return s.sendmail("alice@corp.test", ["carol@client.test"], junk)

        assert await reply(session) == {}
        await wait_for(lambda: maildir_messages(settings))
