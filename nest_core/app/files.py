"""What the ``nest`` command reads: files -> documents for ``nest index`` (discovery,
supported types, titles, PDF text), and the checks of its arguments.

Kept apart from the command plumbing in :mod:`nest_core.app.cli`; every failure is a
:class:`CliError` (or an argparse usage error) whose message names the value and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nest_core.app.safe_text import one_line

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
PDF_SUFFIX = ".pdf"
PDF_INSTALL_HINT = "pip install pypdf"
MAX_K = 200  # the paper retrieves 40; 200 passages are minutes of encoding on a CPU
MAX_NEW_TOKENS = 8192  # checked before anything loads; the model's context is checked after


class CliError(Exception):
    """An expected failure: printed as one line on stderr, exit code 1, no traceback."""


def collect_files(paths: Sequence[str]) -> list[tuple[Path, str]]:
    """``(file, id)`` for every supported file under ``paths``; ids are relative to the
    folder given, so re-indexing from another directory keeps the same passage ids.

    A named file of an unsupported type is an error; inside folders such files are skipped
    with a note, because folders of notes usually hold images and the like too.
    """
    found: list[tuple[Path, str]] = []
    skipped: list[Path] = []
    outside: list[Path] = []
    linked: list[Path] = []
    unreadable: list[str] = []
    for raw in paths:
        if not raw.strip():
            msg = "an empty path was given; name a file or folder (use . for this folder)"
            raise CliError(msg)
        path = Path(raw).expanduser()
        if not path.exists():
            msg = f"{raw}: no such file or folder; check the path"
            raise CliError(msg)
        if path.is_file():
            if not _supported(path):
                msg = (f"{raw}: unsupported file type {path.suffix or '(none)'!r}; nest index "
                       f"reads {_supported_list()} files (convert others to text first)")
                raise CliError(msg)
            found.append((path, path.name))
            continue
        root = path.resolve()  # "." and the folder's path give the same ids
        files, folders_linked, folders_unread = _folder_files(path)
        linked += folders_linked
        unreadable += folders_unread
        # a symlink to a file outside the folder would index (and cite) that file's path
        outside += [p for p in files if not p.resolve().is_relative_to(root)]
        files = [p for p in files if p.resolve().is_relative_to(root)]
        if not files:
            msg = f"{raw}: the folder is empty; put {_supported_list()} files in it"
            raise CliError(msg)
        ok = [p for p in files if _supported(p)]
        skipped += [p for p in files if not _supported(p)]
        if not ok:
            kinds = sorted({p.suffix or "(none)" for p in files})
            msg = (f"{raw}: no supported files (found {', '.join(kinds)}); nest index reads "
                   f"{_supported_list()} files")
            raise CliError(msg)
        found += [(p, f"{root.name}/{p.relative_to(path).as_posix()}") for p in ok]
    for items, what in ((outside, "symlink(s) to files outside the folder"),
                        (linked, ("symlinked folder(s), not followed (index their targets "
                                  "by name if you want them)")),
                        (unreadable, "folder(s) that could not be read (no permission?)"),
                        (skipped, "unsupported file(s)")):
        if items:
            names = ", ".join(str(p) for p in items[:3]) + (" ..." if len(items) > 3 else "")
            _note(f"skipped {len(items)} {what}: {names}")
    return found


def _folder_files(path: Path) -> tuple[list[Path], list[Path], list[str]]:
    """The files under ``path`` (hidden names skipped), the symlinked folders inside it (not
    followed: they may leave the folder or loop back into it) and the subfolders that could
    not be listed; the walk never stops at a bad subfolder."""
    files: list[Path] = []
    linked: list[Path] = []
    unreadable: list[str] = []
    for dirpath, dirnames, filenames in os.walk(path, onerror=lambda e: unreadable.append(
            str(e.filename))):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        linked += [here / d for d in dirnames if (here / d).is_symlink()]
        files += [here / f for f in filenames
                  if not f.startswith(".") and (here / f).is_file()]
    return sorted(files), linked, unreadable


def read_documents(files: Sequence[tuple[Path, str]]) -> list[Any]:
    """Files as :class:`~nest_core.stores.ingest.Document` (title: a leading markdown heading, else
    the file name); empty files, and files that cannot be read (not UTF-8, a damaged PDF, no
    permission), are skipped with a note saying why: one bad file never aborts a folder."""
    from nest_core.stores.ingest import Document

    docs = []
    unreadable = 0
    for path, doc_id in files:
        try:
            text = _read_pdf(path) if path.suffix.lower() == PDF_SUFFIX else _read_text(path)
        except CliError as err:
            _note(f"skipped {err}")
            unreadable += 1
            continue
        except OSError as err:
            _note(f"skipped {path}: {err.strerror or err}")
            unreadable += 1
            continue
        if not text.strip():
            _note(f"skipped empty file {path}")
            continue
        title, body = split_title(text, path)
        docs.append(Document(text=body, title=title, id=doc_id,
                             metadata={"source": _display_path(path)}))
    if not docs:
        msg = (f"no text to index: {unreadable} file(s) could not be read, the rest are empty"
               if unreadable else "every file is empty: there is no text to index")
        raise CliError(msg)
    if unreadable:
        _note(f"skipped {unreadable} file(s) that could not be read (see above)")
    return docs


def _display_path(path: Path) -> str:
    """Relative to the working directory when inside it (shorter citations), else absolute."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(resolved)


def _supported(path: Path) -> bool:
    return path.suffix.lower() in (*TEXT_SUFFIXES, PDF_SUFFIX)


def _supported_list() -> str:
    return "/".join(s.lstrip(".") for s in (*TEXT_SUFFIXES, PDF_SUFFIX))


def _read_text(path: Path) -> str:
    from nest_core.stores.text import binary_reason

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        msg = f"{path}: not UTF-8 text ({err.reason}); save it as UTF-8 or leave it out"
        raise CliError(msg) from err
    reason = binary_reason(text)  # NUL bytes are valid UTF-8, and one file of them is no text
    if reason:
        msg = f"{path}: {reason}; leave it out or convert it to text"
        raise CliError(msg)
    return text


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError as err:
        msg = f"{path}: reading PDF needs pypdf: `{PDF_INSTALL_HINT}` (or convert it to text)"
        raise CliError(msg) from err
    try:
        pages = [page.extract_text() or "" for page in PdfReader(str(path)).pages]
    except Exception as err:  # pypdf raises many types for damaged files
        msg = f"{path}: cannot read this PDF ({err}); convert it to text first"
        raise CliError(msg) from err
    return "\n\n".join(p.strip() for p in pages if p.strip())


def split_title(text: str, path: Path) -> tuple[str, str]:
    """``(title, body)``: a leading markdown ``# heading`` becomes the title and leaves the
    body (every passage is already read as ``"{title}\n{text}"``, so keeping the heading in
    the text would repeat it in the first passage and in its citations); otherwise the file
    name is the title and the text is kept whole."""
    stripped = text.lstrip()
    first, _, rest = stripped.partition("\n")
    if first.startswith("# ") and rest.strip():
        return first[2:].strip(), rest.strip("\n")
    return path.stem.replace("_", " ").replace("-", " "), text


def _note(message: str) -> None:
    """One line on stderr; a file name's control characters are escaped (a name holding
    ESC would otherwise send the terminal a command, one holding a newline a fake line)."""
    print(one_line(message), file=sys.stderr, flush=True)


# --- arguments -------------------------------------------------------------------------------
def store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", metavar="NAME",
                   help="the Chroma collection (default: nest, else the only one there is)")
    p.add_argument("--embedding", metavar="NAME_OR_DIR",
                   help="the sentence-transformers model the store was built with: a folder "
                   "or a name in the local Hugging Face cache (default: all-MiniLM-L6-v2)")
    p.add_argument("--allow-dangerous-deserialization", action="store_true",
                   help="open a LangChain FAISS.save_local store, whose docstore is a pickle "
                   "(unpickling can run code: only for stores you trust)")


def color_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour cited spans: copied [n] bold, matched [~n] underlined "
                   "(auto: on a terminal unless NO_COLOR is set)")


def dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="model weights' dtype (default float32; bfloat16 halves the memory)")


def check_writable(path: Path) -> None:
    """Fail before generating when the answer could not be written to ``path``."""
    existed = path.exists()
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as err:
        msg = f"cannot write --html {path}: {err.strerror or err}; choose another path"
        raise CliError(msg) from err
    if not existed:
        path.unlink()


def new_tokens(text: str) -> int:
    value = positive(text)
    if value > MAX_NEW_TOKENS:
        msg = f"--max-new-tokens {value} is too many; use at most {MAX_NEW_TOKENS}"
        raise argparse.ArgumentTypeError(msg)
    return value


def passage_count(text: str) -> int:
    """``--k``: every retrieved passage is read by the LM, so thousands would take hours."""
    value = positive(text)
    if value > MAX_K:
        msg = (f"--k {value} is too many: each passage is encoded by the language model "
               f"(about 1 s each on a CPU); use at most {MAX_K}")
        raise argparse.ArgumentTypeError(msg)
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"{text!r} is not a positive integer"
        raise argparse.ArgumentTypeError(msg)
    return value
