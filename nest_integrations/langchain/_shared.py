"""What ChatNest and NestLLM share: fields, lazy model loading, passage retrieval, decoding.

Nothing heavy happens at construction (langchain-tests times ``__init__``, and users build
models at import time): torch, the LM and the decoder are touched on the first call. The LM is
shared between instances through :func:`nest_core.models.load_model` (``shared=True``), and so
is the cache of encoded passage keys, so a second instance re-uses both.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from langchain_core.documents import Document
from langchain_core.language_models import LangSmithParams
from langchain_core.messages.ai import UsageMetadata
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from nest_core.config import NestConfig
from nest_core.types import NestChunk, NestResult, Passage
from nest_integrations.langchain.context import Found
from nest_integrations.langchain.documents import documents_to_passages

if TYPE_CHECKING:
    from nest_core.encoding import KeyCache
    from nest_core.lm import LanguageModel

logger = logging.getLogger(__name__)

PROVIDER = "nest"
CALL_OPTIONS = ("documents", "model", "max_tokens", "temperature")
# What hosted chat models take (and langchain-tests passes): meaningless for a local model.
REMOTE_ONLY = ("api_key", "base_url", "timeout", "max_retries")
_CACHE_LOCK = threading.Lock()
_KEY_CACHES: dict[tuple[str, str | None], KeyCache] = {}


def default_model_name() -> str:
    from nest_core.models import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class CallOptions:
    """Per-call settings after merging call kwargs over the instance fields."""

    model: str | None
    max_tokens: int
    stop: list[str] | None
    documents: list[Document] | None

    @property
    def model_name(self) -> str:
        return self.model or default_model_name()


class NestParams(BaseModel):
    """Fields and helpers common to :class:`ChatNest` and :class:`NestLLM` (a pydantic mixin)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str | None = Field(
        default=None, validation_alias=AliasChoices("model", "model_name"),
        description="Hugging Face id, local directory or .gguf path of the causal LM; None is "
        "the bundled SmolLM2-135M-Instruct. Loaded on the first call, shared between instances. "
        "`model_name=` is accepted as an alias, as in the partner packages.",
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for transformers' `from_pretrained` when `model` is "
        "loaded, e.g. {'revision': 'main', 'attn_implementation': 'sdpa'} (dtype and device "
        "have their own fields).")
    streaming: bool = Field(
        default=False,
        description="Stream inside `invoke` too (callbacks see each piece as it is accepted).")
    retriever: BaseRetriever | None = Field(
        default=None, description="Where passages come from: any LangChain retriever.")
    vectorstore: VectorStore | None = Field(
        default=None,
        description="Alternative to `retriever`: any LangChain VectorStore (Chroma, FAISS, ...), "
        "searched with `similarity_search_with_score` so the raw score is kept.")
    k: int = Field(default=4, ge=1, description="Passages fetched from `vectorstore` per query "
                   "(a `retriever` uses its own setting).")
    nest_config: NestConfig | None = Field(
        default=None, description="Decoder settings; None is nest_core.config.default_config "
        "(calibrated for the bundled model, the paper's defaults for any other).")
    nest_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="NestConfig fields to override, e.g. {'relaxation': 0.1, 'mode': 'base'}.")
    max_tokens: int = Field(default=128, ge=1, description="Most tokens generated per call.")
    stop: list[str] | None = Field(
        default=None, description="Stop strings; generation ends before the first match.")
    temperature: float | None = Field(
        default=None,
        description="Nest decodes greedily: only None or 0 are accepted (anything else raises).")
    dtype: str | None = Field(
        default=None, description="Model dtype: None/'float32', or 'bfloat16' (faster on CPU).")
    device: str | None = Field(default=None, description="torch device; None is CPU.")
    stuffed_prompts: Literal["question", "keep"] = Field(
        default="question",
        description="Context a prompt template pasted into the messages (a system prompt's "
        "'{context}', a 'Question:' line amid documents), when Nest has passages: 'question' "
        "leaves the pasted copy out and answers the last human turn's question (Nest puts "
        "the passages' best sentences in the prompt itself, instead of a second, unfocused "
        "copy); 'keep' decodes the messages as given.")
    datastore_dir: str | None = Field(
        default=None,
        description="Directory of a persistent span datastore (encoded passage keys survive "
        "restarts); None keeps them in a shared in-memory cache.")

    _lm: Any = PrivateAttr(default=None)  # LanguageModel, loaded on the first call
    _lm_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, data: Any) -> Any:
        """Unknown arguments are refused, not silently dropped (pydantic's default here):
        a misspelt or unsupported setting must not load another model than asked for."""
        if not isinstance(data, dict):
            return data
        remote = sorted(set(data) & set(REMOTE_ONLY))
        if remote:
            warnings.warn(f"{cls.__name__} ignores {remote}: Nest runs the model locally "
                          f"(no API key, retries or network timeout)", UserWarning,
                          stacklevel=2)
            data = {k: v for k, v in data.items() if k not in REMOTE_ONLY}
        known = set(cls.model_fields)
        for field in cls.model_fields.values():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                known.update(a for a in alias.choices if isinstance(a, str))
            elif isinstance(alias, str):
                known.add(alias)
        unknown = sorted(set(data) - known)
        if unknown:
            msg = (f"{cls.__name__} got unexpected argument(s) {unknown}. Decoder settings go "
                   f"in nest_overrides={{...}} (NestConfig fields), transformers loading "
                   f"options in model_kwargs={{...}}; the fields are {sorted(known)}")
            raise ValueError(msg)
        return data

    @model_validator(mode="after")
    def _check_settings(self) -> NestParams:
        _check_temperature(self.temperature)
        for key in ("dtype", "torch_dtype", "device_map", "trust_remote_code"):
            if key in self.model_kwargs:
                hint = ("it is the user's own decision: load the model yourself and use "
                        "from_lm(...)" if key == "trust_remote_code"
                        else "use the `dtype` / `device` fields")
                msg = f"model_kwargs[{key!r}] is not passed through: {hint}"
                raise ValueError(msg)
        if self.retriever is not None and self.vectorstore is not None:
            msg = ("pass either `retriever` or `vectorstore`, not both "
                   "(vectorstore.as_retriever(...) makes a retriever from a store)")
            raise ValueError(msg)
        self.resolved_config()  # fail at construction on unknown or invalid overrides
        return self

    @classmethod
    def from_lm(cls, lm: LanguageModel, **kwargs: Any) -> Any:
        """An instance over an already built :class:`~nest_core.lm.LanguageModel` (inject,
        then offer factories: tests and custom loaders use this instead of ``model=``)."""
        obj = cls(model=lm.name, **kwargs)
        obj._lm = lm
        return obj

    _ls_model_type: ClassVar[str] = "chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model or default_model_name(), "k": self.k,
                "max_tokens": self.max_tokens, "nest_config": repr(self.resolved_config())}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model") or self.model or default_model_name(),
            ls_model_type=self._ls_model_type,  # type: ignore[typeddict-item]
            ls_temperature=0.0,
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stops := (stop if stop is not None else self.stop):
            params["ls_stop"] = list(stops)
        return params

    def resolved_config(self, model_name: str | None = None) -> NestConfig:
        from nest_core.config import default_config

        base = (self.nest_config if self.nest_config is not None
                else default_config(model_name or self.model))
        return base.with_overrides(**self.nest_overrides) if self.nest_overrides else base

    # --- per call --------------------------------------------------------------------------
    def _call_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> CallOptions:
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS))
        if unknown:
            msg = (f"unexpected keyword argument(s) {unknown}; per-call options are "
                   f"{list(CALL_OPTIONS)} (set Nest settings with `nest_overrides`)")
            raise TypeError(msg)
        documents = kwargs.get("documents")
        if documents is not None and not isinstance(documents, (list, tuple)):
            msg = f"documents must be a list of Document, got {type(documents).__name__}"
            raise TypeError(msg)
        _check_temperature(kwargs.get("temperature"))
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            msg = f"max_tokens={max_tokens!r} must be a positive integer"
            raise ValueError(msg)
        stops = stop if stop is not None else self.stop
        return CallOptions(model=kwargs.get("model") or self.model, max_tokens=max_tokens,
                           stop=list(stops) if stops else None,
                           documents=None if documents is None else list(documents))

    def _load_lm(self, name: str | None) -> LanguageModel:
        """The LM for ``name`` (this instance's model unless a call overrides it)."""
        from nest_core.models import load_model

        kwargs = self.model_kwargs or None
        if name != self.model:
            return load_model(name, dtype=self.dtype, device=self.device, model_kwargs=kwargs)
        with self._lm_lock:
            if self._lm is None:
                logger.info("loading %s (first call)", name or default_model_name())
                self._lm = load_model(name, dtype=self.dtype, device=self.device,
                                      model_kwargs=kwargs)
            return self._lm

    def _decoder_stream(self, prompt: str | list[dict[str, str]], passages: list[Passage],
                        opts: CallOptions, question: str | None = None
                        ) -> Iterator[NestChunk]:
        from nest_core.decoder import NestDecoder
        from nest_core.stores.embeddings import default_embedding_function

        lm = self._load_lm(opts.model)
        decoder = NestDecoder(lm, self.resolved_config(lm.name),
                              key_cache=_key_cache(lm, self.datastore_dir),
                              embed=default_embedding_function())
        return decoder.stream(prompt, passages or None, max_new_tokens=opts.max_tokens,
                              stop=opts.stop, question=question)

    # --- passages and the prompt ---------------------------------------------------------
    def _prepare(self, found: Found, opts: CallOptions, given: Sequence[Document] = ()
                 ) -> tuple[list[Passage], list[Document]]:
        """Passages (and source documents) by precedence: per-call ``documents``, documents
        in content blocks, the retriever or vector store searched with the question, then
        context pasted into the prompt's text. Warns once where the answer cannot cite
        source documents, naming the fix."""
        if opts.documents is not None:
            return documents_to_passages(opts.documents)
        if given:
            return documents_to_passages(given)
        # LLM runs are leaves in LangChain's run tree (no get_child): the retriever run
        # inherits the caller's context instead, so traces show it beside the model run.
        if self.retriever is not None:
            with store_errors():
                return documents_to_passages(self.retriever.invoke(found.question))
        if self.vectorstore is not None:
            with store_errors():
                return documents_to_passages(_search(self.vectorstore, found.question, self.k))
        self._warn_unsourced(found, opts)
        return documents_to_passages(found.pasted)

    async def _aprepare(self, found: Found, opts: CallOptions, given: Sequence[Document] = ()
                        ) -> tuple[list[Passage], list[Document]]:
        if opts.documents is None and not given and self.retriever is not None:
            with store_errors():
                return documents_to_passages(await self.retriever.ainvoke(found.question))
        if opts.documents is None and not given and self.vectorstore is not None:
            with store_errors():
                return documents_to_passages(
                    await _asearch(self.vectorstore, found.question, self.k))
        return self._prepare(found, opts, given)

    def _warn_unsourced(self, found: Found, opts: CallOptions) -> None:
        """One warning when no source was given: passages pasted into the prompt are cited
        without file names; no passages at all means a plain LM answer without citations."""
        if not self.resolved_config(opts.model).uses_retrieval:
            return  # a plain LM on purpose (mode="base")
        text = PASTED_WARNING if found.pasted else NO_PASSAGES_WARNING
        warnings.warn(text.format(cls=type(self).__name__), UserWarning, stacklevel=4)

    def _answer_prompt(self, found: Found, passages: list[Passage]) -> list[dict[str, str]]:
        """The conversation to decode: without the context pasted into it and with the last
        human turn reduced to its question when Nest has passages (see ``stuffed_prompts``:
        Nest shows the passages' best sentences itself, instead of a second, unfocused copy),
        else as given."""
        if not passages or self.stuffed_prompts == "keep":
            return found.prompt
        return found.reduced


NO_PASSAGES_WARNING = (
    "{cls} has no passages to copy from or cite: no retriever or vectorstore, no document "
    "blocks in the messages and no context pasted into them, so it answers as a plain LM "
    "without citations. Give it the documents: {cls}(retriever=store.as_retriever()) or "
    "{cls}(vectorstore=store) (searched with the last human turn), document blocks in the "
    "message (documents_to_blocks(docs)), or .bind(documents=docs).")
PASTED_WARNING = (
    "{cls} copies from the context a prompt template pasted into the messages and cites it "
    "as unnamed passages (metadata 'pasted_in'): the pasted text does not say which document "
    "it came from. To cite the source documents, give {cls} the documents instead: "
    "{cls}(retriever=...) or {cls}(vectorstore=...) (searched with the question of the last "
    "human turn, the pasted copy then left out of the prompt), or document blocks "
    "(documents_to_blocks(docs)) in the message.")


def _check_temperature(value: Any) -> None:
    if value not in (None, 0, 0.0) or isinstance(value, bool):
        msg = (f"temperature={value!r} is not supported: Nest decodes greedily (its "
               f"speculative verification and citations assume it). Use temperature=0 or "
               f"leave it unset")
        raise ValueError(msg)


@contextmanager
def store_errors() -> Iterator[None]:
    """A store that rejects the query vector's dimension says so in its own words (Chroma:
    ``InvalidArgumentError ... dimension of 1536, got 384``; FAISS: a bare
    ``AssertionError``): turn that into an error that names the cause and the fix."""
    try:
        yield
    except Exception as err:
        text = str(err)
        faiss_assert = isinstance(err, AssertionError) and "faiss" in _origin(err)
        if not faiss_assert and "dimension" not in text.lower():
            raise
        msg = (f"the vector store rejected the query vector ({type(err).__name__}: "
               f"{text or 'dimension check failed'}): it was built with another embedding "
               f"model than the one it is queried with. Open the store with the embedding "
               f"model that built it (e.g. Chroma(embedding_function=...), "
               f"FAISS.load_local(..., embeddings=...))")
        raise ValueError(msg) from err


def _origin(err: BaseException) -> str:
    """The module the exception was raised in (its innermost frame)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", ""))


def _search(store: VectorStore, query: str, k: int) -> Sequence[Document | tuple[Document, float]]:
    """Scored search when the store offers it (keeps the raw score), plain search otherwise."""
    try:
        return store.similarity_search_with_score(query, k=k)
    except NotImplementedError:
        return store.similarity_search(query, k=k)


async def _asearch(store: VectorStore, query: str, k: int
                   ) -> Sequence[Document | tuple[Document, float]]:
    try:
        return await store.asimilarity_search_with_score(query, k=k)
    except NotImplementedError:
        return await store.asimilarity_search(query, k=k)


def _key_cache(lm: LanguageModel, datastore_dir: str | None) -> KeyCache:
    """One key cache per (model, datastore): encoded passages are reused across instances."""
    key = (lm.fingerprint, datastore_dir)
    with _CACHE_LOCK:
        cache = _KEY_CACHES.get(key)
        if cache is None:
            if datastore_dir is None:
                from nest_core.encoding import MemoryKeyCache

                cache = MemoryKeyCache()
            else:
                from nest_core.stores.datastore import SpanDatastore

                cache = SpanDatastore(datastore_dir)
            _KEY_CACHES[key] = cache
        return cache


def usage(result: NestResult) -> UsageMetadata:
    prompt = int(result.stats.prompt_tokens)
    output = len(result.token_ids)
    return UsageMetadata(input_tokens=prompt, output_tokens=output,
                         total_tokens=prompt + output)


def nest_metadata(result: NestResult) -> dict[str, Any]:
    """Spans and stats of one answer, JSON-ready (what tracing and UIs read): ``spans`` are
    the copied spans, ``matches`` the matched ones (text the LM wrote that a document holds
    verbatim); every entry carries its ``kind``. ``citations`` are the ones the answer shows
    (:meth:`NestResult.cited_spans`: content, whole words, none on an unsupported answer)."""
    return {
        "spans": [s.to_dict() for s in result.spans],
        "matches": [s.to_dict() for s in result.matches],
        "stats": result.stats.to_dict(),
        "attribution_ratio": result.attribution_ratio,
        "mean_span_length": result.mean_span_length,
        "prompt_truncated": result.prompt_truncated,
        "abstained": result.abstained,
        "quoted": result.quoted,
        "citations": [s.to_dict() for s in result.cited_spans()],
    }
