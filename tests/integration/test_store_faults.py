"""Stores under hostile use (issue 26, cases 1-7): concurrent writers, colliding folder names,
a second embedding model, binary and huge files, invisible characters, killed saves and
read-only Chroma databases.

Each case runs against real stores written by real ``nest index`` processes (or ``ingest``
with the bundled MiniLM where one process is enough). Each test's docstring names its case,
what happened before the fix and what happens now.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nest_core.stores.sources import FaissStore
from nest_core.stores.sources.faiss_store import LOCK_FILE

pytestmark = pytest.mark.integration

NEST = [sys.executable, "-m", "nest_core.app.cli"]
WAIT_S = 300  # a guard against a hang, never a measurement


def write_notes(folder: Path, tag: str, n: int) -> Path:
    """``n`` markdown files with distinct facts (``{tag} fact {i}``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{tag}-{i}.md").write_text(
            f"# {tag} {i}\n\nThe {tag} office number {i} opened in year {1900 + i} and "
            f"serves {i * 7} customers.\n", encoding="utf-8")
    return folder


def nest_index(*args: str) -> subprocess.Popen[str]:
    """A real ``nest index ARGS -q --no-precompute`` process, stderr piped."""
    return subprocess.Popen([*NEST, "index", *args, "-q", "--no-precompute"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def finish(proc: subprocess.Popen[str], seen: str = "") -> str:
    """Wait for ``proc``; it must exit 0. Its whole stderr."""
    assert proc.stderr is not None
    rest = proc.stderr.read()
    code = proc.wait(timeout=WAIT_S)
    err = seen + rest
    assert code == 0, err
    return err


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[tuple[Path, threading.Event]]:
    """The store folder ``tmp_path / "store"`` with its write lock held by this test until
    the yielded event is set (or the test ends)."""
    store = tmp_path / "store"
    store.mkdir()
    fd = os.open(store / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    release = threading.Event()
    released = threading.Thread(target=lambda: (release.wait(), os.close(fd)), daemon=True)
    released.start()
    try:
        yield store, release
    finally:
        release.set()
        released.join()


def wait_for_line(proc: subprocess.Popen[str], needle: str) -> str:
    """Read ``proc``'s stderr until a line holds ``needle`` (it must, before exiting)."""
    assert proc.stderr is not None
    seen = ""
    for line in iter(proc.stderr.readline, ""):
        seen += line
        if needle in line:
            return seen
    pytest.fail(f"the process exited without saying {needle!r}:\n{seen}")


# --- case 1: two indexers into one FAISS store ---------------------------------------------
def test_two_concurrent_index_processes_keep_both_document_sets(tmp_path, held_lock):
    """Case 1. Before: two `nest index` runs into one FAISS store both exited 0 and the last
    writer's copy won (199 of 399 passages gone). Now the second waits for the first's lock
    (and says so) and adds to what it saved. Both processes open the store before either
    writes: the test holds the lock until both are waiting on it."""
    store, release = held_lock
    a = write_notes(tmp_path / "alpha", "alpha", 12)
    b = write_notes(tmp_path / "beta", "beta", 9)
    first, second = nest_index(str(a), "--out", str(store)), nest_index(str(b), "--out", str(store))
    seen = [wait_for_line(p, "waiting for it to finish") for p in (first, second)]
    release.set()
    for proc, err in zip((first, second), seen, strict=True):
        finish(proc, err)
    ids = FaissStore.open(store).ids()
    assert sorted(i.split("/")[0] for i in ids) == ["alpha"] * 12 + ["beta"] * 9
