"""Text that is safe to send to a terminal: the one place that decides which characters a
document, a file name or an answer may not send raw.

A terminal obeys control characters: ESC (``\\x1b``) and the C1 CSI (``\\x9b``) start its
commands (clear the screen, set the window title, fake a prompt), a newline in a file name
adds a line that looks like the program's own, and the bidi controls reorder what is shown
(a name that reads ``txt.exe`` backwards). Tab and newline are safe in running text, not in
a name.
"""

from __future__ import annotations

import json
import re
from typing import Any

# C0 but tab and newline, DEL, C1, and the bidi embeddings/overrides/isolates
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# what a name may not hold either: tab, newline, and the line/paragraph separators
_UNSAFE_IN_A_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# what ``json.dumps(ensure_ascii=False)`` leaves raw that a terminal would act on (JSON
# escapes C0 itself; these can only occur inside strings, where \\uXXXX means the same)
_RAW_IN_JSON = re.compile(r"[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable(text: str) -> str:
    """Running text (an answer, a passage): every unsafe character as U+FFFD; tab and
    newline stay."""
    return _UNSAFE.sub("\ufffd", text)


def one_line(text: str) -> str:
    """A name (a file, a source's label) on one line: control, separator and bidi
    characters as visible escapes (``\\n``, ``\\x1b``, ``\\u202e``), so the name can
    still be told apart and found."""
    return _UNSAFE_IN_A_NAME.sub(_escape, text)


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps(obj, ensure_ascii=False, **kwargs)`` with DEL, C1, line separators and
    bidi controls escaped as ``\\uXXXX``: the same JSON, readable non-ASCII text, nothing
    a terminal acts on."""
    return _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}",
                            json.dumps(obj, ensure_ascii=False, **kwargs))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
