"""The decoder's shortcuts are lossless: the same token ids, rows and spans as the slow path.

Each shortcut is checked against a :class:`Reference` generation that takes the slow path
(every fed position searched, λ from the sorted top-k), over settings that make both paths
differ in work: ``verify_against="lm"`` (drafts judged by p_LM), r below and above the
number of rows, λ on either side of δ.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import PASSAGES, PROMPT, TINY_CORPUS

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.config import default_config
from nest_core.generation import Generation
from nest_core.lm import LanguageModel
from nest_core.proposer import Belief
from nest_core.types import DecodeStats, NestResult

MORE = [*PASSAGES, Passage("u", TINY_CORPUS[5]), Passage("c", TINY_CORPUS[2], title="C")]
PROMPTS = [PROMPT, "Tell me about nearest neighbor decoding and the quick brown fox.",
           "The quick brown fox jumps"]
LM_JUDGED = NestConfig(confidence_offset=1.0, relaxation=1.0, span_length=8,
                       initial_span_length=2, verify_against="lm")
CONFIGS = {
    "default": default_config("tiny"),
    "default-r8": default_config("tiny", num_neighbors=8),
    "default-r3-drafty": default_config("tiny", num_neighbors=3, confidence_offset=1.0),
    "lm": LM_JUDGED,
    "lm-r5": LM_JUDGED.with_overrides(num_neighbors=5, initial_span_length=1,
                                      end_with_lm=True, repetition_stop=4),
    "lm-norm": LM_JUDGED.with_overrides(confidence_reference="norm", num_neighbors=7,
                                        confidence_offset=0.9),
    "mixture": NestConfig(confidence_offset=0.3, relaxation=0.9, span_length=8,
                          initial_span_length=2),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Reference(Generation):
    """The slow path: every fed position searched, λ always from the sorted neighbours."""

    def beliefs(self, logits: torch.Tensor, hidden: torch.Tensor, search: bool = True
                ) -> list[Belief]:
        return super().beliefs(logits, hidden, search=True)

    def fast_confidence(self, d2: torch.Tensor) -> torch.Tensor | None:
        return None


class Counting(Generation):
    """The real path, counting the searches that skipped the sorted top-k."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsorted = 0

    def fast_confidence(self, d2: torch.Tensor) -> torch.Tensor | None:
        lam = super().fast_confidence(d2)
        self.unsorted += lam is not None and bool((lam >= self.cfg.span_threshold).all())
        return lam


def run(lm: LanguageModel, config: NestConfig, prompt: str, cls: type[Generation]
        ) -> tuple[Generation, NestResult]:
    dec = NestDecoder(lm, config)
    stats = DecodeStats()
    index = dec._index(MORE, stats)
    gen = cls(lm, config, lm.prompt_ids(prompt), MORE, index, max_new_tokens=40, stop=[],
              stats=stats, started=time.perf_counter(), prompt_truncated=False,
              question_ids=lm.tokenizer.encode(prompt) if config.question_drafts else None)
    result = list(gen.run())[-1].result
    assert result is not None
    return gen, result


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shortcuts_give_the_reference_output(tiny_lm, name):
    # caught: λ from max instead of the r-th smallest distance; the skip taken where λ < δ;
    # a draft's positions left unsearched in mixture mode; the norm reference taken fast
    config = CONFIGS[name]
    for prompt in PROMPTS:
        gen, fast = run(tiny_lm, config, prompt, Counting)
        ref, slow = run(tiny_lm, config, prompt, Reference)
        assert fast.token_ids == slow.token_ids, (name, prompt)
        assert gen.rows == ref.rows, (name, prompt)
        assert fast.spans == slow.spans
        assert fast.stats.lm_forwards == slow.stats.lm_forwards
        assert fast.finish_reason == slow.finish_reason


def test_the_shortcut_is_taken(tiny_lm):
    # the equality above must compare two different computations
    skipped = sum(run(tiny_lm, CONFIGS[name], p, Counting)[0].unsorted
                  for name in ("default", "default-r8") for p in PROMPTS)
    assert skipped > 10


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
    fast = gen.fast_confidence(d2)
    assert fast is not None
    assert torch.equal(fast, gen.confidence(hidden, found))
    assert k == 1 or fast.max() - fast.min() > 0.05, "λ must vary over the positions"
