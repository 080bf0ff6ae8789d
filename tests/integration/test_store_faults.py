"""Stores under hostile use (issue 26, cases 1-7): concurrent writers, colliding folder names,
a second embedding model, binary and huge files, invisible characters, killed saves and
read-only Chroma databases.

Each case runs against real stores written by real ``nest index`` processes (or ``ingest``
with the bundled MiniLM where one process is enough). Each test's docstring names its case,
what happened before the fix and what happens now.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nest_core.app.cli import main
from nest_core.stores.ingest import MARKER_FILE, MAX_PASSAGE_CHARS
from nest_core.stores.roots import ROOTS_FILE
from nest_core.stores.sources import FaissSource, FaissStore
from nest_core.stores.sources.faiss_store import LOCK_FILE, SIDECAR_FILE

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


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` but the lock files and the folder record (the folders named
    are recorded before the store is opened): sha256 of its bytes."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*"))
            if f.is_file() and not f.name.endswith(".lock") and f.name != ROOTS_FILE}


def run_index(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``nest index ARGS -q --no-precompute`` in this process (MiniLM loads once); its
    stderr. It must succeed."""
    code = main(["index", *args, "-q", "--no-precompute"])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def stored_texts(store: Path) -> dict[str, str]:
    """``{document id: its passages' text}`` of the FAISS or Chroma store at ``store``."""
    from nest_core.stores.sources import open_store

    docs: dict[str, str] = {}
    for p in open_store(store).passages():
        doc = str(p.metadata["doc_id"])
        docs[doc] = docs.get(doc, "") + p.text
    return docs


# --- case 2: ids that cannot collide ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_two_folders_of_the_same_name_keep_their_own_files(tmp_path, capsys, kind):
    """Case 2. Before: indexing x/notes and then y/notes into one store keyed both by
    ``notes/``: y's plan.md replaced x's, and x's extra.md was deleted ("1 removed"). Now
    the store records each folder it indexed, and the second ``notes`` gets its own prefix."""
    x, y = tmp_path / "x" / "notes", tmp_path / "y" / "notes"
    x.mkdir(parents=True)
    y.mkdir(parents=True)
    (x / "plan.md").write_text("The x plan moves the office to Brno in May.\n", "utf-8")
    (x / "extra.md").write_text("The x extra budget is 40 thousand crowns.\n", "utf-8")
    (y / "plan.md").write_text("The y plan hires two engineers in June.\n", "utf-8")
    store = tmp_path / "store"
    run_index(capsys, str(x), "--out", str(store), "--store", kind)
    err = run_index(capsys, str(y), "--out", str(store), "--store", kind)
    assert "0 removed" in err
    texts = sorted(stored_texts(store).values())
    assert texts == sorted(["The x plan moves the office to Brno in May.",
                            "The x extra budget is 40 thousand crowns.",
                            "The y plan hires two engineers in June."])
    # re-indexing x after a file is deleted still removes that file, and only it
    (x / "extra.md").unlink()
    assert "1 removed" in run_index(capsys, str(x), "--out", str(store), "--store", kind)
    assert "The x extra budget is 40 thousand crowns." not in stored_texts(store).values()
    assert len(stored_texts(store)) == 2


def test_a_file_named_alone_and_then_with_its_folder_is_stored_once(tmp_path, capsys,
                                                                    monkeypatch):
    """Case 2. Before: ``nest index a.md`` (inside notes) keyed it ``a.md`` and ``nest index
    notes`` keyed it ``notes/a.md``: stored twice, the first copy never updated. Now both
    key it ``notes/a.md`` (relative to the folder the store records), in either order."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("The canteen opens at eight.\n", "utf-8")
    (notes / "b.md").write_text("Parking is free on Fridays.\n", "utf-8")
    store = tmp_path / "store"
    monkeypatch.chdir(notes)
    run_index(capsys, "a.md", "--out", str(store))
    (notes / "a.md").write_text("The canteen opens at nine.\n", "utf-8")
    monkeypatch.chdir(tmp_path)
    run_index(capsys, "notes", "--out", str(store))
    assert stored_texts(store) == {"notes/a.md": "The canteen opens at nine.",
                                   "notes/b.md": "Parking is free on Fridays."}
    (notes / "b.md").write_text("Parking costs 2 euros.\n", "utf-8")
    run_index(capsys, str(notes / "b.md"), "--out", str(store))
    assert stored_texts(store)["notes/b.md"] == "Parking costs 2 euros."
    assert len(stored_texts(store)) == 2


# --- case 4: bounded passages whatever the input ---------------------------------------------
def test_a_nul_file_is_skipped_by_name_and_a_huge_line_is_bounded(tmp_path, capsys):
    """Case 4. Before: a file of NUL bytes became one passage (RSS past 15 GB, a 315 MB
    sidecar line) and a base64 image line one 161,547-token passage. Now the NUL file is
    skipped with a note naming it, and the long line becomes passages of at most
    MAX_PASSAGE_CHARS characters."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "blob.md").write_bytes(b"\x00" * 300_000)
    image = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk" * 4000  # 240 KB
    (folder / "page.md").write_text(f"# Page\n\nLogo: ![logo](data:image/png;base64,{image})\n"
                                    f"The office opens at nine.\n", "utf-8")
    store = tmp_path / "store"
    err = run_index(capsys, str(folder), "--out", str(store))
    assert f"skipped {folder / 'blob.md'}: it holds NUL characters" in err
    passages = FaissStore.open(store).passages()
    assert {p.metadata["doc_id"] for p in passages} == {"docs/page.md"}
    assert max(len(p.text) for p in passages) <= MAX_PASSAGE_CHARS
    assert len(passages) > len(image) // MAX_PASSAGE_CHARS
    assert max(len(line) for line in (store / SIDECAR_FILE).read_text("utf-8").splitlines()) \
        < 4 * MAX_PASSAGE_CHARS


def test_ctrl_c_stops_a_large_index_and_keeps_what_is_done(tmp_path):
    """Case 4. Before: Ctrl-C was ignored while one huge passage was embedded and encoded.
    Now passages are bounded, so a real SIGINT stops `nest index` (exit 130) between
    batches; the store keeps the batches written and is marked incomplete. The signal is
    sent once the run has said its estimate (after its first batch of 1000+ passages)."""
    line = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 520_000  # 18 MB, no space: ~4500 passages
    (tmp_path / "big.md").write_text(line + "\n", "utf-8")
    store = tmp_path / "store"
    # a test run started in the background inherits SIGINT ignored; a user's shell does not
    proc = subprocess.Popen([*NEST, "index", str(tmp_path / "big.md"), "--out", str(store),
                             "--no-precompute"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = wait_for_line(proc, "Ctrl-C keeps what is done")
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    err = seen + proc.stderr.read()
    assert proc.wait(timeout=WAIT_S) == 130, err
    assert "nest: interrupted" in err
    assert (store / MARKER_FILE).is_file()
    kept = FaissStore.open(store)
    assert 0 < len(kept) < len(line) // MAX_PASSAGE_CHARS


# --- case 5: invisible characters ------------------------------------------------------------
def test_zero_width_characters_are_removed_at_index_time(tmp_path, capsys):
    """Case 5. Before: "1\u200b5 dollars per day" was stored as it is, and SmolLM2 answered
    "1[1]000 dollars". Now the stored passage reads "15 dollars per day" and its offsets
    still point into the file."""
    folder = tmp_path / "policy"
    folder.mkdir()
    raw = "Travel\u2066 rules\u2069.\n\nMeals cost 1\u200b5 dollars per day\u200d on trips.\n"
    (folder / "travel.md").write_text(raw, "utf-8")
    store = tmp_path / "store"
    run_index(capsys, str(folder), "--out", str(store))
    (passage,) = FaissStore.open(store).passages()
    assert passage.text == "Travel rules.\n\nMeals cost 15 dollars per day on trips."
    start, end = passage.metadata["start"], passage.metadata["end"]
    assert raw[start:end].replace("\u200b", "").replace("\u200d", "").replace(
        "\u2066", "").replace("\u2069", "") == passage.text
    source = FaissSource.from_path(store)
    assert "15 dollars per day" in source.retrieve("How much are meals per day?", 1)[0].text


# --- case 3: the embedding model identified by its weights -----------------------------------
@pytest.fixture(scope="module")
def other_minilm(tmp_path_factory) -> Path:
    """Other 384-d weights in a folder named all-MiniLM-L6-v2: the bundled model with its
    word embeddings shifted (a fine-tune or another checkpoint looks like this)."""
    import torch
    from safetensors.torch import load_file, save_file

    from nest_core.stores.embeddings import default_embedding_model_dir

    folder = tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2"
    shutil.copytree(default_embedding_model_dir(), folder)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "word_embeddings" in k)
    generator = torch.Generator().manual_seed(0)
    weights[name] = weights[name] + 0.05 * torch.randn(weights[name].shape, generator=generator)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_other_weights_under_the_same_name_are_refused(tmp_path, capsys, other_minilm, kind):
    """Case 3. Before: other 384-d weights in a folder named all-MiniLM-L6-v2 mixed into a
    store without a word, and `nest ask --embedding OTHER` only warned and answered. Now the
    store records a fingerprint of the model's files: indexing into it or asking it with
    other weights fails with an error naming both, and writes nothing."""
    notes = write_notes(tmp_path / "notes", "alpha", 2)
    store = tmp_path / "store"
    run_index(capsys, str(notes), "--out", str(store), "--store", kind)
    before = snapshot(store)
    more = write_notes(tmp_path / "more", "beta", 2)
    code = main(["index", str(more), "--out", str(store), "--store", kind, "-q",
                 "--no-precompute", "--embedding", str(other_minilm)])
    err = capsys.readouterr().err
    assert code == 1
    assert "written with the embedding model 'all-MiniLM-L6-v2' (weights" in err
    assert "Traceback" not in err
    assert snapshot(store) == before
    code = main(["ask", "When did alpha office 1 open?", "--store", str(store),
                 "--embedding", str(other_minilm)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert "not 'all-MiniLM-L6-v2' (weights" in err


# --- case 6: a killed save, a frozen server ----------------------------------------------------
KILLED_SAVE = """
import os, signal, sys
import numpy as np
from nest_core.stores.sources import faiss_store
from nest_core.types import Passage

store = faiss_store.FaissStore.open(sys.argv[1])
faiss = faiss_store._faiss()

def write_then_die(index, path):  # kill -9 halfway through writing the index
    faiss.write_index(index, path)
    os.kill(os.getpid(), signal.SIGKILL)

faiss_store._faiss = lambda: type("F", (), {"write_index": staticmethod(write_then_die)})
with store.writing():
    store.add([Passage("late", "a passage the killed save never finished")],
              np.ones((1, store.dim), dtype=np.float32))
    store.save()
"""


def test_temporary_files_of_a_killed_save_are_removed_on_the_next_open(tmp_path, capsys):
    """Case 6. Before: the temporary files of a FAISS save killed with kill -9 stayed for
    ever (larger than the index). Now opening the store while no writer holds its lock
    removes them; the store reads as it was saved before the killed one."""
    notes = write_notes(tmp_path / "notes", "alpha", 3)
    store = tmp_path / "store"
    run_index(capsys, str(notes), "--out", str(store))
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(store)],
                            capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = list(store.glob(".tmp-*"))
    assert left, "the killed save left no temporary file: the fault was not injected"
    reopened = FaissStore.open(store)
    assert not list(store.glob(".tmp-*"))
    assert sorted(reopened.ids()) == [f"notes/alpha-{i}.md#0" for i in range(3)]


def test_ingest_into_a_frozen_chroma_server_times_out(chroma_server):
    """Case 6. Before: `ingest` into a Chroma server that stopped answering waited for ever
    (retrieval already timed out). Now every call of the ingest gives up after the source's
    timeout with a TimeoutError naming the collection; once the server runs again, the same
    ingest completes."""
    from nest_core.stores.embeddings import HashingEmbeddings
    from nest_core.stores.ingest import Document, ingest, open_chroma_collection
    from nest_core.stores.sources import ChromaSource

    host, port, _, proc = chroma_server
    embed = HashingEmbeddings(32)
    open_chroma_collection(host=host, port=port, name="frozen-ingest", embed=embed)
    source = ChromaSource.from_server(host, port, "frozen-ingest", embed=embed, timeout=2)
    docs = [Document(text="The office opens at nine.", id="hours")]
    os.kill(proc.pid, signal.SIGSTOP)
    watchdog = threading.Timer(WAIT_S, os.kill, (proc.pid, signal.SIGCONT))
    watchdog.start()
    try:
        with pytest.raises(TimeoutError, match="did not answer within 2 s"):
            ingest(docs, source, embed=embed, progress=False)
    finally:
        watchdog.cancel()
        os.kill(proc.pid, signal.SIGCONT)
    assert ingest(docs, source, embed=embed, progress=False).written == 1
    assert [p.id for p in source.retrieve("when does the office open", 1)] == ["hours#0"]


# --- case 7: a read-only Chroma database --------------------------------------------------------
READ_ONLY_QUERY = """
import os, sys
import chromadb  # imported while this process may still read everything
from nest_core.stores.embeddings import HashingEmbeddings
from nest_core.stores.sources import open_store
if os.geteuid() == 0:  # root writes anywhere: query as nobody, for whom the mode bits hold
    os.setgid(65534)
    os.setuid(65534)
source = open_store(sys.argv[1], embed=HashingEmbeddings(32))
print(source.retrieve("when does the office open", 1)[0].text)
"""


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A folder any user may enter (pytest's tmp_path is private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="nest-ro-test-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(folder)


def _others_can_reach(path: Path) -> bool:
    """Whether every folder above ``path`` lets other users through (o+x)."""
    return all(p.stat().st_mode & 0o001 for p in path.resolve().parents)


@pytest.mark.skipif(os.geteuid() == 0 and not _others_can_reach(Path(sys.prefix)),
                    reason="the user nobody cannot reach this checkout's interpreter")
def test_a_read_only_chroma_database_is_queried(public_tmp):
    """Case 7. Before: a Chroma store on a read-only mount failed with "attempt to write a
    readonly database" (FAISS worked). Now it is read from a private copy and answers; the
    database itself is not touched. The store is made read-only with chmod -R a-w and queried
    by a process the mode bits bind (as root, one that drops to the user nobody)."""
    from nest_core.stores.embeddings import HashingEmbeddings
    from nest_core.stores.ingest import Document, ingest, open_chroma_collection

    embed = HashingEmbeddings(32)
    db = public_tmp / "db"
    ingest([Document(text="The office opens at nine.", id="hours"),
            Document(text="Parking is free on Fridays.", id="parking")],
           open_chroma_collection(db, embed=embed), embed=embed, progress=False)
    for path in [db, *db.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = snapshot(db)
    env = {**os.environ, "HOME": str(public_tmp), "NEST_CACHE_DIR": str(public_tmp / "cache"),
           "TMPDIR": "/tmp"}
    # cwd "/": the user nobody may not read a clone under a private temporary directory
    # (chromadb's settings look for ./.env there)
    query = subprocess.run([sys.executable, "-c", READ_ONLY_QUERY, str(db)], env=env, cwd="/",
                           capture_output=True, text=True, check=False, timeout=WAIT_S)
    assert query.returncode == 0, query.stderr
    assert query.stdout.strip() == "The office opens at nine."
    assert snapshot(db) == before
