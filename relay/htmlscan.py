"""A small HTML tokenizer that reports positions, for splicing into the original bytes.

Why not a DOM: re-serialising through BeautifulSoup/lxml/selectolax changes bytes all over
a template (attribute order, entities, doctype, tbody) and html.parser mis-decodes
``&region=`` in an href. This scanner only finds tags, their attributes and where each
value starts and ends; comments and raw-text elements (script, style, ...) are skipped.
Outlook conditional comments (``<!--[if mso]>...<![endif]-->``) are scanned inside, and
the tags found there are flagged ``mso`` (they exist for Outlook only: VML buttons).

Two scanners share one grammar (HTML whitespace, ASCII tag names, a tag left open at the end
of the text swallows the rest, as in a browser, so scanning is linear):

* ``scan`` yields every tag and comment; it walks the text in Python. ``has_visible_content``
  needs every token and uses it; it is also the reference ``scan_links`` is tested against;
* ``scan_links`` returns only the tokens the link and pixel rules look at, and skips
  everything else (text, other tags with their quoted values, comments, raw text) inside one
  compiled regex, so the Python loop runs once per link, not once per tag.
  ``tests/relay/test_rewrite_scan.py`` checks that both agree on random markup.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from string import ascii_letters

RAW_TEXT = ("script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes")
_WS = " \t\n\r\f"  # HTML whitespace (not Unicode \\s: 0xA0 is a UTF-8 continuation byte)
_NAME_END = re.compile(r"[ \t\n\r\f/>]")
_ATTR_NAME_END = re.compile(r"[ \t\n\r\f/>=]")
_UNQUOTED_END = re.compile(r"[ \t\n\r\f>]")
_CONDITIONAL = re.compile(r"<!--\[if[^\]]*\]>", re.IGNORECASE)
_OPEN = object()  # a tag still open at the end of the text


@dataclass(slots=True)
class Attr:
    """One attribute: lower-cased name, where it starts, and where its value is."""

    name: str
    start: int  # first character of the name
    end: int  # after the value (closing quote included)
    value_start: int = -1  # -1: no value
    value_end: int = -1
    quote: str = ""

    def value(self, text: str) -> str:
        return text[self.value_start : self.value_end] if self.value_start >= 0 else ""


@dataclass(slots=True)
class Tag:
    """A start or end tag."""

    name: str
    start: int
    end: int  # after '>'
    is_end: bool = False
    mso: bool = False  # inside an Outlook conditional comment
    attrs: list[Attr] = field(default_factory=list)

    def attr(self, name: str) -> Attr | None:
        for a in self.attrs:
            if a.name == name:
                return a
        return None


@dataclass(slots=True)
class Comment:
    start: int
    end: int
    conditional: bool = False


def _parse_tag(text: str, i: int, n: int):
    """Parse the tag at ``text[i] == '<'``: a Tag, None when it is not one (the '<' is text),
    or ``_OPEN`` when the tag is still open at ``n`` (a browser drops it and the rest)."""
    is_end = text.startswith("/", i + 1)
    j = i + (2 if is_end else 1)
    if j >= n or text[j] not in ascii_letters:
        return None
    m = _NAME_END.search(text, j, n)
    k = m.start() if m else n
    tag = Tag(text[j:k].lower(), i, -1, is_end)
    while True:
        while k < n and (text[k] in _WS or text[k] == "/"):
            k += 1
        if k >= n:
            return _OPEN
        if text[k] == ">":
            tag.end = k + 1
            return tag
        name_start = k
        m = _ATTR_NAME_END.search(text, k + 1, n)
        k = m.start() if m else n
        attr = Attr(text[name_start:k].lower(), name_start, k)
        p = k
        while p < n and text[p] in _WS:
            p += 1
        if p < n and text[p] == "=":
            p += 1
            while p < n and text[p] in _WS:
                p += 1
            if p >= n:
                return _OPEN
            if text[p] in "\"'":
                q = text.find(text[p], p + 1, n)
                if q == -1:
                    return _OPEN
                attr.quote = text[p]
                attr.value_start, attr.value_end, attr.end = p + 1, q, q + 1
                k = q + 1
            else:
                m = _UNQUOTED_END.search(text, p, n)
                q = m.start() if m else n
                attr.value_start, attr.value_end, attr.end = p, q, q
                k = q
        tag.attrs.append(attr)


def scan(
    text: str, start: int = 0, end: int | None = None, mso: bool = False
) -> Iterator[Tag | Comment]:
    """Tags and comments of ``text[start:end]`` in document order, with absolute positions."""
    n = len(text) if end is None else end
    i = start
    while True:
        i = text.find("<", i, n)
        if i == -1:
            return
        if text.startswith("<!--", i):
            close = text.find("-->", i + 4, n) if not text.startswith("<!-->", i) else i + 2
            stop = n if close == -1 else close + 3
            cond = _CONDITIONAL.match(text, i, n)
            if cond and not mso:
                inner_end = text.rfind("<![endif]", cond.end(), stop)
                yield Comment(i, stop, True)
                yield from scan(text, cond.end(), inner_end if inner_end != -1 else stop, True)
            else:
                yield Comment(i, stop, False)
            i = stop
            continue
        if text.startswith(("<!", "<?"), i):  # doctype, CDATA, bogus comment
            close = text.find(">", i + 2, n)
            i = n if close == -1 else close + 1
            continue
        tag = _parse_tag(text, i, n)
        if tag is _OPEN:
            return
        if tag is None:
            i += 1
            continue
        tag.mso = mso
        yield tag
        i = tag.end
        if not tag.is_end and tag.name in RAW_TEXT:
            close = _RAW_CLOSE[tag.name].search(text, i, n)
            i = n if close is None else close.start()


# --- the fast scanner: only what the link and pixel rules need ---------------------------------

LINK_START = ("a", "area", "blockquote")  # start tags scan_links reports
LINK_END = ("a", "body", "html", "blockquote")  # end tags scan_links reports

_W = r"[ \t\n\r\f]"
_NAME = r"[^ \t\n\r\f/>][^ \t\n\r\f/>=]*+"
# A quoted value left open runs to the end of the text, so no alternative can fail here.
_VALUE = r"""(?:"[^"]*+(?:"|\Z)|'[^']*+(?:'|\Z)|[^ \t\n\r\f>]*+)"""
_ATTRS = rf"(?:[ \t\n\r\f/]*+{_NAME}(?:{_W}*+={_W}*+{_VALUE}|(?!{_W}*+=)))*+[ \t\n\r\f/]*+"
_TAG_REST = rf"[^ \t\n\r\f/>]*+{_ATTRS}(?:>|\Z)"  # after the first letter of the name
_RAW = "|".join(RAW_TEXT)
_AFTER_NAME = r"(?=[ \t\n\r\f/>])"
# One alternative per raw-text element (no capture group: 3.11's re mis-tracks captures
# inside a possessive repeat), each running to its own end tag.
_RAW_ELEMENTS = "|".join(
    rf"<(?i:{name}){_AFTER_NAME}{_ATTRS}(?:>|\Z)(?:[^<]++|<(?!/(?i:{name})[ \t\n\r\f/>]))*+"
    for name in RAW_TEXT
)
_SKIP = rf"""(?:
    [^<]++
  | <(?!(?i:{"|".join(LINK_START)}|{_RAW}){_AFTER_NAME})[A-Za-z]{_TAG_REST}
  | </(?!(?i:{"|".join(LINK_END)}){_AFTER_NAME})[A-Za-z]{_TAG_REST}
  | <!--(?!(?i:\[if)[^\]]*+\]>)(?:>|(?:[^-]++|-(?!->))*+(?:-->|\Z))
  | <(?:!(?!--)|\?)[^>]*+(?:>|\Z)
  | {_RAW_ELEMENTS}
  | <(?![A-Za-z]|/[A-Za-z]|!|\?)
)*+"""
_TOKEN = rf"""(?P<tok>
    (?P<cond><!--)
  | <(?P<slash>/)?(?P<name>[A-Za-z][^ \t\n\r\f/>]*+){_ATTRS}(?:(?P<gt>>)|\Z)
)?"""
_NEXT = re.compile(_SKIP + _TOKEN, re.VERBOSE)
_GROUPS = tuple(_NEXT.groupindex[g] for g in ("tok", "cond", "slash", "name", "gt"))
# Inside a conditional comment: every start tag is a token (VML and its <a> twin), raw text
# is skipped by the loop, conditional comments do not nest.
_SKIP_MSO = rf"""(?:
    [^<]++
  | </[A-Za-z]{_TAG_REST}
  | <!--(?:>|(?:[^-]++|-(?!->))*+(?:-->|\Z))
  | <(?:!(?!--)|\?)[^>]*+(?:>|\Z)
  | <(?![A-Za-z]|/[A-Za-z]|!|\?)
)*+"""
_NEXT_MSO = re.compile(
    _SKIP_MSO + rf"(?P<tok><(?P<name>[A-Za-z][^ \t\n\r\f/>]*+){_ATTRS}(?:(?P<gt>>)|\Z))?",
    re.VERBOSE,
)
_RAW_CLOSE = {name: re.compile(r"</" + name + r"[ \t\n\r\f/>]", re.IGNORECASE) for name in RAW_TEXT}
_ATTR = re.compile(
    rf"""[ \t\n\r\f/]*+(?P<n>{_NAME})
    (?:{_W}*+={_W}*+(?:"(?P<dq>[^"]*+)"|'(?P<sq>[^']*+)'|(?!["'])(?P<uq>[^ \t\n\r\f>]*+))
      |(?!{_W}*+=))""",
    re.VERBOSE,
)


LINK_ATTRS = ("href", "data-mailtally")  # the attributes scan_links reports


def _attrs(text: str, start: int, end: int) -> list[Attr]:
    """The ``LINK_ATTRS`` among the attributes in ``text[start:end]`` (others are skipped)."""
    out = []
    for m in _ATTR.finditer(text, start, end):
        name = m.group(1)
        if name[0] not in "hHdD":  # cheap test first: most attributes are style, class, ...
            continue
        name = name.lower()
        if name not in LINK_ATTRS:
            continue
        attr = Attr(name, m.start(1), m.end())
        group = m.lastindex
        if group != 1:
            attr.value_start, attr.value_end = m.span(group)
            attr.quote = '"' if group == 2 else "'" if group == 3 else ""
        out.append(attr)
    return out


def _scan_mso(text: str, pos: int, n: int) -> Iterator[Tag]:
    """The start tags with an ``href`` in ``text[pos:n]``, the inside of a conditional comment."""
    match = _NEXT_MSO.match
    while pos < n:
        m = match(text, pos, n)
        if m.start("tok") < 0 or m.start("gt") < 0:
            return
        tag = Tag(m.group("name").lower(), m.start("tok"), m.end(), False, True)
        if m.end("name") < m.start("gt"):
            tag.attrs = _attrs(text, m.end("name"), m.start("gt"))
            if tag.attr("href") is not None:
                yield tag
        pos = m.end()
        if tag.name in _RAW_CLOSE:
            close = _RAW_CLOSE[tag.name].search(text, pos, n)
            pos = n if close is None else close.start()


def scan_links(text: str) -> list[Tag | Comment]:
    """The tokens of ``text`` that the link rules use, in document order: start tags ``a``,
    ``area``, ``blockquote``; end tags ``a``, ``body``, ``html``, ``blockquote``; each
    Outlook conditional comment followed by the start tags with an ``href`` inside it
    (``mso``: VML buttons and their twins). Only ``LINK_ATTRS`` are parsed into ``attrs``."""
    out: list[Tag | Comment] = []
    n = len(text)
    pos = 0
    match = _NEXT.match
    tok_g, cond_g, slash_g, name_g, gt_g = _GROUPS
    while pos < n:
        m = match(text, pos)
        i = m.start(tok_g)
        if i < 0:
            break  # the rest is text, boring markup, or a tag left open
        if m.start(cond_g) >= 0:
            cond = _CONDITIONAL.match(text, i)
            close = text.find("-->", i + 4)
            stop = n if close == -1 else close + 3
            inner_end = text.rfind("<![endif]", cond.end(), stop)
            out.append(Comment(i, stop, True))
            out.extend(_scan_mso(text, cond.end(), inner_end if inner_end != -1 else stop))
            pos = stop
            continue
        gt = m.start(gt_g)
        if gt < 0:
            break  # open at the end of the text: a browser drops it and everything after
        pos = m.end()
        name_start, name_end = m.span(name_g)
        tag = Tag(text[name_start:name_end].lower(), i, pos, m.start(slash_g) >= 0)
        if name_end < gt:
            tag.attrs = _attrs(text, name_end, gt)
        out.append(tag)
    return out


# --- entities in attribute values -------------------------------------------------------------

_ENTITY = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[A-Za-z][A-Za-z0-9]*;?)")


def _entities() -> dict[str, str]:
    from html.entities import html5

    return html5


def unescape_attr(value: str) -> str:
    """Decode character references as a browser does *in an attribute value*.

    Unlike ``html.unescape``, a legacy entity without ';' followed by '=' or an
    alphanumeric is left alone, so ``?a=1&region=eu`` stays as written.
    """
    table = _entities()

    def repl(m: re.Match) -> str:
        ref = m.group(1)
        if ref.startswith("#"):
            digits = ref[1:].rstrip(";")
            try:
                code = int(digits[1:], 16) if digits[:1] in "xX" else int(digits)
            except ValueError:
                return m.group(0)
            if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                return "\ufffd"
            return chr(code)
        if ref.endswith(";"):
            return table.get(ref, m.group(0))
        if ref in table:  # legacy name without ';'
            nxt = m.string[m.end() : m.end() + 1]
            if nxt == "=" or nxt.isalnum():
                return m.group(0)
            return table[ref]
        return m.group(0)

    return _ENTITY.sub(repl, value)
