"""LlamaIndex's own engines with ``NestLLM`` on the real SmolLM2 and the embedded handbook
(examples/data), in stores LlamaIndex wrote to disk (Chroma reopened, FAISS reloaded): the
stock code a LlamaIndex user writes, unchanged, answers right and cites the right file.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.vector_stores.chroma")
pytest.importorskip("llama_index.vector_stores.faiss")

from llama_index.core.query_engine import CitationQueryEngine

# the drop-in tests' module fixtures (built again for this module); F811 below is their use
from test_llama_index_dropin import (  # noqa: F401
    GHENT,
    assert_spans_exact,
    chroma_index,
    embed_model,
    faiss_index,
    handbook_nodes,
)

from nest_integrations.llama_index import NestLLM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW = 40


@pytest.fixture(scope="module")
def llm(smollm):
    return NestLLM(lm=smollm, max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("mode", [None, "context", "condense_plus_context"])
def test_as_chat_engine_answers_and_cites_the_handbook(chroma_index, llm, mode):  # noqa: F811
    kwargs = {"chat_mode": mode} if mode else {}
    res = chroma_index.as_chat_engine(llm=llm, **kwargs).chat(GHENT)
    assert "2019" in res.response
    assert res.metadata["nest_spans"]
    assert assert_spans_exact(res.response, res.metadata, res.source_nodes) == {
        "02-offices.md"}
    assert all(s["title"] == "02-offices.md" for s in res.metadata["nest_spans"])


@pytest.mark.parametrize("mode", ["refine", "tree_summarize"])
def test_response_modes_answer_and_cite_the_handbook(faiss_index, llm, mode):  # noqa: F811
    res = faiss_index.as_query_engine(llm=llm, response_mode=mode,
                                      similarity_top_k=3).query(GHENT)
    assert len(res.source_nodes) == 3
    assert "2019" in res.response
    assert assert_spans_exact(res.response, res.metadata, res.source_nodes) == {
        "02-offices.md"}


def test_citation_query_engine_cites_with_markers(faiss_index, llm):  # noqa: F811
    res = CitationQueryEngine.from_args(faiss_index, llm=llm, similarity_top_k=3).query(GHENT)
    assert "2019" in res.response
    files = assert_spans_exact(res.response, res.metadata, res.source_nodes)
    assert files == {"02-offices.md"}
    for s in res.metadata["nest_spans"]:  # "[n]" follows each cited stretch
        assert res.response[s["out_end"]:].startswith(f" [{s['source_index']}]")
