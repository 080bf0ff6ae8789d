"""Stage 2 input: each passage encoded alone into (key, next token, source offsets) rows.

Keys do not depend on the query, so an :class:`EncodedPassage` can be cached and reused
across queries (see :class:`KeyCache`; the persistent store is
:class:`nest_core.stores.datastore.SpanDatastore`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from nest_core.lm import LanguageModel
from nest_core.types import Passage

logger = logging.getLogger(__name__)

ENCODING_VERSION = 3  # bump when the layout of EncodedPassage or passage_string changes
BATCH_SIZE = 10  # passages per forward, as in the official code


@dataclass(frozen=True)
class EncodedPassage:
    """Rows of one passage's token datastore; row j is the context ending at token j.

    ``keys``: ``(T, D)`` key-layer hidden state at position j (float16 or float32).
    ``values``: ``(T,)`` int64, the passage token at j+1 (what key j predicts).
    ``char_spans``: ``(T, 2)`` int32, offsets of token j+1 in ``passage.text``;
    ``(-1, -1)`` when that token is not passage text (title, BOS), and for row 0, whose key
    has no preceding context: such rows are never retrieved or copied.
    """

    keys: torch.Tensor
    values: torch.Tensor
    char_spans: torch.Tensor

    def __post_init__(self) -> None:
        t = self.values.shape[0]
        if self.keys.dim() != 2 or self.keys.shape[0] != t or self.char_spans.shape != (t, 2):
            msg = (f"inconsistent EncodedPassage shapes: keys {tuple(self.keys.shape)}, "
                   f"values {tuple(self.values.shape)}, char_spans "
                   f"{tuple(self.char_spans.shape)}")
            raise ValueError(msg)

    @property
    def num_rows(self) -> int:
        return int(self.values.shape[0])

    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement()
                   for t in (self.keys, self.values, self.char_spans))


@runtime_checkable
class KeyCache(Protocol):
    """Where encoded passages are kept between queries (thread-safe implementations)."""

    def get(self, key: str) -> EncodedPassage | None: ...

    def put(self, key: str, value: EncodedPassage) -> None: ...


class MemoryKeyCache:
    """A bounded, thread-safe LRU of encoded passages, by total bytes."""

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, EncodedPassage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> EncodedPassage | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, value: EncodedPassage) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes()
            self._items[key] = value
            self._bytes += value.nbytes()
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes()

    def __len__(self) -> int:
        return len(self._items)


def passage_string(passage: Passage) -> tuple[str, int]:
    """What the LM reads for a passage, and where ``passage.text`` starts inside it."""
    if passage.title:
        return f"{passage.title}\n{passage.text}", len(passage.title) + 1
    return passage.text, 0


class PassageEncoder:
    """Encodes passages with the LM body into :class:`EncodedPassage` rows, through a cache.

    ``key_dtype`` is the storage dtype of keys (float16 halves memory and disk; the search
    itself always runs in float32).
    """

    def __init__(self, lm: LanguageModel, *, key_layer: int = -2, max_passage_tokens: int = 512,
                 cache: KeyCache | None = None, key_dtype: torch.dtype = torch.float16) -> None:
        self.lm = lm
        self.key_layer = key_layer
        self.max_passage_tokens = max_passage_tokens
        self.cache = cache if cache is not None else MemoryKeyCache()
        self.key_dtype = key_dtype

    def cache_key(self, passage: Passage) -> str:
        """(model fingerprint, key layer, window, passage-string hash): a mismatch misses."""
        text, _ = passage_string(passage)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
        return (f"v{ENCODING_VERSION}-{self.lm.fingerprint}-L{self.key_layer}"
                f"-W{self.max_passage_tokens}-{digest}")

    def encode(self, passages: Sequence[Passage]) -> list[EncodedPassage]:
        """Encoded rows for each passage, in order; only cache misses run the LM."""
        keys = [self.cache_key(p) for p in passages]
        out: list[EncodedPassage | None] = [self.cache.get(k) for k in keys]
        missing = [i for i, e in enumerate(out) if e is None]
        for start in range(0, len(missing), BATCH_SIZE):
            batch = missing[start:start + BATCH_SIZE]
            for i, enc in zip(batch, self._encode_batch([passages[i] for i in batch]),
                              strict=True):
                self.cache.put(keys[i], enc)
                out[i] = enc
        return [e for e in out if e is not None]

    def _encode_batch(self, passages: Sequence[Passage]) -> list[EncodedPassage]:
        tokenised = [self._tokenise(p) for p in passages]
        # Every window of every passage, then one padded forward per BATCH_SIZE windows.
        windows = [(pi, w) for pi, (ids, _) in enumerate(tokenised)
                   for w in _windows(len(ids), self.max_passage_tokens)]
        hidden_rows: list[list[torch.Tensor]] = [[] for _ in passages]
        bos = self.lm.tokenizer.bos_token_id
        for start in range(0, len(windows), BATCH_SIZE):
            chunk = windows[start:start + BATCH_SIZE]
            # A later window starts with BOS too: position 0 is the attention sink, and
            # with BOS there the window's states match the decoder's for the same context.
            heads = [[bos] if a > 0 and bos is not None else [] for _, (a, _, _) in chunk]
            seqs = [h + tokenised[pi][0][a:b] for h, (pi, (a, b, _)) in zip(heads, chunk,
                                                                             strict=True)]
            states = self._forward_padded(seqs)  # [B, T, D]
            for h, (pi, (a, b, keep)), row in zip(heads, chunk, states, strict=True):
                # Window [a, b) gives keys for contexts a+keep .. b-2; the first `keep`
                # positions only give those keys their preceding context.
                hidden_rows[pi].append(row[len(h) + keep: len(h) + b - a - 1])
        results = []
        for (ids, spans), rows in zip(tokenised, hidden_rows, strict=True):
            d = self._hidden_size()
            keys = torch.cat(rows) if rows else torch.zeros(0, d)
            values = torch.tensor(ids[1:], dtype=torch.long)
            char_spans = torch.tensor(spans[1:], dtype=torch.int32).reshape(-1, 2)
            # Row 0's key is the state at sequence position 0 (BOS, or the first token): it
            # sees no context and its norm is ~300x the others' (attention sink), so it would
            # be every query's farthest neighbour and distort ρ. Never search it.
            char_spans[:1] = -1
            results.append(EncodedPassage(keys=keys.to(self.key_dtype).cpu().contiguous(),
                                          values=values, char_spans=char_spans))
        return results

    def _tokenise(self, passage: Passage) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids (BOS first when the tokenizer has one) and their offsets in the text.

        ``split_special_tokens``: a passage saying "<|im_end|>" is text, never the control
        token (copying it would end the answer, and a passage must not steer the model)."""
        text, text_start = passage_string(passage)
        enc = self.lm.text_tokenizer()(text, add_special_tokens=False,
                                       return_offsets_mapping=True, split_special_tokens=True)
        ids = [int(i) for i in enc["input_ids"]]
        spans = []
        for s, e in enc["offset_mapping"]:
            ok = s >= text_start and e > s
            spans.append((s - text_start, e - text_start) if ok else (-1, -1))
        bos = self.lm.tokenizer.bos_token_id
        if bos is not None:
            ids, spans = [int(bos), *ids], [(-1, -1), *spans]
        return ids, spans

    def _forward_padded(self, seqs: list[list[int]]) -> torch.Tensor:
        pad = self.lm.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return self.lm.encode_hidden(ids, mask, self.key_layer)

    def _hidden_size(self) -> int:
        return int(self.lm.model.config.hidden_size)


def _windows(length: int, width: int) -> list[tuple[int, int, int]]:
    """Token windows ``(a, b, keep)`` of at most ``width`` tokens covering a passage.

    Window ``[a, b)`` keys the contexts ``a+keep .. b-2``, so every context position
    0..length-2 gets exactly one key; every window after the first starts ``width // 2``
    tokens early, so none of its keys lacks preceding context (a key at a window's position
    0 would be an attention-sink state, not a context). Empty for passages under 2 tokens.
    """
    if length < 2:
        return []
    overlap = width // 2
    out, p = [], 0  # p: the next context position that needs a key
    while p < length - 1:
        a = max(0, p - overlap)
        b = min(a + width, length)
        out.append((a, b, p - a))
        p = b - 1
    return out
