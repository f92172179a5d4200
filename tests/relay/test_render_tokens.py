"""The relay mints a copy's tokens in one go (``Signer.click_tokens``, precomputed HMAC
pads); the tokens must stay exactly those the tracker's format defines."""

from __future__ import annotations

import base64
import hmac
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from relay import rewrite, submit
from relay.links import LinkContext
from tracker import tokens

BASE = "https://t.example"


def _reference(secret: str, payload: bytes) -> str:
    """The token format written out plainly: payload + 96-bit HMAC-SHA256, base64url."""
    key = tokens.hashlib.sha256(secret.encode()).digest()
    tag = hmac.new(key, payload, "sha256").digest()[: tokens.TAG_BYTES]
    return base64.urlsafe_b64encode(payload + tag).rstrip(b"=").decode()


@settings(max_examples=300, deadline=None)
@given(
    secret=st.text(min_size=1, max_size=100),
    delivery_id=st.integers(0, 2**50),
    links=st.lists(st.tuples(st.integers(0, 10**6), st.text(max_size=300)), max_size=5),
)
def test_click_tokens_are_the_format_tokens(secret, delivery_id, links):
    signer = tokens.Signer([secret, "an older secret"])
    parts = [tokens.click_part(p, u) for p, u in links]
    minted = signer.click_tokens(delivery_id, parts)
    for (position, url), token in zip(links, minted, strict=True):
        payload = tokens.CLICK + tokens._varint(delivery_id) + tokens.click_part(position, url)
        assert token == _reference(secret, payload)
        assert token == signer.click_token(delivery_id, position, url)
        assert signer.verify(token) == tokens.Token("click", delivery_id, position, url)
    assert signer.open_token(delivery_id) == _reference(
        secret, tokens.OPEN + tokens._varint(delivery_id)
    )


HTML = (
    '<html><body><a href="https://a.example/x">go</a> <a href="https://b.example/y?q=1">b</a>'
    '<!--[if mso]><v:roundrect href="https://a.example/x"></v:roundrect><![endif]-->'
    '<a href="https://a.example/x">again</a></body></html>'
)


def test_render_copies_gives_each_copy_its_own_verified_tokens():
    msg = (
        b"From: a@corp.example\r\nTo: r@dest.example\r\nSubject: s\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n" + HTML.encode() + b"\r\n"
    )
    plan = rewrite.plan(
        rewrite.analyse(msg), LinkContext(BASE), track_opens=True, track_clicks=True
    )
    # What render_copies reads of the settings.
    settings_ = SimpleNamespace(tracker=SimpleNamespace(base_url=BASE, secrets=["s" * 32]))
    signer = tokens.Signer(settings_.tracker.secrets)
    copies = submit.render_copies(settings_, plan, [5, 6])
    assert plan.click_targets == [
        (1, "https://a.example/x"),
        (2, "https://b.example/y?q=1"),
        (3, "https://a.example/x"),
    ]
    for delivery_id, copy in zip([5, 6], copies, strict=True):
        expected = plan.render(
            lambda pos, url, d=delivery_id: tokens.click_url(BASE, signer, d, pos, url),
            tokens.open_url(BASE, signer, delivery_id),
            tokens.honeypot_url(BASE, signer, delivery_id),
        )
        assert copy == expected
        assert copy.count(b"/c/") == 5  # three links, the VML twin, the honeypot
