"""Step 8 of the day: a 200-message burst, ``mailtally run`` SIGKILLed mid-burst and
restarted; every message that got a 250 reaches Postfix's Maildir (duplicates allowed).

Half the burst goes to ``tempfail@…``, which Postfix answers 451 until after the restart,
so that at the moment of the kill many accepted messages are certainly still in the
relay's outbox (not only the few a fast upstream had not taken yet)."""

from __future__ import annotations

import queue
import secrets
import smtplib
import ssl
import threading

from tests.e2e import mail
from tests.e2e.conftest import start_mailtally
from tests.e2e.postfix import Postfix, wait_until
from tests.e2e.system import PASSWORD, Mailtally

ALICE = "alice@acme.example"
INBOX, TEMPFAIL = "inbox@globex.example", "tempfail@globex.example"
TOTAL, KILL_AFTER, CLIENTS = 200, 60, 4


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the relay's certificate is self-signed
    return context


def _rcpt(n: int) -> str:
    return TEMPFAIL if n % 2 else INBOX


def _message(tag: str, n: int) -> bytes:
    html = f'<p>Update {n} — <a href="https://www.example.org/status?n={n}">status</a></p>'
    return mail.compose(ALICE, [_rcpt(n)], f"Burst {tag} #{n:03d}", html=html).as_bytes()


def _sender(
    system: Mailtally, tag: str, todo: queue.Queue, accepted: set[int], lock: threading.Lock
) -> None:
    """Send numbers from ``todo`` over one connection until the queue is empty or the
    connection dies; only a 250 to DATA counts as accepted."""
    try:
        smtp = smtplib.SMTP("127.0.0.1", system.relay_port, timeout=30)
        smtp.starttls(context=_tls())
        smtp.login(ALICE, PASSWORD)
    except (OSError, smtplib.SMTPException):
        return
    n = None
    try:
        while True:
            try:
                n = todo.get_nowait()
            except queue.Empty:
                n = None
                break
            smtp.sendmail(ALICE, [_rcpt(n)], _message(tag, n))
            with lock:
                accepted.add(n)
            n = None
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        pass  # the server was killed: this message got no 250
    finally:
        if n is not None:
            todo.put(n)  # send again after the restart


def _burst(system: Mailtally, tag: str, todo: queue.Queue, accepted: set[int], lock) -> list:
    threads = [
        threading.Thread(target=_sender, args=(system, tag, todo, accepted, lock), daemon=True)
        for _ in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    return threads


def test_8_sigkill_mid_burst_loses_no_accepted_message(tmp_path_factory, postfix: Postfix) -> None:
    system = start_mailtally(tmp_path_factory.mktemp("crash"), postfix)
    postfix.set_tempfail(True)
    try:
        system.add_user(ALICE, "Alice Archer")
        tag = secrets.token_hex(3)
        todo: queue.Queue[int] = queue.Queue()
        for n in range(TOTAL):
            todo.put(n)
        accepted: set[int] = set()
        lock = threading.Lock()

        threads = _burst(system, tag, todo, accepted, lock)
        wait_until(lambda: len(accepted) >= KILL_AFTER, 60, f"{KILL_AFTER} accepted messages")
        system.kill()
        for t in threads:
            t.join(timeout=60)
        with lock:
            before_kill = set(accepted)
        assert KILL_AFTER <= len(before_kill) < TOTAL, "the kill did not land mid-burst"

        def delivered() -> set[int]:
            prefix = f"Burst {tag} #"
            return {
                int(m.subject[len(prefix) :])
                for m in postfix.messages()
                if m.subject.startswith(prefix)
            }

        at_kill = delivered() & before_kill
        print(
            f"accepted before SIGKILL: {len(before_kill)}, in the Maildir at the kill: "
            f"{len(at_kill)}, still queued: {len(before_kill - at_kill)}"
        )
        assert before_kill - at_kill, "nothing was left in the outbox to survive the kill"

        # Restart on the same data directory; the relay resumes its outbox.
        system.start()
        postfix.set_tempfail(False)
        threads = _burst(system, tag, todo, accepted, lock)
        for t in threads:
            t.join(timeout=120)
        assert todo.empty() and len(accepted) == TOTAL, "the restarted relay refused mail"

        wait_until(lambda: before_kill <= delivered(), 120, "every pre-kill 250 delivered")
        wait_until(lambda: delivered() == set(range(TOTAL)), 120, "all 200 messages delivered")
    finally:
        system.stop()
        postfix.set_tempfail(True)
