"""KV states of earlier prompts, reused by token ids: a bounded, thread-safe prefix cache.

Every call reads its prompt through the chat template, and the same head (system prompt,
background instruction, repeated passages, an earlier turn of the conversation) is read again
and again. The prompt's KV states after the prefill are kept by their token ids; a later
prompt sharing a prefix with one of them starts from a copy of the longest such prefix and
feeds only the rest.

Entries hold the very tensors the prefill produced (no copy): transformers'
``DynamicLayer`` grows by concatenation and crops by slicing, never in place, so a
generation that seeds from an entry and decodes on cannot change it. Each generation gets
its own cache object, filled with a copy of the prefix (:meth:`PrefixCache.seed`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_MAX_BYTES = 64 * 2**20  # SmolLM2-135M float32: 46 KB per token, ~1,400 tokens


@dataclass(frozen=True)
class _Entry:
    """One prompt's KV states: ``layers[i]`` = (keys, values), each ``(1, H, T, d)``."""

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    nbytes: int


@dataclass(frozen=True)
class Reuse:
    """What :meth:`PrefixCache.seed` found: ``tokens`` leading prompt tokens already in the
    cache it returned (0: a miss)."""

    tokens: int

    @property
    def hit(self) -> bool:
        return self.tokens > 0


class PrefixCache:
    """A least-recently-used set of prompt KV states, at most ``max_bytes`` of tensors.

    ``seed(new_cache, ids)`` fills a fresh cache with the longest cached prefix of ``ids``
    (never all of them: the last token is always fed, its logits start the answer);
    ``store(ids, cache)`` keeps a prefilled prompt. An entry whose ids are a prefix of a
    newer one is dropped (the newer one holds it). ``max_bytes=0`` keeps nothing.
    Caches whose layers are not plain ``DynamicLayer`` (sliding windows, quantised caches)
    are neither seeded nor stored.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            msg = f"max_bytes={max_bytes!r} must be a non-negative int (0 turns the cache off)"
            raise ValueError(msg)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[PrefixCache], tuple[int]]:
        # A model sent to another process (a Ray worker) starts with an empty cache of the
        # same bound: KV states are cheap to rebuild there, and a lock cannot be pickled.
        return (PrefixCache, (self.max_bytes,))

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ids: object) -> bool:
        """Whether the KV states of exactly the prompt ``ids`` are kept."""
        return isinstance(ids, Sequence) and tuple(ids) in self._entries

    def seed(self, cache: Any, ids: Sequence[int]) -> Reuse:
        """Fill the empty ``cache`` with the longest cached prefix of ``ids`` (a copy)."""
        if not self.max_bytes or len(ids) < 2 or not _plain(cache):
            return Reuse(0)
        with self._lock:
            best, length = None, 0
            for entry in self._entries.values():
                n = _common_prefix(entry.ids, ids)
                if n > length:
                    best, length = entry, n
            if best is not None:
                self._entries.move_to_end(best.ids)
        length = min(length, len(ids) - 1)
        if best is None or length == 0:
            return Reuse(0)
        for layer, (keys, values) in zip(cache.layers, best.layers, strict=True):
            layer.update(keys[..., :length, :], values[..., :length, :])  # copies (cat)
        return Reuse(length)

    def store(self, ids: Sequence[int], cache: Any) -> None:
        """Keep the KV states of ``cache``, which holds exactly the prompt ``ids``."""
        if not self.max_bytes or not _plain(cache) or cache.get_seq_length() != len(ids):
            return
        layers = tuple((layer.keys, layer.values) for layer in cache.layers)
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.max_bytes:
            return
        key = tuple(ids)
        with self._lock:
            for old in [e for e in self._entries.values()
                        if _common_prefix(e.ids, key) == len(e.ids)]:
                self._drop(old)  # this prompt holds it (or is it)
            self._entries[key] = _Entry(key, layers, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries.values())))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, entry: _Entry) -> None:
        del self._entries[entry.ids]
        self._bytes -= entry.nbytes


def _plain(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain growing ``DynamicLayer``."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
