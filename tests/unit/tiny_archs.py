"""Tiny randomly initialised causal LMs of the architectures users bring (not a test file).

Nest's own unit tests run on a tiny Llama (``tests/conftest.py``). Qwen, Mistral, Gemma and
Phi checkpoints differ from it in ways the decoder can trip over: tied embeddings and
attention biases (Qwen2), per-head query/key norms (Qwen3), a sliding attention window
(Mistral, Phi-3; Gemma 2 and 3 mix sliding and full layers), scaled embeddings and logit
soft-capping (Gemma), fused ``qkv_proj``/``gate_up_proj`` layers (Phi-3). Each builder here
makes a 3-layer model (hidden 32, head dim 8) of one such configuration, seeded, so every
test that uses it sees the same weights, with the tiny BPE tokenizer of ``conftest`` (the
vocabulary size is the tokenizer's).

The sliding windows are 16 tokens, shorter than a tiny prompt plus its answer, so the
rolling KV cache is exercised (a 4k window would never be reached by a unit test).

API (kept small: batched-decoding tests reuse it)::

    from tiny_archs import ARCHITECTURES, tiny_lm
    lm = tiny_lm("gemma2", torch.bfloat16)   # a fresh nest_core.lm.LanguageModel

``ARCHITECTURES`` lists the names (``SLIDING``: those with a sliding window); ``tiny_lm``
builds a new model on every call (a test that patches a model's layers gets its own);
``tiny_model`` is the bare transformers model, ``tokenizer()`` the shared tokenizer.
Import it from a test in ``tests/unit`` as ``from tiny_archs import ...`` (pytest puts the
test's folder on ``sys.path``, as it does for ``conftest``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from conftest import make_tiny_tokenizer

from nest_core.lm import LanguageModel

# What every tiny model shares: the tokenizer's special ids (<|im_start|> = BOS = 1,
# <|im_end|> = EOS = pad = 2) and a 256-token window, like conftest's tiny Llama.
_COMMON: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
SLIDING_WINDOW = 16  # tokens: shorter than any tiny prompt plus its answer
# (config class, model class, the architecture's own config values)
Spec = tuple[type[Any], type[Any], dict[str, Any]]


def _llama() -> Spec:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}


def _qwen2() -> Spec:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Qwen2.5-0.5B/1.5B tie the LM head to the embeddings; q/k/v carry biases
    return Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}


def _qwen3() -> Spec:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # per-head RMS norms on queries and keys
    return Qwen3Config, Qwen3ForCausalLM, {"tie_word_embeddings": True}


def _mistral() -> Spec:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralConfig, MistralForCausalLM, {"sliding_window": SLIDING_WINDOW}


def _gemma() -> Spec:
    from transformers import GemmaConfig, GemmaForCausalLM

    # embeddings scaled by sqrt(hidden_size), tied LM head, (1 + w) RMS norms
    return GemmaConfig, GemmaForCausalLM, {}


def _gemma2() -> Spec:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # sliding / full layers alternate; attention and final logits are soft-capped
    return Gemma2Config, Gemma2ForCausalLM, {"sliding_window": SLIDING_WINDOW,
                                             "query_pre_attn_scalar": 8}


def _gemma3() -> Spec:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Gemma 3 text (1B): sliding layers with a full one after them, q/k norms
    layers = ["sliding_attention", "sliding_attention", "full_attention"]
    return Gemma3TextConfig, Gemma3ForCausalLM, {
        "sliding_window": SLIDING_WINDOW, "query_pre_attn_scalar": 8, "layer_types": layers}


def _phi3() -> Spec:
    from transformers import Phi3Config, Phi3ForCausalLM

    # fused qkv_proj and gate_up_proj linear layers; Phi-3-mini-4k also slides (2047)
    return Phi3Config, Phi3ForCausalLM, {"sliding_window": SLIDING_WINDOW}


_BUILDERS: dict[str, Callable[[], Spec]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral,
    "gemma": _gemma, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3,
}
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)
# which of them have a sliding attention window (their KV cache is not a plain DynamicLayer
# list: the prefix cache neither stores nor seeds it)
SLIDING: frozenset[str] = frozenset({"mistral", "gemma2", "gemma3", "phi3"})


@functools.cache
def tokenizer() -> Any:
    """The tiny BPE tokenizer of ``conftest`` (built once: training it takes ~50 ms)."""
    return make_tiny_tokenizer()


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A fresh, randomly initialised ``*ForCausalLM`` of ``arch`` in ``dtype``, in eval mode.

    The weights depend on ``seed`` alone (initialised in float32, then cast), so the fp32
    and bf16 models of an architecture are the same model rounded differently."""
    if arch not in _BUILDERS:
        msg = f"unknown architecture {arch!r}; one of {ARCHITECTURES}"
        raise ValueError(msg)
    config_class, model_class, own = _BUILDERS[arch]()
    config = config_class(**_COMMON, **own, vocab_size=len(tokenizer()))
    torch.manual_seed(seed)
    model = model_class(config).eval()
    return model.to(dtype)


def tiny_lm(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0,
            **lm_kwargs: Any) -> LanguageModel:
    """A fresh :class:`LanguageModel` of :func:`tiny_model` with the tiny tokenizer, named
    ``tiny-<arch>``; ``lm_kwargs`` go to ``LanguageModel`` (e.g. ``prefix_cache_bytes``)."""
    return LanguageModel(tiny_model(arch, dtype, seed), tokenizer(), name=f"tiny-{arch}",
                         **lm_kwargs)
