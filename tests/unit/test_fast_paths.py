"""The decoder's shortcuts are lossless: the same token ids, rows and spans as the slow path.

Each shortcut is checked against a generation with ``SLOW_SEARCH`` shortcuts, the slow path
(every fed position searched, λ from the sorted top-k), over settings that make both paths
differ in work: ``verify_against="lm"`` (drafts judged by p_LM), r below and above the
number of rows, λ on either side of δ.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import pytest
import torch
from conftest import LATE, PASSAGES, PROMPT, SLOW_SEARCH, TINY_CORPUS

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.config import default_config
from nest_core.decoding.beliefs import Belief
from nest_core.decoding.loop import Generation
from nest_core.decoding.output import Output
from nest_core.decoding.policy import FAST, Shortcuts
from nest_core.decoding.stops import RepetitionStop, StopStrings
from nest_core.lm import LanguageModel
from nest_core.types import DecodeStats, NestResult

pytestmark = pytest.mark.usefixtures("one_thread")

MORE = [*PASSAGES, Passage("u", TINY_CORPUS[5]), Passage("c", TINY_CORPUS[2], title="C")]
PROMPTS = [PROMPT, "Tell me about nearest neighbor decoding and the quick brown fox.",
           "The quick brown fox jumps"]
LM_JUDGED = NestConfig(confidence_offset=1.0, relaxation=1.0, span_length=8,
                       initial_span_length=2, verify_against="lm")
CONFIGS = {
    "default": default_config("tiny"),
    "default-r8": default_config("tiny", num_neighbors=8),
    "default-r3-drafty": default_config("tiny", num_neighbors=3, confidence_offset=1.0),
    "default-drafty": default_config("tiny", confidence_offset=1.0, span_passages=None),
    "lm": LM_JUDGED,
    "lm-r5": LM_JUDGED.with_overrides(num_neighbors=5, initial_span_length=1,
                                      end_with_lm=True, repetition_stop=4),
    "lm-norm": LM_JUDGED.with_overrides(confidence_reference="norm", num_neighbors=7,
                                        confidence_offset=0.9),
    "mixture": NestConfig(confidence_offset=0.3, relaxation=0.9, span_length=8,
                          initial_span_length=2),
}


@dataclasses.dataclass
class Searches:
    """The real index, counting its distance scans and sorted top-k searches."""

    scans: int = 0
    sorted: int = 0

    @property
    def unsorted(self) -> int:
        """Scans whose λ said no span can start: no sorted top-k was needed."""
        return self.scans - self.sorted


def count_searches(index: Any) -> Searches:
    counts = Searches()
    distances, nearest = index.distances, index.nearest

    def counted_distances(queries: torch.Tensor) -> torch.Tensor:
        counts.scans += 1
        return distances(queries)

    def counted_nearest(*args: Any, **kwargs: Any) -> Any:
        counts.sorted += 1
        return nearest(*args, **kwargs)

    index.distances, index.nearest = counted_distances, counted_nearest
    return counts


def run(lm: LanguageModel, config: NestConfig, prompt: str,
        shortcuts: Shortcuts = FAST) -> tuple[Generation, NestResult, Searches]:
    dec = NestDecoder(lm, config)
    stats = DecodeStats()
    index = dec._index(MORE, stats)
    counts = count_searches(index)
    gen = Generation(lm, config, lm.prompt_ids(prompt), MORE, index, max_new_tokens=40,
                     stop=[], stats=stats, started=time.perf_counter(),
                     prompt_truncated=False, shortcuts=shortcuts)
    result = list(gen.run())[-1].result
    assert result is not None
    return gen, result, counts


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shortcuts_give_the_reference_output(tiny_lm, name):
    # caught: λ from max instead of the r-th smallest distance; the skip taken where λ < δ;
    # a draft's positions left unsearched in mixture mode; the norm reference taken fast;
    # span starters missing the rows of a top passage, or a focus row
    config = CONFIGS[name]
    for prompt in PROMPTS:
        gen, fast, _ = run(tiny_lm, config, prompt)
        ref, slow, _ = run(tiny_lm, config, prompt, SLOW_SEARCH)
        assert fast.token_ids == slow.token_ids, (name, prompt)
        assert gen.out.rows == ref.out.rows, (name, prompt)
        assert fast.spans == slow.spans
        assert fast.stats.lm_forwards == slow.stats.lm_forwards
        assert fast.finish_reason == slow.finish_reason


def test_the_shortcuts_are_taken(tiny_lm):
    # the equality above must compare two different computations
    runs = [run(tiny_lm, CONFIGS[name], p) for name in ("default", "default-r8")
            for p in PROMPTS]
    assert sum(c.unsorted for _, _, c in runs) > 5  # λ ≥ δ without a top-k
    # no search where no span may start with the LM's choice: fewer than one per forward
    assert sum(c.scans for _, _, c in runs) < 0.8 * sum(r.stats.lm_forwards
                                                        for _, r, _ in runs)
    # the reference path takes none of them
    slow = [run(tiny_lm, CONFIGS["default"], p, SLOW_SEARCH)[2] for p in PROMPTS]
    assert sum(c.unsorted for c in slow) == 0


@pytest.mark.parametrize("k", [1, 3, 7, 1000])
def test_fast_lambda_equals_lambda_of_the_sorted_neighbours(tiny_lm, k):
    # caught: max or (k-1)-th instead of k-th smallest distance; k not clamped to the
    # active rows; masked rows counted
    config = NestConfig(num_neighbors=k, verify_against="lm")
    dec = NestDecoder(tiny_lm, config)
    index = dec._index(MORE, DecodeStats())
    assert index is not None
    index.mask([5, 6, 7])
    gen = Generation(tiny_lm, config, [], MORE, index, max_new_tokens=4, stop=[],
                     stats=DecodeStats(), started=0.0, prompt_truncated=False)
    hidden = tiny_lm.forward(tiny_lm.prompt_ids(PROMPT), tiny_lm.new_cache(), -2).hidden
    d2 = index.distances(hidden)  # [T, N]
    found = index.nearest(d2, k)
    assert found is not None
    confidence = gen.judge.confidence  # type: ignore[attr-defined]
    fast = confidence.quick(d2)
    assert fast is not None
    assert torch.equal(fast, confidence.of(hidden, found))
    assert k == 1 or fast.max() - fast.min() > 0.05, "λ must vary over the positions"


def test_row_max_is_torch_max_with_first_index_on_ties():
    # caught: the last tied index (numpy on the reversed row), the max of another row
    from nest_core.decoding.mixture import row_max

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=gen)
    x[1, [7, 200]] = 9.0  # a tie: the first index wins
    x[2, 50] = float("nan")  # NaN is the max, as in torch
    x[3] = 0.0
    values, indices = row_max(x)
    best = x.max(dim=-1)
    assert indices == best.indices.tolist() == [indices[0], 7, 50, 0, indices[4]]
    assert values[1] == 9.0
    assert str(values) == str(best.values.tolist())  # NaN compares unequal: as text
    assert row_max(x.double())[1] == indices


def test_span_starters_are_the_tokens_the_proposer_can_start_a_span_with(tiny_lm):
    # caught: starters missing a focus row's token or a top passage's, or holding a masked
    # row's token only (oracle: the real proposer, shown every active row as a neighbour)
    from nest_core.focus import best_sentences

    config = default_config("tiny", span_passages=2)
    dec = NestDecoder(tiny_lm, config)
    index = dec._index(MORE, DecodeStats())
    assert index is not None
    focus = best_sentences(PROMPT, MORE, 2)
    starts = index.rows_within([(f.passage_index, f.start, f.end) for f in focus])
    index.mask([int(r) for r in starts.nonzero()[:3, 0]])
    gen = Generation(tiny_lm, config, [], MORE, index, span_starts=starts, max_new_tokens=4,
                     stop=[], stats=DecodeStats(), started=0.0, prompt_truncated=False)
    spans = gen.drafters.drafters[0]
    found = index.search(torch.zeros(1, index.dim), k=index.num_rows)
    assert found is not None
    can_start = set()
    for token in range(tiny_lm.vocab_size):
        belief = Belief(top_token=token, top_prob=1.0, lam=0.0, neighbors=found,
                        scaled_logits=torch.zeros(1), lse=None, weights=None,
                        values=index.values[found.rows[0]], logits=torch.zeros(1),
                        hidden=torch.zeros(index.dim))
        if spans.rows(belief, None, 1):  # type: ignore[attr-defined]
            can_start.add(token)
    assert gen.judge.starters == can_start  # type: ignore[attr-defined]
    assert 0 < len(can_start) < len(set(index.values.tolist()))


@pytest.mark.parametrize("temperature", [0.7, 0.3, 1.0, 2.0])
def test_scaled_row_max_is_row_max_of_the_divided_rows(temperature):
    # caught: the raw argmax kept where rounding ties an earlier, smaller logit with the
    # max; the raw max returned unscaled; a tie checked on the float above the max
    from nest_core.decoding.mixture import row_max, scaled_row_max

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 300, generator=gen)
    ties = 0
    for i in range(30):  # the max at 250, the float just below it earlier, at 20 + i
        top = torch.tensor(20.0 + i / 3)  # [16, 32): its scaled values are 2x as sparse
        x[i, 250] = top
        x[i, 20 + i] = torch.nextafter(top, torch.tensor(-math.inf))
        ties += bool(x[i, 20 + i] / temperature == top / temperature)
    x[30, [5, 9]] = 7.0  # an exact tie: the first index
    x[31, 40] = math.inf
    x[32, 41] = math.nan
    x[33] = -math.inf
    x[34, 3], x[34, 4] = 3.4e38, 3.3e38  # both overflow to inf when scaled by 1/0.3
    assert temperature >= 1.0 or ties > 3, "the rows must hold rounding ties"
    for rows in (x, x.double()):
        expected = row_max(rows / temperature)
        got = scaled_row_max(rows, temperature)
        assert got[1] == expected[1]
        assert str(got[0]) == str(expected[0])  # NaN compares unequal: as text


def test_lm_ratio_is_the_ratio_of_the_scaled_row():
    # caught: the temperature applied to the difference instead of to each logit
    # (a different float), or not at all
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(500, generator=gen) * 8
    scaled = logits / 0.7
    lazy = Belief(top_token=0, top_prob=math.nan, lam=1.0, neighbors=None, scaled_logits=None,
                  lse=None, weights=None, values=None, logits=logits, hidden=torch.zeros(1),
                  lm_max=float(scaled.max()), temperature=0.7)
    full = dataclasses.replace(lazy, scaled_logits=scaled, lm_max=None)
    for token in range(500):
        assert lazy.lm_ratio(token) == full.lm_ratio(token)
        assert float(torch.exp(scaled[token] - scaled.max())) == lazy.lm_ratio(token)


def test_streaming_a_drafts_first_token_early_changes_no_output(tiny_lm):
    # caught: the first token accepted twice, or lost, when the rest is rejected or taken;
    # its row not masked when it ends the answer
    early_first = late_first = 0
    for name in sorted(CONFIGS):
        config = CONFIGS[name]
        for prompt in PROMPTS:
            for budget in (1, 3, 40):
                dec = NestDecoder(tiny_lm, config)
                out = {}
                for shortcuts in (FAST, LATE):
                    stats = DecodeStats()
                    gen = Generation(tiny_lm, config, tiny_lm.prompt_ids(prompt), MORE,
                                     dec._index(MORE, stats), max_new_tokens=budget, stop=[],
                                     stats=stats, started=time.perf_counter(),
                                     prompt_truncated=False, shortcuts=shortcuts)
                    chunks, first = [], None
                    for chunk in gen.run():
                        if chunk.text and first is None:
                            first = stats.lm_forwards  # forwards run before the first text
                        chunks.append(chunk)
                    out[shortcuts] = (chunks, first, gen)
                (fast, f_first, f_gen), (slow, s_first, s_gen) = out[FAST], out[LATE]
                res, ref = fast[-1].result, slow[-1].result
                assert res is not None
                assert ref is not None
                assert res.token_ids == ref.token_ids, (name, prompt, budget)
                assert (res.text, res.spans, res.finish_reason) == (
                    ref.text, ref.spans, ref.finish_reason)
                assert [t for c in fast for t in c.token_ids] == res.token_ids
                assert f_gen.out.rows == s_gen.out.rows
                assert torch.equal(f_gen.index.active, s_gen.index.active)
                if f_first is not None and s_first is not None:
                    assert f_first <= s_first
                    early_first += f_first < s_first
                    late_first += 1
    assert early_first > 0, "some first text must come a forward sooner"


def test_a_drafts_first_token_waits_when_the_draft_repeats_the_output_from_it(tiny_lm):
    # caught: streams_first always true (the repetition cut would then keep a token the
    # whole-draft cut drops)
    stop = RepetitionStop(3)
    out = Output(tiny_lm.decode, None, token_stops=[stop], stop_strings=StopStrings([]),
                 max_new_tokens=40, stats=DecodeStats(), started=0.0)
    out.ids = [1, 2, 3, 4, 5]
    assert stop.keep(out.ids, [3, 4, 5]) == 0
    assert not out.streams_first([3, 4, 5])  # the repeat 3 4 5 starts at the first token
    assert out.streams_first([9, 3, 4, 5])  # it starts after it: the first token is kept
    assert out.streams_first([4, 5, 1])  # no repeat
