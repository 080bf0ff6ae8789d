"""Output rules of the decoder, pinned on a tiny random Llama (float32, CPU).

* ``lm.decode(result.token_ids) == result.text``, always (stop strings, ``max_new_tokens``
  cutting a multi-byte character, streaming).
* A stop string that starts inside a token drops that token: the text ends where the kept
  tokens end, before the stop string, and the copied tokens kept still carry their span.
* Every streamed chunk holds text of one run only (copied from one passage run, or
  generated); a copied chunk carries its span, a generated one has none; the chunks add up
  to the result, token ids included.
"""

from __future__ import annotations

import pytest
from conftest import PASSAGES, PROMPT

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.lm import LanguageModel
from nest_core.types import NestChunk, NestResult

# Characters outside the tiny tokenizer's training text: byte-level BPE splits each of these
# 3-byte characters over several tokens.
CJK = [Passage("cjk", "数学者は東京で数学を教える。京都の大学で研究した。")]
CJK_PROMPT = "数学者は東京で"
COPY_HEAVY = NestConfig(confidence_offset=1.0, relaxation=1e-6, span_length=8,
                        initial_span_length=2)
# γ = 1 rejects many drafts: the output mixes copied runs and generated tokens.
MIXED = NestConfig(confidence_offset=0.4, relaxation=1.0, span_length=8,
                   initial_span_length=8)


def stream(lm: LanguageModel, config: NestConfig, prompt: str, passages: list[Passage],
           **kwargs) -> tuple[list[NestChunk], NestResult]:
    chunks = list(NestDecoder(lm, config).stream(prompt, passages, **kwargs))
    result = chunks[-1].result
    assert result is not None
    assert all(c.result is None for c in chunks[:-1])
    return chunks, result


def check_output(lm: LanguageModel, result: NestResult) -> None:
    assert lm.decode(result.token_ids) == result.text
    for s in result.spans:
        assert result.text[s.out_start:s.out_end] == s.text
        assert s.passage.text[s.src_start:s.src_end] == s.text
        assert 0 <= s.token_start < s.token_end <= len(result.token_ids)


def check_chunks(chunks: list[NestChunk], result: NestResult) -> None:
    """Chunks add up to the result and each one is pure: its text overlaps at most one
    result span, and carries a span (of that passage, inside that span) exactly then."""
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert all(c.text for c in chunks[:-1]), "no empty chunks mid-stream"
    start = tok = 0
    for c in chunks:
        end, tok_end = start + len(c.text), tok + len(c.token_ids)
        by_chars = [s for s in result.spans if s.out_start < end and start < s.out_end]
        by_tokens = [s for s in result.spans if s.token_start < tok_end and tok < s.token_end]
        assert len(by_chars) <= 1, f"chunk {c.text!r} mixes runs {[s.text for s in by_chars]}"
        assert len(by_tokens) <= 1, f"chunk {c.text!r} holds tokens of several runs"
        if by_chars:
            (run,) = by_chars
            assert c.span is not None, f"copied chunk {c.text!r} carries no span"
            assert c.span.passage.id == run.passage.id
            assert run.token_start <= c.span.token_start < c.span.token_end <= run.token_end
            assert start <= c.span.out_start < c.span.out_end <= end
            assert result.text[c.span.out_start:c.span.out_end] == c.span.text
            assert c.span.passage.text[c.span.src_start:c.span.src_end] == c.span.text
            assert by_tokens == [run]
        else:
            assert c.span is None, f"generated chunk {c.text!r} carries a span"
        start, tok = end, tok_end


def token_ends(lm: LanguageModel, ids: list[int]) -> list[int]:
    """``ends[t]``: characters of ``decode(ids[:t])``."""
    return [len(lm.decode(ids[:t])) for t in range(len(ids) + 1)]


def spans_up_to(result: NestResult, ends: list[int], k: int) -> list[tuple[int, int, str]]:
    """``result``'s spans cut to its first ``k`` tokens (those left with text)."""
    return [(s.token_start, min(s.token_end, k), s.passage.id) for s in result.spans
            if s.token_start < k
            and result.text[ends[s.token_start]:ends[min(s.token_end, k)]].strip()]


# --- 1. a stop string that starts inside a token -------------------------------------------
def test_stop_string_inside_a_token_drops_that_token(tiny_lm):
    full = NestDecoder(tiny_lm, COPY_HEAVY).generate(PROMPT, PASSAGES, max_new_tokens=40)
    ends = token_ends(tiny_lm, full.token_ids)
    assert ends[-1] == len(full.text)
    # stop strings starting one character into a token (" ju" -> stop "jum", "lfeat" ->
    # "fea", ...) and not occurring earlier in the text
    cases = [(k, full.text[ends[k] + 1:ends[k] + 4]) for k in range(len(full.token_ids))
             if ends[k + 1] - ends[k] >= 3]
    cases = [(k, stop) for k, stop in cases if full.text.index(stop) == ends[k] + 1]
    assert len(cases) >= 3
    for k, stop in cases[:4]:
        chunks, res = stream(tiny_lm, COPY_HEAVY, PROMPT, PASSAGES, max_new_tokens=40,
                             stop=stop)
        assert res.finish_reason == "stop"
        assert res.token_ids == full.token_ids[:k], f"stop {stop!r}: drop the token it cuts"
        assert res.text == full.text[:ends[k]]
        assert stop not in res.text
        check_output(tiny_lm, res)
        check_chunks(chunks, res)
        # the copied tokens kept keep their spans
        got = [(s.token_start, s.token_end, s.passage.id) for s in res.spans]
        assert got == spans_up_to(full, ends, k), f"stop {stop!r}"
        assert res.attribution_ratio > 0


def test_stop_string_at_a_token_boundary_keeps_every_token_before_it(tiny_lm):
    full = NestDecoder(tiny_lm, COPY_HEAVY).generate(PROMPT, PASSAGES, max_new_tokens=40)
    ends = token_ends(tiny_lm, full.token_ids)
    k = next(k for k in range(5, len(full.token_ids))
             if full.text.index(full.text[ends[k]:ends[k] + 3]) == ends[k])
    res = NestDecoder(tiny_lm, COPY_HEAVY).generate(
        PROMPT, PASSAGES, max_new_tokens=40, stop=full.text[ends[k]:ends[k] + 3])
    assert res.token_ids == full.token_ids[:k]
    assert res.text == full.text[:ends[k]]
    check_output(tiny_lm, res)


# --- 2. max_new_tokens cutting a multi-byte character ---------------------------------------
def test_max_new_tokens_inside_a_character_keeps_text_and_spans_exact(tiny_lm):
    full = NestDecoder(tiny_lm, COPY_HEAVY).generate(CJK_PROMPT, CJK, max_new_tokens=40)
    assert full.stats.accepted_draft_tokens == len(full.token_ids), "setup: all copied"
    ends = token_ends(tiny_lm, full.token_ids)
    cuts = [n for n in range(1, 20) if tiny_lm.decode(full.token_ids[:n]).endswith("\ufffd")]
    assert len(cuts) >= 5, "setup: the output splits characters over tokens"
    for n in [*cuts[:6], 40]:
        chunks, res = stream(tiny_lm, COPY_HEAVY, CJK_PROMPT, CJK, max_new_tokens=n)
        assert res.token_ids == full.token_ids[:n]
        check_output(tiny_lm, res)
        # every copied token whose characters are whole is in a span; a dangling one is not
        whole = max(t for t in range(len(res.token_ids) + 1)
                    if not tiny_lm.decode(res.token_ids[:t]).endswith("\ufffd"))
        copied = sum(s.num_tokens for s in res.spans)
        assert copied == res.stats.copied_tokens == whole, f"max_new_tokens={n}"
        assert res.text[:ends[whole]] == full.text[:ends[whole]]
        assert "\ufffd" not in "".join(s.text for s in res.spans)
        check_chunks(chunks, res)


# --- 3. streaming: one run per chunk --------------------------------------------------------
@pytest.mark.parametrize("config", [COPY_HEAVY, MIXED], ids=["copy-heavy", "mixed"])
def test_held_back_text_is_streamed_with_its_own_run(tiny_lm, config):
    full = NestDecoder(tiny_lm, config).generate(PROMPT, PASSAGES, max_new_tokens=40)
    # stop strings that never match but make the stream hold back the last character of
    # every step, which is then released after the next step's tokens arrive
    stops = [c + "\x07" for c in set(full.text)]
    chunks, res = stream(tiny_lm, config, PROMPT, PASSAGES, max_new_tokens=40, stop=stops)
    assert res.token_ids == full.token_ids
    assert res.spans == full.spans
    check_output(tiny_lm, res)
    check_chunks(chunks, res)
    assert len({c.span.passage.id for c in chunks if c.span is not None}) >= 2
    if config is MIXED:
        assert any(c.span is None and c.text.strip() for c in chunks), "needs generated text"


# --- the pinned rules, over many settings ---------------------------------------------------
SETTINGS = [
    (COPY_HEAVY, PROMPT, PASSAGES, {"max_new_tokens": 40}),
    (COPY_HEAVY, PROMPT, PASSAGES, {"max_new_tokens": 40, "stop": ["eather", "zy d"]}),
    (COPY_HEAVY, PROMPT, PASSAGES, {"max_new_tokens": 40, "stop": "ompany"}),
    (COPY_HEAVY, PROMPT, PASSAGES, {"max_new_tokens": 13}),
    (MIXED, PROMPT, PASSAGES, {"max_new_tokens": 40, "stop": ["e ", "o"]}),
    (COPY_HEAVY, CJK_PROMPT, CJK, {"max_new_tokens": 7}),
    (COPY_HEAVY, CJK_PROMPT, CJK, {"max_new_tokens": 30, "stop": "京都"}),
    (MIXED, CJK_PROMPT, CJK, {"max_new_tokens": 25}),
    (NestConfig(mode="base"), CJK_PROMPT, CJK, {"max_new_tokens": 11}),
]


@pytest.mark.parametrize(("config", "prompt", "passages", "kwargs"), SETTINGS)
def test_token_ids_always_decode_to_the_text(tiny_lm, config, prompt, passages, kwargs):
    res = NestDecoder(tiny_lm, config).generate(prompt, passages, **kwargs)
    assert tiny_lm.decode(res.token_ids) == res.text
    stops = kwargs.get("stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        assert stop not in res.text


@pytest.mark.parametrize(("config", "prompt", "passages", "kwargs"), SETTINGS)
def test_a_copied_chunk_always_carries_its_span(tiny_lm, config, prompt, passages, kwargs):
    chunks, res = stream(tiny_lm, config, prompt, passages, **kwargs)
    check_output(tiny_lm, res)
    check_chunks(chunks, res)
    if config.mode != "base" and res.spans:
        assert any(c.span is not None for c in chunks)
