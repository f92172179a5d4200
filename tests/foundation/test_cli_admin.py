"""The admin CLI against a real temporary database, including the error paths."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import tomllib
from pathlib import Path

import store
from store import contacts, users
from tests.foundation.conftest import Mt


def test_init_writes_private_config_with_fresh_secrets(mt: Mt, tmp_path: Path) -> None:
    assert stat.S_IMODE(mt.config.stat().st_mode) == 0o600
    assert stat.S_IMODE((mt.dir / "mailtally.db").stat().st_mode) == 0o600
    raw = tomllib.loads(mt.config.read_text())
    other = Mt(tmp_path / "other")
    other("init", "--dir", str(other.dir))
    raw2 = tomllib.loads(other.config.read_text())
    assert raw["tracker"]["secrets"] != raw2["tracker"]["secrets"]
    bcc, fwd = raw["ingest"]["bcc_address"], raw["ingest"]["forward_address"]
    assert bcc != raw2["ingest"]["bcc_address"] and bcc != fwd
    assert len(bcc.split("@")[0]) >= 16  # unguessable local part


def test_init_prints_addresses_and_refuses_to_overwrite(tmp_path: Path) -> None:
    m = Mt(tmp_path / "d")
    out = m("init", "--dir", str(m.dir)).output
    raw = tomllib.loads(m.config.read_text())
    assert raw["ingest"]["bcc_address"] in out and raw["ingest"]["forward_address"] in out
    before = m.config.read_text()
    line = m.fails("init", "--dir", str(m.dir))
    assert "already exists" in line and "--force" in line
    assert m.config.read_text() == before
    m("init", "--dir", str(m.dir), "--force")
    assert m.config.read_text() != before


def test_info_json_says_where_everything_is(mt: Mt) -> None:
    info = json.loads(mt("info", "--format", "json").output)
    raw = tomllib.loads(mt.config.read_text())
    assert info["relay"] == "127.0.0.1:2587"
    assert info["ingest"] == "127.0.0.1:2525"
    assert info["tracker"] == "127.0.0.1:8080"
    assert info["tracker_base_url"] == "http://127.0.0.1:8080"
    assert info["bcc_address"] == raw["ingest"]["bcc_address"]
    assert info["forward_address"] == raw["ingest"]["forward_address"]
    assert info["data_dir"] == str(mt.dir.resolve())
    assert info["database"] == str(mt.dir.resolve() / "mailtally.db")


def test_config_found_through_environment(mt: Mt, monkeypatch) -> None:
    monkeypatch.setenv("MAILTALLY_CONFIG", str(mt.config))
    monkeypatch.setenv("MAILTALLY_TRACKER_BASE_URL", "https://t.example.com")
    result = mt.runner.invoke(__import__("cli").main, ["info", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tracker_base_url"] == "https://t.example.com"


def test_missing_config_and_bad_value_are_one_line(tmp_path: Path, monkeypatch) -> None:
    m = Mt(tmp_path / "none")
    assert "no configuration at" in m.fails("users", "list")
    m2 = Mt(tmp_path / "d")
    m2("init", "--dir", str(m2.dir))
    monkeypatch.setenv("MAILTALLY_RELAY_LISTEN", "nope")
    assert m2.fails("info") == "Error: relay.listen: expected host:port, got 'nope'"


def test_missing_database_is_one_line(mt: Mt) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(mt.dir / "mailtally.db") + suffix).unlink(missing_ok=True)
    assert "no database at" in mt.fails("users", "list")


def test_users_lifecycle(mt: Mt) -> None:
    mt("users", "add", "Alice@Example.com", "--name", "Alice", "--password-stdin", input="s3cret\n")
    mt("users", "add", "bob@example.com", "--name", "Bob")
    listed = json.loads(mt("users", "list", "--format", "json").output)
    assert [u["email"] for u in listed] == ["alice@example.com", "bob@example.com"]
    assert listed[0]["has_password"] is True and listed[1]["has_password"] is False
    assert listed[0]["track_opens"] is True and listed[0]["log_sent"] is False

    db = store.connect(mt.dir / "mailtally.db")
    assert users.authenticate(db, "alice@example.com", "s3cret")["email"] == "alice@example.com"
    assert users.authenticate(db, "alice@example.com", "wrong") is None
    assert users.authenticate(db, "nobody@example.com", "s3cret") is None

    mt("users", "password", "bob@example.com", "--password-stdin", input="pw2\n")
    assert users.authenticate(db, "bob@example.com", "pw2") is not None

    out = json.loads(
        mt(
            "users", "defaults", "alice@example.com", "--no-opens", "--log", "--format", "json"
        ).output
    )
    assert out == {
        "user": "alice@example.com",
        "track_opens": False,
        "track_clicks": True,
        "log_sent": True,
    }
    # Unchanged values are kept until changed.
    out = json.loads(mt("users", "defaults", "alice@example.com", "--format", "json").output)
    assert out["track_opens"] is False and out["log_sent"] is True

    table = mt("users", "list").output
    assert "alice@example.com" in table and "Alice" in table

    rows = list(csv.DictReader(io.StringIO(mt("users", "list", "--format", "csv").output)))
    assert rows[1]["email"] == "bob@example.com" and rows[1]["has_password"] == "True"

    mt("users", "remove", "bob@example.com")
    assert [u["email"] for u in json.loads(mt("users", "list", "--format", "json").output)] == [
        "alice@example.com"
    ]


def test_users_errors(mt: Mt) -> None:
    mt("users", "add", "a@example.com")
    assert "user already exists: a@example.com" in mt.fails("users", "add", "A@EXAMPLE.COM")
    assert "invalid email address" in mt.fails("users", "add", "not-an-address")
    assert "unknown user: x@example.com" in mt.fails("users", "remove", "x@example.com")
    assert "unknown user" in mt.fails("users", "defaults", "x@example.com", "--no-opens")
    assert "empty password" in mt.fails(
        "users", "add", "b@example.com", "--password-stdin", input="\n"
    )
    assert "no password given" in mt.fails("users", "password", "a@example.com")


def test_user_addresses(mt: Mt) -> None:
    mt("users", "add", "a@example.com")
    mt("users", "add", "b@example.com")
    mt("users", "address", "add", "a@example.com", "A@Gmail.com", "--kind", "personal")
    mt("users", "address", "add", "b@example.com", "a@gmail.com", "--kind", "personal")
    mt("users", "address", "add", "a@example.com", "sales@example.com", "--kind", "team")
    mt("users", "address", "add", "a@example.com", "al@example.com", "--kind", "alias")
    listed = json.loads(mt("users", "address", "list", "a@example.com", "--format", "json").output)
    assert listed[0] == {"address": "a@example.com", "kind": "account"}
    assert {(r["address"], r["kind"]) for r in listed[1:]} == {
        ("a@gmail.com", "personal"),
        ("sales@example.com", "team"),
        ("al@example.com", "alias"),
    }
    db = store.connect(mt.dir / "mailtally.db")
    owners = users.owners_of(db, "A@GMAIL.COM")
    assert sorted(o["user_email"] for o in owners) == ["a@example.com", "b@example.com"]

    assert "already connected" in mt.fails(
        "users", "address", "add", "b@example.com", "sales@example.com", "--kind", "team"
    )
    assert "already an address of" in mt.fails(
        "users", "address", "add", "a@example.com", "a@gmail.com", "--kind", "alias"
    )
    assert "invalid email address" in mt.fails(
        "users", "address", "add", "a@example.com", "nope", "--kind", "alias"
    )
    bad_kind = mt("users", "address", "add", "a@example.com", "x@y.com", "--kind", "boss", ok=False)
    assert bad_kind.exit_code == 2 and "Traceback" not in bad_kind.output
    mt("users", "address", "remove", "a@example.com", "al@example.com")
    assert "is not an address of" in mt.fails(
        "users", "address", "remove", "a@example.com", "al@example.com"
    )


def test_never_log(mt: Mt) -> None:
    mt("never-log", "add", "@Competitor.com")
    mt("never-log", "add", "Ceo@Partner.org")
    assert "already on the never-log list" in mt.fails("never-log", "add", "@competitor.COM")
    assert "invalid" in mt.fails("never-log", "add", "@")
    assert "invalid" in mt.fails("never-log", "add", "nonsense")
    listed = json.loads(mt("never-log", "list", "--format", "json").output)
    assert [r["entry"] for r in listed] == ["@competitor.com", "ceo@partner.org"]
    db = store.connect(mt.dir / "mailtally.db")
    assert contacts.never_log_match(db, "x@competitor.com") == "@competitor.com"
    assert contacts.never_log_match(db, "x@EU.Competitor.com") == "@competitor.com"
    assert contacts.never_log_match(db, "x@notcompetitor.com") is None
    assert contacts.never_log_match(db, "x@competitor.com.evil.net") is None
    assert contacts.never_log_match(db, "CEO@partner.org") == "ceo@partner.org"
    assert contacts.never_log_match(db, "cfo@partner.org") is None
    mt("never-log", "remove", "@COMPETITOR.com")
    assert "not on the never-log list" in mt.fails("never-log", "remove", "@competitor.com")
    assert "The never-log list is empty." not in mt("never-log", "list").output
    mt("never-log", "remove", "ceo@partner.org")
    assert "The never-log list is empty." in mt("never-log", "list").output


def test_contacts_basis_deals(mt: Mt) -> None:
    db = store.connect(mt.dir / "mailtally.db")
    contacts.ensure_contact(
        db, "Bob@Acme.com", name="Bob", source="test", company_domain="acme.com"
    )
    contacts.ensure_contact(db, "eve@acme.com", source="test", company_domain="acme.com")
    listed = json.loads(mt("contacts", "list", "--format", "json").output)
    assert [(c["email"], c["company"], c["lawful_basis"]) for c in listed] == [
        ("bob@acme.com", "acme.com", "unknown"),
        ("eve@acme.com", "acme.com", "unknown"),
    ]
    mt("contacts", "basis", "bob@acme.com", "--granted")
    assert mt("contacts", "basis", "bob@acme.com").output.strip() == "yes"
    mt("contacts", "basis", "bob@acme.com", "--revoked")
    assert mt("contacts", "basis", "BOB@acme.com").output.strip() == "no"
    assert "unknown contact" in mt.fails("contacts", "basis", "zed@acme.com", "--granted")

    assert "Added deal 1" in mt("deals", "add", "Acme renewal", "--contact", "bob@acme.com").output
    mt("deals", "add", "Acme upsell")
    mt("deals", "link", "Acme upsell", "eve@acme.com")
    mt("deals", "link", "2", "bob@acme.com")
    assert "unknown contact" in mt.fails("deals", "add", "X", "--contact", "nobody@acme.com")
    assert "unknown deal" in mt.fails("deals", "link", "99", "bob@acme.com")
    assert "say --won or --lost" in mt.fails("deals", "close", "1")
    assert "closed as won" in mt("deals", "close", "1", "--won").output
    assert "already won" in mt.fails("deals", "close", "1", "--lost")
    deals = json.loads(mt("deals", "list", "--format", "json").output)
    assert {d["name"]: d["stage"] for d in deals} == {"Acme renewal": "won", "Acme upsell": "open"}
    shown = json.loads(mt("contacts", "show", "bob@acme.com", "--format", "json").output)
    assert shown["company"] == "acme.com" and shown["lawful_basis"] == "no"
    assert {d["name"] for d in shown["deals"]} == {"Acme renewal", "Acme upsell"}
    assert "unknown contact" in mt.fails("contacts", "show", "zed@acme.com")


def test_forget_needs_confirmation_without_yes(mt: Mt) -> None:
    db = store.connect(mt.dir / "mailtally.db")
    contacts.ensure_contact(db, "bob@acme.com")
    assert "--yes" in mt.fails("contacts", "forget", "bob@acme.com")
    assert contacts.find_contact(db, "bob@acme.com") is not None
    assert "invalid email address" in mt.fails("contacts", "forget", "bob", "--yes")


def test_secrets_file_not_readable_by_others(mt: Mt) -> None:
    mode = stat.S_IMODE(os.stat(mt.config).st_mode)
    assert mode & 0o077 == 0
