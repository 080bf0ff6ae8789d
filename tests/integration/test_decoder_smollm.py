"""The decoder on the real bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch

from nest_core import NestConfig, NestDecoder, Passage, load_model

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
    dec = NestDecoder(smollm)
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
