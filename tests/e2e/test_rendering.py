"""Step 9 of the day: the delivered (tracked) copy renders pixel-identical to the original.

Real templates from the shared corpora go through the relay and Postfix; Chromium renders
the original and the delivered copy from the same kind of URL (relative images fail the same
way for both) and the two full-page screenshots must be the same PNG, pixel for pixel.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.e2e import mail
from tests.e2e.browser import DESKTOP_UA, PageServer
from tests.e2e.postfix import Postfix
from tests.e2e.system import Mailtally

ALICE = "alice@acme.example"
CORPORA = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpora" / "html"
TEMPLATES = [
    "postmark/templates-inlined/basic-full/welcome/content.html",
    "sendwithus/templates/cerberus/hybrid.html",
]


@pytest.fixture(scope="module")
def system(mailtally: Mailtally) -> Mailtally:
    mailtally.add_user(ALICE, "Alice Archer")
    return mailtally


def screenshot(browser, url: str, pixels: list[int] | None = None) -> bytes:
    """Full-page PNG once the network is idle; ``pixels`` collects tracker-pixel statuses."""
    context = browser.new_context(user_agent=DESKTOP_UA, viewport={"width": 800, "height": 600})
    try:
        page = context.new_page()
        if pixels is not None:
            page.on("response", lambda r: pixels.append(r.status) if "/o/" in r.url else None)
        page.goto(url, wait_until="networkidle")
        return page.screenshot(full_page=True, type="png")
    finally:
        context.close()


@pytest.mark.parametrize("template", TEMPLATES)
def test_9_delivered_copy_renders_pixel_identical(
    template: str, system: Mailtally, postfix: Postfix, pages: PageServer, browser, tmp_path
) -> None:
    source = CORPORA / template
    html = source.read_text(encoding="utf-8")
    tag = secrets.token_hex(3)
    subject = f"Rendering {tag}"
    rcpt = "reader@globex.example"
    msg = mail.compose(ALICE, [rcpt], subject, html=html)
    mail.submit(system.relay_port, ALICE, msg, [rcpt])
    (copy,) = postfix.wait_for_messages(lambda m: m.subject == subject, 1, timeout=60)
    delivered = copy.html() or ""
    sent = msg.get_body(("html",)).get_content()
    base = system.settings.tracker.base_url
    assert f"{base}/o/" in delivered, "the copy was not tracked"
    assert delivered != sent

    original = screenshot(browser, pages.add(f"/render/{tag}/original.html", sent))
    pixels: list[int] = []
    tracked = screenshot(browser, pages.add(f"/render/{tag}/delivered.html", delivered), pixels)
    assert pixels == [200], "the tracker did not serve the pixel"
    if original != tracked:
        (tmp_path / "original.png").write_bytes(original)
        (tmp_path / "delivered.png").write_bytes(tracked)
        raise AssertionError(f"renders differ; screenshots in {tmp_path}")
