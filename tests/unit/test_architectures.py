"""The decoder's invariants on every architecture users bring (issue 27), fp32 and bf16.

tests/unit/test_decoder.py and its neighbours pin them on a tiny Llama; here each one runs
on tiny random models of Llama, Qwen2/3, Mistral, Gemma 1/2/3 and Phi-3
(``tests/unit/tiny_archs.py``), whose layouts differ where a decoder can go wrong: tied
heads, biases, sliding windows (16 tokens, so the rolling cache is reached), scaled
embeddings, soft-capped logits, fused projections. Results are compared within a dtype
only: bf16 rounds differently from fp32, so their answers may legitimately differ.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import PASSAGES, PROMPT, assert_cache_stays_aligned, assert_copies_are_their_source
from tiny_archs import ARCHITECTURES, SLIDING, tiny_lm

from nest_core import NestConfig, NestDecoder
from nest_core.lm import KeyLayer, LanguageModel
from nest_core.small_batches import WeightFirstLinear, use_weight_first

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [pytest.param(arch, dtype, id=f"{arch}-{name}")
         for arch in ARCHITECTURES for name, dtype in DTYPES.items()]
FP32 = [pytest.param(arch, id=arch) for arch in ARCHITECTURES]
# α = 1 and a tiny γ (as in test_decoder.py): a random model then copies a lot, so drafts
# are verified, partly accepted and the KV cache cropped
COPY_HEAVY = NestConfig(confidence_offset=1.0, relaxation=1e-6, span_length=8,
                        initial_span_length=2)
BASE = NestConfig(mode="base")
TURN = [{"role": "user", "content": PROMPT},
        {"role": "assistant", "content": "The Zephyr Widget Company was founded in 1987."},
        {"role": "user", "content": "By whom, and where?"}]


@functools.cache
def shared_lm(arch: str, dtype: torch.dtype) -> LanguageModel:
    """One model per (architecture, dtype) for the tests that only read it (built once)."""
    return tiny_lm(arch, dtype)


def greedy(lm: LanguageModel, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' own greedy answer, up to (without) EOS."""
    ids = torch.tensor([lm.prompt_ids(prompt)])
    out = lm.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    eos = lm.tokenizer.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_base_mode_equals_greedy_search(arch, dtype):
    # caught: a cache or mask the model's own generate() builds differently (sliding
    # windows), logits read from the wrong position, the prompt fed twice
    lm = shared_lm(arch, dtype)
    for prompt in (PROMPT, "The quick brown fox jumps"):
        res = NestDecoder(lm, BASE).generate(prompt, PASSAGES, max_new_tokens=24)
        assert res.token_ids == greedy(lm, prompt, 24), prompt
        assert res.spans == []


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_copied_spans_are_their_source_text(arch, dtype):
    # caught: a crop that leaves the KV cache out of step with the output (a sliding layer
    # past its window), so a verified draft is judged on the wrong context
    lm = shared_lm(arch, dtype)
    assert_copies_are_their_source(NestDecoder(lm, COPY_HEAVY))


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_the_cache_stays_aligned_after_partial_acceptance(arch, dtype):
    # caught: a cropped sliding layer that still holds (or lost) the window's tokens; every
    # forward's logits must be those of a fresh forward of all the ids fed so far
    # bf16 rounds the same sums differently in a 1-token and a whole-sequence forward;
    # a misaligned cache changes the logits by O(1)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    _, fed = assert_cache_stays_aligned(shared_lm(arch, dtype), tol)
    if arch in SLIDING:
        assert len(fed) > 2 * 16, "the sliding window must be passed"


class FedLM(LanguageModel):
    """The real model with its own prefix cache, counting the ids it is fed."""

    def __init__(self, lm: LanguageModel, prefix_cache_bytes: int) -> None:
        super().__init__(lm.model, lm.tokenizer, name=lm.name,
                         prefix_cache_bytes=prefix_cache_bytes)
        self.fed = 0

    def forward(self, input_ids, cache, key_layer, last_only=False):
        self.fed += len(input_ids)
        return super().forward(input_ids, cache, key_layer, last_only=last_only)


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_the_prefix_cache_gives_the_same_ids(arch, dtype):
    # caught: reused KV states that are not those of the prompt's head (a scaled or
    # sliding cache layer copied wrong); the second prompt of each pair starts from a hit
    lm = shared_lm(arch, dtype)
    cold, warm = FedLM(lm, 0), FedLM(lm, 2**30)
    prompts = [TURN[:1], TURN, PROMPT, PROMPT]
    for config in (BASE, COPY_HEAVY):
        answers = {}
        for name, model in (("cold", cold), ("warm", warm)):
            dec = NestDecoder(model, config)
            answers[name] = [dec.generate(p, PASSAGES, max_new_tokens=16).token_ids
                             for p in prompts]
        assert answers["warm"] == answers["cold"]
    if arch in SLIDING:  # documented: a sliding cache is neither stored nor seeded
        assert len(warm.prefix_cache) == 0
        assert warm.fed == cold.fed
    else:
        assert len(warm.prefix_cache) >= 1
        assert warm.fed < cold.fed, "nothing was reused"


@pytest.mark.parametrize("arch", FP32)
def test_weight_first_layers_give_the_same_ids(arch):
    # caught: a fused or biased projection (Phi-3's qkv_proj, Qwen2's q/k/v bias) computed
    # differently by the few-row kernel that verifies drafts
    lm = shared_lm(arch, torch.float32)
    fast_model = copy.deepcopy(lm.model)
    assert use_weight_first(fast_model) > 0
    assert any(isinstance(m, WeightFirstLinear) for m in fast_model.model.layers.modules())
    fast = LanguageModel(fast_model, lm.tokenizer, name=lm.name)
    cfg = COPY_HEAVY.with_overrides(initial_span_length=8)
    want = NestDecoder(lm, cfg).generate(PROMPT, PASSAGES, max_new_tokens=32)
    got = NestDecoder(fast, cfg).generate(PROMPT, PASSAGES, max_new_tokens=32)
    assert want.stats.drafted_tokens > 0
    assert got.token_ids == want.token_ids
    assert got.stats.lm_forwards == want.stats.lm_forwards


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_the_key_layer_hook_captures_output_hidden_states(arch, dtype):
    # caught: the hook on a layer list the architecture does not have (a silent fallback),
    # or on the wrong layer; Gemma's scaled embeddings counted as a layer
    lm = shared_lm(arch, dtype)
    ids = list(range(5, 45))  # 40 tokens: past the 16-token sliding window
    ref = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(ref) == 4  # embeddings + 3 layers
    for key_layer in (-2, -3, 1, 2, -1):
        hooked = KeyLayer(lm.model, key_layer)
        assert (hooked.layer is not None) == (key_layer in (-2, -3, 1, 2))
        out = lm.forward(ids, lm.new_cache(), key_layer)
        enc = lm.encode_hidden(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                               key_layer)
        assert torch.equal(out.hidden, ref[key_layer][0].float()), key_layer
        assert torch.equal(enc, ref[key_layer]), key_layer


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_load_model_reads_a_saved_folder_and_decodes_the_same(arch, dtype, tmp_path):
    # caught: a config or tokenizer that does not round-trip through save_pretrained (the
    # chat template, tied weights, Gemma's layer types), a dtype not kept
    from nest_core.models import load_model

    lm = shared_lm(arch, dtype)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=dtype, shared=False, weight_first=False)
    assert type(loaded.model) is type(lm.model)
    assert loaded.dtype == dtype
    assert loaded.tokenizer.chat_template == lm.tokenizer.chat_template
    assert loaded.prompt_ids(PROMPT) == lm.prompt_ids(PROMPT)
    for name, p in lm.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name
    # compared with the same weights read through the *loaded* tokenizer: transformers
    # picks the tokenizer class by model type, and Qwen2Tokenizer re-creates Qwen's
    # pre-tokenizer (digits one by one) around the tiny BPE saved as "qwen2", which splits
    # "1987" in a passage differently (a real Qwen checkpoint has Qwen's tokenizer)
    same = LanguageModel(lm.model, loaded.tokenizer, name=lm.name)
    want = NestDecoder(same, COPY_HEAVY).generate(PROMPT, PASSAGES, max_new_tokens=24)
    got = NestDecoder(loaded, COPY_HEAVY).generate(PROMPT, PASSAGES, max_new_tokens=24)
    assert got.token_ids == want.token_ids
    assert got.spans == want.spans


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_a_sliding_window_cache_rolls_back_past_its_window(arch):
    # caught (a core fix): LanguageModel.new_cache gave sliding layers that keep only their
    # 16-token window, and cropping a rejected draft once the window was full raised
    # RuntimeError (transformers' DynamicSlidingWindowLayer.crop); they now record the past
    lm = shared_lm(arch, torch.float32)
    ids = list(range(5, 35))  # 30 tokens: the window is full
    cache = lm.new_cache()
    lm.forward(ids, cache, -2)
    lm.forward([40, 41, 42, 43, 44], cache, -2)  # a draft ...
    cache.crop(-3)  # ... of which 2 tokens are kept
    got = lm.forward([50, 51], cache, -2).logits
    want = lm.forward([*ids, 40, 41, 50, 51], lm.new_cache(), -2).logits[-2:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == len(ids) + 4
