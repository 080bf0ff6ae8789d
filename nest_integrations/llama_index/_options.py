"""Options of ``index.as_query_engine(...)`` / ``RetrieverQueryEngine.from_args(...)`` that
``NestQueryEngine`` cannot honour, refused with what to use instead.

Users move from a stock engine by changing one call, and bring its keyword arguments along.
A silently ignored ``response_mode="tree_summarize"`` or ``llm=...`` would answer in a way
they did not ask for, so each is refused by name, with the Nest way to get the same effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_TEMPLATE_FIX = ("Nest's prompt is the question itself (the nodes are its copy datastore, "
                 "not prompt text): set system_prompt=... for instructions, or keep your "
                 "template in a stock engine with Settings.llm = NestLLM() "
                 "(index.as_query_engine(text_qa_template=...))")

REFUSED: dict[str, str] = {
    "llm": ("NestQueryEngine decodes with its own Nest model, not an LLM object: pass "
            "model_name='HF id, local dir or .gguf' (or lm=a nest_core.LanguageModel); to "
            "put Nest inside a stock engine instead, use Settings.llm = NestLLM()"),
    "response_synthesizer": ("NestQueryEngine is its own synthesizer (one Nest decoding "
                             "over all nodes); use a stock engine with Settings.llm = "
                             "NestLLM() to keep a custom synthesizer"),
    "text_qa_template": _TEMPLATE_FIX,
    "refine_template": _TEMPLATE_FIX,
    "summary_template": _TEMPLATE_FIX,
    "simple_template": _TEMPLATE_FIX,
    "chat_content_qa_template": _TEMPLATE_FIX,
    "chat_content_refine_template": _TEMPLATE_FIX,
    "output_cls": ("Nest decodes free text with span citations, not structured output; "
                   "parse response.response yourself"),
    "multimodal": "Nest copies from text nodes only; image nodes are skipped",
    "use_async": "aquery() is truly async already (aretrieve + decoding in a thread); drop "
                 "use_async",
    "verbose": "enable logging for 'nest_integrations.llama_index' instead of verbose",
}

# response_mode values that describe what Nest does: one pass over all nodes at once
ACCEPTED_RESPONSE_MODES = frozenset({"compact"})


def refuse_unsupported(data: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """``data`` without an accepted ``response_mode``; ``ValueError`` for anything refused."""
    out = dict(data)
    for name, fix in REFUSED.items():
        if name in out and out[name] is not None and out[name] is not False:
            msg = f"{owner} does not support {name}={out[name]!r}: {fix}"
            raise ValueError(msg)
        out.pop(name, None)
    if "response_mode" in out:
        mode = out.pop("response_mode")
        value = getattr(mode, "value", mode)
        if value not in ACCEPTED_RESPONSE_MODES:
            msg = (f"{owner} does not support response_mode={value!r}: Nest decodes once "
                   f"over all retrieved nodes (its token datastore holds every node), which "
                   f"is what 'compact' means; for '{value}', use a stock engine with "
                   f"Settings.llm = NestLLM() (index.as_query_engine(response_mode="
                   f"'{value}'))")
            raise ValueError(msg)
    return out
