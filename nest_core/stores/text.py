"""What ingest does to a document's text before chunking: invisible characters removed
(their offsets mapped back to the document), binary-looking text refused.

Zero-width characters (U+200B-U+200D, U+2060, U+FEFF) and bidirectional controls
(U+202A-U+202E, U+2066-U+2069) are removed: inside ``"1\u200b5"`` they split one number into
two tokens for the LM (the answer read "1[1]000 dollars"), and bidi controls make a printed
citation read in another order than it is stored. A stored passage is the *cleaned* text;
its ``start``/``end`` metadata stay offsets into the document as given, so
``clean(document.text[start:end]) == passage.text``.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff\u202a-\u202e\u2066-\u2069]+")
# C0 controls a text file does not hold (tab, newline, form feed and carriage return aside)
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
BINARY_SAMPLE = 65536  # characters of a document looked at for control characters
BINARY_CONTROL_SHARE = 0.05  # more control characters than this share: binary-looking


@dataclass(frozen=True)
class CleanText:
    """``text`` with invisible characters removed, and how to map its offsets back."""

    text: str
    _clean_starts: tuple[int, ...] = ()  # where each kept run begins in ``text``
    _orig_starts: tuple[int, ...] = ()  # ... and in the original

    def original(self, offset: int) -> int:
        """The offset in the original text of the character at ``offset`` of :attr:`text`
        (``len(text)`` maps past the original's last kept character)."""
        if not self._clean_starts:
            return offset
        run = bisect.bisect_right(self._clean_starts, offset) - 1
        return self._orig_starts[run] + offset - self._clean_starts[run]

    def original_end(self, end: int) -> int:
        """The original offset just past the character before ``end`` (an exclusive end)."""
        return self.original(end - 1) + 1 if end > 0 else self.original(0)


def strip_invisible(text: str) -> CleanText:
    """``text`` without zero-width and bidi control characters, offsets mapped."""
    if not INVISIBLE.search(text):
        return CleanText(text)
    parts: list[str] = []
    clean_starts, orig_starts = [0], [0]
    length = 0
    last = 0
    for m in INVISIBLE.finditer(text):
        parts.append(text[last:m.start()])
        length += m.start() - last
        last = m.end()
        clean_starts.append(length)
        orig_starts.append(last)
    parts.append(text[last:])
    return CleanText("".join(parts), tuple(clean_starts), tuple(orig_starts))


def binary_reason(text: str) -> str | None:
    """Why ``text`` looks like binary data rather than a document (``None``: it does not):
    any NUL character, or many control characters in its first :data:`BINARY_SAMPLE`."""
    nul = text.find("\x00")
    if nul >= 0:
        return f"it holds NUL characters (the first at character {nul}): binary data, not text"
    sample = text[:BINARY_SAMPLE]
    controls = len(_CONTROL.findall(sample))
    if sample and controls / len(sample) > BINARY_CONTROL_SHARE:
        return (f"{controls} of its first {len(sample)} characters are control characters: "
                f"binary data, not text")
    return None
