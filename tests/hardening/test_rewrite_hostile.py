"""Hostile input against the relay's HTML rewriter (SPEC "Bad input", relay 7 and 8).

Whatever the markup or MIME, the rewriter either rewrites (and then the output is the input
plus only the allowed edits: take out the pixel block, put each original href back where a
tracker URL stands, and the original bytes come back; every tracker URL verifies and carries
the URL the original href means) or fails open with ``RewriteError`` (the relay then delivers
the original untouched and records the reason). Any other exception is a bug.

Property tests feed generated markup (random tags, attributes, quotes, comments, entities,
conditional comments) and mutated corpus templates (byte flips, truncation, inserted
garbage); explicit cases cover NUL bytes, a 1 MB line, 10,000 nested tags, 5,000 links,
bad charsets, broken MIME boundaries and broken QP/base64, and the cheap ones also go
through the real relay over SMTP.
"""

from __future__ import annotations

import asyncio
import base64
import email
import quopri
import re
import time
from email import policy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cli
import store
from relay import htmlrewrite, qp, rewrite
from relay.links import LinkContext, clean_url
from store import users as store_users
from tests.relay.conftest import PASSWORD, maildir_messages, running_relay, submit_all
from tests.relay.rwhelp import BASE, SIGNER, clicked_urls, map_back, rewrite_html
from tests.support import free_port, wait_for
from tracker import tokens

DELIVERY = 5
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "html"
TEMPLATES = sorted(CORPUS.rglob("*.html"))
TRACKER = re.compile(re.escape(BASE).encode() + rb"/c/([A-Za-z0-9_-]+)")
PIXEL = htmlrewrite.pixel_html(
    tokens.open_url(BASE, SIGNER, DELIVERY), tokens.honeypot_url(BASE, SIGNER, DELIVERY)
).encode()
HEAD = (
    b"From: alice@corp.test\r\nTo: carol@client.test\r\nSubject: hostile\r\n"
    b"Message-ID: <hostile@corp.test>\r\nMIME-Version: 1.0\r\n"
)
LINK = b'<a href="https://example.com/offer?a=1&amp;b=2">Offer</a>'


def single(body: bytes, ctype: str = "text/html; charset=utf-8", cte: str = "8bit") -> bytes:
    return (
        HEAD + f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode() + body
    )


def encode(html: bytes, cte: str) -> bytes:
    if cte == "quoted-printable":
        return quopri.encodestring(html.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    if cte == "base64":
        return base64.encodebytes(html).replace(b"\n", b"\r\n")
    return html


def run(data: bytes) -> tuple[bytes, rewrite.MessagePlan | None, str | None]:
    """What the relay does with ``data``: (copy, plan, None) or, failing open, (data, None, why).

    Only ``RewriteError`` is a spec'd way to fail; anything else escapes and fails the test.
    """
    try:
        plan = rewrite.plan(
            rewrite.analyse(data), LinkContext(BASE), track_opens=True, track_clicks=True
        )
        out = plan.render(
            lambda pos, url: tokens.click_url(BASE, SIGNER, DELIVERY, pos, url),
            tokens.open_url(BASE, SIGNER, DELIVERY),
            tokens.honeypot_url(BASE, SIGNER, DELIVERY),
        )
    except rewrite.RewriteError as exc:
        return data, None, str(exc)
    return out, plan, None


def html_part(data: bytes) -> bytes:
    msg = email.message_from_bytes(data, policy=policy.compat32)
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            return part.get_payload(decode=True)
    raise AssertionError("no HTML part")


def original_hrefs(plan: rewrite.MessagePlan) -> list[bytes]:
    """The raw (decoded-transfer-encoding) bytes of every wrapped href, in text order."""
    out = []
    for pp in plan.analysis.parts:
        edits = sorted((e for e in pp.html.edits if e.kind == "click"), key=lambda e: e.start)
        out += [pp.decoded[e.start : e.end] for e in edits]
    return out


def assert_only_allowed_edits(html_in: bytes, html_out: bytes, raw: list[bytes]) -> None:
    """Pixel out, originals back in: the input again. Tracker URLs carry the original URLs."""
    found = list(TRACKER.finditer(html_out))
    honeypot = [m for m in found if SIGNER.verify(m.group(1).decode()).kind != "click"]
    clicks = [m for m in found if m not in honeypot]
    assert len(clicks) == len(raw)
    for m, value in zip(clicks, raw, strict=True):
        tok = SIGNER.verify(m.group(1).decode())
        assert tok is not None and tok.url == clean_url(value.decode("utf-8", "replace"))
    pieces, cursor = [], 0
    for m, value in zip(clicks, raw, strict=True):
        pieces += [html_out[cursor : m.start()], value]
        cursor = m.end()
    pieces.append(html_out[cursor:])
    back = b"".join(pieces)
    # 7bit/8bit lines pushed over 998 octets are folded (a CRLF inside a tag, the pixel's
    # own included): then compare without line breaks.
    if PIXEL not in back:
        back, html_in = back.replace(b"\r\n", b""), html_in.replace(b"\r\n", b"")
    assert back.count(PIXEL) == 1
    back = back.replace(PIXEL, b"", 1)
    if back != html_in:
        assert back.replace(b"\r\n", b"") == html_in.replace(b"\r\n", b"")


# --- generated markup ----------------------------------------------------------------------

_ALPHABET = "ab <>=\"'&;/!-#\x00é€\r\n\t"
_URLS = [
    "https://example.com/a?x=1&amp;y=2",
    "http://example.org/ü?q=%20#frag",
    "https://example.com/" + "p" * 120,
    "mailto:x@y.test",
    "#top",
    "javascript:alert(1)",
    "www.example.com",
    " https://example.net/spaced ",
    "https://exa\x00mple.com/nul",
]
_attr = st.builds(
    lambda name, quote, value, space: f"{space}{name}={quote}{value}{quote}",
    st.sampled_from(["href", "HREF", "class", "style", "title", "src", "=", '"x']),
    st.sampled_from(['"', "'", ""]),
    st.sampled_from(_URLS) | st.text(_ALPHABET, max_size=10),
    st.sampled_from([" ", "\r\n", "\t", "/", ""]),
)
_tag = st.builds(
    lambda slash, name, attrs, close: f"<{slash}{name}{''.join(attrs)}{close}",
    st.sampled_from(["", "/"]),
    st.sampled_from(
        ["a", "A", "area", "div", "p", "script", "style", "title", "blockquote", "body"]
        + ["html", "v:roundrect", "img", "x-y", "1"]
    ),
    st.lists(_attr, max_size=3),
    st.sampled_from([">", "/>", " >", ""]),
)
_fragment = st.one_of(
    _tag,
    st.sampled_from(
        ["<!--", "-->", "<!--[if mso]>", "<![endif]-->", "</a>", "</body>", "&amp;", "&lt;"]
        + ["\r\n", "<!doctype html>", "<![CDATA[", "]]>", "<?x?>", "link text"]
    ),
    st.text(_ALPHABET, max_size=8),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_fragment, max_size=40), st.sampled_from(["8bit", "quoted-printable", "base64"]))
@example(  # a line over 998 octets folded inside the pixel tag
    ['<a href="https://example.com/a?x=1&amp;y=2">']
    + ["<a" + ' href="https://example.com/a?x=1&amp;y=2"' * 3 + ">"] * 3,
    "8bit",
)
def test_generated_markup_gets_only_the_allowed_edits(fragments, cte):
    html = "".join(fragments).replace("\r\n", "\n").replace("\r", "").replace("\n", "\r\n")
    html_in = html.encode("utf-8")
    data = single(encode(html_in, cte), cte=cte)
    out, plan, error = run(data)
    assert error is None, error  # nothing here is beyond the rewriter
    assert_only_allowed_edits(html_in, html_part(out), original_hrefs(plan))
    if cte != "8bit":
        assert max(len(line) for line in out.split(b"\r\n")) <= 998


# --- mutated corpus templates ----------------------------------------------------------------

_GARBAGE = st.sampled_from(
    [b"\x00", b"<", b">", b'"', b"'", b"<!--", b"-->", b"<a href=", b"<script>", b"</a>"]
    + [b"<!--[if mso]>", b"<![endif]-->", b"\xff\xfe", b"&#0;", b"\r\n"]
) | st.binary(max_size=6)
_mutation = st.tuples(
    st.sampled_from(["flip", "insert", "truncate", "delete"]),
    st.floats(0, 1),
    st.integers(0, 255),
    _GARBAGE,
)


def mutate(data: bytes, mutations) -> bytes:
    for kind, where, byte, garbage in mutations:
        at = int(where * len(data))
        if kind == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ (byte or 1)]) + data[at + 1 :]
        elif kind == "insert":
            data = data[:at] + garbage + data[at:]
        elif kind == "truncate":
            data = data[:at]
        else:
            data = data[:at] + data[at + len(garbage) :]
    return data


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TEMPLATES), st.lists(_mutation, min_size=1, max_size=6))
def test_mutated_corpus_templates_map_back_byte_for_byte(path, mutations):
    original = mutate(path.read_bytes(), mutations).decode("latin-1")
    plan, out = rewrite_html(original)
    assert map_back(original, plan, out) == original
    expected = [
        (e.position, clean_url(original[e.start : e.end]))
        for e in sorted((e for e in plan.edits if e.kind == "click"), key=lambda e: e.start)
    ]
    assert clicked_urls(out) == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(TEMPLATES),
    st.lists(_mutation, min_size=1, max_size=4),
    st.sampled_from(["8bit", "quoted-printable", "base64"]),
)
@example(  # "href<a href==table": a bare "==" in QP, read differently by binascii
    CORPUS / "postmark/templates-inlined/basic/comment-notification/content.html",
    [("flip", 0.0, 0, b"\x00")] * 2 + [("insert", 0.875, 0, b"<a href=")] * 2,
    "quoted-printable",
)
def test_mutated_whole_messages_rewrite_or_fail_open(path, mutations, cte):
    """Mutations hit headers, boundaries and encodings too: rewritten with only the allowed
    edits to the HTML part and every other byte kept, or the original with a reason."""
    html = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    data = (
        HEAD + b"Content-Type: multipart/alternative; boundary=BB\r\n\r\n"
        b"--BB\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
        + f"--BB\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode()
        + encode(html, cte)
        + b"\r\n--BB--\r\n"
    )
    data = mutate(data, mutations)
    out, plan, error = run(data)
    if plan is None:
        assert out == data and error
        return
    # Outside the changed HTML parts, every byte is the original's.
    changed = [pp for pp in plan.analysis.parts if pp.html.edits]
    cursor = 0
    for pp in sorted(changed, key=lambda pp: pp.part.body_start):
        head = data[cursor : pp.part.body_start]
        assert out.startswith(head)
        out_rest = out[len(head) :]
        tail = data[pp.part.body_end :]
        assert out_rest.endswith(tail)
        cursor = pp.part.body_end
    assert out.endswith(data[cursor:])
    if changed and cte != "base64":
        # The HTML part's decoded bytes map back (one part, as generated).
        (pp,) = changed
        body_out = out[pp.part.body_start : len(out) - (len(data) - pp.part.body_end)]
        if pp.encoding == "quoted-printable":
            # Read as pp.decoded was: quopri (binascii) reads a bare "==" as one "=".
            html_out, html_in = qp.decode(body_out, clean=False), pp.decoded
        elif pp.encoding == "identity":
            html_out, html_in = body_out, pp.decoded
        else:
            return
        if pp.view.byte_indexed:
            assert_only_allowed_edits(html_in, html_out, original_hrefs(plan))


# --- explicit hostile inputs -----------------------------------------------------------------


def links_wrapped(out: bytes, n: int) -> None:
    html = html_part(out)
    urls = [SIGNER.verify(m.group(1).decode()) for m in TRACKER.finditer(html)]
    assert sum(1 for t in urls if t is not None and t.kind == "click") == n


def test_nul_bytes_are_kept_and_a_nul_href_is_not_wrapped():
    html = b"<html><body>a\x00b" + LINK + b'<a href="https://e.test/x\x00y">n</a></body></html>'
    out, plan, error = run(single(html))
    assert error is None
    assert [link.rule for link in plan.links] == ["tracked", "invalid-url"]
    assert_only_allowed_edits(html, html_part(out), original_hrefs(plan))


def test_a_1_mb_line_in_quoted_printable_is_rewritten_in_bounded_time():
    html = b"<html><body>" + (b"word " * 1000 + LINK) * 200 + b"</body></html>\r\n"
    assert len(html) > 1_000_000
    data = single(encode(html, "quoted-printable"), cte="quoted-printable")
    started = time.monotonic()
    out, plan, error = run(data)
    assert time.monotonic() - started < 30
    assert error is None
    links_wrapped(out, 200)
    assert_only_allowed_edits(html, html_part(out), original_hrefs(plan))
    assert max(len(x) for x in out.split(b"\r\n")) <= 76


def test_a_1_mb_8bit_line_that_would_grow_fails_open_in_bounded_time():
    """Its pieces between links cannot be folded to 998 octets and the rewrite makes the line
    longer than it came: the original goes out untouched, with the reason."""
    html = b"<html><body>" + (b"word " * 1000 + LINK) * 200 + b"</body></html>\r\n"
    data = single(html)
    started = time.monotonic()
    out, plan, error = run(data)
    assert time.monotonic() - started < 30
    assert plan is None and out == data and "998" in error


def test_10000_nested_tags():
    html = (
        b"<html><body>"
        + b"<div><span>\r\n" * 10_000
        + LINK
        + b"</span></div>\r\n" * 10_000
        + b"<blockquote>\r\n" * 10_000
        + b'<a href="https://example.com/deep">deep</a></body></html>'
    )
    started = time.monotonic()
    out, plan, error = run(single(html))
    assert time.monotonic() - started < 30
    assert error is None
    links_wrapped(out, 2)
    assert_only_allowed_edits(html, html_part(out), original_hrefs(plan))


def test_5000_links_are_all_wrapped_in_bounded_time():
    html = b"<html><body>" + b"".join(
        b'<p><a href="https://example.com/p/%d?u=%d&amp;v=1">link %d</a></p>\r\n' % (i, i, i)
        for i in range(5000)
    )
    html += b"</body></html>\r\n"
    for cte in ("8bit", "quoted-printable", "base64"):
        started = time.monotonic()
        out, plan, error = run(single(encode(html, cte), cte=cte))
        assert time.monotonic() - started < 30
        assert error is None and len(plan.tracked_links) == 5000
        links_wrapped(out, 5000)
        assert_only_allowed_edits(html, html_part(out), original_hrefs(plan))


@pytest.mark.parametrize(
    "charset", ["x-unknown", "utf-8\x00", '"', "ünï", "utf-8; charset=latin-1", ""]
)
def test_unknown_or_garbled_charsets_are_read_byte_for_byte(charset):
    html = "<html><body>Grüße ".encode() + LINK + b"</body></html>"
    out, plan, error = run(single(html, ctype=f"text/html; charset={charset}"))
    assert error is None
    links_wrapped(out, 1)
    assert_only_allowed_edits(html, html_part(out), original_hrefs(plan))


@pytest.mark.parametrize(
    ("charset", "body"),
    [
        ("utf-7", b"<html><body>+AGQ- " + LINK + b"</body></html>"),
        ("iso-2022-jp", b"<html><body>\x1b$B\xff\xfe" + LINK + b"</body></html>"),
        ("utf-16", b"\xff\xfe<\x00a\x00" + b"\x00\xd8"),
    ],
)
def test_stateful_charsets_that_do_not_round_trip_fail_open(charset, body):
    data = single(body, ctype=f"text/html; charset={charset}")
    out, plan, error = run(data)
    assert plan is None and out == data
    assert charset in error or "re-encode" in error


@pytest.mark.parametrize(
    "data",
    [
        # boundary declared, never used: no parts, nothing to rewrite
        HEAD + b"Content-Type: multipart/alternative; boundary=XX\r\n\r\n<html>" + LINK,
        # no closing delimiter, and the part runs to the end
        HEAD + b"Content-Type: multipart/alternative; boundary=XX\r\n\r\n--XX\r\n"
        b"Content-Type: text/html\r\n\r\n<html><body>" + LINK,
        # no boundary parameter at all
        HEAD
        + b"Content-Type: multipart/mixed\r\n\r\n--XX\r\nContent-Type: text/html\r\n\r\n"
        + LINK
        + b"\r\n--XX--\r\n",
        # delimiter lines with trailing junk, nested multipart that never closes
        HEAD + b"Content-Type: multipart/mixed; boundary=A\r\n\r\n--A junk\r\n"
        b"--A\r\nContent-Type: multipart/alternative; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/html\r\n\r\n" + LINK + b"\r\n--A--\r\n",
        # a header block that never ends
        HEAD + b"Content-Type: text/html",
        b"",
        b"\r\n\r\n" + LINK,
    ],
)
def test_broken_mime_structure_never_crashes(data):
    out, plan, error = run(data)
    assert error is None
    if plan.changes:
        assert out.count(BASE.encode() + b"/o/") == 1
        # Bytes before the first HTML part are untouched.
        first = min(pp.part.body_start for pp in plan.analysis.parts)
        assert out[:first] == data[:first]
    else:
        assert out == data


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>=ZZ = \r\n=\r"
        + b'<a href=3D"https://e.test/q=\r\nx">l</a>'
        + b"</body></html>=",
        b"<html><body>" + b"=" * 500 + b'<a href=3D"https://e.test/=3">l</a>\r\n',
        b'<a href=3D"https://e.test/' + b"x=\r\n" * 3000 + b'">long</a>',
    ],
)
def test_broken_quoted_printable_is_read_leniently(body):
    """Read as the line-by-line reference reads it (a bare '=' stays, '=' + CR is a soft
    break): the link is wrapped and the untouched lines keep their bytes."""
    data = single(body, cte="quoted-printable")
    out, plan, error = run(data)
    assert error is None and len(plan.tracked_links) == 1
    decoded = qp.decode(out[out.index(b"\r\n\r\n") + 4 :], clean=False)
    tok = SIGNER.verify(TRACKER.search(decoded).group(1).decode())
    assert tok.url == plan.tracked_links[0][1]
    assert out.startswith(data[: data.rfind(b"\n", 0, data.index(b"<a href")) + 1])
    longest = max(76, *map(len, body.splitlines()))
    assert max(len(line) for line in out.split(b"\r\n\r\n", 1)[1].splitlines()) <= longest


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        (base64.b64encode(b"<html><body>" + LINK + b"</body></html>").rstrip(b"="), "rewritten"),
        (b"!!" + base64.encodebytes(b"<body>" + LINK + b"</body>") + b"**", "rewritten"),
        (b"P", "fail-open"),  # one character too many
        (b"PGE=PGE=", "fail-open"),  # padding in the middle: part of the text would be lost
    ],
)
def test_broken_base64(body, outcome):
    data = single(body, cte="base64")
    out, plan, error = run(data)
    if outcome == "fail-open":
        assert plan is None and out == data and "base64" in error
    else:
        assert error is None
        links_wrapped(out, 1)


# --- the same through the real relay ---------------------------------------------------------


@pytest.fixture
def relay_settings(tmp_path):
    s = cli.initialise(tmp_path / "data")
    s.relay.listen = f"127.0.0.1:{free_port()}"
    s.tracker.base_url = BASE
    db = store.connect(s.db_path)
    store_users.add_user(db, "alice@corp.test", "Alice", PASSWORD)
    yield s, db
    db.close()


SMTP_CASES = {
    "nul": (single(b"<html><body>a\x00b" + LINK + b"</body></html>\r\n"), "rewritten"),
    "charset": (
        single(b"<html><body>" + LINK + b"</body></html>\r\n", "text/html; charset=x-no"),
        "rewritten",
    ),
    "utf7": (
        single(b"<html><body>+AGQ- " + LINK + b"</body></html>\r\n", "text/html; charset=utf-7"),
        "fail-open",
    ),
    "b64": (single(b"P\r\n", cte="base64"), "fail-open"),
    "qp": (
        single(
            b"<html><body>=ZZ " + b'<a href=3D"https://e.test/q=\r\nx">l</a></body></html>\r\n',
            cte="quoted-printable",
        ),
        "rewritten",
    ),
    "unterminated": (
        HEAD + b"Content-Type: multipart/alternative; boundary=XX\r\n\r\n--XX\r\n"
        b"Content-Type: text/html\r\n\r\n<html><body>" + LINK + b"\r\n",
        "rewritten",
    ),
    "links": (
        single(
            b"<html><body>"
            + b"".join(
                b'<a href="https://example.com/%d">l%d</a>\r\n' % (i, i) for i in range(5000)
            )
            + b"</body></html>\r\n"
        ),
        "rewritten",
    ),
    "nested": (
        single(b"<html><body>" + b"<div>\r\n" * 10_000 + LINK + b"</body></html>\r\n"),
        "rewritten",
    ),
}


async def test_hostile_messages_through_the_relay_are_delivered(relay_settings):
    settings, db = relay_settings
    submitted = {}
    async with running_relay(settings):
        for name, (data, _) in SMTP_CASES.items():
            data = data.replace(b"Subject: hostile", b"Subject: " + name.encode())
            submitted[name] = data.replace(b"<hostile@", b"<" + name.encode() + b"@")
        mails = [(f"{name}@client.test", data) for name, data in submitted.items()]
        await asyncio.to_thread(submit_all, settings, mails)
        delivered = await wait_for(
            lambda: (m := maildir_messages(settings)) and len(m) == len(SMTP_CASES) and m, 60
        )
    rows = {r["subject"]: r for r in db["emails"].rows}
    for raw in delivered:
        name = re.search(rb"Subject: (\w+)", raw).group(1).decode()
        out = raw[raw.index(b"\n", raw.index(b"Delivered-To:")) + 1 :]
        data, outcome = submitted[name], SMTP_CASES[name][1]
        if outcome == "rewritten":
            assert BASE.encode() + b"/o/" in out, name
            assert rows[name]["rewrite_error"] is None, name
        else:
            expected = data if data.endswith(b"\r\n") else data + b"\r\n"
            assert out == expected, name
            assert rows[name]["rewrite_error"], name
            assert rows[name]["untracked_reason"].startswith("rewrite-failed"), name
    assert BASE.encode() + b"/c/" in next(r for r in delivered if b"Subject: links" in r)
