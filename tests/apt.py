"""Install Debian packages that a test needs (the project must install what it uses).

Called from fixtures; runs apt-get update once per machine boot and installs only what is
missing, non-interactively, serialised by a lock so parallel test processes do not collide.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

_LOCK = Path("/tmp/mailtally-apt.lock")
_UPDATED = Path("/tmp/mailtally-apt.updated")


def _missing(packages: list[str]) -> list[str]:
    out = []
    for p in packages:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            out.append(p)
    return out


def ensure_debian(packages: list[str], preseed: str = "") -> None:
    """Make sure the Debian packages are installed; raise RuntimeError with apt's output if not."""
    if not _missing(packages):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RuntimeError(f"need Debian packages {packages} and cannot install them (not root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with _LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = _missing(packages)
        if not missing:
            return
        if preseed:
            subprocess.run(["debconf-set-selections"], input=preseed, text=True, check=True)
        if not _UPDATED.exists():
            subprocess.run(
                ["apt-get", "update", "-q"], env=env, check=True, capture_output=True, timeout=600
            )
            _UPDATED.touch()
        # policy-rc.d 101 keeps daemons (postfix) from starting during install.
        policy = Path("/usr/sbin/policy-rc.d")
        had_policy = policy.exists()
        if not had_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            r = subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                env=env,
                capture_output=True,
                text=True,
                timeout=1200,
            )
        finally:
            if not had_policy:
                policy.unlink(missing_ok=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get install {missing} failed: {r.stderr[-2000:]}")
