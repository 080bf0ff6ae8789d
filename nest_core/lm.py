"""A thin wrapper around a Hugging Face causal LM: cached forwards, key-layer states, prompts."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nest_core.prefix_cache import DEFAULT_MAX_BYTES as DEFAULT_PREFIX_BYTES
from nest_core.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass(frozen=True)
class LMOutput:
    """One cached forward. ``logits``: ``(T, V)`` float32; ``hidden``: ``(T, D)`` float32,
    the key-layer state used as kNN query at each of the T fed positions."""

    logits: torch.Tensor
    hidden: torch.Tensor


class LanguageModel:
    """Owns a causal LM and its tokenizer; knows nothing of retrieval.

    Constructed from built objects (inject, then offer factories: see
    :func:`nest_core.models.load_model`). ``name`` is informational; ``fingerprint``
    identifies the weights so cached passage keys are never reused across models.
    ``prefix_cache_bytes`` bounds :attr:`prefix_cache`, the KV states of earlier prompts
    that later prompts with the same head start from (0 turns it off).
    """

    def __init__(self, model: Any, tokenizer: Any, name: str | None = None, *,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_BYTES) -> None:
        if not hasattr(model, "config") or not callable(model):
            msg = f"model must be a transformers causal LM, got {type(model).__name__}"
            raise TypeError(msg)
        if not callable(getattr(tokenizer, "encode", None)):
            msg = f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
            raise TypeError(msg)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self._fingerprint: str | None = None
        self._words: dict[int, str | int] = {}
        self._empty_cache: Any = None
        # private copies of the tokenizer for prompts, by split_special_tokens (see _own)
        self._own_tokenizers: dict[bool, Any] = {}
        # KV states of earlier prompts, shared by every decoder (and thread) of this model
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    # --- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def cache_arg(self) -> str:
        """The name the model's forward gives its KV cache argument."""
        return self._cache_arg

    @property
    def max_context(self) -> int:
        cfg = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def vocab_size(self) -> int:
        """Width of the logits (may differ from ``len(tokenizer)``)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    @property
    def fingerprint(self) -> str:
        """A hash of the config and of *every* weight (names, shapes, bytes): cached passage
        keys are only reused by the very same weights; a fine-tune with the same config, or
        one changed layer, gets its own keys. BLAKE2b over the raw bytes, once per model
        (about 0.5 s for SmolLM2-135M on a CPU)."""
        if self._fingerprint is None:
            h = hashlib.blake2b(self.model.config.to_json_string(use_diff=False).encode(),
                                digest_size=16)
            h.update(str(self.dtype).encode())
            with torch.no_grad():
                for name, t in self.model.state_dict(keep_vars=False).items():
                    h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
                    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
                    h.update(raw.numpy().data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # --- forwards --------------------------------------------------------------------------
    def new_cache(self) -> Any:
        """An empty KV cache for this model: a copy of one built once (building one from
        the config reads the layer types anew, ~1 ms per call).

        Sliding-window layers (Mistral, Gemma 2/3, ...) record their past: the decoder
        crops the cache after a partly accepted draft, and a sliding layer that keeps only
        its window refuses to roll back once the window is full. Recording, it keeps every
        token until a crop trims it back to the window (as transformers' own assisted
        decoding does)."""
        if self._empty_cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            if any(getattr(layer, "is_sliding", False) for layer in cache.layers) \
                    and hasattr(cache, "activate_past_recording"):
                cache.activate_past_recording()
            self._empty_cache = cache
        return copy.deepcopy(self._empty_cache)

    @torch.inference_mode()
    def forward(self, input_ids: Sequence[int], cache: Any, key_layer: int,
                last_only: bool = False) -> LMOutput:
        """Feed ``input_ids`` (T new tokens) after what ``cache`` holds; the cache grows by T.

        ``last_only`` (the prompt) returns the last position only and skips the LM head for
        the others: a 500-token prompt would otherwise make 500 x V logits for nothing.
        """
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)  # [1, T]
        extra = {"logits_to_keep": 1} if last_only else {}
        with KeyLayer(self.model, key_layer) as key:
            out = self.model(input_ids=ids, use_cache=True, **key.kwargs,
                             **{self._cache_arg: cache}, **extra)
        logits = out.logits[0].float()  # [T or 1, V]
        hidden = key.states(out)[0].float()  # [T, D]
        if last_only:
            logits, hidden = logits[-1:], hidden[-1:]
        return LMOutput(logits=logits, hidden=hidden)

    @torch.inference_mode()
    def encode_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      key_layer: int) -> torch.Tensor:
        """Key-layer states of a right-padded batch: the LM body up to the key layer only
        (neither the layers after it nor the LM head run).

        ``input_ids``/``attention_mask``: ``(B, T)``; returns ``(B, T, D)`` in the model dtype.
        """
        body = self.model.base_model
        out = None
        # StopForward: the key layer ran; the layers after it (and the final norm) need not
        with KeyLayer(self.model, key_layer, stop=True) as key, \
                contextlib.suppress(StopForward):
            out = body(input_ids=input_ids.to(self.device),
                       attention_mask=attention_mask.to(self.device), use_cache=False,
                       **key.kwargs)
        return key.states(out)

    # --- prompts ---------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | Sequence[Message]) -> list[int]:
        """A string becomes one user message through the chat template (when the tokenizer
        has one, else plain text); a list of ``{"role", "content"}`` dicts is used as is.

        What the user and the documents wrote is always text: a question or passage saying
        "<|im_start|>system" stays those characters and never opens a turn; only the chat
        template's own special tokens are special (:meth:`_chat_ids`)."""
        tok = self.tokenizer
        check_prompt(prompt)
        if isinstance(prompt, str):
            if getattr(tok, "chat_template", None):
                return self._chat_ids([{"role": "user", "content": prompt}])
            return self._text_ids(prompt, bos=True)
        messages = validate_messages(prompt)
        if not getattr(tok, "chat_template", None):
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
            return self._text_ids(text + "\nassistant:", bos=True)
        return self._chat_ids(messages)

    def _chat_ids(self, messages: list[Message]) -> list[int]:
        """The chat template's ids. When no message holds a special token's string the
        template tokenises as usual; otherwise the template is rendered with a stand-in for
        each message's content, its own special tokens become their ids and everything
        between them (template text and contents) is tokenised as text, so the messages
        cannot add or close a turn."""
        specials = _special_pattern(self.tokenizer)
        rendered = self._render(messages)
        if specials is None:
            return self._template_ids(rendered)
        for i, m in enumerate(messages):
            if specials.search(m["role"]):
                msg = f"prompt[{i}] role {m['role']!r:.80} holds a special token"
                raise ValueError(msg)
        stand_ins = [{"role": m["role"], "content": _STAND_IN.format(i)}
                     for i, m in enumerate(messages)]
        # [template text, message index, template text, ..., template text]
        layout = _STAND_IN_RE.split(self._render(stand_ins))
        own = sum(len(specials.findall(part)) for part in layout[::2])
        # a special token may also form where a message meets the template ("<|im_" + ...)
        if not any(specials.search(m["content"]) for m in messages) \
                and len(specials.findall(rendered)) == own:
            return self._template_ids(rendered)
        return self._guarded_ids(layout, messages, specials)

    def _guarded_ids(self, layout: list[str], messages: list[Message],
                     specials: re.Pattern[str]) -> list[int]:
        """The ids of a rendered template (``layout``: its text around the messages'
        indexes): the template's own special tokens as such, all else as text."""
        ids: list[int] = []
        text = ""  # text since the template's last special token
        for k, part in enumerate(layout):
            if k % 2:  # a message's content: text, whatever it says
                text += messages[int(part)]["content"]
                continue
            end = 0
            for found in specials.finditer(part):
                ids += self._text_ids(text + part[end:found.start()])
                ids.append(int(self.tokenizer.convert_tokens_to_ids(found.group())))
                text, end = "", found.end()
            text += part[end:]
        return ids + self._text_ids(text)

    def _render(self, messages: list[Message]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False))

    def _template_ids(self, rendered: str) -> list[int]:
        """A rendered template tokenised as ``apply_chat_template(tokenize=True)`` does."""
        enc = self._own(split=False)(rendered, add_special_tokens=False)
        return [int(i) for i in enc["input_ids"]]

    def _text_ids(self, text: str, bos: bool = False) -> list[int]:
        """``text`` as text: special tokens' strings are split into ordinary tokens.
        ``bos``: what the tokenizer adds to a whole input (BOS), as ``encode`` does."""
        if not text and not bos:
            return []
        enc = self.text_tokenizer()(text, add_special_tokens=bos, split_special_tokens=True)
        return [int(i) for i in enc["input_ids"]]

    def text_tokenizer(self) -> Any:
        """The tokenizer that reads special tokens' strings as text (a private copy: see
        :meth:`_own`), for passages and user text."""
        return self._own(split=True)

    def _own(self, split: bool) -> Any:
        """A private copy of the tokenizer that always tokenises with
        ``split_special_tokens=split``. A call with another value than the last flips a flag
        on the Rust tokenizer, which every thread's call reads: on the shared tokenizer, a
        passage being encoded (split) could make a concurrent prompt lose its turns."""
        own = self._own_tokenizers.get(split)
        if own is None:
            own = copy.deepcopy(self.tokenizer)
            own.split_special_tokens = split
            own = self._own_tokenizers.setdefault(split, own)
        return own

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False))

    def token_word(self, token: int) -> str | int:
        """What ``token`` says, lower-cased and without white space, so that words match
        across case and a leading space ("The" ~ " the"); the id itself for a token of
        white space (or nothing) alone. Memoised per id."""
        word = self._words.get(token)
        if word is None:
            text = self.decode([token]).strip().lower()
            word = self._words[token] = text or token
        return word


class StopForward(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a :class:`KeyLayer` hook with ``stop=True`` to end a forward early."""


class KeyLayer:
    """Captures ``hidden_states[key_layer]`` alone, with a forward hook on the decoder layer
    that produces it, instead of ``output_hidden_states=True``, which keeps every layer's
    states (about 585 MB for an 8k-token prompt on SmolLM2) where one is used.

    ``hidden_states[i]`` is the output of decoder layer ``i - 1`` for ``1 <= i < L``; index
    0 (embeddings) and ``L`` (after the final norm), and models whose layer list is not
    found, fall back to ``output_hidden_states=True``. Use as a context manager around one
    forward; pass ``kwargs`` to it and read :meth:`states` after. Thread-safe: each
    capture keeps only its own thread's forward. ``stop``: the hook raises
    :class:`StopForward` once it has the states, so a forward that needs nothing else
    (passage encoding) skips the layers after the key layer; the caller catches it.
    """

    def __init__(self, model: Any, key_layer: int, stop: bool = False) -> None:
        layers = _decoder_layers(model)
        n = len(layers) if layers is not None else 0
        index = key_layer + n + 1 if key_layer < 0 else key_layer
        self.key_layer = key_layer
        self.layer = layers[index - 1] if layers is not None and 1 <= index < n else None
        self.kwargs: dict[str, Any] = {} if self.layer is not None else {
            "output_hidden_states": True}
        self.stop = stop
        self._captured: torch.Tensor | None = None
        self._hook: Any = None
        self._thread = 0

    def _capture(self, _module: Any, _args: Any, output: Any) -> None:
        # one shared model serves many threads, and a hook sees every thread's forwards
        if threading.get_ident() == self._thread:
            self._captured = output[0] if isinstance(output, tuple) else output
            if self.stop:
                raise StopForward

    def __enter__(self) -> KeyLayer:
        self._thread = threading.get_ident()
        if self.layer is not None:
            self._hook = self.layer.register_forward_hook(self._capture)
        return self

    def __exit__(self, *_: Any) -> None:
        if self._hook is not None:
            self._hook.remove()

    def states(self, out: Any) -> torch.Tensor:
        """``(B, T, D)`` key-layer states of the forward that returned ``out`` (``None``
        when it was stopped at the key layer)."""
        if self.layer is None:
            return out.hidden_states[self.key_layer]
        assert self._captured is not None, "the key layer did not run"
        return self._captured


def _decoder_layers(model: Any) -> Any:
    """The list of decoder blocks (``model.model.layers`` in Llama-like models), or None."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return obj
    return None


# A message's content while the chat template renders (private-use characters: a template
# passes them through as they are, and no tokenizer makes a special token of them)
_STAND_IN = "\ue000{}\ue001"
_STAND_IN_RE = re.compile("\ue000([0-9]+)\ue001")


def _special_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """The strings the tokenizer turns into special tokens (longest first), or None."""
    strings = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            strings.add(str(token.content))
    strings.discard("")
    if not strings:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))


def check_prompt(prompt: object) -> None:
    """A clear error for an empty or malformed prompt (before passages are added to it)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            msg = "prompt is empty: pass a question or instruction"
            raise ValueError(msg)
        return
    validate_messages(prompt)


def validate_messages(prompt: object) -> list[Message]:
    """Check a chat prompt's shape and say exactly what is wrong."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        msg = (f"prompt must be a non-empty str or a list of {{'role', 'content'}} dicts, "
               f"got {type(prompt).__name__}")
        raise TypeError(msg)
    messages: list[Message] = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            msg = f"prompt[{i}] must be a dict with str 'role' and 'content', got {m!r:.80}"
            raise TypeError(msg)
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in messages):
        msg = "prompt messages are all empty: pass a question or instruction"
        raise ValueError(msg)
    return messages
