"""The decoder on the real bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch

from nest_core import NestConfig, NestDecoder, Passage, load_model
from nest_core.config import default_config, paper_config

pytestmark = pytest.mark.integration

FACT = Passage(
    "zephyr-history",
    "The Zephyr Widget Company was founded in 1987 by Marta Quillfeather in Ostrava. "
    "It makes brass widgets for clockmakers and employs 340 people.",
    title="Zephyr Widget Company",
    metadata={"source": "handbook/history.md"},
)
OTHER = Passage("brass", "Brass is an alloy of copper and zinc. Clockmakers use brass gears "
                "because brass is easy to machine and resists corrosion.", title="Brass")
QUESTION = "Who founded the Zephyr Widget Company, and in which year?"


def test_base_mode_equals_transformers_greedy(smollm):
    ids = torch.tensor([smollm.prompt_ids(QUESTION)])
    ref = smollm.model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    ref_ids = [t for t in ref.tolist() if t not in smollm.eos_token_ids]
    for cfg, passages in [(NestConfig(mode="base"), [FACT]), (NestConfig(), None)]:
        res = NestDecoder(smollm, cfg).generate(QUESTION, passages, max_new_tokens=24)
        assert res.token_ids == ref_ids


def test_nest_copies_a_made_up_fact_and_cites_it(smollm):
    base = NestDecoder(smollm, NestConfig(mode="base")).generate(QUESTION, [FACT, OTHER],
                                                                 max_new_tokens=40)
    assert "Quillfeather" not in base.text  # the model cannot know it
    res = NestDecoder(smollm).generate(QUESTION, [FACT, OTHER], max_new_tokens=40)
    assert "Quillfeather" in res.text
    assert "1987" in res.text
    cited = [s for s in res.spans if "Quillfeather" in s.text]
    assert cited
    assert cited[0].passage.id == "zephyr-history"
    for span in res.spans:
        assert res.text[span.out_start:span.out_end] == span.text
        assert span.passage.text[span.src_start:span.src_end] == span.text
    # copying whole spans: far fewer LM forwards than tokens
    assert res.stats.lm_forwards < len(res.token_ids)
    assert res.attribution_ratio > 0.5


def test_chat_messages_and_streaming(smollm):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": QUESTION}]
    # the copied spans stream as they are accepted: with the quote on (the default), an
    # answer is held until its support is known (tests/unit/test_citations.py)
    dec = NestDecoder(smollm, default_config(smollm.name, quote_below=0.0))
    chunks = list(dec.stream(messages, [FACT, OTHER], max_new_tokens=32))
    result = chunks[-1].result
    assert result is not None
    assert "".join(c.text for c in chunks) == result.text
    assert any(c.span is not None and c.span.passage.id == "zephyr-history" for c in chunks)


def test_bfloat16_option_loads_and_decodes():
    lm = load_model(dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    res = NestDecoder(lm).generate(QUESTION, [FACT], max_new_tokens=16)
    assert "1987" in res.text


def test_missing_model_path_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(OSError, match="could not load model"):
        load_model(tmp_path / "not-a-model-dir")


def test_stop_string_inside_a_copied_token_keeps_the_span(smollm):
    # " founded" is one token: a stop string starting inside it ("founded") drops it, so the
    # ids still decode to the text and the copied run before it keeps its span
    dec = NestDecoder(smollm)
    inside = dec.generate(QUESTION, [FACT, OTHER], max_new_tokens=40, stop="founded")
    at_start = dec.generate(QUESTION, [FACT, OTHER], max_new_tokens=40, stop=" founded")
    for res in (inside, at_start):
        assert res.finish_reason == "stop"
        assert smollm.decode(res.token_ids) == res.text
        assert res.text.endswith("Company was")
    assert inside.token_ids == at_start.token_ids
    assert inside.spans == at_start.spans
    assert inside.spans
    assert inside.spans[-1].text.endswith("Zephyr Widget Company was")
    assert inside.attribution_ratio > 0.8


def test_max_new_tokens_inside_a_cjk_character_keeps_the_spans(smollm):
    # byte-level BPE splits each of these characters over two tokens
    passage = Passage("tokyo", "東京は日本の首都であり、世界最大の都市圏を持つ。"
                      "江戸時代には徳川幕府が置かれた。")
    for n, dangling in [(40, True), (41, False)]:  # 40 ends inside 府, 41 after it
        res = NestDecoder(smollm, paper_config()).generate(
            "東京について教えてください。", [passage], max_new_tokens=n)
        assert res.stats.accepted_draft_tokens > 30, "setup: the passage is copied"
        assert len(res.token_ids) == n
        assert smollm.decode(res.token_ids) == res.text
        assert res.text.endswith("\ufffd") == dangling
        for span in res.spans:
            assert res.text[span.out_start:span.out_end] == span.text
            assert span.passage.text[span.src_start:span.src_end] == span.text
            assert "\ufffd" not in span.text
        # the copied run at the end is cited up to its last whole character; besides a
        # dangling token, one copied token goes uncited: it starts a character that
        # generated tokens complete
        assert res.spans[-1].token_end == n - dangling
        assert res.stats.copied_tokens == res.stats.accepted_draft_tokens - 1 - dangling
