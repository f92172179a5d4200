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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.entities import html5
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


def _bare_tag(text: str, i: int, n: int):
    """``_parse_tag`` without the attributes (``attrs`` left empty): the tag's end is found by
    the compiled grammar in one call instead of a Python loop over every attribute."""
    m = _BARE_TAG.match(text, i + 1, n)
    if m is None:
        return None
    if m.start(3) < 0:
        return _OPEN
    return Tag(m.group(2).lower(), i, m.end(), bool(m.group(1)))


def scan(
    text: str,
    start: int = 0,
    end: int | None = None,
    mso: bool = False,
    attrs: bool = True,
) -> Iterator[Tag | Comment]:
    """Tags and comments of ``text[start:end]`` in document order, with absolute positions.

    ``attrs=False``: tags come without their attributes (for callers that look only at names
    and positions: cheaper)."""
    parse_tag = _parse_tag if attrs else _bare_tag
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
                inner = inner_end if inner_end != -1 else stop
                yield from scan(text, cond.end(), inner, True, attrs)
            else:
                yield Comment(i, stop, False)
            i = stop
            continue
        if text.startswith(("<!", "<?"), i):  # doctype, CDATA, bogus comment
            close = text.find(">", i + 2, n)
            i = n if close == -1 else close + 1
            continue
        tag = parse_tag(text, i, n)
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
# A whole tag after its '<' (as _parse_tag reads it): 3 is the '>', unmatched when left open.
_BARE_TAG = re.compile(rf"(/?)([A-Za-z][^ \t\n\r\f/>]*+){_ATTRS}(?:(>)|\Z)")
_AFTER_NAME = r"(?=[ \t\n\r\f/>])"


_KELVIN = "\u212a"


def _ci(word: str) -> str:
    """``word`` matched case-insensitively as ``str.lower()`` compares tag names (the Kelvin
    sign lowers to 'k'), as ``[aA]`` classes: ``re`` skips a branch that starts with a class
    its character is not in without entering it, which it does not do for ``(?i:...)``."""
    return "".join(
        f"[{c}{c.upper()}{_KELVIN if c == 'k' else ''}]" if c.isalpha() else re.escape(c)
        for c in word.lower()
    )


def any_of(words: tuple[str, ...] | list[str], char: Callable[[str], str] = re.escape) -> str:
    """A regex for one of ``words``, common prefixes factored out (``char``: the pattern of
    one character): ``re`` enters a branch only when its first character matches, so a word
    is compared with the one branch of its first character, not with every word."""
    if "" in words:
        rest = [w for w in words if w]
        return f"(?:{any_of(rest, char)})?" if rest else ""
    by_first: dict[str, list[str]] = {}
    for w in words:
        by_first.setdefault(w[0], []).append(w[1:])
    branches = [char(c) + any_of(tails, char) for c, tails in by_first.items()]
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


# One alternative per raw-text element (after the '<'; no capture group: 3.11's re
# mis-tracks captures inside a possessive repeat), each running to its own end tag. The end
# tag is found with (?i:...) like _RAW_CLOSE in scan(), the start tag by str.lower() rules.
_RAW_ELEMENTS = "|".join(
    rf"{_ci(name)}{_AFTER_NAME}{_ATTRS}(?:>|\Z)(?:[^<]++|<(?!/(?i:{name})[ \t\n\r\f/>]))*+"
    for name in RAW_TEXT
)
# Text, then markup that is no token, then text, ...: one loop turn per tag (not one for the
# tag and one for the text after it), every alternative after one shared '<'.
_SKIP = rf"""[^<]*+(?:<(?:
    (?!{any_of(LINK_START + RAW_TEXT, _ci)}{_AFTER_NAME})[A-Za-z]{_TAG_REST}
  | /(?!{any_of(LINK_END, _ci)}{_AFTER_NAME})[A-Za-z]{_TAG_REST}
  | !--(?!(?i:\[if)[^\]]*+\]>)(?:>|(?:[^-]++|-(?!->))*+(?:-->|\Z))
  | (?:!(?!--)|\?)[^>]*+(?:>|\Z)
  | {_RAW_ELEMENTS}
  | (?![A-Za-z]|/[A-Za-z]|!|\?)
)[^<]*+)*+"""
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
LINK_ATTRS = ("href", "data-mailtally")  # the attributes scan_links reports

# One of LINK_ATTRS as a whole attribute name (ASCII case-insensitive, as str.lower() is for
# these letters), then one attribute of any other name.
_LINK_NAME = (
    r"(?:[hH][rR][eE][fF]|[dD][aA][tT][aA]-[mM][aA][iI][lL][tT][aA][lL][lL][yY])"
    r"(?![^ \t\n\r\f/>=])"
)
_OTHER_ATTR = rf"[ \t\n\r\f/]*+(?!{_LINK_NAME}){_NAME}(?:{_W}*+={_W}*+{_VALUE}|(?!{_W}*+=))"
# The next LINK_ATTRS attribute: the others before it are skipped inside the regex, so a tag's
# attributes cost one call per reported attribute (plus one), not one per attribute.
_LINK_ATTR = re.compile(
    rf"""(?:{_OTHER_ATTR})*+[ \t\n\r\f/]*+(?P<n>{_LINK_NAME})
    (?:{_W}*+={_W}*+(?:"(?P<dq>[^"]*+)"|'(?P<sq>[^']*+)'|(?!["'])(?P<uq>[^ \t\n\r\f>]*+))
      |(?!{_W}*+=))""",
    re.VERBOSE,
)


def _attrs(text: str, start: int, end: int) -> list[Attr]:
    """The ``LINK_ATTRS`` among the attributes in ``text[start:end]`` (others are skipped)."""
    out = []
    pos = start
    while True:
        # A reported attribute's name lowers to one of these words: without them in the rest
        # of the tag there is none, and a slice costs less than a regex call.
        rest = text[pos:end].lower()
        if "href" not in rest and "data-mailtally" not in rest:
            return out
        m = _LINK_ATTR.match(text, pos, end)
        if m is None:
            return out
        attr = Attr(m.group(1).lower(), m.start(1), m.end())
        group = m.lastindex
        if group != 1:
            attr.value_start, attr.value_end = m.span(group)
            attr.quote = '"' if group == 2 else "'" if group == 3 else ""
        out.append(attr)
        pos = m.end()


# Where an href can be at all: a tag without this word has no href, so its attributes need
# no parsing (most tags inside a conditional comment are Outlook's table markup).
_HREF_WORD = re.compile(r"[hH][rR][eE][fF]")


def _scan_mso(text: str, pos: int, n: int) -> Iterator[Tag]:
    """The start tags with an ``href`` in ``text[pos:n]``, the inside of a conditional comment."""
    word = _HREF_WORD.search(text, pos, n)
    if word is None:
        return
    word_at = word.start()
    match = _NEXT_MSO.match
    while pos < n:
        m = match(text, pos, n)
        if m.start("tok") < 0 or m.start("gt") < 0:
            return
        name_end, gt = m.end("name"), m.start("gt")
        name = m.group("name").lower()
        if name_end < gt:
            if word_at < name_end:
                word = _HREF_WORD.search(text, name_end, n)
                if word is None:
                    return
                word_at = word.start()
            if word_at < gt:
                tag = Tag(name, m.start("tok"), m.end(), False, True, _attrs(text, name_end, gt))
                if tag.attr("href") is not None:
                    yield tag
        pos = m.end()
        if name in _RAW_CLOSE:
            close = _RAW_CLOSE[name].search(text, pos, n)
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
    append = out.append
    while pos < n:
        m = match(text, pos)
        i, end = m.span(tok_g)
        if i < 0:
            break  # the rest is text, boring markup, or a tag left open
        gt = m.start(gt_g)
        if gt < 0:
            if m.start(cond_g) < 0:
                break  # open at the end of the text: a browser drops it and everything after
            cond = _CONDITIONAL.match(text, i)
            close = text.find("-->", i + 4)
            stop = n if close == -1 else close + 3
            inner_end = text.rfind("<![endif]", cond.end(), stop)
            append(Comment(i, stop, True))
            out.extend(_scan_mso(text, cond.end(), inner_end if inner_end != -1 else stop))
            pos = stop
            continue
        pos = end
        name_start, name_end = m.span(name_g)
        attrs = _attrs(text, name_end, gt) if name_end < gt else []
        is_end = m.start(slash_g) >= 0
        append(Tag(text[name_start:name_end].lower(), i, end, is_end, False, attrs))
    return out


# --- entities in attribute values -------------------------------------------------------------

_ENTITY = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[A-Za-z][A-Za-z0-9]*;?)")


def _ref(m: re.Match) -> str:
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
        return html5.get(ref, m.group(0))
    if ref in html5:  # legacy name without ';'
        nxt = m.string[m.end() : m.end() + 1]
        if nxt == "=" or nxt.isalnum():
            return m.group(0)
        return html5[ref]
    return m.group(0)


def unescape_attr(value: str) -> str:
    """Decode character references as a browser does *in an attribute value*.

    Unlike ``html.unescape``, a legacy entity without ';' followed by '=' or an
    alphanumeric is left alone, so ``?a=1&region=eu`` stays as written.
    """
    return _ENTITY.sub(_ref, value)
