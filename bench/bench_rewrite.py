"""Rewrite: ms per message for the relay's rewriter against a plain regex href splice (the floor).

The floor (``floor_splice``) does the same essential work as the rewriter, and nothing more:

1. split the message at the blank line after the top headers and, when it is multipart, at
   its boundary lines (``bytes.split``; one level deep, which is what the bench mails have);
2. for every part whose headers say ``text/html``, decode its transfer encoding with
   binascii (``a2b_qp`` / ``a2b_base64``; 7bit/8bit as they are);
3. replace every ``href="..."`` in the decoded HTML with a per-link URL
   (``https://t.example/c/<n>``) with one ``re.sub`` and a counter callback, and insert a pixel
   ``<img>`` before the last ``</body>`` (appended when there is none);
4. re-encode the whole part in its own transfer encoding (``b2a_qp`` / ``encodebytes``) and
   join the message back together.

It knows nothing of comments, ``<script>``/``<style>``, single-quoted or unquoted hrefs, link
rules, VML twins, charsets, line lengths or keeping untouched QP lines byte for byte: that
is what the rewriter pays for on top of it. The bench asserts, before timing, that the floor
really replaced the expected number of hrefs (40 and 300 in the two templates), so it cannot
silently match nothing (as it did when it ran over the quoted-printable ``href=3D"``).

The rewriter is imported once, at module level: the timed call does only the rewrite, as the
floor's does (an ``import`` statement inside it cost a Python-level importlib call per
message that the floor never paid).
"""

from __future__ import annotations

import base64
import binascii
import re
import time

from common import HREF, corpus_files, make_mail, spread, template

# Imported once here, not inside the timed call: the floor pays no import statement either.
from relay import rewrite
from relay.links import LinkContext

_BLANK = re.compile(rb"\r?\n\r?\n")
_CTYPE = re.compile(rb"(?im)^content-type:[ \t]*([^;\s]+)")
_CTE = re.compile(rb"(?im)^content-transfer-encoding:[ \t]*(\S+)")
_BOUNDARY = re.compile(rb'(?i)boundary="?([^";\r\n]+)"?')
PIXEL = b'<img src="https://t.example/o/x" alt="">'


def _splice_html(part: bytes, counter: list[int]) -> bytes:
    """One MIME part (headers + body): if it is text/html, decode, splice, re-encode."""
    m = _BLANK.search(part)
    if m is None:
        return part
    head, body = part[: m.end()], part[m.end() :]
    ctype = _CTYPE.search(head)
    if ctype is None or ctype.group(1).lower() != b"text/html":
        return part
    cte = _CTE.search(head)
    enc = cte.group(1).lower() if cte else b"7bit"
    if enc == b"quoted-printable":
        html = binascii.a2b_qp(body)
    elif enc == b"base64":
        html = binascii.a2b_base64(body)
    else:
        html = body

    def link(_m: re.Match) -> bytes:
        counter[0] += 1
        return b'href="https://t.example/c/' + str(counter[0]).encode() + b'"'

    html = HREF.sub(link, html)
    at = html.rfind(b"</body>")
    html = html + PIXEL if at == -1 else html[:at] + PIXEL + html[at:]
    if enc == b"quoted-printable":
        body = binascii.b2a_qp(html, istext=True)
    elif enc == b"base64":
        body = base64.encodebytes(html)
    else:
        body = html
    return head + body


def floor_splice(data: bytes) -> tuple[bytes, int]:
    """The floor (see the module docstring): the rewritten message and how many hrefs it replaced."""
    counter = [0]
    m = _BLANK.search(data)
    if m is None:
        return data, 0
    head = data[: m.end()]
    ctype = _CTYPE.search(head)
    if ctype is None or not ctype.group(1).lower().startswith(b"multipart/"):
        return _splice_html(data, counter), counter[0]
    boundary = _BOUNDARY.search(head)
    if boundary is None:
        return data, 0
    delim = b"\n--" + boundary.group(1)
    pieces = data.split(delim)
    out = [pieces[0]] + [_splice_html(p, counter) for p in pieces[1:]]
    return delim.join(out), counter[0]


def regex_floor(data: bytes) -> bytes:
    return floor_splice(data)[0]


def _plan(data: bytes):
    """The relay's plan for ``data``, opens and clicks tracked."""
    return rewrite.plan(
        rewrite.analyse(data), LinkContext("https://t.example"), track_opens=True, track_clicks=True
    )


def relay_rewrite(data: bytes) -> bytes:
    return _plan(data).render(
        lambda pos, url: f"https://t.example/c/{pos}", "https://t.example/o/x", None
    )


def hrefs_seen(data: bytes) -> int:
    """How many distinct hrefs the rewriter found and decided on (tracked or not, by rule).

    The bench templates are cut from the corpus at arbitrary points, so some of their links
    land inside an unterminated ``<!--[if mso]>`` block: the rewriter sees them but leaves
    them alone (``mso-no-twin``), while the floor wraps them blindly.
    """
    return len({link.url for link in _plan(data).links})


def time_pair(fn, floor_fn, data: bytes, runs: int, inner: int) -> tuple[dict, dict]:
    """ms per call of ``fn`` and of the floor, their runs interleaved so that load drift on a
    shared machine hits both alike."""
    got, floor = [], []
    for _ in range(runs):
        for f, values in ((fn, got), (floor_fn, floor)):
            t = time.perf_counter()
            for _ in range(inner):
                f(data)
            values.append((time.perf_counter() - t) * 1000 / inner)
    return spread(got), spread(floor)


def run(quick: bool) -> list[dict]:
    runs, rows = 3 if quick else 7, []
    cases = [
        ("60 KB / 40 links", 40, make_mail(template(60_000, 40)), 2.0),
        ("600 KB / 300 links", 300, make_mail(template(600_000, 300)), 20.0),
    ]
    for name, links, mail, target in cases:
        inner = 5 if quick else 20
        if "600" in name:
            inner = max(1, inner // 5)
        assert relay_rewrite(mail) != mail, "rewrite changed nothing"
        assert floor_splice(mail)[1] == links, "the floor did not replace every href"
        assert hrefs_seen(mail) == links, "the rewriter did not see every link"
        got, floor = time_pair(relay_rewrite, regex_floor, mail, runs, inner)
        ratio = got["median"] / floor["median"]
        rows.append(
            {
                "bench": f"rewrite {name}",
                "unit": "ms/msg",
                "value": got,
                "baseline": {"regex floor": floor},
                "ratio": ratio,
                "target": f"<= {target} ms, <= 4x floor",
                "met": got["median"] <= target and ratio <= 4,
            }
        )
    mails = [make_mail(p.read_text("utf-8", "replace")) for p in corpus_files()]
    assert sum(floor_splice(m)[1] for m in mails) > 0

    def all_rw(_):
        for m in mails:
            relay_rewrite(m)

    def all_floor(_):
        for m in mails:
            regex_floor(m)

    per = len(mails)
    got, floor = time_pair(all_rw, all_floor, b"", runs, 1)
    got = {k: (v / per if k != "runs" else v) for k, v in got.items()}
    floor = {k: (v / per if k != "runs" else v) for k, v in floor.items()}
    rows.append(
        {
            "bench": f"rewrite whole corpus ({per} msgs)",
            "unit": "ms/msg",
            "value": got,
            "baseline": {"regex floor": floor},
            "ratio": got["median"] / floor["median"],
            "target": "<= 4x floor",
            "met": got["median"] / floor["median"] <= 4,
        }
    )
    return rows
