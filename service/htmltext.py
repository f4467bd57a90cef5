"""HTML to the text a mail client shows: visible text, block elements as lines, link targets."""

from __future__ import annotations

import re

_BLOCK_TAGS = [
    "p",
    "div",
    "br",
    "tr",
    "li",
    "ul",
    "ol",
    "table",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "pre",
    "hr",
    "title",
    "center",
    "dd",
    "dt",
    "form",
]


_LINK = re.compile(r"(https?://|ftp://|www\.)\S", re.IGNORECASE)


def html_to_text(html: str) -> str:
    """Visible text of an HTML document, parsed by lxml through BeautifulSoup.

    Block elements end a line; inline elements (b, i, a, font, span) join their neighbours, so
    "Buy <i>now</i>" reads "Buy now" as a client would send it. Scripts, styles and comments go.
    A link keeps its target after its text, "text <http://...>", and an image reads "[image: alt]",
    as mail clients render HTML to plain text: where a message points and that it is pictures are
    part of what a reader sees.
    """
    from bs4 import BeautifulSoup
    from bs4.element import (
        Comment,
        Declaration,
        Doctype,
        NavigableString,
        ProcessingInstruction,
    )

    soup = BeautifulSoup(html, "lxml")
    for tag in soup(["script", "style", "head", "meta"]):
        tag.decompose()
    hidden = (Comment, Doctype, Declaration, ProcessingInstruction)
    for node in soup.find_all(string=lambda s: isinstance(s, hidden)):
        node.extract()
    # Whitespace inside HTML text renders as one space (outside <pre>), as a browser shows it.
    for node in soup.find_all(string=True):
        if type(node) is NavigableString and node.parent is not None and node.parent.name != "pre":
            node.replace_with(re.sub(r"\s+", " ", str(node)))
    for a in soup.find_all("a", href=True):
        href = str(a["href"]).strip()
        if _LINK.match(href) and href not in a.get_text():
            a.append(f" <{href}>")
    for img in soup.find_all("img"):
        alt = " ".join(str(img.get("alt") or "").split())
        img.replace_with(f"[image: {alt}]" if alt else "[image]")
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_after("\n")
    for tag in soup.find_all(["td", "th"]):
        tag.insert_after(" ")
    return soup.get_text()
