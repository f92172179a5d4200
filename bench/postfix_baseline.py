"""Postfix as an SMTP accept baseline: the same 60 KB mails, the same load client.

A private instance (tests/e2e/postfix.py: own config and queue, 127.0.0.1, free port) whose
mail is discarded after queueing, so the figure is Postfix's durable accept (smtpd, cleanup,
fsynced queue file) and not its local delivery. Skipped when Postfix is not installed.
"""

from __future__ import annotations

import shutil
import subprocess

from common import free_port, repeated


def available() -> bool:
    return shutil.which("postfix") is not None or shutil.which("/usr/sbin/postfix") is not None


async def postfix_accept(quick: bool, mail_path: str, rcpts: tuple[int, ...]) -> dict:
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
        out = {}
        for rc in rcpts:
            out[rc] = await repeated(
                3,
                "smtp",
                "127.0.0.1",
                server.port,
                16,
                300 if quick else 2000,
                5 if quick else 20,
                mail_path,
                rc,
            )
        return out
    finally:
        server.stop()
