"""Helpers for the rewriter tests: real tokens, and mapping a rewritten text back."""

from __future__ import annotations

import re

from relay import htmlrewrite
from relay.links import LinkContext
from tracker import tokens

BASE = "https://t.example"
SIGNER = tokens.Signer(["s" * 32])
TRACKER_URL = re.compile(re.escape(BASE) + r"/(c|o)/([A-Za-z0-9_-]+)(\.gif)?")


def ctx(**kw) -> LinkContext:
    return LinkContext(BASE, **kw)


def rewrite_html(html: str, *, opens=True, clicks=True, delivery_id=7, **kw):
    plan = htmlrewrite.plan_html(html, ctx(**kw), track_clicks=clicks, add_pixel=opens or clicks)
    out = plan.apply(
        html,
        lambda pos, url: tokens.click_url(BASE, SIGNER, delivery_id, pos, url),
        htmlrewrite.pixel_html(
            tokens.open_url(BASE, SIGNER, delivery_id) if opens else None,
            tokens.honeypot_url(BASE, SIGNER, delivery_id) if clicks else None,
        ),
    )
    return plan, out


def links(plan) -> list[tuple[str, str, bool]]:
    return [(link.url, link.rule, link.tracked) for link in plan.links]


def clicked_urls(text: str) -> list[tuple[int, str]]:
    """(position, url) of every click token in ``text`` (honeypot excluded), verified."""
    out = []
    for m in TRACKER_URL.finditer(text):
        tok = SIGNER.verify(m.group(2))
        assert tok is not None, "token does not verify"
        if tok.kind == "click":
            out.append((tok.position, tok.url))
    return out


def map_back(original: str, plan, rewritten: str, delivery_id: int = 7) -> str:
    """Undo the rewrite using only the rewritten text and the original href values."""
    pixel = htmlrewrite.pixel_html(
        tokens.open_url(BASE, SIGNER, delivery_id), tokens.honeypot_url(BASE, SIGNER, delivery_id)
    )
    text = rewritten.replace(pixel, "", 1) if plan.pixel_at is not None else rewritten
    clicks = [e for e in plan.edits if e.kind == "click"]
    raw_values = [original[e.start : e.end] for e in sorted(clicks, key=lambda e: e.start)]
    pieces, cursor = [], 0
    found = [m for m in TRACKER_URL.finditer(text) if m.group(1) == "c"]
    assert len(found) == len(raw_values)
    for m, raw in zip(found, raw_values, strict=True):
        pieces += [text[cursor : m.start()], raw]
        cursor = m.end()
    pieces.append(text[cursor:])
    return "".join(pieces)
