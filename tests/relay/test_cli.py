"""`mailtally queue`, `queue retry`, `preview` and `init --tls`, through the real CLI."""

from __future__ import annotations

import email
import json
from email import policy

from click.testing import CliRunner

import cli
import config
from relay import outbox
from store import outbox as store_outbox
from tests.relay.conftest import html_message

HTML = '<html><body><p>Hi <a href="https://example.com/deal?a=1&amp;b=2">the deal</a> <a href="mailto:x@y.test">mail</a> <a href="https://www.example.com/">www.example.com</a></p></body></html>'


def run(settings, *args):
    result = CliRunner().invoke(cli.main, ["--config", str(settings.config_path), *args])
    return result


def test_queue_lists_and_retries(settings, db):
    a = outbox.enqueue(
        settings, db, "alice@corp.test", ["carol@client.test"], b"Subject: a\r\n\r\nx\r\n"
    )
    b = outbox.enqueue(
        settings, db, "alice@corp.test", ["dave@client.test"], b"Subject: b\r\n\r\nx\r\n"
    )
    store_outbox.mark_retry(
        db, a, "2999-01-01T00:00:00+00:00", "451 4.3.0 busy", ["carol@client.test"]
    )
    store_outbox.mark_failed(db, b, "550 5.1.1 no such user")
    res = run(settings, "queue", "--format", "json")
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in json.loads(res.output)}
    assert rows[a]["status"] == "retrying" and rows[a]["last_error"] == "451 4.3.0 busy"
    assert rows[b]["status"] == "failed" and "550" in rows[b]["last_error"]
    table = run(settings, "queue")
    assert "retrying" in table.output and "failed" in table.output
    res = run(settings, "queue", "retry")
    assert res.exit_code == 0 and "1 entry" in res.output
    assert store_outbox.get(db, a)["next_attempt_at"] < "2999"
    assert store_outbox.get(db, b)["status"] == "failed"
    res = run(settings, "queue", "retry", "--failed", str(b))
    assert "1 entry" in res.output and store_outbox.get(db, b)["status"] == "retrying"


def test_queue_empty(settings, db):
    res = run(settings, "queue")
    assert res.exit_code == 0 and "empty" in res.output


def test_preview_reports_decision_links_and_pixel(settings, alice, db, tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(html_message(HTML, extra="X-Mailtally-Track: opens, clicks\r\n"))
    out = tmp_path / "out.eml"
    res = run(settings, "preview", str(eml), "--format", "json", "--output", str(out))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["user"] == "alice@corp.test"
    assert report["track_opens"] and report["track_clicks"] and report["pixel_added"]
    assert [(link["tracked"], link["rule"]) for link in report["links"]] == [
        (True, "tracked"),
        (False, "mailto"),
        (False, "text-is-url"),
    ]
    assert report["control_headers_removed"] == ["x-mailtally-track"]
    html = (
        email.message_from_bytes(out.read_bytes(), policy=policy.default)
        .get_body(("html",))
        .get_content()
    )
    assert (
        config.load(settings.config_path).tracker.base_url + "/o/" in html
        and "X-Mailtally" not in out.read_text()
    )
    assert store_outbox.listing(db, ["pending", "retrying", "failed", "sent"]) == []
    assert db.execute("SELECT COUNT(*) FROM emails").fetchone()[0] == 0
    table = run(settings, "preview", str(eml))
    assert table.exit_code == 0 and "text-is-url" in table.output


def test_preview_plain_text_and_unknown_sender(settings, alice, tmp_path):
    eml = tmp_path / "p.eml"
    eml.write_bytes(b"From: alice@corp.test\r\nTo: c@x.test\r\nSubject: s\r\n\r\nplain\r\n")
    report = json.loads(run(settings, "preview", str(eml), "--format", "json").output)
    assert report["reason"].startswith("plain-text-only") and not report["pixel_added"]
    eml.write_bytes(b"From: stranger@x.test\r\nSubject: s\r\n\r\nplain\r\n")
    res = run(settings, "preview", str(eml))
    assert res.exit_code != 0 and res.output.startswith("Error: ") and "--user" in res.output


def test_init_tls_generates_a_usable_certificate(tmp_path):
    res = CliRunner().invoke(
        cli.main, ["init", "--dir", str(tmp_path / "d"), "--tls", "--domain", "mail.corp.test"]
    )
    assert res.exit_code == 0, res.output
    settings = config.load(tmp_path / "d" / "config.toml")
    assert settings.relay.tls_cert.endswith("relay.crt") and settings.relay.tls_key.endswith(
        "relay.key"
    )
    assert oct((tmp_path / "d" / "relay.key").stat().st_mode & 0o777) == "0o600"
    from relay.server import tls_context

    assert tls_context(settings) is not None
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "d" / "relay.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mail.corp.test" in names.get_values_for_type(x509.DNSName)


async def test_relay_service_is_available_and_prints_where_it_listens(settings, alice):
    from relay import service

    assert "relay" in cli.available_services()
    svc = await service.start(settings)
    try:
        banner = "\n".join(svc.banner())
        assert settings.relay.listen in banner and "maildir:" in banner
    finally:
        await svc.stop()
