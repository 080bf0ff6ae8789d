"""The public entry point of the core: :class:`NestDecoder`."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from nest_core.batching import batcher_for
from nest_core.config import NestConfig, default_config
from nest_core.decoding.loop import Generation
from nest_core.decoding.policy import FAST, Shortcuts, context, quote, unsupported
from nest_core.encoding import KeyCache, PassageEncoder
from nest_core.grounding import Embed, answer_support
from nest_core.lm import LanguageModel, Message, check_prompt
from nest_core.matching import match_spans
from nest_core.prompts import fit_context, question_of
from nest_core.token_index import TokenIndex
from nest_core.types import DecodeStats, NestChunk, NestResult, Passage, Span

logger = logging.getLogger(__name__)

Prompt = str | Sequence[Message]


class NestDecoder:
    """Nearest Neighbor Speculative Decoding over a list of passages, greedy.

    With no passages (``None`` or ``[]``), or every passage empty, it falls back to plain
    greedy decoding of the LM (documented fallback, no attribution); in ``mode="base"`` the
    output equals ``model.generate(do_sample=False)`` token for token. One decoder may serve
    many threads: each call keeps its own cache and index; passage keys are shared through
    ``key_cache`` (in memory by default, or a persistent
    :class:`~nest_core.stores.datastore.SpanDatastore`).

    ``shortcuts``: the lossless speed-ups (``nest_core.decoding.policy.REFERENCE`` is the
    exact slow path they equal). ``embed`` (texts -> vectors, e.g. the bundled
    ``nest_core.stores.embeddings.default_embedding_function()``): lets the decoder abstain
    on a question far from every passage (``NestConfig.abstain_below``, calibrated for the
    bundled all-MiniLM-L6-v2). ``batching``: concurrent calls (threads, the server's
    requests, :meth:`generate_many`) share each model forward (:mod:`nest_core.batching`);
    a call alone decodes exactly as without it.
    """

    def __init__(self, lm: LanguageModel, config: NestConfig | None = None, *,
                 key_cache: KeyCache | None = None, shortcuts: Shortcuts = FAST,
                 embed: Embed | None = None, batching: bool = False) -> None:
        if not isinstance(lm, LanguageModel):
            msg = (f"lm must be a nest_core.LanguageModel (use nest_core.load_model()), "
                   f"got {type(lm).__name__}")
            raise TypeError(msg)
        if config is not None and not isinstance(config, NestConfig):
            msg = f"config must be a NestConfig, got {type(config).__name__}"
            raise TypeError(msg)
        self.lm, self.shortcuts, self.embed = lm, shortcuts, embed
        self.batcher = batcher_for(lm) if batching else None
        # None: the defaults calibrated for this model, or the paper's for any other model
        self.config = config or default_config(lm.name)
        self.encoder = PassageEncoder(lm, key_layer=self.config.key_layer,
                                      max_passage_tokens=self.config.max_passage_tokens,
                                      cache=key_cache)

    def prepare(self, passages: Sequence[Passage]) -> int:
        """Encode passages into the key cache ahead of queries; returns the rows stored."""
        return sum(e.num_rows for e in self.encoder.encode(_check_passages(passages)))

    def generate(self, prompt: Prompt, passages: Sequence[Passage] | None = None, *,
                 max_new_tokens: int = 128, stop: str | Sequence[str] | None = None,
                 question: str | None = None) -> NestResult:
        """Decode an answer to ``prompt`` grounded in ``passages``; see :meth:`stream`."""
        for chunk in self.stream(prompt, passages, max_new_tokens=max_new_tokens, stop=stop,
                                 question=question):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("stream ended without a result")  # pragma: no cover

    def generate_many(self, prompts: Sequence[Prompt],
                      passages: Sequence[Sequence[Passage] | None] | None = None, *,
                      max_new_tokens: int = 128, stop: str | Sequence[str] | None = None,
                      questions: Sequence[str | None] | None = None) -> list[NestResult]:
        """Answer several prompts at once, ``passages[i]`` for ``prompts[i]``: each is decoded
        as by :meth:`generate`, in its own thread, their forwards batched (continuous
        batching: an answer that ends leaves the batch, the others go on)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            msg = f"prompts must be a list of prompts, got {type(prompts).__name__}"
            raise TypeError(msg)
        n = len(prompts)
        per_prompt = list(passages) if passages is not None else [None] * n
        asked = list(questions) if questions is not None else [None] * n
        if len(per_prompt) != n or len(asked) != n:
            msg = (f"passages and questions need one entry per prompt: {n} prompts, "
                   f"{len(per_prompt)} passage lists, {len(asked)} questions")
            raise ValueError(msg)
        decoder = self
        if self.batcher is None:  # a twin sharing everything but the batcher
            decoder = copy.copy(self)
            decoder.batcher = batcher_for(self.lm)
        with ThreadPoolExecutor(max_workers=max(1, n),
                                thread_name_prefix="nest-generate") as pool:
            futures = [pool.submit(decoder.generate, prompt, found, max_new_tokens=max_new_tokens,
                                   stop=stop, question=question)
                       for prompt, found, question in zip(prompts, per_prompt, asked,
                                                          strict=True)]
            return [f.result() for f in futures]

    def stream(self, prompt: Prompt, passages: Sequence[Passage] | None = None, *,
               max_new_tokens: int = 128, stop: str | Sequence[str] | None = None,
               question: str | None = None) -> Iterator[NestChunk]:
        """Yield accepted text as soon as it is decided; the last chunk carries the result.

        ``prompt``: a string (sent as one user message through the chat template) or a list
        of ``{"role", "content"}`` messages. Generation stops at EOS, at any ``stop`` string
        (excluded from the text) or after ``max_new_tokens``. The result's ``matches`` hold
        the text the LM wrote itself that a passage holds verbatim
        (:func:`~nest_core.matching.match_spans`), apart from the copied ``spans``.
        ``question`` is what the user asked, when ``prompt`` wraps it in a template with other
        text (focus and the continuation test look at it); by default it is
        the prompt string or its last user message.
        """
        started = time.perf_counter()
        passages = _check_passages(passages)
        stops = _check_stop(stop)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            msg = f"max_new_tokens must be a positive int, got {max_new_tokens!r}"
            raise ValueError(msg)
        check_prompt(prompt)  # before background passages make an empty prompt look full
        if question is not None and not isinstance(question, str):
            msg = f"question must be a str or None, got {type(question).__name__}"
            raise TypeError(msg)
        question = question_of(prompt) if question is None else question
        answer = context(self.config, prompt, question, passages, self.embed)
        if answer.abstain:
            yield self._abstention(answer.config, passages, started)
            return
        cfg = answer.config
        prompt_ids, truncated = fit_context(self.lm.prompt_ids(answer.prompt), max_new_tokens,
                                            self.lm.max_context)
        stats = DecodeStats()
        index = self._index(passages, stats) if cfg.uses_retrieval else None
        starts = (index.rows_within([(s.passage_index, s.start, s.end) for s in answer.focus])
                  if index is not None and answer.focus else None)
        run = Generation(self.lm, cfg, prompt_ids, passages, index, span_starts=starts,
                         max_new_tokens=max_new_tokens, stop=stops, stats=stats,
                         started=started, prompt_truncated=truncated,
                         shortcuts=self.shortcuts, batcher=self.batcher)
        # with support_below or quote_below the answer waits for its check
        hold = bool(cfg.support_below or cfg.quote_below) and bool(answer.shown)
        held: list[NestChunk] = []
        for chunk in run.run():
            if chunk.result is None:
                if hold:
                    held.append(chunk)
                else:
                    yield chunk
                continue
            result = chunk.result
            if unsupported(cfg, question, result.text, answer.shown):
                yield self._abstention(cfg, passages, started, stats)
                return
            support = (answer_support(question, result.text, answer.shown)
                       if answer.shown else None)
            quoted = quote(cfg, question, support, answer, passages)
            if quoted:
                yield self._quote(quoted, result)
                return
            yield from held
            matches = (match_spans(result.text, result.passages, result.spans)
                       if result.passages else [])
            yield dataclasses.replace(chunk, result=dataclasses.replace(
                result, matches=matches, support=support))

    def _quote(self, sentences: list[tuple[Passage, int, int]], result: NestResult
               ) -> NestChunk:
        """The focus sentences as the answer, each cited whole (a ``matched`` span: text a
        passage holds verbatim, not produced by the copy path), instead of the model's
        words; the model's work stays in the stats. A quote's words are all the context's:
        its support is 1."""
        text, spans = "", []
        for passage, start, end in sentences:
            text += " " if text else ""
            piece = passage.text[start:end]
            spans.append(Span(text=piece, out_start=len(text), out_end=len(text) + len(piece),
                              passage=passage, src_start=start, src_end=end, token_start=0,
                              token_end=0, kind="matched"))
            text += piece
        ids = [int(i) for i in self.lm.text_tokenizer()(text, add_special_tokens=False)[
            "input_ids"]]
        quoted = dataclasses.replace(result, text=text, token_ids=ids, spans=[],
                                     matches=spans, support=1.0, quoted=True)
        return NestChunk(text=text, token_ids=ids, span=None, result=quoted)

    @staticmethod
    def _abstention(cfg: NestConfig, passages: list[Passage], started: float,
                    stats: DecodeStats | None = None) -> NestChunk:
        """The configured sentence instead of an answer: no tokens, no citation."""
        stats = stats or DecodeStats()
        stats.generated_tokens = stats.copied_tokens = 0
        stats.total_seconds = time.perf_counter() - started
        stats.first_token_seconds = stats.total_seconds
        result = NestResult(text=cfg.abstention, token_ids=[], spans=[], passages=passages,
                            stats=stats, finish_reason="abstained")
        return NestChunk(text=cfg.abstention, token_ids=[], span=None, result=result)

    def _index(self, passages: list[Passage], stats: DecodeStats) -> TokenIndex | None:
        if not passages:
            return None
        t0 = time.perf_counter()
        encoded = self.encoder.encode(passages)
        index = TokenIndex(passages, encoded, self.lm.vocab_size, device=self.lm.device)
        stats.datastore_seconds = time.perf_counter() - t0
        stats.datastore_keys = index.num_active
        if index.num_active == 0:
            logger.warning("passages yield no searchable tokens (all empty?): decoding with "
                           "the plain LM, without attribution")
            return None
        return index


def _check_passages(passages: Sequence[Passage] | None) -> list[Passage]:
    if passages is None:
        return []
    if isinstance(passages, (str, bytes, Passage)) or not isinstance(passages, Sequence):
        msg = (f"passages must be a list of nest_core.Passage, got {type(passages).__name__}; "
               f"wrap text as Passage(id=..., text=...)")
        raise TypeError(msg)
    for i, p in enumerate(passages):
        if not isinstance(p, Passage):
            msg = (f"passages[{i}] is a {type(p).__name__}, not a nest_core.Passage; "
                   f"wrap text as Passage(id=..., text=...)")
            raise TypeError(msg)
    return list(passages)


def _check_stop(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
        msg = f"stop must be a str or a list of str, got {stop!r:.80}"
        raise TypeError(msg)
    return list(stop)
