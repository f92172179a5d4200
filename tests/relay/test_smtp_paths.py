"""The relay's fast parses give what the parsers they skip give, for the plain forms they
handle and for everything else: MAIL/RCPT paths (``relay.server.RelaySMTP._getaddr``
against aiosmtpd's) and envelope addresses (``relay.submit.normalized`` against
``store.addresses.normalize``)."""

from __future__ import annotations

from aiosmtpd.smtp import SMTP
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from relay import server


def _session(local_part_limit: int = 0) -> server.RelaySMTP:
    smtp = server.RelaySMTP.__new__(server.RelaySMTP)  # only the parsing is used
    smtp.local_part_limit = local_part_limit
    return smtp


def _outcome(parse, smtp, arg):
    try:
        return parse(smtp, arg)
    except Exception as exc:  # aiosmtpd's parser itself raises on some inputs (e.g. "<")
        return type(exc)


def _both(arg: str, limit: int = 0):
    smtp = _session(limit)
    return _outcome(server.RelaySMTP._getaddr, smtp, arg), _outcome(SMTP._getaddr, smtp, arg)


PLAIN = [
    "<bench@corp.example>",
    "<bench@corp.example> SIZE=62724",
    "<bench@corp.example>  SIZE=1  BODY=8BITMIME",
    "<r0@dest.example>",
    "<a.b+tag@sub-d.example.com> SMTPUTF8",
    "<a@b.c>SIZE=1",
    "<a@b.c> X ",
    "<a@b.c> AUTH=<>",
    "<O'Neil@x.example> RET=HDRS ENVID=QQ314159",
]
ODD = [
    "<>",
    " <a@b.c>",
    "<a@b.c> ",
    "<a@b.c> (comment) SIZE=1",
    '<a@b.c> A="x"',
    "<a@b.c>\tSIZE=1",
    "<@route:a@b.c>",
    "<a..b@c>",
    "<.a@b>",
    "<a@b.>",
    "<a@[1.2.3.4]>",
    '<"x y"@b.c>',
    "<a@b.c",
    "<a(c)@b.c>",
    "<ü@b.c>",
    "a@b.c",
    "",
]


def test_plain_paths_take_the_fast_way_and_agree():
    for arg in PLAIN:
        assert server._PLAIN_PATH.fullmatch(arg), arg
        fast, slow = _both(arg)
        assert fast == slow and fast[0] is not None, arg


def test_other_paths_agree():
    for arg in ODD:
        fast, slow = _both(arg)
        assert fast == slow, arg


def test_the_local_part_limit_still_applies():
    assert _both("<abcdefghijk@b.c>", 10) == ((None, None), (None, None))
    assert _both("<abcdefghij@b.c>", 10)[0] == ("abcdefghij@b.c", "")


_CHARS = st.sampled_from(list("ab.@<> \t\"()\\:[],;=+-_'!#~ü") + ["SIZE=1", "AUTH=<>"])


@hsettings(max_examples=3000, deadline=None)
@given(st.lists(_CHARS, max_size=24).map("".join))
@example("<a@b.c> x")
def test_any_path_agrees_with_aiosmtpd(arg):
    fast, slow = _both(arg)
    assert fast == slow


def test_normalized_agrees_with_store_normalize():
    from relay import submit
    from store import addresses

    for addr in [
        "Bench@Corp.Example",
        "r0@dest.example",
        "a.b+tag@sub-d.example.com",
        "O'Neil@x.example",
        "a..b@c.d",
        ".a@b.c",
        "a@b.c.",
        " a@b.c",
        '"Bob" <Bob@X.com>',
        "bob@x.com (Bob)",
        "",
        "ü@b.c",
    ]:
        assert submit.normalized(addr) == addresses.normalize(addr), addr
    assert submit.PLAIN_ADDRESS.fullmatch("r0@dest.example")  # the fast way is taken


_ADDR_CHARS = st.sampled_from(list("aB.@<> \t\"()\\:[],;=+-_'!#~ü"))


@hsettings(max_examples=3000, deadline=None)
@given(st.lists(_ADDR_CHARS, max_size=20).map("".join))
def test_any_address_normalizes_as_store_does(addr):
    from relay import submit
    from store import addresses

    assert submit.normalized(addr) == addresses.normalize(addr)
