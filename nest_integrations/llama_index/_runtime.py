"""The decoding half shared by :class:`NestQueryEngine` and :class:`NestLLM`.

The model is loaded on first use (``load_model(shared=True)``: every engine in the process
that names the same model gets the same weights), never in a constructor, so building an
engine is cheap and picklable settings stay plain data.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from llama_index.core.schema import NodeWithScore

from nest_core.config import NestConfig
from nest_core.types import Passage
from nest_integrations.llama_index.citations import SpanAssembler

logger = logging.getLogger(__name__)


class LazyDecoder:
    """Builds one ``NestDecoder`` on first :meth:`get` (thread-safe), then reuses it.

    ``lm`` injects a built ``LanguageModel`` (tests, custom loading); otherwise
    ``model_name``/``dtype`` go to :func:`nest_core.models.load_model`. ``key_cache`` (any
    ``KeyCache``) or ``datastore_dir`` (a persistent ``SpanDatastore``) keep passage keys
    between queries; by default an in-memory LRU does. Settings are captured when the
    engine is built (changing ``engine.config`` later does not rebuild the decoder).
    """

    def __init__(self, *, model_name: str | None, dtype: str | None, config: NestConfig | None,
                 lm: Any = None, key_cache: Any = None,
                 datastore_dir: str | os.PathLike[str] | None = None) -> None:
        self.model_name, self.dtype, self.config = model_name, dtype, config
        self._lm, self._key_cache, self._datastore_dir = lm, key_cache, datastore_dir
        self._decoder: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._decoder is None:
                from nest_core.decoder import NestDecoder
                from nest_core.models import load_model
                from nest_core.stores.embeddings import default_embedding_function

                lm = (self._lm if self._lm is not None
                      else load_model(self.model_name, dtype=self.dtype))
                self._decoder = NestDecoder(lm, self.config, key_cache=self._cache(),
                                            embed=default_embedding_function())
            return self._decoder

    def _cache(self) -> Any:
        if self._key_cache is not None:
            return self._key_cache
        if self._datastore_dir is not None:
            from nest_core.stores.datastore import SpanDatastore

            return SpanDatastore(self._datastore_dir)
        return None  # the decoder's own in-memory default


def source_map(kept: Sequence[NodeWithScore]) -> dict[str, tuple[int, NodeWithScore]]:
    """passage id -> (1-based index in ``source_nodes``, node): what ``[n]`` points at."""
    return {s.node.node_id: (i, s) for i, s in enumerate(kept, start=1)}


def decode_pieces(decoder: Any, prompt: Any, passages: Sequence[Passage],
                  kept: Sequence[NodeWithScore], metadata: dict[str, Any], *,
                  max_new_tokens: int, stop: Sequence[str] | None,
                  citation_markers: bool, hold: bool = False) -> Iterator[str]:
    """Stream response text; fill ``metadata["nest_spans"]`` as spans complete.
    ``hold=True`` (callers that join the text anyway) yields it all at the end, when the
    answer's support is known (see :class:`SpanAssembler`).

    When the generator is exhausted, ``metadata["nest_matches"]`` holds the matched spans
    (text the LM wrote that a node holds verbatim; known only at the end), and ``metadata``
    also holds ``nest_stats``,
    ``nest_attribution_ratio``, ``nest_finish_reason``, ``nest_quoted`` and, with markers
    on, ``nest_text``
    (the decoder's text without markers).
    """
    assembler = SpanAssembler(source_map(kept), metadata["nest_spans"],
                              citation_markers=citation_markers, hold=hold)
    for chunk in decoder.stream(prompt, passages, max_new_tokens=max_new_tokens,
                                stop=list(stop) if stop else None):
        piece = assembler.feed(chunk)
        if piece:
            yield piece
    tail = assembler.finish()
    if tail:
        yield tail
    metadata.setdefault("nest_matches", []).extend(assembler.matches())
    result = assembler.result
    if result is not None:
        metadata["nest_stats"] = result.stats.to_dict()
        metadata["nest_attribution_ratio"] = result.attribution_ratio
        metadata["nest_finish_reason"] = result.finish_reason
        metadata["nest_quoted"] = result.quoted  # the answer is a focus sentence, quoted
    if citation_markers:
        metadata["nest_text"] = assembler.plain
