"""Which links are tracked (SPEC relay 6): one function per question, one rule name per answer.

``classify`` returns ``(tracked, rule)``; the rule names are what ``mailtally preview``
shows and what the tests check.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from relay.htmlscan import any_of, unescape_attr

TRACKED = "tracked"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")
_URL_TEXT = re.compile(
    r"^(?:(?:https?|ftp)://)?(?:www\.)?(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,63}"
    r"(?::\d+)?(?:[/?#]\S*)?$",
    re.IGNORECASE,
)
_MERGE_TAGS = ("{{", "}}", "{%", "*|", "|*", "%%", "${", "[%", "<%")
_MERGE_TAG = re.compile("|".join(re.escape(t) for t in _MERGE_TAGS))  # one scan, not nine
_UNSUBSCRIBE_WORDS = (
    "unsubscribe",
    "unsub",
    "opt-out",
    "optout",
    "opt out",
    "abmelden",
    "abbestellen",
    "désabonner",
    "desabonner",
    "désinscri",
    "desinscri",
    "darse de baja",
    "cancelar suscripci",
    "disiscriv",
    "uitschrijven",
    "afmelden",
    "avregistrera",
    "afmeld",
    "wypisz",
    "配信停止",
    "退订",
)
_STRIP_URL = str.maketrans("", "", "\t\n\r")


_UNSUBSCRIBE = re.compile(any_of(_UNSUBSCRIBE_WORDS))  # a presence test
_BAD_URL_CHAR = re.compile(r"[\s\x00-\x1f]")  # str.isspace() or a control character


@dataclass
class LinkContext:
    """What the rules need besides the link itself."""

    base_url: str
    excluded_domains: list[str] = field(default_factory=list)
    unsubscribe_urls: set[str] = field(default_factory=set)


def clean_url(raw_value: str) -> str:
    """The URL a browser navigates to: entities decoded, outer spaces and tabs/newlines gone."""
    if "&" in raw_value:
        raw_value = unescape_attr(raw_value)
    raw_value = raw_value.strip(" \t\n\r\f")
    if "\t" in raw_value or "\n" in raw_value or "\r" in raw_value:  # translate costs 2 us
        raw_value = raw_value.translate(_STRIP_URL)
    return raw_value


_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def visible_text(fragment: str) -> str:
    """The text a reader sees in an ``<a>`` element's inner HTML (tags and comments dropped)."""
    if "<" in fragment:
        fragment = _TAG.sub("", _COMMENT.sub("", fragment))
    if "&" in fragment:
        fragment = html.unescape(fragment)
    return " ".join(fragment.split())


def text_is_url(text: str) -> bool:
    """``www.example.com``, ``https://x.test/a``, ``example.com``: the reader sees the target."""
    return bool(text) and " " not in text and bool(_URL_TEXT.match(text))


def is_unsubscribe(url: str, text: str, ctx: LinkContext) -> bool:
    if url in ctx.unsubscribe_urls:
        return True
    return _UNSUBSCRIBE.search((url + " " + text).lower()) is not None


# ``scheme://host[:port]`` then the path, query, fragment or the end, with a plain host:
# what ``urlsplit(url).hostname`` gives for it, without urlsplit's general parse.
_PLAIN_HOST = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://([A-Za-z0-9._\-]+)(?::[0-9]*)?(?=[/?#]|\Z)")


def _hostname(url: str) -> str | None:
    """The URL's host, lower-cased (None when it has none or cannot be parsed)."""
    m = _PLAIN_HOST.match(url)
    if m is not None:
        return m.group(1).lower()
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def classify(url: str, text: str, ctx: LinkContext, notrack: bool = False) -> tuple[bool, str]:
    """(tracked, rule) for a link to ``url`` whose visible text is ``text``."""
    if notrack:
        return False, "notrack-marker"
    if not url:
        return False, "empty"
    if _MERGE_TAG.search(url):
        return False, "merge-tag"
    lower = url.lower()
    if lower.startswith("#"):
        return False, "anchor"
    m = _SCHEME.match(url)
    if not m:
        return False, "relative"
    scheme = m.group(1).lower()
    if scheme in ("mailto", "tel", "sms", "javascript", "data"):
        return False, scheme
    if scheme not in ("http", "https"):
        return False, "other-scheme"
    # Printable ASCII without a space has neither (the regex costs more than the test).
    if not (url.isascii() and url.isprintable() and " " not in url) and _BAD_URL_CHAR.search(url):
        return False, "invalid-url"
    host = _hostname(url)
    if not host:
        return False, "invalid-url"
    base = ctx.base_url.lower().rstrip("/")
    if lower == base or lower.startswith(base + "/"):
        return False, "tracker-link"
    if ctx.excluded_domains:
        # Imported here: the store package pulls in sqlite_utils, which the rules never need.
        from store.addresses import domain_covers

        if any(domain_covers(d.lstrip("@"), host) for d in ctx.excluded_domains):
            return False, "excluded-domain"
    if is_unsubscribe(url, text, ctx):
        return False, "unsubscribe"
    if text_is_url(text):
        return False, "text-is-url"
    return True, TRACKED


def list_unsubscribe_urls(header_value: str | None) -> set[str]:
    """The http(s) targets of a ``List-Unsubscribe`` header."""
    if not header_value:
        return set()
    return {u.strip() for u in re.findall(r"<([^>]+)>", header_value) if u.strip()}
