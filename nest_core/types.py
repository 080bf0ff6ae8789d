"""Typed values that cross the decoder's boundary: passages in, results and chunks out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["length", "eos", "stop", "repetition", "abstained"]
SpanKind = Literal["copied", "matched"]


@dataclass(frozen=True)
class Passage:
    """A retrieved passage. ``id`` must be stable: it keys the span datastore and citations.

    The LM sees ``"{title}\\n{text}"`` (or just ``text``); source offsets always index ``text``.
    ``score`` is the raw score the vector store gave (its scale differs per store).
    """

    id: str
    text: str
    title: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    score: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            msg = f"Passage.id must be a non-empty str, got {self.id!r}"
            raise TypeError(msg)
        if not isinstance(self.text, str):
            msg = f"Passage.text must be a str, got {type(self.text).__name__} (id={self.id!r})"
            raise TypeError(msg)
        if self.title is not None and not isinstance(self.title, str):
            msg = f"Passage.title must be a str or None, got {type(self.title).__name__}"
            raise TypeError(msg)


@dataclass(frozen=True)
class Span:
    """A cited stretch of the output: ``kind="copied"`` (the default) is a maximal run of
    output tokens copied from contiguous tokens of one passage by Nest's copy path;
    ``kind="matched"`` is text the LM wrote itself that occurs verbatim in a passage, found
    after decoding (:func:`nest_core.matching.match_spans`).

    Invariant (checked in tests): ``output_text[out_start:out_end] == text ==
    passage.text[src_start:src_end]``. Both slices exclude leading and trailing whitespace,
    so a copied " Paris" cites "Paris". ``token_start:token_end`` index the generated ids;
    ``source_row`` is the passage's datastore row of the first copied token (row j holds the
    passage token j+1, see :class:`~nest_core.encoding.EncodedPassage`). A matched span has
    no token range (it is found in the text): ``token_start == token_end == 0``, so
    ``num_tokens`` is 0 and the copied-token metrics ignore it.
    """

    text: str
    out_start: int
    out_end: int
    passage: Passage
    src_start: int
    src_end: int
    token_start: int
    token_end: int
    source_row: int = 0
    kind: SpanKind = "copied"

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (passage by id/title/metadata) used by the integrations and CLI."""
        return {
            "text": self.text,
            "out_start": self.out_start,
            "out_end": self.out_end,
            "passage_id": self.passage.id,
            "title": self.passage.title,
            "src_start": self.src_start,
            "src_end": self.src_end,
            "token_start": self.token_start,
            "token_end": self.token_end,
            "metadata": dict(self.passage.metadata),
            "kind": self.kind,
        }


@dataclass
class DecodeStats:
    """Counters and wall-clock seconds of one generation (benchmark material, not asserted)."""

    generated_tokens: int = 0
    copied_tokens: int = 0
    lm_forwards: int = 0
    draft_steps: int = 0
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0
    prompt_tokens: int = 0
    datastore_keys: int = 0
    datastore_seconds: float = 0.0
    lm_seconds: float = 0.0
    knn_seconds: float = 0.0
    total_seconds: float = 0.0  # the whole call: what a user waits for the answer
    # from the call to the first streamed text (passage keys and the prompt read included):
    # what a user waits before anything appears; equals total_seconds when nothing streamed
    first_token_seconds: float = 0.0
    # the prompt's head found in the model's prefix KV cache (nest_core.prefix_cache): a
    # hit reused prefix_reused_tokens prompt tokens without reading them; 0/1 per answer
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    prefix_reused_tokens: int = 0
    # where the answer's tokens came from: "lm" (the LM's own choice), "knn" (retrieved
    # spans, the paper's copy path), "passage" (passage lookup), "prompt" (prompt lookup)
    tokens_by_source: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.lm_forwards if self.lm_forwards else 0.0

    @property
    def other_seconds(self) -> float:
        return max(0.0, self.total_seconds - self.datastore_seconds - self.lm_seconds
                   - self.knn_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_seconds if self.total_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(vars(self))
        out["tokens_per_forward"] = self.tokens_per_forward
        out["other_seconds"] = self.other_seconds
        out["tokens_per_second"] = self.tokens_per_second
        return out


@dataclass(frozen=True)
class NestResult:
    """What :meth:`NestDecoder.generate` returns. ``token_ids`` are the generated ids only
    (no prompt, no EOS).

    ``spans`` are the copied spans (Nest's copy path); ``matches`` are the stretches the LM
    wrote itself that occur verbatim in a passage (``kind="matched"``, never overlapping a
    copied span). The two are kept apart everywhere; the paper's metrics
    (``attribution_ratio``, ``mean_span_length``) count copied spans only.
    """

    text: str
    token_ids: list[int]
    spans: list[Span]
    passages: list[Passage]
    stats: DecodeStats
    finish_reason: FinishReason
    prompt_truncated: bool = False
    matches: list[Span] = field(default_factory=list)
    # the share of the answer's new content words the context shown to the LM holds
    # (nest_core.grounding.answer_support); None where the decoder showed no context
    support: float | None = None
    # the text is the focus sentence quoted whole (NestConfig.quote_below): the model's own
    # answer added words that sentence does not hold
    quoted: bool = False

    @property
    def abstained(self) -> bool:
        """The documents do not support an answer: ``text`` is the configured abstention
        sentence, with no citation (``NestConfig.abstain_below``, ``support_below``)."""
        return self.finish_reason == "abstained"

    @property
    def attribution_ratio(self) -> float:
        """Copied tokens / generated tokens (Table 2 of the paper)."""
        n = len(self.token_ids)
        return sum(s.num_tokens for s in self.spans) / n if n else 0.0

    @property
    def mean_span_length(self) -> float:
        """Mean length, in tokens, of the maximal copied runs."""
        return sum(s.num_tokens for s in self.spans) / len(self.spans) if self.spans else 0.0

    def cited_spans(self) -> list[Span]:
        """The citations every surface shows: copied and matched spans that carry content,
        adjacent pieces merged, none on an unsupported answer (:mod:`nest_core.citations`),
        in output order, a copied one first at a tie."""
        from nest_core.citations import citations

        return citations([*self.spans, *self.matches], self.text, self.support)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "spans": [s.to_dict() for s in self.spans],
            "matches": [s.to_dict() for s in self.matches],
            "passages": [
                {"id": p.id, "title": p.title, "text": p.text, "score": p.score,
                 "metadata": dict(p.metadata)} for p in self.passages
            ],
            "attribution_ratio": self.attribution_ratio,
            "mean_span_length": self.mean_span_length,
            "finish_reason": self.finish_reason,
            "support": self.support,
            "quoted": self.quoted,
            "citations": [s.to_dict() for s in self.cited_spans()],
            "stats": self.stats.to_dict(),
        }


@dataclass(frozen=True)
class NestChunk:
    """One streamed piece of output, yielded as soon as the decoder accepts it.

    ``span`` is the provenance of this piece alone (a piece never mixes copied and generated
    text; consecutive pieces from one passage merge into one :class:`Span` of the result).
    Provenance is not yet a citation: a surface that streams marks judges a span once the
    text after it is known (:func:`nest_core.citations.is_citation`); the last chunk
    carries the whole ``result`` (its text may be empty), whose ``cited_spans()`` are the
    answer's citations.
    """

    text: str
    token_ids: list[int]
    span: Span | None = None
    result: NestResult | None = None
