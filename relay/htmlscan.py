"""A small HTML tokenizer that reports byte positions, for splicing into the original.

Why not a DOM: re-serialising through BeautifulSoup/lxml/selectolax changes bytes all over
a template (attribute order, entities, doctype, tbody) and html.parser mis-decodes
``&region=`` in an href. This scanner only finds tags, their attributes and where each
value starts and ends; comments and raw-text elements (script, style, ...) are skipped.
Outlook conditional comments (``<!--[if mso]>...<![endif]-->``) are scanned inside, and
the tags found there are flagged ``mso`` (they exist for Outlook only: VML buttons).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

RAW_TEXT = ("script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes")
_WS = " \t\n\r\f"
_NAME_END = re.compile(r"[\s/>]")
_ATTR_NAME_END = re.compile(r"[\s/>=]")
_UNQUOTED_END = re.compile(r"[\s>]")
_CONDITIONAL = re.compile(r"<!--\[if[^\]]*\]>", re.IGNORECASE)


@dataclass
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


@dataclass
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


@dataclass
class Comment:
    start: int
    end: int
    conditional: bool = False


def _parse_tag(text: str, i: int, n: int) -> Tag | None:
    """Parse the tag that starts at ``text[i] == '<'``; None when it is not one."""
    is_end = text.startswith("/", i + 1)
    j = i + (2 if is_end else 1)
    if j >= n or not text[j].isalpha():
        return None
    m = _NAME_END.search(text, j)
    k = m.start() if m else n
    tag = Tag(text[j:k].lower(), i, -1, is_end)
    while True:
        while k < n and (text[k] in _WS or text[k] == "/"):
            k += 1
        if k >= n:
            return None  # unterminated tag: nothing after it is markup
        if text[k] == ">":
            tag.end = k + 1
            return tag
        name_start = k
        m = _ATTR_NAME_END.search(text, k + 1)
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
                return None
            if text[p] in "\"'":
                q = text.find(text[p], p + 1)
                if q == -1:
                    return None
                attr.quote = text[p]
                attr.value_start, attr.value_end, attr.end = p + 1, q, q + 1
                k = q + 1
            else:
                m = _UNQUOTED_END.search(text, p)
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
            cond = _CONDITIONAL.match(text, i)
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
        if tag is None or tag.end > n:
            i += 1
            continue
        tag.mso = mso
        yield tag
        i = tag.end
        if not tag.is_end and tag.name in RAW_TEXT:
            close = re.compile(r"</" + tag.name + r"[\s/>]", re.IGNORECASE).search(text, i, n)
            i = n if close is None else close.start()


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
