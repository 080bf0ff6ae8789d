"""Fault injection (issue 14): the twelve ways a store or an index run went wrong for a new
user or an operator, each reproduced on real stores and checked against what a careful user
expects.

The stores are real: FAISS folders and Chroma databases written by ``nest index`` (run
in-process through :func:`nest_core.app.cli.main`, so SmolLM2 and MiniLM load once for the
module), and a real ``chroma run`` server on loopback. Faults are injected where they happen
to users: a store mounted read-only, weights changed deep in the model, a file deleted, a
second embedding model, links out of a folder, escape sequences in a document, Ctrl-C (a real
SIGINT), a frozen server (SIGSTOP), absurd arguments, a file that is not UTF-8.

Each test's docstring names its case and says what happened before the fix and what happens
now. Unit tests that pin the functions behind these cases stay beside those functions
(``test_datastore``, ``test_ingest``, ``test_cli_units``, ``test_sources``, ``test_render``);
the one case-12 check that converts the model afresh (``-q`` hides the conversion bar, about
a minute on a CPU) stays in ``test_cli``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nest_core.app.cli import main
from nest_core.stores.ingest import Document, ingest, open_chroma_collection, unfinished
from nest_core.stores.sources import ChromaSource, open_store
from tests.integration.test_cli import FACT, POLICY, QUESTION
from tests.integration.test_cli import HANDBOOK as HISTORY

pytestmark = pytest.mark.integration

# C0 and C1 control characters but tab and newline: what a terminal may execute
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``nest ARGS`` in this process: (exit code, stdout, stderr), never a traceback."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def index(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``nest index ARGS`` that must succeed; its stderr."""
    code, _, err = run_main(capsys, "index", *args)
    assert code == 0, err
    return err


def build(*args: str) -> None:
    """``nest index ARGS`` for a module fixture (no capsys there)."""
    assert main(["index", *args]) == 0


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: (mtime in ns, sha256 of its bytes)."""
    return {str(f.relative_to(root)): (f.stat().st_mtime_ns,
                                        hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(root.rglob("*")) if f.is_file()}


def passage_ids(store: Path) -> list[str]:
    return sorted(p.id for p in open_store(store).passages())


def files(folder: Path, count: int) -> Path:
    """``count`` one-sentence files (one passage each) in ``folder``."""
    folder.mkdir()
    for i in range(count):
        (folder / f"widget-{i:03d}.md").write_text(
            f"Widget {i} of the Zephyr catalogue is painted blue and weighs {100 + i} grams.",
            encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "handbook"
    root.mkdir()
    (root / "history.md").write_text(HISTORY, encoding="utf-8")
    (root / "policy.txt").write_text(POLICY, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def faiss_store(corpus: Path, tmp_path_factory: pytest.TempPathFactory, smollm: Any) -> Path:
    """``nest index`` of the corpus: a FAISS store with its span datastore precomputed."""
    out = tmp_path_factory.mktemp("stores") / "faiss"
    build(str(corpus), "--out", str(out), "-q")
    return out


@pytest.fixture(scope="module")
def chroma_store(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "chroma"
    build(str(corpus), "--store", "chroma", "--out", str(out), "--no-precompute", "-q")
    return out


# --- case 1: read-only stores ----------------------------------------------------------------
_READ_ONLY: list[str] = []  # folders under which the audit hook refuses every write
_HOOKED: list[bool] = []
_WRITES = ("os.utime", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod",
           "os.truncate", "os.link", "os.symlink", "os.chown")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _refuse_writes(event: str, args: tuple[Any, ...]) -> None:
    if not _READ_ONLY or not (event in _WRITES or event == "open"):
        return
    if event == "open" and not (isinstance(args[2], int) and args[2] & _WRITE_FLAGS):
        return
    paths = args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(path))
            if any(full == root or full.startswith(root + os.sep) for root in _READ_ONLY):
                raise OSError(errno.EROFS, "Read-only file system", full)


@contextlib.contextmanager
def read_only(root: Path) -> Iterator[None]:
    """``root`` as a read-only mount behaves: every write under it (open for writing,
    mtime, rename, remove, mkdir, chmod) fails with EROFS, raised from an audit hook at the
    call itself. Permissions are dropped too, which binds everyone but root."""
    if not _HOOKED:
        sys.addaudithook(_refuse_writes)  # hooks cannot be removed: it checks _READ_ONLY
        _HOOKED.append(True)
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    _READ_ONLY.append(os.path.abspath(root))
    try:
        yield
    finally:
        _READ_ONLY.remove(os.path.abspath(root))
        for p, mode in modes.items():
            p.chmod(mode)


def test_case_01_a_read_only_store_is_served(faiss_store: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Case 1, read-only store. Before: `nest ask` failed outright on a complete store it
    could not write, because every span-file hit touched the file's mtime and only a missing
    file was forgiven. After: it answers from the store's span files, and nothing in the
    store is written."""
    store = tmp_path / "store"
    shutil.copytree(faiss_store, store)
    before = snapshot(store)
    with read_only(store):
        code, out, err = run_main(capsys, "ask", QUESTION, "--store", str(store), "--json",
                                  "--max-new-tokens", "4")
    assert code == 0, err
    assert json.loads(out)["nest"]["passages"]
    assert "not writable" not in caplog.text  # every key came from the store's span files
    assert snapshot(store) == before


@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_case_01_store_files_are_readable_as_the_umask_allows(kind: str, faiss_store: Path,
                                                             chroma_store: Path) -> None:
    """Case 1, a store shared with other users. Before: span files, the FAISS sidecar and
    the header were created 0600 (tempfile.mkstemp), so nobody else could read the store.
    After: every file `nest index` writes is 0o666 & ~umask, as any other file would be."""
    store = faiss_store if kind == "faiss" else chroma_store
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(f.relative_to(store)): oct(f.stat().st_mode & 0o777)
             for f in store.rglob("*") if f.is_file()}
    assert modes
    if kind == "faiss":
        assert any(name.endswith(".span") for name in modes)
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


# --- case 2: model identity --------------------------------------------------------------------
def test_case_02_a_model_changed_deep_in_its_weights_gets_its_own_keys(
        smollm: Any, faiss_store: Path, tmp_path: Path) -> None:
    """Case 2, model identity. Before: the fingerprint hashed the config and the first 4096
    values of the first 4 tensors, so SmolLM2 with `down_proj` of layers 10+ scaled by 1.5
    (another greedy output) was served the original model's keys. After: every weight is
    hashed, so the changed model misses the store's span files and encodes its own keys."""
    from nest_core.app.common import DEFAULT_PRESET, nest_config
    from nest_core.encoding import PassageEncoder
    from nest_core.lm import LanguageModel
    from nest_core.stores.datastore import SpanDatastore

    changed = copy.deepcopy(smollm.model)  # the session model itself is never touched
    with torch.no_grad():
        for layer in changed.model.layers[10:]:
            layer.mlp.down_proj.weight.mul_(1.5)
    other = LanguageModel(changed, smollm.tokenizer, name=smollm.name)
    assert other.fingerprint != smollm.fingerprint

    store = tmp_path / "store"
    shutil.copytree(faiss_store, store)
    passages = open_store(store).passages()
    config = nest_config(DEFAULT_PRESET, smollm.name)

    def encode(lm: Any) -> tuple[Any, Any]:
        spans = SpanDatastore.for_store(store)
        encoder = PassageEncoder(lm, key_layer=config.key_layer,
                                 max_passage_tokens=config.max_passage_tokens, cache=spans)
        return encoder.encode(passages), spans.stats

    mine, stats = encode(smollm)
    assert (stats.disk_hits, stats.misses) == (len(passages), 0)
    theirs, stats = encode(other)
    assert (stats.disk_hits, stats.misses) == (0, len(passages))
    assert not torch.equal(mine[0].keys, theirs[0].keys.to(mine[0].keys.dtype))


# --- case 3: one store per folder ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_case_03_a_folder_by_another_name_and_a_deleted_file(
        kind: str, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Case 3, duplicates and stale passages. Before: the same folder indexed as `.` and by
    its path was stored twice, a deleted file's passages stayed ("0 removed"), and
    `nest index ""` indexed the current folder. After: ids are the folder's name plus the
    path inside it, so the second run writes nothing; the deleted file's passages are removed
    and counted; an empty path is an error."""
    folder = tmp_path / "handbook"
    shutil.copytree(corpus, folder)
    store = tmp_path / "store"
    options = ("--store", kind, "--out", str(store), "--no-precompute", "-q")
    assert "(2 new, 0 unchanged, 0 removed)" in index(capsys, str(folder), *options)
    monkeypatch.chdir(folder)
    assert "(0 new, 2 unchanged, 0 removed)" in index(capsys, ".", *options)
    assert passage_ids(store) == ["handbook/history.md#0", "handbook/policy.txt#0"]
    (folder / "policy.txt").unlink()
    assert "(0 new, 1 unchanged, 1 removed)" in index(capsys, ".", *options)
    assert passage_ids(store) == ["handbook/history.md#0"]
    code, _, err = run_main(capsys, "index", "", *options)
    assert code == 1
    assert "an empty path was given" in err


# --- case 4: one embedding model per store -------------------------------------------------------
@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_case_04_another_embedding_of_the_same_dimension_is_refused(
        kind: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 4, a second embedding model. Before: `nest index --embedding OTHER` into a store
    built with all-MiniLM-L6-v2 mixed the vectors of two 384-d models without a word (the
    store still named the first). After: refused before anything is written, naming both."""
    from nest_core.stores.embeddings import default_embedding_model_dir

    store = tmp_path / "store"
    options = ("--store", kind, "--out", str(store), "--no-precompute", "-q")
    index(capsys, str(corpus / "history.md"), *options)
    ids, before = passage_ids(store), snapshot(store)
    other = tmp_path / "minilm-finetuned"  # another model of the same dimension, to nest
    other.symlink_to(default_embedding_model_dir(), target_is_directory=True)
    code, _, err = run_main(capsys, "index", str(corpus), *options, "--embedding", str(other))
    assert code == 1
    assert ("this store was built with the embedding 'all-MiniLM-L6-v2', not "
            "'minilm-finetuned'") in err
    assert passage_ids(store) == ids
    if kind == "faiss":  # (Chroma's sqlite file changes on every open)
        assert snapshot(store) == before


# --- case 5: what a folder holds ------------------------------------------------------------------
def test_case_05_links_out_of_the_folder_loops_and_unreadable_folders(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Case 5, symlinks and unreadable folders. Before: a symlink to a file outside the
    folder was indexed (and cited) under its absolute path; symlinked folders, loops and
    unreadable subfolders were skipped without a word. After: the outside file is left out,
    every skipped item is listed, and the store holds the folder's own files only."""
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "a.md").write_text("Alpha is the first letter.", encoding="utf-8")
    (notes / "sub" / "b.md").write_text("Beta is the second letter.", encoding="utf-8")
    (tmp_path / "secret.md").write_text("The vault code is 4711.", encoding="utf-8")
    (notes / "link.md").symlink_to(tmp_path / "secret.md")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c.md").write_text("Gamma lives elsewhere.", encoding="utf-8")
    (notes / "elsewhere").symlink_to(tmp_path / "other")
    (notes / "sub" / "loop").symlink_to(notes)
    locked = notes / "locked"
    locked.mkdir()
    (locked / "d.md").write_text("Delta cannot be read.", encoding="utf-8")
    if os.geteuid() == 0:  # root reads any folder: fail its listing as permissions would
        real_scandir = os.scandir

        def scandir(path: Any) -> Any:
            if str(path) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        locked.chmod(0)
    store = tmp_path / "store"
    try:
        err = index(capsys, str(notes), "--out", str(store), "--no-precompute", "-q")
    finally:
        locked.chmod(0o755)
    assert "skipped 1 symlink(s) to files outside the folder" in err
    assert "skipped 2 symlinked folder(s), not followed" in err
    assert f"skipped 1 folder(s) that could not be read (no permission?): {locked}" in err
    assert passage_ids(store) == ["notes/a.md#0", "notes/sub/b.md#0"]
    assert not [p for p in open_store(store).passages() if "4711" in p.text]


# --- case 6: what reaches the terminal ------------------------------------------------------------
def test_case_06_escape_sequences_in_a_document_never_reach_the_terminal(
        smollm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 6, terminal escapes. Before: an OSC window title and a clear-screen sequence in a
    document reached stdout with the answer's sources, even with `--color never`. After:
    every control character from a document is shown as U+FFFD in quoted text, and as its
    escape (``\\x1b``) in a one-line label (nest_core.app.safe_text); the words around it
    stay."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "history.md").write_text(
        "# Zephyr \x1b]0;pwned\x07history\n\nThe Zephyr Widget Company was founded in 1987 "
        "\x1b[2J\x1b[H by Marta Quillfeather in Ostrava.\r It makes brass widgets.\n",
        encoding="utf-8")
    store = tmp_path / "store"
    index(capsys, str(docs), "--out", str(store), "--no-precompute", "-q")
    code, out, err = run_main(capsys, "ask", QUESTION, "--store", str(store), "--color",
                              "never", "--max-new-tokens", "8")
    assert code == 0, err
    assert "\nSources\n" in out, out  # the document is cited, so its text is shown
    assert not CONTROL.search(out), repr(out)
    assert "\\x1b]0;pwned\\x07history" in out  # the title: visible, not executed
    assert "\ufffd[2J\ufffd[H" in out


# --- case 7: Ctrl-C while indexing ----------------------------------------------------------------
class _Embedding:
    """The real bundled MiniLM (already loaded), with a hook run before each batch of
    passages is embedded (one-text calls are the store's dimension probe and queries)."""

    def __init__(self, before_batch: Any) -> None:
        from nest_core.stores.embeddings import default_embedding_function

        self.model = default_embedding_function()
        self.name = self.model.name
        self.before_batch = before_batch
        self.embedded = 0

    def __call__(self, texts: list[str]) -> list[list[float]]:
        if len(texts) > 1:
            self.before_batch(self.embedded)
            self.embedded += len(texts)
        return self.model(texts)


def with_embedding(monkeypatch: pytest.MonkeyPatch, embedding: _Embedding) -> None:
    """Make ``embedding`` what `nest index` uses by default."""
    import nest_core.stores.embeddings as embeddings

    monkeypatch.setattr(embeddings, "_DEFAULT", embedding)


@contextlib.contextmanager
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt), whatever an earlier test installed."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_case_07_ctrl_c_mid_index_leaves_a_marked_store_the_same_command_resumes(
        kind: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Case 7, Ctrl-C while indexing into an existing store. Before: Chroma was left
    half-updated (24 old + 576 of 30,535 new passages) with no marker, and FAISS threw away
    everything the run had embedded. After: what was embedded is kept, the store is marked
    incomplete, `nest ask` says so, and the same command resumes: it embeds only the rest
    and clears the mark."""
    from nest_core.app.common import open_source

    store = tmp_path / "store"
    options = ("--store", kind, "--out", str(store), "--no-precompute", "-q")
    index(capsys, str(corpus), *options)  # the existing store: 2 passages
    big = files(tmp_path / "catalogue", 80)  # 64 per batch: Ctrl-C during the second

    pressed: list[int] = []

    def ctrl_c(embedded: int) -> None:
        if embedded == 64 and not pressed:
            pressed.append(embedded)
            signal.raise_signal(signal.SIGINT)  # delivered to this process, as Ctrl-C is

    with_embedding(monkeypatch, _Embedding(ctrl_c))
    with default_sigint():
        code, _, err = run_main(capsys, "index", str(big), *options)
    assert code == 130
    assert "nest: interrupted" in err
    assert len(passage_ids(store)) == 2 + 64
    marker = unfinished(open_store(store))
    assert marker is not None
    assert marker["passages"] == 80
    open_source(store)
    assert (f"the last `nest index` into {store} did not finish (it was writing 80 passages"
            in capsys.readouterr().err)

    err = index(capsys, str(big), *options)  # the same command, run again
    assert "(16 new, 64 unchanged, 0 removed)" in err
    assert len(passage_ids(store)) == 2 + 80
    assert unfinished(open_store(store)) is None
    open_source(store)
    assert "did not finish" not in capsys.readouterr().err


# --- case 8: a frozen Chroma server ---------------------------------------------------------------
@contextlib.contextmanager
def frozen(proc: Any, *, at_most: float) -> Iterator[None]:
    """The server process stopped (SIGSTOP), as a hung or swapped-out server is; it runs
    again on leaving, or after ``at_most`` seconds, so a client without a timeout makes the
    test fail, not hang."""
    os.kill(proc.pid, signal.SIGSTOP)
    watchdog = threading.Timer(at_most, os.kill, (proc.pid, signal.SIGCONT))
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        os.kill(proc.pid, signal.SIGCONT)


def test_case_08_a_frozen_chroma_server_times_out_with_a_clear_error(
        chroma_server: tuple[str, int, Path, Any]) -> None:
    """Case 8, a frozen Chroma server. Before: retrieval from a `chroma run` that stopped
    answering blocked for ever (150 s and counting). After: connecting and every query give
    up after the configured timeout with a TimeoutError naming the server; once it runs
    again, the same source is served."""
    from nest_core.stores.embeddings import HashingEmbeddings

    host, port, _, proc = chroma_server
    embed = HashingEmbeddings(32)
    col = open_chroma_collection(host=host, port=port, name="frozen", embed=embed)
    ingest([Document(text=FACT, title="Zephyr"), Document(text=POLICY, title="Leave")], col,
           embed=embed, progress=False)
    timeout = 2.0
    source = ChromaSource.from_server(host, port, "frozen", embed=embed, timeout=timeout)
    assert source.retrieve(QUESTION, 1)
    with frozen(proc, at_most=30):
        for call in (lambda: source.retrieve(QUESTION, 1),
                     lambda: ChromaSource.from_server(host, port, "frozen", embed=embed,
                                                      timeout=timeout)):
            began = time.monotonic()
            with pytest.raises(TimeoutError, match=f"the Chroma server .* did not answer "
                                                   f"within {timeout:g} s"):
                call()
            assert time.monotonic() - began < timeout + 3
    assert source.retrieve(QUESTION, 1)[0].title == "Zephyr"  # served again once it runs


# --- case 9: arguments checked first --------------------------------------------------------------
def test_case_09_arguments_are_checked_before_the_model_loads_or_generates(
        faiss_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Case 9, late argument checks. Before: an unwritable `--html` path was reported after
    25 s of generation (the answer lost), `--max-new-tokens 1000000000` was refused only
    after the model loaded, and `--max-new-tokens 8150` silently left a 42-token prompt
    without the passages. After: the first two are refused before the model loads; the third
    before a token is generated, naming the most the model's context allows."""
    import nest_core.app.cli as cli
    import nest_core.app.common as common
    from nest_core.app.files import check_writable
    from nest_core.decoder import NestDecoder

    def never(*_: Any, **__: Any) -> Any:
        pytest.fail("loaded the model or generated before checking the arguments")

    with monkeypatch.context() as patch:
        patch.setattr(common, "load_quietly", never)
        patch.setattr(cli, "answer", never)
        code, _, err = run_main(capsys, "ask", QUESTION, "--store", str(faiss_store),
                                "--html", str(tmp_path / "no-such-dir" / "answer.html"))
        assert code == 1
        assert "cannot write --html" in err
        code, _, err = run_main(capsys, "ask", QUESTION, "--store", str(faiss_store),
                                "--max-new-tokens", "1000000000")
        assert code == 2
        assert "use at most 8192" in err
    monkeypatch.setattr(NestDecoder, "generate", never)
    code, _, err = run_main(capsys, "ask", QUESTION, "--store", str(faiss_store),
                            "--max-new-tokens", "8150")
    assert code == 1
    assert re.search(r"--max-new-tokens 8150 leaves the question and its passages less than "
                     r"\d+ of the model's \d+ context tokens; use at most \d+", err), err
    ok = tmp_path / "answer.html"
    check_writable(ok)
    assert not ok.exists()  # the check leaves nothing behind


# --- case 10: --k ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_case_10_k_is_bounded_by_the_parser_and_by_the_store(
        kind: str, faiss_store: Path, chroma_store: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Case 10, a huge `--k`. Before: `--k 1000000000000` on Chroma failed with "out of range
    integral type conversion attempted"; `--k 100000` on a 600-passage store encoded every
    passage for 645 s with no progress. After: `--k` is 1-200 (each passage is an LM
    forward), refused with the reason; a store asked for more than it holds returns what it
    holds."""
    store = faiss_store if kind == "faiss" else chroma_store
    for k, says in (("1000000000000", "is too many"), ("100000", "use at most 200")):
        code, _, err = run_main(capsys, "ask", QUESTION, "--store", str(store), "--k", k)
        assert code == 2
        assert says in err
    source = open_store(store)
    assert len(source.retrieve(QUESTION, 10**12)) == len(source.passages()) == 2


# --- case 11: a large index -----------------------------------------------------------------------
def test_case_11_a_large_index_says_how_long_before_the_bulk_of_the_work(
        smollm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Case 11, the estimate. Before: a 20 MB file (30,535 passages, about 8 hours) showed
    the passage count and progress bars, no time. After: once its first batch is timed, and
    before the spans of the whole store are encoded, `nest index` says "N passages: about A
    to embed, about B to encode spans", and how to stop and resume."""
    import nest_core.stores.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "LARGE_INGEST", 10)
    seen_before_bulk: list[str] = []  # stderr when the span encoding of every passage began
    real_precompute = ingest_module.precompute

    def precompute(passages: Any, *args: Any, **kwargs: Any) -> int:
        if len(passages) == 12:
            seen_before_bulk.append(capsys.readouterr().err)
        return real_precompute(passages, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "precompute", precompute)
    code, _, err = run_main(capsys, "index", str(files(tmp_path / "catalogue", 12)),
                            "--out", str(tmp_path / "store"))
    assert code == 0, err
    estimate = re.compile(r"12 passages: (under 1 min|about \d+ min) to embed, "
                          r"(under 1 min|about \d+ min) to encode spans")
    assert len(seen_before_bulk) == 1
    assert estimate.search(seen_before_bulk[0]), seen_before_bulk[0]
    assert "the same command resumes where it stopped" in seen_before_bulk[0]


def test_case_11_embedded_work_is_on_disk_while_a_large_index_runs(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Case 11, checkpoints. Before: a FAISS store was saved only at the end, so a run that
    was killed (kill -9, a crash, a closed laptop) lost everything it had embedded. After:
    the store is saved every `CHECKPOINT_SECONDS` (0 here), so what a kill would leave
    behind mid-run holds the batches already embedded, marked incomplete."""
    import nest_core.stores.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "CHECKPOINT_SECONDS", 0.0)
    store = tmp_path / "store"
    left = tmp_path / "what-a-kill-leaves"

    def kill_9(embedded: int) -> None:  # the store as a kill now would leave it on disk
        if embedded == 64:
            shutil.copytree(store, left)

    with_embedding(monkeypatch, _Embedding(kill_9))
    index(capsys, str(files(tmp_path / "catalogue", 80)), "--out", str(store),
          "--no-precompute", "-q")
    assert len(passage_ids(left)) == 64
    assert (unfinished(open_store(left)) or {}).get("passages") == 80
    assert len(passage_ids(store)) == 80


# --- case 12: bad files, old span files -----------------------------------------------------------
def test_case_12_a_file_that_is_not_utf8_is_skipped_not_the_folder(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 12, one bad file. Before: one non-UTF-8 file aborted `nest index` of the whole
    folder. After: that file is skipped with a note naming it, and the rest is indexed."""
    folder = tmp_path / "handbook"
    shutil.copytree(corpus, folder)
    (folder / "menu.txt").write_bytes("Caf\xe9 cr\xe8me, 3 \xa4".encode("latin-1"))
    store = tmp_path / "store"
    err = index(capsys, str(folder), "--out", str(store), "--no-precompute", "-q")
    assert f"skipped {folder / 'menu.txt'}: not UTF-8 text" in err
    assert "skipped 1 file(s) that could not be read" in err
    assert passage_ids(store) == ["handbook/history.md#0", "handbook/policy.txt#0"]


def test_case_12_reindexing_removes_span_files_no_passage_needs(
        corpus: Path, smollm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 12, old span files. Before: span files of an older model, or of deleted files,
    stayed in a store until its size bound evicted them. After: `nest index` keeps only the
    files the store's passages need under the current model, and says how many it removed.
    (`-q` hiding the one-time conversion bar: test_cli.py.)"""
    from nest_core.encoding import EncodedPassage
    from nest_core.stores.datastore import SpanDatastore

    folder = tmp_path / "handbook"
    shutil.copytree(corpus, folder)
    store = tmp_path / "store"
    index(capsys, str(folder), "--out", str(store), "-q")
    spans = SpanDatastore.for_store(store)
    current = set(spans._entries())
    assert len(current) == 2  # one per passage
    old = EncodedPassage(keys=torch.zeros(3, 4), values=torch.tensor([1, 2, 3]),
                         char_spans=torch.zeros(3, 2, dtype=torch.int32))
    spans.put("v1-an-older-model-L-2-W512-0123", old)
    (folder / "policy.txt").unlink()
    err = index(capsys, str(folder), "--out", str(store), "-q")
    remaining = set(SpanDatastore.for_store(store)._entries())
    assert len(remaining) == 1
    assert remaining < current  # the deleted file's span file and the old model's are gone
    assert "removed 2 span file(s)" in err
