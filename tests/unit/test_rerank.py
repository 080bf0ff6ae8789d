"""Hybrid retrieval (:mod:`nest_core.stores.sources.rerank`): a wider pool from the store, re-ranked
by the question's words, with an embedding that cannot tell the passages apart (so the store's
order is known and the lexical step alone must find the passage)."""

from __future__ import annotations

import asyncio

import pytest

from nest_core import Passage
from nest_core.focus import rank_passages
from nest_core.stores.sources import InMemorySource
from nest_core.stores.sources.rerank import LexicalRerank

LANGUAGES = [Passage(id=f"lang-{i}", text=f"{name}: code {code} (individual language).",
                     title="ISO 639-3 language codes")
             for i, (name, code) in enumerate([
                 ("Rapa", "ray"), ("Rahambuu", "raz"), ("Rumai Palaung", "rbb"),
                 ("Miraya Bikol", "rbl"), ("Barababaraba", "rbp"), ("Northern Bontok", "rbk")])]


def blind(texts: list[str]) -> list[list[float]]:
    """Every text the same vector: the store returns passages in insertion order."""
    return [[1.0, 0.0, 0.0] for _ in texts]


def test_rank_passages_puts_the_named_passage_first_and_keeps_order_among_equals():
    q = "What is the ISO 639-3 code of the Northern Bontok language?"
    order = rank_passages(q, LANGUAGES)
    assert order[0] == 5  # the only passage naming Northern Bontok
    assert order[1:] == [0, 1, 2, 3, 4]  # the rest tie: the given (retriever) order


def test_rank_passages_weighs_rare_words_over_common_ones():
    ps = [Passage(id="a", text="The office is open on Monday."),
          Passage(id="b", text="The Ghent office opened in 2019."),
          Passage(id="c", text="Every office has a visitor sign-in desk.")]
    assert rank_passages("When did the Ghent office open?", ps)[0] == 1


def test_rerank_finds_a_passage_the_store_ranks_beyond_k():
    store = InMemorySource(LANGUAGES, embed=blind)
    q = "What is the ISO 639-3 code of the Northern Bontok language?"
    assert "lang-5" not in [p.id for p in store.retrieve(q, 3)]
    got = LexicalRerank(store, pool=6).retrieve(q, 3)
    assert [p.id for p in got] == ["lang-5", "lang-0", "lang-1"]
    # a pool no wider than k re-orders only what the store returned
    assert "lang-5" not in [p.id for p in LexicalRerank(store, pool=3).retrieve(q, 3)]
    assert [p.id for p in asyncio.run(LexicalRerank(store, pool=6).aretrieve(q, 3))] == \
        [p.id for p in got]


def test_rerank_checks_its_arguments():
    store = InMemorySource(LANGUAGES, embed=blind)
    with pytest.raises(ValueError, match="pool"):
        LexicalRerank(store, pool=0)
    with pytest.raises(TypeError, match="retrieve"):
        LexicalRerank(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k="):
        LexicalRerank(store).retrieve("question", 0)
    assert len(LexicalRerank(store).retrieve("Rapa", 100)) == len(LANGUAGES)
