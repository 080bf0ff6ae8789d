"""Ingest: documents -> ~100-word passages -> vectors -> a Chroma collection or FAISS store,
and optionally -> the span datastore, so the first query already runs no LM over passages.

Passage ids are stable (``"{doc_id}#{chunk}"``), so re-ingesting the same documents writes
nothing; a changed document replaces its passages and drops the ones it no longer has.
Each passage's ``metadata`` holds ``doc_id``, ``title``, ``chunk`` and ``start``/``end``: the
character offsets of the passage in its document. A passage's text is that slice with
zero-width and bidi control characters removed (:mod:`nest_core.stores.text`), so
``document.text[start:end] == text`` whenever the document holds none. Passages have at most
:data:`MAX_PASSAGE_CHARS` characters whatever the input; binary-looking documents (NUL
characters) are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nest_core.stores.embeddings import (
    EmbeddingFunction,
    check_same_model,
    embed_texts,
    embedding_fingerprint,
    embedding_name,
    resolve_embedding,
)
from nest_core.stores.sources.base import drop_empty, embedding_text
from nest_core.stores.sources.chroma import (
    DEFAULT_COLLECTION,
    DEFAULT_TIMEOUT,
    get_collection,
    http_client,
    persistent_client,
    with_deadline,
)
from nest_core.stores.sources.faiss_store import FaissStore, IndexKind
from nest_core.stores.text import binary_reason, strip_invisible
from nest_core.stores.writers import (
    INCOMPLETE_KEY,
    MARKER_FILE,
    ChromaWriter,
    FaissWriter,
    StoreWriter,
)
from nest_core.types import Passage

if TYPE_CHECKING:
    from nest_core.config import NestConfig
    from nest_core.encoding import KeyCache
    from nest_core.lm import LanguageModel

logger = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 30.0  # a FAISS store is saved at least this often while ingesting
LARGE_INGEST = 1000  # passages from which the user gets a time estimate and how to resume
ESTIMATE_SAMPLE = 8  # passages span-encoded up front to time the estimate of a large ingest
PRECOMPUTE_BATCH = 20  # passages per PassageEncoder.encode call in :func:`precompute`
MAX_PASSAGE_CHARS = 4000  # a passage's cap whatever the input (100 words are ~600 characters)
MAX_WORD_CHARS = 200  # longer runs without a space (base64, a URL list) are cut for chunking
_WORD = re.compile(r"\S+")
_SENTENCE_END = (".", "!", "?", ".\"", ".)", ";")


@dataclass(frozen=True)
class Document:
    """A document to ingest. ``id`` keys its passages; by default it is derived from the
    title (or the text when untitled), so an edited document replaces its old passages."""

    text: str
    title: str | None = None
    id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def doc_id(self) -> str:
        if self.id:
            return self.id
        basis = f"title:{self.title}" if self.title else f"text:{self.text}"
        return hashlib.sha256(basis.encode("utf-8")).hexdigest()[:16]


class Precompute(Protocol):
    """What encodes the span datastore for :func:`ingest`: :func:`precompute` (this process)
    or :class:`nest_core.stores.ray_index.RayPrecompute` (Ray workers), interchangeable because
    both write the same files. Returns the key rows the passages have in the datastore."""

    def __call__(self, passages: Sequence[Passage], lm: LanguageModel, *,
                 datastore: KeyCache | None, config: NestConfig | None = None,
                 progress: bool = True) -> int: ...


@dataclass
class IngestReport:
    """What one :func:`ingest` call did (counts of passages)."""

    documents: int = 0
    passages: int = 0
    written: int = 0
    unchanged: int = 0
    removed: int = 0
    empty_skipped: int = 0
    encoded_rows: int = 0


def chunk_document(doc: Document, words_per_passage: int = 100, *,
                   max_chars: int = MAX_PASSAGE_CHARS) -> list[Passage]:
    """Split ``doc`` into passages of about ``words_per_passage`` words and at most
    ``max_chars`` characters (a line of base64 or a run of one character is one "word": it
    is cut into pieces, so no input makes a passage the LM cannot encode).

    A chunk ends at a sentence end when one falls within 25% of the target, so passages
    read as whole sentences. Zero-width and bidi control characters are removed first
    (:mod:`nest_core.stores.text`): the text is a slice of the cleaned document, and
    ``start``/``end`` are offsets into ``doc.text`` as given.
    """
    if words_per_passage < 1 or max_chars < 2:
        msg = (f"words_per_passage={words_per_passage} and max_chars={max_chars} must be "
               f"positive (max_chars at least 2)")
        raise ValueError(msg)
    clean = strip_invisible(doc.text)
    text = clean.text
    words = _words(text, max(1, min(MAX_WORD_CHARS, max_chars // 2)))
    low, high = max(1, int(words_per_passage * 0.75)), int(words_per_passage * 1.25)
    passages: list[Passage] = []
    i = 0
    while i < len(words):
        end = min(i + words_per_passage, len(words))
        if end < len(words):
            for j in range(min(i + high, len(words)) - 1, i + low - 2, -1):
                if text[words[j][0]:words[j][1]].endswith(_SENTENCE_END):
                    end = j + 1
                    break
        end = _capped(words, i, end, max_chars)
        start_char, end_char = words[i][0], words[end - 1][1]
        n = len(passages)
        meta = {**_scalar_metadata(doc.metadata), "doc_id": doc.doc_id, "chunk": n,
                "start": clean.original(start_char), "end": clean.original_end(end_char)}
        if doc.title:
            meta["title"] = doc.title
        passages.append(Passage(id=f"{doc.doc_id}#{n}", text=text[start_char:end_char],
                                title=doc.title, metadata=meta))
        i = end
    return passages


def _words(text: str, longest: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each whitespace-separated word, words past ``longest`` characters
    cut into pieces of that length."""
    out: list[tuple[int, int]] = []
    for m in _WORD.finditer(text):
        start, end = m.span()
        out.extend((s, min(s + longest, end)) for s in range(start, end, longest))
    return out


def _capped(words: list[tuple[int, int]], first: int, end: int, max_chars: int) -> int:
    """``end``, or the first word from ``first`` that would take the passage past
    ``max_chars`` (the passage keeps at least one word, itself under the cap)."""
    for j in range(first + 1, end):
        if words[j][1] - words[first][0] > max_chars:
            return j
    return end


def ingest(documents: Iterable[Document], store: Any, *,
           embed: EmbeddingFunction | None = None, words_per_passage: int = 100,
           batch_size: int = 64, progress: bool = True, lm: LanguageModel | None = None,
           datastore: KeyCache | None = None, config: NestConfig | None = None,
           complete_prefixes: Sequence[str] = (),
           precompute_with: Precompute | None = None) -> IngestReport:
    """Chunk, embed and write ``documents`` into ``store``: a :class:`FaissStore` (saved at
    the end), a :class:`ChromaSource` or a chromadb collection. Idempotent by passage id.

    A FAISS store is written under its lock (:meth:`FaissStore.writing`): another ingest into
    it, in any process, waits and then adds to what this one saved. A store written with
    another embedding model (another name, or other weights: the fingerprint) is refused
    before anything is written; so is a binary-looking document (NUL characters). Calls to
    a Chroma server give up after the source's timeout (30 s for a bare collection).

    With ``lm``, also precompute the span datastore (``datastore``, default: the one inside a
    FAISS store's directory) with the key layer and window of ``config``, so queries over
    these passages run no LM on them. ``precompute_with`` encodes it elsewhere (default
    :func:`precompute`; :class:`nest_core.stores.ray_index.RayPrecompute` for Ray workers).

    With ``progress``, an ingest of :data:`LARGE_INGEST` passages or more says how long it
    will take (embedding and span encoding timed on its first batch) before the rest.

    ``complete_prefixes``: document-id prefixes (``"notes/"``) this call covers completely,
    as ``nest index`` does for a folder: a stored document under one of them that is not in
    ``documents`` any more (its file was deleted) is removed, counted in ``removed``.
    """
    embed = resolve_embedding(embed)
    docs = list(documents)
    _check_text(docs)
    report = IngestReport(documents=len(docs))
    chunked = [chunk_document(d, words_per_passage) for d in docs]
    all_passages = [p for ps in chunked for p in ps]
    passages = drop_empty(all_passages, "ingest")
    empty_docs = [d.doc_id for d in docs if not d.text.strip()]
    if empty_docs:
        logger.warning("ingest: skipped %d document(s) with no text (ids %s)", len(empty_docs),
                       ", ".join(empty_docs[:5]))
    report.empty_skipped = len(empty_docs)
    report.passages = len(passages)
    _check_unique(passages)
    writer = FaissWriter(store) if isinstance(store, FaissStore) else ChromaWriter(store)
    with writer.locked():  # another `nest index` into this FAISS store waits, then merges
        _check_embedding(writer, embed)
        target = None if lm is None else datastore if datastore is not None \
            else writer.datastore()
        # a large ingest can take hours on a CPU: say how long up front, timed on its first batch
        estimate = None
        if progress and len(passages) >= LARGE_INGEST:
            estimate = _Estimate(len(passages), lm, target, config,
                                 elsewhere=precompute_with is not None)
        _write_all(writer, passages, embed, report, batch_size=batch_size, progress=progress,
                   estimate=estimate)
        keep = {p.id for p in passages}
        report.removed = writer.remove_stale([d.doc_id for d in docs], keep)
        if complete_prefixes:
            present = {d.doc_id for d in docs}
            report.removed += writer.remove_missing(tuple(complete_prefixes), present)
        writer.finish()
    if estimate is not None:  # nothing needed embedding: the estimate is the encoding alone
        estimate.say(passages, None, to_embed=0)
    if lm is not None:
        encode = precompute_with if precompute_with is not None else precompute
        report.encoded_rows = encode(passages, lm, datastore=target, config=config,
                                     progress=progress)
    logger.info("ingest: %s", report)
    return report


def _check_embedding(writer: StoreWriter, embed: EmbeddingFunction) -> None:
    """Refuse another model than the one a non-empty store was written with: another name,
    or other weights (the fingerprint) under the same name."""
    built_with, name = writer.embedding(), embedding_name(embed)
    if built_with and built_with != name:
        msg = (f"this store was built with the embedding {built_with!r}, not {name!r}: adding "
               f"passages would mix vectors of two models, and search would return noise. "
               f"Ingest with {built_with!r}, or into a new store")
        raise ValueError(msg)
    check_same_model(embed, store="this store", recorded=built_with,
                     recorded_fingerprint=writer.fingerprint())


def _write_all(writer: StoreWriter, passages: list[Passage],
               embed: EmbeddingFunction, report: IngestReport, *, batch_size: int,
               progress: bool, estimate: _Estimate | None) -> None:
    """Embed and write the passages the store lacks, batch by batch, saving a FAISS store
    every :data:`CHECKPOINT_SECONDS`; Ctrl-C or a failure keeps what is written (the store
    stays marked incomplete and the same call resumes, skipping the passages stored)."""
    built_with = writer.embedding()
    writer.begin(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "passages": len(passages)}))
    bar = _progress(len(passages), "embedding passages", progress)
    saved = time.monotonic()
    try:
        for start in range(0, len(passages), batch_size):
            batch = writer.changed(passages[start:start + batch_size])
            report.unchanged += min(batch_size, len(passages) - start) - len(batch)
            if batch:
                began = time.monotonic()
                vectors = embed_texts(embed, [embedding_text(p) for p in batch], writer.dim,
                                      recorded=built_with)
                writer.dim = vectors.shape[1]
                writer.write(batch, vectors, embed)
                report.written += len(batch)
                if estimate is not None:
                    estimate.say(batch, (time.monotonic() - began) / len(batch),
                                 to_embed=len(passages) - start)
            bar.update(min(batch_size, len(passages) - start))
            if time.monotonic() - saved > CHECKPOINT_SECONDS:
                writer.checkpoint()
                saved = time.monotonic()
    except BaseException:
        writer.checkpoint(quiet=True)
        raise
    finally:
        bar.close()


def unfinished(source: Any) -> dict[str, Any] | None:
    """The marker of an ingest into ``source``'s store that did not finish (Ctrl-C, a crash),
    or ``None``: ``{"started", "passages"}``. Running the same ingest again resumes it."""
    store = getattr(source, "store", None)
    raw: Any = None
    if isinstance(store, FaissStore):
        marker = store.path / MARKER_FILE
        raw = marker.read_text(encoding="utf-8") if marker.is_file() else None
    elif getattr(source, "collection", None) is not None:
        raw = (getattr(source.collection, "metadata", None) or {}).get(INCOMPLETE_KEY) or None
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except (TypeError, ValueError):
        info = None
    return info if isinstance(info, dict) else {"started": "?", "passages": "?"}


def open_faiss_store(path: str | os.PathLike[str], *, embed: EmbeddingFunction | None = None,
                     kind: IndexKind = "flat", **kwargs: Any) -> FaissStore:
    """The FAISS store at ``path``, created for ``embed``'s dimension when missing."""
    embed = resolve_embedding(embed)
    dim = embed_texts(embed, ["dimension probe"]).shape[1]
    return FaissStore.open_or_create(path, dim, kind=kind, embedding=embedding_name(embed),
                                     embedding_fingerprint=embedding_fingerprint(embed),
                                     **kwargs)


def open_chroma_collection(path: str | os.PathLike[str] | None = None, *,
                           host: str | None = None, port: int = 8000,
                           name: str = DEFAULT_COLLECTION,
                           embed: EmbeddingFunction | None = None) -> Any:
    """A collection to ingest into: embedded at ``path``, or on the server at ``host:port``;
    created (cosine, with the embedding name and dimension recorded) when missing."""
    if (path is None) == (host is None):
        msg = "pass exactly one of path= (embedded Chroma) or host= (a Chroma server)"
        raise ValueError(msg)
    embed = resolve_embedding(embed)
    dim = embed_texts(embed, ["dimension probe"]).shape[1]
    if path is not None:
        return get_collection(persistent_client(path), name, create=True, embed=embed, dim=dim)
    return with_deadline(lambda: get_collection(http_client(str(host), port), name, create=True,
                                                embed=embed, dim=dim),
                         DEFAULT_TIMEOUT, f"{host}:{port}")


def precompute(passages: Sequence[Passage], lm: LanguageModel, *, datastore: KeyCache | None,
               config: NestConfig | None = None, progress: bool = True,
               batch_size: int = PRECOMPUTE_BATCH) -> int:
    """Encode ``passages`` into ``datastore`` (default: :func:`default_datastore_dir`) with the
    decoder's key layer and window; cached ones cost a file read. Returns rows stored."""
    from nest_core.config import NestConfig
    from nest_core.encoding import PassageEncoder
    from nest_core.stores.datastore import SpanDatastore

    cfg = config or NestConfig()
    encoder = PassageEncoder(lm, key_layer=cfg.key_layer,
                             max_passage_tokens=cfg.max_passage_tokens,
                             cache=datastore if datastore is not None else SpanDatastore())
    rows = 0
    bar = _progress(len(passages), "encoding span datastore", progress)
    try:
        for start in range(0, len(passages), batch_size):
            batch = passages[start:start + batch_size]
            rows += sum(e.num_rows for e in encoder.encode(batch))
            bar.update(len(batch))
    finally:
        bar.close()
    return rows


def precompute_source(source: Any, lm: LanguageModel, *, datastore: KeyCache | None,
                      config: NestConfig | None = None, progress: bool = True) -> tuple[int, int]:
    """:func:`precompute` for a store nest did not write (or one indexed without it): every
    passage of an opened source (``nest_core.stores.sources.open_store(path)``; anything with a
    ``passages()`` method) goes into ``datastore``, so queries over it run no LM on passages.
    Returns ``(passages, rows stored)``."""
    read_all = getattr(source, "passages", None)
    if not callable(read_all):
        msg = (f"{type(source).__name__} cannot list its passages; open the store with "
               f"nest_core.stores.sources.open_store(path)")
        raise TypeError(msg)
    passages = drop_empty(list(read_all()), "precompute")
    return len(passages), precompute(passages, lm, datastore=datastore, config=config,
                                     progress=progress)


def _check_text(docs: list[Document]) -> None:
    """Binary data (a NUL file) is refused, naming the document, before anything is written."""
    for doc in docs:
        reason = binary_reason(doc.text)
        if reason:
            name = doc.metadata.get("source") or doc.title or doc.doc_id
            msg = f"document {name!r}: {reason}; leave it out or convert it to text"
            raise ValueError(msg)


def _check_unique(passages: list[Passage]) -> None:
    counts = Counter(p.id for p in passages)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        msg = (f"documents produce duplicate passage ids {dupes[:5]}: give documents distinct "
               f"ids or titles (Document(id=...))")
        raise ValueError(msg)


def _scalar_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Vector stores keep str/int/float/bool metadata only: others become JSON strings."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        out[str(key)] = value if isinstance(value, (str, int, float, bool)) \
            else json.dumps(value, ensure_ascii=False, default=str)
    return out


class _Estimate:
    """The time a large ingest will take, said once, before the bulk of the work: the rate
    of embedding is timed on the first batch that needed it, and span encoding (the slow
    part: a forward pass of the LM per passage) on :data:`ESTIMATE_SAMPLE` passages of it,
    which land in the datastore, so the timing costs nothing twice."""

    def __init__(self, total: int, lm: LanguageModel | None, datastore: KeyCache | None,
                 config: NestConfig | None, *, elsewhere: bool) -> None:
        self.total, self.lm, self.datastore, self.config = total, lm, datastore, config
        self.elsewhere = elsewhere  # spans are encoded by another Precompute (Ray workers)
        self.said = False

    def say(self, sample: Sequence[Passage], embed_seconds: float | None, *,
            to_embed: int) -> None:
        """Say the estimate (once): ``embed_seconds`` per passage for the ``to_embed``
        passages left to embed (``None``: none are), span encoding timed on ``sample``."""
        if self.said or (embed_seconds is None and self.lm is None):
            return
        self.said = True
        parts = []
        if embed_seconds is not None:
            parts.append(f"{_duration(to_embed * embed_seconds)} to embed")
        if self.lm is not None and sample:
            timed = sample[:ESTIMATE_SAMPLE]
            began = time.monotonic()
            precompute(timed, self.lm, datastore=self.datastore, config=self.config,
                       progress=False)
            seconds = (time.monotonic() - began) / len(timed) * self.total
            where = " in one process (the Ray workers divide it)" if self.elsewhere else ""
            parts.append(f"{_duration(seconds)} to encode spans{where}")
        _say(f"{self.total} passages: {', '.join(parts)} (timed on the "
             f"first ones; the bars show the time left). Ctrl-C keeps what is done (the store "
             f"is marked incomplete); the same command resumes where it stopped")


def _duration(seconds: float) -> str:
    """``about 12 min``, ``about 3 h 5 min`` or ``under 1 min``: an estimate's precision."""
    if seconds < 60:
        return "under 1 min"
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    if not hours:
        return f"about {minutes} min"
    return f"about {hours} h" + (f" {minutes} min" if minutes else "")


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="passage", disable=not enabled or total == 0)
