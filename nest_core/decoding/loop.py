"""One generation: the step of Nest (Algorithm 1 of the paper) in one short loop.

Each step costs ONE LM forward: the pass that verifies a draft also gives the beliefs and
the kNN query for the position after it, so the next step starts without another forward.
What the step is made of was chosen when the generation was set up
(:func:`nest_core.decoding.policy.plan`): the loop reads no setting.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from nest_core.attribution import NO_SOURCE
from nest_core.config import NestConfig
from nest_core.decoding.beliefs import Belief
from nest_core.decoding.drafters import Draft
from nest_core.decoding.output import Output
from nest_core.decoding.policy import FAST, Shortcuts, plan
from nest_core.decoding.stops import StopStrings
from nest_core.lm import LanguageModel
from nest_core.token_index import TokenIndex
from nest_core.types import DecodeStats, NestChunk, Passage

if TYPE_CHECKING:
    import torch

    from nest_core.batching import ForwardBatcher


class Trace(Protocol):
    """Sees each step of the loop (tests record what the loop proposes, feeds and keeps)."""

    def proposed(self, gen: Generation, belief: Belief, draft: Draft | None) -> None: ...

    def fed(self, gen: Generation, ids: Sequence[int], beliefs: list[Belief]) -> None: ...

    def accepted(self, gen: Generation, tokens: list[int], rows: list[int]) -> None: ...


class NoTrace:
    def proposed(self, gen: Generation, belief: Belief, draft: Draft | None) -> None:
        pass

    def fed(self, gen: Generation, ids: Sequence[int], beliefs: list[Belief]) -> None:
        pass

    def accepted(self, gen: Generation, tokens: list[int], rows: list[int]) -> None:
        pass


class Generation:
    """Decodes one answer. Built by :class:`~nest_core.decoder.NestDecoder`; not reusable.

    ``shortcuts``: the lossless speed-ups (:data:`~nest_core.decoding.policy.REFERENCE`
    is the exact path they must equal); ``trace``: an observer of the loop's steps;
    ``batcher``: runs this generation's forwards together with those of the other
    generations of the model (:mod:`nest_core.batching`), instead of one by one.
    """

    def __init__(self, lm: LanguageModel, config: NestConfig, prompt_ids: list[int],
                 passages: Sequence[Passage], index: TokenIndex | None, *,
                 max_new_tokens: int, stop: Sequence[str], stats: DecodeStats,
                 started: float, prompt_truncated: bool,
                 span_starts: torch.Tensor | None = None, shortcuts: Shortcuts = FAST,
                 trace: Trace | None = None, batcher: ForwardBatcher | None = None) -> None:
        self.lm, self.index, self.stats = lm, index, stats
        self.batcher = batcher
        self.prompt_ids, self.passages = prompt_ids, list(passages)
        self.prompt_truncated, self.shortcuts = prompt_truncated, shortcuts
        self.trace: Trace = trace or NoTrace()
        self.plan = plan(lm, config, index, prompt_ids, stats, span_starts=span_starts,
                         shortcuts=shortcuts)
        self.judge, self.drafters = self.plan.judge, self.plan.drafters
        self.out = Output(lm.decode, index, token_stops=self.plan.token_stops,
                          stop_strings=StopStrings(stop), max_new_tokens=max_new_tokens,
                          stats=stats, started=started)
        self.cache = lm.new_cache()

    def run(self) -> Iterator[NestChunk]:
        with self.batcher.session() if self.batcher else contextlib.nullcontext():
            yield from self._steps()

    def _steps(self) -> Iterator[NestChunk]:
        """The step: propose a draft (Eqs. 5-6, or a lookup), check its first token against
        the current belief, verify the rest in one forward (Eq. 7), keep the accepted
        prefix; with no draft, or its first token refused, decode the judge's one token."""
        out, judge, drafters = self.out, self.judge, self.drafters
        belief = self.read_prompt()
        while out.finish is None:
            draft = drafters.propose(belief, out.ids, out.budget)
            self.trace.proposed(self, belief, draft)
            if draft is None or not judge.verify([belief], draft.tokens[:1], draft.exact):
                drafters.update(draft, 0)
                token = belief.top_token  # argmax p_M (or p_LM): a token the LM wrote itself
                yield from self.accept([token], [NO_SOURCE], "lm")
                if out.finish is None:
                    belief = self.forward([token])[-1]
                continue
            self.stats.draft_steps += 1
            self.stats.drafted_tokens += len(draft.tokens)
            # the first token is decided already: stream it before the draft's forward
            sent = int(self.shortcuts.early_first_token and out.streams_first(draft.tokens))
            if sent:
                yield from self.accept(draft.tokens[:1], draft.rows[:1], draft.source)
                if out.finish is not None:  # it ended the answer: no forward for the rest
                    self.keep(draft, 1)
                    continue
            beliefs = self.forward(draft.tokens)  # beliefs[i]: the position after draft[i]
            kept = 1 + judge.verify(beliefs[:-1], draft.tokens[1:], draft.exact)
            self.keep(draft, kept)
            drafters.update(draft, kept)
            if kept < len(draft.tokens):  # drop the KV of the rejected draft tokens
                self.cache.crop(-(len(draft.tokens) - kept))
            yield from self.accept(draft.tokens[sent:kept], draft.rows[sent:kept], draft.source)
            # The next step starts after the last kept token, rescored without the keys
            # just copied. On a rejection that is the rejected position: its choice (the
            # replacement) is decoded by the next step, alone or as a new draft's start.
            belief = judge.rescore(beliefs[kept - 1])
        yield out.final_chunk(self.passages, self.prompt_truncated)

    def read_prompt(self) -> Belief:
        """Feed the prompt, starting after the longest head of it the model's prefix cache
        holds (the chat template, background passages, an earlier turn), and keep its KV
        states there for the next call."""
        t0 = time.perf_counter()
        reuse = self.lm.prefix_cache.seed(self.cache, self.prompt_ids)
        self.stats.lm_seconds += time.perf_counter() - t0  # it stands for part of the read
        self.stats.prompt_tokens = len(self.prompt_ids)
        self.stats.prefix_cache_hits += reuse.hit
        self.stats.prefix_cache_misses += not reuse.hit
        self.stats.prefix_reused_tokens += reuse.tokens
        belief = self.forward(self.prompt_ids[reuse.tokens:], last_only=True)[-1]
        self.lm.prefix_cache.store(self.prompt_ids, self.cache)
        return belief

    def forward(self, ids: Sequence[int], last_only: bool = False) -> list[Belief]:
        """Feed ``ids``; ``beliefs[i]`` is the belief at the position after ``ids[i]``."""
        t0 = time.perf_counter()
        run = self.batcher.forward if self.batcher else self.lm.forward
        lm_out = run(ids, self.cache, self.plan.key_layer, last_only=last_only)
        self.stats.lm_seconds += time.perf_counter() - t0
        self.stats.lm_forwards += 1
        beliefs = self.judge.beliefs(lm_out.logits, lm_out.hidden)
        self.trace.fed(self, ids, beliefs)
        return beliefs

    def keep(self, draft: Draft, kept: int) -> None:
        """The draft's first ``kept`` tokens are accepted: their rows are not retrieved again."""
        self.stats.accepted_draft_tokens += kept
        if self.index is not None:
            self.index.mask([r for r in draft.rows[:kept] if r != NO_SOURCE])

    def accept(self, tokens: list[int], rows: list[int], source: str) -> Iterator[NestChunk]:
        self.trace.accepted(self, tokens, rows)
        yield from self.out.accept(tokens, rows, source)
