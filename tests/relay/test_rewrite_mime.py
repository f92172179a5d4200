"""The rewriter on whole messages: transfer encodings, charsets, attachments, line length."""

from __future__ import annotations

import base64
import email
import quopri
from email import policy

import pytest

from relay import rewrite
from tests.relay.rwhelp import BASE, SIGNER, clicked_urls, ctx
from tracker import tokens

HEAD = b"From: alice@corp.test\r\nTo: carol@client.test\r\nSubject: t\r\nMIME-Version: 1.0\r\n"


def render(
    data: bytes, *, opens=True, clicks=True, delivery_id=3, **kw
) -> tuple[rewrite.MessagePlan, bytes]:
    plan = rewrite.plan(rewrite.analyse(data), ctx(**kw), track_opens=opens, track_clicks=clicks)
    out = plan.render(
        lambda pos, url: tokens.click_url(BASE, SIGNER, delivery_id, pos, url),
        tokens.open_url(BASE, SIGNER, delivery_id),
        tokens.honeypot_url(BASE, SIGNER, delivery_id),
    )
    return plan, out


def html_of(data: bytes) -> str:
    return email.message_from_bytes(data, policy=policy.default).get_body(("html",)).get_content()


def single(html_bytes: bytes, ctype: str = "text/html; charset=utf-8", cte: str = "8bit") -> bytes:
    return (
        HEAD
        + f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode()
        + html_bytes
    )


def test_8bit_only_the_href_and_pixel_change():
    html = '<html><body><p>Grüße &nbsp; <a href="https://example.com/a?x=1&amp;y=2">Angebot</a></p>\r\n</body></html>\r\n'
    data = single(html.encode())
    plan, out = render(data)
    before, after = data.split(b"https://example.com/a?x=1&amp;y=2")
    assert out.startswith(before)
    assert b"</p>\r\n<a href=" in out and out.endswith(b"></body></html>\r\n")
    assert clicked_urls(out.decode()) == [(1, "https://example.com/a?x=1&y=2")]


def test_quoted_printable_soft_break_inside_href():
    html = b'<html><body><p>Caf=C3=A9 <a href=3D"https://example.com/very/long/path?with=3Dquery&amp;m=\r\nore=3D1">here</a></p></body></html>\r\n'
    data = single(html, cte="quoted-printable")
    plan, out = render(data)
    assert [link.url for link in plan.links] == [
        "https://example.com/very/long/path?with=query&more=1"
    ]
    decoded = html_of(out)
    assert "Café" in decoded
    assert clicked_urls(decoded) == [(1, "https://example.com/very/long/path?with=query&more=1")]
    body = out.split(b"\r\n\r\n", 1)[1]
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))
    assert quopri.decodestring(body).decode().startswith("<html><body><p>Café <a href=")


def test_quoted_printable_untouched_lines_keep_their_bytes():
    lines = [b"<html><body>"] + [b"<p>Zeile %d mit =C3=BC</p>" % i for i in range(30)]
    lines += [b'<a href=3D"https://example.com/x">x</a>', b"</body></html>"]
    data = single(b"\r\n".join(lines) + b"\r\n", cte="quoted-printable")
    _, out = render(data)
    for line in lines[:31]:
        assert line + b"\r\n" in out


def test_base64_part_reencoded_with_same_line_length():
    html = (
        '<html><body><p>Hello</p><a href="https://example.com/b64">b</a>'
        + "x" * 300
        + "</body></html>"
    ).encode()
    encoded = base64.encodebytes(html).replace(b"\n", b"\r\n")
    data = single(encoded, cte="base64")
    _, out = render(data)
    body = out.split(b"\r\n\r\n", 1)[1]
    assert {len(line) for line in body.split(b"\r\n")[:-2]} == {76}
    assert clicked_urls(html_of(out)) == [(1, "https://example.com/b64")]


@pytest.mark.parametrize("charset", ["utf-8", "iso-8859-1", "windows-1252", "iso-2022-jp"])
def test_charsets_round_trip(charset):
    text = {
        "utf-8": "Ünïcödé €",
        "iso-8859-1": "Grüße",
        "windows-1252": "Preis – 5 €",
        "iso-2022-jp": "こんにちは世界",
    }[charset]
    html = f'<html><body><p>{text}</p><a href="https://example.com/{charset}?q=1">{text}</a></body></html>'
    data = single(html.encode(charset), ctype=f"text/html; charset={charset}")
    plan, out = render(data)
    assert [link.rule for link in plan.links] == ["tracked"]
    assert [link.text for link in plan.links] == [text]
    msg = email.message_from_bytes(out, policy=policy.default)
    assert msg.get_content_charset() == charset
    decoded = msg.get_content()
    assert f"<p>{text}</p>" in decoded
    assert clicked_urls(decoded) == [(1, f"https://example.com/{charset}?q=1")]
    head, body = out.split(b"\r\n\r\n", 1)
    orig_body = data.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(orig_body.split(b"https://")[0])


def test_non_ascii_url_in_utf8_is_kept():
    html = '<a href="https://example.com/straße?q=ü">x</a></body>'
    plan, out = render(single(html.encode()))
    assert clicked_urls(html_of(out)) == [(1, "https://example.com/straße?q=ü")]


def test_ascii_text_skips_the_codec_only_where_ascii_bytes_mean_ascii():
    """``meaning`` returns ASCII text as is for ASCII-compatible charsets; in others (EBCDIC)
    the same bytes are read through the codec."""
    for charset in ("utf-8", "iso-8859-15", "windows-1252", "koi8-r"):
        assert rewrite.text_view(b"", charset).meaning("notrack") == "notrack", charset
    ebcdic = rewrite.text_view(b"", "cp500")
    assert ebcdic.byte_indexed
    assert ebcdic.meaning("notrack") == b"notrack".decode("cp500") != "notrack"


def test_lines_stay_within_998_octets():
    long_line = (
        "<p>"
        + "word " * 120
        + '<a class="c" href="https://example.com/'
        + "p" * 200
        + '">x</a> '
        + "w " * 30
        + "</p>"
    )
    assert len(long_line) < 998
    data = single(("<html><body>" + long_line + "</body></html>\r\n").encode())
    _, out = render(data)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    assert clicked_urls(html_of(out)) == [(1, "https://example.com/" + "p" * 200)]


ATTACHED = (
    HEAD + b"Content-Type: multipart/mixed; boundary=MIX\r\n\r\n"
    b"--MIX\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><a href="https://example.com/body">b</a></body></html>\r\n'
    b"--MIX\r\nContent-Type: text/html; charset=utf-8; name=page.html\r\nContent-Disposition: attachment; filename=page.html\r\n\r\n"
    b'<html><body><a href="https://example.com/attachment">a</a></body></html>\r\n'
    b"--MIX\r\nContent-Type: message/rfc822\r\n\r\n"
    b"From: x@y.test\r\nContent-Type: text/html\r\n\r\n"
    b'<html><body><a href="https://example.com/forwarded">f</a></body></html>\r\n'
    b"--MIX--\r\n"
)


def test_attachments_and_attached_messages_untouched():
    plan, out = render(ATTACHED)
    assert [link.url for link in plan.links] == ["https://example.com/body"]
    assert b'<a href="https://example.com/attachment">a</a>' in out
    assert b'<a href="https://example.com/forwarded">f</a>' in out
    tail = ATTACHED[ATTACHED.index(b"--MIX\r\nContent-Type: text/html; charset=utf-8; name") :]
    assert out.endswith(tail)


def test_control_headers_removed_including_folded_lines():
    data = (
        HEAD.replace(
            b"Subject: t\r\n",
            b"X-Mailtally-Track: opens,\r\n clicks\r\nSubject: t\r\nx-mailtally-log: yes\r\nBcc: hidden@x.test\r\n",
        )
        + b"\r\nbody"
    )
    out, found = rewrite.split_control_headers(data)
    assert found == {
        "x-mailtally-track": "opens, clicks",
        "x-mailtally-log": "yes",
        "bcc": "hidden@x.test",
    }
    assert out == HEAD + b"\r\nbody"


def test_signed_message_is_not_rewritten():
    data = (
        HEAD
        + b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=S\r\n\r\n--S\r\nContent-Type: text/html\r\n\r\n<a href="https://example.com/">x</a>\r\n--S\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--S--\r\n'
    )
    analysis = rewrite.analyse(data)
    assert analysis.signed
    with pytest.raises(rewrite.RewriteError):
        rewrite.plan(analysis, ctx(), track_opens=True, track_clicks=True)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_pieces = st.sampled_from(
    [
        "<p>Grüße</p>",
        "\r\n",
        "text = equals ",
        '<a href="https://example.com/a?x=1&amp;y=2">go</a>',
        '<a href="mailto:x@y.test">m</a>',
        "<!-- c -->",
        "  trailing  \r\n",
        "é" * 40,
        '<a href="https://example.com/' + "q" * 90 + '">long</a>',
        "\t",
    ]
)


@settings(max_examples=120, deadline=None)
@given(st.lists(_pieces, min_size=1, max_size=25))
def test_quoted_printable_equals_the_decoded_rewrite(parts):
    """Rewriting a QP part gives, once decoded, exactly the rewrite of the decoded HTML."""
    html = ("<html><body>" + "".join(parts) + "</body></html>").encode()
    encoded = quopri.encodestring(html.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    _, out_qp = render(single(encoded, cte="quoted-printable"))
    _, out_8bit = render(single(html.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")))
    body_qp = out_qp.split(b"\r\n\r\n", 1)[1]
    # Lines we encode are <= 76; untouched ones keep their length (quopri makes some 77).
    longest = max(76, *(len(line) for line in encoded.split(b"\r\n")))
    assert all(len(line) <= longest for line in body_qp.split(b"\r\n"))
    decoded = quopri.decodestring(body_qp)
    expected = out_8bit.split(b"\r\n\r\n", 1)[1]
    # The 8bit reference may fold lines over 998 octets; QP keeps exactly the original breaks.
    assert decoded.replace(b"\r\n", b"") == expected.replace(b"\r\n", b"")
    assert decoded.count(b"\r\n") == html.count(b"\r\n")
