"""What the commands share (``nest`` itself, the demo, the server, the MCP tool): the decoder
settings of a mode, opening and building stores, loading the model quietly, answering one
question. The commands import this module; it imports none of them."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nest_core.app.files import CliError, read_documents
from nest_core.app.safe_text import printable
from nest_core.types import Passage

STORE_KINDS = ("chroma", "faiss")  # what `nest index` writes; `nest ask` reads more
DEFAULT_K = 8  # passages per question: enough to hold the answer, few keys to search
MIN_PROMPT_ROOM = 512  # context tokens kept for the question and its passages
DEFAULT_MAX_NEW_TOKENS = 64
# `--mode`: named decoder settings (nest_config), not NestConfig.mode (nest_core.config.MODES)
PRESETS = ("default", "nest", "ra-nest")
DEFAULT_PRESET = "default"
PRESET_HELP = ("default: the measured best (top passage in the prompt, spans verified by the "
               "LM, answers that end); nest / ra-nest: the paper's algorithm without / with "
               "passages in the prompt")


def nest_config(mode: str, model_name: str | None = None) -> Any:
    """The decoder settings of a CLI mode: ``"default"`` is
    :func:`~nest_core.config.default_config` (what every surface uses); ``"nest"`` and
    ``"ra-nest"`` are the paper's algorithm (:func:`~nest_core.config.paper_config`) with the
    model's calibrated numbers, passages only as the copy datastore or also in the prompt."""
    from nest_core.config import default_config, paper_config

    if mode not in PRESETS:
        msg = f"mode={mode!r} is not one of {PRESETS}"
        raise ValueError(msg)
    if mode == "default":
        return default_config(model_name)
    return paper_config(model_name, passages_in_prompt=mode == "ra-nest")


# --- stores ----------------------------------------------------------------------------------
def detect_store(path: str | os.PathLike[str], collection: str | None = None) -> str:
    """The kind of store in ``path`` (:func:`nest_core.stores.sources.detect_store_kind`: nest's,
    Chroma, a LlamaIndex persist directory, LangChain FAISS); a clear error otherwise."""
    from nest_core.stores.sources.open import detect_store_kind

    p = Path(path).expanduser()
    kind = detect_store_kind(p)
    if kind is None:
        what = "does not exist" if not p.exists() else "holds no vector store nest can read"
        msg = (f"{path} {what}; build one with `nest index FILES... --out {path}` (or run "
               f"`nest demo`), or point --store at a Chroma directory, a LlamaIndex persist "
               f"directory or a LangChain FAISS.save_local directory")
        raise CliError(msg)
    if collection is not None and kind != "chroma":
        msg = f"--collection {collection} applies to Chroma stores; {path} is a {kind} store"
        raise CliError(msg)
    return kind


def build_store(files: Sequence[tuple[Path, str]], out: str | os.PathLike[str], kind: str, *,
                precompute: bool = True, progress: bool = True,
                folders: Sequence[str] = (), embed: Any = None,
                collection: str | None = None, ray: Any = None,
                complete_prefixes: Sequence[str] | None = None) -> Any:
    """Chunk, embed and write ``files`` into a ``kind`` store at ``out``, and precompute the
    span datastore inside it, so ``nest ask`` runs no LM over passages. ``folders``: the
    folders indexed whole; what the store holds from them that ``files`` lacks (deleted
    files) is removed; ``complete_prefixes``: the id prefixes they cover, when not their names
    (:func:`nest_core.stores.roots.assign_ids`). ``ray``:
    :class:`~nest_core.stores.ray_index.RayOptions` to encode the datastore on Ray workers
    (same files)."""
    from nest_core.stores.datastore import SpanDatastore
    from nest_core.stores.ingest import ingest, open_chroma_collection, open_faiss_store
    from nest_core.stores.sources.chroma import DEFAULT_COLLECTION, ChromaSource

    docs = read_documents(files)
    quiet_transformers()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    store = (open_faiss_store(out, embed=embed) if kind == "faiss" else
             open_chroma_collection(out, embed=embed, name=collection or DEFAULT_COLLECTION))
    lm = load_quietly(progress) if precompute else None
    # the key layer and window must be the ones `nest ask` decodes with, or every key misses
    config = nest_config(DEFAULT_PRESET, lm.name) if lm is not None else None
    encode = ray_precompute(ray)
    if complete_prefixes is None:
        complete_prefixes = [f"{Path(f).expanduser().resolve().name}/" for f in folders]
    report = ingest(docs, store, embed=embed, progress=progress, lm=lm, config=config,
                    datastore=SpanDatastore.for_store(out) if precompute else None,
                    complete_prefixes=complete_prefixes, precompute_with=encode)
    _note_ray(encode)
    if lm is not None:
        # the store as just written, already open (no second read of its index)
        held = (store.passages() if kind == "faiss"
                else ChromaSource(store, embed=embed).passages())
        stale = prune_span_files(out, lm, config, held)
        if stale:
            note(f"removed {stale} span file(s) no passage needs under this model")
    return report


def prune_span_files(store: str | os.PathLike[str], lm: Any, config: Any,
                     passages: Sequence[Passage]) -> int:
    """Keep in the span datastore of the store at ``store`` only the files its ``passages``
    (all it holds) need under ``lm`` (files of an older model, another dtype or of deleted
    passages go: they would stay until the size bound evicts them); returns how many were
    removed."""
    from nest_core.encoding import PassageEncoder
    from nest_core.stores.datastore import SpanDatastore

    encoder = PassageEncoder(lm, key_layer=config.key_layer,
                             max_passage_tokens=config.max_passage_tokens)
    keys = {encoder.cache_key(p) for p in passages if p.text.strip()}
    return SpanDatastore.for_store(store).retain(keys)


def open_source(path: str | os.PathLike[str], *, collection: str | None = None,
                embedding: str | None = None, allow_dangerous_deserialization: bool = False,
                rerank: bool = True) -> Any:
    """The passage source of the store at ``path``, whoever wrote it
    (:func:`nest_core.stores.sources.open_store`), queried with the ``--embedding`` model; with
    ``rerank``, a wider pool re-ranked by the question's words
    (:class:`~nest_core.stores.sources.rerank.LexicalRerank`), as every question is answered."""
    from nest_core.stores.embeddings import load_embedding
    from nest_core.stores.sources.open import open_store

    detect_store(path, collection)
    quiet_transformers()
    source = open_store(Path(path).expanduser(), collection=collection,
                        embed=load_embedding(embedding),
                        allow_dangerous_deserialization=allow_dangerous_deserialization)
    if getattr(source, "note", None):
        note(source.note)
    from nest_core.stores.ingest import unfinished

    info = unfinished(source)
    if info is not None:
        note(f"the last `nest index` into {path} did not finish (it was writing "
             f"{info.get('passages')} passages, started {info.get('started')}): answers may "
             f"miss documents; run the same `nest index` command again to resume")
    if rerank:
        from nest_core.stores.sources.rerank import LexicalRerank

        return LexicalRerank(source)
    return source


def precompute_existing(path: str | os.PathLike[str], *, collection: str | None = None,
                        allow_dangerous_deserialization: bool = False,
                        progress: bool = True, ray: Any = None) -> tuple[int, int, Path]:
    """Encode every passage of the store at ``path`` into its span datastore
    (:func:`nest_core.stores.sources.span_datastore_dir`: inside the store when writable, else the
    user cache), on Ray workers with ``ray`` (:class:`~nest_core.stores.ray_index.RayOptions`);
    returns ``(passages, rows, datastore dir)``."""
    from nest_core.stores.datastore import SpanDatastore
    from nest_core.stores.ingest import precompute
    from nest_core.stores.sources.open import span_datastore_dir

    source = open_source(path, collection=collection, rerank=False,
                         allow_dangerous_deserialization=allow_dangerous_deserialization)
    passages = [p for p in source.passages() if p.text.strip()]
    if not passages:  # said before the model loads
        msg = f"{path} holds no passages with text; add documents to it first"
        raise CliError(msg)
    lm = load_quietly(progress)
    where = span_datastore_dir(path)
    encode = ray_precompute(ray)
    rows = (encode or precompute)(passages, lm, datastore=SpanDatastore(where),
                                  config=nest_config(DEFAULT_PRESET, lm.name), progress=progress)
    _note_ray(encode)
    return len(passages), rows, where


def ray_precompute(options: Any) -> Any:
    """A :class:`~nest_core.stores.ray_index.RayPrecompute` for ``options`` (``None``: none, the
    datastore is encoded in this process)."""
    if options is None:
        return None
    from nest_core.stores.ray_index import RayPrecompute

    return RayPrecompute(options)


def _note_ray(encode: Any) -> None:
    report = getattr(encode, "last_report", None)
    if report is not None:
        note(f"Ray: {report.encoded} passage(s) encoded on {len(report.workers)} worker(s), "
             f"{report.cached} already in the datastore ({report.seconds:.1f} s)")


def quiet_transformers() -> None:
    """transformers draws a "Loading weights" bar for every model (LM and MiniLM): noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# The model dtype of this process (``--dtype`` of index/ask/demo; keys cached per dtype).
DTYPE: dict[str, str | None] = {"dtype": None}


def load_quietly(progress: bool = True) -> Any:
    """The model, with transformers' per-load noise off (``progress=False``: its one-time
    conversion bar too)."""
    from nest_core.models import load_model

    quiet_transformers()
    note("loading the language model ...")
    return load_model(dtype=DTYPE["dtype"], progress=progress)


def answer(question: str, store: str | os.PathLike[str], *, k: int, max_new_tokens: int,
           compare: bool, mode: str = DEFAULT_PRESET, collection: str | None = None,
           embedding: str | None = None, allow_dangerous_deserialization: bool = False
           ) -> tuple[Any, Any | None]:
    """Retrieve, then decode with Nest (and the plain model when ``compare``)."""
    from nest_core import NestConfig, NestDecoder
    from nest_core.stores.datastore import SpanDatastore
    from nest_core.stores.embeddings import default_embedding_function
    from nest_core.stores.sources.open import span_datastore_dir

    source = open_source(store, collection=collection, embedding=embedding,
                         allow_dangerous_deserialization=allow_dangerous_deserialization)
    passages = source.retrieve(question, k)
    if not passages:
        msg = (f"no passages found in {store} for this question; index more files with "
               f"`nest index FILES... --out {store}`")
        raise CliError(msg)
    lm = load_quietly()
    if max_new_tokens > lm.max_context - MIN_PROMPT_ROOM:
        msg = (f"--max-new-tokens {max_new_tokens} leaves the question and its passages less "
               f"than {MIN_PROMPT_ROOM} of the model's {lm.max_context} context tokens; use at "
               f"most {lm.max_context - MIN_PROMPT_ROOM}")
        raise CliError(msg)
    cache = SpanDatastore(span_datastore_dir(store))
    result = NestDecoder(lm, nest_config(mode, lm.name), key_cache=cache,
                         embed=default_embedding_function()).generate(
        question, passages, max_new_tokens=max_new_tokens)
    base = None
    if compare:
        base = NestDecoder(lm, NestConfig(mode="base")).generate(
            question, max_new_tokens=max_new_tokens)
    return result, base


def open_service(store: str | os.PathLike[str], *, k: int = DEFAULT_K, mode: str = DEFAULT_PRESET,
                 collection: str | None = None, embedding: str | None = None,
                 allow_dangerous_deserialization: bool = False, batching: bool = False) -> Any:
    """The :class:`~nest_core.app.service.AnswerService` of ``nest serve`` / ``nest mcp``:
    the store opened, the model loaded and the span datastore found once, for every request
    (``batching``: concurrent answers share model forwards)."""
    from nest_core.app.service import AnswerService
    from nest_core.stores.datastore import SpanDatastore
    from nest_core.stores.sources.open import span_datastore_dir

    detect_store(store, collection)
    source = open_source(store, collection=collection, embedding=embedding,
                         allow_dangerous_deserialization=allow_dangerous_deserialization)
    lm = load_quietly()
    return AnswerService(source, lm, k=k, config=nest_config(mode, lm.name),
                         key_cache=SpanDatastore(span_datastore_dir(store)), batching=batching)


def note(message: str) -> None:
    """Progress for the user: stderr, so stdout stays the answer (and JSON) alone; a path
    in it cannot send the terminal a command (:func:`~nest_core.app.safe_text.printable`)."""
    print(printable(message), file=sys.stderr, flush=True)
