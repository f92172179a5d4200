"""Quoted-printable for the rewriter: decode once, find the encoded lines of a decoded offset,
re-encode only the lines that hold an edit.

Most bodies are *clean* (every ``=`` starts an escape ``=XX`` or a soft break ``=`` + line
break; no bare CR): binascii decodes them in C, and the decoded length of any run of whole
lines is ``len - 2 * count("=") - count("=\\r\\n")``, so a decoded offset is mapped to its
encoded line with a few C-level counts instead of a Python loop over every line. Anything
else (a bare ``=``, ``= `` before a line break, lone CRs) takes the line-by-line reference
path, which reads such bytes the same way (a bare ``=`` stays ``=``).
"""

from __future__ import annotations

import binascii
import bisect
import re
from dataclasses import dataclass

MAX_QP_LINE = 76
_ODD = re.compile(rb"=(?![0-9A-Fa-f]{2}|\r?\n)")
_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_LONE_CR = re.compile(rb"\r(?!\n)")


def is_clean(body: bytes) -> bool:
    """Every '=' starts an escape or a soft break, and every CR is part of a CRLF."""
    if _ODD.search(body) is not None:
        return False
    cr = body.count(b"\r")
    return cr == 0 or cr == body.count(b"\r\n")


def _decode_segment(content: bytes) -> bytes:
    if b"=" not in content:
        return content
    return _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), content)


@dataclass
class Line:
    start: int  # encoded offsets
    end: int  # including the line break
    soft: bool
    decoded: bytes


def lines(body: bytes) -> list[Line]:
    """The reference reading, line by line (any line break; ``=`` + spaces + break is soft)."""
    out = []
    pos = 0
    for raw in body.splitlines(keepends=True):
        content = raw.rstrip(b"\r\n")
        eol = raw[len(content) :]
        stripped = content.rstrip(b" \t")
        if stripped.endswith(b"="):
            out.append(Line(pos, pos + len(raw), True, _decode_segment(stripped[:-1])))
        else:
            out.append(Line(pos, pos + len(raw), False, _decode_segment(content) + eol))
        pos += len(raw)
    return out


def decode(body: bytes, clean: bool | None = None) -> bytes:
    if is_clean(body) if clean is None else clean:
        return binascii.a2b_qp(body)
    return b"".join(line.decoded for line in lines(body))


def decode_checked(body: bytes) -> tuple[bytes, bool]:
    """``(decode(body), is_clean(body))`` with one pass of binascii and a count (no CR).

    With no CR, binascii turns each clean ``=`` (``=XX``, ``=\n``) into exactly the clean
    length rule's share, and each other ``=`` (bare, ``==``, ``= \n``, at the end) into
    more: the decoded length is the rule's iff the body is clean. With CRs the rule would
    need two- and three-byte counts (``\r\n``, ``=\r\n``: 0.8 ns a byte each, twice what
    the two searches of ``is_clean``'s definition cost), so those decide.
    """
    if b"\r" not in body:  # `in` is a memchr, count is not
        decoded = binascii.a2b_qp(body)
        if len(decoded) == len(body) - 2 * body.count(b"="):
            return decoded, True
    elif _LONE_CR.search(body) is None and _ODD.search(body) is None:  # CRLF, as over SMTP
        return binascii.a2b_qp(body), True
    return b"".join(line.decoded for line in lines(body)), False


class LineIndex:
    """``locate(p)``: the encoded line holding decoded offset ``p`` (offsets asked in order)."""

    def __init__(self, body: bytes, clean: bool | None = None) -> None:
        self.body = body
        self.clean = is_clean(body) if clean is None else clean
        self._cursor = (0, 0)
        # Else soft breaks are "=\n": 2 bytes, like "=XX" (no CR at all: no two-byte search).
        self._crlf_soft = b"\r" in body and b"=\r\n" in body
        if not self.clean:
            self._lines = lines(body) or [Line(0, 0, False, b"")]
            self._starts = []
            pos = 0
            for line in self._lines:
                self._starts.append(pos)
                pos += len(line.decoded)
            self._total = pos

    def locate(self, p: int) -> tuple[int, int, int, int, bool]:
        """(encoded start, encoded end, decoded start, decoded end, ends with a soft break)."""
        if not self.clean:
            i = (
                len(self._lines) - 1
                if p >= self._total
                else bisect.bisect_right(self._starts, p) - 1
            )
            line = self._lines[i]
            start = self._starts[i]
            return line.start, line.end, start, start + len(line.decoded), line.soft
        body = self.body
        n = len(body)
        if n == 0:
            return 0, 0, 0, 0, False
        # Called once or twice per edit: kept to a few C calls per line (a decoded length is
        # the encoded one less 2 per '=', and 1 more per '=\r\n' soft break).
        count, crlf = body.count, self._crlf_soft
        c, d = self._cursor
        while True:
            # Every encoded byte decodes to at most one: p lies at or after c + (p - d)
            # (n - 1: past the last line break there is no line to start).
            e = c + p - d if p > d else c
            if e > n - 1:
                e = n - 1
            line_start = body.rfind(b"\n", c, e) + 1
            if line_start > c:
                d += line_start - c - 2 * count(b"=", c, line_start)
                if crlf:
                    d -= count(b"=\r\n", c, line_start)
                c = line_start
            end = body.find(b"\n", c)
            end = n if end == -1 else end + 1
            d_end = d + end - c - 2 * count(b"=", c, end)
            if crlf:
                d_end -= count(b"=\r\n", c, end)
            if p < d_end or end >= n:
                self._cursor = (c, d)
                soft = body.endswith(b"=\n", c, end) or body.endswith(b"=\r\n", c, end)
                return c, end, d, d_end, soft
            c, d = end, d_end


def encode_line(data: bytes, eol: bytes) -> bytes:
    """One hard line (no line break in ``data``), soft-wrapped at 76 octets."""
    if b"\r" in data:  # binascii would copy a lone CR as it is
        return _encode_line_py(data, eol)
    out = binascii.b2a_qp(data, istext=True)
    return out.replace(b"=\n", b"=" + eol) if eol != b"\n" else out


def _encode_line_py(data: bytes, eol: bytes) -> bytes:
    toks = []
    last = len(data) - 1
    for i, c in enumerate(data):
        if (33 <= c <= 126 and c != 61) or (c in (9, 32) and i != last):
            toks.append(bytes([c]))
        else:
            toks.append(b"=%02X" % c)
    out, line = [], b""
    for t in toks:
        if len(line) + len(t) > MAX_QP_LINE - 1:
            out.append(line + b"=" + eol)
            line = b""
        line += t
    out.append(line)
    return b"".join(out)


def encode(seg: bytes, eol: bytes, soft_end: bool) -> bytes:
    """Decoded ``seg`` (whole lines) as QP lines; ``soft_end``: it continues on the next line."""
    # The usual groups (an edit's lines, re-encoded for every copy) hold one line break or
    # none: the same as the loop below, without its split and join.
    nl = seg.find(b"\n")
    if nl == -1:  # part of one long line, between two soft breaks
        if not seg:
            return b""
        return _soft_end(encode_line(seg, eol), eol) if soft_end else encode_line(seg, eol)
    if nl == len(seg) - 1:  # one whole hard line
        return encode_line(seg[:-1].rstrip(b"\r"), eol) + eol
    out = []
    pieces = seg.split(b"\n")
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        if i != last:
            out.append(encode_line(piece.rstrip(b"\r"), eol) + eol)
        elif piece:
            enc = encode_line(piece, eol)
            out.append(_soft_end(enc, eol) if soft_end else enc)
    return b"".join(out)


def _soft_end(enc: bytes, eol: bytes) -> bytes:
    """Encoded ``enc`` followed by a soft break (its text continues on the next line)."""
    tail = enc.rfind(b"\n") + 1
    if len(enc) - tail > MAX_QP_LINE - 1:  # no room for the '=': move a char down
        enc = enc[:-1] + b"=" + eol + enc[-1:]
    return enc + b"=" + eol
