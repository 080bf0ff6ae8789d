"""The prose doc-QA corpus: the Debian Administrator's Handbook (Debian ``debian-handbook``).

``debian-handbook`` installs the book as HTML, one file per section, under
``/usr/share/doc/debian-handbook/html/en-US``. Each file's running text (paragraphs, list
items, table cells, command listings) is read in order; each block is filed under the
heading it follows; a heading's blocks are packed into passages of about
:data:`PASSAGE_WORDS` words (a block is never split, except one longer than that, which is
cut at sentence ends). A passage's id is ``<file stem>/<n>`` and its title ``<section>:
<heading>``, so a question's gold passages are named by file and heading.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path

from nest_core import Passage

HTML_DIR = Path("/usr/share/doc/debian-handbook/html/en-US")
INSTALL_HINT = "apt-get update && apt-get install -y debian-handbook"
PASSAGE_WORDS = 100
_BLOCKS = {"p", "li", "td", "th", "dt", "dd", "pre", "div"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5"}
_SKIP = {"script", "style", "head"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(])")


@dataclass(frozen=True)
class Block:
    heading: str
    text: str


class _Reader(HTMLParser):
    """Text blocks of one handbook page, each with the heading it follows; the navigation
    bars, banner and index terms are skipped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.heading = ""
        self.buf: list[str] = []
        self.in_heading = False
        self.skip = 0  # depth inside skipped elements
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class") or ""
        if self.skip or tag in _SKIP or "docnav" in cls or dict(attrs).get("id") in (
                "banner", "title"):
            self.skip += tag not in ("br", "img", "meta", "link")
            return
        if tag in _HEADINGS:
            self.flush()
            self.in_heading = True
        elif tag in _BLOCKS:
            self.flush()
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            self.skip -= tag not in ("br", "img", "meta", "link")
            return
        if tag in _HEADINGS and self.in_heading:
            self.heading = " ".join("".join(self.buf).split())
            self.buf, self.in_heading = [], False
        elif tag in _BLOCKS:
            self.flush()
        if tag == "pre":
            self.pre -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.buf.append(data)

    def flush(self) -> None:
        if self.in_heading:
            return
        text = "".join(self.buf)
        text = text.strip() if self.pre else " ".join(text.split())
        if text:
            self.blocks.append(Block(self.heading, text))
        self.buf = []


def require_corpus() -> Path:
    if not (HTML_DIR / "index.html").is_file():
        msg = f"{HTML_DIR} not found; install it: {INSTALL_HINT}"
        raise FileNotFoundError(msg)
    return HTML_DIR


def page_blocks(path: Path) -> list[Block]:
    reader = _Reader()
    reader.feed(path.read_text(encoding="utf-8"))
    reader.flush()
    return reader.blocks


def _pieces(text: str) -> list[str]:
    """A block as pieces of at most about PASSAGE_WORDS words, cut at sentence ends (a
    listing, at line ends)."""
    if len(text.split()) <= PASSAGE_WORDS:
        return [text]
    units, sep = (text.split("\n"), "\n") if "\n" in text else (_SENTENCE_END.split(text), " ")
    out, cur = [], ""
    for unit in units:
        if cur and len((cur + sep + unit).split()) > PASSAGE_WORDS:
            out.append(cur)
            cur = unit
        else:
            cur = f"{cur}{sep}{unit}" if cur else unit
    return [*out, cur] if cur.strip() else out


@lru_cache(maxsize=1)
def load_passages() -> tuple[Passage, ...]:
    """Every section page's text as passages of about :data:`PASSAGE_WORDS` words."""
    require_corpus()
    passages: list[Passage] = []
    for path in sorted(HTML_DIR.glob("*.html")):
        if path.stem == "index":
            continue
        blocks = page_blocks(path)
        section = blocks[0].heading if blocks else path.stem
        groups: list[tuple[str, list[str]]] = []
        for block in blocks:
            if not groups or groups[-1][0] != block.heading:
                groups.append((block.heading, []))
            groups[-1][1].extend(_pieces(block.text))
        n = 0
        for heading, texts in groups:
            cur: list[str] = []
            for text in [*texts, None]:
                if text is None or (cur and len(" ".join([*cur, text]).split())
                                    > PASSAGE_WORDS):
                    if cur:
                        title = section if heading == section else f"{section}: {heading}"
                        body = "\n".join(cur)
                        passages.append(Passage(
                            id=f"{path.stem}/{n}", text=body, title=title,
                            metadata={"source": path.name, "heading": heading,
                                      "sha": hashlib.sha1(body.encode()).hexdigest()[:12]}))
                        n += 1
                    cur = []
                if text is not None:
                    cur.append(text)
    return tuple(passages)
