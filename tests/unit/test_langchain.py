"""LangChain integration without a model: the standard unit suite, adapters, settings."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_tests.unit_tests import ChatModelUnitTests

import nest_integrations.langchain as lc
from nest_core.citations import is_citation
from nest_core.types import DecodeStats, NestChunk, NestResult, Passage, Span
from nest_integrations.langchain import (
    ChatNest,
    NestLLM,
    document_to_passage,
    documents_to_passages,
    format_citations,
    passage_to_document,
    span_to_citation,
    stable_document_id,
)
from nest_integrations.langchain._shared import CallOptions
from nest_integrations.langchain.chat_models import (
    _last_chunk,
    messages_to_prompt,
    piece_chunks,
    retrieval_query,
)
from nest_integrations.langchain.documents import result_citations


class TestChatNestUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatNest]:
        return ChatNest

    @property
    def chat_model_params(self) -> dict:
        return {"k": 2}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False


def test_all_is_exact() -> None:
    assert sorted(lc.__all__) == [
        "ChatNest", "NestLLM", "NestMiniLMEmbeddings", "NestToolInput", "create_nest_chain",
        "create_nest_tool", "document_to_passage", "documents_to_blocks",
        "documents_to_passages", "format_citations",
        "passage_to_document", "span_to_citation", "stable_document_id",
    ]
    for name in lc.__all__:
        assert getattr(lc, name) is not None


def test_import_loads_no_community_and_no_model() -> None:
    code = ("import sys, nest_integrations.langchain as m; m.ChatNest(); m.NestLLM(); "
            "print('langchain_community' in sys.modules, 'sentence_transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]


# --- stable ids and adapters ---------------------------------------------------------------
def test_stable_id_prefers_document_id_then_source_start_then_hash() -> None:
    assert stable_document_id(Document(id="abc", page_content="x",
                                       metadata={"source": "s", "start_index": 3})) == "abc"
    assert stable_document_id(Document(page_content="x",
                                       metadata={"source": "a.md", "start_index": 0})) == "a.md#0"
    hashed = stable_document_id(Document(page_content="same text", metadata={"source": "a.md"}))
    assert hashed == stable_document_id(Document(page_content="same text"))
    assert hashed.startswith("sha256:")
    assert len(hashed) == len("sha256:") + 16
    assert hashed != stable_document_id(Document(page_content="other text"))


def test_document_to_passage_keeps_text_title_and_raw_score() -> None:
    doc = Document(id="d1", page_content="  Body text. ", metadata={"title": "T", "source": "u"})
    p = document_to_passage(doc, score=0.25)
    assert (p.id, p.text, p.title, p.score) == ("d1", "  Body text. ", "T", 0.25)
    assert dict(p.metadata) == {"title": "T", "source": "u", "nest_score": 0.25}
    assert document_to_passage(Document(page_content="x")).title is None
    with pytest.raises(TypeError, match="expected a langchain_core Document"):
        document_to_passage("not a document")  # type: ignore[arg-type]


def test_documents_to_passages_dedups_by_id_and_returns_sources_with_ids() -> None:
    a = Document(page_content="alpha", metadata={"source": "a"})
    b = Document(id="b", page_content="beta")
    passages, sources = documents_to_passages([(a, 1.5), b, Document(page_content="alpha")])
    assert [p.id for p in passages] == [stable_document_id(a), "b"]
    assert [p.score for p in passages] == [1.5, None]
    assert [(d.id, d.page_content) for d in sources] == [(stable_document_id(a), "alpha"),
                                                        ("b", "beta")]


def test_passage_to_document_round_trip() -> None:
    p = Passage(id="p", text="body", title="Title", metadata={"source": "s"})
    doc = passage_to_document(p)
    assert (doc.id, doc.page_content, doc.metadata) == ("p", "body",
                                                        {"source": "s", "title": "Title"})
    assert document_to_passage(doc) == p


def _result(answer: str, passage: Passage, cited: str) -> NestResult:
    start = answer.index(cited)
    src = passage.text.index(cited)
    span = Span(text=cited, out_start=start, out_end=start + len(cited), passage=passage,
                src_start=src, src_end=src + len(cited), token_start=1, token_end=4)
    stats = DecodeStats(generated_tokens=6, copied_tokens=3, prompt_tokens=11)
    return NestResult(text=answer, token_ids=[5, 6, 7, 8, 9, 10], spans=[span],
                      passages=[passage], stats=stats, finish_reason="length")


PASSAGE = Passage(id="doc-1", text="Marta Quillfeather founded it in Ostrava.", title="Zephyr",
                  metadata={"source": "https://example.org/zephyr"})


def test_span_to_citation_fields() -> None:
    result = _result("It was Marta Quillfeather, in 1987.", PASSAGE, "Marta Quillfeather")
    c = span_to_citation(result.spans[0])
    assert c == {
        "type": "citation", "id": "nest-7-25-doc-1", "url": "https://example.org/zephyr",
        "title": "Zephyr", "start_index": 7, "end_index": 25, "cited_text": "Marta Quillfeather",
        "extras": {"doc_id": "doc-1", "src_start": 0, "src_end": 18, "kind": "copied"},
    }
    assert result.text[c["start_index"]:c["end_index"]] == c["cited_text"] \
        == PASSAGE.text[c["extras"]["src_start"]:c["extras"]["src_end"]]


def test_format_citations_numbers_sources() -> None:
    result = _result("It was Marta Quillfeather, in 1987.", PASSAGE, "Marta Quillfeather")
    text = format_citations(result.text, [span_to_citation(result.spans[0])])
    assert text == ("It was Marta Quillfeather[1], in 1987.\n\n"
                    '[1] Zephyr (https://example.org/zephyr): "Marta Quillfeather"')


def _pieces(result: NestResult, cuts: list[tuple[str, Span | None]]) -> list[NestChunk]:
    """Decoder pieces with the given texts and spans; the last carries ``result``."""
    chunks = [NestChunk(text=t, token_ids=[], span=sp) for t, sp in cuts]
    chunks.append(NestChunk(text="", token_ids=[], result=result))
    return chunks


def _split(span: Span, at: int) -> tuple[Span, Span]:
    """``span`` as two pieces copied from consecutive rows, cut after ``at`` characters
    and one token (the way the stream's hold-back cuts a run in two)."""
    a = dataclasses.replace(span, text=span.text[:at], out_end=span.out_start + at,
                            src_end=span.src_start + at, token_end=span.token_start + 1)
    b = dataclasses.replace(span, text=span.text[at:].lstrip(),
                            out_start=span.out_start + at + 1, src_start=span.src_start + at + 1,
                            token_start=span.token_start + 1, source_row=span.source_row + 1)
    return a, b


def _streamed(result: NestResult, cuts: list[tuple[str, Span | None]],
              sources: list[Document]) -> list[AIMessageChunk]:
    opts = CallOptions(model=None, max_tokens=8, stop=None, documents=None)
    return [c.message for p in _pieces(result, cuts) for c in piece_chunks(p, sources, opts)]


def test_stream_sends_text_then_the_citations_in_the_last_chunk_and_merges_to_invoke() -> None:
    result = _result("It was Marta Quillfeather, in 1987.", PASSAGE, "Marta Quillfeather")
    first, rest = _split(result.spans[0], len("Marta"))
    chunks = _streamed(result, [("It was ", None), ("Marta", first), (" ", None),
                                ("Quillfeather", rest), (", in 1987.", None)],
                       [passage_to_document(PASSAGE)])
    cited = [[a["cited_text"] for a in c.content[0].get("annotations", [])] for c in chunks]
    # a piece's span is provenance, not yet a citation: all of them ride in the last chunk
    assert cited == [[], [], [], [], [], ["Marta Quillfeather"]]
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.chunk_position == "last"
    assert full.content == [{"type": "text", "text": result.text, "index": 0,
                             "annotations": [span_to_citation(result.spans[0])]}]
    assert full.usage_metadata == {"input_tokens": 11, "output_tokens": 6, "total_tokens": 17}
    assert full.response_metadata["finish_reason"] == "length"
    assert [d.id for d in full.response_metadata["source_documents"]] == ["doc-1"]
    assert full.response_metadata["nest"]["spans"] == [result.spans[0].to_dict()]
    assert full.response_metadata["nest"]["matches"] == []
    assert full.response_metadata["nest"]["citations"] == [result.spans[0].to_dict()]


def _copied(at: int, passage: Passage, text: str, row: int) -> Span:
    """A real copied span: ``text`` at output offset ``at``, where ``passage`` holds it."""
    src = passage.text.index(text)
    return Span(text=text, out_start=at, out_end=at + len(text), passage=passage,
                src_start=src, src_end=src + len(text), token_start=row, token_end=row + 1,
                source_row=row)


def test_a_lone_function_word_punctuation_or_fragment_is_never_streamed_as_a_citation(
) -> None:
    release = Passage(id="doc-3", text="Release 1.4 of the Sidewinder.", title="Releases")
    answer = "Marta Quillfeather led it, in Sidney, release 1.4."
    spans = [
        _copied(0, PASSAGE, "Marta Quillfeather", 0),
        _copied(answer.index(" in ") + 1, PASSAGE, "in", 5),  # a lone function word
        _copied(answer.index("Sid"), release, "Sid", 9),  # ends inside "Sidney"
        _copied(answer.index("1.4"), release, "1", 2),  # one character
        _copied(len(answer) - 1, release, ".", 12),  # punctuation
    ]
    for s in spans:  # the spans are real: the passage holds what the answer shows
        assert answer[s.out_start:s.out_end] == s.text == s.passage.text[s.src_start:s.src_end]
    result = NestResult(text=answer, token_ids=list(range(12)), spans=spans,
                        passages=[PASSAGE, release], stats=DecodeStats(), finish_reason="stop")
    cuts: list[tuple[str, Span | None]] = []
    at = 0
    for s in spans:  # the decoder's pieces: the text between spans, then each span
        cuts += [(answer[at:s.out_start], None), (s.text, s)]
        at = s.out_end
    chunks = _streamed(result, [c for c in cuts if c[0]], [])
    annotations = [a for c in chunks for a in c.content[0].get("annotations", [])]
    assert [a["cited_text"] for a in annotations] == ["Marta Quillfeather"]
    assert [is_citation(s, answer) for s in spans] == [True, False, False, False, False]
    assert len(chunks[-1].response_metadata["nest"]["spans"]) == 5  # provenance kept apart


def _with_matches() -> NestResult:
    """Copied "Marta Quillfeather"; matched "in Ostrava" (the LM wrote it) and "1987"."""
    from nest_core.matching import match_spans

    answer = "In 1987 it was Marta Quillfeather, in Ostrava."
    history = Passage(id="doc-2", text="The company dates from 1987.", title="History")
    result = _result(answer, PASSAGE, "Marta Quillfeather")
    return dataclasses.replace(
        result, passages=[PASSAGE, history],
        matches=match_spans(answer, [PASSAGE, history], result.spans))


def test_matched_spans_become_citations_of_kind_matched() -> None:
    result = _with_matches()
    opts = CallOptions(model=None, max_tokens=8, stop=None, documents=None)
    chunk = _last_chunk(result, [passage_to_document(p) for p in result.passages], opts,
                        result_citations(result))
    annotations = chunk.message.content[0]["annotations"]
    assert [(c["cited_text"], c["extras"]["doc_id"], c["extras"]["kind"])
            for c in annotations] == [("1987", "doc-2", "matched"),
                                      ("Marta Quillfeather", "doc-1", "copied"),
                                      ("in Ostrava", "doc-1", "matched")]
    for c, p in zip(annotations, ["doc-2", "doc-1", "doc-1"], strict=True):
        source = {q.id: q for q in result.passages}[p]
        assert result.text[c["start_index"]:c["end_index"]] == c["cited_text"] \
            == source.text[c["extras"]["src_start"]:c["extras"]["src_end"]]
    nest = chunk.message.response_metadata["nest"]
    assert [s["text"] for s in nest["spans"]] == ["Marta Quillfeather"]
    assert [(s["text"], s["kind"]) for s in nest["matches"]] == [
        ("1987", "matched"), ("in Ostrava", "matched")]
    assert nest["attribution_ratio"] == 3 / 6  # copied tokens only
    text = format_citations(result.text, annotations)
    assert text.splitlines()[0] == \
        "In 1987[~1] it was Marta Quillfeather[2], in Ostrava[~2]."


def test_nest_llm_generation_info_lists_matches_apart() -> None:
    from nest_integrations.langchain.llms import _last_chunk as llm_last_chunk

    result = _with_matches()
    opts = CallOptions(model=None, max_tokens=8, stop=None, documents=None)
    info = llm_last_chunk(result, [], opts).generation_info
    assert info is not None
    assert [(s["text"], s["kind"]) for s in info["spans"]] == [("Marta Quillfeather", "copied")]
    assert [(s["text"], s["kind"], s["passage_id"]) for s in info["matches"]] == [
        ("1987", "matched", "doc-2"), ("in Ostrava", "matched", "doc-1")]


# --- settings and messages -----------------------------------------------------------------
@pytest.mark.parametrize("cls", [ChatNest, NestLLM])
def test_temperature_other_than_zero_is_an_error(cls: type) -> None:
    assert cls(temperature=0).temperature == 0
    assert cls().temperature is None
    with pytest.raises(ValueError, match="decodes greedily"):
        cls(temperature=0.7)


def test_settings_are_checked_at_construction() -> None:
    from langchain_core.vectorstores import InMemoryVectorStore

    from nest_integrations.langchain import NestMiniLMEmbeddings

    store = InMemoryVectorStore(NestMiniLMEmbeddings())
    with pytest.raises(ValueError, match="either `retriever` or `vectorstore`"):
        ChatNest(vectorstore=store, retriever=store.as_retriever())
    with pytest.raises(TypeError, match="unknown NestConfig field"):
        ChatNest(nest_overrides={"not_a_field": 1})
    with pytest.raises(ValueError, match="relaxation"):
        ChatNest(nest_overrides={"relaxation": 0.0})
    assert ChatNest(nest_overrides={"mode": "base"}).resolved_config().mode == "base"


def test_unknown_call_option_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"per-call options are \['documents', 'model'"):
        ChatNest()._call_options(None, {"top_p": 0.9})
    opts = ChatNest(stop=["x"], max_tokens=9)._call_options(None, {})
    assert (opts.stop, opts.max_tokens, opts.documents) == (["x"], 9, None)
    assert ChatNest(stop=["x"])._call_options([], {}).stop is None


def test_messages_to_prompt_and_query() -> None:
    messages = [SystemMessage("be brief"), HumanMessage("first?"), AIMessage("yes"),
                ChatMessage(role="user", content="second?")]
    assert messages_to_prompt(messages) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "yes"}, {"role": "user", "content": "second?"},
    ]
    assert retrieval_query(messages) == "second?"  # the question the prompt ends with
    assert retrieval_query([HumanMessage("a"), HumanMessage("b"), AIMessage("c")]) == "b"
