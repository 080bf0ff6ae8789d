"""The six systems of the comparison, each run on one item into a typed :class:`RunRecord`.

All systems share the model, greedy decoding, ``max_new_tokens`` and the retrieved passages.
Five run through :class:`~nest_core.NestDecoder` (so their latency split comes from its
:class:`~nest_core.DecodeStats`); "RAG + prompt lookup" is transformers' own
``generate(prompt_lookup_num_tokens=10)``, timed with forward hooks on the model.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from benchmarks.tasks import (
    Item,
    answer_recall,
    answer_words,
    cited_correct,
    exact_answer_recall,
    rouge1_f1,
)
from nest_core import KeyCache, NestConfig, NestDecoder, Passage
from nest_core.config import default_config, paper_config
from nest_core.lm import LanguageModel
from nest_core.prompts import with_background

SYSTEMS: tuple[str, ...] = ("base", "rag", "rag+lookup", "knn-lm", "nest", "ra-nest",
                            "default")
LABELS: dict[str, str] = {
    "base": "Base LM", "rag": "In-context RAG (top-3)", "rag+lookup": "RAG + prompt lookup",
    "knn-lm": "kNN-LM (λ=0.7)", "nest": "Nest", "ra-nest": "RA-Nest",
    "default": "Nest, shipped default",
}
PROMPT_LOOKUP_TOKENS = 10
# Cost of one cached forward over k new tokens relative to k=1 (SmolLM2-135M fp32, 2-core
# CPU, DESIGN.md "Numbers to beat"): 65 ms at k=1. Used for a load-independent speed model.
FORWARD_COST: tuple[tuple[int, float], ...] = ((1, 1.0), (4, 1.4), (16, 1.6), (64, 3.1))
FORWARD_MS = 65.0


def forward_cost(k: int) -> float:
    """Relative cost of a k-token forward: piecewise linear, proportional beyond k=64."""
    if k <= 1:
        return 1.0
    for (k0, c0), (k1, c1) in itertools.pairwise(FORWARD_COST):
        if k <= k1:
            return c0 + (c1 - c0) * (k - k0) / (k1 - k0)
    k_last, c_last = FORWARD_COST[-1]
    return c_last * k / k_last


class ForwardSizes:
    """Records the number of new tokens of every forward of ``model`` while active."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.sizes: list[int] = []
        self._hook: Any = None

    def _record(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.sizes.append(int(ids.shape[-1]))

    def __enter__(self) -> ForwardSizes:
        self.sizes = []
        self._hook = self.model.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *_: Any) -> None:
        self._hook.remove()

    def modeled_seconds(self) -> float:
        """LM time this run would take on the reference quiet 2-core machine."""
        return FORWARD_MS / 1000 * sum(forward_cost(k) for k in self.sizes)


@dataclass
class RunRecord:
    """One system on one item: output, quality, provenance and the latency split (seconds)."""

    system: str
    task: str
    key: str
    text: str
    quality: float  # ROUGE-1 F1 (completion) or answer recall (QA, doc-QA)
    attribution_ratio: float = 0.0
    mean_span_length: float = 0.0
    generated_tokens: int = 0
    lm_forwards: int = 0
    search_seconds: float = 0.0  # passage search (query embedding + vector search)
    datastore_seconds: float = 0.0  # per-query token index from the (warm) span datastore
    lm_seconds: float = 0.0
    knn_seconds: float = 0.0  # token search + mixture
    other_seconds: float = 0.0
    total_seconds: float = 0.0  # end to end, passage search included
    first_token_seconds: float = 0.0  # to the first text (or first token), search included
    modeled_lm_seconds: float = 0.0  # LM forwards priced by FORWARD_COST (load-independent)
    answer_words: int = 0  # whitespace-separated words of the output
    # doc-QA only: the gold answer lies inside a span cut from the gold passage (1.0 / 0.0);
    # None where the system has no spans (RAG + prompt lookup) or the task has no gold passage
    cited_copied: float | None = None  # copied spans (NestResult.spans)
    cited_matched: float | None = None  # matched spans (NestResult.matches, when present)
    cited_any: float | None = None  # either kind
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_seconds if self.total_seconds else 0.0

    @property
    def modeled_tokens_per_second(self) -> float:
        """Tokens per modeled LM second: the speed on a quiet machine, forwards only."""
        return self.generated_tokens / self.modeled_lm_seconds if self.modeled_lm_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second,
                "modeled_tokens_per_second": self.modeled_tokens_per_second}


def _histogram(sizes: Sequence[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in sizes:
        out[str(k)] = out.get(str(k), 0) + 1
    return out


def score(item: Item, text: str) -> float:
    if item.task == "completion":
        return rouge1_f1(text, item.references[0])
    if item.task == "docqa":
        return exact_answer_recall(text, item.references)
    return answer_recall(text, item.references)


def citations(item: Item, result: Any) -> dict[str, Any]:
    """Cited-correct of a :class:`~nest_core.NestResult` for copied, matched and either kind
    of span as the surfaces show them (``cited_spans()``: the citation rule applied;
    ``matches`` read with getattr: an old core may not have them)."""
    if not item.gold_passage:
        return {"cited_copied": None, "cited_matched": None, "cited_any": None}
    copied = list(result.spans)
    matched = list(getattr(result, "matches", None) or [])
    refs, gold = item.references, item.gold_passage
    shown = list(result.cited_spans()) if hasattr(result, "cited_spans") else copied + matched
    return {"cited_copied": cited_correct(result.text, copied, refs, gold),
            "cited_matched": cited_correct(result.text, matched, refs, gold),
            "cited_any": cited_correct(result.text, shown, refs, gold)}


def base_config(system: str, overrides: dict[str, Any] | None = None) -> NestConfig:
    """The decoder configuration of a NestDecoder-backed system (``overrides`` apply to the
    Nest systems only: baselines keep their definitions)."""
    overrides = overrides or {}
    if system == "base":
        return NestConfig(mode="base")
    if system == "rag":
        return NestConfig(mode="base", passages_in_prompt=True)
    if system == "knn-lm":
        return NestConfig(mode="knn-lm", knn_lambda=0.7)
    if system == "nest":
        return paper_config().with_overrides(**overrides)
    if system == "ra-nest":
        return paper_config(passages_in_prompt=True).with_overrides(**overrides)
    if system == "default":  # what every surface ships: default_config()
        return default_config()
    msg = f"no decoder configuration for system {system!r}; known: {SYSTEMS}"
    raise ValueError(msg)


class Runner:
    """Runs any system on any item with one model and one shared (warm) key cache."""

    def __init__(self, lm: LanguageModel, key_cache: KeyCache, *, max_new_tokens: int,
                 nest_overrides: dict[str, Any] | None = None) -> None:
        self.lm = lm
        self.key_cache = key_cache
        self.max_new_tokens = max_new_tokens
        self.decoders = {s: NestDecoder(lm, base_config(s, nest_overrides), key_cache=key_cache)
                         for s in SYSTEMS if s != "rag+lookup"}
        self.lookup = PromptLookup(lm)

    def warm(self, passages: Sequence[Passage]) -> int:
        """Encode ``passages`` into the key cache now (the "warm span datastore")."""
        return self.decoders["nest"].prepare(passages)

    def run(self, system: str, item: Item, passages: Sequence[Passage],
            search_seconds: float) -> RunRecord:
        with ForwardSizes(self.lm.model) as sizes:
            rec = self._run(system, item, passages, search_seconds)
        rec.modeled_lm_seconds = sizes.modeled_seconds()
        rec.extra["forward_sizes"] = _histogram(sizes.sizes)
        return rec

    def _run(self, system: str, item: Item, passages: Sequence[Passage],
             search_seconds: float) -> RunRecord:
        uses_passages = system != "base"
        search = search_seconds if uses_passages else 0.0
        if system == "rag+lookup":
            rec = self.lookup.run(item, passages[:NestConfig().prompt_passages],
                                  self.max_new_tokens)
            rec.search_seconds = search
            rec.total_seconds += search
            rec.first_token_seconds += search
            return rec
        res = self.decoders[system].generate(item.prompt, list(passages) if uses_passages
                                             else None, max_new_tokens=self.max_new_tokens)
        st = res.stats
        return RunRecord(system=system, task=item.task, key=item.key, text=res.text,
                         quality=score(item, res.text), attribution_ratio=res.attribution_ratio,
                         mean_span_length=res.mean_span_length,
                         answer_words=answer_words(res.text),
                         generated_tokens=st.generated_tokens, lm_forwards=st.lm_forwards,
                         search_seconds=search, datastore_seconds=st.datastore_seconds,
                         lm_seconds=st.lm_seconds, knn_seconds=st.knn_seconds,
                         other_seconds=st.other_seconds, total_seconds=st.total_seconds + search,
                         first_token_seconds=st.first_token_seconds + search,
                         extra={"draft_steps": st.draft_steps, "drafted": st.drafted_tokens,
                                "accepted": st.accepted_draft_tokens,
                                "prompt_tokens": st.prompt_tokens,
                                "datastore_keys": st.datastore_keys},
                         **citations(item, res))


class PromptLookup:
    """In-context RAG decoded by transformers' prompt-lookup speculative decoding.

    Forward hooks count the model's forwards and time them, so this row gets the same
    latency split as the others (its "rest" is transformers' own loop and n-gram matching).
    """

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.forwards = 0
        self.lm_seconds = 0.0
        self._t0 = 0.0
        self.first_token_at = 0.0  # perf_counter() when the first forward (the prompt) ended

    def _before(self, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def _after(self, *_: Any) -> None:
        self.forwards += 1
        now = time.perf_counter()
        self.lm_seconds += now - self._t0
        if self.forwards == 1:
            self.first_token_at = now  # the prompt forward yields the first token

    @torch.inference_mode()
    def run(self, item: Item, passages: Sequence[Passage], max_new_tokens: int) -> RunRecord:
        t0 = time.perf_counter()
        ids = self.lm.prompt_ids(with_background(item.prompt, passages))
        input_ids = torch.tensor([ids], device=self.lm.device)
        self.forwards, self.lm_seconds = 0, 0.0
        # Hooks only for this call, so the other systems' forwards carry no extra cost.
        hooks = [self.lm.model.register_forward_pre_hook(self._before),
                 self.lm.model.register_forward_hook(self._after)]
        try:
            out = self.lm.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                         do_sample=False, max_new_tokens=max_new_tokens,
                                         prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS,
                                         pad_token_id=self.lm.tokenizer.eos_token_id)
        finally:
            for h in hooks:
                h.remove()
        new = [int(t) for t in out[0, len(ids):] if int(t) not in self.lm.eos_token_ids]
        text = self.lm.decode(new)
        total = time.perf_counter() - t0
        return RunRecord(system="rag+lookup", task=item.task, key=item.key, text=text,
                         quality=score(item, text), generated_tokens=len(new),
                         answer_words=answer_words(text),
                         lm_forwards=self.forwards, lm_seconds=self.lm_seconds,
                         other_seconds=max(0.0, total - self.lm_seconds), total_seconds=total,
                         first_token_seconds=self.first_token_at - t0,
                         extra={"prompt_tokens": len(ids)})
