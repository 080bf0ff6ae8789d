"""LlamaIndex integration, pure parts: node conversion and the span/marker assembler."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.schema import ImageNode, NodeWithScore, TextNode

import nest_integrations.llama_index as nli
from nest_core.types import NestChunk, Passage, Span
from nest_integrations.llama_index.citations import SpanAssembler
from nest_integrations.llama_index.llm import retrieval_query
from nest_integrations.llama_index.nodes import nodes_to_passages, public_metadata

P1 = Passage(id="n1", text="The Zephyr Widget Company was founded in 1987 in Ostrava. It makes "
                            "clocks.")
P2 = Passage(id="n2", text="It makes brass widgets for clocks.")


def test_all_is_the_public_api():
    assert nli.__all__ == ["NestChatEngine", "NestLLM", "NestQueryEngine",
                           "NestQueryEngineTool", "NestRetrievalError",
                           "bundled_embedding", "bundled_minilm_path", "nodes_to_passages"]
    for name in nli.__all__:
        assert getattr(nli, name) is not None


def test_public_metadata_strips_llama_index_bookkeeping():
    meta = {"_node_content": "{...}", "_node_type": "TextNode", "source": "a.txt", "page": 3}
    assert public_metadata(meta) == {"source": "a.txt", "page": 3}
    assert public_metadata(None) == {}


def test_nodes_to_passages_keeps_ids_titles_scores_and_skips_textless(caplog):
    text = TextNode(id_="a", text="Alpha text.", start_char_idx=10,
                    metadata={"title": "Alpha", "_node_content": "x", "source": "a.txt"})
    image = ImageNode(id_="img", text="", image_url="http://example.invalid/x.png")
    dup = TextNode(id_="a", text="Alpha text.")
    other = TextNode(id_="b", text="Beta text.", metadata={"title": 5})
    nodes = [NodeWithScore(node=text, score=0.9), NodeWithScore(node=image, score=0.8),
             NodeWithScore(node=dup, score=0.7), NodeWithScore(node=other, score=None)]
    with caplog.at_level(logging.WARNING, logger="nest_integrations.llama_index.nodes"):
        passages, kept = nodes_to_passages(nodes)
    assert [p.id for p in passages] == ["a", "b"]
    assert [k.node.node_id for k in kept] == ["a", "b"]
    assert passages[0].text == "Alpha text."
    assert passages[0].title == "Alpha"
    assert passages[0].score == 0.9
    assert dict(passages[0].metadata) == {"title": "Alpha", "source": "a.txt", "node_id": "a"}
    assert passages[1].title is None  # a non-str title is not used
    assert "skipping node img (ImageNode)" in caplog.text


def _span(p: Passage, out_start: int, text: str, token_start: int, token_end: int) -> Span:
    src_start = p.text.index(text)
    return Span(text=text, out_start=out_start, out_end=out_start + len(text), passage=p,
                src_start=src_start, src_end=src_start + len(text),
                token_start=token_start, token_end=token_end)


def _chunks() -> list[NestChunk]:
    # output: "Answer: The Zephyr Widget Company was founded in 1987, brass widgets"
    return [
        NestChunk("Answer:", [1, 2]),
        NestChunk(" The Zephyr Widget", [3, 4, 5], _span(P1, 8, "The Zephyr Widget", 2, 5)),
        NestChunk(" Company was", [6, 7], _span(P1, 26, "Company was", 5, 7)),
        NestChunk(" founded in 1987", [8, 9, 10], _span(P1, 38, "founded in 1987", 7, 10)),
        NestChunk(",", [11]),
        NestChunk(" brass widgets", [12, 13], _span(P2, 55, "brass widgets", 11, 13)),
        NestChunk("", [], None),
    ]


def _nodes() -> dict[str, tuple[int, NodeWithScore]]:
    return {p.id: (i, NodeWithScore(node=TextNode(id_=p.id, text=p.text,
                                                  start_char_idx=100 * i), score=1.0))
            for i, p in enumerate((P1, P2), start=1)}


def test_assembler_merges_contiguous_pieces_without_markers():
    spans: list[dict] = []
    asm = SpanAssembler(_nodes(), spans)
    pieces = [asm.feed(c) for c in _chunks()] + [asm.finish()]
    text = "".join(pieces)
    assert text == "Answer: The Zephyr Widget Company was founded in 1987, brass widgets"
    assert pieces[:2] == ["Answer:", " The Zephyr Widget"]  # nothing held back
    assert [(s["node_id"], s["out_start"], s["out_end"], s["cited_text"]) for s in spans] == [
        ("n1", 8, 53, "The Zephyr Widget Company was founded in 1987"),
        ("n2", 55, 68, "brass widgets"),
    ]
    assert spans[0]["src_start"] == 0
    assert spans[0]["src_end"] == 45
    assert spans[0]["doc_start"] == 100
    assert spans[0]["doc_end"] == 145
    assert spans[1]["source_index"] == 2
    assert (spans[1]["doc_start"], spans[1]["doc_end"]) == (209, 222)
    assert spans[0]["token_start"] == 2
    assert spans[0]["token_end"] == 10


def test_assembler_markers_follow_spans_and_offsets_index_marked_text():
    spans: list[dict] = []
    asm = SpanAssembler(_nodes(), spans, citation_markers=True)
    chunks = _chunks()
    pieces = [asm.feed(c) for c in chunks[:5]]
    assert len(spans) == 1  # the first span closed when "," arrived
    pieces += [asm.feed(c) for c in chunks[5:]] + [asm.finish()]
    text = "".join(pieces)
    assert text == "Answer: The Zephyr Widget Company was founded in 1987 [1], brass widgets [2]"
    for s in spans:
        assert text[s["out_start"]:s["out_end"]] == s["cited_text"]
    assert [(s["out_start"], s["out_end"]) for s in spans] == [(8, 53), (59, 72)]


def test_assembler_does_not_merge_a_jump_inside_the_same_passage():
    p = Passage(id="n1", text="red fish blue fish red fish")
    chunks = [NestChunk("red fish", [1, 2], _span(p, 0, "red fish", 0, 2)),
              NestChunk(" blue", [3], Span("blue", 9, 13, p, 9, 13, 2, 3)),
              NestChunk(" red", [4], Span("red", 14, 17, p, 0, 3, 3, 4))]
    spans: list[dict] = []
    asm = SpanAssembler({"n1": (1, NodeWithScore(node=TextNode(id_="n1", text=p.text)))},
                        spans, citation_markers=True)
    text = "".join(asm.feed(c) for c in chunks) + asm.finish()
    assert text == "red fish blue [1] red [1]"
    assert [(s["src_start"], s["src_end"], s["cited_text"]) for s in spans] == [
        (0, 13, "red fish blue"), (0, 3, "red")]


def test_assembler_ignores_spans_of_unknown_passages():
    spans: list[dict] = []
    asm = SpanAssembler({}, spans, citation_markers=True)
    text = "".join(asm.feed(c) for c in _chunks()) + asm.finish()
    assert text == "Answer: The Zephyr Widget Company was founded in 1987, brass widgets"
    assert spans == []


def _chunks_with_matches() -> list[NestChunk]:
    """Copied "The Zephyr Widget" [n1] and "brass widgets" [n2]; the LM wrote "in Ostrava"
    (matched, n1) and "for clocks" (both passages hold "makes" and "clocks": no citation)."""
    from nest_core.matching import match_spans
    from nest_core.types import DecodeStats, NestResult

    text = "Answer: The Zephyr Widget, in Ostrava, makes brass widgets for clocks."
    copied = [_span(P1, 8, "The Zephyr Widget", 1, 4), _span(P2, 45, "brass widgets", 8, 10)]
    result = NestResult(text=text, token_ids=list(range(12)), spans=copied, passages=[P1, P2],
                        stats=DecodeStats(), finish_reason="eos",
                        matches=match_spans(text, [P1, P2], copied))
    return [NestChunk("Answer:", [0]), NestChunk(" The Zephyr Widget", [1, 2, 3], copied[0]),
            NestChunk(", in Ostrava, makes", [4, 5, 6, 7]),
            NestChunk(" brass widgets", [8, 9], copied[1]),
            NestChunk(" for clocks.", [10, 11]), NestChunk("", [], None, result)]


@pytest.mark.parametrize("markers", [False, True])
def test_matched_spans_go_to_nest_matches_with_offsets_into_the_emitted_text(markers):
    from nest_integrations.llama_index._runtime import decode_pieces
    from nest_integrations.llama_index.nodes import response_metadata

    class Decoder:
        def stream(self, *args, **kwargs):
            return iter(_chunks_with_matches())

    kept = [node for _, node in _nodes().values()]
    metadata = response_metadata(kept)
    assert metadata["nest_matches"] == []
    text = "".join(decode_pieces(Decoder(), "q", [P1, P2], kept, metadata, max_new_tokens=12,
                                 stop=None, citation_markers=markers))
    assert text == ("Answer: The Zephyr Widget [1], in Ostrava, makes brass widgets [2] for "
                    "clocks." if markers else
                    "Answer: The Zephyr Widget, in Ostrava, makes brass widgets for clocks.")
    assert [(s["cited_text"], s["kind"]) for s in metadata["nest_spans"]] == [
        ("The Zephyr Widget", "copied"), ("brass widgets", "copied")]
    (match,) = metadata["nest_matches"]
    start = 31 if markers else 27
    assert (match["out_start"], match["out_end"]) == (start, start + len("in Ostrava"))
    assert text[match["out_start"]:match["out_end"]] == match["cited_text"] == "in Ostrava"
    assert P1.text[match["src_start"]:match["src_end"]] == "in Ostrava"
    assert (match["node_id"], match["source_index"], match["kind"]) == ("n1", 1, "matched")
    assert (match["doc_start"], match["token_start"], match["token_end"]) == (
        100 + match["src_start"], 0, 0)
    for s in metadata["nest_spans"]:
        assert text[s["out_start"]:s["out_end"]] == s["cited_text"]


@pytest.mark.parametrize(("prompt", "query"), [
    (("Context information is below.\n---\nctx Query: not this\n---\nGiven the context "
     "information and not prior knowledge, answer the query.\nQuery: Who founded it?\n"
     "Answer: "), "Who founded it?"),
    ("Who founded it?", "Who founded it?"),
])
def test_retrieval_query_takes_the_question_from_stock_templates(prompt, query):
    assert retrieval_query(prompt) == query


def test_bundled_minilm_path_points_at_a_model_dir():
    path = nli.bundled_minilm_path()
    assert (path / "config.json").is_file()
    assert (path / "modules.json").is_file()


def test_missing_extra_names_the_install_line():
    from nest_integrations.llama_index._deps import require

    with pytest.raises(ImportError, match=r'pip install "nest-decoding\[llamaindex\]"'):
        require("llama_index.no_such_module_for_nest")
