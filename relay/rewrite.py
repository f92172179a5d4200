"""The relay's rewriter: open pixel and tracked links, as byte-preserving edits of a message.

Only inline ``text/html`` parts change, and in them only the planned href values, a
removed ``data-mailtally`` marker and the inserted pixel block. Each part is decoded from
its own transfer encoding and charset, edited, and re-encoded the same way:

* 7bit/8bit/binary: the edits are spliced into the original bytes; a line pushed over 998
  octets is folded at the whitespace before an attribute (insignificant inside a tag);
* quoted-printable: only the encoded lines that hold an edit are re-encoded (a soft line
  break inside an href is handled because edits are made on the decoded bytes; see
  ``relay.qp``);
* base64: the part is re-encoded with its original line length (a body whose base64 does
  not re-encode to the same text is not touched: decoding it would lose part of it).

A message is planned once and rendered once per recipient copy: the first render cuts each
changed part into a template (untouched encoded bytes, and the decoded text of the lines
around each edit), so every copy only fills in its own URLs and encodes the edited lines.

ASCII-compatible charsets (UTF-8, ISO-8859-x, windows-125x, Shift_JIS, ...) are scanned one
byte per character, so every untouched byte stays as it was even when the text is not
valid in its declared charset; stateful ones (ISO-2022-JP, UTF-16, ...) are decoded, and
rewritten only when they round-trip exactly.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from relay import htmlrewrite, mime, qp
from relay.htmlrewrite import HtmlPlan, LinkInfo
from relay.links import LinkContext, list_unsubscribe_urls

MAX_LINE = 998
CONTROL_HEADERS = ("x-mailtally-track", "x-mailtally-log")
# Removed from every copy as well: a Bcc header would show hidden recipients to the others.
REMOVED_HEADERS = (*CONTROL_HEADERS, "bcc")
_STATEFUL = ("iso2022", "iso-2022", "utf_16", "utf-16", "utf_32", "utf-32", "utf_7", "utf-7", "hz")
_NOT_B64 = bytes(
    c for c in range(256) if chr(c) not in string.ascii_letters + string.digits + "+/="
)
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


_ASCII = bytes(range(128))
# Charsets in which every ASCII byte is that character, whatever surrounds it (no escapes,
# no shift states): the codec is also asked, once, to be sure.
_ASCII_SAFE = ("utf-8", "utf-8-sig", "ascii", "iso8859-", "cp125", "koi8-")


@functools.lru_cache(maxsize=64)
def _keeps_ascii(name: str) -> bool:
    if not (name in _ASCII_SAFE or name.startswith(_ASCII_SAFE)):
        return False
    try:
        return _ASCII.decode(name, "replace") == _ASCII.decode("ascii")
    except Exception:  # noqa: BLE001 - any failure: take the codec round trip every time
        return False


def text_view(body: bytes, charset: str) -> TextView:
    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        name = "latin-1"  # unknown charset: markup is ASCII, URLs are kept as bytes
    if any(s in name for s in _STATEFUL):
        try:
            text = body.decode(name)
        except UnicodeDecodeError as exc:
            raise RewriteError(f"HTML part is not valid {charset}: {exc.reason}") from None
        if text.encode(name) != body:
            raise RewriteError(f"HTML part in {charset} does not re-encode to the same bytes")
        return TextView(text, lambda s: s, lambda s: s.encode(name), False)

    if _keeps_ascii(name):

        def meaning(s: str) -> str:
            # ASCII text means itself here: most hrefs and markers skip the codec round trip.
            return s if s.isascii() else s.encode("latin-1").decode(name, "replace")

    else:

        def meaning(s: str) -> str:
            return s.encode("latin-1").decode(name, "replace")

    return TextView(body.decode("latin-1"), meaning, lambda s: s.encode("latin-1"), True)


# --- transfer encodings -----------------------------------------------------------------------


def _eol(body: bytes) -> bytes:
    """The part's line break (CRLF, as in SMTP, when it has none yet)."""
    # ``b"\r" in`` first: a two-byte search over a body with no CR costs 1 ns a byte.
    if b"\r" in body and b"\r\n" in body:
        return b"\r\n"
    return b"\n" if b"\n" in body else b"\r\n"


def _b64_encode(data: bytes, line_len: int, eol: bytes) -> bytes:
    line_len = max(4, line_len - line_len % 4)
    if line_len == 76:  # the usual case, all in C
        text = base64.encodebytes(data)
        return text.replace(b"\n", eol) if eol != b"\n" else text
    text = base64.b64encode(data)
    return b"".join(text[i : i + line_len] + eol for i in range(0, len(text), line_len))


def _fold_line(line: bytes, eol: bytes, limit: Callable[[], int]) -> bytes:
    """Break one line over 998 octets at whitespace before an attribute (inside a tag).

    A line that cannot be folded is an error only when it is longer than the longest line
    the part already had (``limit()``: an over-long original line is delivered as it came).
    """
    out = []
    cr = eol.rstrip(b"\n")
    start, n = 0, len(line.rstrip(b"\r"))
    while n - start > MAX_LINE:
        cuts = [m.start() + 1 for m in _FOLD_AT.finditer(line, start, start + MAX_LINE)]
        if not cuts:
            if n - start > limit():
                raise RewriteError("a rewritten line would exceed 998 octets")
            break
        out.append(line[start : cuts[-1]] + cr)
        start = cuts[-1]
    out.append(line[start:])
    return b"\n".join(out)


def _longest(original: bytes) -> int:
    return max(MAX_LINE, *(len(x.rstrip(b"\r")) for x in original.split(b"\n")))


# --- per-part templates: everything that is the same in every copy, computed once -----------


@dataclass(slots=True)
class _Group:
    """A run of whole lines that holds edits: re-made for each copy."""

    before: bytes  # the untouched encoded bytes since the previous group
    pieces: list[bytes]  # decoded bytes around the edits: len(values) + 1 pieces
    first: int  # index of its first edit
    soft: bool = False  # QP: its last line ends with a soft break


@dataclass
class _PartTemplate:
    encoding: str
    eol: bytes
    groups: list[_Group]
    tail: bytes
    original: bytes  # the encoded body
    edits: list[htmlrewrite.Edit]  # in text order: ``render_into``'s values follow it
    line_len: int = 76  # base64
    _limit: int | None = None

    def limit(self) -> int:
        if self._limit is None:
            self._limit = _longest(self.original)
        return self._limit

    def render_into(self, values: list[bytes], out: list[bytes]) -> None:
        """The encoded body with ``values[i]`` in place of the i-th edit (in text order), as
        pieces appended to ``out``: the message is joined once, not once for the part and
        again for the message (a copy of a 600 KB body each)."""
        if self.encoding == "base64":
            g = self.groups[0]
            decoded = _interleave(g.pieces, values, 0)
            encoded = _b64_encode(decoded, self.line_len, self.eol)
            if not self.original.endswith(b"\n"):
                encoded = encoded.rstrip(b"\r\n")
            out.append(encoded)
            return
        for g in self.groups:
            out.append(g.before)
            seg = _interleave(g.pieces, values, g.first)
            if self.encoding == "quoted-printable":
                out.append(qp.encode(seg, self.eol, g.soft))
            elif len(seg) > MAX_LINE + 1 and any(
                len(line) > MAX_LINE + 1 for line in seg.split(b"\n")
            ):
                out.append(
                    b"\n".join(_fold_line(x, self.eol, self.limit) for x in seg.split(b"\n"))
                )
            else:
                out.append(seg)
        out.append(self.tail)


def _interleave(pieces: list[bytes], values: list[bytes], first: int) -> bytes:
    if len(pieces) == 2:  # one edit in the group: the usual case
        return pieces[0] + values[first] + pieces[1]
    out = [pieces[0]]
    for i, piece in enumerate(pieces[1:]):
        out.append(values[first + i])
        out.append(piece)
    return b"".join(out)


def _line_groups(
    spans: list[tuple[int, int]], locate, n: int
) -> list[tuple[int, int, int, int, bool, int, int]]:
    """Merge the lines of sorted decoded spans: (enc start, enc end, dec start, dec end, soft,
    first span, last span + 1) per run of lines. ``n``: the encoded length."""
    groups: list[list] = []
    for i, (s, e) in enumerate(spans):
        g = groups[-1] if groups else None
        if g is None or s >= g[3]:
            a = locate(s)
            if g is not None and a[0] < g[1]:  # the same line (an insertion at the very end)
                g[6] = i + 1
            else:
                g = [a[0], a[1], a[2], a[3], a[4], i, i + 1]
                groups.append(g)
        else:
            g[6] = i + 1
        last = max(e - 1, s)
        if last >= g[3] and g[1] < n:  # the span runs on into later lines
            b = locate(last)
            g[1], g[3], g[4] = b[1], b[3], b[4]
    return [tuple(g) for g in groups]


def _template(pp: PartPlan, original: bytes) -> _PartTemplate:
    assert pp.html is not None
    edits = sorted(pp.html.edits, key=lambda e: (e.start, e.end))
    spans = [(e.start, e.end) for e in edits]
    eol = _eol(original)
    decoded = pp.decoded
    if pp.encoding == "base64":
        first = original.lstrip().split(b"\n", 1)[0].rstrip(b"\r")
        pieces = _cut(decoded, spans, 0, len(decoded))
        return _PartTemplate(
            "base64", eol, [_Group(b"", pieces, 0)], b"", original, edits, len(first) or 76
        )
    if pp.encoding == "quoted-printable":
        locate = qp.LineIndex(original, pp.qp_clean).locate
    else:

        def locate(p: int) -> tuple[int, int, int, int, bool]:
            start = decoded.rfind(b"\n", 0, p) + 1
            end = decoded.find(b"\n", p)
            end = len(decoded) if end == -1 else end + 1
            return start, end, start, end, False

    groups, cursor = [], 0
    for es, ee, ds, de, soft, i, j in _line_groups(spans, locate, len(original)):
        pieces = _cut(decoded, spans[i:j], ds, de)
        groups.append(_Group(original[cursor:es], pieces, i, soft))
        cursor = ee
    return _PartTemplate(pp.encoding, eol, groups, original[cursor:], original, edits)


def _cut(decoded: bytes, spans: list[tuple[int, int]], start: int, end: int) -> list[bytes]:
    pieces, c = [], start
    for s, e in spans:
        pieces.append(decoded[c:s])
        c = e
    pieces.append(decoded[c:end])
    return pieces


# --- planning ---------------------------------------------------------------------------------


@dataclass
class PartPlan:
    part: mime.Part
    view: TextView
    encoding: str
    decoded: bytes
    html: HtmlPlan | None = None
    qp_clean: bool | None = None  # quoted-printable: the fast path applies (see relay.qp)
    encoded: bytes | None = None  # the part's body as sent (sliced once: it can be 600 KB)

    def body(self, data: bytes) -> bytes:
        if self.encoded is None:
            self.encoded = data[self.part.body_start : self.part.body_end]
        return self.encoded


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


def _decode_body(part: mime.Part, body: bytes) -> tuple[str, bytes, bool | None]:
    enc = part.transfer_encoding
    if enc == "base64":
        text = body.translate(None, _NOT_B64)
        core = text.rstrip(b"=")
        if len(core) % 4 in (2, 3):  # unpadded, as some senders write it: read as clients do
            text = core + b"=" * (-len(core) % 4)
        try:
            decoded = binascii.a2b_base64(text, strict_mode=False)
        except binascii.Error as exc:
            raise RewriteError(f"bad base64 in the HTML part: {exc}") from None
        if base64.b64encode(decoded) != text:
            # Padding in the middle, stray characters: what is decoded is not all there is.
            raise RewriteError("the base64 of the HTML part does not re-encode to the same text")
        return enc, decoded, None
    if enc == "quoted-printable":
        decoded, clean = qp.decode_checked(body)
        return enc, decoded, clean
    return "identity", body, None


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
            body = data[part.body_start : part.body_end]
            enc, decoded, clean = _decode_body(part, body)
            view = text_view(decoded, part.charset)
            a.parts.append(PartPlan(part, view, enc, decoded, qp_clean=clean, encoded=body))
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
    _static: list | None = None
    _targets: list[tuple[int, str]] | None = None

    @property
    def click_targets(self) -> list[tuple[int, str]]:
        """The distinct (position, URL) the click edits ask ``render``'s ``click`` for: a
        renderer mints their tokens for a copy at once (their payloads share a prefix)."""
        if self._targets is None:
            found = {
                (e.position, e.url): None
                for pp in self.analysis.parts
                if pp.html is not None
                for e in pp.html.edits
                if e.kind == "click"
            }
            self._targets = list(found)
        return self._targets

    @property
    def tracked_links(self) -> list[tuple[int, str]]:
        """(position, original URL) of each tracked link (VML twins share a position)."""
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
        """The message for one copy: each planned edit filled in with this copy's URLs.

        What is the same in every copy (untouched bytes, the decoded text around each edit)
        is worked out once, on the first call; each copy then encodes only the lines that
        hold an edit (QP, 7bit/8bit) or the part (base64).
        """
        data = self.analysis.data
        pixel = htmlrewrite.pixel_html(
            open_url if self.pixel else None, honeypot_url if self.honeypot else None
        )
        if self._static is None:
            self._static = self._prepare()
        out = []
        for static, pp, template in self._static:
            out.append(static)
            if pp is None:
                continue
            _render_part(pp, template, click, pixel, data, out)
        return b"".join(out)

    def _prepare(self) -> list[tuple[bytes, PartPlan | None, _PartTemplate | None]]:
        data = self.analysis.data
        changed = sorted(
            (pp for pp in self.analysis.parts if pp.html is not None and pp.html.edits),
            key=lambda pp: pp.part.body_start,
        )
        out, cursor = [], 0
        for pp in changed:
            template = _template(pp, pp.body(data)) if pp.view.byte_indexed else None
            out.append((data[cursor : pp.part.body_start], pp, template))
            cursor = pp.part.body_end
        out.append((data[cursor:], None, None))
        return out


def _render_part(
    pp: PartPlan, template: _PartTemplate | None, click, pixel: str, data, out: list[bytes]
) -> None:
    """Append the part's encoded body for this copy to ``out``."""
    plan = pp.html
    assert plan is not None
    view = pp.view
    if template is not None:
        values = []
        pixel_bytes = None
        for e in template.edits:  # sorted once, when the template was made
            if e.kind == "click":
                values.append(view.to_bytes(click(e.position, e.url)))
            elif e.kind == "pixel":
                if pixel_bytes is None:
                    pixel_bytes = view.to_bytes(pixel)
                values.append(pixel_bytes)
            else:
                values.append(b"")
        template.render_into(values, out)
        return
    # A stateful charset: the whole text is rewritten and encoded again.
    new_body = view.to_bytes(plan.apply(view.text, click, pixel))
    whole = PartPlan(pp.part, pp.view, pp.encoding, pp.decoded, HtmlPlan(), pp.qp_clean)
    whole.html.edits.append(htmlrewrite.Edit(0, len(pp.decoded), "pixel"))
    _template(whole, pp.body(data)).render_into([new_body], out)


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
        tracked = [p.position for p in pp.html.links if p.tracked and p.position is not None]
        if tracked:
            position = max(tracked) + 1
    return MessagePlan(analysis, links, track_opens, track_clicks)
