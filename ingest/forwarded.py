"""Find the forwarded message inside a forward and pull out its original headers and body.

Mail clients do not attach the original when forwarding inline; they write a block of
text: a separator line (``---------- Forwarded message ---------``, ``Begin forwarded
message:``, ``________________________________``, ``-----Original Message-----``…),
then a few localised header lines (``From:``/``Von:``/``De :``/``送信元：``…), then the
original body. Some clients (Outlook for Mac 2016-2019) only write an attribution line
(``On 28/10/2021 12:46, "John Doe" <john@x> wrote:``) and rely on the ``FW:`` subject.

Rather than one regex per client and language, this parser recognises the *shapes*:
a dash-framed or colon-ended separator line whose words mean "forward" in one of the
supported languages; an Outlook underscore rule or an "Original Message" frame; a bare
block of header lines; Yahoo's single-line header run; the Outlook-for-Mac attribution
line. Header keywords of every supported language are accepted in every shape, because
clients mix them (Gmail writes ``De :`` then ``Date:`` and ``To:``).

A block that is only a quoted reply — a ``Re:`` subject above an Outlook header block, or
an ``On … wrote:`` line without a forward subject — is not a forward.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

# --- vocabulary -----------------------------------------------------------------------------

# Stems (lower case) of the word "forward" in the separator lines of the supported clients
# and languages: English, German, French, Spanish, Italian, Dutch, Portuguese (pt, pt-BR),
# Danish, Norwegian, Swedish, Finnish, Estonian, Czech, Slovak, Polish, Hungarian,
# Croatian, Romanian, Russian, Ukrainian, Turkish, Japanese, Chinese, Korean.
FORWARD_STEMS = (
    "forward",
    "fwd",
    "weitergeleit",
    "reenviad",
    "transféré",
    "transfere",
    "transmis",
    "réexpédi",
    "reexpedi",
    "inoltrat",
    "doorgestuurd",
    "przesłan",
    "przekaz",
    "encaminhad",
    "vidarebefordra",
    "videresend",
    "edelleenlähet",
    "välitet",
    "edastatud",
    "přeposl",
    "přeposíl",
    "preposl",
    "továbbít",
    "proslijeđ",
    "prosleđ",
    "redirecționat",
    "redirecţionat",
    "redirectionat",
    "переадрес",
    "пересыла",
    "пересила",
    "перенаправ",
    "переслан",
    "iletil",
    "ileti başlangıcı",
    "転送",
    "转发",
    "轉寄",
    "전달",
)

# Header keywords → field. Matched case-insensitively at the start of a line, followed by
# optional spaces and ``:`` (or the full-width ``：``), optionally in ``*bold*``.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "from": (
        "From",
        "Von",
        "De",
        "De la",
        "Da",
        "Van",
        "Fra",
        "Från",
        "Od",
        "Lähettäjä",
        "Feladó",
        "Šalje",
        "Expeditorul",
        "Expeditor",
        "Отправитель",
        "От",
        "Від кого",
        "Від",
        "Kimden",
        "Gönderen",
        "Saatja",
        "Mittente",
        "Nadawca",
        "Afsender",
        "Avsändare",
        "Absender",
        "Remitente",
        "Remetente",
        "Sender",
        "Pošiljatelj",
        "Odesílatel",
        "送信元",
        "差出人",
        "发件人",
        "寄件者",
        "보낸 사람",
    ),
    "to": (
        "To",
        "An",
        "À",
        "A",
        "Para",
        "Aan",
        "Til",
        "Till",
        "Do",
        "Komu",
        "Pre",
        "Komu",
        "Vastaanottaja",
        "Címzett",
        "Prima",
        "Destinatarul",
        "Destinatar",
        "Кому",
        "Kime",
        "Pour",
        "Adresat",
        "Către",
        "Empfänger",
        "Destinatario",
        "Destinatário",
        "Mottagare",
        "Saaja",
        "Adresát",
        "Prejemnik",
        "送信先",
        "宛先",
        "收件人",
        "받는 사람",
    ),
    "cc": (
        "Cc",
        "Kopie",
        "Kopie (CC)",
        "Kopi",
        "Kopia",
        "Kopio",
        "Másolat",
        "Másolatot kap",
        "Копия",
        "Копія",
        "Bilgi",
        "Dw",
        "Kópia",
        "Copie à",
        "Copia",
        "Cópia",
        "Koopia",
        "Kopija",
        "CC",
        "抄送",
        "副本",
        "참조",
    ),
    "bcc": ("Bcc", "Blindkopie", "Cci", "Cco", "Skrytá kopie", "Ukryta kopia", "Titkos másolat"),
    "date": (
        "Date",
        "Datum",
        "Dato",
        "Fecha",
        "Data",
        "Päivämäärä",
        "Päiväys",
        "Dátum",
        "Дата",
        "Tarih",
        "Dată",
        "Data de",
        "Kuupäev",
        "日付",
        "日期",
        "날짜",
        "Sent",
        "Gesendet",
        "Sendt",
        "Enviado",
        "Envoyé",
        "Envoyé le",
        "Inviato",
        "Verzonden",
        "Verstuurd",
        "Lähetetty",
        "Elküldve",
        "Trimis",
        "Отправлено",
        "Відправлено",
        "Gönderilen",
        "Gönderildi",
        "Odoslané",
        "Odesláno",
        "Wysłano",
        "Wysłane",
        "Skickat",
        "Poslano",
        "Saadetud",
        "发送时间",
        "送信日時",
        "보낸 날짜",
    ),
    "subject": (
        "Subject",
        "Betreff",
        "Asunto",
        "Objet",
        "Oggetto",
        "Onderwerp",
        "Emne",
        "Ämne",
        "Temat",
        "Předmět",
        "Predmet",
        "Aihe",
        "Tárgy",
        "Naslov",
        "Subiect",
        "Subiectul",
        "Тема",
        "Konu",
        "Assunto",
        "Sujet",
        "Teema",
        "Tema",
        "件名",
        "主题",
        "主旨",
        "제목",
    ),
    "reply_to": ("Reply-To", "Antwort an", "Responder a", "Répondre à", "Svar til", "Svara till"),
}

# Yahoo writes its header run on one line and, in two languages, drops the colon.
_YAHOO_COLONLESS = ("Dw", "Assunto")

# Subject prefixes. A ``Re:`` subject over an Outlook header block is a reply, not a
# forward; the Outlook-for-Mac attribution line counts only under a forward prefix.
FORWARD_PREFIXES = (
    "fw",
    "fwd",
    "wg",
    "tr",
    "rv",
    "vs",
    "vl",
    "i",
    "pd",
    "enc",
    "ilt",
    "İlt",
    "videresend",
    "vb",
    "redir.",
    "doorst",
    "fs",
    "továbbítás",
    "přeposlat",
    "pfw",
    "转发",
    "轉寄",
)
REPLY_PREFIXES = ("re", "aw", "sv", "antw", "odp", "res", "ynt", "r", "ref", "отв", "ответ")

_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\ufeff\u200b\u200c\u200d\u2060"), None)
_ON_WROTE = re.compile(
    r"(wrote|schrieb|escribió|a écrit|ha scritto|geschreven|skrev|napsal|napisał|napísal|"
    r"kirjoitti|írta|escreveu|написал|написала|yazdı|scrisse|a scris|kirjutas|napisao|"
    r"napisala|написав|написала|書きました|写道)",
    re.IGNORECASE,
)


def _kw_pattern(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


_FIELD_OF = {w.casefold(): f for f, words in KEYWORDS.items() for w in words}
_ALL_WORDS = [w for words in KEYWORDS.values() for w in words]
_HEADER_LINE = re.compile(
    r"^\s*\*{0,2}("
    + _kw_pattern(_ALL_WORDS)
    + r")\*{0,2}[ \t\u00a0]*[:：]\*{0,2}[ \t\u00a0]*(.*)$",
    re.IGNORECASE,
)
_INLINE_HEADER = re.compile(
    r"(" + _kw_pattern(_ALL_WORDS) + r")[ \u00a0]?[:：]\s*"
    r"|(?<=[>A-Z0-9])(" + _kw_pattern(list(_YAHOO_COLONLESS)) + r") "
)
_DASH_SEPARATOR = re.compile(r"^\s*-{2,}\s*([^-\s].*?)\s*-{2,}\s*(.*)$")
_UNDERSCORE_RULE = re.compile(r"^\s*_{10,}\s*$")


@dataclass
class Forwarded:
    """What a forwarded block says about the original mail."""

    format: str
    from_name: str | None = None
    from_address: str | None = None
    date: str | None = None
    subject: str | None = None
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    reply_to: str | None = None
    body: str = ""
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    """The parsed original, or None with the reason nothing was found."""

    forwarded: Forwarded | None
    reason: str = ""


# --- helpers --------------------------------------------------------------------------------


def _fold(text: str) -> str:
    return text.casefold().replace("i̇", "i")


def _has_forward_word(text: str) -> bool:
    folded = _fold(text)
    return any(stem in folded for stem in FORWARD_STEMS)


def _prefixes(subject: str) -> list[str]:
    """Leading ``Xx:`` prefixes of a subject, lower-cased (``Fwd: Re: x`` → [fwd, re])."""
    found = []
    rest = re.sub(r"^(\s*\[[^\]]{1,20}\])+", "", subject).strip()  # [EXT], [External]
    while True:
        m = re.match(r"^\s*\[?([^\s:：\[\]]{1,12}?)\]?\s*(?:\[\d+\])?\s*[:：]\s*", rest)
        if not m:
            return found
        found.append(_fold(m.group(1)))
        rest = rest[m.end() :]


def strip_prefixes(subject: str) -> str:
    """The subject without its forward/reply prefixes."""
    rest = subject.strip()
    known = {_fold(p) for p in FORWARD_PREFIXES + REPLY_PREFIXES}
    while True:
        m = re.match(r"^\s*([^\s:：]{1,12}?)\s*[:：]\s*", rest)
        if not m or _fold(m.group(1)) not in known:
            return rest
        rest = rest[m.end() :]


def subject_kind(subject: str) -> str:
    """``forward``, ``reply`` or ``""`` by the first known prefix of the outer subject."""
    fwd = {_fold(p) for p in FORWARD_PREFIXES}
    rep = {_fold(p) for p in REPLY_PREFIXES}
    for p in _prefixes(subject or ""):
        if p in fwd:
            return "forward"
        if p in rep:
            return "reply"
    return ""


_QUOTE_LEVEL = re.compile(r"^[ \t]?>[ \t]?")


def _unquote_line(line: str) -> str:
    m = _QUOTE_LEVEL.match(line)
    return line[m.end() :] if m else line


def _unquote(lines: list[str]) -> list[str]:
    """Remove one level of ``>`` quoting from lines that have it."""
    return [_unquote_line(line) for line in lines]


def _clean_mailto(value: str) -> str:
    value = re.sub(r"<mailto:[^>]*>", "", value)
    value = re.sub(r"\[mailto:([^\]]*)\]", r"<\1>", value)
    return value


def parse_mailbox(value: str) -> tuple[str | None, str | None]:
    """(name, address) of a ``From`` value in any of the shapes clients write."""
    value = _clean_mailto(value or "").strip()
    value = re.split(r"\s+on behalf of\s+|\s+im Auftrag von\s+|\s+de la part de\s+", value)[0]
    addr_match = _EMAIL.search(value)
    address = addr_match.group(0).strip("'").lower() if addr_match else None
    name = value
    if addr_match:
        name = value[: addr_match.start()]
        if not name.strip(" <([\"'"):
            name = ""
    name = name.strip().rstrip("<([").strip()
    name = name.strip("\"'“”„«»‘’ ").strip()
    if address and name.lower() == address:
        name = ""
    return (name or None), address


def parse_address_list(value: str) -> list[str]:
    """Addresses in order, duplicates (``a@x <a@x>``) removed."""
    out: list[str] = []
    for m in _EMAIL.finditer(_clean_mailto(value or "")):
        addr = m.group(0).strip("'").lower()
        if addr not in out:
            out.append(addr)
    return out


def _header_of(line: str) -> tuple[str, str] | None:
    m = _HEADER_LINE.match(line)
    if not m:
        return None
    return _FIELD_OF[m.group(1).casefold()], m.group(2).strip().strip("*").strip()


def _read_header_block(
    lines: list[str], start: int, unquote: bool = False
) -> tuple[dict[str, str], int]:
    """Header fields from ``lines[start:]`` (blank lines before them skipped), with one
    level of quoting removed line by line when ``unquote`` (only the lines looked at: a
    body with thousands of separator-like lines must stay linear, not quadratic).

    Stops at the first blank or non-header line once headers began; a line that starts
    with blanks and holds an address continues a To/Cc list.
    """
    i = start
    while i < len(lines) and not (_unquote_line(lines[i]) if unquote else lines[i]).strip():
        i += 1
    fields: dict[str, str] = {}
    last = None
    while i < len(lines):
        line = _unquote_line(lines[i]) if unquote else lines[i]
        header = _header_of(line)
        if header and header[0] not in fields:
            fields[header[0]] = header[1]
            last = header[0]
            i += 1
            continue
        if (
            last in ("to", "cc")
            and line[:1] in (" ", "\t")
            and _EMAIL.search(line)
            and not _header_of(line)
        ):
            fields[last] += " " + line.strip()
            i += 1
            continue
        break
    return fields, i


def _plausible(fields: dict[str, str]) -> bool:
    """A header block: a From plus at least one of Date/Sent, Subject, To."""
    return "from" in fields and any(k in fields for k in ("date", "subject", "to"))


def _split_inline(text: str) -> dict[str, str]:
    """Yahoo's ``From: a <a@x>To: b <b@x>Sent: …Subject: s`` run → fields."""
    fields: dict[str, str] = {}
    matches = list(_INLINE_HEADER.finditer(text))
    for n, m in enumerate(matches):
        word = m.group(1) or m.group(2)
        end = matches[n + 1].start() if n + 1 < len(matches) else len(text)
        key = _FIELD_OF[word.casefold()]
        fields.setdefault(key, text[m.end() : end].strip())
    return fields


def _build(fmt: str, fields: dict[str, str], body_lines: list[str], note: str) -> Forwarded:
    name, address = parse_mailbox(fields.get("from", ""))
    body = "\n".join(body_lines).strip("\n")
    return Forwarded(
        format=fmt,
        from_name=name,
        from_address=address,
        date=fields.get("date") or None,
        subject=(fields.get("subject") or "").strip() or None,
        to=parse_address_list(fields.get("to", "")),
        cc=parse_address_list(fields.get("cc", "")),
        reply_to=fields.get("reply_to") or None,
        body=_dedent(body),
        note=note.strip(),
    )


def _dedent(body: str) -> str:
    lines = body.split("\n")
    unq = (
        _unquote(lines)
        if all(not ln.strip() or ln.lstrip().startswith(">") for ln in lines)
        else lines
    )
    return "\n".join(ln.rstrip() for ln in unq).strip("\n")


# --- the shapes -----------------------------------------------------------------------------


def _separator_at(lines: list[str], i: int) -> tuple[str, str] | None:
    """(kind, rest-of-line) when line i is a separator: kind forward/original/rule."""
    line = re.sub(r"^(?:\s*>)+", "", lines[i]).strip()
    m = _DASH_SEPARATOR.match(line)
    if m:
        inner = m.group(1)
        if _has_forward_word(inner):
            return "forward", m.group(2)
        if len(inner) <= 60 and not _EMAIL.search(inner):
            return "original", m.group(2)
    if _UNDERSCORE_RULE.match(line):
        return "rule", ""
    bare = line.rstrip()
    if (
        (bare.endswith(":") or bare.endswith("："))
        and len(bare) <= 70
        and _has_forward_word(bare)
        and not _header_of(bare)
    ):
        return "forward", ""
    return None


def _at_separator(lines: list[str], i: int, hint: str) -> Result | None:
    """A forward introduced by a separator at line i, or None."""
    sep = _separator_at(lines, i)
    if not sep:
        return None
    kind, rest = sep
    reply = Result(None, "reply, not a forward (Re: subject over a quoted header block)")
    if rest and _INLINE_HEADER.search(rest):
        fields = _split_inline(rest)
        if _plausible(fields):
            if kind != "forward" and hint == "reply":
                return reply
            return Result(_build("inline-headers", fields, lines[i + 1 :], "\n".join(lines[:i])))
    fields, end = _read_header_block(lines, i + 1, unquote=True)
    if not _plausible(fields):
        return None
    if kind != "forward" and hint == "reply":
        return reply
    fmt = {"forward": "forward-separator", "original": "original-message", "rule": "outlook-rule"}
    return Result(_build(fmt[kind], fields, _unquote(lines[end:]), "\n".join(lines[:i])))


def _at_bare_headers(lines: list[str], i: int, hint: str) -> Result | None:
    """New Outlook / Outlook 2013: a header block with no separator above it, at line i."""
    header = _header_of(lines[i])
    if not header or header[0] != "from":
        return None
    if i > 0 and not re.fullmatch(r"[>\s]*", lines[i - 1]):
        # A header block starts a paragraph; "From: me" inside prose is not one.
        return None
    fields, end = _read_header_block(lines, i)
    if len(fields) < 3 or not _plausible(fields):
        return None
    if hint == "reply":
        return Result(None, "reply, not a forward (Re: subject over a quoted header block)")
    return Result(_build("header-block", fields, lines[end:], "\n".join(lines[:i])))


def _from_attribution(lines: list[str], outer_subject: str) -> Result | None:
    """Outlook for Mac: ``On <date>, "Name" <addr> wrote:`` under a forward subject."""
    for i, raw in enumerate(lines):
        line = raw.strip().translate(_ZERO_WIDTH)
        if not line or len(line) > 300 or not line.endswith((":", "：")):
            continue
        if not _ON_WROTE.search(line):
            continue
        addr = _EMAIL.search(line)
        name = None
        if addr:
            before = line[: addr.start()].rstrip(" <(")
            quoted = re.search(r"[\"“„«‘']\s*([^\"“”„«»‘’']+?)\s*[\"”»’']\s*$", before)
            if quoted:
                name = quoted.group(1)
            else:
                words = re.split(r"[\s,]+", before.strip())
                tail: list[str] = []
                for w in reversed(words):
                    if w and w[:1].isupper() and not any(c.isdigit() for c in w):
                        tail.insert(0, w)
                    else:
                        break
                name = " ".join(tail) or None
        date = re.search(r"\d{1,4}[/.-]\d{1,2}[/.-]\d{2,4}(?:[, ]+\d{1,2}[:.]\d{2})?", line)
        fields = {"subject": strip_prefixes(outer_subject)}
        fwd = Forwarded(
            format="attribution-line",
            from_name=name,
            from_address=addr.group(0).strip("'").lower() if addr else None,
            date=date.group(0) if date else None,
            subject=fields["subject"] or None,
            body=_dedent(
                "\n".join(ln[4:] if ln.startswith("    ") else ln for ln in lines[i + 1 :])
            ),
            note="\n".join(lines[:i]).strip(),
        )
        return Result(fwd)
    return None


def parse(text: str, subject: str = "") -> Result:
    """The forwarded original in a plain-text body, given the outer subject."""
    text = (text or "").translate(_ZERO_WIDTH).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ")
    lines = text.split("\n")
    hint = subject_kind(subject)
    for i in range(len(lines)):
        found = _at_separator(lines, i, hint) or _at_bare_headers(lines, i, hint)
        if found is not None:
            return found
    if hint == "forward":
        found = _from_attribution(lines, subject)
        if found is not None:
            return found
    if hint == "reply":
        return Result(None, "reply, not a forward")
    return Result(None, "unrecognised forward format")


_HTML_BLOCKS = frozenset(
    (
        "p",
        "div",
        "tr",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "table",
        "blockquote",
        "pre",
        "section",
        "article",
        "header",
        "footer",
    )
)
_HTML_RULE = "\n________________________________\n"


_TAG_NAME = re.compile(r"(/?)([A-Za-z][A-Za-z0-9:._-]*)")
_SPACES = re.compile(r"[ \t\r\n\f]+")
_RAW_TEXT = frozenset(("script", "style", "title"))
_RAW_END = {name: re.compile("</" + name, re.I) for name in _RAW_TEXT}
_HEAD_ONLY = frozenset(("meta", "link", "title", "style", "script", "base", "noscript"))


def _html_events(html: str):
    """("data", text) / ("start", name) / ("end", name) of an HTML string, in one linear
    pass (str.find with the next ``>`` remembered, never a regex that can rescan).

    Not html.parser: on Python 3.11 it is quadratic on malformed input (a million ``<``
    took 5 s, ``"<a " * 100_000`` minutes), and every forwarded HTML body goes through
    here in the single ingest worker. Comments and declarations are skipped, as are the
    contents of script/style/title up to their end tag; entities are decoded.
    """
    import html as html_lib

    n = len(html)
    i = 0
    next_gt = -1
    while i < n:
        j = html.find("<", i)
        if j < 0:
            yield "data", html_lib.unescape(html[i:])
            return
        if j > i:
            yield "data", html_lib.unescape(html[i:j])
        if html.startswith("<!--", j):
            k = html.find("-->", j + 4)
            i = n if k < 0 else k + 3  # an unclosed comment hides the rest, as in browsers
            continue
        if next_gt < j:
            next_gt = html.find(">", j)
            if next_gt < 0:
                next_gt = n  # no tag can close any more: the rest is text
        if next_gt >= n:
            yield "data", html_lib.unescape(html[j:])
            return
        if html.startswith(("<!", "<?"), j):
            i = next_gt + 1  # doctype, CDATA, processing instruction
            continue
        m = _TAG_NAME.match(html, j + 1, next_gt)
        if not m:
            yield "data", "<"
            i = j + 1
            continue
        name = m.group(2).lower()
        i = next_gt + 1
        if m.group(1):
            yield "end", name
            continue
        yield "start", name
        if html[next_gt - 1] == "/" and name not in _HTML_BLOCKS:
            yield "end", name
        if name in _RAW_TEXT:
            close = _RAW_END[name].search(html, i)
            i = n if close is None else close.start()


def html_to_text(html: str) -> str:
    """Visible text of an HTML body with line structure kept (for HTML-only forwards):
    blocks and <br> break lines, table cells are separated by a space, <hr> becomes
    Outlook's underscore rule, script/style/head are dropped, whitespace collapses
    outside <pre>. Linear in the input whatever its nesting (BeautifulSoup's tree edits
    took 40 s for 10,000 nested table cells)."""
    out: list[str] = []
    in_head = pre = 0
    for kind, value in _html_events(html or ""):
        if kind == "data":
            if not in_head and value:
                out.append(value if pre else _SPACES.sub(" ", value))
            continue
        if kind == "start":
            if value == "head":
                in_head = 1
                continue
            if value not in _HEAD_ONLY:
                in_head = 0  # an unclosed <head> ends at the first body element
            if value == "br":
                out.append("\n")
            elif value == "hr":
                out.append(_HTML_RULE)
            elif value in _HTML_BLOCKS:
                out.append("\n")
            elif value in ("td", "th") and out and not out[-1][-1:].isspace():
                out.append(" ")  # an unclosed cell before this one
            if value == "pre":
                pre += 1
            continue
        if value == "head":
            in_head = 0
        elif value in _HTML_BLOCKS:
            out.append("\n")
        elif value in ("td", "th"):
            out.append(" ")
        if value == "pre" and pre:
            pre -= 1
    text = "".join(out)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n[ \t]+", "\n", text)
    text = text.replace("\u00a0", " ")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def parse_bodies(text: str | None, html: str | None, subject: str = "") -> Result:
    """Try the plain-text body first, then the HTML body as text."""
    first = parse(text, subject) if text and text.strip() else None
    if first is not None and first.forwarded is not None:
        return first
    if html and html.strip():
        second = parse(html_to_text(html), subject)
        if second.forwarded is not None or first is None:
            return second
    return first or Result(None, "unrecognised forward format (empty body)")
