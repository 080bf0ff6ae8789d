"""nest_core.stores.ray_index on the tiny random Llama: the plan is the batching one process runs,
arrays travel bit-exact, and on a real local Ray cluster the span files are byte for byte
those :func:`nest_core.stores.ingest.precompute` writes (fresh, partly cached, duplicated passages).

The Ray tests start a 2-CPU local cluster once for the module and skip where Ray is not
installed; the others need no Ray.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch
from conftest import TINY_CORPUS, make_tiny_model

from nest_core.app.cli import main
from nest_core.config import NestConfig
from nest_core.encoding import EncodedPassage, PassageEncoder
from nest_core.lm import LanguageModel
from nest_core.stores.datastore import SpanDatastore
from nest_core.stores.ingest import precompute
from nest_core.stores.ray_index import (
    RAY_INSTALL,
    RayOptions,
    RayPrecompute,
    WorkerStartError,
    decode_row,
    encode_arrays,
    import_ray,
    plan_groups,
    precompute_on_ray,
)
from nest_core.types import Passage

CFG = NestConfig()


class RecordingLM(LanguageModel):
    """The real tiny LM, recording the batch size of every encoding forward."""

    def __init__(self, lm: LanguageModel) -> None:
        super().__init__(lm.model, lm.tokenizer, name=lm.name)
        self.batches: list[int] = []

    def encode_hidden(self, input_ids, attention_mask, key_layer):
        self.batches.append(int(input_ids.shape[0]))
        return super().encode_hidden(input_ids, attention_mask, key_layer)


def corpus() -> list[Passage]:
    """27 passages: p5/p7 share a text (one slice), p24 repeats p1 (a later slice)."""
    out = [Passage(f"p{i}", f"{TINY_CORPUS[i % len(TINY_CORPUS)]} Entry {i}.", title=f"T{i % 4}")
           for i in range(27)]
    out[7] = Passage("p7", out[5].text, title=out[5].title)
    out[24] = Passage("p24", out[1].text, title=out[1].title)
    return out


def files(store: SpanDatastore) -> dict[str, bytes]:
    return {str(f.relative_to(store.path)): f.read_bytes()
            for f in sorted(store.path.rglob("*.span"))}


def keys_of(lm: LanguageModel, passages: list[Passage]) -> list[str]:
    enc = PassageEncoder(lm, key_layer=CFG.key_layer, max_passage_tokens=CFG.max_passage_tokens)
    return [enc.cache_key(p) for p in passages]


def test_plan_is_the_batching_of_one_process(tiny_lm, tmp_path):
    passages = corpus()
    warm = [passages[3], passages[12], passages[21]]
    store = SpanDatastore(tmp_path / "a")
    precompute(warm, tiny_lm, datastore=store, config=CFG, progress=False)
    plan = plan_groups(keys_of(tiny_lm, passages), store)
    # Slice 0..19 without the cached 3 and 12: 18 misses (p5 and p7 both) -> 10 + 8;
    # slice 20..26 without the cached 21 and p24 (p1, put by slice 0) -> 5.
    assert [g.indices for g in plan.groups] == [
        (0, 1, 2, 4, 5, 6, 7, 8, 9, 10), (11, 13, 14, 15, 16, 17, 18, 19), (20, 22, 23, 25, 26)]
    assert plan.cached == 4
    # ... and those are the forwards precompute runs over the same datastore.
    recording = RecordingLM(tiny_lm)
    precompute(passages, recording, datastore=store, config=CFG, progress=False)
    assert recording.batches == [len(g.indices) for g in plan.groups]
    assert plan_groups(keys_of(tiny_lm, passages), store).groups == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_encoded_arrays_travel_bit_exact(dtype, rows):
    torch.manual_seed(rows)
    enc = EncodedPassage(keys=torch.randn(rows, 5).to(dtype),
                         values=torch.randint(0, 50_000, (rows,)),
                         char_spans=torch.randint(-1, 900, (rows, 2), dtype=torch.int32))
    got = decode_row(encode_arrays(enc))
    assert got.keys.dtype == dtype
    assert got.keys.view(torch.uint8).tolist() == enc.keys.view(torch.uint8).tolist()
    assert torch.equal(got.values, enc.values)
    assert torch.equal(got.char_spans, enc.char_spans)


def test_a_datastore_that_holds_everything_starts_no_cluster(tiny_lm, tmp_path):
    passages = corpus()
    store = SpanDatastore(tmp_path / "a")
    rows = precompute(passages, tiny_lm, datastore=store, config=CFG, progress=False)
    before = files(store)
    report = precompute_on_ray(passages, tiny_lm, datastore=store, config=CFG, progress=False,
                               options=RayOptions(address="ray://nowhere.invalid:10001"))
    assert (report.encoded, report.groups, report.cached) == (0, 0, len(passages))
    assert report.rows == rows  # the same count precompute returns
    assert files(store) == before
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_options_and_a_missing_ray_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="workers=0"):
        RayOptions(workers=0)
    with pytest.raises(ValueError, match="'auto'"):
        RayOptions(address=" ")
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when absent
    with pytest.raises(ImportError) as err:
        import_ray()
    assert RAY_INSTALL in str(err.value)
    assert RAY_INSTALL == 'pip install "ray[data]>=2.40"'


def test_cli_ray_flags_need_ray_and_a_datastore(tmp_path, capsys):
    doc = tmp_path / "a.txt"
    doc.write_text("The Zephyr Widget Company was founded in 1987.", encoding="utf-8")
    assert main(["index", str(doc), "--out", str(tmp_path / "s"), "--ray-workers", "2"]) == 1
    assert "--ray-workers and --ray-address apply with --ray" in capsys.readouterr().err
    assert main(["index", str(doc), "--out", str(tmp_path / "s"), "--ray",
                 "--no-precompute"]) == 1
    assert "--no-precompute" in capsys.readouterr().err
    assert main(["index", "--from-store", str(tmp_path), "--ray-address", "auto"]) == 1
    assert "add --ray" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_an_address_nobody_answers_fails_fast_with_the_fix(tiny_lm, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()  # runs before the module's cluster starts
    with pytest.raises(ConnectionError) as err:
        precompute_on_ray(corpus()[:2], tiny_lm, datastore=SpanDatastore(tmp_path),
                          config=CFG, progress=False, options=RayOptions(address="127.0.0.1:1"))
    assert "--ray-address 127.0.0.1:1" in str(err.value)
    assert "ray start --head" in str(err.value)
    assert not ray.is_initialized()


# --- on a real local Ray cluster ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A 2-CPU local cluster for the module (RayPrecompute uses a running one as it is)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_writes_the_files_precompute_writes(cluster, tiny_lm, tmp_path):
    passages = corpus()
    one, many = SpanDatastore(tmp_path / "one"), SpanDatastore(tmp_path / "ray")
    for store in (one, many):  # both start partly filled, as a re-index does
        precompute(passages[3:6], tiny_lm, datastore=store, config=CFG, progress=False)
    rows = precompute(passages, tiny_lm, datastore=one, config=CFG, progress=False)
    # the workers load their own copy: the same weights (seed 0), none of the state other
    # tests may have hung on the session model (hooks, handlers), which need not pickle
    fresh = LanguageModel(make_tiny_model(len(tiny_lm.tokenizer)), tiny_lm.tokenizer,
                          name=tiny_lm.name)
    encode = RayPrecompute(RayOptions(workers=2), load=lambda: fresh)
    assert encode(passages, tiny_lm, datastore=many, config=CFG, progress=False) == rows
    report = encode.last_report
    assert report is not None
    # cached: p3, p4, p5, p7 (p5's text) and p24 (p1's, encoded in the first slice)
    assert (report.groups, report.encoded, report.cached) == (3, 22, 5)
    assert report.workers  # encoded in the workers' processes, not here
    assert all(not w.endswith(f":{os.getpid()}") for w in report.workers)
    written = files(many)
    assert written == files(one)
    assert len(written) == 25  # 27 passages, two of them repeated


@pytest.mark.slow
def test_a_worker_with_another_model_fails_with_the_fix(cluster, tiny_lm, tmp_path):
    other = LanguageModel(make_tiny_model(len(tiny_lm.tokenizer), seed=1), tiny_lm.tokenizer,
                          name=tiny_lm.name)
    store = SpanDatastore(tmp_path / "ray")
    with pytest.raises(WorkerStartError, match="fingerprint") as err:
        precompute_on_ray(corpus()[:4], tiny_lm, datastore=store, config=CFG, progress=False,
                          options=RayOptions(workers=1), load=lambda: other)
    assert "same model files" in str(err.value)
    assert "\n" not in str(err.value)
    assert files(store) == {}



# --- the benchmark's own code (run by hand: python -m benchmarks.bench_ray_index) ------------
def test_bench_measures_and_compares_datastores(tiny_lm, tmp_path):
    from benchmarks.bench_ray_index import corpus as bench_corpus
    from benchmarks.bench_ray_index import encode_single, markdown, measure

    source, passages = bench_corpus(30)
    assert source in ("foldoc", "handbook")
    assert len(passages) == 30 == len({p.id for p in passages})
    assert len(set(keys_of(tiny_lm, passages))) == 30  # every passage is new work
    systems = [("one", 1, 2, encode_single(2)), ("one, 1 thread", 1, 1, encode_single(1))]
    rows = measure(passages[:12], tiny_lm, systems, small=4, workdir=tmp_path)
    assert [(r.system, r.passages, r.small_passages, r.identical) for r in rows] == [
        ("one", 12, 4, None), ("one, 1 thread", 12, 4, True)]
    table = markdown(rows).splitlines()
    assert len(table) == 4
    assert table[2].startswith("| one | 1 x 2 | 12 |")
    assert table[2].endswith("| reference |")
    assert table[3].endswith("| yes |")
