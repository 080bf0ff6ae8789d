"""The ``nest`` console script, run as a user runs it: subprocesses on real stores in tmp dirs.

The corpus is two tiny made-up files, so the real SmolLM2 cannot know the answer and the span
datastore builds in seconds. Error paths need no model; the answering tests share one FAISS
store and one ``nest ask`` run (model loads are the expensive part on a 2-core machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_SCRIPT = Path(sys.executable).with_name("nest")  # the installed console script
NEST = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "nest_core.cli"]
QUESTION = "When was the Zephyr Widget Company founded?"
FACT = "The Zephyr Widget Company was founded in 1987 by Marta Quillfeather in Ostrava."
HANDBOOK = f"""# Zephyr history

{FACT} It makes brass widgets for clock towers, and its first factory stood beside the river.
"""
POLICY = """# Zephyr leave policy

Every employee of the Zephyr Widget Company receives 31 days of paid leave per year, and the
factory closes for the Widget Fair in the second week of June.
"""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def nest(*args: str, env: dict[str, str] | None = None, timeout: float = 600
         ) -> subprocess.CompletedProcess[str]:
    """Run ``nest ARGS`` (the console script, else its module) and capture its output."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", **(env or {})}
    full_env.pop("FORCE_COLOR", None)
    return subprocess.run([*NEST, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, check=False)


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Non-zero exit, one readable message naming the problem, no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("nest: error: ") or "\nnest: error: " in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "history.md").write_text(HANDBOOK, encoding="utf-8")
    (root / "policy.txt").write_text(POLICY, encoding="utf-8")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n")
    return root


@pytest.fixture(scope="module")
def faiss_store(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "faiss"
    proc = nest("index", str(corpus), "--store", "faiss", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unsupported file(s)" in proc.stderr
    assert "2 passages from 2 file(s)" in proc.stderr
    assert list((out / "nest_spans").rglob("*.span")), "span datastore was not precomputed"
    return out


@pytest.fixture(scope="module")
def asked(faiss_store: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[dict[str, object], Path]:
    page = tmp_path_factory.mktemp("html") / "answer.html"
    proc = nest("ask", QUESTION, "--store", str(faiss_store), "--compare", "--json",
                "--html", str(page), "--max-new-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), page


# --- error paths: no model is loaded for any of them -------------------------------------------
def test_ask_without_a_store_names_the_fix(tmp_path: Path) -> None:
    proc = nest("ask", QUESTION, "--store", str(tmp_path / "nowhere"))
    assert_clean_error(proc, "does not exist", "nest index")


def test_ask_on_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    assert_clean_error(nest("ask", QUESTION, "--store", str(tmp_path)),
                       "holds no nest vector store")


def test_index_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = nest("index", str(tmp_path / "empty"), "--out", str(tmp_path / "store"))
    assert_clean_error(proc, "the folder is empty")
    assert not (tmp_path / "store").exists()


def test_index_unsupported_files(tmp_path: Path) -> None:
    (tmp_path / "report.docx").write_bytes(b"PK\x03\x04")
    proc = nest("index", str(tmp_path / "report.docx"), "--out", str(tmp_path / "s"))
    assert_clean_error(proc, "unsupported file type '.docx'", "txt/md")
    proc = nest("index", str(tmp_path), "--out", str(tmp_path / "s"))
    assert_clean_error(proc, "no supported files (found .docx)")


def test_index_a_missing_path_and_bad_arguments(tmp_path: Path) -> None:
    assert_clean_error(nest("index", str(tmp_path / "nope.md"), "--out", str(tmp_path)),
                       "no such file or folder")
    proc = nest("ask", QUESTION, "--store", str(tmp_path), "--k", "0")
    assert proc.returncode == 2
    assert "is not a positive integer" in proc.stderr


def test_ask_an_empty_store_says_no_passages(tmp_path: Path) -> None:
    from nest_core.sources import FaissStore

    FaissStore.create(tmp_path / "empty", dim=384, embedding="all-MiniLM-L6-v2").save()
    proc = nest("ask", QUESTION, "--store", str(tmp_path / "empty"))
    assert_clean_error(proc, "empty")


def test_cache_clear_default_and_store(tmp_path: Path, faiss_store: Path) -> None:
    proc = nest("cache", "clear", env={"NEST_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "removed 0 span file(s)" in proc.stderr
    copy = tmp_path / "store"
    shutil.copytree(faiss_store, copy)
    proc = nest("cache", "clear", "--store", str(copy))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"removed [1-9]\d* span file\(s\)", proc.stderr), proc.stderr
    assert not list((copy / "nest_spans").rglob("*.span"))


# --- answering -------------------------------------------------------------------------------
def test_ask_json_attributes_copied_text_to_the_store(
        asked: tuple[dict[str, object], Path]) -> None:
    doc, _ = asked
    assert doc["question"] == QUESTION
    nest_result, base = doc["nest"], doc["base"]
    assert isinstance(nest_result, dict)
    assert isinstance(base, dict)
    assert base["spans"] == []
    assert nest_result["spans"], f"nothing copied: {nest_result['text']!r}"
    passages = {p["id"]: p for p in nest_result["passages"]}
    for span in nest_result["spans"]:
        source = passages[span["passage_id"]]["text"]
        assert source[span["src_start"]:span["src_end"]] == span["text"]
        assert nest_result["text"][span["out_start"]:span["out_end"]] == span["text"]
        assert span["metadata"]["source"].endswith(("history.md", "policy.txt"))
    assert "1987" in "".join(s["text"] for s in nest_result["spans"])
    assert nest_result["stats"]["generated_tokens"] <= 24


def test_ask_html_page_renders_in_chromium(asked: tuple[dict[str, object], Path],
                                           tmp_path: Path) -> None:
    doc, page = asked
    html = page.read_text(encoding="utf-8")
    assert 'href="#src-1"' in html
    assert 'id="src-1"' in html
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless check needs Debian chromium: apt-get install -y chromium")
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    nest_result = doc["nest"]
    assert isinstance(nest_result, dict)
    first = nest_result["spans"][0]
    assert '<a class="span' in dom
    assert f"{_escaped(first['text'])}<sup>[1]</sup></a>" in dom
    assert f"<mark>{_escaped(first['text'])}</mark>" in dom
    assert "Plain model" in dom
    assert f"Question: {QUESTION}" in dom


def test_ask_terminal_on_a_chroma_store(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "chroma"
    proc = nest("index", str(corpus / "history.md"), "--store", "chroma", "--out", str(out),
                "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (out / "chroma.sqlite3").is_file()
    proc = nest("ask", QUESTION, "--store", str(out), "--max-new-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert not ANSI.search(proc.stdout), "NO_COLOR and a pipe must give plain text"
    assert "[1]" in proc.stdout
    assert "\nSources\n[1] Zephyr history (" in proc.stdout
    assert "history.md)" in proc.stdout


def _escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
