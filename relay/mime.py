"""Where each MIME part of a raw message is, in bytes, so that one part can be replaced.

The stdlib parser gives no offsets and re-serialising a parsed message changes bytes
(and costs 3–6 ms); this walks the boundary lines of the original instead. Attached
messages (``message/*``) are leaves: nothing inside them is ever changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message

MAX_DEPTH = 30
_BLANK = re.compile(rb"\r?\n\r?\n")


@dataclass
class Part:
    start: int  # first byte of the header block
    body_start: int
    body_end: int
    headers: Message
    content_type: str
    children: list[Part] = field(default_factory=list)

    def is_attachment(self) -> bool:
        disp = self.headers.get("Content-Disposition")
        if disp is not None:
            if str(disp).split(";")[0].strip().lower() == "attachment":
                return True
            if self.headers.get_param("filename", header="Content-Disposition"):
                return True
        # get_param parses every parameter: ask only when a name can be there at all.
        ctype = str(self.headers.get("Content-Type") or "")  # a Header when not ASCII
        return "name" in ctype.lower() and bool(self.headers.get_param("name"))

    @property
    def charset(self) -> str:
        value = self.headers.get_content_charset() or "us-ascii"
        return value.strip().strip('"').lower()

    @property
    def transfer_encoding(self) -> str:
        return str(self.headers.get("Content-Transfer-Encoding") or "7bit").strip().lower()

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()


def header_end(data: bytes, start: int = 0, end: int | None = None) -> int:
    """Offset of the body: after the first empty line (or ``end`` when there is none)."""
    end = len(data) if end is None else end
    if data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        return start + (2 if data.startswith(b"\r\n", start) else 1)
    m = _BLANK.search(data, start, end)
    return end if m is None else m.end()


_HEADER = re.compile(rb"(?m)^([\x21-\x39\x3b-\x7e]+):(.*(?:\n[ \t].*)*)")
# Where the stdlib stops reading headers: at the first line that is neither a header nor a
# continuation (the rest would be body).
_BLOCK = re.compile(rb"(?:(?:[\x21-\x39\x3b-\x7e]+:|From )[^\n]*(?:\n|$)|[ \t][^\n]*(?:\n|$))*")
_WANTED = (
    b"content-type",
    b"content-transfer-encoding",
    b"content-disposition",
    b"list-unsubscribe",
)


def parse_headers(head: bytes) -> Message:
    """The headers the rewriter reads, as the stdlib's compat32 parser gives them.

    ``BytesHeaderParser`` costs about 30 us per part, more than rewriting a small one;
    names and folded values are read the same way (``name: value``, continuation lines
    kept, bytes decoded as ASCII with surrogateescape).
    """
    msg = Message()
    lower = head.lower()
    if not any(w in lower for w in _WANTED):
        return msg
    for m in _HEADER.finditer(head, 0, _BLOCK.match(head).end()):
        if m.group(1).lower() in _WANTED:
            name = m.group(1).decode("ascii", "surrogateescape")
            value = m.group(2).lstrip(b" \t").rstrip(b"\r\n")
            msg._headers.append((name, value.decode("ascii", "surrogateescape")))
    return msg


def parse(
    data: bytes, start: int = 0, end: int | None = None, default: str = "text/plain", depth: int = 0
) -> Part:
    """The part tree of ``data[start:end]``."""
    end = len(data) if end is None else end
    body_start = header_end(data, start, end)
    headers = parse_headers(data[start:body_start])
    if headers.get("Content-Type") is None:
        headers.set_default_type(default)
    ctype = headers.get_content_type()
    part = Part(start, body_start, end, headers, ctype)
    if ctype.startswith("multipart/") and depth < MAX_DEPTH:
        boundary = headers.get_boundary()
        if boundary:
            child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            part.children = _split(data, body_start, end, boundary, child_default, depth)
    return part


_DELIM_TAIL = re.compile(rb"(--)?[ \t]*(\r?\n|$)", re.MULTILINE)


def _delimiter(data: bytes, boundary: bytes, pos: int, end: int) -> tuple[int, int, bool] | None:
    """(start, end, closing) of the next boundary line (``--boundary`` at a line start).

    ``bytes.find`` then a check of the line around it: a multiline regex search for the
    whole line would try every position of the body.
    """
    needle = b"--" + boundary
    while True:
        i = data.find(needle, pos, end)
        if i == -1:
            return None
        if i == 0 or data[i - 1] == 10:  # at a line start
            m = _DELIM_TAIL.match(data, i + len(needle), end)
            if m is not None:
                return i, m.end(), bool(m.group(1))
        pos = i + 1


def _split(
    data: bytes, start: int, end: int, boundary: str, default: str, depth: int
) -> list[Part]:
    try:
        b = boundary.encode("ascii")
    except UnicodeEncodeError:
        b = boundary.encode("utf-8", "surrogateescape")
    children = []
    pos = start
    part_start = None
    while True:
        m = _delimiter(data, b, pos, end)
        if m is None:
            if part_start is not None:
                children.append(parse(data, part_start, end, default, depth + 1))
            return children
        found, after, closing = m
        if part_start is not None:
            # The line break before the delimiter belongs to the delimiter.
            stop = found
            if data[stop - 2 : stop] == b"\r\n":
                stop -= 2
            elif data[stop - 1 : stop] == b"\n":
                stop -= 1
            children.append(parse(data, part_start, max(stop, part_start), default, depth + 1))
        if closing:
            return children
        part_start = after
        pos = after
        if pos >= end:
            return children
