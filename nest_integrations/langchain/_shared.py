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
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from langchain_core.documents import Document
from langchain_core.language_models import LangSmithParams
from langchain_core.messages.ai import UsageMetadata
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from nest_core.config import NestConfig
from nest_core.prompts import find_question, with_question
from nest_core.types import NestChunk, NestResult, Passage
from nest_integrations.langchain.documents import documents_to_passages

if TYPE_CHECKING:
    from nest_core.encoding import KeyCache
    from nest_core.lm import LanguageModel

logger = logging.getLogger(__name__)

PROVIDER = "nest"
CALL_OPTIONS = ("documents", "model", "max_tokens", "temperature")
# What hosted chat models take (and langchain-tests passes): meaningless for a local model.
REMOTE_ONLY = ("api_key", "base_url", "timeout", "max_retries")
_P = TypeVar("_P", str, list[dict[str, str]])
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
        description="A prompt template that pasted retrieved context around a 'Question:' "
        "line, when Nest has passages for it: 'question' answers the question line (Nest "
        "puts the passages' best sentences in the prompt itself, instead of a second, "
        "unfocused copy of them); 'keep' decodes the prompt as given.")
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

    # --- retrieval -------------------------------------------------------------------------
    def _query(self, asked: str, opts: CallOptions, given: list[Document]) -> str | None:
        """The question inside a stuffed prompt (what the retriever and the focus must see),
        None for a plain question. Warns once when a stuffed prompt comes with no passages
        at all: it is decoded as a plain LM, and the user should know what to change."""
        question = find_question(asked).stuffed
        has_source = (opts.documents is not None or bool(given)
                      or self.retriever is not None or self.vectorstore is not None)
        if question is not None and not has_source:
            warnings.warn(STUFFED_WARNING.format(cls=type(self).__name__), UserWarning,
                          stacklevel=4)
        return question

    def _answer_prompt(self, prompt: _P, question: str | None, passages: list[Passage]) -> _P:
        """The prompt to decode: a stuffed prompt's last user message reduced to its
        question when Nest has the passages (see ``stuffed_prompts``), else ``prompt``."""
        if question is None or not passages or self.stuffed_prompts == "keep":
            return prompt
        return with_question(prompt, question)  # type: ignore[return-value]

    def _retrieve(self, query: str, opts: CallOptions, given: Sequence[Document] = ()
                  ) -> tuple[list[Passage], list[Document]]:
        """Passages, by precedence: per-call ``documents``, documents given in the messages
        (content blocks), then the retriever or vector store searched with ``query``."""
        if opts.documents is not None:
            return documents_to_passages(opts.documents)
        if given:
            return documents_to_passages(given)
        # LLM runs are leaves in LangChain's run tree (no get_child): the retriever run
        # inherits the caller's context instead, so traces show it beside the model run.
        if self.retriever is not None:
            with store_errors():
                return documents_to_passages(self.retriever.invoke(query))
        if self.vectorstore is not None:
            with store_errors():
                return documents_to_passages(_search(self.vectorstore, query, self.k))
        return [], []

    async def _aretrieve(self, query: str, opts: CallOptions, given: Sequence[Document] = ()
                         ) -> tuple[list[Passage], list[Document]]:
        if opts.documents is not None:
            return documents_to_passages(opts.documents)
        if given:
            return documents_to_passages(given)
        if self.retriever is not None:
            with store_errors():
                docs = await self.retriever.ainvoke(query)
            return documents_to_passages(docs)
        if self.vectorstore is not None:
            with store_errors():
                return documents_to_passages(await _asearch(self.vectorstore, query, self.k))
        return [], []


STUFFED_WARNING = (
    "{cls} got a prompt that already holds retrieved context (a 'Question:' line amid other "
    "text) but no passages, so it answers as a plain LM with no citations. Give Nest the "
    "documents instead of pasting them: put them in the message as content blocks "
    "(documents_to_blocks(docs)), bind them per call (.bind(documents=docs)), or set "
    "{cls}(retriever=...), which retrieves on the question inside the prompt.")


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
    verbatim); every entry carries its ``kind``."""
    return {
        "spans": [s.to_dict() for s in result.spans],
        "matches": [s.to_dict() for s in result.matches],
        "stats": result.stats.to_dict(),
        "attribution_ratio": result.attribution_ratio,
        "mean_span_length": result.mean_span_length,
        "prompt_truncated": result.prompt_truncated,
    }
