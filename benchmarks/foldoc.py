"""The benchmark corpus: the Free On-line Dictionary of Computing, as Debian ships it.

``dict-foldoc`` installs a dictd database: ``foldoc.index`` (headword, base64 offset, base64
length per line) and ``foldoc.dict.dz`` (dictzip, readable as plain gzip). Several index
headwords point at one entry (aliases, lower-cased); the entry text itself starts with its
header lines (e.g. ``Basic Input/Output System / BIOS / ROM BIOS``), then a blank line and
the indented body. We keep the body as prose: cross-reference braces removed, the trailing
date and source lines dropped, whitespace collapsed. Nobody on this project wrote this text,
which is the point of using it.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nest_core import Passage

DICT_DIR = Path("/usr/share/dictd")
DICT_FILE = DICT_DIR / "foldoc.dict.dz"
INDEX_FILE = DICT_DIR / "foldoc.index"
INSTALL_HINT = "apt-get update && apt-get install -y dict-foldoc"
PASSAGE_WORDS = 100  # the paper's corpus uses 100-word passages with titles

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_LINK_URL = re.compile(r"\{([^{}]*?)\s*\((?:https?|ftp|mailto|news|file)?[^(){}]*\)\}")
_LINK = re.compile(r"\{([^{}]*)\}")
_DATE_LINE = re.compile(r"^\(\d{4}-\d{2}-\d{2}\)$")
_SOURCE_LINE = re.compile(r"^\[.*\]$")
_SPACE = re.compile(r"\s+")
_CATEGORY = re.compile(r"^((?:\d+\.\s+)?)<[^<>]*>\s*")  # "1. <programming> ..." -> "1. ..."


@dataclass(frozen=True)
class Entry:
    """One dictionary entry: header lines (headword first) and the cleaned body paragraphs."""

    headwords: tuple[str, ...]
    paragraphs: tuple[str, ...]

    @property
    def headword(self) -> str:
        return self.headwords[0]

    @property
    def body(self) -> str:
        return " ".join(self.paragraphs)

    @property
    def words(self) -> list[str]:
        return self.body.split()


def require_corpus() -> None:
    """Fail with the exact install command when the dictd files are missing."""
    missing = [str(p) for p in (DICT_FILE, INDEX_FILE) if not p.is_file()]
    if missing:
        msg = f"FOLDOC corpus not found ({', '.join(missing)}); install it with: {INSTALL_HINT}"
        raise FileNotFoundError(msg)


def _b64(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def clean_line(line: str) -> str:
    """Cross-references ``{text}`` and ``{text (url)}`` become ``text``."""
    line = _LINK_URL.sub(lambda m: m.group(1), line)
    prev = None
    while prev != line:  # nested braces, innermost first
        prev, line = line, _LINK.sub(lambda m: m.group(1), line)
    return line.replace("{", "").replace("}", "")


def parse_entry(raw: str) -> Entry | None:
    """Header lines up to the first blank line, then indented body paragraphs."""
    lines = raw.replace("\t", " ").split("\n")
    head: list[str] = []
    i = 0
    while i < len(lines) and lines[i].strip():
        head.append(lines[i].strip())
        i += 1
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines[i:], ""]:
        text = line.strip()
        if not text:
            if current:
                paragraphs.append(_SPACE.sub(" ", " ".join(current)).strip())
                current = []
            continue
        if _DATE_LINE.match(text) or (_SOURCE_LINE.match(text) and not current):
            continue
        current.append(clean_line(text))
    # Category tags ("<language>") are markup, not prose; a lone "." is a formatting leftover.
    paragraphs = [_CATEGORY.sub(r"\1", p) for p in paragraphs]
    paragraphs = [p for p in paragraphs if p.strip(" .")]
    if not head or not paragraphs:
        return None
    return Entry(headwords=tuple(head), paragraphs=tuple(paragraphs))


@lru_cache(maxsize=1)
def load_entries() -> tuple[Entry, ...]:
    """Every entry once (aliases share an entry), in file order, database notes skipped."""
    require_corpus()
    with gzip.open(DICT_FILE, "rb") as fh:
        data = fh.read()
    spans: set[tuple[int, int]] = set()
    for line in INDEX_FILE.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-database"):
            continue
        spans.add((_b64(parts[1]), _b64(parts[2])))
    entries = []
    for offset, length in sorted(spans):
        raw = data[offset:offset + length].decode("utf-8", errors="replace")
        entry = parse_entry(raw)
        if entry is not None:
            entries.append(entry)
    return tuple(entries)


def chunk_entry(entry: Entry, index: int, max_words: int = PASSAGE_WORDS) -> list[Passage]:
    """~``max_words``-word passages titled by the headword; paragraphs are packed greedily
    and a long paragraph is cut at word boundaries, so chunks never exceed ``max_words``."""
    pieces: list[list[str]] = []
    current: list[str] = []
    for para in entry.paragraphs:
        words = para.split()
        if current and len(current) + len(words) > max_words:
            pieces.append(current)
            current = []
        while len(words) > max_words:
            pieces.append(words[:max_words])
            words = words[max_words:]
        current = [*current, *words]
    if current:
        pieces.append(current)
    return [Passage(id=f"foldoc-{index}-{k}", text=" ".join(words), title=entry.headword,
                    metadata={"entry": index, "chunk": k, "source": "foldoc"})
            for k, words in enumerate(pieces)]


@lru_cache(maxsize=1)
def load_passages() -> tuple[Passage, ...]:
    """All FOLDOC passages, ids ``foldoc-<entry>-<chunk>`` (stable for a given dict file)."""
    return tuple(p for i, e in enumerate(load_entries()) for p in chunk_entry(e, i))
