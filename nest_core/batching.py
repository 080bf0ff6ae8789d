"""Continuous batching of the forwards of concurrent generations: one weight read for all.

A CPU forward of a small LM is bound by reading the weights: a 1-token forward costs about
what an 8-token one does (:mod:`nest_core.small_batches`). Concurrent requests that take
turns on the weights each pay that read alone. Here every generation keeps its own loop
(drafts, verification, spans, stops) and its own KV cache, but hands its forward to the
model's :class:`ForwardBatcher`, which runs the forwards that are waiting as ONE model call:
the new tokens of every request side by side in one packed row (no padding), each at its own
positions, each attending to its own cache only (:func:`packed_attention`). Requests join
and leave between steps (continuous batching); a new request's prompt is read in the same
model call as the others' drafts (its logits at its last position only). A generation alone
runs its forward in its own thread; in float32 unpacked: it decodes exactly as without
batching.

It pays where decoding steps dominate an answer; where reading the prompt does (short
answers on a small CPU: compute-bound, nothing to share) it does not (``nest serve
--batching``, measured in ``benchmarks/README.md``).

Packed rows go through the same weights as solo rows, but a matrix product of several rows
may round differently in the last bits from a product of one (another BLAS kernel); where
two tokens' scores nearly tie, a greedy answer can then differ from the request's solo
answer. In float32 that is rare (``benchmarks/bench_serve.py``: 0 of 108 batched answers
differed from their solo ones). bfloat16 rounds every product into 8 bits, so there every
forward of a batching model, a lone one too, runs the packed path, which computes each
request's rows as they come out alone: each request's attention at its own shapes (padding
its keys to the longest request's changes how the kernel blocks the sum), and one-row
products on the multi-row kernel (:class:`~nest_core.small_batches.PairedRowLinear`).
Before that, 53 of 336 batched bfloat16 answers differed from their solo ones.

Models whose attention cannot be switched (``set_attn_implementation``: flash kernels,
remote code) keep decoding, each forward alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from nest_core.lm import KeyLayer, LanguageModel, LMOutput
from nest_core.small_batches import use_paired_rows

logger = logging.getLogger(__name__)

PACKED = "nest_packed_"  # prefix of the attention implementations registered here
MAX_PACKED_TOKENS = 512  # most new tokens of all requests in one packed forward
MAX_WAIT_SECONDS = 0.015  # how long a step waits for the other requests' next forwards


class PackedCache:
    """The KV caches of the requests in one packed forward, seen by the model as one cache.

    The model hands each layer's new keys and values for the packed row
    (``(1, H, sum(T_i), d)``); each request's own cache takes its slice and returns the
    keys and values that request attends to, which :func:`packed_attention` reads by layer.
    """

    def __init__(self, caches: Sequence[Any], lengths: Sequence[int],
                 device: torch.device) -> None:
        self.caches, self.lengths, self.device = list(caches), list(lengths), device
        self.layers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._masks: dict[tuple[int, int, int | None], torch.Tensor] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int,
               *_: Any, **__: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # keys, values: [1, H, sum(T_i), d] -> each request's [1, H, L_i + T_i, d]
        self.layers[layer_idx] = [
            cache.update(k, v, layer_idx) for cache, k, v in
            zip(self.caches, keys.split(self.lengths, -2), values.split(self.lengths, -2),
                strict=True)]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are passed explicitly

    def mask(self, t: int, length: int, window: int | None) -> torch.Tensor | None:
        """``[1, 1, t, length]``: what a request's t new tokens see of its ``length`` keys
        (:func:`_visible`), made once per forward; ``None`` where they see every key."""
        if t == 1 and not (window and length > window):
            return None
        found = self._masks.get((t, length, window))
        if found is None:
            found = self._masks[t, length, window] = _visible(t, length, window, self.device)[
                None, None]
        return found


def packed_attention(original: Callable[..., Any], additive: bool) -> Callable[..., Any]:
    """An attention function that is ``original`` for ordinary forwards; in a packed forward
    (``nest_packed=`` a :class:`PackedCache`) each request's queries attend to its own keys,
    causal within its new tokens (and its sliding window): in float32, in one padded sdpa
    call (:func:`_padded_sdpa`); in a lower precision, once per request at its own shapes
    (what keeps its bits those of its forward alone), in float32 for sdpa (:func:`_own_sdpa`)
    and with ``original`` otherwise (eager, soft-capping). ``additive``: ``original`` adds a
    float mask (eager) instead of taking a boolean one."""

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        packed: PackedCache | None = kwargs.pop("nest_packed", None)
        if packed is None:
            return original(module, query, key, value, attention_mask, **kwargs)  # type: ignore[no-any-return]
        window = kwargs.get("sliding_window")  # a sliding layer sees this many keys
        layers = packed.layers[module.layer_idx]
        sdpa = not additive and not any(kwargs.get(k) is not None
                                        for k in ("softcap", "s_aux", "position_bias"))
        if sdpa and query.dtype == torch.float32:
            return _padded_sdpa(query, packed.lengths, layers, window, kwargs.get("scaling")), None
        outs, start = [], 0
        for t, (k, v) in zip(packed.lengths, layers, strict=True):
            q = query[:, :, start:start + t]  # [1, H, T_i, d]
            start += t
            mask = packed.mask(t, k.shape[-2], window)
            if sdpa:
                outs.append(_own_sdpa(q, k, v, mask, kwargs.get("scaling")))
                continue
            if additive and mask is not None:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device) \
                    .masked_fill(~mask, torch.finfo(q.dtype).min)
            out, _ = original(module, q, k, v, mask, **kwargs)  # [1, T_i, H, d]
            outs.append(out)
        return torch.cat(outs, dim=1), None

    return attention


def _own_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """One request's attention at its own shapes, computed in float32 (``[1, T, H, d]`` in
    the query's dtype): on CPU the bfloat16 kernel costs 0.23 ms a call however small (a
    step of SmolLM2: 1 query, 300 keys), float32's 0.04 ms plus the casts."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=mask, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])  # [1, H, T, d]
    return out.to(query.dtype).transpose(1, 2)


def _visible(t: int, length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[t, length]``: may query j (the j-th of t new tokens) see key i (of the last
    ``length`` positions, new ones last)? Causal: i <= length - t + j; in a sliding layer
    also i > length - t + j - window."""
    mask = torch.ones(t, length, dtype=torch.bool, device=device).tril(length - t)
    if window:
        mask &= ~torch.ones_like(mask).tril(length - t - window)
    return mask


def _padded_sdpa(query: torch.Tensor, lengths: Sequence[int],
                 layers: Sequence[tuple[torch.Tensor, torch.Tensor]], window: int | None,
                 scaling: float | None) -> torch.Tensor:
    """Every request's attention in ONE scaled-dot-product call: queries and keys padded to
    the longest, each request's visible keys in the mask (a call per request and layer made
    an 8-request forward of SmolLM2 about 15% slower on 2 CPU cores)."""
    b, heads, dim = len(lengths), query.shape[1], query.shape[-1]
    t_max, l_max = max(lengths), max(k.shape[-2] for k, _ in layers)
    k0 = layers[0][0]
    q = query.new_zeros(b, heads, t_max, dim)  # [B, H, T, d]
    k = k0.new_zeros(b, k0.shape[1], l_max, dim)  # [B, H_kv, L, d]
    v = k0.new_zeros(b, k0.shape[1], l_max, dim)
    mask = torch.zeros(b, 1, t_max, l_max, dtype=torch.bool, device=query.device)
    mask[:, :, :, 0] = True  # padded query rows see one key (no NaN); they are dropped
    start = 0
    for i, (t, (keys, values)) in enumerate(zip(lengths, layers, strict=True)):
        length = keys.shape[-2]
        q[i, :, :t] = query[0, :, start:start + t]
        k[i, :, :length] = keys[0]
        v[i, :, :length] = values[0]
        mask[i, 0, :t, :length] = _visible(t, length, window, query.device)
        start += t
    groups = heads // k0.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)  # [B, H, T, d]
    out = out.transpose(1, 2)  # [B, T, H, d]
    return torch.cat([out[i, :t] for i, t in enumerate(lengths)])[None]  # [1, sum(T), H, d]


def enable_packing(lm: LanguageModel) -> bool:
    """Switch ``lm``'s attention to one that also runs packed forwards (and is the model's
    own for every other forward); a bfloat16 model on CPU also gets paired-row linears (a
    lone forward then rounds as a packed one). Idempotent; False where the model's attention
    cannot be switched (its forwards then run one by one)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    model = lm.model
    current = getattr(model.config, "_attn_implementation", None) or "eager"
    if current.startswith(PACKED):
        return True
    if current not in ("sdpa", "eager"):
        logger.warning("batching needs sdpa or eager attention, %s has %s: its forwards run "
                       "one at a time", lm.name, current)
        return False
    original: Callable[..., Any]
    if current == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        original = sdpa_attention_forward
    else:  # the model's own eager function (Gemma 2's soft-capping lives there)
        from transformers.models.llama.modeling_llama import eager_attention_forward

        original = getattr(sys.modules[type(model).__module__], "eager_attention_forward",
                           eager_attention_forward)
    name = f"{PACKED}{current}_{type(model).__name__}"
    AttentionInterface.register(name, packed_attention(original, current == "eager"))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    try:
        model.set_attn_implementation(name)
    except (ValueError, TypeError, AttributeError) as err:  # pragma: no cover - exotic models
        logger.warning("batching is off for %s: %s", lm.name, err)
        return False
    if lm.dtype == torch.bfloat16 and lm.device.type == "cpu":
        use_paired_rows(model)
    return True


@torch.inference_mode()
def forward_packed(lm: LanguageModel, calls: Sequence[tuple[Sequence[int], Any]],
                   key_layer: int, last_only: Sequence[bool] | None = None) -> list[LMOutput]:
    """One model call for several requests' new tokens: ``calls`` are (ids, cache) pairs;
    each cache grows by its ids, and ``outputs[i]`` is what ``lm.forward(ids_i, cache_i,
    last_only=last_only[i])`` returns, computed in one pass over the weights."""
    lengths = [len(ids) for ids, _ in calls]
    caches = [cache for _, cache in calls]
    last = list(last_only) if last_only is not None else [False] * len(calls)
    keep: list[int] = []  # the packed positions whose logits are wanted
    for end, t, only in zip(itertools.accumulate(lengths), lengths, last, strict=True):
        keep += [end - 1] if only else list(range(end - t, end))
    packed = PackedCache(caches, lengths, lm.device)
    ids = torch.tensor([[int(i) for ids, _ in calls for i in ids]], dtype=torch.long,
                       device=lm.device)  # [1, sum(T_i)]
    positions = torch.tensor([[c.get_seq_length() + j for c, t in zip(caches, lengths,
                                                                       strict=True)
                               for j in range(t)]], device=lm.device)  # [1, sum(T_i)]
    # a 4-D mask is taken as given: the packed attention masks each request itself
    no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=lm.device)
    with KeyLayer(lm.model, key_layer) as key:
        out = lm.model(input_ids=ids, position_ids=positions, attention_mask=no_mask,
                       use_cache=True, nest_packed=packed, **key.kwargs,
                       logits_to_keep=torch.tensor(keep, device=lm.device),
                       **{lm.cache_arg: packed})
    kept = [1 if only else t for t, only in zip(lengths, last, strict=True)]
    logits = out.logits[0].float().split(kept)  # [1 or T_i, V] each
    hidden = key.states(out)[0].float().split(lengths)  # [T_i, D] each
    return [LMOutput(logits=lg, hidden=h[-1:] if only else h)
            for lg, h, only in zip(logits, hidden, last, strict=True)]


@dataclass
class BatchStats:
    """What the batcher has run: ``forwards`` model calls for ``calls`` requested forwards
    of ``tokens`` tokens in all (``packed``: the calls that shared a model call)."""

    forwards: int = 0
    calls: int = 0
    packed: int = 0
    tokens: int = 0

    @property
    def calls_per_forward(self) -> float:
        return self.calls / self.forwards if self.forwards else 0.0


@dataclass
class _Call:
    ids: list[int]
    cache: Any
    key_layer: int
    last_only: bool
    done: Future[LMOutput] = field(default_factory=Future)


class ForwardBatcher:
    """Runs the forwards of every generation of one model on one thread, packed.

    A generation opens a :meth:`session` for its life and calls :meth:`forward` like
    ``lm.forward``. A session alone runs its forward in its own thread (no hand-off: about
    3% of a lone answer's time), unpacked in float32 and packed (a pack of one) below it.
    Otherwise the call waits for its turn: the batcher's thread waits up to ``max_wait`` for
    the sessions that have not handed in their next forward (each is checking its last
    draft), then runs all that are waiting packed (:func:`forward_packed`), at most
    ``max_tokens`` new tokens per model call (a longer prompt is read alone). One forward of
    the model runs at a time.
    """

    def __init__(self, lm: LanguageModel, *, max_tokens: int = MAX_PACKED_TOKENS,
                 max_wait: float = MAX_WAIT_SECONDS) -> None:
        self.lm, self.max_tokens, self.max_wait = lm, max_tokens, max_wait
        self.packs = enable_packing(lm)
        # below float32 a forward alone runs packed too: a request then rounds the same
        # whoever it shares its forwards with
        self.alone_packed = self.packs and lm.dtype != torch.float32
        self.stats = BatchStats()
        self._pending: list[_Call] = []
        self._sessions = 0
        self._running = False  # a forward of the model is running
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with self._cond:
            self._sessions += 1
        try:
            yield
        finally:
            with self._cond:
                self._sessions -= 1
                self._cond.notify_all()

    def forward(self, input_ids: Sequence[int], cache: Any, key_layer: int,
                last_only: bool = False) -> LMOutput:
        call = _Call([int(i) for i in input_ids], cache, key_layer, last_only)
        with self._cond:
            alone = self._sessions <= 1 and not self._pending and not self._running
            if alone:
                self._running = True
            else:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._serve, daemon=True,
                                                    name="nest-forward-batcher")
                    self._thread.start()
                self._pending.append(call)
                self._cond.notify_all()
        if alone:
            try:
                self._run([call])
            finally:
                self._ran()
        return call.done.result()

    def _serve(self) -> None:
        while True:
            groups = self._next_groups()
            try:
                for group in groups:
                    self._run(group)
            finally:
                self._ran()

    def _ran(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()

    def _next_groups(self) -> list[list[_Call]]:
        """The waiting calls, once every session has handed one in or ``max_wait`` passed,
        in groups of at most ``max_tokens`` new tokens."""
        with self._cond:
            while not self._pending or self._running:
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self._pending) < self._sessions:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            calls, self._pending = self._pending, []
            self._running = True
        groups: list[list[_Call]] = []
        for call in calls:
            group = next((g for g in groups if self.packs and g[0].key_layer == call.key_layer
                          and sum(len(c.ids) for c in g) + len(call.ids) <= self.max_tokens),
                         None)
            if group is None:
                groups.append([call])
            else:
                group.append(call)
        return groups

    def _run(self, group: list[_Call]) -> None:
        try:
            if len(group) == 1 and not self.alone_packed:
                c = group[0]
                outs = [self.lm.forward(c.ids, c.cache, c.key_layer, last_only=c.last_only)]
            else:
                outs = forward_packed(self.lm, [(c.ids, c.cache) for c in group],
                                      group[0].key_layer, [c.last_only for c in group])
        except Exception as err:  # handed to every caller, who raises it
            for c in group:
                c.done.set_exception(err)
            return
        self.stats.forwards += 1
        self.stats.calls += len(group)
        self.stats.packed += len(group) if len(group) > 1 else 0
        self.stats.tokens += sum(len(c.ids) for c in group)
        for c, out in zip(group, outs, strict=True):
            c.done.set_result(out)


_CREATE = threading.Lock()


def batcher_for(lm: LanguageModel) -> ForwardBatcher:
    """The one batcher of ``lm``: every decoder of a model shares its weights, so they share
    the thread that runs its forwards."""
    with _CREATE:
        found: ForwardBatcher | None = getattr(lm, "_nest_batcher", None)
        if found is None:
            found = ForwardBatcher(lm)
            lm._nest_batcher = found  # type: ignore[attr-defined]
        return found
