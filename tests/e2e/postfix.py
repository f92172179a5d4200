"""A private Postfix instance for the end-to-end suite: the "real mail provider" upstream.

Each test session gets its own Postfix (own config, queue and mail directories, started
with ``postfix -c DIR start``, no systemd), listening only on 127.0.0.1 on a free port, so
it never touches the system's default instance or another engineer's run. Every domain
is accepted and delivered by virtual(8) to one catch-all Maildir that the tests read;
virtual(8) prepends ``X-Original-To``/``Delivered-To``, which tells the copies apart.
Recipient rules answer 451 for ``tempfail@…`` (switchable, to see a retry succeed) and
550 for ``reject@…``. Header rewriting is off so delivered bytes are what was sent.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.e2e.net import wait_for_port

# virtual(8) refuses uids below virtual_minimum_uid (100); nobody/nogroup owns the Maildir.
MAIL_UID = MAIL_GID = 65534

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.e2e.localdomain
mydomain = e2e.localdomain
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_banner = $myhostname ESMTP e2e
biff = no
append_dot_mydomain = no
alias_maps =
alias_database =
local_recipient_maps =
home_mailbox = Maildir/
# Deliver every domain to one Maildir (virtual_mailbox_base/Maildir/).
virtual_mailbox_domains = regexp:{etc}/virtual_domains
virtual_mailbox_maps = regexp:{etc}/virtual_mailbox
virtual_mailbox_base = {base}/mail
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_mailbox_limit = 0
message_size_limit = 104857600
# Keep headers exactly as received (no canonicalisation, no dropped headers).
local_header_rewrite_clients =
message_drop_headers =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access regexp:{etc}/recipient_access,
    permit_mynetworks, reject_unauth_destination
smtpd_tls_security_level = none
smtp_tls_security_level = none
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
default_process_limit = 20
delay_warning_time = 0
"""

# chroot off everywhere ("n" in the 5th column); smtpd only on 127.0.0.1:port.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
proxywrite unix  - - n -    1 proxymap
smtp       unix  - - n -    - smtp
relay      unix  - - n -    - smtp
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
local      unix  - n n -    - local
virtual    unix  - n n -    - virtual
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
"""

TEMPFAIL_RULE = "/^tempfail@/ 451 4.2.0 Mailbox temporarily unavailable (e2e tempfail rule)\n"
REJECT_RULE = "/^reject@/ 550 5.1.1 No such user here (e2e reject rule)\n"


class Postfix:
    """One private Postfix instance; ``start()``/``stop()``, and what it delivered."""

    def __init__(self, port: int) -> None:
        self.port = port
        # Not under pytest's tmp_path: that is mode 0700 and the postfix/nobody users must
        # traverse the queue and mail directories.
        self.base = Path(tempfile.mkdtemp(prefix="mailtally-e2e-postfix-"))
        self.base.chmod(0o755)
        self.etc = self.base / "etc"
        self.maildir = self.base / "mail" / "Maildir"
        self.maillog = self.base / "maillog"
        self.tempfail = True

    # --- lifecycle -----------------------------------------------------------------------

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["postfix", "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def start(self) -> None:
        """Write the configuration, start the master daemon, wait until SMTP answers."""
        reap_abandoned()
        (self.base / OWNER).write_text(str(os.getpid()))
        self.etc.mkdir()
        for sub in ("queue", "data"):
            (self.base / sub).mkdir()
        (self.base / "mail").mkdir()
        os.chown(self.base / "mail", MAIL_UID, MAIL_GID)
        (self.base / "data").chmod(0o700)
        shutil.chown(self.base / "data", "postfix")
        fmt = {"base": self.base, "etc": self.etc, "uid": MAIL_UID, "gid": MAIL_GID}
        (self.etc / "main.cf").write_text(MAIN_CF.format(**fmt))
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.etc / "virtual_domains").write_text("/.*/ OK\n")
        (self.etc / "virtual_mailbox").write_text("/.*/ Maildir/\n")
        self._write_access()
        self.maillog.touch()
        r = self._postfix("start", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}{self.log()[-2000:]}")
        wait_for_port("127.0.0.1", self.port, timeout=30)

    def stop(self) -> None:
        """Stop the master daemon (abort if a graceful stop hangs), remove everything."""
        pid = self.master_pid()
        self._postfix("stop", check=False)
        if pid is not None and not _wait_gone(pid, 20):
            self._postfix("abort", check=False)
            _wait_gone(pid, 10)
        shutil.rmtree(self.base, ignore_errors=True)

    def master_pid(self) -> int | None:
        try:
            return int((self.base / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # --- recipient rules -----------------------------------------------------------------

    def _write_access(self) -> None:
        text = (TEMPFAIL_RULE if self.tempfail else "") + REJECT_RULE
        path = self.etc / "recipient_access"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def set_tempfail(self, enabled: bool) -> None:
        """Switch the 451 rule for ``tempfail@…`` on or off (reloads the daemons)."""
        if enabled == self.tempfail:
            return
        self.tempfail = enabled
        self._write_access()
        self._postfix("reload")

    # --- what happened -------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        """Where the log ends now (pass as ``since`` to see only what follows)."""
        return len(self.log())

    def wait_for_log(self, pattern: str, timeout: float = 30, since: int = 0) -> re.Match:
        """Wait until the Postfix log (from offset ``since``) has a line matching ``pattern``."""
        rx = re.compile(pattern)
        found: list[re.Match] = []

        def seen() -> bool:
            m = rx.search(self.log()[since:])
            if m:
                found.append(m)
            return m is not None

        wait_until(seen, timeout, f"Postfix log line /{pattern}/")
        return found[0]

    def messages(self) -> list[Delivered]:
        """Every message in the catch-all Maildir, oldest first."""
        out = []
        for sub in ("new", "cur"):
            d = self.maildir / sub
            if d.is_dir():
                out += [Delivered(p) for p in d.iterdir() if p.is_file()]
        out.sort(key=lambda m: (m.path.stat().st_mtime_ns, m.path.name))
        return out

    def wait_for_messages(
        self, match: Callable[[Delivered], bool], count: int, timeout: float = 60
    ) -> list[Delivered]:
        """Wait until at least ``count`` delivered messages satisfy ``match``."""
        found: list[Delivered] = []

        def enough() -> bool:
            found[:] = [m for m in self.messages() if match(m)]
            return len(found) >= count

        wait_until(enough, timeout, f"{count} matching messages in the Maildir")
        return found


class Delivered:
    """One message as Postfix's virtual(8) wrote it to the Maildir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw = path.read_bytes()
        self.msg: email.message.EmailMessage = email.message_from_bytes(
            self.raw, policy=email.policy.default
        )  # type: ignore[assignment]

    @property
    def recipient(self) -> str:
        """The envelope recipient this copy was delivered for."""
        return str(self.msg.get("X-Original-To", "")).strip().lower()

    @property
    def subject(self) -> str:
        return str(self.msg.get("Subject", ""))

    def html(self) -> str | None:
        part = self.msg.get_body(("html",))
        return part.get_content() if part is not None else None  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"<Delivered {self.recipient} {self.subject!r}>"


OWNER = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_abandoned() -> list[Path]:
    """Stop and remove private instances whose owning test process died (SIGKILL skips
    every ``finally``), so a killed run never leaves a Postfix behind for the next one."""
    reaped = []
    for base in Path(tempfile.gettempdir()).glob("mailtally-e2e-postfix-*"):
        try:
            owner = int((base / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        subprocess.run(
            ["postfix", "-c", str(base / "etc"), "abort"], capture_output=True, timeout=60
        )
        shutil.rmtree(base, ignore_errors=True)
        reaped.append(base)
    return reaped


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (every 50 ms) until it holds; AssertionError naming ``what`` if not."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False
