"""The CLI's pure parts, without a model: file discovery, titles, store detection, the demo
summary. (The commands themselves run as subprocesses in tests/integration/test_cli.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nest_core.app.cli import CliError, build_parser, collect_files, split_title
from nest_core.app.common import detect_store
from nest_core.app.demo import QUESTIONS, corpus_dir, summary
from nest_core.types import DecodeStats, NestResult


def test_collect_files_ids_are_relative_and_hidden_files_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes" / "sub").mkdir(parents=True)
    (tmp_path / "notes" / "a.md").write_text("# A\n\nalpha", encoding="utf-8")
    (tmp_path / "notes" / "sub" / "b.TXT").write_text("beta", encoding="utf-8")
    (tmp_path / "notes" / "c.png").write_bytes(b"\x89PNG")
    (tmp_path / "notes" / ".git").mkdir()
    (tmp_path / "notes" / ".git" / "HEAD.md").write_text("ref", encoding="utf-8")
    found = collect_files([str(tmp_path / "notes")])
    assert [doc_id for _, doc_id in found] == ["notes/a.md", "notes/sub/b.TXT"]
    assert "skipped 1 unsupported file(s)" in capsys.readouterr().err


def test_collect_files_rejects_a_named_unsupported_file(tmp_path: Path) -> None:
    (tmp_path / "x.docx").write_bytes(b"PK")
    with pytest.raises(CliError, match=r"unsupported file type '\.docx'"):
        collect_files([str(tmp_path / "x.docx")])


def test_split_title_uses_a_leading_heading_only() -> None:
    assert split_title("# Time off\n\nEvery employee...", Path("05-time-off.md")) == (
        "Time off", "Every employee...")
    assert split_title("No heading here.\n# Later", Path("my_notes-1.txt")) == (
        "my notes 1", "No heading here.\n# Later")
    assert split_title("# Only a heading\n", Path("t.md")) == ("t", "# Only a heading\n")


def test_detect_store_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="nest index"):
        detect_store(tmp_path / "missing")
    with pytest.raises(CliError, match=r"holds no vector store nest can read.*LangChain FAISS"):
        detect_store(tmp_path)
    (tmp_path / "chroma.sqlite3").write_bytes(b"")
    assert detect_store(tmp_path) == "chroma"
    assert detect_store(tmp_path, "langchain") == "chroma"


@pytest.mark.parametrize(("files", "kind"), [
    (("nest_faiss.json", "index.faiss", "passages.jsonl"), "faiss"),
    (("default__vector_store.json", "docstore.json", "index_store.json"), "llama-index"),
    (("index.faiss", "index.pkl"), "langchain-faiss"),
])
def test_detect_store_knows_what_the_frameworks_write(tmp_path: Path, files: tuple[str, ...],
                                                     kind: str) -> None:
    for name in files:
        (tmp_path / name).write_bytes(b"")
    assert detect_store(tmp_path) == kind
    with pytest.raises(CliError, match=f"--collection docs applies to Chroma stores; "
                       f"{tmp_path} is a {kind} store"):
        detect_store(tmp_path, "docs")


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["ask", "q", "--store", "s"])
    assert (args.k, args.max_new_tokens, args.compare, args.json, args.html) == (
        8, 64, False, False, None)
    assert (args.collection, args.embedding, args.allow_dangerous_deserialization) == (
        None, None, False)  # the pickle opt-in is never on by default
    assert build_parser().parse_args(["demo"]).store == "faiss"


@pytest.mark.parametrize(("args", "says"), [
    ((), "name the files to index and the store to write"),
    (("notes",), "name the files to index and the store to write"),
    (("notes", "--from-store", "s"), "give no PATH or --out with it"),
    (("--from-store", "s", "--no-precompute"), "drop --no-precompute"),
    (("notes", "--out", "s", "--collection", "docs"), "applies to --store chroma"),
])
def test_index_argument_combinations_name_the_fix(args: tuple[str, ...], says: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from nest_core.app.cli import main

    assert main(["index", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nest: error: ")
    assert says in err


def test_demo_corpus_is_in_the_checkout() -> None:
    files = sorted(corpus_dir().glob("*.md"))
    assert 8 <= len(files) <= 15
    words = sum(len(f.read_text(encoding="utf-8").split()) for f in files)
    assert 2000 <= words <= 4000
    assert len(QUESTIONS) == 3


def test_summary_totals_speed_and_attribution() -> None:
    def result(tokens: int, forwards: int, seconds: float) -> NestResult:
        stats = DecodeStats(generated_tokens=tokens, lm_forwards=forwards,
                            total_seconds=seconds)
        return NestResult(text="x", token_ids=list(range(tokens)), spans=[], passages=[],
                          stats=stats, finish_reason="length")

    text = summary([result(10, 10, 1.0), result(10, 10, 1.0)],
                   [result(20, 5, 1.0), result(20, 5, 1.0)])
    assert "plain model:  10.0 tokens/s, 1.00 tokens per LM forward" in text
    assert "Nest:         20.0 tokens/s, 4.00 tokens per LM forward" in text
    assert "2.0x the plain model" in text


@pytest.mark.parametrize("command", [["ask", "q", "--store", "s"], ["demo"],
                                     ["index", "f", "--out", "o"]])
def test_dtype_option_on_every_command_that_loads_the_model(command):
    assert build_parser().parse_args(command).dtype is None  # float32
    assert build_parser().parse_args([*command, "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--dtype", "float8"])


# --- arguments checked before anything heavy loads (issue 14, cases 9 and 10) --------------
@pytest.mark.parametrize(("args", "says"), [
    (["--k", "1000000000000"], "too many"),
    (["--k", "201"], "at most 200"),
    (["--max-new-tokens", "1000000000"], "at most 8192"),
])
def test_absurd_sizes_are_refused_by_the_parser(args, says, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask", "q", "--store", "s", *args])
    assert says in capsys.readouterr().err


def test_a_bad_file_is_skipped_with_a_note_not_the_whole_folder(tmp_path, capsys):
    # caught: a non-UTF-8 file aborting the folder (issue 14, case 12)
    from nest_core.app.files import read_documents

    good = tmp_path / "good.md"
    good.write_text("# Good\n\nReadable text.", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes("caf\xe9 in Latin-1".encode("latin-1"))
    docs = read_documents([(bad, "bad.txt"), (good, "good.md")])
    assert [d.id for d in docs] == ["good.md"]
    err = capsys.readouterr().err
    assert "not UTF-8" in err
    assert "skipped 1 file(s) that could not be read" in err
    with pytest.raises(CliError, match="1 file\\(s\\) could not be read"):
        read_documents([(bad, "bad.txt")])


def test_a_folder_gets_the_same_ids_by_dot_and_by_path(tmp_path, monkeypatch):
    # caught: "." named "" in ids, so the same folder indexed twice (issue 14, case 3)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("alpha", encoding="utf-8")
    by_path = [doc_id for _, doc_id in collect_files([str(notes)])]
    monkeypatch.chdir(notes)
    assert [doc_id for _, doc_id in collect_files(["."])] == by_path == ["notes/a.md"]
    with pytest.raises(CliError, match="empty path"):
        collect_files([""])


def test_symlinks_to_files_outside_the_folder_are_skipped_with_a_note(tmp_path, capsys):
    # caught: an outside file indexed under its absolute path (issue 14, case 5)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("alpha", encoding="utf-8")
    secret = tmp_path / "secret.md"
    secret.write_text("do not index", encoding="utf-8")
    (notes / "link.md").symlink_to(secret)
    (notes / "inside.md").symlink_to(notes / "a.md")
    ids = [doc_id for _, doc_id in collect_files([str(notes)])]
    assert ids == ["notes/a.md", "notes/inside.md"]
    assert "skipped 1 symlink(s) to files outside the folder" in capsys.readouterr().err


def test_symlinked_folders_loops_and_unreadable_folders_are_noted(tmp_path, capsys,
                                                                 monkeypatch):
    # caught: symlinked folders, loops and unreadable subfolders skipped with no word (case 5)
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "a.md").write_text("alpha", encoding="utf-8")
    (notes / "sub" / "b.md").write_text("beta", encoding="utf-8")
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.md").write_text("gamma", encoding="utf-8")
    (notes / "elsewhere").symlink_to(other)
    (notes / "sub" / "loop").symlink_to(notes)
    (notes / "locked").mkdir()
    (notes / "locked" / "d.md").write_text("delta", encoding="utf-8")
    real_scandir = os.scandir

    def scandir(path):  # the walk's listing of "locked" fails, as without permission
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ids = [doc_id for _, doc_id in collect_files([str(notes)])]
    assert ids == ["notes/a.md", "notes/sub/b.md"]
    err = capsys.readouterr().err
    assert "skipped 2 symlinked folder(s), not followed" in err
    assert "skipped 1 folder(s) that could not be read" in err
    assert "locked" in err


def test_index_from_an_empty_store_says_so_before_loading_a_model(tmp_path, capsys):
    from nest_core.app.cli import main
    from nest_core.stores.sources.chroma import persistent_client

    persistent_client(tmp_path).create_collection("langchain", embedding_function=None)
    assert main(["index", "--from-store", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "using the only Chroma collection" in err
    assert f"nest: error: {tmp_path} holds no passages with text" in err
    assert "loading the language model" not in err


def test_serve_batches_only_when_asked_and_then_admits_more_answers() -> None:
    """`nest serve` decodes answers one forward at a time (2 at once) by default;
    `--batching` runs concurrent answers' forwards together and admits 8 (measured: pays in
    bfloat16, and with long answers; not with the default's short ones in float32;
    docs/scaling.md)."""
    plain = build_parser().parse_args(["serve", "--store", "s"])
    batched = build_parser().parse_args(["serve", "--store", "s", "--batching"])
    assert (plain.batching, batched.batching) == (False, True)
    assert plain.max_concurrent is None  # cmd_serve: 2, or BATCHED_CONCURRENT with --batching
    assert build_parser().parse_args(["serve", "--store", "s", "--batching",
                                      "--max-concurrent", "3"]).max_concurrent == 3
