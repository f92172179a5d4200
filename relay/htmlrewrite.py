"""Plan and apply the edits to one HTML text: wrapped hrefs, removed markers, the pixel.

``plan_html`` decides (nothing is changed yet); ``HtmlPlan.apply`` splices the planned
edits into the original text, leaving every other character where it was. The same plan
renders every recipient's copy (only the tokens differ), so positions are identical in
all copies.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field

from relay import links as rules
from relay.htmlscan import RAW_TEXT, Comment, Tag, scan, scan_links

LINK_TAGS = ("a", "area")
_VISIBLE_TAGS = ("img", "svg", "video", "input", "button", "iframe", "object", "embed", "hr")
_INVISIBLE = " \t\n\r\f\u00a0\u200b\u200c\u200d\u2060\ufeff\u034f\u00ad"

# Out of normal flow and pinned to the top-left corner, so that it changes nothing in the
# layout (a 1x1 image in flow adds a line box in most templates; at its static position at
# the bottom it could still grow the scrollable area by 1px); transparent, never clickable.
PIXEL_STYLE = (
    "position:absolute;top:0;left:0;display:block;width:1px;height:1px;max-width:1px;max-height:1px;"
    "border:0;margin:0;padding:0;overflow:hidden;opacity:0;pointer-events:none;line-height:0;font-size:0"
)


def pixel_html(open_url: str | None, honeypot_url: str | None) -> str:
    """The inserted block: an invisible honeypot link (machines only) and the open pixel."""
    out = ""
    if honeypot_url:
        out += (
            f'<a href="{honeypot_url}" style="display:none!important" tabindex="-1" '
            'aria-hidden="true"></a>'
        )
    if open_url:
        out += (
            f'<img src="{open_url}" width="1" height="1" alt="" border="0" style="{PIXEL_STYLE}">'
        )
    return out


@dataclass(slots=True)
class LinkInfo:
    """One href found in the HTML and what was decided for it."""

    tag: str
    url: str
    text: str
    tracked: bool
    rule: str
    position: int | None = None
    mso: bool = False
    start: int = 0  # value span in the text
    end: int = 0


@dataclass(slots=True)
class Edit:
    start: int
    end: int
    kind: str  # "click", "remove" or "pixel"
    position: int = 0
    url: str = ""


@dataclass(slots=True)
class HtmlPlan:
    links: list[LinkInfo] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    pixel_at: int | None = None

    def apply(self, text: str, click: Callable[[int, str], str], pixel: str) -> str:
        """The text with every planned edit spliced in (``click(position, url)`` → new href)."""
        out = []
        cursor = 0
        for e in sorted(self.edits, key=lambda e: (e.start, e.end)):
            out.append(text[cursor : e.start])
            if e.kind == "click":
                out.append(click(e.position, e.url))
            elif e.kind == "pixel":
                out.append(pixel)
            cursor = e.end
        out.append(text[cursor:])
        return "".join(out)


def _attr_removal_start(text: str, start: int) -> int:
    while start > 0 and text[start - 1] in " \t\n\r\f":
        start -= 1
    return start


def plan_html(
    text: str,
    ctx: rules.LinkContext,
    *,
    track_clicks: bool,
    add_pixel: bool,
    meaning: Callable[[str], str] = lambda s: s,
    first_position: int = 1,
) -> HtmlPlan:
    """Decide every edit for ``text``. ``meaning`` turns a slice of ``text`` into real text
    (the scanner may work on a byte-per-character view of the original)."""
    plan = HtmlPlan()
    tags = [t for t in scan_links(text) if isinstance(t, Tag)]
    # For each <a>, the next (non-Outlook) a tag: its inner HTML ends there.
    next_a: list[Tag | None] = [None] * len(tags)
    following = None
    for idx in range(len(tags) - 1, -1, -1):
        next_a[idx] = following
        if not tags[idx].mso and tags[idx].name == "a":
            following = tags[idx]
    position = first_position
    plain_by_url: dict[str, list[LinkInfo]] = {}
    mso_tags: list[tuple[Tag, LinkInfo]] = []
    depth = 0
    body_close = html_close = None
    for idx, tag in enumerate(tags):
        if tag.mso:
            href = tag.attr("href")
            if href is not None and not tag.is_end:
                url = rules.clean_url(meaning(href.value(text)))
                info = LinkInfo(
                    tag.name, url, "", False, "mso", None, True, href.value_start, href.value_end
                )
                mso_tags.append((tag, info))
            continue
        name = tag.name
        if tag.is_end:
            if name == "blockquote":
                depth = max(0, depth - 1)
            elif name == "body":
                if depth == 0:
                    body_close = tag.start
            elif name == "html":
                html_close = tag.start
            continue
        if name == "blockquote":
            depth += 1
            continue
        if name not in LINK_TAGS or not tag.attrs:  # no href, no marker
            continue
        href = marker = None  # the first of each (scan_links reports only these two)
        for a in tag.attrs:
            if a.name == "href":
                if href is None:
                    href = a
            elif a.name == "data-mailtally" and marker is None:
                marker = a
        notrack = marker is not None and meaning(marker.value(text)).strip().lower() == "notrack"
        if marker is not None and notrack:
            plan.edits.append(Edit(_attr_removal_start(text, marker.start), marker.end, "remove"))
        if href is None:
            continue
        inner = ""
        nxt = next_a[idx] if tag.name == "a" else None
        if nxt is not None and nxt.is_end:
            inner = text[tag.end : nxt.start]
        url = rules.clean_url(meaning(href.value(text)))
        label = rules.visible_text(meaning(inner))
        if href.value_start < 0:
            tracked, rule = False, "empty"
        else:
            tracked, rule = rules.classify(url, label, ctx, notrack)
        if tracked and not track_clicks:
            tracked, rule = False, "clicks-off"
        info = LinkInfo(
            tag.name, url, label, tracked, rule, None, False, href.value_start, href.value_end
        )
        if tracked:
            info.position = position
            position += 1
            plan.edits.append(Edit(href.value_start, href.value_end, "click", info.position, url))
        if tag.name == "a":
            plain_by_url.setdefault(url, []).append(info)
        plan.links.append(info)
    for tag, info in mso_tags:
        twins = plain_by_url.get(info.url, [])
        after = [p for p in twins if p.start > tag.start]
        twin = after[0] if after else (twins[-1] if twins else None)
        if twin is None:
            info.rule = "mso-no-twin"
        elif not twin.tracked:
            info.rule = "mso-twin-untracked"
        else:
            info.tracked, info.rule, info.position = True, "mso-twin", twin.position
            plan.edits.append(Edit(info.start, info.end, "click", twin.position, info.url))
        plan.links.append(info)
    plan.links.sort(key=lambda link: link.start)
    if add_pixel:
        at = body_close if body_close is not None else html_close
        plan.pixel_at = len(text) if at is None else at
        plan.edits.append(Edit(plan.pixel_at, plan.pixel_at, "pixel"))
    return plan


def has_visible_content(text: str, meaning: Callable[[str], str] = lambda s: s) -> bool:
    """False for an HTML body that shows nothing (no text, no image): not worth tracking."""
    cursor = 0
    raw = False
    in_head = False
    for tok in scan(text, attrs=False):
        if isinstance(tok, Tag) and tok.mso:
            continue
        gap = text[cursor : tok.start]
        if gap and not raw and not in_head:
            if html.unescape(meaning(gap)).strip(_INVISIBLE):
                return True
        cursor = max(cursor, tok.end)
        if isinstance(tok, Comment):
            raw = False
            continue
        raw = not tok.is_end and tok.name in RAW_TEXT
        if tok.name == "head":
            in_head = not tok.is_end
        elif tok.name == "body":
            in_head = False
        if not tok.is_end and tok.name in _VISIBLE_TAGS:
            return True
    tail = text[cursor:]
    return bool(not raw and html.unescape(meaning(tail)).strip(_INVISIBLE))
