"""The folders a store's files were indexed from, recorded in the store, so passage ids of
files cannot collide across folders of the same name.

``nest index`` keys a file's passages by ``"{root}/{path inside root}"``: ``root`` is the id
prefix of the deepest recorded folder holding the file. A folder indexed for the first time
is recorded under its name (``notes``), or, when another folder already holds that name,
under ``notes~<hash of its absolute path>``; a file named alone records its parent folder.
So ``x/notes`` and ``y/notes`` never share ids, and ``a.md`` indexed by name from inside
``notes`` gets the id ``notes/a.md`` that indexing the folder ``notes`` gives it.

The record is ``nest_roots.json`` in the store folder (``{"roots": {prefix: path}}``),
written atomically under ``nest_roots.lock``, so concurrent indexers record both roots.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nest_core.stores.locking import exclusive_lock

ROOTS_FILE, ROOTS_LOCK = "nest_roots.json", "nest_roots.lock"


@dataclass
class StoreRoots:
    """``{id prefix: absolute folder}`` of one store."""

    roots: dict[str, str] = field(default_factory=dict)

    def add_folder(self, folder: Path) -> None:
        """Record ``folder`` (absolute, resolved) unless a recorded root already holds it."""
        if self._root_of(folder) is not None:
            return
        prefix = folder.name or "root"
        if prefix in self.roots:
            digest = hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:8]
            prefix = f"{prefix}~{digest}"
        self.roots[prefix] = str(folder)

    def doc_id(self, file: Path) -> str:
        """The id of ``file`` (absolute): its path inside the deepest recorded root."""
        found = self._root_of(file.parent)
        if found is None:
            msg = f"{file} is under no recorded root; call add_folder(its folder) first"
            raise ValueError(msg)
        prefix, root = found
        return f"{prefix}/{file.relative_to(root).as_posix()}"

    def complete_prefixes(self, folder: Path) -> list[str]:
        """Id prefixes of everything under ``folder`` (absolute): what indexing it whole
        covers, so stored files missing from it were deleted."""
        found = self._root_of(folder)
        if found is None:
            return []
        prefix, root = found
        inside = folder.relative_to(root).as_posix()
        own = f"{prefix}/" if inside == "." else f"{prefix}/{inside}/"
        nested = [f"{p}/" for p, r in self.roots.items()
                  if Path(r) != folder and Path(r).is_relative_to(folder)]
        return [own, *sorted(nested)]

    def _root_of(self, path: Path) -> tuple[str, Path] | None:
        """The deepest recorded root holding ``path`` (or equal to it)."""
        holding = [(p, Path(r)) for p, r in self.roots.items() if path.is_relative_to(r)]
        return max(holding, key=lambda pr: len(pr[1].parts), default=None)


def remove_if_only_roots(store: Path) -> None:
    """Remove ``store`` when it holds nothing but the folder record (an index that failed
    before writing anything must not leave a store behind)."""
    try:
        names = {p.name for p in store.iterdir()}
    except OSError:
        return
    if names <= {ROOTS_FILE, ROOTS_LOCK, f".{ROOTS_FILE}.tmp"}:
        for name in names:
            (store / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            store.rmdir()


def absolute(path: Path) -> Path:
    """``path`` absolute, its folder resolved (symlinked folders on the way followed) but a
    symlinked file kept where it is linked, as the folder walk sees it."""
    path = path.expanduser()
    return path.parent.resolve() / path.name


@contextlib.contextmanager
def recorded_roots(store: Path) -> Iterator[StoreRoots]:
    """The roots recorded in ``store``, written back (atomically, under a lock) on exit."""
    store.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(store / ROOTS_LOCK, f"the folder record of {store}"):
        file = store / ROOTS_FILE
        raw = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        roots = StoreRoots(dict(raw.get("roots", {})))
        before = dict(roots.roots)
        yield roots
        if roots.roots != before:
            tmp = store / f".{ROOTS_FILE}.tmp"
            tmp.write_text(json.dumps({"roots": roots.roots}, indent=2), encoding="utf-8")
            os.replace(tmp, file)


def assign_ids(store: Path, files: Sequence[tuple[Path, str]], folders: Sequence[Path]
               ) -> tuple[list[tuple[Path, str]], list[str]]:
    """``files`` (as :func:`nest_core.app.files.collect_files` lists them) with ids relative
    to ``store``'s recorded roots, recording ``folders`` (indexed whole) and the folders of
    files named alone; and the id prefixes the folders cover completely."""
    folders = [f.expanduser().resolve() for f in folders]
    with recorded_roots(store) as roots:
        for folder in folders:
            roots.add_folder(folder)
        for path, _ in files:
            roots.add_folder(absolute(path).parent)
        ided: dict[str, Path] = {}
        for path, _ in files:  # a file named and inside a folder named is indexed once
            ided.setdefault(roots.doc_id(absolute(path)), path)
        prefixes = sorted({p for f in folders for p in roots.complete_prefixes(f)})
    return [(path, doc_id) for doc_id, path in ided.items()], prefixes
