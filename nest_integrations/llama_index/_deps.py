"""One place that says how to install what this integration needs."""

from __future__ import annotations

import importlib

LLAMAINDEX_HINT = 'pip install "nest-decoding[llamaindex]"'
EMBEDDINGS_HINT = 'pip install "nest-decoding[embeddings,llamaindex]"'


def require(module: str, hint: str = LLAMAINDEX_HINT) -> None:
    """Import ``module`` or raise ``ImportError`` naming the exact install command."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        msg = f"{module} is required for nest_integrations.llama_index; run `{hint}`"
        raise ImportError(msg) from err
