"""``mailtally preview``: what the relay would do with a message, without sending or storing.

Runs the same steps as the submission path (control headers, tracking decision, link
rules, pixel) and renders a sample copy (delivery id 0) for ``--output``.
"""

from __future__ import annotations

import sqlite_utils

import config
from relay import decision as decisions
from relay import rewrite, submit
from relay.links import LinkContext
from store import addresses
from store import users as store_users
from store.db import StoreError
from tracker import tokens


def find_sender(db: sqlite_utils.Database, data: bytes, user_email: str | None) -> dict:
    if user_email:
        return store_users.get_user(db, user_email)
    found = addresses.parse_list(*(submit.headers_of(data).get_all("From") or []))
    for _, addr in found:
        owners = store_users.owners_of(db, addr)
        if len({o["user_id"] for o in owners}) == 1:
            return store_users.user_by_id(db, owners[0]["user_id"])
    raise StoreError("no single user owns the From address; say which with --user EMAIL")


def preview(
    settings: config.Settings, db: sqlite_utils.Database, data: bytes, user_email: str | None = None
) -> tuple[dict, bytes]:
    """(report, the message a recipient would get) for ``data``."""
    user = find_sender(db, data, user_email)
    stripped, control = rewrite.split_control_headers(data)
    error = None
    analysis = None
    try:
        analysis = rewrite.analyse(stripped)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    d = decisions.decide(
        settings,
        user,
        control,
        has_html=analysis.has_html if analysis else True,
        visible=analysis.visible if analysis else True,
        signed=analysis.signed if analysis else False,
    )
    links: list[dict] = []
    output = stripped
    pixel = False
    if analysis is not None and error is None:
        try:
            ctx = LinkContext(settings.tracker.base_url, list(settings.relay.excluded_domains))
            plan = rewrite.plan(
                analysis, ctx, track_opens=d.track_opens, track_clicks=d.track_clicks
            )
            links = [
                {
                    "position": link.position,
                    "url": link.url,
                    "text": link.text,
                    "tracked": link.tracked,
                    "rule": link.rule,
                    "outlook_only": link.mso,
                }
                for link in plan.links
            ]
            if d.tracked:
                signer = tokens.Signer(settings.tracker.secrets)
                base = settings.tracker.base_url
                output = plan.render(
                    lambda pos, url: tokens.click_url(base, signer, 0, pos, url),
                    tokens.open_url(base, signer, 0),
                    tokens.honeypot_url(base, signer, 0),
                )
                pixel = d.track_opens
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            output = stripped
    if error and d.tracked:
        d.track_opens = d.track_clicks = False
        d.reason = "rewrite-failed: " + error
        pixel = False
    report = {
        "user": user["email"],
        "track_opens": d.track_opens,
        "track_clicks": d.track_clicks,
        "log": d.log,
        "reason": d.reason or "tracked",
        "steps": d.notes,
        "pixel_added": pixel,
        "links_tracked": len({link["position"] for link in links if link["tracked"]}),
        "links": links,
        "rewrite_error": error,
        "control_headers_removed": sorted(control),
    }
    return report, output
