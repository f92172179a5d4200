"""The relay's rewriter: open pixel and tracked links, as byte-preserving edits of a message.

Only inline ``text/html`` parts change, and in them only the planned href values, a
removed ``data-mailtally`` marker and the inserted pixel block. Each part is decoded from
its own transfer encoding and charset, edited, and re-encoded the same way:

* 7bit/8bit/binary: the edits are spliced into the original bytes; a line pushed over 998
  octets is folded at the whitespace before an attribute (insignificant inside a tag);
* quoted-printable: only the encoded lines that hold an edit are re-encoded (a soft line
  break inside an href is handled because edits are made on the decoded bytes);
* base64: the part is re-encoded with its original line length.

ASCII-compatible charsets (UTF-8, ISO-8859-x, windows-125x, Shift_JIS, ...) are scanned one
byte per character, so every untouched byte stays as it was even when the text is not
valid in its declared charset; stateful ones (ISO-2022-JP, UTF-16, ...) are decoded, and
rewritten only when they round-trip exactly.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from relay import htmlrewrite, mime
from relay.htmlrewrite import HtmlPlan, LinkInfo
from relay.links import LinkContext, list_unsubscribe_urls

MAX_LINE = 998
CONTROL_HEADERS = ("x-mailtally-track", "x-mailtally-log")
# Removed from every copy as well: a Bcc header would show hidden recipients to the others.
REMOVED_HEADERS = (*CONTROL_HEADERS, "bcc")
_STATEFUL = ("iso2022", "iso-2022", "utf_16", "utf-16", "utf_32", "utf-32", "utf_7", "utf-7", "hz")
_FOLD_AT = re.compile(rb"[ \t](?=[A-Za-z_:][-A-Za-z0-9_:.]*\s*=)")


class RewriteError(Exception):
    """The message cannot be rewritten faithfully: it goes out untouched."""


# --- headers ----------------------------------------------------------------------------------


def split_control_headers(data: bytes) -> tuple[bytes, dict[str, str]]:
    """Remove ``X-Mailtally-Track``/``X-Mailtally-Log`` (and ``Bcc``) from the top header block.

    Returns the message without them (every other byte kept) and their values.
    """
    end = mime.header_end(data)
    head = data[:end]
    kept: list[bytes] = []
    found: dict[str, str] = {}
    current = ""
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if current:
                found[current] += " " + line.strip().decode("latin-1")
            else:
                kept.append(line)
            continue
        name, colon, value = line.partition(b":")
        current = name.strip().lower().decode("latin-1") if colon else ""
        if current in REMOVED_HEADERS:
            found[current] = value.strip().decode("latin-1")
            continue
        current = ""
        kept.append(line)
    if not found:
        return data, {}
    return b"".join(kept) + data[end:], found


# --- charsets ---------------------------------------------------------------------------------


@dataclass
class TextView:
    """The part's text as the scanner sees it, and how to get back to bytes."""

    text: str
    meaning: Callable[[str], str]
    to_bytes: Callable[[str], bytes]
    byte_indexed: bool  # text index == decoded byte index


def text_view(body: bytes, charset: str) -> TextView:
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        name = "latin-1"  # unknown charset: markup is ASCII, URLs are kept as bytes
    if any(s in name for s in _STATEFUL):
        try:
            text = body.decode(name)
        except UnicodeDecodeError as exc:
            raise RewriteError(f"HTML part is not valid {charset}: {exc.reason}") from None
        if text.encode(name) != body:
            raise RewriteError(f"HTML part in {charset} does not re-encode to the same bytes")
        return TextView(text, lambda s: s, lambda s: s.encode(name), False)

    def meaning(s: str) -> str:
        return s.encode("latin-1").decode(name, "replace")

    return TextView(body.decode("latin-1"), meaning, lambda s: s.encode("latin-1"), True)


# --- transfer encodings -----------------------------------------------------------------------


def _eol(body: bytes) -> bytes:
    """The part's line break (CRLF, as in SMTP, when it has none yet)."""
    if b"\r\n" in body:
        return b"\r\n"
    return b"\n" if b"\n" in body else b"\r\n"


@dataclass
class QPLine:
    start: int  # encoded offsets
    end: int  # including the line break
    soft: bool
    decoded: bytes


_HEX = b"0123456789ABCDEFabcdef"


_QP_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def _qp_decode_segment(content: bytes) -> bytes:
    """Decode =XX escapes only (a bare '=' stays); a regex, not a byte loop: this runs per line."""
    if b"=" not in content:
        return content
    return _QP_ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), content)


def qp_lines(body: bytes) -> list[QPLine]:
    lines = []
    pos = 0
    for raw in body.splitlines(keepends=True):
        content = raw.rstrip(b"\r\n")
        eol = raw[len(content) :]
        stripped = content.rstrip(b" \t")
        if stripped.endswith(b"="):
            decoded = _qp_decode_segment(stripped[:-1])
            lines.append(QPLine(pos, pos + len(raw), True, decoded))
        else:
            lines.append(QPLine(pos, pos + len(raw), False, _qp_decode_segment(content) + eol))
        pos += len(raw)
    return lines


def _qp_encode_line(data: bytes, eol: bytes, maxlen: int = 76) -> bytes:
    """One hard line (no line break in ``data``), soft-wrapped at ``maxlen``."""
    toks = []
    last = len(data) - 1
    for i, c in enumerate(data):
        if (33 <= c <= 126 and c != 61) or (c in (9, 32) and i != last):
            toks.append(bytes([c]))
        else:
            toks.append(b"=%02X" % c)
    out, line = [], b""
    for t in toks:
        if len(line) + len(t) > maxlen - 1:
            out.append(line + b"=" + eol)
            line = b""
        line += t
    out.append(line)
    return b"".join(out)


def _qp_encode(seg: bytes, eol: bytes, soft_end: bool) -> bytes:
    out = []
    pieces = seg.split(b"\n")
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        if not last:
            out.append(_qp_encode_line(piece.rstrip(b"\r"), eol) + eol)
        elif piece:
            out.append(_qp_encode_line(piece, eol) + (b"=" + eol if soft_end else b""))
    return b"".join(out)


def qp_apply(body: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply decoded-byte edits to a quoted-printable body, re-encoding only touched lines."""
    lines = qp_lines(body)
    if not lines:
        lines = [QPLine(0, 0, False, b"")]
    starts = []
    pos = 0
    for line in lines:
        starts.append(pos)
        pos += len(line.decoded)
    total = pos
    eol = _eol(body)

    def line_of(p: int) -> int:
        if p >= total:
            return len(lines) - 1
        return bisect.bisect_right(starts, p) - 1

    groups: list[list] = []  # [first line, last line, edits]
    for s, e, new in sorted(edits, key=lambda x: (x[0], x[1])):
        a, b = line_of(s), line_of(max(e - 1, s))
        if groups and a <= groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], b)
            groups[-1][2].append((s, e, new))
        else:
            groups.append([a, b, [(s, e, new)]])
    out = []
    cursor = 0
    for a, b, group in groups:
        seg_start = starts[a]
        seg = b"".join(line.decoded for line in lines[a : b + 1])
        pieces, c = [], 0
        for s, e, new in group:
            pieces += [seg[c : s - seg_start], new]
            c = e - seg_start
        pieces.append(seg[c:])
        out.append(body[cursor : lines[a].start])
        out.append(_qp_encode(b"".join(pieces), eol, lines[b].soft))
        cursor = lines[b].end
    out.append(body[cursor:])
    return b"".join(out)


def _b64_encode(data: bytes, line_len: int, eol: bytes) -> bytes:
    text = base64.b64encode(data)
    line_len = max(4, line_len - line_len % 4)
    return b"".join(text[i : i + line_len] + eol for i in range(0, len(text), line_len))


def _fold(body: bytes, eol: bytes, original: bytes) -> bytes:
    """Break lines over 998 octets at whitespace before an attribute (inside a tag).

    A line that cannot be folded is an error only when it is longer than the longest line
    the part already had (an over-long original line is delivered as it came).
    """
    lines = body.split(b"\n")
    if all(len(line) <= MAX_LINE + 1 for line in lines):
        return body
    limit = max(MAX_LINE, *(len(x.rstrip(b"\r")) for x in original.split(b"\n")))
    out = []
    for line in lines:
        while len(line.rstrip(b"\r")) > MAX_LINE:
            cuts = [m.start() + 1 for m in _FOLD_AT.finditer(line, 0, MAX_LINE)]
            if not cuts:
                if len(line.rstrip(b"\r")) > limit:
                    raise RewriteError("a rewritten line would exceed 998 octets")
                break
            cut = cuts[-1]
            out.append(line[:cut] + eol.rstrip(b"\n"))
            line = line[cut:]
        out.append(line)
    return b"\n".join(out)


# --- planning ---------------------------------------------------------------------------------


@dataclass
class PartPlan:
    part: mime.Part
    view: TextView
    encoding: str
    decoded: bytes
    html: HtmlPlan | None = None


@dataclass
class Analysis:
    """The message's inline HTML parts, decoded; what the tracking decision looks at."""

    data: bytes
    root: mime.Part
    parts: list[PartPlan] = field(default_factory=list)
    signed: bool = False
    has_html: bool = False
    visible: bool = False
    unsubscribe: set[str] = field(default_factory=set)


def _decode_body(part: mime.Part, data: bytes) -> tuple[str, bytes]:
    body = data[part.body_start : part.body_end]
    enc = part.transfer_encoding
    if enc == "base64":
        try:
            return enc, binascii.a2b_base64(
                re.sub(rb"[^A-Za-z0-9+/=]", b"", body), strict_mode=False
            )
        except binascii.Error as exc:
            raise RewriteError(f"bad base64 in the HTML part: {exc}") from None
    if enc == "quoted-printable":
        return enc, b"".join(line.decoded for line in qp_lines(body))
    return "identity", body


def analyse(data: bytes) -> Analysis:
    """Find and decode the inline HTML parts (attachments and attached messages are skipped)."""
    root = mime.parse(data)
    a = Analysis(
        data, root, unsubscribe=list_unsubscribe_urls(root.headers.get("List-Unsubscribe"))
    )

    def visit(part: mime.Part) -> None:
        if part.content_type in ("multipart/signed", "multipart/encrypted"):
            a.signed = True
            return
        if part.content_type.startswith("message/"):
            return
        if part.children:
            for c in part.children:
                visit(c)
            return
        if part.content_type == "text/html" and not part.is_attachment():
            a.has_html = True
            enc, decoded = _decode_body(part, data)
            view = text_view(decoded, part.charset)
            a.parts.append(PartPlan(part, view, enc, decoded))
            if htmlrewrite.has_visible_content(view.text, view.meaning):
                a.visible = True

    visit(root)
    return a


@dataclass
class MessagePlan:
    analysis: Analysis
    links: list[LinkInfo]
    pixel: bool
    honeypot: bool

    @property
    def tracked_links(self) -> list[tuple[int, str]]:
        seen: dict[int, str] = {}
        for link in self.links:
            if link.tracked and link.position is not None:
                seen.setdefault(link.position, link.url)
        return sorted(seen.items())

    @property
    def changes(self) -> bool:
        return any(p.html and p.html.edits for p in self.analysis.parts)

    def render(
        self,
        click: Callable[[int, str], str],
        open_url: str | None,
        honeypot_url: str | None,
    ) -> bytes:
        """The message for one copy: each planned edit filled in with this copy's URLs."""
        data = self.analysis.data
        pixel = htmlrewrite.pixel_html(
            open_url if self.pixel else None, honeypot_url if self.honeypot else None
        )
        replacements = []
        for pp in self.analysis.parts:
            if pp.html is None or not pp.html.edits:
                continue
            replacements.append(
                (pp.part.body_start, pp.part.body_end, _render_part(pp, click, pixel, data))
            )
        out, cursor = [], 0
        for s, e, new in sorted(replacements):
            out += [data[cursor:s], new]
            cursor = e
        out.append(data[cursor:])
        return b"".join(out)


def _render_part(pp: PartPlan, click, pixel: str, data: bytes) -> bytes:
    view, plan = pp.view, pp.html
    assert plan is not None
    if view.byte_indexed:
        edits = []
        for e in plan.edits:
            if e.kind == "click":
                new = click(e.position, e.url)
            elif e.kind == "pixel":
                new = pixel
            else:
                new = ""
            edits.append((e.start, e.end, view.to_bytes(new)))
    else:
        edits = [(0, len(pp.decoded), view.to_bytes(plan.apply(view.text, click, pixel)))]
    original = data[pp.part.body_start : pp.part.body_end]
    if pp.encoding == "quoted-printable":
        return qp_apply(original, edits)
    decoded = pp.decoded
    pieces, c = [], 0
    for s, e, new in sorted(edits, key=lambda x: (x[0], x[1])):
        pieces += [decoded[c:s], new]
        c = e
    pieces.append(decoded[c:])
    new_body = b"".join(pieces)
    if pp.encoding == "base64":
        first = original.lstrip().split(b"\n", 1)[0].rstrip(b"\r")
        encoded = _b64_encode(new_body, len(first) or 76, _eol(original))
        if not original.endswith((b"\n",)):
            encoded = encoded.rstrip(b"\r\n")
        return encoded
    return _fold(new_body, _eol(original), decoded)


def plan(
    analysis: Analysis,
    ctx: LinkContext,
    *,
    track_opens: bool,
    track_clicks: bool,
) -> MessagePlan:
    """Decide every edit of every inline HTML part (the pixel goes into the last one)."""
    if analysis.signed:
        raise RewriteError("signed or encrypted message: rewriting would break the signature")
    ctx.unsubscribe_urls = ctx.unsubscribe_urls | analysis.unsubscribe
    links: list[LinkInfo] = []
    position = 1
    for i, pp in enumerate(analysis.parts):
        last = i == len(analysis.parts) - 1
        pp.html = htmlrewrite.plan_html(
            pp.view.text,
            ctx,
            track_clicks=track_clicks,
            add_pixel=last and (track_opens or track_clicks),
            meaning=pp.view.meaning,
            first_position=position,
        )
        links += pp.html.links
        if pp.html.tracked:
            position = pp.html.tracked[-1][0] + 1
    return MessagePlan(analysis, links, track_opens, track_clicks)
