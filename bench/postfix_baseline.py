"""Postfix as an SMTP accept baseline: the same 60 KB mails, the same load client.

A private instance (tests/e2e/postfix.py: own config and queue, 127.0.0.1, free port) whose
mail is discarded after queueing, so the figure is Postfix's durable accept (smtpd, cleanup,
fsynced queue file) and not its local delivery. Skipped when Postfix is not installed.
"""

from __future__ import annotations

import shutil
import subprocess

from common import free_port, smtp_load


def available() -> bool:
    return shutil.which("postfix") is not None or shutil.which("/usr/sbin/postfix") is not None


async def postfix_accept(quick: bool, mail_path: str) -> dict:
    """msgs/s (median, spread) per recipient count, 16 connections, no AUTH (mynetworks)."""
    from tests.e2e.postfix import Postfix

    server = Postfix(free_port())
    server.start()
    try:
        subprocess.run(
            ["postconf", "-c", str(server.etc), "-e", "virtual_transport = discard:bench"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        server._postfix("reload")
        return await smtp_load(server.port, quick, mail_path)
    finally:
        server.stop()
