"""The fast link scanner (one compiled regex) agrees with the reference tokenizer."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.htmlscan import LINK_ATTRS, LINK_END, LINK_START, Comment, scan, scan_links

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "html"


def expected(text: str) -> list:
    """What scan_links must report, picked out of the reference scanner's full token list."""
    out = []
    for t in scan(text):
        if not isinstance(t, Comment):
            t.attrs = [a for a in t.attrs if a.name in LINK_ATTRS]
        if isinstance(t, Comment):
            if t.conditional:
                out.append(t)
        elif t.mso:
            if not t.is_end and t.attr("href") is not None:  # (filtered above: still there)
                out.append(t)
        elif t.name in (LINK_END if t.is_end else LINK_START):
            out.append(t)
    return out


FRAGMENTS = [
    "<a href=x>",
    '<a href="https://e.test/?a=1&amp;b=2">',
    "<A HREF='y' data-mailtally=notrack>",
    "<area href=z>",
    "</a>",
    "</A >",
    "<a",
    '<a href="',
    "'",
    '"',
    "=",
    " ",
    "\n",
    "\t",
    "/",
    ">",
    "<",
    "</",
    '<p title="<a href=q>">',
    "<div class='x>y'>",
    "<script>",
    "</script>",
    "<STYLE type=text/css>",
    "</style >",
    "<title>",
    "</title>",
    "<!--",
    "-->",
    "<!-->",
    "<!--[if mso]>",
    "<!--[if !mso]><!-->",
    "<![endif]-->",
    "<!--<![endif]-->",
    '<v:roundrect href="u">',
    "<v:rect HREF=u/>",
    "<style href=s>",
    "</v:roundrect>",
    "<!doctype html>",
    "<?xml?>",
    "<![CDATA[x]]>",
    "<body>",
    "</body>",
    "</html>",
    "<blockquote type=cite>",
    "</blockquote>",
    "text",
    "é",
    "\xa0",
    "\x0b",
    "&amp;",
    "<img src=x/>",
    "<br/>",
    "<a/href=w>",
    "<a style='x' HREF=v data-mailtally = 'notrack' href=dup>",
    "<1>",
    "< a>",
    # Tag names compare as str.lower() does: the Kelvin sign is a 'k', the long s and the
    # dotted/dotless i are not letters of a name (regex (?i:...) would say they are).
    "<\u017ftyle>",
    "</\u017ftyle>",
    "<bloc\u212aquote>",
    "</bloc\u212aquote>",
    "<\u0130frame>",
    "<!--[\u0131f mso]>",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=40))
def test_scan_links_agrees_with_the_reference_scanner(parts):
    text = "".join(parts)
    assert scan_links(text) == expected(text)


def _positions(tokens) -> list:
    keys = ("name", "is_end", "mso", "conditional")
    return [(type(t), t.start, t.end, *(getattr(t, k, None) for k in keys)) for t in tokens]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=40))
def test_scan_without_attributes_finds_the_same_tokens(parts):
    """has_visible_content's cheaper scan (no attributes) ends every tag where the reference
    does, so it sees the same text between them."""
    text = "".join(parts)
    bare = list(scan(text, attrs=False))
    assert _positions(bare) == _positions(scan(text))
    assert all(not t.attrs for t in bare if not isinstance(t, Comment))


def test_scan_links_agrees_on_every_corpus_template():
    paths = sorted(CORPUS.rglob("*.html"))
    assert len(paths) >= 100  # the corpus is there (an empty glob would pass anything)
    links = 0
    for path in paths:
        text = path.read_bytes().decode("latin-1")
        found = scan_links(text)
        assert found == expected(text), path
        links += sum(1 for t in found if not isinstance(t, Comment) and t.attr("href"))
    assert links > len(paths)  # real templates hold links: the scanner saw them
