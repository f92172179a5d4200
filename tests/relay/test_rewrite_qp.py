"""relay.qp: the fast (binascii + counts) path reads clean bodies exactly as the line-by-line
reference does, and re-encoded lines decode back to the same bytes within 76 octets."""

from __future__ import annotations

import binascii
import quopri

from hypothesis import given, settings
from hypothesis import strategies as st

from relay import qp

_TOKENS = st.sampled_from(
    [
        b"a",
        b'<a href=3D"x">',
        b"=3D",
        b"=C3=A9",
        b"=e9",
        b"=\r\n",
        b"=\n",
        b"\r\n",
        b"\n",
        b" ",
        b"\t",
        b"=20\r\n",
        b"x" * 80,
        b"=",
        b"= \r\n",
        b"\r",
        b"==",
        b"=4",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TOKENS, max_size=60), st.lists(st.integers(0, 2000), max_size=8))
def test_fast_path_agrees_with_the_reference(tokens, offsets):
    body = b"".join(tokens)
    reference = b"".join(line.decoded for line in qp.lines(body))
    assert qp.decode(body) == reference
    assert qp.decode_checked(body) == (reference, qp.is_clean(body))
    fast, slow = qp.LineIndex(body), qp.LineIndex(body, clean=False)
    assert fast.clean == qp.is_clean(body)
    for p in sorted(min(o, len(reference)) for o in offsets):
        got, want = fast.locate(p), slow.locate(p)
        assert got == want, (p, got, want)
        es, ee, ds, de, _ = got
        assert qp.decode(body[es:ee], False) == reference[ds:de]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"\r\n", b"\n"]), st.booleans())
def test_encode_round_trips_within_76_octets(data, eol, soft):
    seg = data.replace(b"\r", b"")
    out = qp.encode(seg, eol, soft)
    assert all(len(line) <= 76 for line in out.split(eol))
    assert binascii.a2b_qp(out).replace(eol, b"\n") == seg
    assert quopri.decodestring(out).replace(eol, b"\n") == seg


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=4),
    st.sampled_from([b"\r\n", b"\n"]),
    st.booleans(),
)
def test_encode_of_one_line_is_its_share_of_several(lines, eol, soft):
    """A group of one line (the usual one, encoded per copy without the loop) is encoded as
    it is inside a group of several lines (the loop), with or without its line break."""
    whole = b"\n".join(lines)
    parts = [qp.encode(line + b"\n", eol, soft) for line in lines[:-1]]
    parts.append(qp.encode(lines[-1], eol, soft))
    assert qp.encode(whole, eol, soft) == b"".join(parts)
    assert qp.encode(whole + b"\n", eol, soft) == b"".join(parts[:-1]) + qp.encode(
        lines[-1] + b"\n", eol, soft
    )
