"""The choices made once per answer: the only reader of the options beyond the paper.

:func:`context` decides what the prompt shows (the focus sentences, the background
passages, the question asked twice) and which settings a prompt that continues a passage
gets; :func:`plan` picks who judges a draft, where drafts come from and how the output
ends. The decoding loop (:mod:`nest_core.decoding.loop`) then reads no setting at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nest_core.config import NestConfig
from nest_core.decoding.drafters import (
    Drafter,
    Drafters,
    PassageLookup,
    PromptLookup,
    RetrievedSpans,
)
from nest_core.decoding.judges import (
    Confidence,
    FixedLambda,
    Judge,
    LazyLMJudge,
    LMJudge,
    MixtureJudge,
    RelativeConfidence,
)
from nest_core.decoding.stops import EndOfSequence, RepetitionStop, TokenStop
from nest_core.focus import Sentence, best_sentences, continues_passage, focus_passages
from nest_core.grounding import (
    LEXICAL_RULES,
    Embed,
    answer_support,
    asks_yes_or_no,
    relevance,
)
from nest_core.lm import LanguageModel, Message
from nest_core.prompts import with_background
from nest_core.token_index import TokenIndex
from nest_core.types import DecodeStats, Passage

Prompt = str | Sequence[Message]


@dataclass(frozen=True)
class Shortcuts:
    """The decoder's lossless speed-ups (the same token ids, rows and spans either way):
    ``Shortcuts(lazy_search=False, early_first_token=False)`` is the exact reference path.

    ``lazy_search``: the LM judge skips the kNN searches that cannot start a span
    (:class:`~nest_core.decoding.judges.LazyLMJudge`); ``early_first_token``: a draft's
    first token, verified before the draft's forward, is streamed before it."""

    lazy_search: bool = True
    early_first_token: bool = True


FAST = Shortcuts()  # what every surface uses
REFERENCE = Shortcuts(lazy_search=False, early_first_token=False)


@dataclass(frozen=True)
class Context:
    """What one answer reads: its settings, the prompt shown and the focus sentences."""

    config: NestConfig
    prompt: Prompt
    focus: list[Sentence]
    shown: list[Passage]  # the background the prompt shows (none without passages_in_prompt)
    abstain: bool  # the passages do not hold the question: answer with config.abstention


def context(config: NestConfig, prompt: Prompt, question: str, passages: list[Passage],
            embed: Embed | None = None) -> Context:
    """The settings and prompt of one answer. A prompt that continues a passage gets
    ``config.continuation``; with ``focus_sentences`` the prompt shows the best sentences
    of all passages (or, when no sentence shares a word with the question, the top
    passages whole); ``repeat_question`` asks the request again after the background."""
    if config.continuation is not None and continues_passage(question, passages):
        config = config.continuation
    focus = (best_sentences(question, passages, config.focus_sentences, embed=embed,
                            meaning=config.focus_meaning)
             if config.focus_sentences is not None else [])
    shown: list[Passage] = []
    if config.passages_in_prompt:
        shown = focus_passages(passages, focus) if focus else passages[:config.prompt_passages]
        prompt = with_background(prompt, shown, repeat_question=config.repeat_question)
    abstain = abstains(config, question, passages, embed)
    return Context(config, prompt, focus, shown, abstain)


def abstains(config: NestConfig, question: str, passages: Sequence[Passage],
             embed: Embed | None = None) -> bool:
    """Whether the ``passages`` do not hold the question: its cosine to the best of them is
    below ``abstain_below`` (with ``embed``), or, with ``abstain_unnamed``, a name it writes
    is in none of them, or, with ``abstain_rare``, a rare word it writes is in none of them.
    Never without passages (nothing was retrieved to judge by)."""
    if not passages:
        return False
    if any(getattr(config, flag) and missing(question, passages)
           for flag, missing in LEXICAL_RULES.items()):
        return True
    return bool(config.abstain_below) and embed is not None \
        and relevance(question, passages, embed) < config.abstain_below


def unsupported(config: NestConfig, question: str, answer: str, shown: Sequence[Passage]
                ) -> bool:
    """Whether an answer adds words the context it was shown does not hold
    (``support_below``): then the answer is withheld and ``config.abstention`` said."""
    return bool(config.support_below) and bool(shown) \
        and answer_support(question, answer, shown) < config.support_below


def quote(config: NestConfig, question: str, support: float | None, ctx: Context,
          passages: Sequence[Passage]) -> list[tuple[Passage, int, int]]:
    """The focus sentences to answer with instead of the model's words (``quote_below``):
    ``(passage, start, end)`` each, as the prompt shows them; none when the answer is supported
    enough, when there is no focus, or for a yes/no question (a quote says neither)."""
    if not config.quote_below or support is None or support >= config.quote_below \
            or not ctx.focus or asks_yes_or_no(question):
        return []
    return [(passages[s.passage_index], s.start, s.end)
            for s in sorted(ctx.focus, key=lambda s: (s.passage_index, s.start))]


@dataclass(frozen=True)
class Plan:
    """The parts of one generation: judge, drafters, token stops, the key layer."""

    judge: Judge
    drafters: Drafters
    token_stops: list[TokenStop]
    key_layer: int


def plan(lm: LanguageModel, config: NestConfig, index: TokenIndex | None,
         prompt_ids: list[int], stats: DecodeStats, *, span_starts: torch.Tensor | None = None,
         shortcuts: Shortcuts = FAST) -> Plan:
    """Choose the judge, the drafters and the stops of one generation from ``config``.

    ``span_starts``: bool ``(N,)``, the index rows a span may start at (the focus
    sentences), or ``None`` for any row."""
    copies = index is not None and config.mode == "nest"
    allowed = start_rows(index, config.span_passages, span_starts) if copies else None
    drafters: list[Drafter] = []
    if copies:
        assert index is not None
        drafters.append(RetrievedSpans(
            index, config.span_threshold, initial_length=config.initial_span_length,
            max_length=config.span_length, span_passages=config.span_passages,
            start_rows=span_starts))
    if config.passage_drafts and allowed is not None and index is not None:
        drafters.append(PassageLookup(index, allowed, config.span_length))
    if config.question_drafts:
        drafters.append(PromptLookup(prompt_ids, config.span_length, key=lm.token_word))
    stops: list[TokenStop] = [RepetitionStop(config.repetition_stop)] \
        if config.repetition_stop else []
    eos = frozenset(lm.eos_token_ids)
    stops.append(EndOfSequence(eos))
    return Plan(judge(lm, config, index, stats, eos, starters(index, allowed), shortcuts),
                Drafters(drafters), stops, config.key_layer)


def judge(lm: LanguageModel, config: NestConfig, index: TokenIndex | None,
          stats: DecodeStats, eos: frozenset[int], span_starters: frozenset[int],
          shortcuts: Shortcuts) -> Judge:
    confidence: Confidence = FixedLambda(config.knn_lambda)
    if config.mode == "nest" and index is not None:
        confidence = RelativeConfidence(index, config.confidence_offset,
                                        config.confidence_scale, config.num_neighbors,
                                        config.confidence_reference)
    if config.verify_against == "mixture":
        return MixtureJudge(index, confidence, temperature=config.lm_temperature,
                            num_neighbors=config.num_neighbors, relaxation=config.relaxation,
                            eos=eos, end_with_lm=config.end_with_lm, stats=stats)
    cls = LazyLMJudge if shortcuts.lazy_search else LMJudge
    return cls(index, confidence, temperature=config.lm_temperature,
               num_neighbors=config.num_neighbors, span_threshold=config.span_threshold,
               relaxation=config.relaxation, eos=eos, end_with_lm=config.end_with_lm,
               starters=span_starters if shortcuts.lazy_search
               else frozenset(range(lm.vocab_size)), stats=stats)


def start_rows(index: TokenIndex | None, span_passages: int | None,
               span_starts: torch.Tensor | None) -> torch.Tensor | None:
    """Bool ``(N,)``: the rows a span may start at (active, in the top ``span_passages``
    passages, within ``span_starts``). Masking only removes rows, so a token outside
    their values never starts a span: the LM judge needs no search where the LM's choice
    is not one."""
    if index is None:
        return None
    ok = index.active.clone()  # [N]
    if span_passages is not None:
        ok &= (index.passage_of < span_passages).to(ok.device)
    if span_starts is not None:
        ok &= span_starts.to(ok.device)
    return ok


def starters(index: TokenIndex | None, allowed: torch.Tensor | None) -> frozenset[int]:
    """The tokens a span may start with: the values of the ``allowed`` rows."""
    if allowed is None or index is None:
        return frozenset()
    return frozenset(index.values[allowed].tolist())
