"""ingest/forwarded.py on its own: the shapes and the traps between them."""

from __future__ import annotations

from ingest import forwarded


def test_reply_attribution_without_forward_subject_is_not_a_forward():
    body = (
        "Sounds good.\n\nOn Mon, 23 Nov 2026 at 09:12, Jane Roe <jane@prospect.com> wrote:\n> Hi\n"
    )
    assert forwarded.parse(body, "Re: Offer").forwarded is None
    assert forwarded.parse(body, "Offer").reason == "unrecognised forward format"


def test_outlook_mac_attribution_under_forward_subject():
    body = '\ufeffOn 23/11/2026 09:12, "Jane Roe" <jane@prospect.com> wrote:\n\n    Hi Alice\n'
    fwd = forwarded.parse(body, "FW: Offer").forwarded
    assert (fwd.from_name, fwd.from_address, fwd.subject) == (
        "Jane Roe",
        "jane@prospect.com",
        "Offer",
    )
    assert fwd.body == "Hi Alice"


def test_prose_from_line_is_not_a_header_block():
    body = "Note to self\nFrom: my point of view this is fine.\nTo: be continued\n"
    assert forwarded.parse(body, "Fwd: thoughts").forwarded is None


def test_first_of_nested_forwards_wins_and_note_is_kept_apart():
    body = (
        "Please log.\n\n---------- Forwarded message ---------\n"
        "From: B <b@two.com>\nDate: Tue, 24 Nov 2026 at 10:00\nSubject: Fwd: X\nTo: <me@acme.io>\n\n"
        "middle note\n\n---------- Forwarded message ---------\n"
        "From: A <a@one.com>\nDate: Mon, 23 Nov 2026 at 10:00\nSubject: X\nTo: <b@two.com>\n\nbody\n"
    )
    fwd = forwarded.parse(body, "Fwd: Fwd: X").forwarded
    assert fwd.from_address == "b@two.com" and fwd.note == "Please log."
    assert "a@one.com" in fwd.body  # the older history stays in the original's body


def test_mailbox_shapes():
    assert forwarded.parse_mailbox("John Doe [mailto:john@x.com]") == ("John Doe", "john@x.com")
    assert forwarded.parse_mailbox(
        "John<mailto:john@x.com> <john@x.com<mailto:john@x.com>> on behalf of t@x.com"
    ) == ("John", "john@x.com")
    assert forwarded.parse_mailbox("'john@x.com' <john@x.com>") == (None, "john@x.com")
    assert forwarded.parse_mailbox("John Doe") == ("John Doe", None)
    assert forwarded.parse_address_list("a@x.com <a@x.com>; B <b@y.org>, 'c' <c@z.net>") == [
        "a@x.com",
        "b@y.org",
        "c@z.net",
    ]


def test_subject_prefixes():
    assert forwarded.subject_kind("Fwd: Re: X") == "forward"
    assert forwarded.subject_kind("AW: X") == "reply"
    assert forwarded.subject_kind("[EXT] WG: X") == "forward"
    assert forwarded.subject_kind("Quarterly report") == ""
    assert forwarded.strip_prefixes("Fwd: RE: TR: X") == "X"


def test_html_to_text_keeps_lines():
    html = "<div>a<br>b</div><p>c&nbsp;d</p><blockquote>From: X &lt;x@y.com&gt;</blockquote><script>no</script>"
    assert forwarded.html_to_text(html).split("\n") == [
        "a",
        "b",
        "",
        "c d",
        "",
        "From: X <x@y.com>",
    ]
