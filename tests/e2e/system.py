"""mailtally as a user runs it: a config written by ``cli.initialise``, then ``mailtally run``
as a subprocess, and the ``mailtally`` CLI for everything else.

The relay's upstream is the suite's Postfix; TLS uses a fresh self-signed certificate; every
listener gets a free port on 127.0.0.1; retries are seconds apart so the suite stays short.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import cli
import config
from tests.e2e.net import free_ports, port_open, wait_for_port

PASSWORD = "correct horse battery staple"


def mailtally_command() -> list[str]:
    """The installed ``mailtally`` script of this interpreter (what a user types)."""
    script = Path(sys.executable).parent / "mailtally"
    if script.exists():
        return [str(script)]
    found = shutil.which("mailtally")
    if found:
        return [found]
    return [sys.executable, "-c", "import cli; cli.main()"]


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1/localhost (swaks does not verify it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "relay-cert.pem", directory / "relay-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


class Mailtally:
    """One mailtally installation (config + data dir) and its ``mailtally run`` process."""

    def __init__(self, directory: Path, upstream_port: int, **overrides: dict) -> None:
        self.dir = directory
        settings = cli.initialise(directory, domain="crm.acme.example")
        cert, key = self_signed_cert(directory)
        relay_port, ingest_port, tracker_port = free_ports(3)
        raw = tomllib.loads(settings.config_path.read_text())
        sections = {
            "relay": {
                "listen": f"127.0.0.1:{relay_port}",
                "tls_cert": str(cert),
                "tls_key": str(key),
                # As on the internet: no network is trusted, AUTH only after STARTTLS.
                "trusted_networks": [],
                "upstream": f"smtp://127.0.0.1:{upstream_port}",
                "upstream_starttls": False,
                "upstream_timeout": 20.0,
                "retry_schedule": [1, 1, 2],
                "max_queue_age": 600,
            },
            "ingest": {"listen": f"127.0.0.1:{ingest_port}"},
            "tracker": {
                "listen": f"127.0.0.1:{tracker_port}",
                "base_url": f"http://127.0.0.1:{tracker_port}",
                "machine_window_seconds": 1.0,
            },
        }
        for name, values in {**sections}.items():
            raw.setdefault(name, {}).update(values)
        for name, values in overrides.items():
            raw.setdefault(name, {}).update(values)
        settings.config_path.write_text(config.render(raw))
        self.config_path = settings.config_path
        self.settings = config.load(self.config_path, env={})
        self.relay_port, self.ingest_port, self.tracker_port = (
            relay_port,
            ingest_port,
            tracker_port,
        )
        self.log_path = directory / "mailtally-run.log"
        self.proc: subprocess.Popen | None = None

    # --- the CLI -------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILTALLY_")}
        env["MAILTALLY_CONFIG"] = str(self.config_path)
        return env

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> str:
        """Run ``mailtally ARGS``; return stdout (AssertionError with stderr if it fails)."""
        r = subprocess.run(
            [*mailtally_command(), *args],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.dir,
            timeout=120,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"mailtally {' '.join(args)} exited {r.returncode}: {r.stderr}")
        return r.stdout

    def cli_json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--format", "json"))

    def add_user(self, email: str, name: str, password: str = PASSWORD) -> None:
        self.cli("users", "add", email, "--name", name, "--password-stdin", input=password + "\n")

    # --- the process ---------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start ``mailtally run`` and wait until relay, ingest and tracker accept connections."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*mailtally_command(), "run"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=self.dir,
            start_new_session=True,
        )
        log.close()
        proc = self.proc
        ports = {"relay": self.relay_port, "ingest": self.ingest_port, "tracker": self.tracker_port}
        try:
            for name in cli.available_services():
                port = ports[name]
                wait_for_port("127.0.0.1", port, timeout, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"mailtally run did not come up: {exc}\n{self.log()}") from None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> int | None:
        """SIGTERM (clean stop), SIGKILL after 30 s; return the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        return proc.returncode

    def listening(self) -> bool:
        return all(
            port_open("127.0.0.1", p)
            for p in (self.relay_port, self.ingest_port, self.tracker_port)
        )
