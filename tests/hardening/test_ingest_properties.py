"""Property tests for the ingest's two parsers (SPEC "Bad input": nothing crashes, deep
nesting and 1 MB lines included): the forward parser (ingest/forwarded.py ``parse``,
``parse_bodies``, ``html_to_text``) and the streaming MIME parser (ingest/parse.py
``parse_bytes``). Random text, and real forwarded bodies / messages from
../shared/corpora mutated at random, never raise, return the declared types, and finish
in bounded time; then explicit hostile inputs, each timed.

The worker is one thread: an input that takes a minute stalls every mail behind it, so
"bounded time" is part of the contract (html_to_text once took 42 s on 10,000 nested
table cells, the separator scan 8 s on 5,000 separator lines)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import forwarded, parse
from tests.hardening.ingest_helpers import CORPORA

BOUND = 5.0  # seconds for one call; the inputs here take milliseconds to ~1 s when linear
FORWARDED = sorted((CORPORA / "forwarded" / "crisp").glob("*_body*.txt"))
SUBJECTS = sorted((CORPORA / "forwarded" / "crisp").glob("*_subject*.txt"))
EML = sorted(
    p for p in (CORPORA / "eml").rglob("*") if p.is_file() and p.suffix in (".eml", ".msg")
)
HTML = sorted((CORPORA / "html").rglob("*.html"))[:40]
LIMITS = {"content_cap": 2_000_000, "attachment_limit": 100_000}
PROPERTY = settings(
    deadline=None,
    max_examples=120,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < BOUND, f"{fn.__name__} took {elapsed:.1f} s"
    return result


def check_result(result) -> None:
    assert isinstance(result, forwarded.Result)
    assert isinstance(result.reason, str)
    fwd = result.forwarded
    if fwd is None:
        assert result.reason
        return
    assert isinstance(fwd, forwarded.Forwarded)
    assert isinstance(fwd.format, str) and fwd.format
    for value in (fwd.from_name, fwd.from_address, fwd.date, fwd.subject, fwd.reply_to):
        assert value is None or isinstance(value, str)
    assert isinstance(fwd.body, str) and isinstance(fwd.note, str)
    assert all(isinstance(a, str) for a in fwd.to + fwd.cc)
    assert isinstance(fwd.as_dict(), dict)


def check_mail(mail, tmp: Path) -> None:
    assert isinstance(mail, parse.ParsedMail)
    assert isinstance(mail.text, str) and isinstance(mail.html, str)
    assert "\x00" not in mail.text and "\x00" not in mail.html
    assert isinstance(mail.content_size, int) and mail.content_size >= 0
    for name in ("Subject", "From", "To", "Message-ID", "Date"):
        assert isinstance(mail.header(name), str)
    for att in mail.attachments:
        assert isinstance(att, parse.Attachment)
        assert isinstance(att.filename, str) and att.filename
        assert att.size >= 0
        if att.path is not None:
            assert att.path.stat().st_size == att.size
    mail.cleanup()
    assert list(tmp.iterdir()) == []  # nothing left behind by the parse


@st.composite
def mutated(draw, source: list[str]) -> str:
    """A corpus text cut, spliced, repeated, quoted, re-cased and salted with junk."""
    text = draw(st.sampled_from(source))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["cut", "insert", "repeat", "quote", "case", "drop_line"]))
        at = draw(st.integers(0, max(len(text), 1)))
        if op == "cut":
            text = text[:at] + text[at + draw(st.integers(1, 400)) :]
        elif op == "insert":
            junk = draw(
                st.sampled_from(
                    ["\x00", "\r", "From: ", "\n-----Original Message-----\n", ">", "<br>"]
                )
                | st.text(max_size=40)
            )
            text = text[:at] + junk + text[at:]
        elif op == "repeat":
            text = text[:at] + text[at : at + 200] * draw(st.integers(2, 50)) + text[at:]
        elif op == "quote":
            text = "\n".join("> " + line for line in text.split("\n"))
        elif op == "case":
            text = text.upper() if draw(st.booleans()) else text.lower()
        else:
            lines = text.split("\n")
            if lines:
                del lines[at % len(lines)]
            text = "\n".join(lines)
    return text


@st.composite
def mutated_bytes(draw, source: list[bytes]) -> bytes:
    data = draw(st.sampled_from(source))
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "drop_boundary", "dup"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            data = data[:at]
        elif op == "flip" and data:
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif op == "insert":
            junk = draw(
                st.sampled_from(
                    [b"\x00", b"\r\n--", b"\r\n\r\n", b'boundary="', b"=?x-bad?B?", b"\xff\xfe"]
                )
                | st.binary(max_size=40)
            )
            data = data[:at] + junk + data[at:]
        elif op == "drop_boundary":
            data = data.replace(b"boundary=", b"boundaryx=", 1)
        else:
            data = data[:at] + data[at : at + 300] * draw(st.integers(2, 30)) + data[at:]
    return data


FORWARD_TEXTS = [p.read_text("utf-8", "replace") for p in FORWARDED]
SUBJECT_TEXTS = [p.read_text("utf-8", "replace").strip() for p in SUBJECTS] + ["Fwd: x", "Re: x"]
EML_BYTES = [p.read_bytes() for p in EML]
HTML_TEXTS = [p.read_text("utf-8", "replace") for p in HTML]


def test_corpora_present():
    assert len(FORWARD_TEXTS) >= 150 and len(EML_BYTES) >= 150 and HTML_TEXTS


# --- the forward parser ---------------------------------------------------------------------


@PROPERTY
@given(text=st.text(), subject=st.text(max_size=80))
def test_forward_parse_random_text(text, subject):
    check_result(timed(forwarded.parse, text, subject))


@PROPERTY
@given(text=mutated(FORWARD_TEXTS), subject=st.sampled_from(SUBJECT_TEXTS) | st.text(max_size=40))
def test_forward_parse_mutated_corpus(text, subject):
    check_result(timed(forwarded.parse, text, subject))


@PROPERTY
@given(
    text=st.none() | mutated(FORWARD_TEXTS),
    html=st.none() | st.text() | mutated(FORWARD_TEXTS).map(lambda t: t.replace("\n", "<br>\n")),
    subject=st.sampled_from(SUBJECT_TEXTS),
)
def test_forward_parse_bodies_mutated(text, html, subject):
    check_result(timed(forwarded.parse_bodies, text, html, subject))


@PROPERTY
@given(html=st.text() | mutated(HTML_TEXTS))
def test_html_to_text_random_and_mutated(html):
    out = timed(forwarded.html_to_text, html)
    assert isinstance(out, str)
    assert "<script" not in out.lower() or "<script" in html.lower()


# --- the MIME parser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="mailtally-prop-") as d:
        yield Path(d)


@PROPERTY
@given(data=st.binary(max_size=4000))
def test_parse_bytes_random(scratch, data):
    tmp = scratch / "random"
    check_mail(timed(parse.parse_bytes, data, tmp, **LIMITS), tmp)


@PROPERTY
@given(data=mutated_bytes(EML_BYTES))
def test_parse_bytes_mutated_corpus(scratch, data):
    tmp = scratch / "mutated"
    check_mail(timed(parse.parse_bytes, data, tmp, **LIMITS), tmp)


# --- explicit hostile inputs ----------------------------------------------------------------

HOSTILE_TEXT = {
    "nul bytes": "From: a\x00@b.example\x00\nDate: x\x00\n\x00" * 1000,
    "1 MB line": "x" * 1_000_000,
    "1 MB header line": "From: " + "a " * 500_000,
    "many separators": "---------- Forwarded message ---------\n" * 20_000,
    "many header blocks": "\nFrom: a@b.example\nDate: x\n" * 20_000,
    "deep quoting": ">" * 200_000 + " From: a@b.example",
}
HOSTILE_HTML = {
    "10,000 nested divs": "<div>" * 10_000 + "x" + "</div>" * 10_000,
    "10,000 nested table cells": "<table><tr><td>" * 10_000,
    "10,000 nested blockquotes": "<blockquote>" * 10_000 + "From: a@b.example",
    "a million <": "<" * 1_000_000,
    "unclosed tags": "<a " * 300_000,
    "unclosed comments": "<!--" * 300_000,
    "NUL in tags": "<p\x00>\x00</p\x00>" * 50_000,
    "1 MB line": "<p>" + "y" * 1_000_000,
    "script case games": "<ScRiPt>x</sCrIpT>" * 50_000,
}


@pytest.mark.parametrize("name", HOSTILE_TEXT)
@pytest.mark.parametrize("subject", ["Fwd: x", "Re: x", ""])
def test_hostile_forward_bodies(name, subject):
    check_result(timed(forwarded.parse, HOSTILE_TEXT[name], subject))


@pytest.mark.parametrize("name", HOSTILE_HTML)
def test_hostile_html(name):
    html = HOSTILE_HTML[name]
    assert isinstance(timed(forwarded.html_to_text, html), str)
    check_result(timed(forwarded.parse_bodies, None, html, "Fwd: x"))


def _nested(depth: int) -> bytes:
    head = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + b"Content-Type: text/plain\r\n\r\ndeep inside" + tail


HOSTILE_MIME = {
    "nul bytes": b"From: a\x00@b\r\nSubject: \x00x\r\n\r\nbo\x00dy\x00",
    "1 MB line": b"Subject: x\r\n\r\n" + b"z" * 1_000_000 + b"\r\n",
    "1.5 MB header": b"Subject: " + b"h" * 1_500_000 + b"\r\n\r\nbody",
    "bad charsets": b'Content-Type: text/plain; charset="\xff\x00bogus"\r\n'
    b"Subject: =?x-unknown?B?////?= =?utf-8?Q?=FF=FE?=\r\n\r\n\xff\xfe\x00caf\xe9",
    "missing closing boundary": b'Content-Type: multipart/mixed; boundary="q"\r\n\r\n'
    b"--q\r\nContent-Type: text/plain\r\n\r\nhi\r\n--q\r\nContent-Type: text/html\r\n\r\n<p>x",
    "missing boundary parameter": b"Content-Type: multipart/mixed\r\n\r\n--q\r\nhi\r\n--q--\r\n",
    "10,000 nested multiparts": _nested(10_000),
    "bad base64 attachment": b'Content-Type: multipart/mixed; boundary="q"\r\n\r\n--q\r\n'
    b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + b"!!==**\r\n" * 1000
    + b"--q--\r\n",
    "200,000 headers": b"X-A: b\r\n" * 200_000 + b"\r\nbody",
}


@pytest.mark.parametrize("name", HOSTILE_MIME)
def test_hostile_mime(name, tmp_path):
    check_mail(timed(parse.parse_bytes, HOSTILE_MIME[name], tmp_path, **LIMITS), tmp_path)
