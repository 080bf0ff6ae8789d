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
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_SCRIPT = Path(sys.executable).with_name("nest")  # the installed console script
NEST = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "nest_core.app.cli"]
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
# One runs as a subprocess (the console script prints one line, no traceback, exit 1); the
# rest call the same ``main`` in-process, because each subprocess pays a torch import that
# costs tens of seconds on a busy 2-core machine.
def test_ask_without_a_store_names_the_fix(tmp_path: Path) -> None:
    proc = nest("ask", QUESTION, "--store", str(tmp_path / "nowhere"))
    assert_clean_error(proc, "does not exist", "nest index")


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from nest_core.app.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(("args", "needles"), [
    (("ask", QUESTION, "--store", "{tmp}"), ("holds no vector store nest can read", "nest index")),
    (("index", "{tmp}/empty", "--out", "{tmp}/s"), ("the folder is empty",)),
    (("index", "{tmp}/report.docx", "--out", "{tmp}/s"), ("unsupported file type '.docx'",
                                                           "txt/md")),
    (("index", "{tmp}/odd", "--out", "{tmp}/s"), ("no supported files (found .docx)",)),
    (("index", "{tmp}/nope.md", "--out", "{tmp}/s"), ("no such file or folder",)),
    (("index", "{tmp}/blank", "--out", "{tmp}/s"), ("every file is empty",)),
    (("ask", "  ", "--store", "{tmp}"), ("the question is empty",)),
    (("cache", "clear", "--store", "{tmp}"), ("holds no vector store nest can read",)),
], ids=["not-a-store", "empty-folder", "unsupported-file", "unsupported-folder",
        "missing-path", "blank-files", "blank-question", "clear-not-a-store"])
def test_errors_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "report.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "report.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.md").write_text("  \n", encoding="utf-8")
    code, err = run_main(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert code == 1
    assert err.startswith("nest: error: ") or "\nnest: error: " in err, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "s").exists(), "a failed index must not leave a store behind"


def test_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(capsys, "ask", QUESTION, "--store", ".", "--k", "0")
    assert code == 2
    assert "is not a positive integer" in err


def test_ask_an_empty_store_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nest_core.stores.sources import FaissStore

    FaissStore.create(tmp_path / "empty", dim=384, embedding="all-MiniLM-L6-v2").save()
    code, err = run_main(capsys, "ask", QUESTION, "--store", str(tmp_path / "empty"))
    assert code == 1
    assert "is empty" in err
    assert "nest index" in err


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


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` in Helvetica, written by hand (no PDF writer needed)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>"),
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer << /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def test_index_reads_pdf_text(tmp_path: Path) -> None:
    pytest.importorskip("pypdf", reason="PDF support needs pypdf (pip install pypdf)")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "memo.pdf").write_bytes(minimal_pdf(FACT))
    out = tmp_path / "store"
    proc = nest("index", str(tmp_path / "docs"), "--out", str(out), "--no-precompute", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "1 passages from 1 file(s)" in proc.stderr
    sidecar = [json.loads(line) for line in (out / "passages.jsonl").read_text().splitlines()]
    assert [r["text"] for r in sidecar] == [FACT]
    assert sidecar[0]["metadata"]["source"].endswith("memo.pdf")


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
    assert {s["kind"] for s in nest_result["spans"]} == {"copied"}
    for match in nest_result["matches"]:  # what the LM wrote that a passage holds verbatim
        assert match["kind"] == "matched"
        source = passages[match["passage_id"]]["text"]
        assert source[match["src_start"]:match["src_end"]] == match["text"]
        assert nest_result["text"][match["out_start"]:match["out_end"]] == match["text"]
        assert all(match["out_end"] <= s["out_start"] or match["out_start"] >= s["out_end"]
                   for s in nest_result["spans"])
    assert base["matches"] == []  # the plain model is given no passages


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
    text = visible_text(proc.stdout)  # what the rendered page shows, tags and CSS gone
    nest_result = doc["nest"]
    assert isinstance(nest_result, dict)
    first = nest_result["spans"][0]
    assert f"{first['text']}[1]" in text, text
    assert f"Question: {QUESTION}" in text
    assert "Plain model" in text
    assert "Sources" in text
    assert 'href="#src-1"' in proc.stdout


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
    assert "history.md, passage 1)" in proc.stdout
    assert "Loading weights" not in proc.stderr


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in ("style", "script", "title")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "script", "title")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    """The text a reader sees in a serialised DOM (entities decoded, markup dropped)."""
    parser = _Text()
    parser.feed(dom)
    return "".join(parser.parts)


def test_quiet_index_hides_the_one_time_model_conversion_bar(corpus: Path, tmp_path: Path
                                                              ) -> None:
    # caught: `-q` hid nest's bars but not transformers' GGUF de-quantisation bar (issue 14,
    # case 12; the rest of the fault cases are in test_faults.py: this one converts the model
    # afresh, about a minute on a CPU)
    proc = nest("index", str(corpus), "--out", str(tmp_path / "store"), "-q",
                env={"NEST_CACHE_DIR": str(tmp_path / "fresh-cache")})
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "fresh-cache" / "models").iterdir()), "no conversion happened"
    assert "Converting" not in proc.stderr
    assert "%|" not in proc.stderr


def test_questions_retrieve_through_the_lexical_rerank(faiss_store: Path) -> None:
    """`nest ask`/serve/mcp/demo retrieve a wider pool re-ranked by the question's words;
    `nest index --from-store` reads the store itself (no rerank wrapper)."""
    from nest_core.app.common import open_source
    from nest_core.stores.sources.rerank import LexicalRerank

    source = open_source(faiss_store)
    assert isinstance(source, LexicalRerank)
    found = source.retrieve("How many days of paid leave per year?", 1)
    assert "31 days of paid leave" in found[0].text
    assert not isinstance(open_source(faiss_store, rerank=False), LexicalRerank)


def test_ask_abstains_on_a_question_the_files_do_not_answer(
        faiss_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the default abstains, without a citation, where no passage is near the question
    from nest_core.app.cli import main

    assert main(["ask", "What is the capital of France?", "--store", str(faiss_store),
                 "--json", "--max-new-tokens", "16"]) == 0
    result = json.loads(capsys.readouterr().out)["nest"]
    assert result["finish_reason"] == "abstained", result["text"]
    assert result["text"] == "The documents do not say."
    assert result["spans"] == result["matches"] == []


def test_calibrate_records_settings_that_ask_then_uses(faiss_store: Path, tmp_path: Path) -> None:
    """`nest calibrate` on the user's questions over their store: a table, the settings
    written for the model, and `nest ask` abstaining on the unanswerable question by them."""
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps([
        {"question": QUESTION, "answers": ["1987"]},
        {"question": "How many days of paid leave does a Zephyr employee get?",
         "answers": ["31"]},
        {"question": "Which football club won the 1998 cup final?", "answers": []}]))
    settings = tmp_path / "settings.json"
    env = {"NEST_ANSWER_SETTINGS": str(settings)}
    proc = nest("calibrate", str(questions), "--store", str(faiss_store), "--k", "2",
                "--max-new-tokens", "24", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| focus | right (answerable) |" in proc.stdout
    assert "abstains on 100% of unanswerable and 0% of answerable questions" in proc.stdout
    (entry,) = json.loads(settings.read_text()).values()
    assert entry["settings"]["focus_sentences"] in (1, 2, 3, None)
    assert entry["settings"]["abstain_below"] > 0
    asked = nest("ask", "Which football club won the 1998 cup final?", "--store",
                 str(faiss_store), "--json", "--max-new-tokens", "8", env=env)
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["nest"]["finish_reason"] == "abstained"
    dry = nest("calibrate", str(questions), "--store", str(faiss_store), "--dry-run",
               "--k", "2", "--max-new-tokens", "8", env={"NEST_ANSWER_SETTINGS": str(
                   tmp_path / "untouched.json")})
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "untouched.json").exists()
