"""nest: Nearest Neighbor Speculative Decoding (Li et al., NeurIPS 2024) for any HF causal LM.

Grounded, attributed, faster answers over the passages your vector store returns.
"""

from nest_core.config import NestConfig
from nest_core.decoder import NestDecoder
from nest_core.encoding import EncodedPassage, KeyCache, MemoryKeyCache, PassageEncoder
from nest_core.lm import LanguageModel
from nest_core.models import cache_dir, default_gguf_path, load_model
from nest_core.types import DecodeStats, NestChunk, NestResult, Passage, Span

__version__ = "0.1.0"

__all__ = [
    "DecodeStats",
    "EncodedPassage",
    "KeyCache",
    "LanguageModel",
    "MemoryKeyCache",
    "NestChunk",
    "NestConfig",
    "NestDecoder",
    "NestResult",
    "Passage",
    "PassageEncoder",
    "Span",
    "__version__",
    "cache_dir",
    "default_gguf_path",
    "load_model",
]
