"""Settings: one TOML file plus ``MAILTALLY_<SECTION>_<KEY>`` environment overrides.

Only ``cli.py`` calls :func:`load`; services receive the resulting :class:`Settings`
object (or one of its sections) so that no component reads files on its own.
Every value is checked here so that a bad value stops start-up with one line
naming the key, instead of failing later inside a server.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "MAILTALLY_"
CONFIG_ENV = "MAILTALLY_CONFIG"
DEFAULT_DIR = "mailtally-data"
CONFIG_NAME = "config.toml"
DB_NAME = "mailtally.db"


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the key."""


@dataclass
class GeneralSettings:
    """Where data lives and the global tracking switch."""

    data_dir: str = "."
    tracking_enabled: bool = True
    domain: str = "localhost"


@dataclass
class RelaySettings:
    """Outbound submission server and its upstream."""

    listen: str = "127.0.0.1:2587"
    tls_listen: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    per_recipient: bool = True
    upstream: str = "maildir:{data_dir}/outbox"
    upstream_username: str = ""
    upstream_password: str = ""
    upstream_starttls: bool = True
    upstream_timeout: float = 60.0
    retry_schedule: list[int] = field(default_factory=lambda: [60, 300, 900, 1800, 3600])
    max_queue_age: int = 5 * 24 * 3600
    excluded_domains: list[str] = field(default_factory=list)
    smtp_timeout_seconds: float = 300.0
    auth_max_failures: int = 5
    auth_window_seconds: float = 300.0
    auth_cache_seconds: float = 120.0
    delivery_connections: int = 8


@dataclass
class IngestSettings:
    """Inbound BCC/forwarding listener and its rules."""

    listen: str = "127.0.0.1:2525"
    bcc_address: str = ""
    forward_address: str = ""
    max_message_size: int = 80 * 1024 * 1024
    max_content_size: int = 2 * 1000 * 1000
    max_attachment_size: int = 50 * 1000 * 1000
    require_authentication: str = "none"
    trusted_authserv_ids: list[str] = field(default_factory=list)
    smtp_timeout_seconds: float = 300.0


@dataclass
class TrackerSettings:
    """Pixel/click HTTP server and hit classification."""

    listen: str = "127.0.0.1:8080"
    base_url: str = "http://127.0.0.1:8080"
    secrets: list[str] = field(default_factory=list)
    trusted_proxies: list[str] = field(default_factory=list)
    sender_networks: list[str] = field(default_factory=list)
    machine_window_seconds: float = 5.0
    feed_token: str = ""
    write_wait_seconds: float = 0.25


@dataclass
class PrivacySettings:
    """GDPR mode: hits and logging only for contacts with a lawful basis."""

    enabled: bool = False


@dataclass
class WebhookSettings:
    """Outgoing notifications (JSON, HMAC-SHA256 signed)."""

    urls: list[str] = field(default_factory=list)
    secret: str = ""
    all_hits: bool = False
    max_attempts: int = 6
    backoff_seconds: float = 5.0


SECTIONS: dict[str, type] = {
    "general": GeneralSettings,
    "relay": RelaySettings,
    "ingest": IngestSettings,
    "tracker": TrackerSettings,
    "privacy": PrivacySettings,
    "webhooks": WebhookSettings,
}


@dataclass
class Settings:
    """Every setting, resolved: paths are absolute, templates filled."""

    config_path: Path
    general: GeneralSettings = field(default_factory=GeneralSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    tracker: TrackerSettings = field(default_factory=TrackerSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.general.data_dir)

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_NAME


def default_config_path() -> Path:
    """``$MAILTALLY_CONFIG`` or ``./mailtally-data/config.toml``."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else Path(DEFAULT_DIR) / CONFIG_NAME


def _coerce(key: str, value: object, typ: object) -> object:
    """Convert a TOML or environment value to the declared type, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = typ(value)  # type: ignore[operator]
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if number < 0:
            raise ConfigError(f"{key}: must not be negative, got {value!r}")
        return number
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, item_type) for v in value]
    raise ConfigError(f"{key}: unsupported type")  # pragma: no cover


def _build_section(name: str, cls: type, raw: dict, env: typing.Mapping[str, str]) -> object:
    hints = typing.get_type_hints(cls)
    unknown = set(raw) - set(hints)
    if unknown:
        raise ConfigError(f"{name}.{sorted(unknown)[0]}: unknown setting")
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{name}.{f.name}"
        env_name = f"{ENV_PREFIX}{name.upper()}_{f.name.upper()}"
        if env_name in env:
            values[f.name] = _coerce(key, env[env_name], hints[f.name])
        elif f.name in raw:
            values[f.name] = _coerce(key, raw[f.name], hints[f.name])
    return cls(**values)


def parse_hostport(key: str, value: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) → (host, port), or ConfigError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def _check_networks(key: str, values: list[str]) -> None:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: not an IP network: {v!r}") from None


def _check_address(key: str, value: str) -> None:
    local, at, domain = value.rpartition("@")
    if not at or not local or "." not in domain and domain != "localhost" or " " in value:
        raise ConfigError(f"{key}: not an email address: {value!r}")


def _validate(s: Settings) -> None:
    for key, value in (
        ("relay.listen", s.relay.listen),
        ("ingest.listen", s.ingest.listen),
        ("tracker.listen", s.tracker.listen),
    ):
        parse_hostport(key, value)
    if s.relay.tls_listen:
        parse_hostport("relay.tls_listen", s.relay.tls_listen)
        if not s.relay.tls_cert:
            raise ConfigError("relay.tls_listen: needs relay.tls_cert and relay.tls_key")
    for key, path in (("relay.tls_cert", s.relay.tls_cert), ("relay.tls_key", s.relay.tls_key)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}: file not found: {path}")
    if bool(s.relay.tls_cert) != bool(s.relay.tls_key):
        raise ConfigError("relay.tls_cert: tls_cert and tls_key must be set together")
    _check_networks("relay.trusted_networks", s.relay.trusted_networks)
    _check_networks("tracker.trusted_proxies", s.tracker.trusted_proxies)
    _check_networks("tracker.sender_networks", s.tracker.sender_networks)
    for key, value in (
        ("relay.max_message_size", s.relay.max_message_size),
        ("relay.max_recipients", s.relay.max_recipients),
        ("relay.delivery_connections", s.relay.delivery_connections),
        ("ingest.max_message_size", s.ingest.max_message_size),
    ):
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not s.relay.retry_schedule:
        raise ConfigError("relay.retry_schedule: must list at least one delay")
    up = s.relay.upstream
    if not (up.startswith("maildir:") or up.startswith("smtp://") or up.startswith("smtps://")):
        raise ConfigError(f"relay.upstream: expected maildir:PATH or smtp://host:port, got {up!r}")
    if up.startswith(("smtp://", "smtps://")):
        parse_hostport("relay.upstream", up.split("://", 1)[1].rstrip("/"))
    if not s.tracker.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"tracker.base_url: expected an http(s) URL, got {s.tracker.base_url!r}")
    if not s.tracker.secrets or any(len(x) < 16 for x in s.tracker.secrets):
        raise ConfigError("tracker.secrets: need at least one secret of 16+ characters")
    if s.ingest.bcc_address:
        _check_address("ingest.bcc_address", s.ingest.bcc_address)
    if s.ingest.forward_address:
        _check_address("ingest.forward_address", s.ingest.forward_address)
    if s.ingest.require_authentication not in ("none", "dkim", "spf", "dmarc", "any"):
        raise ConfigError(
            "ingest.require_authentication: expected none, dkim, spf, dmarc or any, "
            f"got {s.ingest.require_authentication!r}"
        )
    for url in s.webhooks.urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"webhooks.urls: expected http(s) URLs, got {url!r}")


def from_dict(
    raw: dict, config_path: Path, env: typing.Mapping[str, str] | None = None
) -> Settings:
    """Build and validate Settings from parsed TOML plus environment overrides."""
    env = os.environ if env is None else env
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section")
    sections = {}
    for name, cls in SECTIONS.items():
        section_raw = raw.get(name, {})
        if not isinstance(section_raw, dict):
            raise ConfigError(f"{name}: expected a [{name}] table")
        sections[name] = _build_section(name, cls, section_raw, env)
    s = Settings(config_path=config_path.resolve(), **sections)  # type: ignore[arg-type]
    base = config_path.resolve().parent
    data_dir = (base / s.general.data_dir).resolve()
    s.general.data_dir = str(data_dir)
    s.relay.upstream = s.relay.upstream.replace("{data_dir}", str(data_dir))
    for attr in ("tls_cert", "tls_key"):
        value = getattr(s.relay, attr)
        if value:
            setattr(s.relay, attr, str((base / value).resolve()))
    s.tracker.base_url = s.tracker.base_url.rstrip("/")
    _validate(s)
    return s


def load(path: Path, env: typing.Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"no configuration at {path} (run `mailtally init` or pass --config)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_dict(raw, path, env)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render(raw: dict[str, dict[str, object]]) -> str:
    """Serialise a two-level dict of settings as TOML (only the types Settings uses)."""
    lines = ["# mailtally configuration; see config.example.toml for every setting.", ""]
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def new_config(domain: str = "localhost") -> dict[str, dict[str, object]]:
    """Fresh settings for ``mailtally init``: random secrets and unguessable local parts."""
    return {
        "general": {"data_dir": ".", "domain": domain},
        "ingest": {
            "bcc_address": f"log-{secrets.token_hex(8)}@{domain}",
            "forward_address": f"fwd-{secrets.token_hex(8)}@{domain}",
        },
        "tracker": {
            "secrets": [secrets.token_urlsafe(32)],
            "feed_token": secrets.token_urlsafe(24),
        },
        "webhooks": {"secret": secrets.token_urlsafe(32)},
    }
