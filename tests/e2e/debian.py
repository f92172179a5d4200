"""The Debian packages the end-to-end suite installs for itself, and how.

Postfix is preseeded to "Local only" so its post-install script asks nothing and writes a
harmless default main.cf; ``tests.apt.ensure_debian`` keeps it from starting during install
(policy-rc.d). The suite never uses that default instance: it runs its own (see postfix.py).
"""

from __future__ import annotations

from tests.apt import ensure_debian

PACKAGES = ["postfix", "swaks", "libnet-ssleay-perl", "chromium", "chromium-driver"]

PRESEED = """\
postfix postfix/main_mailer_type select Local only
postfix postfix/mailname string localhost
postfix postfix/destinations string localhost
postfix postfix/protocols select ipv4
"""


def install() -> None:
    """Install whatever of PACKAGES is missing (apt-get update once, non-interactive)."""
    ensure_debian(PACKAGES, preseed=PRESEED)
