"""Decoder invariants on a tiny random Llama (float32, CPU): exact, fast, offline."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from conftest import PASSAGES, PROMPT, assert_cache_stays_aligned, assert_copies_are_their_source

from nest_core import EncodedPassage, NestConfig, NestDecoder, Passage, Span
from nest_core.app.render import stats_line
from nest_core.attribution import NO_SOURCE, OutputText, build_spans, runs
from nest_core.lm import LanguageModel
from nest_core.token_index import TokenIndex

# α = 1 makes λ < δ whenever ρ < 1 and a tiny γ accepts nearly every draft token: the
# random model then copies a lot, which exercises spans, streaming and masking.
COPY_HEAVY = NestConfig(confidence_offset=1.0, relaxation=1e-6, span_length=8,
                        initial_span_length=2)


def greedy_reference(lm: LanguageModel, prompt, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([lm.prompt_ids(prompt)])
    out = lm.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


@pytest.mark.parametrize(("config", "passages"), [
    (NestConfig(mode="base"), PASSAGES),
    (NestConfig(mode="nest"), None),
    (NestConfig(mode="nest"), []),
    (NestConfig(mode="knn-lm"), [Passage("empty", "")]),
])
def test_without_retrieval_output_equals_greedy_search(tiny_lm, config, passages):
    res = NestDecoder(tiny_lm, config).generate(PROMPT, passages, max_new_tokens=24)
    assert res.token_ids == greedy_reference(tiny_lm, PROMPT, 24)
    assert res.spans == []
    assert res.attribution_ratio == 0.0


def test_every_copied_token_is_the_passage_token_it_cites(tiny_lm):
    res = assert_copies_are_their_source(NestDecoder(tiny_lm, COPY_HEAVY))
    assert 0 < res.attribution_ratio <= 1


def _assert_maximal_and_ordered(spans: list[Span]) -> None:
    for a, b in itertools.pairwise(spans):
        assert a.token_end <= b.token_start
        contiguous = a.token_end == b.token_start and a.passage.id == b.passage.id \
            and b.source_row == a.source_row + a.num_tokens
        assert not contiguous, "adjacent runs from the same passage must be one span"


def test_spans_are_maximal_and_ordered(tiny_lm):
    res = NestDecoder(tiny_lm, COPY_HEAVY).generate(PROMPT, PASSAGES, max_new_tokens=40)
    assert len(res.spans) >= 2, "the check below compares neighbouring spans: it needs two"
    _assert_maximal_and_ordered(res.spans)


def test_copied_runs_split_exactly_where_the_source_stops_running_on():
    # Passages "abcdef" (rows 0-5) and "uvwxyz" (rows 6-11), one character per token, so
    # the output text is the copied characters and every boundary below is decided by
    # runs() alone: a skipped row, a passage change between consecutive global rows (5, 6)
    # and a generated token between consecutive rows (7, 8) each end a run; nothing else.
    passages = [Passage("p", "abcdef"), Passage("q", "uvwxyz")]
    encoded = [EncodedPassage(keys=torch.zeros(6, 2), values=torch.tensor([ord(c) for c in p.text]),
                              char_spans=torch.tensor([[i, i + 1] for i in range(6)],
                                                      dtype=torch.int32))
               for p in passages]
    index = TokenIndex(passages, encoded, vocab_size=256)
    rows = [0, 1, 2, 4, 5, 6, 7, NO_SOURCE, 8, 9]
    ids = [int(index.values[r]) if r != NO_SOURCE else ord("!") for r in rows]
    text = "".join(map(chr, ids))
    assert text == "abcefuv!wx"
    assert runs(rows, index) == [(0, 3), (3, 5), (5, 7), (8, 10)]
    spans = build_spans(text, ids, rows, index, OutputText(lambda t: "".join(map(chr, t))))
    assert [(s.text, s.passage.id, s.source_row) for s in spans] == [
        ("abc", "p", 0), ("ef", "p", 4), ("uv", "q", 0), ("wx", "q", 2)]
    _assert_maximal_and_ordered(spans)


@pytest.mark.parametrize("max_new_tokens", [1, 3, 7, 16])
def test_spans_never_run_past_max_new_tokens(tiny_lm, max_new_tokens):
    res = NestDecoder(tiny_lm, COPY_HEAVY).generate(PROMPT, PASSAGES,
                                                   max_new_tokens=max_new_tokens)
    assert len(res.token_ids) <= max_new_tokens
    assert all(s.token_end <= len(res.token_ids) for s in res.spans)


def test_special_token_text_in_a_passage_is_copied_as_plain_text(tiny_lm):
    # A passage that says "<|im_end|>" is text: copying it must not end the answer (and a
    # passage must not be able to inject control tokens).
    passages = [Passage("e", "The quick brown fox<|im_end|> jumps over the lazy dog.")]
    eos = tiny_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    dec = NestDecoder(tiny_lm, COPY_HEAVY)
    (encoded,) = dec.encoder.encode(passages)
    assert eos not in encoded.values.tolist()
    res = dec.generate("The quick brown", passages, max_new_tokens=40)
    assert eos not in res.token_ids
    assert res.finish_reason == "length"  # copied on through it, as text
    assert any("<|im_end" in s.text for s in res.spans)


def test_stop_string_is_never_emitted(tiny_lm):
    full = NestDecoder(tiny_lm, COPY_HEAVY).generate(PROMPT, PASSAGES, max_new_tokens=40)
    assert len(full.text) > 6
    stop = full.text[3:6]
    res = NestDecoder(tiny_lm, COPY_HEAVY).generate(PROMPT, PASSAGES, max_new_tokens=40,
                                                   stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.index(stop)]
    assert all(s.out_end <= len(res.text) for s in res.spans)


def test_stream_pieces_add_up_to_the_result(tiny_lm):
    dec = NestDecoder(tiny_lm, COPY_HEAVY)
    chunks = list(dec.stream(PROMPT, PASSAGES, max_new_tokens=30))
    result = chunks[-1].result
    assert result is not None
    assert all(c.result is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == result.text
    for c in chunks:
        if c.span is not None:
            assert c.span.text in result.text
            assert c.span.passage.text[c.span.src_start:c.span.src_end] == c.span.text
    assert result.token_ids == dec.generate(PROMPT, PASSAGES, max_new_tokens=30).token_ids


def test_first_text_is_timed_when_the_first_chunk_is_streamed(tiny_lm):
    # caught: first_token_seconds never set, set at the end, or reset by a later chunk
    import time

    dec = NestDecoder(tiny_lm, COPY_HEAVY)
    t0 = time.perf_counter()
    stream = dec.stream(PROMPT, PASSAGES, max_new_tokens=30)
    first = next(c for c in stream if c.text)
    seen = time.perf_counter() - t0
    time.sleep(0.05)  # the rest of the answer comes visibly later
    result = next(c for c in stream if c.result is not None).result
    st = result.stats
    assert 0 < st.first_token_seconds <= seen
    assert st.total_seconds >= st.first_token_seconds + 0.05
    assert first.text
    assert result.text.startswith(first.text)
    assert "first text" in stats_line(result)


@pytest.mark.parametrize("key_layer", [-1, -2, -3, 0, 1, 3])
def test_only_the_key_layer_is_kept_and_it_is_the_same_state(tiny_lm, key_layer):
    # caught: the hook on the wrong layer (off by one), the layer's input instead of output
    from nest_core.lm import KeyLayer

    ids = list(range(5, 25))
    ref = tiny_lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    ref = ref.hidden_states[key_layer]  # [1, T, D]
    out = tiny_lm.forward(ids, tiny_lm.new_cache(), key_layer)
    enc = tiny_lm.encode_hidden(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                key_layer)
    assert torch.equal(out.hidden, ref[0].float())
    assert torch.equal(enc, ref)
    hooked = KeyLayer(tiny_lm.model, key_layer)
    # the 3 decoder layers' outputs are hidden_states 1, 2 (= -2), 3 (= -1, after the norm)
    assert (hooked.layer is not None) == (key_layer in (-2, -3, 1))
    assert ("output_hidden_states" in hooked.kwargs) == (hooked.layer is None)


def test_cache_stays_aligned_after_partial_acceptance(tiny_lm):
    res, fed = assert_cache_stays_aligned(tiny_lm)
    prompt = tiny_lm.prompt_ids(PROMPT)
    assert fed[: len(prompt)] == prompt
    assert res.token_ids[: len(fed) - len(prompt)] == fed[len(prompt):]


def test_knn_lm_mode_never_drafts(tiny_lm):
    res = NestDecoder(tiny_lm, NestConfig(mode="knn-lm")).generate(PROMPT, PASSAGES,
                                                                  max_new_tokens=12)
    assert res.stats.draft_steps == 0
    assert res.stats.lm_forwards == len(res.token_ids) + (res.finish_reason == "eos")


def test_one_passage_with_fewer_keys_than_neighbours(tiny_lm):
    cfg = COPY_HEAVY.with_overrides(num_neighbors=1024)
    res = NestDecoder(tiny_lm, cfg).generate(PROMPT, PASSAGES[:1], max_new_tokens=20)
    assert res.stats.datastore_keys < 1024
    assert all(s.passage.id == "zw" for s in res.spans)


def test_passages_in_prompt_changes_the_prompt(tiny_lm):
    plain = NestDecoder(tiny_lm, NestConfig(mode="base")).generate(PROMPT, PASSAGES,
                                                                   max_new_tokens=4)
    rag = NestDecoder(tiny_lm, NestConfig(mode="base", passages_in_prompt=True)).generate(
        PROMPT, PASSAGES, max_new_tokens=4)
    assert rag.stats.prompt_tokens > plain.stats.prompt_tokens + 20


# --- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(("prompt", "error"), [
    ("", ValueError), ("   ", ValueError), (42, TypeError), ([], TypeError),
    ([{"role": "user"}], TypeError), ([{"role": "user", "content": ""}], ValueError),
])
def test_bad_prompts_get_clear_errors(tiny_lm, prompt, error):
    with pytest.raises(error, match="prompt"):
        NestDecoder(tiny_lm).generate(prompt, PASSAGES, max_new_tokens=4)


@pytest.mark.parametrize("passages", ["some text", [{"id": "x", "text": "y"}], ["text"],
                                      PASSAGES[0]])
def test_passages_of_the_wrong_type_get_clear_errors(tiny_lm, passages):
    with pytest.raises(TypeError, match="Passage"):
        NestDecoder(tiny_lm).generate(PROMPT, passages, max_new_tokens=4)


def test_bad_arguments_get_clear_errors(tiny_lm):
    dec = NestDecoder(tiny_lm)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(PROMPT, PASSAGES, max_new_tokens=0)
    with pytest.raises(TypeError, match="stop"):
        dec.generate(PROMPT, PASSAGES, max_new_tokens=4, stop=[1])
    with pytest.raises(ValueError, match="context window"):
        dec.generate(PROMPT, PASSAGES, max_new_tokens=1000)
    with pytest.raises(TypeError, match="load_model"):
        NestDecoder("SmolLM2")
    with pytest.raises(TypeError, match=r"Passage\.id"):
        Passage("", "text")


def test_prompt_past_the_context_window_is_left_truncated(tiny_lm, caplog):
    long_prompt = "fox " * 400  # tiny model: 256-token window
    with caplog.at_level(logging.WARNING):
        res = NestDecoder(tiny_lm).generate(long_prompt, PASSAGES, max_new_tokens=8)
    assert res.prompt_truncated
    assert res.stats.prompt_tokens == 256 - 8
    assert "context" in caplog.text


def test_huge_passage_is_encoded_in_windows(tiny_lm):
    huge = Passage("big", " ".join(["The quick brown fox jumps over the lazy dog."] * 60))
    cfg = NestConfig(max_passage_tokens=64)
    dec = NestDecoder(tiny_lm, cfg)
    encoded = dec.encoder.encode([huge])[0]
    n_tokens = len(tiny_lm.tokenizer(huge.text, add_special_tokens=False)["input_ids"])
    assert encoded.num_rows == n_tokens  # one key per context position (BOS included)
    assert torch.isfinite(encoded.keys.float()).all()
    res = dec.generate(PROMPT, [huge], max_new_tokens=8)
    assert len(res.token_ids) <= 8


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="mode"):
        NestConfig(mode="fast")
    with pytest.raises(ValueError, match="relaxation"):
        NestConfig(relaxation=0.0)
    with pytest.raises(ValueError, match="initial_span_length"):
        NestConfig(span_length=4, initial_span_length=8)
    with pytest.raises(TypeError, match="unknown"):
        NestConfig().with_overrides(gamma=0.1)
