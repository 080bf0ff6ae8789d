"""Keys and retrieval confidence on the real SmolLM2: what the decoder searches means what
it should, whatever the passages' titles, windows or number."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from nest_core import NestConfig, Passage
from nest_core.decoding.mixture import norm_reference, retrieval_confidence
from nest_core.encoding import MemoryKeyCache, PassageEncoder, _windows, passage_string
from nest_core.stores.ingest import Document, chunk_document
from nest_core.token_index import TokenIndex

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
KEYS = MemoryKeyCache()  # the handbook is encoded once for the whole module


def handbook() -> list[Passage]:
    docs = [Document(text=p.read_text(encoding="utf-8"), title=p.stem, id=p.stem)
            for p in sorted(DATA.glob("*.md"))]
    return [p for d in docs for p in chunk_document(d)]


def untitled(passages: list[Passage]) -> list[Passage]:
    return [Passage(id=p.id, text=p.text) for p in passages]


def decoder_states(lm, passage: Passage, layer: int) -> torch.Tensor:
    """The key-layer states the decoder itself computes (cached forward, one sequence) for
    BOS + the passage string: row j is what a query after that context looks like."""
    text, _ = passage_string(passage)
    ids = lm.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    out = lm.forward([lm.tokenizer.bos_token_id, *ids], lm.new_cache(), layer)
    return out.hidden[:-1]  # [T, D]: contexts 0 .. T-1 (the last token predicts nothing)


def test_a_passages_own_states_find_their_own_rows(smollm):
    # 40-token windows split every passage in 3-4: the first keys of each later window must
    # still have real preceding context (overlapping windows), or they would be far from
    # the decoder's states for the same context
    passages = handbook()[:3]
    enc = PassageEncoder(smollm, key_layer=-2, max_passage_tokens=40)
    index = TokenIndex(passages, enc.encode(passages), smollm.vocab_size)
    hits: list[bool] = []
    at_window_start: list[bool] = []
    for pi, p in enumerate(passages):
        states = decoder_states(smollm, p, -2)  # [T, D]
        start = int(index.row_start[pi])
        firsts = {a + keep + k for a, _, keep in _windows(states.shape[0] + 1, 40)[1:]
                  for k in range(3)}
        rows = [r for r in range(start, start + states.shape[0]) if index.active[r]]
        found = index.search(states[[r - start for r in rows]], 1)
        assert found is not None
        hits += [a == b for a, b in zip(found.rows[:, 0].tolist(), rows, strict=True)]
        at_window_start += [r - start in firsts for r in rows]
    starts = [h for h, w in zip(hits, at_window_start, strict=True) if w]
    assert len(hits) > 200
    assert len(starts) >= 12
    assert sum(hits) / len(hits) >= 0.9
    assert sum(starts) / len(starts) >= 0.8, f"window starts: {sum(starts)}/{len(starts)}"


def test_row_zero_is_never_searched(smollm):
    # position-0 keys (BOS) have ~300x the squared norm of the others: they must be inactive
    passages = untitled(handbook()[:4])
    enc = PassageEncoder(smollm, key_layer=-2)
    index = TokenIndex(passages, enc.encode(passages), smollm.vocab_size)
    assert not index.active[index.row_start].any()
    active_sq = index.key_sq[index.active]
    assert float(active_sq.max()) < 10 * float(active_sq.median())


def lambdas(smollm, passages: list[Passage], reference: str) -> list[float]:
    """λ at each position of one answer-like text, against an index of ``passages``."""
    cfg = NestConfig(confidence_reference=reference)
    enc = PassageEncoder(smollm, key_layer=cfg.key_layer, cache=KEYS)
    index = TokenIndex(passages, enc.encode(passages), smollm.vocab_size)
    prompt = smollm.prompt_ids("What is the paid leave allowance?")
    answer = smollm.tokenizer("The paid leave allowance is 27 days per year.",
                              add_special_tokens=False)["input_ids"]
    hidden = smollm.forward([*prompt, *answer], smollm.new_cache(), cfg.key_layer).hidden
    hidden = hidden[len(prompt) - 1:]  # [A+1, D]: the answer's positions
    found = index.search(hidden, cfg.num_neighbors)
    assert found is not None
    ref = (norm_reference(hidden, index.key_sq[found.rows[:, 0]])
           if reference == "norm" else None)
    lam = retrieval_confidence(found.dist2, 0.05, 0.02, ref)
    return lam.tolist()


def test_norm_confidence_means_the_same_for_2_passages_and_for_all(smollm):
    everything = handbook()
    gold = [p for p in everything if "27 days" in p.text]
    two = [*gold, next(p for p in everything if p not in gold)]
    assert len(two) == 2
    assert len(everything) > 20
    small, large = lambdas(smollm, two, "norm"), lambdas(smollm, everything, "norm")
    # the same nearest rows are found; adding passages can only bring a nearer key
    assert statistics.median(small) == pytest.approx(statistics.median(large), abs=0.05)
    paper_small = lambdas(smollm, two, "farthest")
    paper_large = lambdas(smollm, everything, "farthest")
    # the paper's ratio compares with the farthest of r (clamped) neighbours: its scale moves
    assert abs(statistics.median(paper_small) - statistics.median(paper_large)) > \
        abs(statistics.median(small) - statistics.median(large))


def test_norm_confidence_does_not_depend_on_titles(smollm):
    passages = handbook()
    titled, bare = lambdas(smollm, passages, "norm"), lambdas(smollm, untitled(passages), "norm")
    assert statistics.median(titled) == pytest.approx(statistics.median(bare), abs=0.05)
