"""The decoding rules of Nest (paper Secs. 3.2-3.4, PAPER.md 2.3-2.11) and of the options
beyond it, each pinned on the tiny random Llama (float32, CPU) or on hand-made tensors.

Each test fails under a one-line mutation of its rule in ``nest_core`` (checked when the
file was written; the mutation is named in each test's comment). The decoding loop is
observed, not mocked: :class:`Tracer` watches the real :class:`Generation` (its ``trace``
argument) and records what it proposes, feeds and emits; :class:`CountingLM` is the real
tiny LM recording its forwards.

1. a span starts at the nearest neighbour whose value is argmax p_M (Eq. 5);
2. λ ≥ δ: a single token, no draft (Eq. 6);
3. λ = sigmoid((ρ - α) / τ) (Eq. 4);
4. exactly the accepted draft rows are masked;
5. after an accepted draft (whole or cut) the next belief is rescored without the copied
   keys;
6. streaming continues from the last copied row of a fully accepted draft;
7. on a rejection the draft is cut there, and that position gets argmax p_M (rescored
   after masking) from the next step: a single unattributed token, or a new span's start;
8. one LM forward per step: a single-token step 1, a draft step 1 whatever its length
   and wherever it is rejected;
9-13. confidence_reference="norm", span_passages, end_with_lm, repetition_stop,
   verify_against="lm";
14. row 0 of a passage is never searched or copied; windows key each context exactly once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import PASSAGES, PROMPT

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.attribution import NO_SOURCE
from nest_core.config import NestConfig as Config
from nest_core.decoding.beliefs import Belief
from nest_core.decoding.drafters import Draft, RetrievedSpans
from nest_core.decoding.loop import Generation
from nest_core.encoding import EncodedPassage, PassageEncoder, _windows
from nest_core.lm import LanguageModel, LMOutput
from nest_core.token_index import TokenIndex
from nest_core.types import DecodeStats, NestResult

pytestmark = pytest.mark.usefixtures("one_thread")

# α = 1: λ < δ whenever ρ < 1, so every step may draft; a tiny γ accepts nearly every draft
# token: long copied runs, streaming and masking.
COPY_HEAVY = NestConfig(confidence_offset=1.0, relaxation=1e-6, span_length=8,
                        initial_span_length=2)
# α = 0.3 and γ = 0.9: single tokens (λ ≥ δ), partially and fully accepted drafts, and
# streaming, all in one 40-token answer; with 1-token first drafts (SHORT) streamed drafts
# whose first token is rejected too.
MIXED = NestConfig(confidence_offset=0.3, relaxation=0.9, span_length=8,
                   initial_span_length=2)
SHORT = MIXED.with_overrides(initial_span_length=1)
RUNS = ("copy", "mixed", "short")




# --- instruments: the real classes, recording ------------------------------------------------
class CountingLM(LanguageModel):
    """The real tiny LM, recording every cached forward (the ids it was fed).

    ``eos_at``: an absolute sequence position whose next-token logits get EOS on top, so
    the LM's own argmax is EOS there and nowhere else (hidden states are untouched).
    """

    def __init__(self, lm: LanguageModel, eos_at: int | None = None) -> None:
        super().__init__(lm.model, lm.tokenizer, name=lm.name)
        self.eos_at = eos_at
        self.calls: list[list[int]] = []

    def forward(self, input_ids, cache, key_layer, last_only=False):
        assert len(self.calls) < 400, "the decoding loop makes no progress"
        before = cache.get_seq_length()
        out = super().forward(input_ids, cache, key_layer, last_only=last_only)
        self.calls.append(list(input_ids))
        if self.eos_at is None:
            return out
        logits = out.logits.clone()
        last = before + len(input_ids) - 1  # sequence position of the last logits row
        for i in range(logits.shape[0]):
            if last - (logits.shape[0] - 1 - i) + 1 == self.eos_at:
                logits[i, min(self.eos_token_ids)] = logits[i].max() + 30.0
        return LMOutput(logits=logits, hidden=out.hidden)


@dataclass
class Step:
    """One iteration of the decoding loop, as observed."""

    belief: Belief  # what the proposer was given
    stream_row: int | None
    length: int
    rows: list[int]  # proposed draft rows
    inactive_before: set[int]  # masked rows when the step began
    ids_before: list[int]
    rows_before: list[int]
    lm_calls_before: int
    continuation: list[int]  # index.continuation(stream_row, length) when streaming
    draft: list[int]  # the tokens of the proposed rows
    draft_forwards: list[tuple[list[int], list[Belief]]] = field(default_factory=list)
    tokens: list[int] | None = None  # what the step emitted (before EOS/budget cuts)
    out_rows: list[int] | None = None

    @property
    def kind(self) -> str:
        if not self.rows:
            return "single"
        if not self.draft_forwards:
            return "first_rejected"
        if self.tokens == self.draft and self.out_rows == self.rows:
            return "full"
        return "partial"

    def judges(self) -> list[Belief]:
        """``judges()[i]`` is p_M at draft position i: it verifies ``draft[i]``."""
        (_, beliefs), = self.draft_forwards
        return [self.belief, *beliefs]

    @property
    def streaming(self) -> bool:
        return self.stream_row is not None and bool(self.continuation)


def _spans(index: TokenIndex, span_passages: int | None = None) -> RetrievedSpans:
    """The paper's span proposer with δ = 0.5 (single-row drafts: the start is the rule)."""
    return RetrievedSpans(index, 0.5, initial_length=1, max_length=1,
                          span_passages=span_passages)


class Tracer:
    """Records each step of a real generation (propose -> forward -> accept)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def proposed(self, gen: Generation, belief: Belief, draft: Draft | None) -> None:
        spans = gen.drafters.drafters[0]
        assert isinstance(spans, RetrievedSpans)
        assert gen.index is not None
        length = min(spans.length, gen.out.budget)
        stream_row = spans.stream_row
        cont = gen.index.continuation(stream_row, length) if stream_row is not None else []
        lm = gen.lm
        assert isinstance(lm, CountingLM)
        self.steps.append(Step(
            belief=belief, stream_row=stream_row, length=length,
            rows=list(draft.rows) if draft else [],
            inactive_before=set((~gen.index.active).nonzero()[:, 0].tolist()),
            ids_before=list(gen.out.ids), rows_before=list(gen.out.rows),
            lm_calls_before=len(lm.calls), continuation=cont,
            draft=list(draft.tokens) if draft else []))

    def fed(self, gen: Generation, ids: Sequence[int], beliefs: list[Belief]) -> None:
        step = self.steps[-1] if self.steps else None
        # the draft's forward: its first token may have been accepted already
        if step is not None and step.draft and not step.draft_forwards \
                and list(ids) == step.draft:
            step.draft_forwards.append((list(ids), beliefs))

    def accepted(self, gen: Generation, tokens: list[int], rows: list[int]) -> None:
        step = self.steps[-1]  # a draft's first token may be accepted before the rest
        step.tokens = [*(step.tokens or []), *tokens]
        step.out_rows = [*(step.out_rows or []), *rows]


@dataclass
class Traced:
    """A finished generation and its recorded steps."""

    gen: Generation
    steps: list[Step]
    cfg: Config

    @property
    def index(self) -> TokenIndex | None:
        return self.gen.index

    @property
    def rows(self) -> list[int]:
        return self.gen.out.rows

    @property
    def ids(self) -> list[int]:
        return self.gen.out.ids

    @property
    def lm(self) -> Any:
        return self.gen.lm

    @property
    def prompt_ids(self) -> list[int]:
        return self.gen.prompt_ids


def traced(lm: CountingLM, config: NestConfig, passages: Sequence[Passage] = PASSAGES,
           prompt: str = PROMPT, max_new_tokens: int = 40) -> tuple[Traced, NestResult]:
    dec = NestDecoder(lm, config)
    stats = DecodeStats()
    index = dec._index(list(passages), stats)
    tracer = Tracer()
    gen = Generation(lm, config, lm.prompt_ids(prompt), passages, index,
                     max_new_tokens=max_new_tokens, stop=[], stats=stats,
                     started=time.perf_counter(), prompt_truncated=False, trace=tracer)
    chunks = list(gen.run())
    result = chunks[-1].result
    assert result is not None
    return Traced(gen, tracer.steps, config), result


_RUNS: dict[tuple[int, str], tuple[Traced, NestResult]] = {}


def cached_run(tiny_lm: LanguageModel, name: str) -> tuple[Traced, NestResult]:
    """One traced 40-token answer per named config, shared by the tests of this module."""
    key = (id(tiny_lm), name)
    if key not in _RUNS:
        config = {"copy": COPY_HEAVY, "mixed": MIXED, "short": SHORT}[name]
        _RUNS[key] = traced(CountingLM(tiny_lm), config)
    return _RUNS[key]


# --- independent recomputation of the paper's quantities -------------------------------------
def rrc(dist2: torch.Tensor, alpha: float, tau: float) -> float:
    """λ of Eq. 4 from one position's sorted squared distances, by hand."""
    d = dist2.flatten().double().tolist()
    rho = d[0] / d[-1] if d[-1] > 0 else 1.0
    return 1.0 / (1.0 + math.exp(-(rho - alpha) / tau))


def dense_mixture(belief: Belief, index: TokenIndex, config: NestConfig) -> torch.Tensor:
    """p_M over the whole vocabulary, from the belief's logits and neighbours (Eqs. 2-4)."""
    p_lm = torch.softmax(belief.logits.double() / config.lm_temperature, dim=-1)
    if belief.neighbors is None:
        return p_lm
    d2 = belief.neighbors.dist2[0].double()
    w = torch.softmax(-d2 / math.sqrt(index.dim), dim=-1)
    p_knn = torch.zeros_like(p_lm).index_add_(0, index.values[belief.neighbors.rows[0]], w)
    lam = rrc(d2, config.confidence_offset, config.confidence_scale)
    return lam * p_lm + (1 - lam) * p_knn


def nearest_carrier(belief: Belief, index: TokenIndex, token: int,
                    span_passages: int | None = None) -> int | None:
    assert belief.neighbors is not None
    for row in belief.neighbors.rows[0].tolist():
        rank = int(index.passage_of[row])
        if int(index.values[row]) == token and (span_passages is None or rank < span_passages):
            return row
    return None


# --- 1, 2: span selection on a hand-made datastore --------------------------------------------
def _toy_index() -> TokenIndex:
    """Three passages, one key dimension; values: p0 = [5, 7, 8], p1 = [7, 9], p2 = [7, 6]."""
    def enc(keys: list[float], values: list[int]) -> EncodedPassage:
        return EncodedPassage(keys=torch.tensor(keys)[:, None],
                              values=torch.tensor(values),
                              char_spans=torch.tensor([[i, i + 1] for i in range(len(keys))],
                                                      dtype=torch.int32))

    passages = [Passage(f"p{i}", "abc") for i in range(3)]
    return TokenIndex(passages, [enc([0.0, 3.0, 4.0], [5, 7, 8]), enc([2.0, 5.0], [7, 9]),
                                 enc([1.0, 6.0], [7, 6])], vocab_size=10)


def _toy_belief(index: TokenIndex, query: float, top_token: int, lam: float) -> Belief:
    found = index.search(torch.tensor([[query]]), k=16)
    assert found is not None
    return Belief(top_token=top_token, top_prob=0.5, lam=lam, neighbors=found,
                  scaled_logits=torch.zeros(10), lse=torch.tensor(math.log(10)),
                  weights=torch.softmax(-found.dist2[0], -1), values=index.values[found.rows[0]],
                  logits=torch.zeros(10), hidden=torch.tensor([query]))


def test_rule1_span_starts_at_the_nearest_neighbour_carrying_argmax_p_m():
    # caught: start at the nearest neighbour (rows[0, 0]) or at a farther carrier
    index = _toy_index()
    belief = _toy_belief(index, query=0.0, top_token=7, lam=0.1)
    # neighbours by distance: row 0 (value 5), row 5 (7, passage 2), row 3 (7, passage 1),
    # row 1 (7, passage 0), ...: the nearest carrier of 7 is row 5, not the nearest row
    # and not a farther carrier.
    assert belief.neighbors is not None
    assert belief.neighbors.rows[0, :4].tolist() == [0, 5, 3, 1]
    rows = _spans(index).rows(belief, None, 4)
    assert rows == [5, 6]  # start, then the rest of passage 2
    assert index.values[rows[0]] == 7
    # no retrieved row carries the mixture's choice: nothing to copy
    assert _spans(index).rows(
        _toy_belief(index, 0.0, top_token=4, lam=0.1), None, 4) == []


def test_rule1_every_proposed_span_starts_at_the_nearest_carrier_of_argmax_p_m(tiny_lm):
    # caught: start at the nearest neighbour (rows[0, 0]) or at a farther carrier
    for name in RUNS:
        gen, _ = cached_run(tiny_lm, name)
        assert gen.index is not None
        fresh = [s for s in gen.steps if s.rows and not s.streaming]
        assert len(fresh) >= 3
        for s in fresh:
            top = int(dense_mixture(s.belief, gen.index, gen.cfg).argmax())
            assert s.belief.top_token == top
            assert s.rows[0] == nearest_carrier(s.belief, gen.index, top)
        # the nearest carrier is often not the nearest neighbour: the test tells them apart
        assert any(s.rows[0] != int(s.belief.neighbors.rows[0, 0]) for s in fresh)


@pytest.mark.parametrize(("lam", "drafts"), [(0.5, False), (0.7, False), (0.4999, True)])
def test_rule2_a_single_token_when_lambda_reaches_delta(lam, drafts):
    # caught: `λ >= δ` -> `λ > δ` (λ = δ exactly), or drafting whatever λ
    index = _toy_index()
    rows = _spans(index).rows(
        _toy_belief(index, 0.0, top_token=7, lam=lam), None, 4)
    assert bool(rows) is drafts


def test_rule2_no_draft_is_proposed_where_lambda_reaches_delta(tiny_lm):
    # caught: drafting whatever λ
    gen, _ = cached_run(tiny_lm, "mixed")
    fresh = [s for s in gen.steps if not s.streaming]
    trusted = [s for s in fresh if s.belief.lam >= gen.cfg.span_threshold]
    assert trusted, "the mixed run must have steps where λ ≥ δ"
    assert all(s.rows == [] for s in trusted)
    assert any(s.rows for s in fresh if s.belief.lam < gen.cfg.span_threshold)


# --- 3: λ = sigmoid((ρ - α) / τ) ----------------------------------------------------------------
def test_rule3_alpha_offsets_and_tau_scales_rho(tiny_lm):
    # caught: (ρ - τ)/α in the formula, τ dropped, α and τ swapped where the decoder calls it
    from nest_core.decoding import mixture

    d2 = torch.tensor([[1.0, 2.0, 4.0]])  # ρ = 0.25
    lam = float(mixture.retrieval_confidence(d2, 0.45, 0.08)[0])
    assert lam == pytest.approx(1 / (1 + math.exp(-(0.25 - 0.45) / 0.08)), rel=1e-6)
    # and in the decoder, at every position of a fed sequence, with α ≠ τ
    cfg = NestConfig(confidence_offset=0.45, confidence_scale=0.08)
    dec = NestDecoder(tiny_lm, cfg)
    index = dec._index(PASSAGES, DecodeStats())
    gen = Generation(tiny_lm, cfg, [], PASSAGES, index, max_new_tokens=4, stop=[],
                     stats=DecodeStats(), started=0.0, prompt_truncated=False)
    ids = tiny_lm.prompt_ids(PROMPT) + tiny_lm.tokenizer.encode(" The quick brown fox")
    beliefs = gen.forward(ids)
    lams = [b.lam for b in beliefs]
    expected = [rrc(b.neighbors.dist2, 0.45, 0.08) for b in beliefs]
    assert lams == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert max(lams) - min(lams) > 0.2, "λ must vary over the positions to pin α and τ"


# --- 4, 5, 6: masking, rescoring, streaming -------------------------------------------------------
def _kinds(gen: Traced) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in gen.steps:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


def test_rule4_exactly_the_accepted_draft_rows_are_masked(tiny_lm):
    # caught: mask(rows) (every drafted row), mask(rows[:0]) (none)
    for name in RUNS:
        gen, _ = cached_run(tiny_lm, name)
        assert gen.index is not None
        final = set((~gen.index.active).nonzero()[:, 0].tolist())
        ends = [s.inactive_before for s in gen.steps[1:]] + [final]
        for s, after in zip(gen.steps, ends, strict=True):
            assert s.out_rows is not None
            copied = {r for r in s.out_rows if r != NO_SOURCE}
            assert s.inactive_before <= after
            assert after - s.inactive_before == copied, (name, s.kind)
    kinds = [s.kind for name in RUNS for s in cached_run(tiny_lm, name)[0].steps]
    assert {"partial", "full", "first_rejected"} <= set(kinds)


def test_rule5_each_belief_is_rescored_after_masking(tiny_lm):
    # caught: no rescore (stale belief) after a fully accepted draft, or after a cut one
    for name in RUNS:
        gen, _ = cached_run(tiny_lm, name)
        after_full = 0
        for prev, s in zip(gen.steps, gen.steps[1:], strict=False):
            assert s.belief.neighbors is not None
            # every active row is a neighbour here (r = 1024 > rows): none may be masked
            assert not set(s.belief.neighbors.rows[0].tolist()) & s.inactive_before
            assert s.belief.neighbors.rows.shape[1] == gen.index.num_rows - len(
                s.inactive_before)
            after_full += prev.kind == "full"
        assert after_full >= 2


def test_rule6_streaming_continues_from_the_last_copied_row(tiny_lm):
    # caught: stream_row = rows[0] or None after a full draft; streaming after a cut draft
    for name in RUNS:
        gen, _ = cached_run(tiny_lm, name)
        assert gen.index is not None
        for prev, s in zip(gen.steps, gen.steps[1:], strict=False):
            # only after a fully accepted draft (not after a cut one, nor a single token)
            assert s.stream_row == (prev.rows[-1] if prev.kind == "full" else None)
            if s.streaming:
                assert s.rows == s.continuation
                assert s.rows[0] == s.stream_row + 1
        long_full = [p for p, s in zip(gen.steps, gen.steps[1:], strict=False)
                     if p.kind == "full" and len(p.rows) >= 2 and s.streaming]
        assert long_full, "need a stream after a multi-token draft (rows[0] != rows[-1])"


# --- 7: the replacement token -------------------------------------------------------------------
def _accepted(judge: Belief, token: int, gen: Traced) -> bool:
    p = dense_mixture(judge, gen.index, gen.cfg)
    return bool(p[token] > 0.5 * gen.cfg.relaxation * p.max())


def test_rule7_a_rejected_position_is_decoded_from_argmax_p_m_there(tiny_lm):
    # caught: the rejected draft token kept with its row; the next step seeded from the
    # position after the rejected one
    cut = 0
    for name in RUNS:
        gen, result = cached_run(tiny_lm, name)
        assert gen.index is not None
        for s, nxt in zip(gen.steps, gen.steps[1:], strict=False):
            if not s.draft_forwards:
                continue
            assert s.draft_forwards[0][0] == s.draft
            judges = s.judges()
            n_ok = 1
            while n_ok < len(s.draft) and _accepted(judges[n_ok], s.draft[n_ok], gen):
                n_ok += 1
            assert s.tokens == s.draft[:n_ok]  # the prefix rule, and nothing after it
            assert s.out_rows == s.rows[:n_ok]
            if n_ok == len(s.draft):
                continue
            cut += 1
            # the next step decodes the rejected position, from p_M there rescored
            pos = len(s.ids_before) + n_ok
            assert len(nxt.ids_before) == pos
            assert torch.equal(nxt.belief.hidden, judges[n_ok].hidden)
            assert nxt.stream_row is None
            replacement = int(dense_mixture(nxt.belief, gen.index, gen.cfg).argmax())
            assert nxt.tokens is not None
            assert nxt.tokens[0] == replacement
            assert result.token_ids[pos] == replacement
            if nxt.kind == "single":  # a lone LM token: unattributed
                assert gen.rows[pos] == NO_SOURCE
                assert not any(sp.token_start <= pos < sp.token_end for sp in result.spans)
            else:  # a new span from the nearest carrier of argmax p_M (rule 1)
                assert gen.rows[pos] == nearest_carrier(nxt.belief, gen.index, replacement)
    assert cut >= 3


# --- 8: LM forwards ------------------------------------------------------------------------------
def test_rule8_one_forward_per_step_whatever_the_draft_length(tiny_lm):
    # caught: verifying a draft token by token; re-feeding the last accepted token instead of
    # rescoring (after a full or a cut draft); feeding a single token twice
    for name in RUNS:
        gen, result = cached_run(tiny_lm, name)
        calls = gen.lm.calls
        assert calls[0] == gen.prompt_ids
        bounds = [s.lm_calls_before for s in gen.steps] + [len(calls)]
        assert bounds[0] == 1
        for i, s in enumerate(gen.steps):
            last = i == len(gen.steps) - 1
            assert s.tokens is not None
            step_calls = calls[bounds[i]:bounds[i + 1]]
            if s.kind in ("single", "first_rejected"):
                expected = [] if last else [s.tokens]
            else:  # the verification pass also gives the next belief, cut or not
                expected = [s.draft]
            assert step_calls == expected, (name, i, s.kind)
        assert result.stats.lm_forwards == len(calls)
    kinds = {(s.kind, len(s.draft) >= 4)
             for name in RUNS for s in cached_run(tiny_lm, name)[0].steps}
    assert {("full", True), ("partial", True), ("single", False)} <= kinds


# --- 9: confidence_reference="norm" ---------------------------------------------------------------
def test_rule9_norm_reference_lambda_ignores_far_rows(tiny_lm):
    # caught: ||k||² of the farthest row, reference ignored, ||k_1||² dropped
    encoder = PassageEncoder(tiny_lm)
    near = encoder.encode(PASSAGES[:2])
    dim = near[0].keys.shape[1]
    gen0 = torch.Generator().manual_seed(0)
    far = [EncodedPassage(keys=(50.0 + torch.rand(10, dim, generator=gen0)).half(),
                          values=torch.full((10,), 100), char_spans=torch.tensor(
                              [[i, i + 1] for i in range(10)], dtype=torch.int32))
           for _ in range(20)]
    distractors = [Passage(f"d{i}", "x" * 10) for i in range(20)]
    ids = tiny_lm.prompt_ids(PROMPT) + tiny_lm.tokenizer.encode(" Nearest neighbor")
    out = tiny_lm.forward(ids, tiny_lm.new_cache(), -2)

    def lams(reference: str, with_far: bool) -> list[float]:
        cfg = NestConfig(confidence_reference=reference)
        passages = PASSAGES[:2] + (distractors if with_far else [])
        index = TokenIndex(passages, near + (far if with_far else []), tiny_lm.vocab_size)
        gen = Generation(tiny_lm, cfg, [], passages, index, max_new_tokens=4, stop=[],
                         stats=DecodeStats(), started=0.0, prompt_truncated=False)
        beliefs = gen.judge.beliefs(out.logits, out.hidden)
        if with_far:  # the far rows are retrieved, and they are the farthest
            assert all(int(b.neighbors.rows[0, -1]) >= sum(e.num_rows for e in near)
                       for b in beliefs)
        else:  # ρ = d²_1 / (||q||² + ||k_1||²) by hand
            for b, q in zip(beliefs, out.hidden, strict=True):
                if reference == "norm":
                    k1 = index.keys[int(b.neighbors.rows[0, 0])].double()
                    rho = float(b.neighbors.dist2[0, 0]) / float(q.double() @ q.double()
                                                                 + k1 @ k1)
                    assert b.lam == pytest.approx(1 / (1 + math.exp(-(rho - 0.3) / 0.1)),
                                                  rel=1e-4)
        return [b.lam for b in beliefs]

    assert lams("norm", True) == lams("norm", False)
    assert lams("farthest", True) != pytest.approx(lams("farthest", False), abs=1e-3)


# --- 10: span_passages ---------------------------------------------------------------------------
def test_rule10_spans_start_only_in_the_top_m_passages():
    # caught: rank <= m, no rank filter
    index = _toy_index()
    belief = _toy_belief(index, query=0.0, top_token=7, lam=0.1)
    # carriers of 7 by distance: row 5 (passage 2), row 3 (passage 1), row 1 (passage 0)
    assert _spans(index, span_passages=3).rows(belief, None, 1) == [5]
    assert _spans(index, span_passages=2).rows(belief, None, 1) == [3]
    assert _spans(index, span_passages=1).rows(belief, None, 1) == [1]
    only_p2 = _toy_belief(index, query=6.0, top_token=6, lam=0.1)  # 6: only in passage 2
    assert _spans(index, span_passages=3).rows(only_p2, None, 1) == [6]
    assert _spans(index, span_passages=2).rows(only_p2, None, 1) == []


@pytest.mark.parametrize("m", [1, 2])
def test_rule10_no_copied_span_starts_below_rank_m(tiny_lm, m):
    # caught: rank <= m, no rank filter, span_passages not passed to the proposer
    free = NestDecoder(tiny_lm, COPY_HEAVY).generate(PROMPT, PASSAGES, max_new_tokens=40)
    assert any(PASSAGES.index(s.passage) >= m for s in free.spans), "test must discriminate"
    gen, result = traced(CountingLM(tiny_lm), COPY_HEAVY.with_overrides(span_passages=m))
    assert gen.index is not None
    assert result.spans
    assert all(PASSAGES.index(s.passage) < m for s in result.spans)
    for s in gen.steps:
        if s.rows and not s.streaming:
            assert int(gen.index.passage_of[s.rows[0]]) < m
            assert s.rows[0] == nearest_carrier(s.belief, gen.index, s.belief.top_token, m)


# --- 11: end_with_lm -----------------------------------------------------------------------------
def test_rule11_the_answer_ends_where_the_lm_ends_it_even_inside_a_draft(tiny_lm):
    # caught: verification ignoring lm_ends, the belief's top ignoring it, ends computed
    # whatever end_with_lm
    prompt_len = len(tiny_lm.prompt_ids(PROMPT))
    plain, _ = cached_run(tiny_lm, "copy")
    # an output position strictly inside a fully accepted multi-token draft
    step = next(s for s in plain.steps if s.kind == "full" and len(s.draft) >= 4)
    p = len(step.ids_before) + 2
    eos = min(tiny_lm.eos_token_ids)

    on, res_on = traced(CountingLM(tiny_lm, eos_at=prompt_len + p),
                        COPY_HEAVY.with_overrides(end_with_lm=True))
    assert res_on.finish_reason == "eos"
    assert res_on.token_ids == plain.ids[:p]
    # the draft covering p was cut there, and the next step decoded EOS, ending the answer
    assert on.steps[-2].kind == "partial"
    assert on.steps[-1].tokens == [eos]
    assert on.rows[p - 1] != NO_SOURCE

    off, res_off = traced(CountingLM(tiny_lm, eos_at=prompt_len + p), COPY_HEAVY)
    assert res_off.finish_reason == "length"
    assert len(res_off.token_ids) > p
    assert off.rows[p] != NO_SOURCE
    assert off.rows[p] == off.rows[p - 1] + 1


# --- 12: repetition_stop -------------------------------------------------------------------------
def _first_repeat_end(ids: Sequence[int], n: int) -> int | None:
    seen: set[tuple[int, ...]] = set()
    for end in range(n, len(ids) + 1):
        gram = tuple(ids[end - n:end])
        if gram in seen:
            return end
        seen.add(gram)
    return None


@pytest.mark.parametrize(("config", "passages", "n"), [
    (NestConfig(mode="base"), PASSAGES, 4),
    (COPY_HEAVY, [PASSAGES[2], Passage("fox2", PASSAGES[2].text)], 3),
])
def test_rule12_repetition_stop_never_repeats_an_n_gram(tiny_lm, config, passages, n):
    # caught: keeping the repeated n-gram, never recording n-grams, no finish (no progress)
    free = NestDecoder(tiny_lm, config).generate(PROMPT, passages, max_new_tokens=60)
    end = _first_repeat_end(free.token_ids, n)
    assert end is not None, "the free answer must repeat itself for the test to bite"
    res = NestDecoder(CountingLM(tiny_lm), config.with_overrides(repetition_stop=n)).generate(
        PROMPT, passages, max_new_tokens=60)
    assert _first_repeat_end(res.token_ids, n) is None
    assert res.finish_reason == "repetition"
    # the same answer, ended within the first repeated stretch (before its last token)
    assert res.token_ids == free.token_ids[:len(res.token_ids)]
    assert end - n <= len(res.token_ids) < end


# --- 13: verify_against="lm" ---------------------------------------------------------------------
def _lm_passes(belief: Belief, token: int, config: NestConfig) -> bool:
    p = torch.softmax(belief.logits.double() / config.lm_temperature, dim=-1)
    return bool(p[token] > 0.5 * config.relaxation * p.max())


def test_rule13_verify_against_lm(tiny_lm):
    # caught: p_M(token) against max p_LM in verification, p_M's argmax as the single token,
    # checked against max p_M
    cfg = NestConfig(confidence_offset=1.0, relaxation=1.0, span_length=8,
                     initial_span_length=2, verify_against="lm")
    gen, _ = traced(CountingLM(tiny_lm), cfg, max_new_tokens=60)
    assert gen.index is not None
    seen = {"draft_ok": 0, "draft_no": 0, "mix_differs": 0}

    def checked_top(belief: Belief) -> int:
        """The LM's own argmax: p_M only proposes drafts, it never picks a single token."""
        mix_top = int(dense_mixture(belief, gen.index, cfg).argmax())
        lm_top = int(belief.logits.argmax())
        seen["mix_differs"] += mix_top != lm_top
        return lm_top

    for s in gen.steps:
        assert s.tokens is not None
        if s.rows and not s.streaming:  # a new span starts with the checked token
            assert s.draft[0] == checked_top(s.belief)
        if s.kind in ("single", "first_rejected"):
            if s.kind == "first_rejected":
                assert not _lm_passes(s.belief, s.draft[0], cfg)
                seen["draft_no"] += 1
            assert s.tokens == [checked_top(s.belief)]
            continue
        judges = s.judges()
        n_ok = len(s.tokens)
        assert s.tokens == s.draft[:n_ok]
        for i in range(n_ok):
            assert _lm_passes(judges[i], s.draft[i], cfg), (i, s.draft)
            seen["draft_ok"] += 1
        if n_ok < len(s.draft):
            assert not _lm_passes(judges[n_ok], s.draft[n_ok], cfg)
            seen["draft_no"] += 1
    assert all(seen.values()), seen


# --- 14: row 0 and windows -----------------------------------------------------------------------
def test_rule14_row_0_is_never_searched_or_copied(tiny_lm):
    # caught: row 0 left searchable
    untitled = [p for p in PASSAGES if not p.title]
    dec = NestDecoder(tiny_lm, COPY_HEAVY)
    encoded = dec.encoder.encode(untitled)
    index = TokenIndex(untitled, encoded, tiny_lm.vocab_size)
    starts = index.row_start.tolist()
    assert all(e.char_spans[0].tolist() == [-1, -1] for e in encoded)
    assert not index.active[starts].any()
    queries = torch.cat([e.keys[:1].float() for e in encoded])  # row 0's own key
    found = index.search(queries, k=10_000)
    assert found is not None
    assert not set(found.rows.flatten().tolist()) & set(starts)
    gen, result = traced(CountingLM(tiny_lm), COPY_HEAVY, passages=untitled)
    assert result.spans
    assert not set(gen.rows) & set(gen.index.row_start.tolist())


@pytest.mark.parametrize("width", [8, 9, 12, 64])
def test_rule14_windows_key_each_context_once_never_at_a_window_start(width):
    # caught: windows without overlap, a context position skipped between windows
    for length in range(80):
        keyed: list[int] = []
        for a, b, keep in _windows(length, width):
            assert 0 <= a < b <= length
            assert b - a <= width
            assert keep >= 1 or a == 0  # a window's position 0 is keyed only at the start
            keyed += range(a + keep, b - 1)
        assert keyed == list(range(max(0, length - 1)))


def test_rule14_windowed_keys_all_have_context(tiny_lm):
    # caught: windows without overlap, a context position skipped between windows
    passage = Passage("big", " ".join(["The quick brown fox jumps over the lazy dog."] * 2))
    width = 8
    encoder = PassageEncoder(tiny_lm, max_passage_tokens=width, key_dtype=torch.float32)
    (enc,) = encoder.encode([passage])
    ids, _ = encoder._tokenise(passage)
    bos = tiny_lm.tokenizer.bos_token_id
    assert ids[0] == bos
    assert enc.num_rows == len(ids) - 1  # one key per context position
    assert enc.values.tolist() == ids[1:]
    alone = torch.tensor(ids[:1])[None]
    row0 = tiny_lm.encode_hidden(alone, torch.ones_like(alone), -2)[0, 0].float()
    assert torch.allclose(enc.keys[0], row0, atol=1e-5)  # row 0: no context, never searched
    # Key j is the LM state at token j of a window holding at least one earlier passage
    # token (with or without a BOS in front): never a window's first token.
    for j in range(1, enc.num_rows):
        contexts = [head + ids[a:j + 1] for a in range(max(0, j - width), j)
                    for head in ([], [bos])]
        lengths = [len(c) for c in contexts]
        batch = torch.full((len(contexts), max(lengths)), bos)
        mask = torch.zeros_like(batch)
        for i, c in enumerate(contexts):
            batch[i, :len(c)] = torch.tensor(c)
            mask[i, :len(c)] = 1
        states = tiny_lm.encode_hidden(batch, mask, -2).float()
        last = states[torch.arange(len(contexts)), torch.tensor(lengths) - 1]
        gaps = (last - enc.keys[j]).norm(dim=-1)
        assert float(gaps.min()) < 1e-4, f"key {j} is the state of no context with a token"



def test_every_token_is_counted_under_the_part_that_proposed_it(tiny_lm):
    # caught: a draft's tokens counted as the LM's; a token counted twice or after a cut
    for name in RUNS:
        gen, res = cached_run(tiny_lm, name)
        by_source = res.stats.tokens_by_source
        assert sum(by_source.values()) == len(res.token_ids)
        assert set(by_source) <= {"lm", "knn"}  # the paper's loop: no lookups
        # without lookups, the tokens with a source row are exactly the retrieved spans'
        assert by_source.get("knn", 0) == sum(r != NO_SOURCE for r in gen.rows) > 0
