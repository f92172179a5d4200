"""Big mail: the peak memory of the ingest server process while it accepts and files one
message with a 49.9 MB attachment (about 68 MB on the wire in base64).

``mailtally ingest`` runs as its own process; the mail comes from a separate client process.
The figure is the process' peak resident size (VmHWM) once the mail is filed, minus its idle
resident size (VmRSS) after a small warm-up mail (so one-time imports are not counted as the
big mail's cost). The baseline column is the message size: the target is peak <= 4x that.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, free_port, row, spread

SENDER = "bigmail@corp.example"
ATTACHMENT = 49_900_000  # under ingest.max_attachment_size (50,000,000)

CLIENT = r"""
import smtplib, sys
host, port, path, sender, rcpt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
data = open(path, "rb").read()
with smtplib.SMTP(host, port, timeout=300) as s:
    s.sendmail(sender, [rcpt], data)
"""


def big_message(path: Path, message_id: str, size: int = ATTACHMENT) -> int:
    """Write a multipart mail with one random ``size``-byte base64 attachment; its length."""
    head = (
        f"From: Big Sender <{SENDER}>\r\nTo: Carol <carol@customer.example>\r\n"
        f"Subject: the big file\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n\r\n'
        "--BOUNDARY\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Here is the file.\r\n"
        "--BOUNDARY\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="big.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    chunk = 57 * 20_000  # whole 76-character lines per chunk
    with path.open("wb") as fh:
        fh.write(head)
        left = size
        while left:
            raw = os.urandom(min(chunk, left))
            left -= len(raw)
            fh.write(base64.encodebytes(raw).replace(b"\n", b"\r\n"))
        fh.write(b"--BOUNDARY--\r\n")
    return path.stat().st_size


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def start_ingest(config_path: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, MAILTALLY_CONFIG=str(config_path), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "ingest"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mailtally ingest exited while waiting for {what}")
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def send(port: int, path: Path, rcpt: str) -> None:
    subprocess.run(
        [sys.executable, "-c", CLIENT, "127.0.0.1", str(port), str(path), SENDER, rcpt],
        check=True,
        timeout=300,
    )


def one_run(size: int) -> dict:
    import cli
    import store
    from store import inbound as store_inbound
    from store import users

    tmp = Path(tempfile.mkdtemp(prefix="mailtally-bigmail-"))
    settings = cli.initialise(tmp / "data")
    port = free_port()
    cfg = settings.config_path
    cfg.write_text(cfg.read_text().replace("[ingest]", f'[ingest]\nlisten = "127.0.0.1:{port}"', 1))
    db = store.connect(settings.db_path)
    users.add_user(db, SENDER, "Big Sender", None)
    rcpt = settings.ingest.bcc_address
    warm, big = tmp / "warm.eml", tmp / "big.eml"
    big_message(warm, "<warm@corp.example>", 3000)
    msg_size = big_message(big, "<big@corp.example>", size)
    proc = start_ingest(cfg, tmp / "ingest.log")
    try:
        wait(lambda: listening(port), 60, "the listener", proc)
        started = proc_status(proc.pid)
        send(port, warm, rcpt)
        wait(lambda: store_inbound.inbound_by_message_id(db, "<warm@corp.example>"), 60, "warm-up")
        time.sleep(0.5)
        idle = proc_status(proc.pid)
        t = time.perf_counter()
        send(port, big, rcpt)
        accepted = time.perf_counter() - t
        found = wait(
            lambda: store_inbound.inbound_by_message_id(db, "<big@corp.example>"),
            300,
            "the big mail to be filed",
            proc,
        )
        filed = time.perf_counter() - t
        done = proc_status(proc.pid)
        entry = found[0]
        kept = db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM attachments WHERE email_id = ?", [entry["email_id"]]
        ).fetchone()[0]
        return {
            "message_bytes": msg_size,
            "decision": entry["decision"],
            "attachment_bytes_kept": kept,
            "rss_started": started["VmRSS"],
            "rss_idle": idle["VmRSS"],
            "hwm_idle": idle["VmHWM"],
            "hwm_after": done["VmHWM"],
            "peak_over_idle": done["VmHWM"] - idle["VmRSS"],
            "accept_s": accepted,
            "filed_s": filed,
        }
    finally:
        db.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for p in (warm, big):
            p.unlink(missing_ok=True)


def run(quick: bool) -> list[dict]:
    runs = [one_run(ATTACHMENT) for _ in range(2 if quick else 3)]
    for r in runs:
        if r["decision"] != "logged" or r["attachment_bytes_kept"] != ATTACHMENT:
            raise RuntimeError(f"big mail not logged with its attachment: {r}")
    size = runs[0]["message_bytes"]
    mb = 1_000_000
    peak = spread([r["peak_over_idle"] / mb for r in runs])
    ratio = peak["median"] * mb / size
    return [
        row(
            "bigmail: ingest process peak RSS over idle, 49.9 MB attachment",
            "MB",
            peak,
            "<= 4x message size",
            ratio <= 4,
            {"message size": spread([size / mb])},
            ratio,
            peak_rss_mb=spread([r["hwm_after"] / mb for r in runs]),
            idle_rss_mb=spread([r["rss_idle"] / mb for r in runs]),
            started_rss_mb=spread([r["rss_started"] / mb for r in runs]),
            accept_s=spread([r["accept_s"] for r in runs]),
            filed_s=spread([r["filed_s"] for r in runs]),
        )
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(one_run(int(sys.argv[1]) if len(sys.argv) > 1 else ATTACHMENT), indent=2))
