"""The tracking decision for one message, with the reason that is stored (SPEC relay 3).

Order: the global switch, then the user's defaults, then the per-message header
(``X-Mailtally-Track: opens, clicks | none``), then what the message allows (no HTML part,
an HTML part with nothing visible, a signed message). ``X-Mailtally-Log: yes|no``
overrides the user's log default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import config


@dataclass
class Decision:
    track_opens: bool
    track_clicks: bool
    log: bool
    reason: str | None  # why (some) tracking is off; None when both are on
    notes: list[str] = field(default_factory=list)  # every step, for `mailtally preview`

    @property
    def tracked(self) -> bool:
        return self.track_opens or self.track_clicks


def _parse_track(value: str) -> tuple[bool, bool] | None:
    words = {w.strip().lower() for w in value.replace(";", ",").split(",") if w.strip()}
    if words == {"none"}:
        return False, False
    if words and words <= {"opens", "clicks", "open", "click"}:
        return bool(words & {"opens", "open"}), bool(words & {"clicks", "click"})
    return None


def decide(
    settings: config.Settings,
    user: dict,
    control: dict[str, str],
    *,
    has_html: bool,
    visible: bool,
    signed: bool = False,
) -> Decision:
    """``control`` holds the removed X-Mailtally-* header values (lower-case names)."""
    notes: list[str] = []
    opens, clicks = bool(user.get("track_opens", 1)), bool(user.get("track_clicks", 1))
    reason = None
    notes.append(
        f"user defaults: opens {'on' if opens else 'off'}, clicks {'on' if clicks else 'off'}"
    )
    if not opens and not clicks:
        reason = "user-defaults: the user tracks neither opens nor clicks"
    elif not opens or not clicks:
        reason = f"user-defaults: {'opens' if not opens else 'clicks'} off"
    header = control.get("x-mailtally-track")
    if header is not None:
        parsed = _parse_track(header)
        if parsed is None:
            notes.append(f"X-Mailtally-Track: {header!r} not understood, ignored")
        else:
            opens, clicks = parsed
            notes.append(f"X-Mailtally-Track: {header}")
            reason = None
            if not opens and not clicks:
                reason = "header: X-Mailtally-Track: none"
            elif not opens or not clicks:
                reason = f"header: X-Mailtally-Track: {header}"
    if not settings.general.tracking_enabled:
        opens = clicks = False
        reason = "tracking-disabled: general.tracking_enabled = false"
        notes.append("tracking is disabled for all users")
    if (opens or clicks) and not has_html:
        opens = clicks = False
        reason = "plain-text-only: no HTML part"
    elif (opens or clicks) and not visible:
        opens = clicks = False
        reason = "empty-html: the HTML part shows nothing"
    elif (opens or clicks) and signed:
        opens = clicks = False
        reason = "signed: rewriting would break the signature"
    log = bool(user.get("log_sent", 0))
    log_header = control.get("x-mailtally-log")
    notes.append(f"user default: log {'on' if log else 'off'}")
    if log_header is not None:
        value = log_header.strip().lower()
        if value in ("yes", "true", "on", "1"):
            log = True
        elif value in ("no", "false", "off", "0"):
            log = False
        else:
            notes.append(f"X-Mailtally-Log: {log_header!r} not understood, ignored")
        notes.append(f"X-Mailtally-Log: {log_header}")
    if reason:
        notes.append(reason)
    return Decision(opens, clicks, log, reason, notes)
