"""Configuration: defaults, documentation, environment overrides, bad values."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

import config

ROOT = Path(__file__).resolve().parents[2]


def test_example_documents_every_setting_with_its_default() -> None:
    raw = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert set(raw) == set(config.SECTIONS)
    for name, cls in config.SECTIONS.items():
        defaults = cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(raw[name]) == fields, name
        for key in fields:
            assert raw[name][key] == getattr(defaults, key), f"{name}.{key}"


def test_example_loads_once_secrets_are_set(tmp_path: Path) -> None:
    raw = tomllib.loads((ROOT / "config.example.toml").read_text())
    raw["tracker"]["secrets"] = ["s" * 32]
    s = config.from_dict(raw, tmp_path / "config.toml", env={})
    assert s.relay.listen == "127.0.0.1:2587"
    assert s.ingest.listen == "127.0.0.1:2525"
    assert s.tracker.listen == "127.0.0.1:8080"
    assert s.relay.upstream == f"maildir:{tmp_path}/outbox"
    assert s.db_path == tmp_path / "mailtally.db"


def _base(tmp_path: Path) -> tuple[dict, Path]:
    return {"tracker": {"secrets": ["s" * 32]}}, tmp_path / "config.toml"


@pytest.mark.parametrize(
    ("env", "attr", "expected"),
    [
        ({"MAILTALLY_RELAY_LISTEN": "127.0.0.1:3587"}, ("relay", "listen"), "127.0.0.1:3587"),
        ({"MAILTALLY_RELAY_PER_RECIPIENT": "false"}, ("relay", "per_recipient"), False),
        ({"MAILTALLY_PRIVACY_ENABLED": "yes"}, ("privacy", "enabled"), True),
        ({"MAILTALLY_INGEST_MAX_CONTENT_SIZE": "123"}, ("ingest", "max_content_size"), 123),
        (
            {"MAILTALLY_RELAY_EXCLUDED_DOMAINS": "a.com, b.org"},
            ("relay", "excluded_domains"),
            ["a.com", "b.org"],
        ),
        (
            {"MAILTALLY_TRACKER_MACHINE_WINDOW_SECONDS": "2.5"},
            ("tracker", "machine_window_seconds"),
            2.5,
        ),
    ],
)
def test_environment_overrides(tmp_path: Path, env: dict, attr: tuple, expected: object) -> None:
    raw, path = _base(tmp_path)
    raw["relay"] = {"listen": "127.0.0.1:9999", "per_recipient": True}
    s = config.from_dict(raw, path, env=env)
    assert getattr(getattr(s, attr[0]), attr[1]) == expected


def test_environment_wins_over_file(tmp_path: Path) -> None:
    raw, path = _base(tmp_path)
    raw["tracker"]["base_url"] = "https://file.example"
    s = config.from_dict(raw, path, env={"MAILTALLY_TRACKER_BASE_URL": "https://env.example/"})
    assert s.tracker.base_url == "https://env.example"


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("relay", {"listen": "nonsense"}, "relay.listen: expected host:port"),
        ("relay", {"listen": "127.0.0.1:99999"}, "relay.listen: expected host:port"),
        ("relay", {"per_recipient": "maybe"}, "relay.per_recipient: expected true or false"),
        ("relay", {"max_message_size": "big"}, "relay.max_message_size: expected a number"),
        ("relay", {"max_message_size": 0}, "relay.max_message_size: must be positive"),
        (
            "relay",
            {"trusted_networks": ["10.0.0.0/33"]},
            "relay.trusted_networks: not an IP network",
        ),
        ("relay", {"upstream": "ftp://x"}, "relay.upstream: expected maildir:PATH"),
        (
            "relay",
            {"tls_cert": "missing.pem", "tls_key": "missing.key"},
            "relay.tls_cert: file not found",
        ),
        ("relay", {"colour": "blue"}, "relay.colour: unknown setting"),
        ("tracker", {"base_url": "ftp://x", "secrets": ["s" * 32]}, "tracker.base_url"),
        ("tracker", {"secrets": ["short"]}, "tracker.secrets"),
        ("ingest", {"bcc_address": "not-an-address"}, "ingest.bcc_address: not an email address"),
        ("ingest", {"require_authentication": "always"}, "ingest.require_authentication"),
        ("webhooks", {"urls": ["mailto:x@y.z"]}, "webhooks.urls"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, section: str, values: dict, message: str) -> None:
    raw, path = _base(tmp_path)
    raw.setdefault(section, {}).update(values)
    with pytest.raises(config.ConfigError) as exc:
        config.from_dict(raw, path, env={})
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_environment_value_names_the_key(tmp_path: Path) -> None:
    raw, path = _base(tmp_path)
    with pytest.raises(config.ConfigError, match="relay.max_recipients: expected a number"):
        config.from_dict(raw, path, env={"MAILTALLY_RELAY_MAX_RECIPIENTS": "lots"})


def test_unknown_section_and_invalid_toml(tmp_path: Path) -> None:
    raw, path = _base(tmp_path)
    raw["relya"] = {}
    with pytest.raises(config.ConfigError, match="relya: unknown section"):
        config.from_dict(raw, path, env={})
    path.write_text("[relay\nlisten=")
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        config.load(path, env={})
    with pytest.raises(config.ConfigError, match="no configuration at"):
        config.load(tmp_path / "absent.toml", env={})


def test_default_config_path_follows_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILTALLY_CONFIG", raising=False)
    assert config.default_config_path() == Path("mailtally-data/config.toml")
    monkeypatch.setenv("MAILTALLY_CONFIG", "/etc/mailtally/config.toml")
    assert config.default_config_path() == Path("/etc/mailtally/config.toml")
