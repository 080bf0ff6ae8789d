"""``nest index --ray`` as a user runs it, with the real SmolLM2 and a real local Ray: the span
datastore is byte for byte the one single-process indexing writes, for files (a local
cluster the command starts) and for an existing store (``--from-store``, a cluster already
running, joined with ``--ray-address``); ``nest ask`` over the Ray-built store cites it.

Twelve one-passage files, so the plan has two groups (one per worker) and each encodes in
about a second; process starts (model, Ray, workers) are most of the time.
The joined cluster runs one worker, which takes both groups in turn.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nest_core.stores.datastore import SpanDatastore, decode_entry

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FACT = "The Zephyr Widget Company was founded in 1987 by Marta Quillfeather in Ostrava."
TOPICS = ["leave policy", "travel expenses", "the cafeteria", "parking", "laptops",
          "the library", "fire drills", "the bicycle shed", "visitors", "the garden",
          "night shifts"]
QUESTION = "Who founded the Zephyr Widget Company?"
_SCRIPT = Path(sys.executable).with_name("nest")
NEST = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "nest_core.app.cli"]


def nest(*args: str) -> subprocess.CompletedProcess[str]:
    """``nest ARGS`` as a user runs it (offline), output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    return subprocess.run([*NEST, *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_corpus")
    (root / "history.md").write_text(f"# Zephyr history\n\n{FACT} It makes brass widgets "
                                     f"for clock towers.\n", encoding="utf-8")
    for i, topic in enumerate(TOPICS):
        (root / f"note{i:02d}.txt").write_text(
            f"Zephyr note on {topic}\n\nThe rule on {topic} at the Zephyr Widget Company was "
            f"last changed in {1990 + i}. Ask the office in Ostrava about {topic}; room "
            f"{100 + 7 * i} keeps the forms.\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def single(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same files indexed in one process."""
    out = tmp_path_factory.mktemp("single") / "store"
    proc = nest("index", str(corpus), "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "12 passages from 12 file(s)" in proc.stderr
    return out


@pytest.fixture(scope="module")
def on_ray(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ray") / "store"
    proc = nest("index", str(corpus), "--out", str(out), "--ray", "--ray-workers", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def spans(store: Path) -> dict[str, bytes]:
    root = store / "nest_spans"
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*.span"))}


def assert_same_datastore(got: Path, want: Path) -> None:
    a, b = spans(got), spans(want)
    assert len(b) == 12
    assert sorted(a) == sorted(b)  # the same files (one per passage, named by its key)
    for name, data in b.items():
        key = json.loads(data[16:16 + int.from_bytes(data[12:16], "little")])["key"]
        mine, theirs = decode_entry(a[name], key), decode_entry(data, key)
        assert mine.keys.dtype == theirs.keys.dtype == torch.float16
        assert torch.equal(mine.keys, theirs.keys), name  # identical key arrays
        assert torch.equal(mine.values, theirs.values)
        assert torch.equal(mine.char_spans, theirs.char_spans)
        assert a[name] == data  # and so identical bytes


def test_index_on_a_local_ray_writes_the_single_process_datastore(on_ray, single):
    out, stderr = on_ray
    assert "Ray: 12 passage(s) encoded on 2 worker(s), 0 already in the datastore" in stderr
    assert "Traceback" not in stderr
    assert_same_datastore(out, single)


@pytest.fixture(scope="module")
def running_cluster() -> Iterator[str]:
    """A 2-CPU cluster this test process starts (and stops): the address a user passes."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_from_store_on_a_running_cluster_writes_the_same_datastore(
        single, running_cluster, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(single, store, ignore=shutil.ignore_patterns("nest_spans"))
    # one worker: the two groups in turn (two were tested above; this is about the address)
    proc = nest("index", "--from-store", str(store), "--ray", "--ray-address",
                running_cluster, "--ray-workers", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "12 passages encoded" in proc.stderr
    assert "Ray: 12 passage(s) encoded on 1 worker(s)" in proc.stderr
    assert_same_datastore(store, single)


def test_ask_over_the_ray_built_store_cites_it(on_ray):
    out, _ = on_ray
    proc = nest("ask", QUESTION, "--store", str(out), "--json", "--max-new-tokens", "32")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["nest"]
    assert result["spans"], result["text"]
    texts = {p["id"]: p["text"] for p in result["passages"]}
    for span in result["spans"]:
        assert texts[span["passage_id"]][span["src_start"]:span["src_end"]] == span["text"]
    assert any(s["title"] == "Zephyr history" for s in result["spans"]), result["spans"]
    # the answer used the Ray-written keys: nothing was encoded at question time
    assert len(SpanDatastore.for_store(out)) == 12
