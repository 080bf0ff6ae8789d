"""One generation: the decoding loop of Nest and its state (cache, index, output, stats).

Each step costs ONE LM forward: the pass that verifies a draft also gives the mixture and the
kNN query for the position after it, so the next step starts without another forward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import torch

from nest_core import mixture
from nest_core.attribution import NO_SOURCE, OutputText, make_span, runs
from nest_core.config import NestConfig
from nest_core.lm import LanguageModel
from nest_core.proposer import Belief, PassageLookup, PromptLookup, RetrievedSpanProposer
from nest_core.token_index import Neighbors, TokenIndex
from nest_core.types import DecodeStats, FinishReason, NestChunk, NestResult, Passage, Span


class Generation:
    """Decodes one answer. Built by :class:`~nest_core.decoder.NestDecoder`; not reusable."""

    def __init__(self, lm: LanguageModel, config: NestConfig, prompt_ids: list[int],
                 passages: Sequence[Passage], index: TokenIndex | None, *,
                 max_new_tokens: int, stop: Sequence[str], stats: DecodeStats,
                 started: float, prompt_truncated: bool,
                 span_starts: torch.Tensor | None = None) -> None:
        self.lm, self.cfg, self.index = lm, config, index
        self.prompt_ids, self.passages = prompt_ids, list(passages)
        self.max_new_tokens, self.stop = max_new_tokens, [s for s in stop if s]
        self.stats, self.started, self.prompt_truncated = stats, started, prompt_truncated
        self.cache = lm.new_cache()
        self.eos = lm.eos_token_ids
        self.proposer = (RetrievedSpanProposer(index, config.span_threshold,
                                               config.span_passages, span_starts)
                         if index is not None and config.mode == "nest" else None)
        self.lookup = (PromptLookup(prompt_ids, key=lm.token_word)
                       if config.question_drafts else None)
        allowed = self.span_start_rows(span_starts)
        self.starters = self.span_starters(allowed)
        self.passage_lookup = (PassageLookup(index, allowed)
                               if config.passage_drafts and allowed is not None
                               and index is not None else None)
        self.ids: list[int] = []  # generated token ids
        self.rows: list[int] = []  # index row each token was copied from, or NO_SOURCE
        self.offsets = OutputText(lm.decode)
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.streamed = 0  # tokens whose text was streamed
        self.finish: FinishReason | None = None

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> Iterator[NestChunk]:
        stats = self.stats
        stats.prompt_tokens = len(self.prompt_ids)
        belief = self.read_prompt()
        stream_row: int | None = None
        draft_len = self.cfg.initial_span_length
        while self.finish is None:
            budget = self.max_new_tokens - len(self.ids)
            rows = (self.proposer.propose(belief, stream_row, min(draft_len, budget))
                    if self.proposer else [])
            draft = self.index.values[rows].tolist() if rows and self.index is not None else []
            exact = False  # a draft found by lookup is kept only where decoding agrees
            if not draft and budget > 1:
                draft, rows = self.looked_up(belief.top_token, min(self.cfg.span_length, budget))
                exact = bool(draft)
            if not draft or not self.accepts(belief, draft[0], exact):
                # Single LM token: no draft, or its first token already fails verification.
                if draft:
                    draft_len = self.cfg.initial_span_length
                stream_row = None
                token = belief.top_token
                yield from self.accept([token], [NO_SOURCE])
                if self.finish is None:
                    belief = self.forward([token])[-1]
                continue
            stats.draft_steps += 1
            stats.drafted_tokens += len(draft)
            sent = int(self.streams_first(draft))
            if sent:
                yield from self.accept(draft[:1], rows[:1])
                if self.finish is not None:  # it ended the answer: no forward for the rest
                    stats.accepted_draft_tokens += 1
                    if self.index is not None:
                        self.index.mask([r for r in rows[:1] if r != NO_SOURCE])
                    continue
            beliefs = self.forward(draft)  # beliefs[i]: the position after draft[i]
            n_ok = 1 + self.verify(beliefs[:-1], draft[1:], exact)
            stats.accepted_draft_tokens += n_ok
            if self.index is not None:
                self.index.mask([r for r in rows[:n_ok] if r != NO_SOURCE])
            if n_ok == len(draft):
                # Whole draft accepted: no bonus token; stream on from the same passage
                # (a looked-up one is looked up again: kept exact)
                stream_row = rows[-1] if rows[-1] != NO_SOURCE and not exact else None
                draft_len = min(2 * draft_len, self.cfg.span_length)
                yield from self.accept(draft[sent:], rows[sent:])
                belief = self.rescore(beliefs[-1])
                continue
            # First rejection at n_ok: keep the prefix. The belief at the rejected position
            # is the current one: its argmax p_M (the replacement) is decoded by the next
            # step, alone or as the start of a new draft, with no extra forward here.
            self.cache.crop(-(len(draft) - n_ok))  # drop the KV of the rejected draft tokens
            stream_row, draft_len = None, self.cfg.initial_span_length
            if n_ok > sent:
                yield from self.accept(draft[sent:n_ok], rows[sent:n_ok])
            belief = self.rescore(beliefs[n_ok - 1])
        yield self.final_chunk()

    def read_prompt(self) -> Belief:
        """Feed the prompt, starting after the longest head of it the model's prefix cache
        holds (the chat template, background passages, an earlier turn), and keep its KV
        states there for the next call."""
        t0 = time.perf_counter()
        reuse = self.lm.prefix_cache.seed(self.cache, self.prompt_ids)
        self.stats.lm_seconds += time.perf_counter() - t0  # it stands for part of the read
        self.stats.prefix_cache_hits += reuse.hit
        self.stats.prefix_cache_misses += not reuse.hit
        self.stats.prefix_reused_tokens += reuse.tokens
        belief = self.forward(self.prompt_ids[reuse.tokens:], last_only=True)[-1]
        self.lm.prefix_cache.store(self.prompt_ids, self.cache)
        return belief

    def streams_first(self, draft: list[int]) -> bool:
        """Whether a draft's first token, already verified, is accepted (and streamed)
        before the forward that judges the rest: the user sees it one forward sooner. Not
        when the draft, from its first token on, completes a repeat of the output
        (``repetition_stop``): the cut would then drop that token too, and whether it
        happens depends on how much of the draft is accepted."""
        return self.repeat_cut(draft) != 0

    def accept(self, tokens: list[int], rows: list[int]) -> Iterator[NestChunk]:
        """Emit decided tokens, unless they would start repeating the output (then the
        answer ends before the repeat, ``finish_reason="repetition"``)."""
        keep = self.repeat_cut(tokens)
        if keep is not None:
            tokens, rows = tokens[:keep], rows[:keep]
            self.finish = "repetition"
        yield from self.emit(tokens, rows)

    def accepts(self, belief: Belief, token: int, exact: bool = False) -> bool:
        return self.verify([belief], [token], exact) == 1

    def verify(self, beliefs: Sequence[Belief], tokens: Sequence[int], exact: bool = False
               ) -> int:
        """How many leading ``tokens`` pass relaxed verification (Eq. 7, prefix rule), or
        with ``exact`` (question drafts) equal the token decoding would pick anyway.

        ``verify_against="lm"`` (beyond the paper) judges drafts by p_LM alone: inside a
        copied span the kNN neighbours are the span's own rows, so p_M ≈ p_kNN approves its
        own draft and copying runs on past the answer; p_LM only approves what the model
        would say. With ``end_with_lm`` no draft token is accepted where the LM would end.
        """
        if not tokens:
            return 0
        t0 = time.perf_counter()
        pairs = list(zip(beliefs, tokens, strict=True))
        if exact:
            self.stats.knn_seconds += time.perf_counter() - t0
            return mixture.accepted_prefix(torch.tensor([t == b.top_token for b, t in pairs]))
        if self.cfg.verify_against == "lm":
            p_tok = torch.tensor([b.lm_ratio(t) for b, t in pairs])  # [n]: p_LM(w) / max p_LM
            p_max = torch.ones_like(p_tok)
        else:
            p_tok = torch.stack([b.probability(t) for b, t in pairs])  # [n]
            p_max = torch.tensor([b.top_prob for b in beliefs])  # [n]
        ok = mixture.relaxed_accept(p_tok, p_max, self.cfg.relaxation)
        ok &= torch.tensor([not b.lm_ends for b in beliefs])
        self.stats.knn_seconds += time.perf_counter() - t0
        return mixture.accepted_prefix(ok)

    def repeat_cut(self, tokens: Sequence[int]) -> int | None:
        """With ``repetition_stop`` n: how many of ``tokens`` to keep so that the output
        does not repeat an n-token stretch it already holds (``None``: no repeat).

        Catches the loops of small models (and of copying from duplicated passages) that
        would otherwise repeat the same lines until ``max_new_tokens``.
        """
        n = self.cfg.repetition_stop
        if not n:
            return None
        seq = [*self.ids, *tokens]
        seen: set[tuple[int, ...]] = set()
        for end in range(n, len(seq) + 1):
            gram = tuple(seq[end - n:end])
            if gram in seen and end > len(self.ids):
                return max(0, end - n - len(self.ids))
            seen.add(gram)
        return None

    def span_start_rows(self, span_starts: torch.Tensor | None) -> torch.Tensor | None:
        """Bool ``(N,)``: the rows the proposer may start a span at (active, in the top
        ``span_passages`` passages, within ``span_starts``), or ``None`` without a proposer.
        Masking only removes rows, so a token outside their values never starts a span:
        with ``verify_against="lm"`` no search is needed where the LM's choice is not one."""
        if self.proposer is None or self.index is None:
            return None
        index = self.index
        ok = index.active.clone()  # [N]
        if self.cfg.span_passages is not None:
            ok &= (index.passage_of < self.cfg.span_passages).to(ok.device)
        if span_starts is not None:
            ok &= span_starts.to(ok.device)
        return ok

    def span_starters(self, allowed: torch.Tensor | None) -> frozenset[int]:
        """The tokens a span may start with: the values of the ``allowed`` rows."""
        if allowed is None or self.index is None:
            return frozenset()
        return frozenset(self.index.values[allowed].tolist())

    def looked_up(self, top: int, length: int) -> tuple[list[int], list[int]]:
        """A draft (tokens, rows) starting with ``top`` from a passage's rows where the
        output repeats them, else from the prompt's words (rows ``NO_SOURCE``), else none."""
        if self.passage_lookup is not None:
            rows = self.passage_lookup.propose(self.ids, top, length)
            if rows:
                return [self.passage_lookup.values[r] for r in rows], rows
        if self.lookup is not None:
            draft = self.lookup.propose(self.ids, top, length)
            return draft, [NO_SOURCE] * len(draft)
        return [], []

    # --- LM and mixture --------------------------------------------------------------------
    def forward(self, ids: Sequence[int], last_only: bool = False) -> list[Belief]:
        """Feed ``ids``; ``beliefs[i]`` is the belief at the position after ``ids[i]``.

        With ``verify_against="lm"`` a draft's positions are judged by p_LM alone and the
        next step starts from a rescored belief, so no kNN search runs for them; a single
        position (the prompt's last, a single token) starts the next step and is searched.
        """
        t0 = time.perf_counter()
        out = self.lm.forward(ids, self.cache, self.cfg.key_layer, last_only=last_only)
        self.stats.lm_seconds += time.perf_counter() - t0
        self.stats.lm_forwards += 1
        search = self.cfg.verify_against != "lm" or out.logits.shape[0] == 1
        return self.beliefs(out.logits, out.hidden, search=search)

    def rescore(self, belief: Belief) -> Belief:
        """Recompute a belief after masking, so just-copied keys are not retrieved again."""
        return self.beliefs(belief.logits[None], belief.hidden[None])[0]

    def beliefs(self, logits: torch.Tensor, hidden: torch.Tensor, search: bool = True
                ) -> list[Belief]:
        """p_M at each fed position; ``logits``: ``(T, V)``, ``hidden``: ``(T, D)``.
        ``search=False`` (p_LM-judged draft positions): λ = 1 and no neighbours."""
        t0 = time.perf_counter()
        if self.cfg.verify_against == "lm":
            out = self.lm_beliefs(logits, hidden, search)
        else:
            out = self.mixture_beliefs(logits, hidden)
        self.stats.knn_seconds += time.perf_counter() - t0
        return out

    def lm_beliefs(self, logits: torch.Tensor, hidden: torch.Tensor, search: bool
                   ) -> list[Belief]:
        """Beliefs for ``verify_against="lm"``: the LM is the target, so a single token is
        the LM's own choice and p_M is never consulted (no ``(T, V)`` logsumexp); the kNN
        side only proposes drafts, which start with the LM's choice and need λ < δ
        (Eq. 6). So no search runs where no row may start a span with the LM's choice
        (:meth:`span_start_rows`; λ is left at 1), λ comes first, from two order statistics
        of the distances, and the sorted top-k neighbours (the costly part) only where λ
        lets a span start: the proposer drafts exactly what a full search would let it."""
        n = logits.shape[0]
        # max and argmax of logits / temperature, without dividing the (T, V) rows
        lm_max, tops = mixture.scaled_row_max(logits, self.cfg.lm_temperature)  # [T], [T]
        ends = [self.cfg.end_with_lm and t in self.eos for t in tops]
        lams, found = [1.0] * n, None
        if search and self.index is not None and not self.starters.isdisjoint(tops) \
                and self.index.num_active:
            d2 = self.index.distances(hidden)  # [T, N]
            lam = self.fast_confidence(d2)
            if lam is None or bool((lam < self.cfg.span_threshold).any()):
                found = self.index.nearest(d2, self.cfg.num_neighbors)
                assert found is not None
                lam = self.confidence(hidden, found)
            lams = lam.tolist()
        weights = values = None
        if found is not None and self.index is not None:
            weights = mixture.knn_weights(found.dist2, self.index.dim)  # [T, k]
            values = self.index.values[found.rows]  # [T, k]
        rows, states = logits.unbind(0), hidden.unbind(0)  # T views each, in one call
        return [Belief(top_token=tops[i], top_prob=math.nan, lam=lams[i],
                       neighbors=None if found is None else
                       Neighbors(found.dist2[i:i + 1], found.rows[i:i + 1]),
                       scaled_logits=None, lse=None,
                       weights=None if weights is None else weights[i],
                       values=None if values is None else values[i],
                       logits=rows[i], hidden=states[i], lm_ends=ends[i], lm_max=lm_max[i],
                       temperature=self.cfg.lm_temperature)
                for i in range(n)]

    def fast_confidence(self, d2: torch.Tensor) -> torch.Tensor | None:
        """λ ``(T,)`` from distances ``d2`` ``(T, N)`` without sorting them: d²_nearest is
        their minimum and d²_farthest (of the r nearest) their r-th smallest, the very
        numbers the sorted top-r would hold first and last. ``None`` where λ is not
        Eq. 4 over the farthest neighbour (``knn-lm``'s fixed λ;
        ``confidence_reference="norm"``, which needs the nearest row itself)."""
        if self.cfg.mode != "nest" or self.cfg.confidence_reference != "farthest":
            return None
        assert self.index is not None
        k = min(self.cfg.num_neighbors, self.index.num_active)
        ends = torch.stack([d2.min(dim=-1).values, d2.kthvalue(k, dim=-1).values], 1)  # [T, 2]
        return mixture.retrieval_confidence(ends, self.cfg.confidence_offset,
                                            self.cfg.confidence_scale)

    def confidence(self, hidden: torch.Tensor, found: Neighbors) -> torch.Tensor:
        """λ ``(T,)`` (Eq. 4) of the searched positions: fixed in ``knn-lm`` mode."""
        if self.cfg.mode == "knn-lm":
            return torch.full((hidden.shape[0],), self.cfg.knn_lambda)
        return mixture.retrieval_confidence(found.dist2, self.cfg.confidence_offset,
                                            self.cfg.confidence_scale,
                                            self.confidence_reference(hidden, found))

    def mixture_beliefs(self, logits: torch.Tensor, hidden: torch.Tensor) -> list[Belief]:
        """Beliefs for ``verify_against="mixture"`` (the paper): p_M at every position."""
        scaled = logits / self.cfg.lm_temperature  # [T, V]
        found = (self.index.search(hidden, self.cfg.num_neighbors)
                 if self.index is not None else None)
        weights = values = None
        lam = torch.ones(logits.shape[0])  # base mode, no passages, or all keys masked
        lm_max, lm_top = mixture.row_max(scaled)  # [T], [T]
        ends = [self.cfg.end_with_lm and t in self.eos for t in lm_top]
        if found is not None:
            assert self.index is not None
            weights = mixture.knn_weights(found.dist2, self.index.dim)  # [T, k]
            values = self.index.values[found.rows]  # [T, k]
            lam = self.confidence(hidden, found)
        candidates, p_m, lse = mixture.sparse_mixture(scaled, lam, weights, values)
        best = p_m.max(dim=-1)  # over candidates: the max of p_M over the vocabulary
        tops, top_probs = candidates[best.indices].tolist(), best.values.tolist()
        # end_with_lm: where the LM alone would end the answer, the answer ends
        tops = [lm_top[i] if ends[i] else t for i, t in enumerate(tops)]
        return [Belief(top_token=tops[i], top_prob=top_probs[i], lam=float(lam[i]),
                       neighbors=None if found is None else
                       Neighbors(found.dist2[i:i + 1], found.rows[i:i + 1]),
                       scaled_logits=scaled[i], lse=lse[i],
                       weights=None if weights is None else weights[i],
                       values=None if values is None else values[i],
                       logits=logits[i], hidden=hidden[i], lm_ends=ends[i],
                       lm_max=lm_max[i], temperature=self.cfg.lm_temperature)
                for i in range(logits.shape[0])]

    def confidence_reference(self, hidden: torch.Tensor, found: Neighbors
                             ) -> torch.Tensor | None:
        """ρ's denominator: ``None`` for the paper's farthest neighbour, or the norms."""
        if self.cfg.confidence_reference == "farthest" or self.index is None:
            return None
        nearest_sq = self.index.key_sq[found.rows[:, 0]]  # [T]
        return mixture.norm_reference(hidden.to(nearest_sq.device), nearest_sq)

    # --- output ----------------------------------------------------------------------------
    def emit(self, tokens: list[int], rows: list[int]) -> Iterator[NestChunk]:
        """Append accepted tokens, enforce EOS / stop strings / budget, stream new text.

        Output rule: ``decode(ids) == text`` at the end, always. A stop string ends the text
        at the end of the last token that lies wholly before it: the token it starts inside
        is dropped too, so the text may end a few characters before the stop string. Tokens
        that end on a partial character (byte-level BPE splits e.g. a CJK character over two
        tokens) when ``max_new_tokens`` or EOS ends the answer are kept, as in plain greedy
        decoding, and the text ends in U+FFFD just as ``decode(ids)`` does; spans cover the
        copied tokens whose characters are whole (:meth:`span_of`).
        """
        for i, tok in enumerate(tokens):
            if tok in self.eos:
                tokens, rows, self.finish = tokens[:i], rows[:i], "eos"
                break
        room = self.max_new_tokens - len(self.ids)
        tokens, rows = tokens[:room], rows[:room]
        self.ids += tokens
        self.rows += rows
        self.stats.generated_tokens = len(self.ids)
        self.text = self.lm.decode(self.ids)
        self.offsets.remember(len(self.ids), self.text)
        self.apply_stop_strings()
        if self.finish is None and len(self.ids) >= self.max_new_tokens:
            self.finish = "length"
        yield from self.pieces()

    def apply_stop_strings(self) -> None:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop)
                if i >= 0]
        if not hits:
            return
        # drop the token the stop string starts in (see emit); streamed text is never
        # taken back: the stream holds whole tokens that may start a stop string
        self.keep_tokens(self.whole_boundary(min(hits)))
        self.finish = "stop"

    def keep_tokens(self, keep: int) -> None:
        """Truncate the output to its first ``keep`` tokens and their decoded text."""
        del self.ids[keep:], self.rows[keep:]
        self.offsets.truncate(keep)
        self.text = self.lm.decode(self.ids)
        self.offsets.remember(keep, self.text)
        self.stats.generated_tokens = len(self.ids)

    def whole_boundary(self, chars: int) -> int:
        """The most tokens (at least those streamed) that decode to whole characters and to
        at most ``chars`` characters."""
        t = len(self.ids)
        while t > self.streamed and (self.offsets.prefix_length(self.ids, t) > chars
                                     or not self.offsets.is_whole(self.ids, t)):
            t -= 1
        return t

    def pieces(self) -> Iterator[NestChunk]:
        """Chunks for the tokens not streamed yet, one per run: tokens copied from
        consecutive rows of one passage, or generated ones. Each chunk holds the text of its
        own tokens only, and its span when they were copied (a chunk of bare whitespace has
        none: spans exclude it). Until the answer ends, whole tokens that may start a stop
        string are held back (:meth:`safe_length`), as are tokens of a partial character; a
        character split over two runs is streamed with the run that completes it, and
        tokens that add no text ride with the next chunk (or the last one): the chunks'
        ``token_ids`` add up to the result's.
        """
        limit = len(self.ids) if self.finish else self.whole_boundary(self.safe_length())
        t = self.streamed
        while t < limit:
            end = t + 1
            while end < limit and self.same_run(end - 1, end):
                end += 1
            upto = (len(self.text) if self.finish and end == len(self.ids)
                    else self.offsets.prefix_length(self.ids, end))
            if upto > self.sent:  # else its tokens go with the next chunk, which has the text
                if not self.stats.first_token_seconds:
                    self.stats.first_token_seconds = time.perf_counter() - self.started
                yield NestChunk(text=self.text[self.sent:upto],
                                token_ids=self.ids[self.streamed:end], span=self.span_of(t, end))
                self.sent, self.streamed = upto, end
            t = end

    def same_run(self, a: int, b: int) -> bool:
        """Whether tokens ``a`` and ``b = a + 1`` belong to one run (see :meth:`pieces`)."""
        ra, rb = self.rows[a], self.rows[b]
        if ra == NO_SOURCE or rb == NO_SOURCE:
            return ra == rb
        assert self.index is not None
        return rb == ra + 1 and bool(self.index.passage_of[ra] == self.index.passage_of[rb])

    def span_of(self, t0: int, t1: int) -> Span | None:
        """The span of tokens ``t0:t1`` of one copied run (``None`` for generated ones).

        It ends with the run's last token that completes a character (a token leaving a
        partial character is not cited). A first character begun by tokens before the run
        is cited only when it is the source's character there; else the span starts after
        it. Either way ``make_span`` checks that output and source text are the same.
        """
        if self.index is None or self.rows[t0] == NO_SOURCE:
            return None
        while t1 > t0 and not self.offsets.is_whole(self.ids, t1):
            t1 -= 1
        span = (make_span(self.text, self.ids, self.rows, (t0, t1), self.index, self.offsets)
                if t1 > t0 else None)
        if span is None and not self.offsets.is_whole(self.ids, t0):
            while t0 < t1 and not self.offsets.is_whole(self.ids, t0):
                t0 += 1
            if t0 < t1:
                span = make_span(self.text, self.ids, self.rows, (t0, t1), self.index,
                                 self.offsets)
        return span

    def safe_length(self) -> int:
        """Text that can be streamed now: hold back a tail that may start a stop string
        (looked for in the text without its dangling partial character, if any)."""
        text = self.text[:self.offsets.prefix_length(self.ids, len(self.ids))]
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return len(text) - held

    def final_chunk(self) -> NestChunk:
        stats = self.stats
        spans = [s for s in (self.span_of(*r) for r in runs(self.rows, self.index))
                 if s is not None] if self.index is not None else []
        stats.copied_tokens = sum(s.num_tokens for s in spans)
        stats.total_seconds = time.perf_counter() - self.started
        stats.first_token_seconds = stats.first_token_seconds or stats.total_seconds
        result = NestResult(text=self.text, token_ids=list(self.ids), spans=spans,
                            passages=self.passages, stats=stats,
                            finish_reason=self.finish or "length",
                            prompt_truncated=self.prompt_truncated)
        rest, rest_ids = self.text[self.sent:], self.ids[self.streamed:]
        self.sent, self.streamed = len(self.text), len(self.ids)
        return NestChunk(text=rest, token_ids=rest_ids, span=None, result=result)
