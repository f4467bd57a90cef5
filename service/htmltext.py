"""HTML to the text a mail client shows: visible text, block elements as lines, link targets."""

from __future__ import annotations

import re
import warnings

from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning
from bs4.element import CData, NavigableString, PageElement, Tag

# Mail text that looks like a URL or a file name is still mail text.
warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning)

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


_BLOCKS = frozenset(_BLOCK_TAGS)
_CELLS = frozenset({"td", "th"})
_REMOVED = frozenset({"script", "style", "head", "meta"})  # with everything inside them
_SPACE = re.compile(r"\s+")
_TEXT_TYPES = (NavigableString, CData)  # exactly these: not comments, doctypes, scripts' text
_LINK = re.compile(r"(https?://|ftp://|www\.)\S", re.IGNORECASE)


class _Close:
    """The end of an element, met after its contents; `start` counts the strings before them."""

    __slots__ = ("start", "tag")

    def __init__(self, tag: Tag, start: int) -> None:
        self.tag, self.start = tag, start


def html_to_text(html: str) -> str:
    """Visible text of an HTML document, parsed by lxml through BeautifulSoup.

    Block elements end a line; inline elements (b, i, a, font, span) join their neighbours, so
    "Buy <i>now</i>" reads "Buy now" as a client would send it. Scripts, styles and comments go.
    A link keeps its target after its text, "text <http://...>", and an image reads "[image: alt]",
    as mail clients render HTML to plain text: where a message points and that it is pictures are
    part of what a reader sees.
    """
    # One walk over the parsed tree, with no edits to it: inserting a string beside each of n
    # siblings costs O(n) apiece in BeautifulSoup, so a page of many paragraphs took minutes.
    soup = BeautifulSoup(html, "lxml")
    out: list[str] = []
    strings: list[str] = []  # the document's own text so far: what a link's text is made of
    stack: list[PageElement | _Close] = list(reversed(soup.contents))
    while stack:
        node = stack.pop()
        if isinstance(node, _Close):
            out.extend(_after(node.tag, strings, node.start))
        elif isinstance(node, Tag):
            if node.name in _REMOVED:
                continue
            if node.name == "img":
                alt = " ".join(str(node.get("alt") or "").split())
                out.append(f"[image: {alt}]" if alt else "[image]")
                continue
            stack.append(_Close(node, len(strings)))
            stack.extend(reversed(node.contents))
        elif type(node) in _TEXT_TYPES:
            text = str(node)
            # Whitespace inside HTML text renders as one space (outside <pre>), as a browser shows it.
            parent = node.parent
            if type(node) is NavigableString and parent is not None and parent.name != "pre":
                text = _SPACE.sub(" ", text)
            out.append(text)
            strings.append(text)
    return "".join(out)


def _after(tag: Tag, strings: list[str], start: int) -> list[str]:
    """What follows an element's contents: a link's target, a line end, a cell's space."""
    after = []
    href = tag.get("href") if tag.name == "a" else None
    if href is not None:
        target = str(href).strip()
        if _LINK.match(target) and target not in "".join(strings[start:]):
            after.append(f" <{target}>")
    if tag.name in _BLOCKS:
        after.append("\n")
    elif tag.name in _CELLS:
        after.append(" ")
    return after
