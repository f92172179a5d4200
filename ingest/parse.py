"""Streaming MIME parsing: headers and bodies in memory, attachments straight to disk.

Parsing a whole 71 MB message with the stdlib (or mail-parser, which wraps it) peaks at
615 MB resident (PERFORMANCE-NOTES), so the body is walked line by line instead: the
entity headers of each part are parsed with the stdlib compat32 header parser (the most
tolerant one, and what mail-parser uses underneath), text/plain and text/html body parts
are decoded into memory up to the content limit, and every other leaf part is decoded
incrementally into a temporary file while its SHA-256 is computed. Memory stays bounded
by the largest line and the content limit, whatever the attachments weigh.

Malformed MIME is tolerated the way mail clients tolerate it: a missing closing boundary
ends the part at the end of the file, a lost inner boundary closes at an outer one, a
bad base64 alphabet is skipped, an unknown charset decodes as UTF-8 with replacement.
"""

from __future__ import annotations

import binascii
import codecs
import email.header
import email.policy
import email.utils
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import BinaryIO

from mailparser import utils as mailparser_utils

_HEADER_PARSER = BytesHeaderParser(policy=email.policy.compat32)
_MAX_HEADER_BYTES = 1 << 20
_MAX_LINE = 1 << 20
_MAX_DEPTH = 40
BODY_TYPES = ("text/plain", "text/html")


@dataclass
class Attachment:
    """An attachment streamed to a temporary file (None when dropped for its size)."""

    filename: str
    content_type: str
    size: int
    sha256: str
    path: Path | None
    dropped: str | None = None


@dataclass
class ParsedMail:
    """What the ingest needs from a message; bodies are decoded text."""

    headers: Message
    text: str = ""
    html: str = ""
    content_size: int = 0
    content_truncated: bool = False
    attachments: list[Attachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)

    def header(self, name: str) -> str:
        """A top-level header, RFC 2047 decoded, '' when absent or undecodable."""
        return decode_header_value(self.headers.get(name))

    def header_all(self, name: str) -> list[str]:
        return [decode_header_value(v) for v in self.headers.get_all(name) or []]

    def cleanup(self) -> None:
        """Delete the temporary attachment files (after they were stored, or for explain)."""
        for a in self.attachments:
            if a.path is not None:
                a.path.unlink(missing_ok=True)


def decode_header_value(value: object) -> str:
    """RFC 2047 words decoded; anything unreadable degrades to its raw text.

    mail-parser's decoder is used here because it is more tolerant than the stdlib's
    ``make_header``: an encoded word in an unknown charset spoils only itself.
    """
    if value is None:
        return ""
    try:
        raw = str(value)
    except Exception:  # a compat32 Header built from undecodable bytes
        return ""
    try:
        return mailparser_utils.decode_header_part(raw).replace("\x00", "")
    except Exception:
        try:
            return str(email.header.make_header(email.header.decode_header(raw)))
        except Exception:
            return raw


def decode_text(data: bytes, charset: str | None) -> str:
    """Bytes of a text part → str, tolerant of wrong or unknown charsets."""
    if charset:
        try:
            codecs.lookup(charset)
        except LookupError:
            charset = None
    if charset:
        try:
            return data.decode(charset)
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252" if charset is None else "utf-8", errors="replace")


# --- transfer decoding ----------------------------------------------------------------------


class _Base64:
    """Incremental base64: whitespace and foreign characters skipped, padding tolerated."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> bytes:
        self.buf += re.sub(rb"[^A-Za-z0-9+/=]", b"", data)
        cut = len(self.buf) // 4 * 4
        chunk, self.buf = self.buf[:cut], self.buf[cut:]
        return self._decode(chunk)

    def flush(self) -> bytes:
        rest, self.buf = self.buf, b""
        if not rest.strip(b"="):
            return b""
        return self._decode(rest + b"=" * (-len(rest) % 4))

    @staticmethod
    def _decode(chunk: bytes) -> bytes:
        if not chunk:
            return b""
        try:
            return binascii.a2b_base64(chunk)
        except binascii.Error:
            # Padding in the middle (concatenated encodings): decode quad by quad.
            out = bytearray()
            for i in range(0, len(chunk), 4):
                try:
                    out += binascii.a2b_base64(chunk[i : i + 4])
                except binascii.Error:
                    pass
            return bytes(out)


class _QuotedPrintable:
    def feed(self, data: bytes) -> bytes:
        return binascii.a2b_qp(data)

    def flush(self) -> bytes:
        return b""


class _Identity:
    def feed(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _decoder(cte: str):
    cte = (cte or "").strip().lower()
    if cte == "base64":
        return _Base64()
    if cte == "quoted-printable":
        return _QuotedPrintable()
    return _Identity()


# --- sinks ----------------------------------------------------------------------------------


class _TextSink:
    """Keeps a body part in memory up to ``cap`` bytes; counts every byte."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[bytes] = []
        self.kept = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.kept < self.cap:
            take = data[: self.cap - self.kept]
            self.parts.append(take)
            self.kept += len(take)

    def value(self) -> bytes:
        return b"".join(self.parts)


class _FileSink:
    """Streams an attachment to a temporary file, hashing it; stops writing past ``limit``."""

    def __init__(self, tmp_dir: Path, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.sha = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="att-")
        self.fh: BinaryIO | None = os.fdopen(fd, "wb")
        self.path: Path | None = Path(name)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.fh is None:
            return
        if self.size > self.limit:
            self._drop()
            return
        self.sha.update(data)
        self.fh.write(data)

    def _drop(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


# --- the walker -----------------------------------------------------------------------------


class _Lines:
    """Line reader with one line of push-back; lines longer than 1 MB come in pieces."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.back: bytes | None = None

    def next(self) -> bytes | None:
        if self.back is not None:
            line, self.back = self.back, None
            return line
        line = self.fh.readline(_MAX_LINE)
        return line or None

    def push(self, line: bytes) -> None:
        self.back = line


def _boundary_hit(line: bytes, boundaries: list[bytes]) -> bytes | None:
    """The boundary (as ``--b``) this line opens or closes, innermost first."""
    if not line.startswith(b"--"):
        return None
    stripped = line.rstrip()
    for b in reversed(boundaries):
        if stripped == b or stripped == b + b"--":
            return b
    return None


def _hget(headers: Message, name: str) -> str:
    """A header as str (compat32 returns Header objects for raw 8-bit values)."""
    value = headers.get(name)
    if value is None:
        return ""
    try:
        return str(value)
    except Exception:
        return ""


def _content_type(headers: Message) -> str:
    try:
        return headers.get_content_type()
    except Exception:
        return "application/octet-stream"


def _charset(headers: Message) -> str | None:
    try:
        return headers.get_content_charset()
    except Exception:
        return None


def _is_close(line: bytes) -> bool:
    return line.rstrip().endswith(b"--")


class _Walker:
    def __init__(self, tmp_dir: Path, content_cap: int, attachment_limit: int) -> None:
        self.tmp_dir = tmp_dir
        self.content_cap = content_cap
        self.attachment_limit = attachment_limit
        self.result: ParsedMail | None = None
        self.texts: list[tuple[str, _TextSink, str | None]] = []
        self.content_size = 0

    def entity(self, lines: _Lines, boundaries: list[bytes], depth: int) -> bytes | None:
        """Parse one entity; return the boundary line that ended it (None at end of file)."""
        header_lines: list[bytes] = []
        total = 0
        terminator = None
        while True:
            line = lines.next()
            if line is None:
                break
            if _boundary_hit(line, boundaries):
                terminator = line
                break
            if line in (b"\r\n", b"\n"):
                break
            if total > _MAX_HEADER_BYTES or (
                not header_lines and not re.match(rb"^[!-9;-~]+[ \t]*:", line)
            ):
                # No header block at all (or an absurd one): the rest is body.
                lines.push(line)
                break
            header_lines.append(line)
            total += len(line)
        headers = _HEADER_PARSER.parsebytes(b"".join(header_lines))
        if self.result is None:
            self.result = ParsedMail(headers=headers)
        if terminator is not None:
            return terminator
        ctype = _content_type(headers)
        try:
            boundary = headers.get_param("boundary") if ctype.startswith("multipart/") else None
        except Exception:
            boundary = None
        if isinstance(boundary, tuple):
            boundary = email.utils.collapse_rfc2231_value(boundary)
        if boundary and depth < _MAX_DEPTH:
            return self.multipart(
                lines, boundaries, ("--" + str(boundary)).encode("latin-1", "replace"), depth
            )
        return self.leaf(lines, boundaries, headers, ctype)

    def multipart(
        self, lines: _Lines, boundaries: list[bytes], own: bytes, depth: int
    ) -> bytes | None:
        inner = boundaries + [own]
        # Preamble.
        while True:
            line = lines.next()
            if line is None:
                self.result.defects.append("multipart without its boundary")
                return None
            hit = _boundary_hit(line, inner)
            if hit == own:
                if _is_close(line):
                    return self.epilogue(lines, boundaries)
                break
            if hit is not None:
                self.result.defects.append("multipart closed by an outer boundary")
                return line
        while True:
            term = self.entity(lines, inner, depth + 1)
            if term is None:
                self.result.defects.append("missing closing boundary")
                return None
            hit = _boundary_hit(term, inner)
            if hit == own:
                if _is_close(term):
                    return self.epilogue(lines, boundaries)
                continue
            return term  # an outer boundary: this multipart was not closed

    def epilogue(self, lines: _Lines, boundaries: list[bytes]) -> bytes | None:
        while True:
            line = lines.next()
            if line is None or _boundary_hit(line, boundaries):
                return line

    def leaf(
        self, lines: _Lines, boundaries: list[bytes], headers: Message, ctype: str
    ) -> bytes | None:
        disposition = _hget(headers, "Content-Disposition").split(";")[0].strip().lower()
        try:
            filename = headers.get_filename()
        except Exception:
            filename = None
        filename = decode_header_value(filename) if filename else ""
        is_body = ctype in BODY_TYPES and not filename and disposition != "attachment"
        decoder = _decoder(_hget(headers, "Content-Transfer-Encoding"))
        if ctype.startswith("multipart/"):
            decoder = _Identity()
        if is_body:
            sink: _TextSink | _FileSink = _TextSink(max(self.content_cap - self.content_size, 0))
        else:
            sink = _FileSink(self.tmp_dir, self.attachment_limit)
        previous: bytes | None = None
        terminator = None
        try:
            while True:
                line = lines.next()
                if line is None:
                    break
                if _boundary_hit(line, boundaries):
                    terminator = line
                    break
                if previous is not None:
                    sink.write(decoder.feed(previous))
                previous = line
            if previous is not None:
                if terminator is not None:
                    # The line break before a boundary belongs to the boundary.
                    previous = (
                        previous[:-2] if previous.endswith(b"\r\n") else previous.rstrip(b"\n")
                    )
                sink.write(decoder.feed(previous))
            sink.write(decoder.flush())
        finally:
            if isinstance(sink, _FileSink):
                sink.close()
        if isinstance(sink, _TextSink):
            self.content_size += sink.size
            self.texts.append((ctype, sink, _charset(headers)))
        else:
            dropped = None
            if sink.path is None:
                dropped = (
                    f"attachment larger than {self.attachment_limit} bytes ({sink.size} bytes)"
                )
            if not filename:
                ext = {"message/rfc822": ".eml", "text/calendar": ".ics"}.get(ctype, "")
                filename = f"part{len(self.result.attachments) + 1}{ext}"
            self.result.attachments.append(
                Attachment(
                    filename=filename,
                    content_type=ctype,
                    size=sink.size,
                    sha256=sink.sha.hexdigest() if sink.path else "",
                    path=sink.path,
                    dropped=dropped,
                )
            )
        return terminator


def parse_file(
    path: Path,
    offset: int,
    tmp_dir: Path,
    *,
    content_cap: int,
    attachment_limit: int,
) -> ParsedMail:
    """Parse the message stored in ``path`` from ``offset``; attachments go to ``tmp_dir``.

    ``content_cap``: body bytes kept in memory (the size is counted in full regardless);
    ``attachment_limit``: an attachment bigger than this is not kept (``dropped`` says why).
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    walker = _Walker(tmp_dir, content_cap + 1, attachment_limit)
    with path.open("rb") as fh:
        fh.seek(offset)
        lines = _Lines(fh)
        walker.entity(lines, [], 0)
        # Anything after a premature end (a stray closing boundary) is ignored.
    result = walker.result or ParsedMail(headers=_HEADER_PARSER.parsebytes(b""))
    plain = [decode_text(s.value(), cs) for t, s, cs in walker.texts if t == "text/plain"]
    html = [decode_text(s.value(), cs) for t, s, cs in walker.texts if t == "text/html"]
    result.text = "\n".join(plain).replace("\x00", "")
    result.html = "\n".join(html).replace("\x00", "")
    result.content_size = walker.content_size
    result.content_truncated = walker.content_size > content_cap
    return result


def parse_bytes(data: bytes, tmp_dir: Path, **limits: int) -> ParsedMail:
    """Parse a message held in memory (tests, explain) via a temporary file."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="msg-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return parse_file(Path(name), 0, tmp_dir, **limits)
    finally:
        os.unlink(name)
