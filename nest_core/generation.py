"""One generation: the decoding loop of Nest and its state (cache, index, output, stats).

Each step costs ONE LM forward: the pass that verifies a draft also gives the mixture and the
kNN query for the position after it, so the next step starts without another forward.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from nest_core import mixture
from nest_core.attribution import NO_SOURCE, OutputText, build_spans, make_span
from nest_core.config import NestConfig
from nest_core.lm import LanguageModel
from nest_core.proposer import Belief, RetrievedSpanProposer
from nest_core.token_index import Neighbors, TokenIndex
from nest_core.types import DecodeStats, FinishReason, NestChunk, NestResult, Passage


class Generation:
    """Decodes one answer. Built by :class:`~nest_core.decoder.NestDecoder`; not reusable."""

    def __init__(self, lm: LanguageModel, config: NestConfig, prompt_ids: list[int],
                 passages: Sequence[Passage], index: TokenIndex | None, *,
                 max_new_tokens: int, stop: Sequence[str], stats: DecodeStats,
                 started: float, prompt_truncated: bool) -> None:
        self.lm, self.cfg, self.index = lm, config, index
        self.prompt_ids, self.passages = prompt_ids, list(passages)
        self.max_new_tokens, self.stop = max_new_tokens, [s for s in stop if s]
        self.stats, self.started, self.prompt_truncated = stats, started, prompt_truncated
        self.cache = lm.new_cache()
        self.eos = lm.eos_token_ids
        self.proposer = (RetrievedSpanProposer(index, config.span_threshold)
                         if index is not None and config.mode == "nest" else None)
        self.ids: list[int] = []  # generated token ids
        self.rows: list[int] = []  # index row each token was copied from, or NO_SOURCE
        self.offsets = OutputText(lm.decode)
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.finish: FinishReason | None = None

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> Iterator[NestChunk]:
        stats = self.stats
        stats.prompt_tokens = len(self.prompt_ids)
        belief = self.forward(self.prompt_ids, last_only=True)[-1]
        stream_row: int | None = None
        draft_len = self.cfg.initial_span_length
        while self.finish is None:
            budget = self.max_new_tokens - len(self.ids)
            rows = (self.proposer.propose(belief, stream_row, min(draft_len, budget))
                    if self.proposer else [])
            draft = self.index.values[rows].tolist() if rows and self.index is not None else []
            if not draft or not self.accepts(belief, draft[0]):
                # Single LM token: no draft, or its first token already fails verification.
                if draft:
                    draft_len = self.cfg.initial_span_length
                stream_row = None
                token = belief.top_token
                yield from self.emit([token], [NO_SOURCE])
                if self.finish is None:
                    belief = self.forward([token])[-1]
                continue
            stats.draft_steps += 1
            stats.drafted_tokens += len(draft)
            beliefs = self.forward(draft)  # beliefs[i]: the position after draft[i]
            n_ok = 1 + self.verify(beliefs[:-1], draft[1:])
            stats.accepted_draft_tokens += n_ok
            assert self.index is not None
            self.index.mask(rows[:n_ok])
            if n_ok == len(draft):
                # Whole draft accepted: no bonus token; stream on from the same passage.
                stream_row = rows[-1]
                draft_len = min(2 * draft_len, self.cfg.span_length)
                yield from self.emit(draft, rows)
                belief = self.rescore(beliefs[-1])
                continue
            # First rejection at n_ok: keep the prefix, put p_M's choice there (unattributed).
            replacement = beliefs[n_ok - 1].top_token
            self.cache.crop(-(len(draft) - n_ok))  # drop the KV of the rejected draft tokens
            stream_row, draft_len = None, self.cfg.initial_span_length
            yield from self.emit([*draft[:n_ok], replacement], [*rows[:n_ok], NO_SOURCE])
            if self.finish is None:
                belief = self.forward([replacement])[-1]
        yield self.final_chunk()

    def accepts(self, belief: Belief, token: int) -> bool:
        return self.verify([belief], [token]) == 1

    def verify(self, beliefs: Sequence[Belief], tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` pass relaxed verification (Eq. 7, prefix rule)."""
        if not tokens:
            return 0
        t0 = time.perf_counter()
        p_tok = torch.stack([b.probability(t) for b, t in zip(beliefs, tokens, strict=True)])
        p_max = torch.tensor([b.top_prob for b in beliefs])  # [n]
        ok = mixture.relaxed_accept(p_tok, p_max, self.cfg.relaxation)
        self.stats.knn_seconds += time.perf_counter() - t0
        return mixture.accepted_prefix(ok)

    # --- LM and mixture --------------------------------------------------------------------
    def forward(self, ids: Sequence[int], last_only: bool = False) -> list[Belief]:
        t0 = time.perf_counter()
        out = self.lm.forward(ids, self.cache, self.cfg.key_layer, last_only=last_only)
        self.stats.lm_seconds += time.perf_counter() - t0
        self.stats.lm_forwards += 1
        return self.beliefs(out.logits, out.hidden)

    def beliefs(self, logits: torch.Tensor, hidden: torch.Tensor) -> list[Belief]:
        """p_M at each fed position; ``logits``: ``(T, V)``, ``hidden``: ``(T, D)``."""
        t0 = time.perf_counter()
        scaled = logits / self.cfg.lm_temperature  # [T, V]
        found = (self.index.search(hidden, self.cfg.num_neighbors)
                 if self.index is not None else None)
        weights = values = None
        lam = torch.ones(logits.shape[0])  # base mode, no passages, or all keys masked
        if found is not None:
            assert self.index is not None
            weights = mixture.knn_weights(found.dist2, self.index.dim)  # [T, k]
            values = self.index.values[found.rows]  # [T, k]
            lam = (torch.full((logits.shape[0],), self.cfg.knn_lambda)
                   if self.cfg.mode == "knn-lm" else
                   mixture.retrieval_confidence(found.dist2, self.cfg.confidence_offset,
                                                self.cfg.confidence_scale))  # [T]
        candidates, p_m, lse = mixture.sparse_mixture(scaled, lam, weights, values)
        best = p_m.max(dim=-1)  # over candidates: the max of p_M over the vocabulary
        tops = candidates[best.indices].tolist()
        out = [Belief(top_token=tops[i], top_prob=float(best.values[i]), lam=float(lam[i]),
                      neighbors=None if found is None else
                      Neighbors(found.dist2[i:i + 1], found.rows[i:i + 1]),
                      scaled_logits=scaled[i], lse=lse[i],
                      weights=None if weights is None else weights[i],
                      values=None if values is None else values[i],
                      logits=logits[i], hidden=hidden[i]) for i in range(logits.shape[0])]
        self.stats.knn_seconds += time.perf_counter() - t0
        return out

    def rescore(self, belief: Belief) -> Belief:
        """Recompute a belief after masking, so just-copied keys are not retrieved again."""
        return self.beliefs(belief.logits[None], belief.hidden[None])[0]

    # --- output ----------------------------------------------------------------------------
    def emit(self, tokens: list[int], rows: list[int]) -> Iterator[NestChunk]:
        """Append accepted tokens, enforce EOS / stop strings / budget, stream new text."""
        for i, tok in enumerate(tokens):
            if tok in self.eos:
                tokens, rows, self.finish = tokens[:i], rows[:i], "eos"
                break
        room = self.max_new_tokens - len(self.ids)
        tokens, rows = tokens[:room], rows[:room]
        first = len(self.ids)
        self.ids += tokens
        self.rows += rows
        self.stats.generated_tokens = len(self.ids)
        self.text = self.lm.decode(self.ids)
        self.apply_stop_strings()
        if self.finish is None and len(self.ids) >= self.max_new_tokens:
            self.finish = "length"
        yield from self.pieces(first)

    def apply_stop_strings(self) -> None:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop)
                if i >= 0]
        if not hits:
            return
        cut = min(hits)
        keep = next(t for t in range(len(self.ids) + 1)
                    if self.offsets.prefix_length(self.ids, t) >= cut or t == len(self.ids))
        del self.ids[keep:], self.rows[keep:]
        self.offsets.truncate(keep)
        self.text, self.finish = self.text[:cut], "stop"
        self.stats.generated_tokens = len(self.ids)

    def pieces(self, first: int) -> Iterator[NestChunk]:
        """Chunks for tokens ``first:``, one per run of copied or generated tokens."""
        limit = len(self.text) if self.finish else self.safe_length()
        t = first
        while t < len(self.ids):
            copied = self.rows[t] != NO_SOURCE
            end = t + 1
            while end < len(self.ids) and (self.rows[end] != NO_SOURCE) == copied:
                end += 1
            upto = min(self.offsets.prefix_length(self.ids, end), limit)
            if upto > self.sent:
                span = (make_span(self.text, self.ids, self.rows, (t, end), self.index,
                                  self.offsets) if copied and self.index is not None else None)
                yield NestChunk(text=self.text[self.sent:upto], token_ids=self.ids[t:end],
                                span=span)
                self.sent = upto
            t = end

    def safe_length(self) -> int:
        """Text that can be streamed now: hold back a tail that may start a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return len(self.text) - held

    def final_chunk(self) -> NestChunk:
        stats = self.stats
        spans = build_spans(self.text, self.ids, self.rows, self.index, self.offsets)
        stats.copied_tokens = sum(s.num_tokens for s in spans)
        stats.total_seconds = time.perf_counter() - self.started
        result = NestResult(text=self.text, token_ids=list(self.ids), spans=spans,
                            passages=self.passages, stats=stats,
                            finish_reason=self.finish or "length",
                            prompt_truncated=self.prompt_truncated)
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return NestChunk(text=rest, token_ids=[], span=None, result=result)
