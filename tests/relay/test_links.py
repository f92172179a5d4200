"""One test per link rule and per pixel placement case (SPEC relay 5 and 6)."""

from __future__ import annotations

import pytest

from relay.links import list_unsubscribe_urls
from tests.relay.rwhelp import clicked_urls, links, map_back, rewrite_html


def one(href: str, text: str = "Read more", **kw):
    html = f'<html><body><p><a href="{href}">{text}</a></p></body></html>'
    plan, out = rewrite_html(html, **kw)
    assert len(plan.links) == 1
    return plan.links[0], out, html


@pytest.mark.parametrize(
    "href,text,rule",
    [
        ("https://example.com/offer", "Read more", "tracked"),
        ("http://example.com/offer?x=1#top", "Read more", "tracked"),
        ("mailto:carol@client.test", "Mail me", "mailto"),
        ("tel:+4930123456", "Call", "tel"),
        ("sms:+4930123456", "Text", "sms"),
        ("#section-2", "Jump", "anchor"),
        ("javascript:alert(1)", "Run", "javascript"),
        ("data:text/html,hi", "Data", "data"),
        ("/relative/path", "Rel", "relative"),
        ("images/x.png", "Rel", "relative"),
        ("ftp://files.example.com/a", "FTP", "other-scheme"),
        ("https://example.com/a", "www.example.com", "text-is-url"),
        ("https://example.com/a", "https://example.com/a", "text-is-url"),
        ("https://example.com/a", "example.com", "text-is-url"),
        ("https://example.com/unsubscribe?u=1", "here", "unsubscribe"),
        ("https://example.com/u?id=1", "Unsubscribe", "unsubscribe"),
        ("https://t.example/c/abc", "Already", "tracker-link"),
        ("{{action_url}}", "Go", "merge-tag"),
        ("https://example.com/?id=*|UNIQID|*", "Go", "merge-tag"),
        ("", "Empty", "empty"),
        ("http://", "Broken", "invalid-url"),
    ],
)
def test_link_rules(href, text, rule):
    link, out, html = one(href, text)
    assert link.rule == rule
    assert link.tracked == (rule == "tracked")
    if rule == "tracked":
        assert href not in out and clicked_urls(out) == [(1, href)]
    else:
        assert f'href="{href}"' in out
        if rule != "tracker-link":
            assert clicked_urls(out) == []


def test_excluded_domain_covers_subdomains():
    for href in ("https://partner.test/a", "https://www.partner.test/a"):
        link, out, _ = one(href, excluded_domains=["partner.test"])
        assert link.rule == "excluded-domain" and href in out
    link, _, _ = one("https://notpartner.test/a", excluded_domains=["partner.test"])
    assert link.rule == "tracked"


def test_list_unsubscribe_target_is_not_tracked():
    urls = list_unsubscribe_urls("<mailto:u@x.test>, <https://example.com/l/9f8e>")
    link, out, _ = one("https://example.com/l/9f8e", "manage", unsubscribe_urls=urls)
    assert link.rule == "unsubscribe" and "https://example.com/l/9f8e" in out


def test_notrack_marker_is_removed_and_link_untouched():
    html = '<a class="b" data-mailtally="notrack" href="https://example.com/x">Go</a><a href="https://example.com/y" data-mailtally=notrack>Y</a>'
    plan, out = rewrite_html(html, opens=False)
    assert [r for _, r, _ in links(plan)] == ["notrack-marker", "notrack-marker"]
    assert (
        '<a class="b" href="https://example.com/x">Go</a><a href="https://example.com/y">Y</a>'
        in out
    )
    assert "data-mailtally" not in out


def test_amp_in_href_means_ampersand_and_legacy_entities_stay():
    link, out, html = one("https://example.com/p?a=1&amp;region=eu&copy=2&b=%20x#frag")
    assert link.url == "https://example.com/p?a=1&region=eu&copy=2&b=%20x#frag"
    assert clicked_urls(out) == [(1, link.url)]


def test_commented_script_and_style_links_untouched():
    html = (
        '<html><head><style>a[href="https://example.com/s"]{}</style>'
        "<script>var a = '<a href=\"https://example.com/js\">';</script></head>"
        '<body><!-- <a href="https://example.com/old">old</a> -->'
        '<a href="https://example.com/new">new</a></body></html>'
    )
    plan, out = rewrite_html(html)
    assert [(u, r) for u, r, _ in links(plan)] == [("https://example.com/new", "tracked")]
    assert '<!-- <a href="https://example.com/old">old</a> -->' in out
    assert map_back(html, plan, out) == html


VML = """<div><!--[if mso]>
  <v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="{href}" style="height:40px;width:200px" fillcolor="#d62828">
    <w:anchorlock/><center>
  <![endif]--><a href="{href}" style="background:#d62828">{text}</a><!--[if mso]></center></v:roundrect><![endif]--></div>"""


def test_vml_button_wrapped_with_its_twin():
    html = VML.format(href="https://example.com/buy?a=1&amp;b=2", text="Buy now")
    plan, out = rewrite_html(html)
    assert [(r, t) for _, r, t in links(plan)] == [("mso-twin", True), ("tracked", True)]
    assert clicked_urls(out) == [(1, "https://example.com/buy?a=1&b=2")] * 2
    assert map_back(html, plan, out) == html


def test_vml_button_untouched_when_twin_untracked():
    html = VML.format(href="https://example.com/unsubscribe", text="Unsubscribe")
    plan, out = rewrite_html(html)
    assert [r for _, r, _ in links(plan)] == ["mso-twin-untracked", "unsubscribe"]
    assert clicked_urls(out) == []
    lone = '<!--[if mso]><v:rect href="https://example.com/lone"></v:rect><![endif]--><p>x</p>'
    plan, out = rewrite_html(lone)
    assert [r for _, r, _ in links(plan)] == ["mso-no-twin"] and clicked_urls(out) == []


def test_merge_tags_anywhere_untouched():
    html = (
        '<p>Hi {{ first_name }}, *|FNAME|*</p><a href="{{ url }}">x</a><img src="{{logo}}"></body>'
    )
    plan, out = rewrite_html(html)
    assert (
        "{{ first_name }}, *|FNAME|*" in out
        and 'href="{{ url }}"' in out
        and 'src="{{logo}}"' in out
    )


# --- pixel placement -------------------------------------------------------------------------


def pixel_index(out: str) -> int:
    return out.index('<img src="https://t.example/o/')


def test_pixel_before_closing_body():
    html = "<html><body><p>Hi</p>\n</body>\n</html>\n"
    plan, out = rewrite_html(html)
    assert out[pixel_index(out) :].startswith('<img src="https://t.example/o/')
    assert out.endswith("</body>\n</html>\n")
    assert out.index("</body>") > pixel_index(out) > out.index("</p>")


def test_pixel_appended_without_body_tag():
    plan, out = rewrite_html("<p>Hi there</p>")
    assert out.startswith("<p>Hi there</p>") and pixel_index(out) > 0
    plan, out = rewrite_html("<p>Hi</p></html>")
    assert pixel_index(out) < out.index("</html>")


def test_pixel_never_in_comment_or_style():
    html = "<html><head><style>/* </body> */</style></head><body><p>x</p><!-- </body> --></body></html>"
    plan, out = rewrite_html(html)
    assert out.index("<!-- </body> -->") < pixel_index(out) < out.rindex("</body>")
    assert "/* </body> */" in out


def test_pixel_not_inside_quoted_earlier_message():
    html = (
        "<html><body><p>My answer</p><blockquote><html><body><p>earlier</p></body></html>"
        "</blockquote><div>sig</div></body></html>"
    )
    plan, out = rewrite_html(html)
    assert pixel_index(out) > out.index("</blockquote>")
    assert pixel_index(out) > out.index("<div>sig</div>")


def test_pixel_and_honeypot_follow_the_tracking_switches():
    html = "<body><p>x</p></body>"
    _, out = rewrite_html(html, opens=True, clicks=False)
    assert "/o/" in out and "display:none" not in out
    _, out = rewrite_html(html, opens=False, clicks=True)
    assert "/o/" not in out and 'style="display:none!important"' in out


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_fragments = st.sampled_from(
    [
        '<a href="https://example.com/x?a=1&amp;b=2">go</a>',
        "<a href='https://example.com/y'>",
        "<a href=https://example.com/z>z</a>",
        "<a href",
        '<a href="https://example.com/unterminated',
        "<!--",
        "-->",
        "<!--[if mso]>",
        "<![endif]-->",
        '<v:roundrect href="https://example.com/x?a=1&amp;b=2">',
        "<style>",
        "</style>",
        "<script>",
        "</body>",
        "<blockquote>",
        "</blockquote>",
        "<",
        ">",
        "&amp;",
        "www.example.com",
        "</a>",
        "text ü €",
        '"',
        "'",
        " data-mailtally=notrack ",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_fragments, max_size=30))
def test_any_markup_maps_back_to_the_original(parts):
    """Broken or odd markup never breaks the splice: undoing the edits gives the input."""
    html = "".join(parts)
    plan, out = rewrite_html(html)
    if any(e.kind == "remove" for e in plan.edits):
        return  # a removed marker cannot be mapped back
    assert map_back(html, plan, out) == html
    assert [u for _, u in clicked_urls(out)] == [
        e.url for e in sorted((e for e in plan.edits if e.kind == "click"), key=lambda e: e.start)
    ]


@pytest.mark.parametrize(
    "url",
    [
        "https://Example.COM/offer",
        "http://example.com",
        "http://example.com:8080?x=1",
        "http://example.com:/x",
        "https://sub.ex-ample.co.uk#top",
        "https://user:pw@example.com/x",
        "http://[::1]:80/x",
        "http://[::1",
        "http://example.com:abc/x",
        "http://exa%41mple.com/",
        "https://",
        "https:///path",
        "http://host_name./x",
    ],
)
def test_hostname_fast_path_agrees_with_urlsplit(url):
    from urllib.parse import urlsplit

    from relay.links import _hostname

    try:
        expected = urlsplit(url).hostname
    except ValueError:
        expected = None
    assert _hostname(url) == expected
